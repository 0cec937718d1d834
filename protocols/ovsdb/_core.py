"""The sans-IO OVSDB client protocol (RFC 7047: JSON-RPC 1.0 over a stream).

OVSDB frames nothing: messages are JSON objects sent back to back, with or without
whitespace between them. :class:`JSONStreamSplitter` finds where each object ends by
tracking nesting outside strings; :class:`OVSDBProtocol` turns the objects into events
and requests into bytes. No I/O, no clock.

Feed :meth:`OVSDBProtocol.receive_data` what the socket delivered (``b""`` is end of
file), then call :meth:`OVSDBProtocol.next_event` until it returns :data:`NEED_DATA`.
Events: :class:`Reply` (a result or an error for one of our requests, by id),
:class:`Echo` (the server's keep-alive: write :meth:`OVSDBProtocol.answer_echo`'s bytes
at once or the server drops the connection), :class:`Notification` (``update``, ``locked``
and the like, id ``null``) and :class:`ConnectionClosed`. States::

    OPEN --end of file--> CLOSED;  OPEN --ProtocolError--> BROKEN
"""

from __future__ import annotations

import enum
import re
from typing import Any, Final, Literal, TypeAlias

import msgspec

from ._errors import LocalProtocolError, ProtocolError

DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
"""Longest message accepted: a ``get_schema`` answer is about 60 KB, a full ``monitor``
of a large switch some megabytes."""

_EXCERPT_BYTES: Final = 120
_NOT_WHITESPACE: Final = re.compile(rb"[^ \t\r\n]")
_STRUCTURAL: Final = re.compile(rb'[{}\[\]"]')
_IN_STRING: Final = re.compile(rb'["\\]')
_OPEN_BRACE: Final = ord("{")
_OPEN_BRACKET: Final = ord("[")
_QUOTE: Final = ord('"')
_BACKSLASH: Final = ord("\\")


class JSONStreamSplitter:
    """Cut a stream of concatenated JSON objects into one ``bytes`` per object.

    Only where an object ends is found here (brackets counted outside strings, escapes
    skipped); decoding, and rejecting what is no JSON, is left to the decoder. Anything
    but an object at the top level, or an object longer than ``max_message_bytes``, is a
    :exc:`ProtocolError`: where the next message starts is unknowable from then on.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._max = max_message_bytes
        self._buffer = bytearray()
        self._scan = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def holds_partial_message(self) -> bool:
        """Whether bytes of an unfinished message are buffered."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the messages they complete, in order.

        :raises ProtocolError: a top-level value that is no object, or an over-long one.
        """
        buffer = self._buffer
        buffer += data
        messages: list[bytes] = []
        start = 0
        index = self._scan
        depth = self._depth
        in_string = self._in_string
        escaped = self._escaped
        end = len(buffer)
        # Jumps from one byte that matters to the next: a message is scanned by the regex
        # engine, not byte by byte in Python.
        while index < end:
            if depth == 0:
                found = _NOT_WHITESPACE.search(buffer, index)
                if found is None:
                    index = start = end
                    break
                index = start = found.start()
                if buffer[index] != _OPEN_BRACE:
                    raise ProtocolError(f"expected a JSON object, got {_excerpt(buffer[index:])}")
            if escaped:
                # The previous chunk ended with the backslash; this byte is what it escapes.
                escaped = False
                index += 1
                continue
            found = (_IN_STRING if in_string else _STRUCTURAL).search(buffer, index)
            if found is None:
                index = end
                break
            index = found.start()
            byte = buffer[index]
            if byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = not in_string
            elif byte in (_OPEN_BRACE, _OPEN_BRACKET):
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    if index + 1 - start > self._max:
                        raise ProtocolError(f"message longer than {self._max} bytes")
                    messages.append(bytes(buffer[start : index + 1]))
                    start = index + 1
            index += 1
            if escaped and index < end:
                escaped = False
                index += 1
        if end - start > self._max:
            raise ProtocolError(f"message longer than {self._max} bytes")
        del buffer[:start]
        self._scan = index - start
        self._depth = depth
        self._in_string = in_string
        self._escaped = escaped
        return messages


class Reply(msgspec.Struct, frozen=True):
    """The answer to our request ``id``: ``error`` is ``None`` on success, else the
    server's error member (``result`` is then ``None``)."""

    id: int
    result: Any
    error: Any


class Echo(msgspec.Struct, frozen=True):
    """The server's ``echo`` keep-alive request; answer it with
    :meth:`OVSDBProtocol.answer_echo`."""

    id: Any
    params: Any


class Notification(msgspec.Struct, frozen=True):
    """A request from the server that expects no answer (``update``, ``locked``, ...)."""

    method: str
    params: Any


class ConnectionClosed(msgspec.Struct, frozen=True):
    """The server closed the connection after a complete message."""


class _NeedData(enum.Enum):
    NEED_DATA = enum.auto()


NEED_DATA: Final = _NeedData.NEED_DATA
"""Returned by :meth:`OVSDBProtocol.next_event` when it needs more bytes."""

Event: TypeAlias = Reply | Echo | Notification | ConnectionClosed


class ConnectionState(enum.Enum):
    """Where an :class:`OVSDBProtocol` stands; see the module docstring."""

    OPEN = enum.auto()
    CLOSED = enum.auto()
    BROKEN = enum.auto()


# JSON-RPC 1.0 as OVSDB speaks it: requests carry method, params and id (null for a
# notification); responses carry result, error and id, one of the first two null.
_ABSENT: Final = msgspec.UNSET


class _WireMessage(msgspec.Struct):
    method: str | msgspec.UnsetType = _ABSENT
    params: Any = _ABSENT
    result: Any = _ABSENT
    error: Any = _ABSENT
    id: Any = _ABSENT


class _WireRequest(msgspec.Struct):
    method: str
    params: Any
    id: Any


class _WireResponse(msgspec.Struct):
    result: Any
    error: None
    id: Any


_DECODER: Final = msgspec.json.Decoder(_WireMessage)
_ENCODER: Final = msgspec.json.Encoder()


class OVSDBProtocol:
    """The client side of one OVSDB connection, without I/O.

    Request ids are integers allocated here; a reply must carry the id of a request
    sent and not yet answered, or it is a :exc:`ProtocolError`.
    """

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._splitter = JSONStreamSplitter(max_message_bytes)
        self._messages: list[bytes] = []
        self._state = ConnectionState.OPEN
        self._eof = False
        self._broken_reason = ""
        self._next_id = 1
        self._unanswered: set[int] = set()

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState`."""
        return self._state

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the socket; ``b""`` means the server closed it.

        :raises LocalProtocolError: data after end of file.
        :raises ProtocolError: the bytes cannot be a stream of JSON objects.
        """
        if self._eof:
            raise LocalProtocolError("data received after end of file")
        if self._state is ConnectionState.BROKEN:
            raise ProtocolError(self._broken_reason)
        if not data:
            self._eof = True
            return
        try:
            self._messages.extend(self._splitter.feed(data))
        except ProtocolError as exc:
            raise self._break(str(exc)) from None

    def next_event(self) -> Event | Literal[_NeedData.NEED_DATA]:
        """The next complete message as an event, or :data:`NEED_DATA`.

        Returns :class:`ConnectionClosed` (on every call) once the server closed the
        connection and every message was returned.

        :raises ProtocolError: a malformed or unexpected message, or end of file inside a
            message; the protocol is BROKEN and every later call raises again.
        """
        if self._state is ConnectionState.BROKEN:
            raise ProtocolError(self._broken_reason)
        if not self._messages:
            if not self._eof:
                return NEED_DATA
            if self._splitter.holds_partial_message:
                raise self._break("connection closed in the middle of a message")
            self._state = ConnectionState.CLOSED
            return ConnectionClosed()
        data = self._messages.pop(0)
        try:
            message = _DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise self._break(f"malformed message ({exc}): {_excerpt(data)}") from None
        return self._classify(message, data)

    def send_request(self, method: str, params: list[Any]) -> tuple[int, bytes]:
        """Encode a request: return its id and the bytes to write.

        :raises LocalProtocolError: the connection is closed or broken.
        :raises TypeError: ``params`` holds something JSON cannot represent.
        """
        self._check_open(method)
        request_id = self._next_id
        data = _ENCODER.encode(_WireRequest(method, params, request_id))
        self._next_id += 1
        self._unanswered.add(request_id)
        return request_id, data

    def answer_echo(self, echo: Echo) -> bytes:
        """The bytes answering the server's ``echo``: its params, back, under its id."""
        self._check_open("echo")
        return _ENCODER.encode(_WireResponse(echo.params, None, echo.id))

    def _check_open(self, method: str) -> None:
        if self._state is not ConnectionState.OPEN or self._eof:
            raise LocalProtocolError(f"cannot send {method!r}: connection {self._state.name}")

    def _classify(self, message: _WireMessage, data: bytes) -> Event:
        if message.method is not _ABSENT:
            if message.params is _ABSENT or not isinstance(message.params, list):
                raise self._break(f"request without a params array: {_excerpt(data)}")
            if message.method == "echo" and message.id is not None:
                return Echo(message.id, message.params)
            if message.id is not None:
                # The client offers no methods but echo (RFC 7047 §4.1.11).
                raise self._break(f"unexpected request {message.method!r}: {_excerpt(data)}")
            return Notification(message.method, message.params)
        if message.result is _ABSENT or message.error is _ABSENT:
            raise self._break(f"response without result and error: {_excerpt(data)}")
        request_id = message.id
        if type(request_id) is not int or request_id not in self._unanswered:
            raise self._break(f"response to a request never sent: {_excerpt(data)}")
        self._unanswered.remove(request_id)
        if message.error is not None:
            return Reply(request_id, None, message.error)
        return Reply(request_id, message.result, None)

    def _break(self, reason: str) -> ProtocolError:
        self._state = ConnectionState.BROKEN
        self._broken_reason = reason
        self._messages.clear()
        return ProtocolError(reason)


def _excerpt(data: bytes | bytearray) -> str:
    if len(data) <= _EXCERPT_BYTES:
        return repr(bytes(data))
    return f"{bytes(data[:_EXCERPT_BYTES])!r}... ({len(data)} bytes)"
