"""The anyio shell around :class:`~protocols.qmp._core.QMPProtocol`: one socket, one
reader task, one writer task, one task enforcing deadlines, any number of callers and
event subscribers.

Reads and writes go to the raw socket, waiting with ``anyio.wait_readable`` and
``wait_writable``: fewer wake-ups per reply than the socket stream, which serves to
connect, to send ``qmp_capabilities`` and to close.

A lone command is written by its caller, without awaiting, when the socket takes it at
once. The writer task writes the rest: what the socket refused, and the commands of
callers woken together by one read of replies, gathered into one ``sendmsg``. Either way
commands go out whole and in order, and the file descriptors a command carries go out
with its first byte, in a ``sendmsg`` that starts with it, so no other command can come
between a ``getfd`` and its descriptor.
"""

from __future__ import annotations

import array
import contextlib
import heapq
import itertools
import math
import os
import socket
import time
from collections import deque
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import anyio
from anyio.abc import SocketAttribute, UNIXSocketStream

from ..groups import ungrouped
from ._core import (
    CAPABILITIES_COMMAND,
    NEED_DATA,
    ConnectionClosed,
    ErrorReply,
    Greeting,
    QMPEvent,
    QMPProtocol,
    QMPVersion,
    ReturnReply,
)
from ._errors import ConnectionLostError, ExecuteError, QMPTimeoutError
from ._subscription import DEFAULT_MAX_BUFFER, EventSubscription

DEFAULT_TIMEOUT: Final = 10.0
_RECEIVE_BYTES: Final = 65536
_MAX_BATCH: Final = 512
"""Commands per sendmsg, well under the kernel's 1024 buffers."""
_STALE_EXPIRIES: Final = 1024
"""Deadlines of answered calls tolerated before they are swept out."""
_NO_REPLY: Final = object()


class _PendingCall:
    """A command waiting for its reply; ``done`` is set by the reply, the deadline or the
    loss of the connection, and the fields say which."""

    __slots__ = ("command", "command_id", "delay", "done", "error", "queued", "timed_out", "value")

    def __init__(self, command: str, command_id: int, delay: float, done: anyio.Event) -> None:
        self.command = command
        self.command_id = command_id
        self.delay = delay
        self.done = done
        #: What of the command the socket has not taken yet.
        self.queued: _Outgoing | None = None
        self.value: Any = _NO_REPLY
        self.error: ErrorReply | None = None
        self.timed_out = False


class _Outgoing:
    """Bytes the socket has not taken yet; ``started`` once some of them went out."""

    __slots__ = ("data", "fds", "started")

    def __init__(self, data: bytes, fds: Sequence[int], *, started: bool) -> None:
        self.data = data
        self.fds = fds
        self.started = started


class QMPClient:
    """A negotiated QMP connection; obtain one with :func:`connect`.

    Any number of tasks may call :meth:`execute` at once and hold event subscriptions.
    Methods raise plain exceptions, never exception groups.
    """

    def __init__(
        self, sock: socket.socket, protocol: QMPProtocol, version: QMPVersion, timeout: float
    ) -> None:
        self._socket = sock
        self._protocol = protocol
        self._version = version
        self._timeout = timeout
        self._calls: dict[int, _PendingCall] = {}
        # One task enforces every deadline: a cancel scope per call would cost more than
        # the rest of a call's work. Entries of answered calls are dropped lazily. Deadlines
        # are in time.monotonic() seconds, the cheapest clock to read once per call.
        self._expiries: list[tuple[float, int]] = []
        self._expiry_target = math.inf
        self._expiry_wakeup: anyio.Event | None = None
        self._subscriptions: list[EventSubscription] = []
        self._send_queue: deque[_Outgoing] = deque()
        self._writer_wakeup: anyio.Event | None = None
        self._coalescing = False
        self._closed = anyio.Event()
        # The backend's own Event class: anyio.Event() looks the backend up on every call,
        # a noticeable share of a call's cost.
        self._new_event: type[anyio.Event] = type(self._closed)
        self._loss_message: str | None = None
        self._loss_cause: BaseException | None = None
        self._background = anyio.CancelScope()

    @property
    def version(self) -> QMPVersion:
        """QEMU's version, from the greeting."""
        return self._version

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (lost, or the ``async with`` block ended)."""
        return self._loss_message is not None

    async def wait_closed(self) -> None:
        """Wait until the connection is gone; return at once if it already is.

        On cancellation, nothing happens to the connection.
        """
        await self._closed.wait()

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per-call deadline, fixed by API.md §7
        fds: Sequence[int] = (),
    ) -> Any:
        """Run a QMP command and return QEMU's ``return`` value.

        Args:
            command: the command name, e.g. ``"query-status"``.
            arguments: the command's arguments, JSON-encodable.
            timeout: seconds to wait for the reply, in real (monotonic) time rather
                than the event loop's clock; ``None`` uses the connection's default (see
                :func:`connect`), ``math.inf`` waits for ever.
            fds: file descriptors passed to QEMU with this command (``getfd``,
                ``add-fd``). They are sent with the command's first byte or not at all,
                and not used after this call returns or raises, so the caller may close
                them then; QEMU holds its own duplicates.

        Raises:
            ExecuteError: QEMU answered with an error.
            QMPTimeoutError: no reply within the deadline. QEMU may still run the
                command; its late reply is discarded.
            ConnectionLostError: the connection is gone or went away before the reply.
            TypeError: ``arguments`` holds a value JSON cannot represent.

        On cancellation the call is abandoned like on a timeout: a command not yet
        written is withdrawn, one already written may still run and its reply is
        discarded.
        """
        call = self._submit(command, arguments, timeout, fds)
        try:
            await call.done.wait()
        finally:
            self._withdraw(call)
        return self._outcome(call)

    async def execute_in_order(
        self,
        commands: Sequence[tuple[str, Mapping[str, Any] | None]],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - as execute's
        fds: Sequence[int] = (),
    ) -> list[Any]:
        """Send `commands` at once, in order, and return their ``return`` values in order.

        One write and one wait instead of a round trip per command. QEMU runs them one
        after the other as they came, each whatever became of the ones before it: send
        together only commands that may all run even when an earlier one fails.
        `timeout` applies to each reply, as in `execute`; `fds` go with the first
        command, as `execute` sends them (``getfd``, then a command that uses it).

        Raises what `execute` raises, for the first command (in order) that failed, once
        every reply is in (or the connection is gone).
        """
        calls: list[_PendingCall] = []
        try:
            for index, (command, arguments) in enumerate(commands):
                calls.append(self._submit(command, arguments, timeout, () if index else fds))
            for call in calls:
                await call.done.wait()
        finally:
            for call in calls:
                self._withdraw(call)
        return [self._outcome(call) for call in calls]

    def _submit(
        self,
        command: str,
        arguments: Mapping[str, Any] | None,
        timeout: float | None,
        fds: Sequence[int],
    ) -> _PendingCall:
        """Write (or queue) `command` and register the call awaiting its reply."""
        if self._loss_message is not None:
            raise self._connection_lost_error()
        command_id, data = self._protocol.send_command(command, arguments)
        delay = self._timeout if timeout is None else timeout
        call = _PendingCall(command, command_id, delay, self._new_event())
        self._calls[command_id] = call
        if delay != math.inf:
            self._expire_after(command_id, delay)
        call.queued = self._write(data, fds)
        return call

    def _withdraw(self, call: _PendingCall) -> None:
        """Forget `call` (answered or abandoned); a command not yet written is not sent."""
        del self._calls[call.command_id]
        queued = call.queued
        if queued is not None and not queued.started and self._loss_message is None:
            self._send_queue.remove(queued)

    def _outcome(self, call: _PendingCall) -> Any:
        """The ``return`` value of an ended `call`, or the error it ended with."""
        if call.error is not None:
            raise ExecuteError(call.command, call.error.error_class, call.error.desc)
        if call.value is not _NO_REPLY:
            return call.value
        if call.timed_out:
            raise QMPTimeoutError(call.command, call.delay)
        raise self._connection_lost_error()

    def events(
        self, names: Collection[str] | None = None, *, max_buffer: int = DEFAULT_MAX_BUFFER
    ) -> EventSubscription:
        """Subscribe to QEMU's events.

        Use it as ``async with client.events({"STOP", "RESUME"}) as events:``, then
        ``async for event in events:``. Only events that arrive after the ``async
        with`` is entered are received. See :class:`EventSubscription`.

        Args:
            names: the event names to receive, e.g. ``{"SHUTDOWN"}``; ``None`` for all.
            max_buffer: how many events to hold for a subscriber that does not keep up;
                more are dropped, counted in ``dropped`` and reported by an
                :class:`EventsDropped` item.
        """
        return EventSubscription(names, max_buffer, self._attach, self._detach)

    def _expire_after(self, command_id: int, delay: float) -> None:
        deadline = time.monotonic() + delay
        expiries = self._expiries
        if len(expiries) > 2 * len(self._calls) + _STALE_EXPIRIES:
            expiries[:] = [entry for entry in expiries if entry[1] in self._calls]
            heapq.heapify(expiries)
        heapq.heappush(expiries, (deadline, command_id))
        if deadline < self._expiry_target and self._expiry_wakeup is not None:
            self._expiry_wakeup.set()
            self._expiry_wakeup = None

    async def _expire_calls(self) -> None:
        """Time out calls whose deadline passed; sleeps until the earliest one."""
        expiries = self._expiries
        calls = self._calls
        while True:
            now = time.monotonic()
            while expiries and (expiries[0][0] <= now or expiries[0][1] not in calls):
                _, command_id = heapq.heappop(expiries)
                call = calls.get(command_id)
                if call is not None:
                    call.timed_out = True
                    call.done.set()
            self._expiry_target = expiries[0][0] if expiries else math.inf
            self._expiry_wakeup = wakeup = anyio.Event()
            with anyio.move_on_after(self._expiry_target - now):
                await wakeup.wait()

    def _attach(self, subscription: EventSubscription) -> None:
        self._subscriptions.append(subscription)
        if self._loss_message is not None:
            subscription._connection_lost(self._connection_lost_error)

    def _detach(self, subscription: EventSubscription) -> None:
        self._subscriptions.remove(subscription)

    def _write(self, data: bytes, fds: Sequence[int]) -> _Outgoing | None:
        """Write a command now if nothing is queued before it and no batch is being
        gathered, and queue what is left.

        Returns the queued remainder, if any. Marks the connection lost on a socket
        error.
        """
        if self._send_queue or self._coalescing:
            outgoing = _Outgoing(data, fds, started=False)
        else:
            try:
                sent = self._send_some(data, fds)
            except OSError as exc:
                self._lose("the QMP socket failed", exc)
                return None
            if sent == len(data):
                return None
            outgoing = _Outgoing(data[sent:], fds if sent == 0 else (), started=sent > 0)
        self._send_queue.append(outgoing)
        self._wake_writer()
        return outgoing

    def _wake_writer(self) -> None:
        if self._writer_wakeup is not None:
            self._writer_wakeup.set()
            self._writer_wakeup = None

    def _send_some(self, data: bytes, fds: Sequence[int]) -> int:
        """Write what the socket takes without blocking; return how many bytes that was."""
        # MSG_NOSIGNAL: an embedding program may not ignore SIGPIPE as Python does.
        try:
            if fds:
                rights = array.array("i", fds)
                return self._socket.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], socket.MSG_NOSIGNAL
                )
            return self._socket.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return 0

    async def _run_background(self) -> None:
        with self._background:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._read_messages)
                task_group.start_soon(self._write_queued)
                task_group.start_soon(self._expire_calls)

    async def _read_messages(self) -> None:
        protocol = self._protocol
        calls = self._calls
        subscriptions = self._subscriptions
        sock = self._socket
        try:
            while True:
                completed = 0
                protocol.receive_data(await _receive(sock))
                while (event := protocol.next_event()) is not NEED_DATA:
                    if isinstance(event, ReturnReply):
                        call = calls.get(event.id)
                        if call is not None:
                            call.value = event.value
                            call.done.set()
                            completed += 1
                    elif isinstance(event, QMPEvent):
                        for subscription in subscriptions:
                            subscription._publish(event)
                    elif isinstance(event, ErrorReply):
                        call = calls.get(event.id)
                        if call is not None:
                            call.error = event
                            call.done.set()
                            completed += 1
                    elif isinstance(event, ConnectionClosed):
                        self._lose("QEMU closed the QMP connection", None)
                        return
                if completed > 1:
                    # The callers just woken are likely to send again at once, and mostly
                    # run before the writer: one write for all of that instead of one each.
                    self._coalescing = True
                    self._wake_writer()
        except Exception as exc:
            # The first failure of a background task is the root cause every caller sees.
            self._lose("the QMP connection failed", exc)

    async def _write_queued(self) -> None:
        queue = self._send_queue
        try:
            while True:
                self._coalescing = False
                if not queue:
                    self._writer_wakeup = wakeup = self._new_event()
                    await wakeup.wait()
                    continue
                # The head and the commands after it, up to the next one carrying
                # descriptors: those must be the first bytes of a sendmsg of their own.
                batch = [queue[0]]
                for outgoing in itertools.islice(queue, 1, _MAX_BATCH):
                    if outgoing.fds:
                        break
                    batch.append(outgoing)
                unaccounted = self._send_batch(batch)
                for outgoing in batch:
                    if not unaccounted:
                        break
                    outgoing.started = True
                    outgoing.fds = ()
                    if unaccounted < len(outgoing.data):
                        outgoing.data = outgoing.data[unaccounted:]
                        break
                    unaccounted -= len(outgoing.data)
                    queue.popleft()
                else:
                    continue
                await anyio.wait_writable(self._socket)
        except Exception as exc:
            self._lose("the QMP socket failed", exc)

    def _send_batch(self, batch: list[_Outgoing]) -> int:
        """Write what the socket takes of a batch without blocking; return the byte count."""
        ancillary = []
        if batch[0].fds:
            rights = array.array("i", batch[0].fds)
            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, rights))
        try:
            return self._socket.sendmsg(
                [outgoing.data for outgoing in batch], ancillary, socket.MSG_NOSIGNAL
            )
        except BlockingIOError:
            return 0

    def _lose(self, message: str, cause: BaseException | None) -> None:
        """Fail every pending call and subscription, and stop the background tasks."""
        if self._loss_message is not None:
            return
        self._loss_message = message
        self._loss_cause = cause
        for call in self._calls.values():
            call.done.set()
        for subscription in self._subscriptions:
            subscription._connection_lost(self._connection_lost_error)
        self._send_queue.clear()
        self._background.cancel()
        # Nothing reads or writes from now on: let the peer know at once, not only when
        # the ``async with`` block ends and the socket is closed.
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._closed.set()

    def _connection_lost_error(self) -> ConnectionLostError:
        error = ConnectionLostError(self._loss_message)
        error.__cause__ = self._loss_cause
        return error


class _Session(anyio.AsyncContextManagerMixin):
    def __init__(self, path: str | os.PathLike[str], timeout: float) -> None:
        self._path = path
        self._timeout = timeout

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[QMPClient]:
        stream, protocol, version = await _handshake(self._path, self._timeout)
        client = QMPClient(
            stream.extra(SocketAttribute.raw_socket), protocol, version, self._timeout
        )
        try:
            # The background tasks never raise: an error of the body leaves bare.
            with ungrouped():
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(client._run_background)
                    try:
                        yield client
                    finally:
                        client._lose("the QMP client was closed", None)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()


def connect(
    path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT
) -> AbstractAsyncContextManager[QMPClient]:
    """Connect to QEMU's QMP unix socket: an async context manager yielding a
    :class:`QMPClient`.

    Entering reads the greeting (skipping events sent before it) and negotiates
    capabilities, enabling ``oob`` when QEMU offers it. Leaving closes the socket:
    calls still pending in other tasks and event iterators then raise
    :class:`ConnectionLostError`. Losing the connection never makes leaving raise;
    an exception from the block's body leaves as it is, not in an exception group.

    Args:
        path: the socket QEMU listens on (``-qmp unix:PATH,server=on``).
        timeout: the deadline of the handshake, and the default deadline of
            :meth:`QMPClient.execute`, in seconds (``math.inf`` for none).

    Raises (on entering):
        OSError: the socket cannot be connected (missing, refused).
        QMPTimeoutError: the handshake did not finish within ``timeout``.
        ProtocolError: the server's greeting or negotiation reply was not valid QMP.
        ExecuteError: QEMU refused ``qmp_capabilities``.
        ConnectionLostError: QEMU closed the connection during the handshake.

    Cancellation while entering closes the socket.
    """
    return _Session(path, timeout)


async def _handshake(
    path: str | os.PathLike[str], deadline_s: float
) -> tuple[UNIXSocketStream, QMPProtocol, QMPVersion]:
    protocol = QMPProtocol()
    with anyio.move_on_after(deadline_s):
        stream = await anyio.connect_unix(path)
        try:
            version = await _negotiate(stream, protocol)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
        return stream, protocol, version
    raise QMPTimeoutError(None, deadline_s)


async def _negotiate(stream: UNIXSocketStream, protocol: QMPProtocol) -> QMPVersion:
    greeting = await _next_handshake_event(stream, protocol)
    assert isinstance(greeting, Greeting)
    arguments = {"enable": ["oob"]} if "oob" in greeting.capabilities else None
    _, data = protocol.send_command(CAPABILITIES_COMMAND, arguments)
    await stream.send(data)
    reply = await _next_handshake_event(stream, protocol)
    if isinstance(reply, ErrorReply):
        raise ExecuteError(CAPABILITIES_COMMAND, reply.error_class, reply.desc)
    return greeting.version


async def _next_handshake_event(
    stream: UNIXSocketStream, protocol: QMPProtocol
) -> Greeting | ReturnReply | ErrorReply:
    """The next greeting or reply; the core rejects any that is out of place."""
    while True:
        event = protocol.next_event()
        if event is NEED_DATA:
            protocol.receive_data(await _receive(stream.extra(SocketAttribute.raw_socket)))
        elif isinstance(event, ConnectionClosed):
            raise ConnectionLostError("QEMU closed the QMP connection during the handshake")
        elif not isinstance(event, QMPEvent):
            # Events before negotiation have no subscriber yet.
            return event


async def _receive(sock: socket.socket) -> bytes:
    """Wait for bytes and read them; ``b""`` once the peer has closed the connection.

    Waits before every read, rather than only when the socket is empty, so that a flood
    of events cannot starve the other tasks. Reads the raw socket rather than through
    the stream: fewer wake-ups per read, and a cancelled wait leaves nothing behind.
    """
    while True:
        await anyio.wait_readable(sock)
        try:
            return sock.recv(_RECEIVE_BYTES)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            # QEMU went away with commands of ours unread: a close, to us.
            return b""
