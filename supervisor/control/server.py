"""The control socket: JSON-RPC 2.0 over a unix stream socket (API.md §1, §2, §4).

This module listens: it binds ``<state_dir>/control.sock`` (mode 0660, the control
group), accepts at most ``max_connections`` connections at once (more are closed as
they come) and hands each to `supervisor.control.connection`, which checks the peer
(`supervisor.control.peers`), reads its requests within their bounds and answers them
(what a peer may ask: `supervisor.control.privilege`).

The socket file is watched: deleted, it is made again; replaced by something else,
that is logged, left alone and reported by ``supervisor.verify``.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import anyio
from anyio.abc import SocketListener, SocketStream, TaskGroup, TaskStatus

from protocols.groups import ungrouped
from supervisor.control.connection import serve_connection
from supervisor.engine.supervisor import Supervisor
from supervisor.host.inotify import EntryWatch
from supervisor.log import get_logger

_log = get_logger(__name__)

#: Pause after a failed accept (out of descriptors), so the loop does not spin.
ACCEPT_RETRY_S: Final = 0.1
#: Without inotify, how often the socket file is checked for deletion or replacement.
SOCKET_CHECK_S: Final = 30.0
#: Connections waiting to be accepted (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG: Final = socket.SOMAXCONN


class ControlSocketError(Exception):
    """The control socket cannot be served: its path holds something else, or it cannot
    be bound. ``str(error)`` is one line naming the path."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"control socket {path}: {reason}")
        self.path = path


def _listen(path: Path, control_group: str) -> socket.socket:
    """A socket listening at `path` with mode 0660 and the control group, both set before
    it listens, so nobody connects to it with another mode."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        try:
            os.chmod(path, 0o660)
            if control_group != "root":
                os.chown(path, -1, grp.getgrnam(control_group).gr_gid)
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            os.unlink(path)
            raise
    except BaseException:
        sock.close()
        raise
    return sock


def _file_identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file at `path` itself (a symlink is not followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class _ControlServer:
    """The listening socket, its watch, and the connections it accepted."""

    def __init__(self, sup: Supervisor, path: Path) -> None:
        self.sup = sup
        self.path = path
        self.connections = 0
        self._identity: tuple[int, int] | None = None
        self._accepting = anyio.CancelScope()
        self._foreign: tuple[int, int] | None = None

    def listen(self) -> socket.socket:
        """Bind the control socket at startup.

        :raises ControlSocketError: the path cannot be bound (something is there, the
            directory is not writable, the path is too long for a unix socket).
        """
        try:
            return self._listen()
        except OSError as error:
            raise ControlSocketError(
                self.path, f"cannot listen: {error.strerror or error}"
            ) from None

    def _listen(self) -> socket.socket:
        sock = _listen(self.path, self.sup.config.control_group)
        self._identity = _file_identity(self.path)
        return sock

    async def run(
        self, sock: socket.socket, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve `sock` and every socket made again in its place, until cancelled; started
        once the socket is watched."""
        async with anyio.create_task_group() as tg:
            await self._serve(sock, tg)
            await tg.start(self._watch_socket, tg)
            task_status.started()

    async def _serve(self, sock: socket.socket, tg: TaskGroup) -> None:
        """Accept on `sock` from now on, instead of on the previous socket."""
        try:
            listener = await SocketListener.from_socket(sock)
        except BaseException:
            sock.close()
            raise
        self._accepting.cancel()
        self._accepting = anyio.CancelScope()
        tg.start_soon(self._accept, listener, self._accepting, tg)

    async def _accept(
        self, listener: SocketListener, scope: anyio.CancelScope, tg: TaskGroup
    ) -> None:
        limit = self.sup.config.max_connections
        try:
            with scope:
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as error:  # EMFILE and friends: keep serving the others
                        _log.error("accept failed", error=str(error))
                        await anyio.sleep(ACCEPT_RETRY_S)
                        continue
                    if self.connections >= limit:
                        _log.warning("connection refused: too many connections", limit=limit)
                        await anyio.aclose_forcefully(stream)
                        continue
                    self.connections += 1
                    tg.start_soon(self._handle, stream)
        finally:
            await anyio.aclose_forcefully(listener)

    async def _handle(self, stream: SocketStream) -> None:
        try:
            await serve_connection(self.sup, stream, self.socket_problem)
        except Exception:
            _log.exception("connection handler crashed")
        finally:
            self.connections -= 1

    async def _watch_socket(
        self, tg: TaskGroup, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with contextlib.ExitStack() as stack:
            changed: Callable[[], Awaitable[None]]
            try:
                changed = stack.enter_context(EntryWatch(self.path)).changed
            except OSError as error:
                _log.warning(
                    "control socket not watched (inotify failed): checked on a timer",
                    error=str(error),
                    interval_s=SOCKET_CHECK_S,
                )
                changed = functools.partial(anyio.sleep, SOCKET_CHECK_S)
            task_status.started()
            while True:
                # First for what happened between the bind and the watch.
                await self._check_socket(tg)
                await changed()

    async def _check_socket(self, tg: TaskGroup) -> None:
        """Make the socket again if it was deleted; log loudly (once) when something else
        took its place, which is left alone."""
        identity = _file_identity(self.path)
        if identity == self._identity:
            return
        log = _log.bind(socket=str(self.path))
        if identity is not None:
            if identity != self._foreign:
                self._foreign = identity
                log.error("control socket was replaced: clients cannot reach the daemon")
            return
        log.error("control socket was deleted: making it again")
        try:
            sock = self._listen()
        except OSError as error:
            log.error("control socket cannot be made again", error=str(error))
            return
        await self._serve(sock, tg)

    def socket_problem(self) -> str | None:
        """Why clients cannot reach the daemon through its socket path, if they cannot."""
        identity = _file_identity(self.path)
        if identity is None:
            return f"control socket {self.path} is missing: clients cannot connect"
        if identity != self._identity:
            return (
                f"control socket {self.path} is not this daemon's (something replaced it): "
                "clients cannot reach the daemon"
            )
        return None

    def unlink_if_ours(self) -> None:
        """Remove the socket file, unless something else has taken its place."""
        if _file_identity(self.path) == self._identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


@asynccontextmanager
async def serve_control(sup: Supervisor, path: Path | None = None) -> AsyncIterator[Path]:
    """Serve the control socket (mode 0660, control group) for the block's duration.

    ``path`` defaults to ``<state_dir>/control.sock``, where the state dir's lock holder
    has removed a stale socket left by a killed predecessor; any other path must be free.
    The engine never imports this module: the daemon (or an embedding program) composes
    the two, ``async with Supervisor(cfg) as sup, serve_control(sup):``, so the socket
    serves only once every instance the state dir knows is registered.

    :raises ControlSocketError: on entering, the socket cannot be bound; never an
        exception group.
    """
    server = _ControlServer(sup, sup.config.control_socket if path is None else path)
    sock = server.listen()
    try:
        # The server's own tasks never raise: an error of the body leaves bare.
        with ungrouped():
            async with anyio.create_task_group() as tg:
                await tg.start(server.run, sock)
                try:
                    yield server.path
                finally:
                    tg.cancel_scope.cancel()
    finally:
        server.unlink_if_ours()
