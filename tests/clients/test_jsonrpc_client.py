"""The JSON-RPC client against a small server built from the same codec, on both backends."""

from __future__ import annotations

import collections
import socket
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import anyio
import msgspec
import pytest
from anyio.abc import SocketAttribute, SocketStream, TaskGroup

from protocols.jsonrpc import (
    ErrorCode,
    ErrorResponse,
    EventParams,
    LineFramer,
    Notification,
    ProtocolError,
    Request,
    RPCClient,
    RPCConnectionLostError,
    RPCError,
    connect_unix,
    decode_incoming,
    decode_params,
    encode_message,
    encode_notification,
    error_response,
    oversize_response,
    result_response,
)

pytestmark = pytest.mark.anyio


class AddParams(msgspec.Struct, forbid_unknown_fields=True):
    a: int
    b: int


class HoldParams(msgspec.Struct, forbid_unknown_fields=True):
    value: Any
    until: str | None = None
    """Answer once the test releases the gate of this name (``RPCServer.release``)."""


class EmitParams(msgspec.Struct, forbid_unknown_fields=True):
    count: int


class NoParams(msgspec.Struct, forbid_unknown_fields=True):
    pass


class _Connection:
    def __init__(
        self, stream: SocketStream, task_group: TaskGroup, gates: dict[str, anyio.Event]
    ) -> None:
        self.stream = stream
        self.task_group = task_group
        self.gates = gates
        self.send_lock = anyio.Lock()

    async def send(self, line: bytes) -> None:
        async with self.send_lock:
            await self.stream.send(line)

    async def answer(self, request: Request) -> None:
        try:
            result = await self.run(request)
        except RPCError as error:
            response: Any = error_response(request.id, error.code, error.message, error.data)
        else:
            response = result_response(request.id, result)
        if not request.is_notification:
            await self.send(encode_message(response))

    async def run(self, request: Request) -> Any:
        if request.method == "add":
            add = decode_params(request, AddParams)
            return add.a + add.b
        if request.method == "hold":
            hold = decode_params(request, HoldParams)
            if hold.until is not None:
                await self.gates[hold.until].wait()
            return hold.value
        if request.method == "fail":
            decode_params(request, NoParams)
            raise RPCError(ErrorCode.BUSY, "instance is busy", {"operation": "stop"})
        if request.method == "emit":
            emit = decode_params(request, EmitParams)
            for number in range(emit.count):
                event = EventParams(
                    subscription=1, instance="vm1", kind="test", timestamp=0.0, data={"n": number}
                )
                await self.send(encode_notification("event", event))
            return emit.count
        # Fault injection: the connection dies, or the server breaks the protocol.
        if request.method == "close":
            self.task_group.cancel_scope.cancel()
            await anyio.sleep_forever()
        if request.method == "garbage":
            await self.send(b"this is not JSON\n")
            await anyio.sleep_forever()
        if request.method == "huge":
            await self.send(b'{"jsonrpc":"2.0","method":"event","params":"' + b"x" * 2000 + b'"}\n')
            await anyio.sleep_forever()
        raise RPCError(ErrorCode.METHOD_NOT_FOUND, f"method not found: {request.method}")

    async def serve(self) -> None:
        framer = LineFramer(max_line_bytes=1 << 20)
        # The raw socket: anyio's asyncio stream may log an InvalidStateError when a
        # receive is cancelled (the server closing) just as the client's end arrives.
        sock = self.stream.extra(SocketAttribute.raw_socket)
        while True:
            await anyio.wait_readable(sock)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            for line in framer.feed(data):
                if not isinstance(line, bytes):
                    await self.send(encode_message(oversize_response(line.max_line_bytes)))
                    return
                for item in decode_incoming(line).items:
                    if isinstance(item, ErrorResponse):
                        await self.send(encode_message(item))
                    else:
                        self.task_group.start_soon(self.answer, item)
            if not data:
                return


class RPCServer(anyio.AsyncContextManagerMixin):
    """A JSON-RPC server on a unix socket, answering each request in its own task."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.gates: dict[str, anyio.Event] = collections.defaultdict(anyio.Event)

    def release(self, gate: str) -> None:
        """Let the ``hold`` requests waiting for `gate` (and later ones) be answered."""
        self.gates[gate].set()

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        listener = await anyio.create_unix_listener(self.path)
        async with listener, anyio.create_task_group() as task_group:
            task_group.start_soon(listener.serve, self.handle)
            yield self
            task_group.cancel_scope.cancel()

    async def handle(self, stream: SocketStream) -> None:
        async with stream, anyio.create_task_group() as task_group:
            await _Connection(stream, task_group, self.gates).serve()
            task_group.cancel_scope.cancel()


@pytest.fixture
def socket_path(short_tmp: Path) -> Path:
    return short_tmp / "control.sock"


async def test_call_returns_the_result(socket_path: Path) -> None:
    async with RPCServer(socket_path), connect_unix(socket_path) as client:
        assert await client.call("add", {"a": 2, "b": 3}) == 5
        assert await client.call("add", AddParams(a=-1, b=1)) == 0
        assert await client.call("hold", {"value": {"k": [1, None]}}) == {"k": [1, None]}


async def test_concurrent_calls_are_routed_by_id(socket_path: Path) -> None:
    values = ("first", "second", "third")
    answered = {value: anyio.Event() for value in values}
    finished: list[str] = []

    async def call(client: RPCClient, value: str) -> None:
        assert await client.call("hold", {"value": value, "until": value}) == value
        finished.append(value)
        answered[value].set()

    async with (
        RPCServer(socket_path) as server,
        connect_unix(socket_path) as client,
        anyio.create_task_group() as task_group,
    ):
        for value in values:
            task_group.start_soon(call, client, value)
        await anyio.wait_all_tasks_blocked()  # all three sent, none answered
        for value in ("third", "first", "second"):
            server.release(value)
            await answered[value].wait()
    assert finished == ["third", "first", "second"]


async def test_error_response_raises_rpc_error(socket_path: Path) -> None:
    async with RPCServer(socket_path), connect_unix(socket_path) as client:
        with pytest.raises(RPCError) as busy:
            await client.call("fail")
        assert busy.value.code is ErrorCode.BUSY
        assert busy.value.message == "instance is busy"
        assert busy.value.data == {"operation": "stop"}
        with pytest.raises(RPCError) as missing:
            await client.call("no.such.method")
        assert missing.value.code is ErrorCode.METHOD_NOT_FOUND
        assert missing.value.data is None


async def test_invalid_params_end_to_end(socket_path: Path) -> None:
    async with RPCServer(socket_path), connect_unix(socket_path) as client:
        with pytest.raises(RPCError) as caught:
            await client.call("add", {"a": 1, "b": "2"})
        assert caught.value.code is ErrorCode.INVALID_PARAMS
        assert caught.value.data == {"path": "b", "reason": "Expected `int`, got `str`"}
        with pytest.raises(RPCError, match="unknown field `c`"):
            await client.call("add", {"a": 1, "b": 2, "c": 3})


async def test_notifications_arrive_in_order(socket_path: Path) -> None:
    async with RPCServer(socket_path), connect_unix(socket_path) as client:
        assert await client.call("emit", {"count": 3}) == 3
        received: list[Notification] = []
        async for notification in client.notifications():
            received.append(notification)
            if len(received) == 3:
                break
    assert [notification.method for notification in received] == ["event"] * 3
    events = [msgspec.convert(notification.params, EventParams) for notification in received]
    assert [event.data for event in events] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert client.notifications_dropped == 0


async def test_notifications_beyond_the_buffer_are_dropped_and_counted(socket_path: Path) -> None:
    async with RPCServer(socket_path), connect_unix(socket_path, max_notifications=2) as client:
        await client.call("emit", {"count": 5})
        iterator = client.notifications()
        first = await iterator.__anext__()
        second = await iterator.__anext__()
        assert (first.params["data"], second.params["data"]) == ({"n": 0}, {"n": 1})
        assert client.notifications_dropped == 3


async def test_consumer_waiting_for_notifications(socket_path: Path) -> None:
    received: list[Any] = []

    async def consume(client: RPCClient) -> None:
        async for notification in client.notifications():
            received.append(notification.params["data"])
            if len(received) == 2:
                return

    async with (
        RPCServer(socket_path),
        connect_unix(socket_path) as client,
        anyio.create_task_group() as task_group,
    ):
        task_group.start_soon(consume, client)
        await anyio.wait_all_tasks_blocked()
        await client.call("emit", {"count": 2})
    assert received == [{"n": 0}, {"n": 1}]


async def test_server_closing_fails_the_pending_call_and_later_ones(socket_path: Path) -> None:
    async with RPCServer(socket_path), connect_unix(socket_path) as client:
        with pytest.raises(RPCConnectionLostError, match="server closed the connection"):
            await client.call("close")
        with pytest.raises(RPCConnectionLostError):
            await client.call("add", {"a": 1, "b": 1})
        with pytest.raises(RPCConnectionLostError):
            await client.notifications().__anext__()
    # Leaving the block did not raise.


async def test_queued_notifications_are_delivered_before_the_loss(socket_path: Path) -> None:
    async with RPCServer(socket_path), connect_unix(socket_path) as client:
        await client.call("emit", {"count": 2})
        with pytest.raises(RPCConnectionLostError):
            await client.call("close")
        received = []
        with pytest.raises(RPCConnectionLostError):
            async for notification in client.notifications():
                received.append(notification.params["data"])
        assert received == [{"n": 0}, {"n": 1}]


async def test_server_breaking_the_protocol_ends_the_connection(socket_path: Path) -> None:
    async with RPCServer(socket_path), connect_unix(socket_path) as client:
        with pytest.raises(RPCConnectionLostError) as caught:
            await client.call("garbage")
        assert isinstance(caught.value.__cause__, ProtocolError)
        assert "invalid line" in str(caught.value.__cause__)


async def test_server_line_over_the_limit_ends_the_connection(socket_path: Path) -> None:
    async with RPCServer(socket_path), connect_unix(socket_path, max_line_bytes=1000) as client:
        with pytest.raises(RPCConnectionLostError) as caught:
            await client.call("huge")
        assert isinstance(caught.value.__cause__, ProtocolError)
        assert "over 1000 bytes" in str(caught.value.__cause__)


async def test_cancelled_call_leaves_the_connection_usable(socket_path: Path) -> None:
    results: list[Any] = []

    async def call(client: RPCClient, value: str) -> None:
        results.append(await client.call("hold", {"value": value, "until": value}))

    async with RPCServer(socket_path) as server, connect_unix(socket_path) as client:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(call, client, "late")
            await anyio.wait_all_tasks_blocked()  # sent, waiting for its reply
            task_group.cancel_scope.cancel()
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(call, client, "own")
            await anyio.wait_all_tasks_blocked()
            server.release("late")  # its reply comes first, while "own" waits
            server.release("own")
    assert results == ["own"]


async def test_unencodable_params_raise_type_error(socket_path: Path) -> None:
    async with RPCServer(socket_path), connect_unix(socket_path) as client:
        with pytest.raises(TypeError):
            await client.call("add", {"a": object()})
        assert await client.call("add", {"a": 1, "b": 2}) == 3


async def test_body_error_leaves_bare(socket_path: Path) -> None:
    async with RPCServer(socket_path):
        with pytest.raises(KeyError):
            async with connect_unix(socket_path):
                raise KeyError("from the body")


async def test_cancelling_the_body_closes_quietly(socket_path: Path) -> None:
    async with RPCServer(socket_path):
        with anyio.CancelScope() as scope:
            async with connect_unix(socket_path) as client:
                scope.cancel()
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        with pytest.raises(RPCConnectionLostError, match="client was closed"):
            await client.call("add", {"a": 1, "b": 2})


async def test_writing_to_a_closed_connection_fails_with_the_socket_error(
    socket_path: Path,
) -> None:
    """Fault injection: the server hangs up before the client's reader notices."""
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(socket_path))
        server.listen()
        async with connect_unix(socket_path) as client:
            accepted, _ = server.accept()
            accepted.close()
            with pytest.raises(RPCConnectionLostError, match="socket failed") as caught:
                await client.call("add", {"a": 1, "b": 2})
            assert isinstance(caught.value.__cause__, BrokenPipeError)


async def test_calls_after_the_block_fail(socket_path: Path) -> None:
    async with RPCServer(socket_path), connect_unix(socket_path) as client:
        assert await client.call("add", {"a": 1, "b": 2}) == 3
    with pytest.raises(RPCConnectionLostError, match="client was closed"):
        await client.call("add", {"a": 1, "b": 2})


async def test_call_before_entering_fails(socket_path: Path) -> None:
    with pytest.raises(RPCConnectionLostError, match="not connected"):
        await connect_unix(socket_path).call("add")


async def test_missing_socket_raises_file_not_found(socket_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        async with connect_unix(socket_path):
            pytest.fail("there is no socket")


async def test_nobody_listening_raises_connection_refused(socket_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(socket_path))
        with pytest.raises(ConnectionRefusedError):
            async with connect_unix(socket_path):
                pytest.fail("nobody listens")


async def test_request_cut_short_by_cancellation_ends_the_connection(socket_path: Path) -> None:
    """Fault injection: a server that never reads, so a big request blocks half-written."""
    listener = await anyio.create_unix_listener(socket_path)
    async with listener, connect_unix(socket_path) as client:
        accepted = await listener.accept()
        async with accepted:
            with anyio.move_on_after(0.2) as scope:
                await client.call("add", {"a": "x" * 10_000_000, "b": 0})
            assert scope.cancelled_caught
            with pytest.raises(RPCConnectionLostError, match="cut short"):
                await client.call("add", {"a": 1, "b": 2})
