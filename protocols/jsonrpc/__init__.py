"""JSON-RPC 2.0 over newline-framed lines: the control socket's codec (API.md §1, §2, §4).

Sans-IO and usable by other tools: :class:`LineFramer` cuts a byte stream into lines,
:func:`decode_incoming` turns a client's line into :class:`Request` items and the error
responses owed for unreadable ones, :func:`decode_params` decodes params with a method's
own msgspec type (failures become -32602 naming the field, e.g. ``spec.nics[1].mac``),
and :func:`encode_message` / :func:`encode_batch` / :func:`encode_notification` write
compact JSON lines. A server method raises :class:`RPCError` with an :class:`ErrorCode`.

A minimal client, for the CLI and tests::

    async with protocols.jsonrpc.connect_unix("/var/lib/kvm-supervisor/control.sock") as c:
        info = await c.call("instance.info", {"name": "vm1"})
        await c.call("events.subscribe", {"instances": ["vm1"]})
        async for notification in c.notifications():
            print(notification.params)
"""

from ._client import (
    DEFAULT_CLIENT_MAX_LINE_BYTES,
    DEFAULT_MAX_NOTIFICATIONS,
    NotificationStream,
    RPCClient,
    connect_socket,
    connect_unix,
)
from ._codec import (
    batch_too_large_response,
    decode_incoming,
    decode_params,
    decode_server_line,
    encode_batch,
    encode_message,
    encode_notification,
    error_response,
    field_path,
    invalid_params,
    line_timeout_response,
    oversize_response,
    result_response,
)
from ._errors import ErrorCode, ProtocolError, RPCConnectionLostError, RPCError
from ._framing import DEFAULT_MAX_LINE_BYTES, LineFramer, Oversize
from ._messages import (
    ErrorObject,
    ErrorResponse,
    EventParams,
    Incoming,
    IncomingLine,
    Notification,
    Request,
    RequestId,
    Response,
    ServerMessage,
)

__all__ = [
    "DEFAULT_CLIENT_MAX_LINE_BYTES",
    "DEFAULT_MAX_LINE_BYTES",
    "DEFAULT_MAX_NOTIFICATIONS",
    "ErrorCode",
    "ErrorObject",
    "ErrorResponse",
    "EventParams",
    "Incoming",
    "IncomingLine",
    "LineFramer",
    "Notification",
    "NotificationStream",
    "Oversize",
    "ProtocolError",
    "RPCClient",
    "RPCConnectionLostError",
    "RPCError",
    "Request",
    "RequestId",
    "Response",
    "ServerMessage",
    "batch_too_large_response",
    "connect_socket",
    "connect_unix",
    "decode_incoming",
    "decode_params",
    "decode_server_line",
    "encode_batch",
    "encode_message",
    "encode_notification",
    "error_response",
    "field_path",
    "invalid_params",
    "line_timeout_response",
    "oversize_response",
    "result_response",
]
