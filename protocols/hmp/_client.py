"""The async human monitor clients: a socket client over :class:`HMPConnection`, and the
same ``command()`` through QMP's ``human-monitor-command``.

The socket client needs no background task: commands take turns under a lock, and the
caller's task reads its own reply. A command whose caller stopped waiting (deadline or
cancellation) leaves its reply on the way; the next command first reads and discards it,
and if the monitor stays silent through that command's whole deadline too, the
connection is dropped and the command after it starts on a fresh one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncGenerator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol, Self

import anyio
import anyio.lowlevel
from anyio.abc import SocketAttribute, UNIXSocketStream

from protocols import qmp

from ._core import (
    DEFAULT_MAX_REPLY_BYTES,
    NEED_DATA,
    Banner,
    Closed,
    Event,
    HMPCommandError,
    HMPConnection,
    HMPError,
    HMPProtocolError,
    Reply,
    clean_output,
    encode_command,
    is_error_output,
)

DEFAULT_TIMEOUT: Final = 10.0
_RECEIVE_BYTES: Final = 65536


class HMPTimeoutError(HMPError, TimeoutError):
    """A command, or the connection's set-up, ran past its deadline.

    The command may still run in QEMU; its late reply is discarded.

    :ivar command: the command, or ``None`` for the set-up (connect and banner).
    :ivar timeout: the deadline that passed, in seconds.
    """

    def __init__(self, command: str | None, timeout: float) -> None:
        what = "HMP connection" if command is None else repr(command)
        super().__init__(f"{what}: no reply within {timeout:g} s")
        self.command = command
        self.timeout = timeout


class HMPConnectionLostError(HMPError, ConnectionError):
    """The monitor connection is gone (QEMU closed it or died, or the client was closed).

    Raised by the command pending at that moment and by every later one; a pending
    command may or may not have run. ``__cause__`` holds the socket error, if any.
    """


def connect(
    path: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
) -> HMPClient:
    """Connect to QEMU's human monitor socket (``-monitor unix:PATH,server=on``).

    Use it as ``async with connect(path) as monitor:``. Entering connects and reads the
    banner; leaving closes the socket and never raises because the connection was lost.

    :param path: the monitor's unix socket.
    :param timeout: the deadline for connecting and reading the banner, and the default
        deadline of :meth:`HMPClient.command`, in seconds (``math.inf`` for none). QEMU
        serves one monitor client at a time: while another one is connected, entering
        times out.
    :param max_reply_bytes: the longest reply accepted; a longer one fails its command
        with :exc:`HMPProtocolError` and the next command reconnects.
    :raises OSError: on entering, the socket cannot be connected (missing, refused).
    :raises HMPTimeoutError: on entering, no banner within ``timeout``.
    :raises HMPProtocolError: on entering, the peer is not a human monitor.
    :raises HMPConnectionLostError: on entering, QEMU closed the connection at once.
    """
    return HMPClient(path, timeout=timeout, max_reply_bytes=max_reply_bytes)


class HMPClient(anyio.AsyncContextManagerMixin):
    """A persistent connection to QEMU's human monitor; see :func:`connect`.

    Any number of tasks may call :meth:`command`; commands run one at a time, in the
    order the tasks got the connection's lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> None:
        self._path = path
        self._timeout = timeout
        self._max_reply_bytes = max_reply_bytes
        self._lock = anyio.Lock(fast_acquire=True)
        self._stream: UNIXSocketStream | None = None
        self._socket: socket.socket | None = None
        self._connection = HMPConnection(max_reply_bytes=max_reply_bytes)
        self._banner = ""
        self._loss: str | None = None

    @property
    def banner(self) -> str:
        """The monitor's greeting, e.g. ``QEMU 7.2.22 monitor - type 'help' for more ...``."""
        return self._banner

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        with anyio.move_on_after(self._timeout):
            await self._connect()
        if self._stream is None:
            raise HMPTimeoutError(None, self._timeout)
        try:
            yield self
        finally:
            self._loss = "the HMP client was closed"
            await self._drop_connection()

    async def command(
        self,
        text: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per-call deadline, fixed by API.md §7
    ) -> str:
        """Run a human monitor command and return its output.

        The output has the echo and terminal controls removed, ``\\n`` line ends and no
        final newline (``""`` for a command that prints nothing).

        :param text: one command line, e.g. ``"info status"``.
        :param timeout: seconds to wait, counting the wait for other commands to finish;
            ``None`` uses the connection's default, ``math.inf`` waits for ever.
        :raises ValueError: ``text`` holds a newline or another control character, or
            is too long for the monitor's line editor.
        :raises HMPCommandError: the monitor answered with an error message.
        :raises HMPTimeoutError: no reply within the deadline; QEMU may still run it.
        :raises HMPConnectionLostError: the connection is gone, or went away before the
            reply.
        :raises HMPProtocolError: the reply outgrew ``max_reply_bytes``.

        On cancellation the command is abandoned like on a timeout: if it was sent, its
        reply is discarded when it arrives.
        """
        encode_command(text)
        deadline = self._timeout if timeout is None else timeout
        reply: Reply | None = None
        with anyio.move_on_after(deadline):
            async with self._lock:
                reply = await self._exchange(text)
        if reply is None:
            raise HMPTimeoutError(text, deadline)
        if is_error_output(reply.output):
            raise HMPCommandError(text, reply.output)
        return reply.output

    async def _exchange(self, text: str) -> Reply:
        """Send one command and read its reply; the caller holds the lock."""
        if self._loss is not None:
            raise HMPConnectionLostError(self._loss)
        sock = self._socket
        if sock is None:
            try:
                sock = await self._connect()
            except OSError as exc:
                raise await self._lose("the monitor socket cannot be reconnected") from exc
        connection = self._connection
        if connection.abandoned_pending:
            try:
                await self._discard_abandoned(sock)
            except BaseException:
                # The late reply outlasted this command too: use a fresh connection next time.
                await self._drop_connection()
                raise
        data = connection.send_command(text)
        try:
            # Never blocks: a command goes out only once its predecessor's reply is in, so
            # the socket buffer is empty. MSG_NOSIGNAL: an embedding program may not ignore
            # SIGPIPE as Python does.
            sock.sendall(data, socket.MSG_NOSIGNAL)
        except OSError as exc:
            raise await self._lose("the monitor socket failed") from exc
        try:
            event = await self._receive_event(sock)
        except HMPProtocolError:
            await self._drop_connection()
            raise
        except BaseException:
            connection.abandon_pending()
            raise
        if not isinstance(event, Reply):
            raise await self._lose(f"QEMU closed the monitor connection during {text!r}")
        return event

    async def _discard_abandoned(self, sock: socket.socket) -> None:
        """Read and drop the late replies of commands whose callers gave up."""
        while self._connection.abandoned_pending:
            if isinstance(await self._receive_event(sock), Closed):
                raise await self._lose("QEMU closed the monitor connection")

    async def _connect(self) -> socket.socket:
        """Open a connection and read the banner; leaves nothing open if that fails."""
        stream = await anyio.connect_unix(self._path)
        self._stream = stream
        self._socket = sock = stream.extra(SocketAttribute.raw_socket)
        self._connection = HMPConnection(max_reply_bytes=self._max_reply_bytes)
        try:
            banner = await self._receive_event(sock)
        except BaseException:
            await self._drop_connection()
            raise
        if not isinstance(banner, Banner):
            await self._drop_connection()
            raise HMPConnectionLostError("QEMU closed the monitor connection before its banner")
        self._banner = banner.text
        return sock

    async def _receive_event(self, sock: socket.socket) -> Event:
        connection = self._connection
        while (event := connection.next_event()) is NEED_DATA:
            connection.receive_data(await _receive(sock))
        return event

    async def _lose(self, reason: str) -> HMPConnectionLostError:
        """Close the connection for good; return the error for the pending command."""
        self._loss = reason
        await self._drop_connection()
        return HMPConnectionLostError(reason)

    async def _drop_connection(self) -> None:
        stream, self._stream = self._stream, None
        self._socket = None
        if stream is not None:
            await anyio.aclose_forcefully(stream)


# The raw socket is used directly: anyio's asyncio socket stream may log an
# InvalidStateError when a receive is cancelled just as data arrives, which is exactly
# what a deadline does.


async def _receive(sock: socket.socket) -> bytes:
    """Bytes from the socket, ``b""`` at its end (a reset counts as the end)."""
    while True:
        await anyio.lowlevel.checkpoint_if_cancelled()
        try:
            return sock.recv(_RECEIVE_BYTES)
        except BlockingIOError:
            await anyio.wait_readable(sock)
        except OSError:
            return b""


class QMPExecutor(Protocol):
    """What :class:`QMPHumanMonitor` needs of a QMP client: :class:`protocols.qmp.QMPClient`."""

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - as QMPClient.execute
    ) -> Any:
        """Run a QMP command; see :meth:`protocols.qmp.QMPClient.execute`."""


class QMPHumanMonitor:
    """Human monitor commands through QMP's ``human-monitor-command``, for instances
    without an HMP socket. Same :meth:`command` as :class:`HMPClient`, same errors.

    :param client: a connected QMP client; its lifetime is the caller's business.
    """

    def __init__(self, client: QMPExecutor) -> None:
        self._client = client

    async def command(
        self,
        text: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per-call deadline, as HMPClient's
    ) -> str:
        """Run a human monitor command and return its output, cleaned as
        :meth:`HMPClient.command` does.

        :param timeout: seconds to wait; ``None`` uses the QMP connection's default.
        :raises ValueError: as :meth:`HMPClient.command` (the same commands work on both).
        :raises HMPCommandError: the output is an error message, or QEMU refused the
            command (``__cause__`` is the :exc:`protocols.qmp.ExecuteError`).
        :raises HMPTimeoutError: no reply within the deadline (``__cause__`` is QMP's).
        :raises HMPConnectionLostError: the QMP connection is gone (``__cause__`` is QMP's).

        On cancellation the QMP client abandons the command (see
        :meth:`protocols.qmp.QMPClient.execute`).
        """
        encode_command(text)
        try:
            output: str = await self._client.execute(
                "human-monitor-command", {"command-line": text}, timeout=timeout
            )
        except qmp.ExecuteError as exc:
            raise HMPCommandError(text, exc.desc) from exc
        except qmp.QMPTimeoutError as exc:
            raise HMPTimeoutError(text, exc.timeout) from exc
        except qmp.ConnectionLostError as exc:
            raise HMPConnectionLostError(str(exc)) from exc
        cleaned = clean_output(output.encode())
        if is_error_output(cleaned):
            raise HMPCommandError(text, cleaned)
        return cleaned
