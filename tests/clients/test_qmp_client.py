"""The QMP client against a real QEMU 7.2 started with -S, on asyncio and trio."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Iterator

import anyio
import msgspec
import pytest
from conftest import PausedQemu

from protocols.qmp import (
    ConnectionLostError,
    EventsDropped,
    EventSubscription,
    ExecuteError,
    QMPEvent,
    QMPTimeoutError,
    connect,
)

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]


@contextlib.contextmanager
def sigstopped(qemu: PausedQemu) -> Iterator[None]:
    os.kill(qemu.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(qemu.pid, signal.SIGCONT)


def holds_pipe(pid: int, inode: int) -> bool:
    target = f"pipe:[{inode}]"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
    return False


async def test_negotiates_and_reports_the_version(paused_qemu: PausedQemu) -> None:
    async with connect(paused_qemu.qmp_path) as qmp:
        assert (qmp.version.major, qmp.version.minor) == (7, 2)
        assert isinstance(qmp.version.micro, int)
        assert not qmp.closed
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"
    assert qmp.closed
    with pytest.raises(ConnectionLostError, match="client was closed"):
        await qmp.execute("query-status")


async def test_100_concurrent_calls_each_get_their_own_reply(paused_qemu: PausedQemu) -> None:
    outcomes: dict[int, object] = {}

    async def call(qmp_call_number: int) -> None:
        if qmp_call_number % 2:
            with pytest.raises(ExecuteError) as info:
                await qmp.execute(f"no-such-command-{qmp_call_number}")
            outcomes[qmp_call_number] = info.value.desc
        else:
            outcomes[qmp_call_number] = await qmp.execute("query-version")

    async with connect(paused_qemu.qmp_path) as qmp, anyio.create_task_group() as task_group:
        for number in range(100):
            task_group.start_soon(call, number)

    assert len(outcomes) == 100
    for number, outcome in outcomes.items():
        if number % 2:
            assert outcome == f"The command no-such-command-{number} has not been found"
        else:
            assert isinstance(outcome, dict)
            assert outcome["qemu"]["major"] == 7


async def test_commands_sent_at_once_run_in_their_order(paused_qemu: PausedQemu) -> None:
    """``execute_in_order``: QEMU runs them as sent, so each query sees the command
    before it; the replies come back to their commands."""
    async with connect(paused_qemu.qmp_path) as qmp:
        replies = await qmp.execute_in_order(
            [
                ("cont", None),
                ("query-status", None),
                ("stop", None),
                ("query-status", None),
                ("query-version", None),
            ]
        )
    assert [reply.get("status") for reply in replies[:4]] == [None, "running", None, "paused"]
    assert replies[4]["qemu"]["major"] == 7


async def test_a_failing_command_sent_at_once_stops_nothing_after_it(
    paused_qemu: PausedQemu,
) -> None:
    """Each command runs whatever became of the ones before it; the first failure is
    raised once every reply is in, and the connection serves on."""
    async with connect(paused_qemu.qmp_path) as qmp:
        with pytest.raises(ExecuteError) as failed:
            await qmp.execute_in_order(
                [("stop", {"bogus": 1}), ("no-such-command", None), ("cont", None)]
            )
        assert (failed.value.command, failed.value.error_class) == ("stop", "GenericError")
        assert (await qmp.execute("query-status"))["status"] == "running"
        with sigstopped(paused_qemu), pytest.raises(QMPTimeoutError) as late:
            await qmp.execute_in_order([("query-status", None)] * 3, timeout=0.2)
        assert late.value.command == "query-status"
        assert (await qmp.execute("query-status"))["running"] is True


async def test_errors_carry_qemus_class_and_description(paused_qemu: PausedQemu) -> None:
    async with connect(paused_qemu.qmp_path) as qmp:
        with pytest.raises(ExecuteError) as not_found:
            await qmp.execute("no-such-command")
        with pytest.raises(ExecuteError) as generic:
            await qmp.execute("stop", {"bogus": 1})
        assert (await qmp.execute("query-status"))["running"] is False

    assert not_found.value.command == "no-such-command"
    assert not_found.value.error_class == "CommandNotFound"
    assert not_found.value.desc == "The command no-such-command has not been found"
    assert generic.value.command == "stop"
    assert generic.value.error_class == "GenericError"
    assert "bogus" in generic.value.desc
    assert str(generic.value) == f"stop: GenericError: {generic.value.desc}"


async def test_cont_and_stop_raise_resume_and_stop_events(paused_qemu: PausedQemu) -> None:
    async with (
        connect(paused_qemu.qmp_path) as qmp,
        qmp.events() as every_event,
        qmp.events({"STOP"}) as stops,
    ):
        before = time.time()
        await qmp.execute("cont")
        await qmp.execute("stop")
        after = time.time()
        resume, stop = await anext(every_event), await anext(every_event)
        only_stop = await anext(stops)

    assert isinstance(resume, QMPEvent)
    assert isinstance(stop, QMPEvent)
    assert (resume.name, stop.name) == ("RESUME", "STOP")
    assert before - 1 < resume.timestamp <= stop.timestamp < after + 1
    assert only_stop == stop


async def test_an_overflowing_subscriber_is_told_how_many_events_it_lost(
    paused_qemu: PausedQemu,
) -> None:
    async with connect(paused_qemu.qmp_path) as qmp, qmp.events(max_buffer=1) as events:
        for command in ("cont", "stop", "cont"):
            await qmp.execute(command)
        assert events.dropped == 2
        first, gap = await anext(events), await anext(events)
        await qmp.execute("stop")
        after_gap = await anext(events)

    assert isinstance(first, QMPEvent)
    assert first.name == "RESUME"
    assert gap == EventsDropped(2)
    assert isinstance(after_gap, QMPEvent)
    assert after_gap.name == "STOP"


async def test_qemu_killed_mid_call_fails_everything_pending_at_once(
    paused_qemu: PausedQemu,
) -> None:
    failures: list[str] = []

    async def pending_call() -> None:
        with pytest.raises(ConnectionLostError, match="QEMU closed the QMP connection"):
            await qmp.execute("query-status")
        failures.append("call")

    async def iterate() -> None:
        with pytest.raises(ConnectionLostError):
            async for _ in subscription:
                pass
        failures.append("events")

    async with (
        connect(paused_qemu.qmp_path, timeout=math.inf) as qmp,
        qmp.events() as subscription,
    ):
        os.kill(paused_qemu.pid, signal.SIGSTOP)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(pending_call)
                task_group.start_soon(pending_call)
                task_group.start_soon(iterate)
                await anyio.wait_all_tasks_blocked()  # all three wait for QEMU
                paused_qemu.proc.kill()
            await qmp.wait_closed()
        assert qmp.closed
        with pytest.raises(ConnectionLostError):
            await qmp.execute("query-status")

    assert sorted(failures) == ["call", "call", "events"]


async def test_quit_closes_the_connection_cleanly(paused_qemu: PausedQemu) -> None:
    async with connect(paused_qemu.qmp_path) as qmp:
        await qmp.execute("quit")
        with anyio.fail_after(30):
            await qmp.wait_closed()
        with pytest.raises(ConnectionLostError) as info:
            await qmp.execute("query-status")
    assert info.value.__cause__ is None


async def test_deadline_then_recovery_discards_the_late_reply(paused_qemu: PausedQemu) -> None:
    async with connect(paused_qemu.qmp_path, timeout=0.3) as qmp:
        with sigstopped(paused_qemu):
            with pytest.raises(QMPTimeoutError) as by_default:
                await qmp.execute("query-version")
            with pytest.raises(TimeoutError) as per_call:
                await qmp.execute("query-name", timeout=0.1)
            with anyio.move_on_after(0.1) as cancelled:
                await qmp.execute("query-kvm", timeout=math.inf)
        # The three late replies arrive now and must not be taken for this one's.
        status = await qmp.execute("query-status", timeout=30)
        assert not qmp.closed

    assert by_default.value.command == "query-version"
    assert by_default.value.timeout == 0.3
    assert isinstance(per_call.value, QMPTimeoutError)
    assert per_call.value.timeout == 0.1
    assert cancelled.cancelled_caught
    assert set(status) >= {"status", "running"}


async def test_passes_a_descriptor_with_getfd_and_closefd(paused_qemu: PausedQemu) -> None:
    read_end, write_end = os.pipe()
    try:
        inode = os.fstat(write_end).st_ino
        async with connect(paused_qemu.qmp_path) as qmp:
            assert not holds_pipe(paused_qemu.pid, inode)
            await qmp.execute("getfd", {"fdname": "test-pipe"}, fds=[write_end])
            assert holds_pipe(paused_qemu.pid, inode)
            await qmp.execute("closefd", {"fdname": "test-pipe"})
            assert not holds_pipe(paused_qemu.pid, inode)
            with pytest.raises(ExecuteError, match="No file descriptor supplied"):
                await qmp.execute("getfd", {"fdname": "without-fd"})
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_large_reply_query_qmp_schema(paused_qemu: PausedQemu) -> None:
    async with connect(paused_qemu.qmp_path) as qmp:
        schema = await qmp.execute("query-qmp-schema")
    assert len(msgspec.json.encode(schema)) > 100_000
    names = {entry["name"] for entry in schema}
    assert {"query-status", "getfd", "STOP"} <= names


async def test_an_error_in_the_block_leaves_unwrapped(paused_qemu: PausedQemu) -> None:
    with pytest.raises(ValueError, match="from the body") as info:
        async with connect(paused_qemu.qmp_path) as qmp:
            await qmp.execute("query-status")
            raise ValueError("from the body")
    assert type(info.value) is ValueError


async def test_cancelling_the_block_closes_the_connection(paused_qemu: PausedQemu) -> None:
    with anyio.CancelScope() as scope:
        async with connect(paused_qemu.qmp_path) as qmp:
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert qmp.closed


async def test_a_subscription_ends_its_iterators_when_its_block_ends(
    paused_qemu: PausedQemu,
) -> None:
    seen: list[str] = []
    first_seen = anyio.Event()

    async def consume(subscription: EventSubscription) -> None:
        async for event in subscription:
            assert isinstance(event, QMPEvent)
            seen.append(event.name)
            first_seen.set()

    async with connect(paused_qemu.qmp_path) as qmp, anyio.create_task_group() as task_group:
        async with qmp.events() as subscription:
            task_group.start_soon(consume, subscription)
            await qmp.execute("cont")
            with anyio.fail_after(30):
                await first_seen.wait()
        await qmp.execute("stop")
    assert seen == ["RESUME"]
    with pytest.raises(StopAsyncIteration):
        await anext(subscription)


async def test_subscription_misuse_is_refused(paused_qemu: PausedQemu) -> None:
    async with connect(paused_qemu.qmp_path) as qmp:
        with pytest.raises(TypeError, match="collection of event names"):
            qmp.events("STOP")
        with pytest.raises(ValueError, match="at least 1"):
            qmp.events(max_buffer=0)
        subscription = qmp.events({"STOP"})
        assert subscription.names == frozenset({"STOP"})
        with pytest.raises(RuntimeError, match="async with"):
            await anext(subscription)
        async with subscription:
            pass
        with pytest.raises(RuntimeError, match="only once"):
            async with subscription:
                pytest.fail("entered twice")
