"""The QMP client against a scripted server misbehaving on purpose, on asyncio and trio."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import anyio
import pytest

from protocols.qmp import (
    ConnectionLostError,
    EventsDropped,
    ExecuteError,
    ProtocolError,
    QMPEvent,
    QMPTimeoutError,
    connect,
)

from .fake_qmp import FakeQMPPeer, FakeQMPServer, event_message

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024


@pytest.fixture
def socket_path(short_tmp: Path) -> Path:
    return short_tmp / "fake.sock"


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        (b"this is not json\r\n", "malformed message"),
        (b'{"return": {"status": "runn\r\n', "malformed message"),
        (b'{"QMP": {}}\r\n', "malformed message"),
        (
            b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n',
            "without an id, QEMU could not parse our input",
        ),
        (b'{"return": {}, "id": 12345}\r\n', "reply to a command never sent"),
    ],
)
async def test_a_bad_line_fails_pending_calls_and_subscribers(
    socket_path: Path, bad_line: bytes, reason: str
) -> None:
    async def scenario(peer: FakeQMPPeer) -> None:
        await peer.negotiate()
        await peer.receive_command()
        await peer.send_raw(bad_line)
        await peer.wait_hang_up()

    async with (
        FakeQMPServer(socket_path, scenario),
        connect(socket_path) as qmp,
        qmp.events() as events,
    ):
        with pytest.raises(ConnectionLostError) as call_error:
            await qmp.execute("query-status")
        with pytest.raises(ConnectionLostError) as events_error:
            await anext(events)
        assert qmp.closed

    for error in (call_error.value, events_error.value):
        assert isinstance(error.__cause__, ProtocolError)
        assert reason in str(error.__cause__)


async def test_a_20_mib_line_is_a_protocol_error_not_a_hang(socket_path: Path) -> None:
    async def scenario(peer: FakeQMPPeer) -> None:
        await peer.negotiate()
        command = await peer.receive_command()
        huge = b'{"id": %d, "return": "' % command["id"] + b"x" * (20 * MIB) + b'"}\r\n'
        # The client stops reading after 16 MiB and hangs up.
        with pytest.raises((anyio.BrokenResourceError, anyio.ClosedResourceError)):
            await peer.send_raw(huge)

    async with FakeQMPServer(socket_path, scenario), connect(socket_path) as qmp:
        # A client reading on would hit the call's deadline (QMPTimeoutError) instead.
        with pytest.raises(ConnectionLostError) as info:
            await qmp.execute("query-qmp-schema")
    assert isinstance(info.value.__cause__, ProtocolError)
    assert "longer than 16777216 bytes" in str(info.value.__cause__)


async def test_a_bad_greeting_fails_connect_with_a_protocol_error(socket_path: Path) -> None:
    async def scenario(peer: FakeQMPPeer) -> None:
        await peer.send_raw(b"SSH-2.0-OpenSSH_9.2\r\n")
        await peer.wait_hang_up()

    async with FakeQMPServer(socket_path, scenario):
        with pytest.raises(ProtocolError, match="malformed message"):
            async with connect(socket_path):
                pytest.fail("connected to a server that is not QMP")


async def test_events_before_the_greeting_are_skipped(socket_path: Path) -> None:
    async def scenario(peer: FakeQMPPeer) -> None:
        await peer.send(event_message("EARLY_ONE"))
        await peer.send(event_message("EARLY_TWO"))
        await peer.negotiate()
        command = await peer.receive_command()
        await peer.send(event_message("LATE"))
        await peer.reply(command, {"status": "ok"})
        await peer.wait_hang_up()

    async with (
        FakeQMPServer(socket_path, scenario),
        connect(socket_path) as qmp,
        qmp.events() as events,
    ):
        assert qmp.version.package == "fake"
        assert await qmp.execute("query-status") == {"status": "ok"}
        late = await anext(events)
    assert isinstance(late, QMPEvent)
    assert late.name == "LATE"


async def test_a_server_that_never_greets_hits_the_handshake_deadline(socket_path: Path) -> None:
    async def scenario(peer: FakeQMPPeer) -> None:
        await peer.wait_hang_up()

    async with FakeQMPServer(socket_path, scenario):
        with pytest.raises(QMPTimeoutError) as info:
            async with connect(socket_path, timeout=0.3):
                pytest.fail("connected without a greeting")
    assert isinstance(info.value, TimeoutError)
    assert (info.value.command, info.value.timeout) == (None, 0.3)


async def test_a_server_closing_before_the_greeting(socket_path: Path) -> None:
    async def scenario(peer: FakeQMPPeer) -> None:
        pass

    async with FakeQMPServer(socket_path, scenario):
        with pytest.raises(ConnectionLostError, match="during the handshake"):
            async with connect(socket_path):
                pytest.fail("connected without a greeting")


async def test_a_refused_negotiation_fails_connect(socket_path: Path) -> None:
    async def scenario(peer: FakeQMPPeer) -> None:
        await peer.greet()
        command = await peer.receive_command()
        await peer.send({"id": command["id"], "error": {"class": "GenericError", "desc": "no"}})
        await peer.wait_hang_up()

    async with FakeQMPServer(socket_path, scenario):
        with pytest.raises(ExecuteError) as info:
            async with connect(socket_path):
                pytest.fail("connected despite the refusal")
    assert (info.value.command, info.value.error_class) == ("qmp_capabilities", "GenericError")


async def test_a_missing_socket_fails_connect_with_an_os_error(socket_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        async with connect(socket_path):
            pytest.fail("connected to nothing")


@pytest.mark.parametrize(
    ("offered", "expected_arguments"),
    [(["oob"], {"enable": ["oob"]}), ([], None)],
)
async def test_oob_is_enabled_when_offered(
    socket_path: Path, offered: list[str], expected_arguments: dict[str, object] | None
) -> None:
    negotiation: dict[str, object] = {}

    async def scenario(peer: FakeQMPPeer) -> None:
        negotiation.update(await peer.negotiate(capabilities=offered))
        await peer.wait_hang_up()

    async with FakeQMPServer(socket_path, scenario), connect(socket_path):
        pass
    assert negotiation.get("arguments") == expected_arguments


async def test_a_server_closing_mid_reply(socket_path: Path) -> None:
    async def scenario(peer: FakeQMPPeer) -> None:
        await peer.negotiate()
        command = await peer.receive_command()
        await peer.send_raw(b'{"id": %d, "return": {"status": "runn' % command["id"])

    async with FakeQMPServer(socket_path, scenario), connect(socket_path) as qmp:
        with pytest.raises(ConnectionLostError) as info:
            await qmp.execute("query-status", timeout=math.inf)
    assert isinstance(info.value.__cause__, ProtocolError)
    assert "middle of a message" in str(info.value.__cause__)


async def test_a_server_closing_cleanly_ends_calls_and_later_subscriptions(
    socket_path: Path,
) -> None:
    async def scenario(peer: FakeQMPPeer) -> None:
        await peer.negotiate()
        await peer.receive_command()

    async with FakeQMPServer(socket_path, scenario), connect(socket_path) as qmp:
        with pytest.raises(ConnectionLostError, match="QEMU closed") as info:
            await qmp.execute("query-status", timeout=math.inf)
        with anyio.fail_after(5):
            await qmp.wait_closed()
        async with qmp.events() as events:
            with pytest.raises(ConnectionLostError):
                await anext(events)
        with pytest.raises(ConnectionLostError):
            await qmp.execute("query-status")
    assert info.value.__cause__ is None


async def test_a_flood_of_events_is_bounded_per_subscriber(socket_path: Path) -> None:
    async def scenario(peer: FakeQMPPeer) -> None:
        await peer.negotiate()
        command = await peer.receive_command()
        flood = [event_message("FLOOD", {"n": n}) for n in range(1000)]
        await peer.send_raw(b"".join(json.dumps(message).encode() + b"\n" for message in flood))
        await peer.send(event_message("OTHER"))
        await peer.reply(command)
        await peer.wait_hang_up()

    async with (
        FakeQMPServer(socket_path, scenario),
        connect(socket_path) as qmp,
        qmp.events(max_buffer=10) as everything,
        qmp.events({"OTHER"}, max_buffer=1) as others,
    ):
        await qmp.execute("flood")
        received = [await anext(everything) for _ in range(11)]
        other = await anext(others)

    assert [event.data["n"] for event in received[:10] if isinstance(event, QMPEvent)] == list(
        range(10)
    )
    assert received[10] == EventsDropped(991)
    assert everything.dropped == 991
    assert isinstance(other, QMPEvent)
    assert other.name == "OTHER"
    assert others.dropped == 0


async def test_descriptors_go_with_their_command_behind_a_large_write(socket_path: Path) -> None:
    read_end, write_end = os.pipe()
    received_fds: list[int] = []

    both_sent = anyio.Event()

    async def scenario(peer: FakeQMPPeer) -> None:
        await peer.negotiate()
        await both_sent.wait()  # not reading until then: the large command fills the socket
        big, small = await peer.receive_command(), await peer.receive_command()
        await peer.reply(small, "small")
        await peer.reply(big, "big")
        await peer.wait_hang_up()

    try:
        async with FakeQMPServer(socket_path, scenario) as server:
            async with connect(socket_path) as qmp, anyio.create_task_group() as task_group:

                async def big() -> None:
                    assert await qmp.execute("big", {"blob": "x" * 8 * MIB}) == "big"

                async def small() -> None:
                    assert await qmp.execute("getfd", {"fdname": "p"}, fds=[write_end]) == "small"

                task_group.start_soon(big)
                await anyio.wait_all_tasks_blocked()  # its write stuck in a full socket
                task_group.start_soon(small)
                await anyio.wait_all_tasks_blocked()  # queued behind it
                both_sent.set()
            assert server.peer is not None
            received = server.peer.received
            small_start = received.index(b'{"execute":"getfd"')
            assert received.index(b'{"execute":"big"') < small_start
            assert received.count(b"\n") == 3
            received_fds = [fd for _, fds in server.peer.fd_reads for fd in fds]
            [(fd_read, _)] = server.peer.fd_reads
            # Had they gone with a piece of the big command, that read would end before.
            assert small_start in fd_read
            assert len(received_fds) == 1
            assert os.fstat(received_fds[0]).st_ino == os.fstat(write_end).st_ino
    finally:
        for fd in [read_end, write_end, *received_fds]:
            os.close(fd)


async def test_a_command_that_times_out_unwritten_is_never_sent(socket_path: Path) -> None:
    read_end, write_end = os.pipe()

    timed_out = anyio.Event()

    async def scenario(peer: FakeQMPPeer) -> None:
        await peer.negotiate()
        await timed_out.wait()  # not reading until then: the large command fills the socket
        big, after = await peer.receive_command(), await peer.receive_command()
        assert (big["execute"], after["execute"]) == ("big", "after")
        await peer.reply(big)
        await peer.reply(after)
        await peer.wait_hang_up()

    try:
        async with FakeQMPServer(socket_path, scenario) as server:
            async with connect(socket_path) as qmp, anyio.create_task_group() as task_group:
                task_group.start_soon(qmp.execute, "big", {"blob": "x" * 8 * MIB})
                await anyio.wait_all_tasks_blocked()  # its write stuck in a full socket
                with pytest.raises(QMPTimeoutError):
                    await qmp.execute("getfd", {"fdname": "p"}, fds=[write_end], timeout=0.1)
                timed_out.set()
                await qmp.execute("after")
            assert server.peer is not None
            assert b"getfd" not in server.peer.received
            assert server.peer.fd_reads == []
    finally:
        os.close(read_end)
        os.close(write_end)
