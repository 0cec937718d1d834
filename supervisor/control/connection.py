"""One control-socket connection: its requests (bounded, see `RequestBudget`), their
answers, and its event subscriptions.

A connection reads lines and starts a task per request, answering as each finishes,
while at most ``max_requests_per_connection`` requests are read and not yet answered
(batch members count one each): at the bound the connection is not read until answers
go out (backpressure), so a client that never reads its answers stalls only itself. A
partial line must be completed within ``request_line_timeout_s``; a connection idle
between requests is never timed out. A request that fails unexpectedly gets -32603 and
is logged; the connection lives on.
"""

from __future__ import annotations

import itertools
import math
import socket
from collections.abc import Callable
from typing import Any, Final

import anyio
import msgspec
from anyio.abc import SocketStream, TaskGroup

from protocols import jsonrpc
from protocols.sockets import receive_some, send_message
from supervisor.control.methods import METHODS
from supervisor.control.openrpc import openrpc_document
from supervisor.control.peers import peer_allowed, peer_uid_gid
from supervisor.control.privilege import Privilege, authorize, privilege_of
from supervisor.engine.events import Subscription
from supervisor.engine.supervisor import Supervisor
from supervisor.log import get_logger
from supervisor.model import api
from supervisor.model.errors import InvalidParams, SupervisorError

_log = get_logger(__name__)

Response = jsonrpc.Response | jsonrpc.ErrorResponse

#: Bytes read from a connection at once.
RECEIVE_BYTES: Final = 64 * 1024

_ENCODER: Final = msgspec.json.Encoder()


class RequestBudget:
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


class Connection:
    """One client connection: its requests, its subscriptions, its writer."""

    _subscription_ids = itertools.count(1)

    def __init__(
        self,
        sup: Supervisor,
        sock: socket.socket,
        tg: TaskGroup,
        *,
        log: Any,
        privilege: Privilege,
        socket_problem: Callable[[], str | None],
    ) -> None:
        self.sup = sup
        #: Why clients cannot reach the daemon through its socket path (for `verify`).
        self.socket_problem = socket_problem
        self.privilege = privilege
        self.sock = sock
        self.tg = tg
        self.send_lock = anyio.Lock()
        self.subscriptions: dict[int, tuple[Subscription, anyio.CancelScope]] = {}
        self.log = log
        self.budget = RequestBudget(self.sup.config.max_requests_per_connection)
        #: Cancelled when an answer cannot be sent: nobody reads them any more.
        self.reading = anyio.CancelScope()
        self.closed = False

    async def send(self, payload: bytes) -> None:
        """Send one line; a peer that is gone just misses it (its requests still finish)."""
        async with self.send_lock:
            try:
                await send_message(self.sock, payload)
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
                    try:
                        data = await receive_some(self.sock, RECEIVE_BYTES)
                    except OSError:  # the peer reset: nobody reads answers any more
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
            problem = self.socket_problem()
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


async def serve_connection(
    sup: Supervisor, stream: SocketStream, socket_problem: Callable[[], str | None]
) -> None:
    """Serve one accepted connection until the client is done (see the module docstring)."""
    async with stream:  # closed whatever happens, a failing peer check included
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        try:
            pid, uid, gid = peer_uid_gid(sock)
            allowed = peer_allowed(uid, gid, sup.config.control_group)
        except Exception as error:
            _log.warning("connection refused: the peer check failed", error=repr(error))
            return
        log = _log.bind(peer_pid=pid, peer_uid=uid)
        if not allowed:
            log.warning("connection refused: not root, the daemon's user or in the control group")
            return
        async with anyio.create_task_group() as tg:
            connection = Connection(
                sup, sock, tg, log=log, privilege=privilege_of(uid), socket_problem=socket_problem
            )
            try:
                farewell = await connection.read_requests()
            finally:
                connection.close()
            # After the answers already going out; requests in flight still answer, and
            # the connection closes once they have (as at the end of the client's input).
            if farewell is not None:
                await connection.send(farewell)
