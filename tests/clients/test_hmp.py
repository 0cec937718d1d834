"""The HMP socket client against a real QEMU 7.2 started with -S."""

from __future__ import annotations

import math
import os
import re
import signal
from pathlib import Path

import anyio
import anyio.abc
import pytest
from conftest import PausedQemu

from protocols import hmp, qmp

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]


def thread_ids(paused_qemu: PausedQemu) -> set[str]:
    return set(os.listdir(f"/proc/{paused_qemu.pid}/task"))


async def test_info_status_and_info_cpus(paused_qemu: PausedQemu) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        assert re.fullmatch(
            r"QEMU 7\.2\.\d+ monitor - type 'help' for more information", monitor.banner
        )
        assert await monitor.command("info status") == "VM status: paused (prelaunch)"
        cpus = await monitor.command("info cpus")
    match = re.fullmatch(r"\* CPU #0: thread_id=(\d+)", cpus)
    assert match is not None
    assert match[1] in thread_ids(paused_qemu)


async def test_unknown_command_raises_with_the_monitor_text(paused_qemu: PausedQemu) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        with pytest.raises(hmp.HMPCommandError) as caught:
            await monitor.command("no_such_command")
        assert caught.value.command == "no_such_command"
        assert caught.value.output == "unknown command: 'no_such_command'"
        with pytest.raises(hmp.HMPCommandError, match='Try "help balloon"'):
            await monitor.command("balloon")
        assert await monitor.command("info status") == "VM status: paused (prelaunch)"


async def test_twenty_sequential_commands_get_their_own_replies(paused_qemu: PausedQemu) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        for number in range(1, 21):
            assert await monitor.command(f"print {number}") == hex(number)


async def test_state_changes_show_in_later_replies(paused_qemu: PausedQemu) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        assert await monitor.command("cont") == ""
        assert await monitor.command("info status") == "VM status: running"
        assert await monitor.command("stop") == ""
        assert await monitor.command("info status") == "VM status: paused"


async def test_concurrent_callers_take_turns(paused_qemu: PausedQemu) -> None:
    results: dict[int, str] = {}

    async def ask(monitor: hmp.HMPClient, number: int) -> None:
        results[number] = await monitor.command(f"print {number + 1000}")

    async with (
        hmp.connect(paused_qemu.hmp_path) as monitor,
        anyio.create_task_group() as task_group,
    ):
        for number in range(8):
            task_group.start_soon(ask, monitor, number)
    assert results == {number: hex(number + 1000) for number in range(8)}


async def test_newline_is_refused_before_anything_is_sent(paused_qemu: PausedQemu) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        with pytest.raises(ValueError, match="control character"):
            await monitor.command("info status\ninfo cpus")
        assert await monitor.command("print 5") == "0x5"


async def test_deadline_then_the_late_reply_is_not_taken(paused_qemu: PausedQemu) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        os.kill(paused_qemu.pid, signal.SIGSTOP)
        with pytest.raises(hmp.HMPTimeoutError) as caught:
            await monitor.command("info status", timeout=0.3)
        assert isinstance(caught.value, TimeoutError)
        assert caught.value.command == "info status"
        os.kill(paused_qemu.pid, signal.SIGCONT)
        assert await monitor.command("print 42") == "0x2a"
        assert await monitor.command("info status") == "VM status: paused (prelaunch)"


async def test_cancelled_command_is_abandoned_like_a_timed_out_one(
    paused_qemu: PausedQemu,
) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        os.kill(paused_qemu.pid, signal.SIGSTOP)
        with anyio.move_on_after(0.3) as scope:
            await monitor.command("print 1", timeout=math.inf)
        assert scope.cancelled_caught
        os.kill(paused_qemu.pid, signal.SIGCONT)
        assert await monitor.command("print 2") == "0x2"


async def test_silent_monitor_is_dropped_and_the_next_command_reconnects(
    paused_qemu: PausedQemu,
) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        os.kill(paused_qemu.pid, signal.SIGSTOP)
        with pytest.raises(hmp.HMPTimeoutError):
            await monitor.command("print 1", timeout=0.2)
        # Still waiting for the first reply: this command is never sent.
        with pytest.raises(hmp.HMPTimeoutError):
            await monitor.command("print 2", timeout=0.2)
        os.kill(paused_qemu.pid, signal.SIGCONT)
        assert await monitor.command("print 3") == "0x3"
        assert await monitor.command("print 4") == "0x4"


async def test_qemu_dying_before_a_late_reply(paused_qemu: PausedQemu) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        os.kill(paused_qemu.pid, signal.SIGSTOP)
        with pytest.raises(hmp.HMPTimeoutError):
            await monitor.command("print 1", timeout=0.2)
        paused_qemu.kill()
        with pytest.raises(hmp.HMPConnectionLostError, match="closed the monitor connection"):
            await monitor.command("print 2")


async def test_qemu_dying_after_the_connection_was_dropped(paused_qemu: PausedQemu) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        os.kill(paused_qemu.pid, signal.SIGSTOP)
        for number in (1, 2):
            with pytest.raises(hmp.HMPTimeoutError):
                await monitor.command(f"print {number}", timeout=0.2)
        paused_qemu.kill()
        with pytest.raises(hmp.HMPConnectionLostError, match="cannot be reconnected") as caught:
            await monitor.command("print 3")
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)


async def test_peer_closing_before_the_banner(short_tmp: Path) -> None:
    """Fault injection: a server that hangs up at once."""
    path = short_tmp / "hangs-up.sock"

    async def hang_up(listener: anyio.abc.SocketListener) -> None:
        accepted = await listener.accept()
        await accepted.aclose()

    async with await anyio.create_unix_listener(path) as listener, anyio.create_task_group() as tg:
        tg.start_soon(hang_up, listener)
        with pytest.raises(hmp.HMPConnectionLostError, match="before its banner"):
            async with hmp.connect(path):
                pytest.fail("the server hung up")


async def test_qemu_killed_mid_command(paused_qemu: PausedQemu) -> None:
    errors: list[BaseException] = []

    async def ask(monitor: hmp.HMPClient) -> None:
        try:
            await monitor.command("info status", timeout=math.inf)
        except hmp.HMPConnectionLostError as exc:
            errors.append(exc)

    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        os.kill(paused_qemu.pid, signal.SIGSTOP)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(ask, monitor)
            await anyio.wait_all_tasks_blocked()
            paused_qemu.kill()
        assert len(errors) == 1
        assert isinstance(errors[0], ConnectionError)
        with pytest.raises(hmp.HMPConnectionLostError):
            await monitor.command("info status")
    # Leaving the block did not raise.


async def test_connection_lost_between_commands(paused_qemu: PausedQemu) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        assert await monitor.command("print 1") == "0x1"
        paused_qemu.kill()
        with pytest.raises(hmp.HMPConnectionLostError):
            await monitor.command("print 2")


async def test_qemu_quitting_answers_the_pending_command_with_connection_lost(
    paused_qemu: PausedQemu,
) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as monitor:
        with pytest.raises(hmp.HMPConnectionLostError, match="during 'quit'"):
            await monitor.command("quit")
    assert paused_qemu.proc.wait(timeout=10) == 0


async def test_one_client_at_a_time_so_a_second_one_times_out(paused_qemu: PausedQemu) -> None:
    async with hmp.connect(paused_qemu.hmp_path) as first:
        with pytest.raises(hmp.HMPTimeoutError, match="HMP connection"):
            async with hmp.connect(paused_qemu.hmp_path, timeout=0.3):
                pytest.fail("QEMU serves one monitor client at a time")
        assert await first.command("print 9") == "0x9"


async def test_connecting_to_the_qmp_socket_is_a_protocol_error(paused_qemu: PausedQemu) -> None:
    with pytest.raises(hmp.HMPProtocolError, match="not a QEMU human monitor"):
        async with hmp.connect(paused_qemu.qmp_path):
            pytest.fail("a QMP socket is no human monitor")


async def test_missing_socket_raises_oserror(short_tmp: Path) -> None:
    with pytest.raises(FileNotFoundError):
        async with hmp.connect(f"{short_tmp}/absent.sock"):
            pytest.fail("there is no socket")


async def test_reply_over_the_limit_fails_and_the_next_command_reconnects(
    paused_qemu: PausedQemu,
) -> None:
    async with hmp.connect(paused_qemu.hmp_path, max_reply_bytes=512) as monitor:
        with pytest.raises(hmp.HMPProtocolError, match="exceeds 512 bytes"):
            await monitor.command("help")
        assert await monitor.command("info status") == "VM status: paused (prelaunch)"


async def test_qmp_human_monitor(paused_qemu: PausedQemu) -> None:
    async with qmp.connect(paused_qemu.qmp_path) as client:
        monitor = hmp.QMPHumanMonitor(client)
        assert await monitor.command("info status") == "VM status: paused (prelaunch)"
        assert await monitor.command("print 20") == "0x14"
        assert await monitor.command("info name") == ""
        with pytest.raises(hmp.HMPCommandError, match="unknown command: 'no_such_command'"):
            await monitor.command("no_such_command")
        with pytest.raises(ValueError, match="control character"):
            await monitor.command("info status\ninfo cpus")
        os.kill(paused_qemu.pid, signal.SIGSTOP)
        with pytest.raises(hmp.HMPTimeoutError) as timed_out:
            await monitor.command("info status", timeout=0.2)
        assert isinstance(timed_out.value.__cause__, qmp.QMPTimeoutError)
        paused_qemu.kill()
        with pytest.raises(hmp.HMPConnectionLostError) as lost:
            await monitor.command("info status")
        assert isinstance(lost.value.__cause__, qmp.ConnectionLostError)


class RefusingQMP:
    """Fault injection: QEMU refusing ``human-monitor-command`` itself."""

    async def execute(
        self,
        command: str,
        arguments: object = None,
        /,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the QMPExecutor signature
    ) -> object:
        raise qmp.ExecuteError(command, "GenericError", "monitor is busy")


async def test_qmp_refusal_is_a_command_error() -> None:
    monitor = hmp.QMPHumanMonitor(RefusingQMP())
    with pytest.raises(hmp.HMPCommandError, match="monitor is busy") as caught:
        await monitor.command("info status")
    assert isinstance(caught.value.__cause__, qmp.ExecuteError)
