"""The control socket: JSON-RPC 2.0 over a unix stream socket (API.md §1, §2, §4).

One line per message; many requests in flight per connection (each runs in its
own task, responses go out as they finish); batches; notifications; event
subscriptions forwarded as ``event`` notifications through bounded queues. The
peer's credentials are checked (SO_PEERCRED) before anything is read; what a permitted
peer may ask depends on who it is (`supervisor.control.privilege`). A request
that fails in an unexpected way gets -32603 and is logged; the connection and the
daemon keep serving.

What a client can make the daemon hold is bounded (config keys, README "Control socket
limits"): ``max_connections`` connections (more are closed as they come); per
connection ``max_requests_per_connection`` requests read and not yet answered, batch
members included (at the bound the connection is not read until answers go out, so a
client that never reads its answers stops being read and costs at most that many
answers), one line of ``max_request_bytes``, and ``request_line_timeout_s`` from a
line's first byte to its newline (a connection idle between requests, such as an
events subscriber, is never timed out).

The socket file is watched: deleted, it is made again; replaced by something else,
that is logged, left alone and reported by ``supervisor.verify``.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import itertools
import math
import os
import pwd
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec
from anyio.abc import SocketListener, SocketStream, TaskGroup, TaskStatus

from protocols import jsonrpc
from protocols.groups import ungrouped
from supervisor.control.methods import METHODS
from supervisor.control.openrpc import openrpc_document
from supervisor.control.privilege import Privilege, authorize, privilege_of
from supervisor.engine.events import Subscription
from supervisor.engine.supervisor import Supervisor
from supervisor.host.inotify import EntryWatch
from supervisor.log import get_logger
from supervisor.model import api
from supervisor.model.errors import InvalidParams, SupervisorError

_log = get_logger(__name__)

Response = jsonrpc.Response | jsonrpc.ErrorResponse

#: Pause after a failed accept (out of descriptors), so the loop does not spin.
ACCEPT_RETRY_S: Final = 0.1
#: Bytes read from a connection at once.
RECEIVE_BYTES: Final = 64 * 1024
#: Without inotify, how often the socket file is checked for deletion or replacement.
SOCKET_CHECK_S: Final = 30.0
#: Connections waiting to be accepted (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG: Final = socket.SOMAXCONN

_ENCODER: Final = msgspec.json.Encoder()


class ControlSocketError(Exception):
    """The control socket cannot be served: its path holds something else, or it cannot
    be bound. ``str(error)`` is one line naming the path."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"control socket {path}: {reason}")
        self.path = path


def peer_uid_gid(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_allowed(uid: int, gid: int, control_group: str) -> bool:
    """Root, the daemon's own user, or a member of `control_group` (primary or supplementary)."""
    if privilege_of(uid) is Privilege.ADMIN:
        return True
    try:
        group = grp.getgrnam(control_group)
    except KeyError:
        return False
    if gid == group.gr_gid:
        return True
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return user.pw_gid == group.gr_gid or user.pw_name in group.gr_mem


class _RequestBudget:
    """Requests a connection has read and not yet answered, held under its bound.

    Only the connection's reader takes (so waiting is backpressure: the connection is not
    read meanwhile); a request gives its share back once its answer is out.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._freed: anyio.Event | None = None

    async def take(self, count: int) -> None:
        while self._used + count > self.limit:
            self._freed = anyio.Event()
            await self._freed.wait()
        self._used += count

    def give_back(self, count: int) -> None:
        self._used -= count
        if self._freed is not None:
            self._freed.set()
            self._freed = None


class _Connection:
    """One client connection: its requests, its subscriptions, its writer."""

    _subscription_ids = itertools.count(1)

    def __init__(
        self,
        server: _ControlServer,
        sock: socket.socket,
        tg: TaskGroup,
        log: Any,
        privilege: Privilege,
    ) -> None:
        self.server = server
        self.sup = server.sup
        self.privilege = privilege
        self.sock = sock
        self.tg = tg
        self.send_lock = anyio.Lock()
        self.subscriptions: dict[int, tuple[Subscription, anyio.CancelScope]] = {}
        self.log = log
        self.budget = _RequestBudget(self.sup.config.max_requests_per_connection)
        #: Cancelled when an answer cannot be sent: nobody reads them any more.
        self.reading = anyio.CancelScope()
        self.closed = False

    async def send(self, payload: bytes) -> None:
        """Send one line; a peer that is gone just misses it (its requests still finish)."""
        async with self.send_lock:
            try:
                await _send_all(self.sock, payload)
            except OSError:
                self.log.debug("reply dropped: the client is gone")
                self.reading.cancel()

    async def read_requests(self) -> bytes | None:
        """Read lines and start their requests until the client is done sending or gone.

        Returns the error line to end the connection with when the client broke a limit
        (a line too long, or too slow to complete): nothing more is read then. Else None.
        """
        config = self.sup.config
        framer = jsonrpc.LineFramer(config.max_request_bytes)
        line_deadline = math.inf
        with self.reading:
            while True:
                with anyio.CancelScope(deadline=line_deadline) as waiting:
                    data = await _receive(self.sock)
                if data is None:
                    return None
                if waiting.cancelled_caught:
                    timeout_s = config.request_line_timeout_s
                    self.log.warning("request line not completed in time", timeout_s=timeout_s)
                    return jsonrpc.encode_message(jsonrpc.line_timeout_response(timeout_s))
                lines = framer.feed(data)
                for line in lines:
                    if isinstance(line, jsonrpc.Oversize):
                        reply = jsonrpc.oversize_response(line.max_line_bytes)
                        return jsonrpc.encode_message(reply)
                    await self.handle_line(line)
                if not data:
                    # The client is done sending (`echo ... | socat` half-closes):
                    # requests in flight still run and answer.
                    return None
                # Counted from the line's first byte read; time spent not reading this
                # connection (backpressure) is not the client's and does not count.
                if lines:
                    line_deadline = math.inf
                if framer.holds_partial_line and line_deadline == math.inf:
                    line_deadline = anyio.current_time() + config.request_line_timeout_s
        return None

    async def handle_line(self, line: bytes) -> None:
        """Start the requests of one line once the connection's budget has room for them."""
        try:
            incoming = jsonrpc.decode_incoming(line, max_batch=self.budget.limit)
        except Exception as error:
            self.log.exception("request line crashed the decoder")
            items: list[jsonrpc.Incoming] = [_internal_error(None, error)]
            incoming = jsonrpc.IncomingLine(items, is_batch=False)
        if not incoming.items:
            return
        await self.budget.take(len(incoming.items))
        if incoming.is_batch:
            self.tg.start_soon(self._answer_batch, incoming.items)
            return
        for item in incoming.items:
            self.tg.start_soon(self._answer_one, item)

    async def _answer_one(self, item: jsonrpc.Incoming) -> None:
        try:
            response = await self._dispatch(item)
            if response is not None:
                await self.send(jsonrpc.encode_message(response))
        finally:
            self.budget.give_back(1)

    async def _answer_batch(self, items: list[jsonrpc.Incoming]) -> None:
        responses: list[Response | None] = [None] * len(items)

        async def answer(index: int, item: jsonrpc.Incoming) -> None:
            responses[index] = await self._dispatch(item)

        try:
            async with anyio.create_task_group() as tg:
                for index, item in enumerate(items):
                    tg.start_soon(answer, index, item)
            batch = jsonrpc.encode_batch([r for r in responses if r is not None])
            if batch is not None:
                await self.send(batch)
        finally:
            self.budget.give_back(len(items))

    async def _dispatch(self, item: jsonrpc.Incoming) -> Response | None:
        """The response to one request (None for a notification)."""
        if isinstance(item, jsonrpc.ErrorResponse):
            return item
        request = item
        request_id = None if isinstance(request.id, msgspec.UnsetType) else request.id
        log = self.log.bind(method=request.method, request_id=request_id)
        response: Response
        try:
            # Encoded here, so that a result JSON cannot hold is this request's crash.
            result = msgspec.Raw(_ENCODER.encode(await self._call(request)))
        except SupervisorError as error:
            log.info("request failed", code=error.code, error=str(error))
            response = jsonrpc.error_response(request_id, error.code, str(error), error.data)
        except jsonrpc.RPCError as error:
            response = jsonrpc.error_response(request_id, error.code, error.message, error.data)
        except Exception as error:
            log.exception("request crashed")
            response = _internal_error(request_id, error)
        else:
            response = jsonrpc.result_response(request_id, result)
        return None if request.is_notification else response

    async def _call(self, request: jsonrpc.Request) -> Any:
        if request.method == "events.subscribe":
            params = jsonrpc.decode_params(request, api.SubscribeParams)
            return self._subscribe(params)
        if request.method == "events.unsubscribe":
            unsubscribe = jsonrpc.decode_params(request, api.UnsubscribeParams)
            self._unsubscribe(unsubscribe.subscription)
            return api.Empty()
        if request.method == "rpc.discover":
            jsonrpc.decode_params(request, api.NoParams)
            return openrpc_document()
        method = METHODS.get(request.method)
        if method is None:
            raise jsonrpc.RPCError(
                jsonrpc.ErrorCode.METHOD_NOT_FOUND,
                f"method not found: {request.method}",
                {"method": request.method},
            )
        decoded = jsonrpc.decode_params(request, method.params)
        authorize(self.privilege, request.method, decoded, self.sup.config)
        result = await method.handler(self.sup, decoded)
        if request.method == "supervisor.verify":
            # Only the server knows whether its socket is still reachable.
            problem = self.server.socket_problem()
            if problem is not None:
                result.problems.append(problem)
        return result

    def _subscribe(self, params: api.SubscribeParams) -> api.SubscribeResult:
        if self.closed:
            # Forwarding would keep the connection open when its end is due.
            raise jsonrpc.RPCError(
                jsonrpc.ErrorCode.INVALID_REQUEST,
                "Invalid request: the client's input has ended, and events with it",
            )
        subscription_id = next(self._subscription_ids)
        subscription = self.sup.bus.open(instances=params.instances, kinds=params.kinds)
        scope = anyio.CancelScope()
        self.subscriptions[subscription_id] = (subscription, scope)
        self.tg.start_soon(self._forward, subscription_id, subscription, scope)
        return api.SubscribeResult(subscription=subscription_id)

    def _unsubscribe(self, subscription_id: int) -> None:
        entry = self.subscriptions.pop(subscription_id, None)
        if entry is None:
            raise InvalidParams("subscription", f"no subscription {subscription_id}")
        subscription, scope = entry
        self.sup.bus.close(subscription)
        scope.cancel()

    async def _forward(
        self, subscription_id: int, subscription: Subscription, scope: anyio.CancelScope
    ) -> None:
        with scope:
            async for event in subscription:
                await self.send(
                    jsonrpc.encode_notification(
                        "event",
                        {
                            "subscription": subscription_id,
                            "instance": event.instance,
                            "kind": event.kind,
                            "timestamp": event.timestamp,
                            "data": event.data,
                        },
                    )
                )

    def close(self) -> None:
        """End the subscriptions: nothing is read any more, so none can be ended later."""
        self.closed = True
        for subscription, scope in self.subscriptions.values():
            self.sup.bus.close(subscription)
            scope.cancel()
        self.subscriptions.clear()


def _internal_error(request_id: jsonrpc.RequestId, error: Exception) -> jsonrpc.ErrorResponse:
    return jsonrpc.error_response(
        request_id,
        jsonrpc.ErrorCode.INTERNAL_ERROR,
        f"internal error: {type(error).__name__}: {error}",
    )


# The connection's raw socket is read and written directly: on asyncio, cancelling the
# socket stream's receive or send as the socket becomes ready makes anyio log an
# InvalidStateError, and connections see many cancellations (deadlines, cut clients).
async def _receive(sock: socket.socket) -> bytes | None:
    """What arrived (``b""`` at the end of stream), or None when the peer reset."""
    while True:
        await anyio.wait_readable(sock)
        try:
            return sock.recv(RECEIVE_BYTES)
        except BlockingIOError:
            continue
        except OSError:
            return None


async def _send_all(sock: socket.socket, data: bytes) -> None:
    """Send all of `data`; raises OSError when the peer is gone."""
    view = memoryview(data)
    while view:
        try:
            # MSG_NOSIGNAL: an embedding program may not ignore SIGPIPE as Python does.
            view = view[sock.send(view, socket.MSG_NOSIGNAL) :]
        except BlockingIOError:
            await anyio.wait_writable(sock)


async def _serve_connection(server: _ControlServer, stream: SocketStream) -> None:
    async with stream:  # closed whatever happens, a failing peer check included
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        try:
            pid, uid, gid = peer_uid_gid(sock)
            allowed = peer_allowed(uid, gid, server.sup.config.control_group)
        except Exception as error:
            _log.warning("connection refused: the peer check failed", error=repr(error))
            return
        log = _log.bind(peer_pid=pid, peer_uid=uid)
        if not allowed:
            log.warning("connection refused: not root, the daemon's user or in the control group")
            return
        async with anyio.create_task_group() as tg:
            connection = _Connection(server, sock, tg, log, privilege_of(uid))
            try:
                farewell = await connection.read_requests()
            finally:
                connection.close()
            # After the answers already going out; requests in flight still answer, and
            # the connection closes once they have (as at the end of the client's input).
            if farewell is not None:
                await connection.send(farewell)


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
            await _serve_connection(self, stream)
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
