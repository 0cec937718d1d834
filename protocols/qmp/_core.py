"""The sans-IO QMP client protocol: bytes in, events out; commands in, bytes out.

:class:`QMPProtocol` does no I/O and reads no clock. Feed it what the socket delivered
with :meth:`~QMPProtocol.receive_data` (``b""`` means end of file), then call
:meth:`~QMPProtocol.next_event` until it returns :data:`NEED_DATA`. Encode commands with
:meth:`~QMPProtocol.send_command` and write the bytes yourself.

States (:class:`ConnectionState`)::

    AWAITING_GREETING --greeting--> NEGOTIATING --reply to qmp_capabilities--> READY
    any state --end of file--> CLOSED;  any state --ProtocolError--> BROKEN

Until READY, ``qmp_capabilities`` is the only command that may be sent.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final, Literal, TypeAlias

import msgspec

from ._errors import LocalProtocolError, ProtocolError

DEFAULT_MAX_LINE_BYTES: Final = 16 * 1024 * 1024
"""Longest message accepted (``query-qmp-schema`` is about 200 KB on QEMU 7.2)."""


class QMPVersion(msgspec.Struct, frozen=True):
    """QEMU's version, as announced in the greeting."""

    major: int
    minor: int
    micro: int
    package: str
    """The distribution's package version, e.g. ``"Debian 1:7.2+dfsg-7"``."""


class Greeting(msgspec.Struct, frozen=True):
    """The server's greeting: its version and the capabilities it offers."""

    version: QMPVersion
    capabilities: tuple[str, ...]


class ReturnReply(msgspec.Struct, frozen=True):
    """A successful reply: ``value`` is QEMU's ``return`` member."""

    id: int
    value: Any


class ErrorReply(msgspec.Struct, frozen=True):
    """An error reply to the command with this ``id``."""

    id: int
    error_class: str
    desc: str


class QMPEvent(msgspec.Struct, frozen=True):
    """An asynchronous event: ``timestamp`` is QEMU's, in seconds since the epoch."""

    name: str
    data: dict[str, Any]
    timestamp: float


class ConnectionClosed(msgspec.Struct, frozen=True):
    """The server closed the connection after a complete message."""


class _NeedData(enum.Enum):
    NEED_DATA = enum.auto()


NEED_DATA: Final = _NeedData.NEED_DATA
"""Returned by :meth:`QMPProtocol.next_event` when it needs more bytes."""

Event: TypeAlias = Greeting | ReturnReply | ErrorReply | QMPEvent | ConnectionClosed


class ConnectionState(enum.Enum):
    """Where a :class:`QMPProtocol` stands; see the module docstring for the table."""

    AWAITING_GREETING = enum.auto()
    NEGOTIATING = enum.auto()
    READY = enum.auto()
    CLOSED = enum.auto()
    BROKEN = enum.auto()


# What QEMU sends, decoded in one pass. Unknown members are ignored on purpose: QMP
# servers may add keys at any time.
class _WireVersionTriple(msgspec.Struct):
    major: int
    minor: int
    micro: int


class _WireVersion(msgspec.Struct):
    qemu: _WireVersionTriple
    package: str = ""


class _WireGreeting(msgspec.Struct):
    version: _WireVersion
    capabilities: list[str] = []


class _WireError(msgspec.Struct):
    error_class: str = msgspec.field(name="class")
    desc: str


class _WireTimestamp(msgspec.Struct):
    seconds: int
    microseconds: int


class _WireMessage(msgspec.Struct):
    QMP: _WireGreeting | None = None
    return_: Any = msgspec.field(name="return", default=msgspec.UNSET)
    error: _WireError | None = None
    id: int | None = None
    event: str | None = None
    data: dict[str, Any] = {}
    timestamp: _WireTimestamp | None = None


class _WireCommand(msgspec.Struct, omit_defaults=True):
    execute: str
    id: int
    arguments: Mapping[str, Any] | None = None


_DECODER: Final = msgspec.json.Decoder(_WireMessage)
_ENCODER: Final = msgspec.json.Encoder()

CAPABILITIES_COMMAND: Final = "qmp_capabilities"

_LINE_END: Final = b"\n"
_EXCERPT_BYTES: Final = 120


class QMPProtocol:
    """The client side of one QMP connection, without I/O.

    Command ids are integers allocated here; a reply must carry the id of a command
    sent and not yet answered, or it is a :class:`ProtocolError`. The core keeps
    waiting for replies its caller gave up on, so late replies are recognised as such.

    Args:
        max_line_bytes: longest message accepted, newline excluded.
    """

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._max_line_bytes = max_line_bytes
        self._state = ConnectionState.AWAITING_GREETING
        self._buffer = bytearray()
        self._line_start = 0
        self._scan_from = 0
        self._eof = False
        self._broken_reason = ""
        self._next_id = 0
        self._unanswered: set[int] = set()
        self._capabilities_id: int | None = None

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState`."""
        return self._state

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the socket; ``b""`` means the server closed it.

        Raises:
            LocalProtocolError: data after end of file.
        """
        if self._eof:
            raise LocalProtocolError("data received after end of file")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Event | Literal[_NeedData.NEED_DATA]:
        """Parse the next complete message, or return :data:`NEED_DATA`.

        Events that arrive before the greeting are returned like any other.
        Returns :class:`ConnectionClosed` (again on every call) once the server closed
        the connection and every complete message was returned.

        Raises:
            ProtocolError: malformed, over-long or unexpected message, an error reply
                without an id, or end of file in the middle of a message. The protocol
                is BROKEN from then on and every later call raises again.
        """
        if self._state is ConnectionState.BROKEN:
            raise ProtocolError(self._broken_reason)
        buffer = self._buffer
        line_end = buffer.find(_LINE_END, self._scan_from)
        if line_end < 0:
            return self._no_complete_line()
        line_start = self._line_start
        if line_end - line_start > self._max_line_bytes:
            raise self._break(f"message longer than {self._max_line_bytes} bytes")
        self._line_start = self._scan_from = line_end + 1
        line = buffer[line_start:line_end]
        try:
            message = _DECODER.decode(line)
        except msgspec.DecodeError as exc:
            raise self._break(f"malformed message ({exc}): {_excerpt(line)}") from None
        return self._classify(message, line)

    def send_command(
        self, command: str, arguments: Mapping[str, Any] | None = None
    ) -> tuple[int, bytes]:
        """Encode a command: return its id and the bytes to write, newline included.

        Raises:
            LocalProtocolError: the connection is closed or broken, or a command other
                than ``qmp_capabilities`` before negotiation completed.
            TypeError: ``arguments`` holds a value JSON cannot represent.
        """
        state = self._state
        if state is not ConnectionState.READY:
            if state is ConnectionState.CLOSED or state is ConnectionState.BROKEN:
                raise LocalProtocolError(f"cannot send {command!r}: connection {state.name}")
            if command != CAPABILITIES_COMMAND:
                raise LocalProtocolError(f"cannot send {command!r} before capabilities negotiation")
            if self._capabilities_id is not None:
                raise LocalProtocolError("qmp_capabilities is already in flight")
        command_id = self._next_id
        data = _ENCODER.encode(_WireCommand(command, command_id, arguments)) + _LINE_END
        self._next_id = command_id + 1
        self._unanswered.add(command_id)
        if state is not ConnectionState.READY:
            self._capabilities_id = command_id
        return command_id, data

    def _no_complete_line(self) -> ConnectionClosed | Literal[_NeedData.NEED_DATA]:
        buffer = self._buffer
        if len(buffer) - self._line_start > self._max_line_bytes:
            raise self._break(f"message longer than {self._max_line_bytes} bytes")
        if self._line_start:
            del buffer[: self._line_start]
            self._line_start = 0
        self._scan_from = len(buffer)
        if not self._eof:
            return NEED_DATA
        if buffer.strip():
            raise self._break(f"connection closed in the middle of a message: {_excerpt(buffer)}")
        self._state = ConnectionState.CLOSED
        return ConnectionClosed()

    def _classify(self, message: _WireMessage, line: bytearray) -> Event:
        if message.event is not None:
            if message.timestamp is None:
                raise self._break(f"event without a timestamp: {_excerpt(line)}")
            stamp = message.timestamp
            return QMPEvent(message.event, message.data, stamp.seconds + stamp.microseconds / 1e6)
        if message.error is not None:
            if message.id is None:
                # QEMU could not parse something we wrote, so it and we disagree on where
                # a command starts; no later reply can be matched with confidence.
                raise self._break(
                    f"error reply without an id, QEMU could not parse our input: "
                    f"{message.error.error_class}: {message.error.desc}"
                )
            self._check_reply_id(message.id, line)
            if message.id == self._capabilities_id:
                # A refused negotiation may be retried.
                self._capabilities_id = None
            return ErrorReply(message.id, message.error.error_class, message.error.desc)
        if message.return_ is not msgspec.UNSET:
            if message.id is None:
                raise self._break(f"reply without an id: {_excerpt(line)}")
            self._check_reply_id(message.id, line)
            if message.id == self._capabilities_id:
                self._state = ConnectionState.READY
                self._capabilities_id = None
            return ReturnReply(message.id, message.return_)
        if message.QMP is not None:
            if self._state is not ConnectionState.AWAITING_GREETING:
                raise self._break(f"unexpected second greeting: {_excerpt(line)}")
            self._state = ConnectionState.NEGOTIATING
            version = message.QMP.version
            return Greeting(
                QMPVersion(
                    version.qemu.major, version.qemu.minor, version.qemu.micro, version.package
                ),
                tuple(message.QMP.capabilities),
            )
        raise self._break(f"unrecognised message: {_excerpt(line)}")

    def _check_reply_id(self, command_id: int, line: bytearray) -> None:
        if self._state is ConnectionState.AWAITING_GREETING:
            raise self._break(f"reply before the greeting: {_excerpt(line)}")
        try:
            self._unanswered.remove(command_id)
        except KeyError:
            raise self._break(f"reply to a command never sent: {_excerpt(line)}") from None

    def _break(self, reason: str) -> ProtocolError:
        self._state = ConnectionState.BROKEN
        self._broken_reason = reason
        self._buffer.clear()
        return ProtocolError(reason)


def _excerpt(line: bytes | bytearray) -> str:
    if len(line) <= _EXCERPT_BYTES:
        return repr(bytes(line))
    return f"{bytes(line[:_EXCERPT_BYTES])!r}... ({len(line)} bytes)"
