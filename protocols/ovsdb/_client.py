"""The anyio shell around :class:`~protocols.ovsdb._core.OVSDBProtocol`: one socket, one
reader task that routes replies to their callers by id and answers the server's
``echo`` keep-alives, any number of concurrent callers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import anyio
from anyio.abc import SocketAttribute

from ..groups import ungrouped
from ..sockets import receive_some, send_message
from ._core import NEED_DATA, ConnectionClosed, Echo, OVSDBProtocol, Reply
from ._errors import ConnectionLostError, OVSDBTimeoutError, RequestError
from ._ops import check_transact_result

DEFAULT_TIMEOUT: Final = 10.0
_RECEIVE_BYTES: Final = 65536


class _PendingCall:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.reply: Reply | None = None


class OVSDBClient:
    """A connection to ovsdb-server; obtain one with :func:`connect`.

    Methods raise plain exceptions, never exception groups.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._socket = sock
        self._timeout = timeout
        self._protocol = OVSDBProtocol()
        self._calls: dict[int, _PendingCall] = {}
        self._send_lock = anyio.Lock()
        self._loss: str | None = None
        self._loss_cause: BaseException | None = None

    async def call(self, method: str, params: Sequence[Any]) -> Any:
        """Send a request and return its ``result``.

        :raises RequestError: the server answered with an error.
        :raises OVSDBTimeoutError: no answer within the connection's ``timeout`` (the
            request may still run).
        :raises ConnectionLostError: the connection is gone, or went away before the answer.

        On cancellation the request is abandoned; if it was sent, the server still runs it.
        """
        deadline = self._timeout
        if self._loss is not None:
            raise self._connection_lost_error()
        request_id, data = self._protocol.send_request(method, list(params))
        pending = _PendingCall()
        self._calls[request_id] = pending
        try:
            with anyio.move_on_after(deadline):
                await self._send(data)
                await pending.done.wait()
        finally:
            del self._calls[request_id]
        reply = pending.reply
        if reply is None:
            if self._loss is not None:
                raise self._connection_lost_error()
            raise OVSDBTimeoutError(f"{method}: no answer within {deadline:g} s")
        if reply.error is not None:
            raise RequestError(method, reply.error)
        return reply.result

    async def transact(
        self, database: str, ops: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """Run operations as one transaction (see :mod:`protocols.ovsdb`'s op builders)
        and return their results, one per operation.

        :raises TransactError: an operation or the commit failed; nothing was committed.
        :raises RequestError, OVSDBTimeoutError, ConnectionLostError: as :meth:`call`.
        """
        result = await self.call("transact", [database, *ops])
        return check_transact_result(ops, result)

    async def get_schema(self, database: str) -> dict[str, Any]:
        """The database's schema (RFC 7047 §4.1.2)."""
        schema: dict[str, Any] = await self.call("get_schema", [database])
        return schema

    async def _send(self, data: bytes) -> None:
        """Write a whole message; one cut short by cancellation ends the connection,
        since the server would read its rest glued to the next one."""
        sock = self._socket
        async with self._send_lock:
            if self._loss is not None:
                raise self._connection_lost_error()
            try:
                await send_message(sock, data, cut_short=self._cut_short)
            except OSError as exc:
                self._lose("the OVSDB socket failed", exc)
                raise self._connection_lost_error() from exc

    def _cut_short(self) -> None:
        self._lose("a request was cut short by cancellation", None)

    async def _read_messages(self) -> None:
        protocol = self._protocol
        sock = self._socket
        try:
            while True:
                try:
                    data = await receive_some(sock, _RECEIVE_BYTES)
                except ConnectionResetError:
                    data = b""
                protocol.receive_data(data)
                while (event := protocol.next_event()) is not NEED_DATA:
                    if isinstance(event, Reply):
                        pending = self._calls.get(event.id)
                        if pending is not None:
                            pending.reply = event
                            pending.done.set()
                    elif isinstance(event, Echo):
                        await self._send(protocol.answer_echo(event))
                    elif isinstance(event, ConnectionClosed):
                        self._lose("ovsdb-server closed the connection", None)
                        return
                    # Notifications (monitor updates) have no consumer in this client.
        except Exception as exc:
            # The first failure is the root cause every caller sees.
            self._lose("the OVSDB connection failed", exc)

    def _lose(self, reason: str, cause: BaseException | None) -> None:
        if self._loss is not None:
            return
        self._loss = reason
        self._loss_cause = cause
        for pending in self._calls.values():
            pending.done.set()

    def _connection_lost_error(self) -> ConnectionLostError:
        error = ConnectionLostError(self._loss)
        error.__cause__ = self._loss_cause
        return error


class _Session(anyio.AsyncContextManagerMixin):
    def __init__(self, path: str | os.PathLike[str], timeout: float) -> None:
        self._path = path
        self._timeout = timeout

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[OVSDBClient]:
        with anyio.move_on_after(self._timeout) as scope:
            stream = await anyio.connect_unix(self._path)
        if scope.cancelled_caught:
            raise OVSDBTimeoutError(f"connecting to {self._path} took over {self._timeout:g} s")
        client = OVSDBClient(stream.extra(SocketAttribute.raw_socket), self._timeout)
        try:
            # The reader never raises: an error of the body leaves bare.
            with ungrouped():
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(client._read_messages)
                    try:
                        yield client
                    finally:
                        client._lose("the OVSDB client was closed", None)
                        task_group.cancel_scope.cancel()
        finally:
            await anyio.aclose_forcefully(stream)


def connect(
    path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT
) -> AbstractAsyncContextManager[OVSDBClient]:
    """Connect to ovsdb-server's unix socket: an async context manager yielding an
    :class:`OVSDBClient`.

    Leaving closes the socket: calls pending in other tasks raise
    :exc:`ConnectionLostError`; an exception from the body leaves as it is, not in an
    exception group.

    :param timeout: the deadline of connecting and the default deadline of each call, in
        seconds (``math.inf`` for none).
    :raises OSError: on entering, the socket cannot be connected (missing, refused).
    :raises OVSDBTimeoutError: on entering, connecting took longer than ``timeout``.
    """
    return _Session(path, timeout)
