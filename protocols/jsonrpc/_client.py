"""A minimal async JSON-RPC client of the control socket, for the CLI and tests.

One reader task routes responses to their callers by id (calls may run concurrently)
and queues server notifications for :meth:`RPCClient.notifications`.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, Self

import anyio
import msgspec
from anyio.abc import SocketAttribute
from msgspec import UNSET

from ..groups import ungrouped
from ..sockets import receive_some, send_message
from ._codec import decode_server_line, encode_message
from ._errors import ProtocolError, RPCConnectionLostError, RPCError
from ._framing import LineFramer, Oversize
from ._messages import ErrorResponse, Notification, Request, Response

DEFAULT_CLIENT_MAX_LINE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_NOTIFICATIONS: Final = 1024
_RECEIVE_BYTES: Final = 65536
_ENCODER: Final = msgspec.json.Encoder()


def connect_unix(
    path: str | os.PathLike[str],
    *,
    max_line_bytes: int = DEFAULT_CLIENT_MAX_LINE_BYTES,
    max_notifications: int = DEFAULT_MAX_NOTIFICATIONS,
) -> RPCClient:
    """Connect to a JSON-RPC server's unix socket (the daemon's control socket).

    Use it as ``async with connect_unix(path) as client:``. Leaving the block closes the
    connection (calls still pending in other tasks raise
    :exc:`RPCConnectionLostError`) and never raises because the connection was lost; an
    exception from the block leaves as it is, not in an exception group.

    :param max_line_bytes: the longest line accepted from the server; a longer one is a
        protocol error that ends the connection.
    :param max_notifications: how many notifications to hold for a consumer that does
        not keep up; more are dropped and counted in
        :attr:`RPCClient.notifications_dropped`.
    :raises OSError: on entering, the socket cannot be connected (missing, refused).
    """
    return RPCClient(
        functools.partial(anyio.connect_unix, path),
        max_line_bytes=max_line_bytes,
        max_notifications=max_notifications,
    )


def connect_socket(
    sock: socket.socket,
    *,
    max_line_bytes: int = DEFAULT_CLIENT_MAX_LINE_BYTES,
    max_notifications: int = DEFAULT_MAX_NOTIFICATIONS,
) -> RPCClient:
    """Speak JSON-RPC over `sock`, a connected unix stream socket the client then owns
    (closed on leaving): one end of a `socket.socketpair` whose other end is a child's
    stdin and stdout, such as ``ssh HOST kvm-supervisor rpc-stdio``. Otherwise as
    :func:`connect_unix`."""

    async def wrap() -> anyio.abc.SocketStream:
        return await anyio.abc.UNIXSocketStream.from_socket(sock)

    return RPCClient(wrap, max_line_bytes=max_line_bytes, max_notifications=max_notifications)


class _PendingCall:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.reply: Response | ErrorResponse | None = None


class RPCClient(anyio.AsyncContextManagerMixin):
    """A connection to a JSON-RPC 2.0 server; see :func:`connect_unix` and
    :func:`connect_socket`."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[anyio.abc.SocketStream]],
        *,
        max_line_bytes: int = DEFAULT_CLIENT_MAX_LINE_BYTES,
        max_notifications: int = DEFAULT_MAX_NOTIFICATIONS,
    ) -> None:
        self._connect = connect
        self._max_line_bytes = max_line_bytes
        self._ids = itertools.count(1)
        self._calls: dict[int, _PendingCall] = {}
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._socket: socket.socket | None = None
        self._loss: str | None = "the client is not connected"
        self._loss_cause: BaseException | None = None
        self._notifications = NotificationStream(max_notifications, self._connection_lost_error)

    @property
    def notifications_dropped(self) -> int:
        """How many notifications were dropped because the consumer did not keep up."""
        return self._notifications.dropped

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        stream = await self._connect()
        self._socket = sock = stream.extra(SocketAttribute.raw_socket)
        self._loss = None
        try:
            # The reader never raises: an error of the body leaves bare.
            with ungrouped():
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(self._read_messages, sock)
                    try:
                        yield self
                    finally:
                        self._lose("the client was closed", None)
                        task_group.cancel_scope.cancel()
        finally:
            await anyio.aclose_forcefully(stream)

    async def call(self, method: str, params: Any = None) -> Any:
        """Call a method and return its result (decoded JSON: dicts, lists, ...).

        :param params: the params (by name: a mapping or a Struct), or ``None`` for none.
        :raises RPCError: the server answered with an error.
        :raises RPCConnectionLostError: the connection is gone, or went away before the
            answer.
        :raises TypeError: ``params`` holds something JSON cannot represent.

        On cancellation the call is abandoned; if it was sent, the server still runs it
        and its answer is discarded.
        """
        encoded = UNSET if params is None else msgspec.Raw(_ENCODER.encode(params))
        request_id = next(self._ids)
        line = encode_message(Request(jsonrpc="2.0", method=method, params=encoded, id=request_id))
        pending = _PendingCall()
        self._calls[request_id] = pending
        try:
            await self._send(line)
            await pending.done.wait()
        finally:
            del self._calls[request_id]
        reply = pending.reply
        if reply is None:
            raise self._connection_lost_error()
        if isinstance(reply, ErrorResponse):
            error = reply.error
            raise RPCError(error.code, error.message, None if error.data is UNSET else error.data)
        return reply.result

    def notifications(self) -> NotificationStream:
        """The server's notifications, oldest first, as an async iterator.

        Notifications are queued from the moment the connection opens, whether or not
        anyone iterates; meant for one consumer at a time.
        """
        return self._notifications

    async def _send(self, line: bytes) -> None:
        """Write a whole line; a line cut short by cancellation ends the connection, since
        the server would read its rest glued to the next one."""
        sock = self._socket
        if self._loss is not None or sock is None:
            raise self._connection_lost_error()
        async with self._send_lock:
            try:
                await send_message(sock, line, cut_short=self._cut_short)
            except OSError as exc:
                self._lose("the control socket failed", exc)
                raise self._connection_lost_error() from exc

    def _cut_short(self) -> None:
        self._lose("a request was cut short by cancellation", None)

    async def _read_messages(self, sock: socket.socket) -> None:
        framer = LineFramer(self._max_line_bytes)
        try:
            while True:
                data = await receive_some(sock, _RECEIVE_BYTES)
                for line in framer.feed(data):
                    self._dispatch_line(line)
                if not data:
                    self._lose("the server closed the connection", None)
                    return
        except Exception as exc:
            # The first failure is the root cause every caller sees.
            self._lose("the connection failed", exc)

    def _dispatch_line(self, line: bytes | Oversize) -> None:
        if isinstance(line, Oversize):
            raise ProtocolError(f"server sent a line over {line.max_line_bytes} bytes")
        for message in decode_server_line(line):
            if isinstance(message, Notification):
                self._notifications.publish(message)
                continue
            pending = self._calls.get(message.id) if isinstance(message.id, int) else None
            if pending is not None:
                pending.reply = message
                pending.done.set()

    def _lose(self, reason: str, cause: BaseException | None) -> None:
        """Fail every pending call and end the notifications, once."""
        if self._loss is not None:
            return
        self._loss = reason
        self._loss_cause = cause
        for pending in self._calls.values():
            pending.done.set()
        self._notifications.end()

    def _connection_lost_error(self) -> RPCConnectionLostError:
        error = RPCConnectionLostError(self._loss)
        error.__cause__ = self._loss_cause
        return error


class NotificationStream:
    """Async iterator over a client's notifications; see :meth:`RPCClient.notifications`.

    Holds up to ``max_buffer`` notifications; more are dropped and counted in
    ``dropped``. Once the held ones are consumed and the connection is gone (whatever
    the reason, the client's closing included), it raises the error ``end_error`` makes.
    """

    def __init__(self, max_buffer: int, end_error: Callable[[], RPCConnectionLostError]) -> None:
        self._max_buffer = max_buffer
        self._end_error = end_error
        self._held: deque[Notification] = deque()
        self._wakeup: anyio.Event | None = None
        self._ended = False
        self.dropped = 0

    def publish(self, notification: Notification) -> None:
        """Hold a notification for the consumer, or count it dropped if the buffer is full."""
        if len(self._held) >= self._max_buffer:
            self.dropped += 1
            return
        self._held.append(notification)
        self._wake()

    def end(self) -> None:
        """No more notifications will come: the consumer ends after the held ones."""
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Notification:
        """Wait for the next notification; on cancellation nothing is consumed."""
        while not self._held:
            if self._ended:
                raise self._end_error()
            self._wakeup = wakeup = anyio.Event()
            await wakeup.wait()
        return self._held.popleft()
