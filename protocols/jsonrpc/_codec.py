"""Decoding and encoding of JSON-RPC 2.0 lines, without I/O.

Server side: :func:`decode_incoming` turns a line into requests and the error responses
owed for unreadable parts of it; :func:`decode_params` decodes a request's params with
the method's own type; the ``*_response`` helpers and :func:`encode_message`,
:func:`encode_batch` and :func:`encode_notification` produce the answers. Client side:
:func:`decode_server_line`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final, Literal, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from ._errors import ErrorCode, ProtocolError, RPCError
from ._messages import (
    ErrorObject,
    ErrorResponse,
    Incoming,
    IncomingLine,
    Notification,
    Request,
    RequestId,
    Response,
    ServerMessage,
)

T = TypeVar("T")

_ENCODER: Final = msgspec.json.Encoder()
_ENVELOPE_DECODER: Final = msgspec.json.Decoder(Request | list[msgspec.Raw])
_REQUEST_DECODER: Final = msgspec.json.Decoder(Request)
_PARAMS_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}
_NO_PARAMS: Final = b"{}"
_NAMED_FIELD: Final = re.compile(r"Object (?:missing required|contains unknown) field `([^`]*)`")


class _IdProbe(msgspec.Struct):
    """Reads only the id of a request that failed validation, to answer it by id."""

    id: RequestId = None


class _AnyServerMessage(msgspec.Struct):
    """Any message a server may send; :func:`_classify` tells which it is."""

    jsonrpc: Literal["2.0"]
    id: RequestId | UnsetType = UNSET
    result: Any | UnsetType = UNSET
    error: ErrorObject | UnsetType = UNSET
    method: str | UnsetType = UNSET
    params: Any = UNSET


_SERVER_DECODER: Final = msgspec.json.Decoder(_AnyServerMessage | list[_AnyServerMessage])


def decode_incoming(line: bytes, *, max_batch: int | None = None) -> IncomingLine:
    """Decode one line a client sent (without its ``\\n``).

    Never raises: malformed JSON (invalid UTF-8, nesting too deep to decode included)
    gives a -32700 error response, a message that is not a valid request (wrong envelope,
    ``params`` neither object nor array, an empty batch, a batch member that is not an
    object) a -32600 one, each batch member its own. A batch of more than ``max_batch``
    members gets one -32600 error (``data.max_batch``) and none of its members is decoded.
    Such error responses carry the request's id when it could be read, else ``null``; they
    are owed even to requests without an id. A blank line holds nothing.
    """
    if not line.strip():
        return IncomingLine([], is_batch=False)
    try:
        envelope = _ENVELOPE_DECODER.decode(line)
    except msgspec.ValidationError as exc:
        return IncomingLine([_unreadable(line, exc)], is_batch=False)
    except (msgspec.DecodeError, RecursionError) as exc:
        return IncomingLine([_parse_error(exc)], is_batch=False)
    if isinstance(envelope, Request):
        return IncomingLine([_checked(envelope)], is_batch=False)
    if not envelope:
        return IncomingLine(
            [error_response(None, ErrorCode.INVALID_REQUEST, "Invalid request: empty batch")],
            is_batch=False,
        )
    if max_batch is not None and len(envelope) > max_batch:
        return IncomingLine([batch_too_large_response(len(envelope), max_batch)], is_batch=False)
    return IncomingLine([_decode_member(member) for member in envelope], is_batch=True)


def _decode_member(member: msgspec.Raw) -> Incoming:
    # The envelope decoder already walked the member, so it nests shallowly enough.
    try:
        return _checked(_REQUEST_DECODER.decode(member))
    except msgspec.ValidationError as exc:
        return _unreadable(member, exc)


def _checked(request: Request) -> Incoming:
    params = request.params
    if params is not UNSET and bytes(memoryview(params)[:1]) not in (b"{", b"["):
        reason = "`params` must be an object or an array"
        return _invalid_request(request.id, reason)
    return request


def _unreadable(data: bytes | msgspec.Raw, exc: msgspec.ValidationError) -> ErrorResponse:
    """The answer to valid-looking JSON that is no request; msgspec reports the first
    problem it meets, which may come before a syntax error further on."""
    try:
        request_id = msgspec.json.decode(data, type=_IdProbe).id
    except msgspec.ValidationError:
        request_id = None
    except (msgspec.DecodeError, RecursionError) as syntax_error:
        return _parse_error(syntax_error)
    return _invalid_request(request_id, str(exc))


def _invalid_request(request_id: RequestId | UnsetType, reason: str) -> ErrorResponse:
    return error_response(
        request_id, ErrorCode.INVALID_REQUEST, f"Invalid request: {reason}", {"reason": reason}
    )


def _parse_error(exc: msgspec.DecodeError | RecursionError) -> ErrorResponse:
    reason = _decode_failure(exc)
    return error_response(None, ErrorCode.PARSE_ERROR, f"Parse error: {reason}", {"reason": reason})


def _decode_failure(exc: msgspec.DecodeError | RecursionError) -> str:
    # msgspec gives up on deep nesting with Python's RecursionError.
    return "JSON nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def decode_params(request: Request, params_type: type[T]) -> T:
    """Decode a request's params with the method's own type (absent params as ``{}``).

    :raises RPCError: -32602 naming the offending field (see :func:`invalid_params`), or
        for params that are no valid JSON (the envelope leaves them undecoded: invalid
        UTF-8 in a string, say), with ``data.path`` ``""``.
    """
    decoder = _PARAMS_DECODERS.get(params_type)
    if decoder is None:
        decoder = _PARAMS_DECODERS[params_type] = msgspec.json.Decoder(params_type)
    params = _NO_PARAMS if request.params is UNSET else request.params
    try:
        decoded: T = decoder.decode(params)
    except msgspec.ValidationError as exc:
        raise invalid_params(exc) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        reason = _decode_failure(exc)
        raise RPCError(
            ErrorCode.INVALID_PARAMS, f"Invalid params: {reason}", {"path": "", "reason": reason}
        ) from None
    return decoded


def invalid_params(exc: msgspec.ValidationError) -> RPCError:
    """The -32602 error for a params validation failure.

    ``data.path`` names the field in API.md's style (``spec.nics[1].mac``, ``""`` for the
    params as a whole; a missing or unknown field is named itself), ``data.reason`` is
    msgspec's message without its location.
    """
    path, reason = field_path(str(exc))
    where = f" (at {path})" if path else ""
    return RPCError(
        ErrorCode.INVALID_PARAMS,
        f"Invalid params: {reason}{where}",
        {"path": path, "reason": reason},
    )


def field_path(message: str) -> tuple[str, str]:
    """Split a msgspec validation message into the API-style field path and the reason.

    ``"Expected `int`, got `str` - at `$.spec.nics[1].mtu`"`` gives
    ``("spec.nics[1].mtu", "Expected `int`, got `str`")``.
    """
    reason, located, location = message.rpartition(" - at `$")
    if not located:
        reason = message
    path = location.removesuffix("`").removeprefix(".") if located else ""
    field = _NAMED_FIELD.fullmatch(reason)
    if field is not None:
        path = f"{path}.{field[1]}" if path else field[1]
    return path, reason


def error_response(
    request_id: RequestId | UnsetType, code: int, message: str, data: Any = None
) -> ErrorResponse:
    """An error response; ``data=None`` leaves ``data`` out.

    ``request_id`` may be a notification's absent id (``null`` then), so that a server can
    build its answer before checking :attr:`Request.is_notification`, which gets none.
    """
    error = ErrorObject(code=int(code), message=message, data=UNSET if data is None else data)
    return ErrorResponse(error=error, id=None if request_id is UNSET else request_id)


def result_response(request_id: RequestId | UnsetType, result: Any) -> Response:
    """A successful response; ``result`` is anything msgspec can encode (Structs too).

    ``request_id`` as for :func:`error_response`.
    """
    return Response(result=result, id=None if request_id is UNSET else request_id)


def oversize_response(max_line_bytes: int) -> ErrorResponse:
    """The -32600 answer to a line longer than ``max_line_bytes`` (API.md §1)."""
    return error_response(
        None,
        ErrorCode.INVALID_REQUEST,
        f"Invalid request: line longer than {max_line_bytes} bytes",
        {"max_bytes": max_line_bytes},
    )


def line_timeout_response(timeout_s: float) -> ErrorResponse:
    """The -32600 answer to a line not completed within ``timeout_s`` of its first byte;
    the connection is closed after it, like after an oversize line."""
    return error_response(
        None,
        ErrorCode.INVALID_REQUEST,
        f"Invalid request: line not completed within {timeout_s:g} s",
        {"timeout_s": timeout_s},
    )


def batch_too_large_response(size: int, max_batch: int) -> ErrorResponse:
    """The -32600 answer to a batch of more than ``max_batch`` requests."""
    return error_response(
        None,
        ErrorCode.INVALID_REQUEST,
        f"Invalid request: a batch of {size} requests, more than {max_batch}",
        {"max_batch": max_batch},
    )


def encode_message(message: Request | ServerMessage) -> bytes:
    """Compact JSON and a ``\\n``: one line of the control socket.

    :raises TypeError: a value msgspec cannot encode (``msgspec.EncodeError`` for some).
    """
    return _ENCODER.encode(message) + b"\n"


def encode_batch(responses: Sequence[Response | ErrorResponse]) -> bytes | None:
    """The line answering a batch; ``None`` when it owes nothing (only notifications)."""
    if not responses:
        return None
    return _ENCODER.encode(responses) + b"\n"


def encode_notification(method: str, params: Any) -> bytes:
    """A notification line, e.g. ``encode_notification("event", EventParams(...))``."""
    return encode_message(Notification(method=method, params=params))


def decode_server_line(line: bytes) -> list[ServerMessage]:
    """Decode one line the server sent (a message, or a batch answer).

    :raises ProtocolError: not JSON, or not a response or notification.
    """
    try:
        decoded = _SERVER_DECODER.decode(line)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"server sent an invalid line: {exc}") from None
    messages = decoded if isinstance(decoded, list) else [decoded]
    return [_classify(message) for message in messages]


def _classify(message: _AnyServerMessage) -> ServerMessage:
    if message.method is not UNSET:
        if message.id is not UNSET or message.result is not UNSET or message.error is not UNSET:
            raise ProtocolError("server sent a request")
        return Notification(method=message.method, params=message.params)
    if message.id is UNSET:
        raise ProtocolError("server sent a response without an id")
    if message.error is not UNSET:
        if message.result is not UNSET:
            raise ProtocolError("server sent a response with both result and error")
        return ErrorResponse(error=message.error, id=message.id)
    if message.result is UNSET:
        raise ProtocolError("server sent a response with neither result nor error")
    return Response(result=message.result, id=message.id)
