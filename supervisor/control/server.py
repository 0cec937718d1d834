"""The control socket: JSON-RPC 2.0 over a unix stream socket (API.md §1, §2, §4).

One line per message; many requests in flight per connection (each runs in its
own task, responses go out as they finish); batches; notifications; event
subscriptions forwarded as ``event`` notifications through bounded queues. The
peer's credentials are checked (SO_PEERCRED) before anything is read; what a permitted
peer may ask depends on who it is (`supervisor.control.privilege`). A request
that fails in an unexpected way gets -32603 and is logged; the daemon keeps
serving.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import os
import pwd
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketStream, TaskGroup, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from protocols import jsonrpc
from supervisor.control.methods import METHODS
from supervisor.control.openrpc import openrpc_document
from supervisor.control.privilege import Privilege, authorize, privilege_of
from supervisor.engine.events import Subscription
from supervisor.engine.supervisor import Supervisor
from supervisor.log import get_logger
from supervisor.model import api
from supervisor.model.errors import InvalidParams, SupervisorError

_log = get_logger(__name__)

Response = jsonrpc.Response | jsonrpc.ErrorResponse

#: Pause after a failed accept (out of descriptors), so the loop does not spin.
ACCEPT_RETRY_S = 0.1


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


class _Connection:
    """One client connection: its requests, its subscriptions, its writer."""

    _subscription_ids = itertools.count(1)

    def __init__(
        self, sup: Supervisor, stream: SocketStream, tg: TaskGroup, privilege: Privilege
    ) -> None:
        self.sup = sup
        self.privilege = privilege
        self.stream = stream
        self.tg = tg
        self.send_lock = anyio.Lock()
        self.subscriptions: dict[int, tuple[Subscription, anyio.CancelScope]] = {}
        self.log = _log

    async def send(self, payload: bytes) -> None:
        """Send one line; a peer that is gone just misses it (its requests still finish)."""
        async with self.send_lock:
            try:
                await self.stream.send(payload)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self.log.debug("reply dropped: the client is gone")

    async def handle_line(self, line: bytes) -> None:
        incoming = jsonrpc.decode_incoming(line)
        if incoming.is_batch:
            self.tg.start_soon(self._answer_batch, incoming.items)
            return
        for item in incoming.items:
            self.tg.start_soon(self._answer_one, item)

    async def _answer_one(self, item: jsonrpc.Incoming) -> None:
        response = await self._dispatch(item)
        if response is not None:
            await self.send(jsonrpc.encode_message(response))

    async def _answer_batch(self, items: list[jsonrpc.Incoming]) -> None:
        responses: list[Response | None] = [None] * len(items)

        async def answer(index: int, item: jsonrpc.Incoming) -> None:
            responses[index] = await self._dispatch(item)

        async with anyio.create_task_group() as tg:
            for index, item in enumerate(items):
                tg.start_soon(answer, index, item)
        batch = jsonrpc.encode_batch([r for r in responses if r is not None])
        if batch is not None:
            await self.send(batch)

    async def _dispatch(self, item: jsonrpc.Incoming) -> Response | None:
        """The response to one request (None for a notification)."""
        if isinstance(item, jsonrpc.ErrorResponse):
            return item
        request = item
        request_id = None if isinstance(request.id, msgspec.UnsetType) else request.id
        log = self.log.bind(method=request.method, request_id=request_id)
        response: Response
        try:
            result = await self._call(request)
        except SupervisorError as error:
            log.info("request failed", code=error.code, error=str(error))
            response = jsonrpc.error_response(request_id, error.code, str(error), error.data)
        except jsonrpc.RPCError as error:
            response = jsonrpc.error_response(request_id, error.code, error.message, error.data)
        except Exception as error:
            log.exception("request crashed")
            response = jsonrpc.error_response(
                request_id,
                jsonrpc.ErrorCode.INTERNAL_ERROR,
                f"internal error: {type(error).__name__}: {error}",
            )
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
        return await method.handler(self.sup, decoded)

    def _subscribe(self, params: api.SubscribeParams) -> api.SubscribeResult:
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
        for subscription, scope in self.subscriptions.values():
            self.sup.bus.close(subscription)
            scope.cancel()
        self.subscriptions.clear()


async def _serve_connection(sup: Supervisor, stream: SocketStream) -> None:
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    pid, uid, gid = peer_uid_gid(sock)
    log = _log.bind(peer_pid=pid, peer_uid=uid)
    async with stream:
        if not peer_allowed(uid, gid, sup.config.control_group):
            log.warning("connection refused: not root, the daemon's user or in the control group")
            return
        receiver = BufferedByteReceiveStream(stream)
        max_bytes = sup.config.max_request_bytes
        async with anyio.create_task_group() as tg:
            connection = _Connection(sup, stream, tg, privilege_of(uid))
            oversize = False
            try:
                while True:
                    try:
                        line = await receiver.receive_until(b"\n", max_bytes)
                    except anyio.DelimiterNotFound:
                        oversize = True
                        reply = jsonrpc.oversize_response(max_bytes)
                        await connection.send(jsonrpc.encode_message(reply))
                        break
                    except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
                        # The client is done sending (`echo ... | socat` half-closes):
                        # requests in flight still run and answer.
                        break
                    if line.strip():
                        await connection.handle_line(line)
            finally:
                connection.close()
                if oversize:
                    tg.cancel_scope.cancel()


@asynccontextmanager
async def serve_control(sup: Supervisor, path: Path | None = None) -> AsyncIterator[Path]:
    """Serve the control socket (mode 0660, control group) for the block's duration.

    ``path`` defaults to ``<state_dir>/control.sock``. The engine never imports
    this module: the daemon (or an embedding program) composes the two,
    ``async with Supervisor(cfg) as sup, serve_control(sup):``, so the socket
    serves only once every instance the state dir knows is registered.
    """
    path = sup.config.control_socket if path is None else path
    async with anyio.create_task_group() as tg:
        await tg.start(_serve, sup, path)
        try:
            yield path
        finally:
            tg.cancel_scope.cancel()


async def _serve(
    sup: Supervisor, path: Path, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    listener = await anyio.create_unix_listener(path)
    try:
        os.chmod(path, 0o660)
        if sup.config.control_group != "root":
            os.chown(path, -1, grp.getgrnam(sup.config.control_group).gr_gid)
        task_status.started()

        async def handle(stream: SocketStream) -> None:
            try:
                await _serve_connection(sup, stream)
            except Exception:
                _log.exception("connection handler crashed")

        async with anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as error:  # EMFILE and friends: keep serving the others
                    _log.error("accept failed", error=str(error))
                    await anyio.sleep(ACCEPT_RETRY_S)
                    continue
                tg.start_soon(handle, stream)
    finally:
        await listener.aclose()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
