"""Sans-IO framing of QEMU's human monitor (HMP) as served on a ``-monitor unix:`` socket.

The monitor is a line editor talking to a terminal: it greets with a banner, prints the
prompt ``(qemu) ``, echoes every byte it reads (redrawing the whole line after each one,
with ANSI escapes) and, on a newline, runs the command, prints its output and prints the
prompt again. A reply is therefore: the echo up to the first newline, the output, and a
prompt at the start of a line. Commands may not hold control characters, so the only
thing that can start a line with the prompt is the monitor itself.

:class:`HMPConnection` holds no socket and no clock: feed it the bytes read from the
monitor with :meth:`~HMPConnection.receive_data`, collect events with
:meth:`~HMPConnection.next_event`, and write what :meth:`~HMPConnection.send_command`
returns. Replies are matched to commands in order, so commands may be pipelined, and a
reply the caller gave up on (:meth:`~HMPConnection.abandon_pending`) comes out marked
``abandoned`` instead of being taken for the next command's.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from typing import Final, Literal

import msgspec

__all__ = [
    "DEFAULT_MAX_REPLY_BYTES",
    "MAX_COMMAND_BYTES",
    "NEED_DATA",
    "Banner",
    "Closed",
    "Event",
    "HMPCommandError",
    "HMPConnection",
    "HMPError",
    "HMPProtocolError",
    "NeedData",
    "Reply",
    "clean_output",
    "encode_command",
    "is_error_output",
]

PROMPT: Final = b"(qemu) "
# QEMU's line editor keeps 4095 bytes of a line and silently drops the rest, which would
# run a different command from the one asked for.
MAX_COMMAND_BYTES: Final = 4095
DEFAULT_MAX_REPLY_BYTES: Final = 16 * 1024 * 1024

_LINE_PROMPT: Final = b"\n" + PROMPT
_BANNER_START: Final = b"QEMU "
# CSI sequences (cursor moves, line erase), other escape sequences, and every C0 control
# but tab and newline (the monitor ends lines with CRLF).
_TERMINAL_CONTROL: Final = re.compile(
    rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[ -/]*[0-~]|[\x00-\x08\x0b-\x1f\x7f]"
)
_FORBIDDEN_IN_COMMAND: Final = re.compile(r"[\x00-\x1f\x7f]")
# HMP has no error channel: these are the shapes QEMU 7.2 gives its failures (hmp
# error reports, argument parser complaints, unknown commands and sub-commands).
_ERROR_FIRST_LINE: Final = re.compile(
    r"Error: |unknown command: |Device '.*' not found|Could not |invalid parameter"
)
_ERROR_ANY_LINE: Final = re.compile(r'^Try "help .*" for more information$', re.MULTILINE)


class HMPError(Exception):
    """Base class of the human monitor errors."""


class HMPProtocolError(HMPError):
    """The peer does not speak HMP (no banner), or a reply outgrew the size limit."""


class HMPCommandError(HMPError):
    """The monitor answered a command with an error message.

    :ivar command: the command as sent.
    :ivar output: the monitor's message (terminal controls removed).
    """

    def __init__(self, command: str, output: str) -> None:
        super().__init__(f"{command!r} failed: {output}")
        self.command = command
        self.output = output


class NeedData(enum.Enum):
    """Sentinel type of :data:`NEED_DATA`."""

    NEED_DATA = enum.auto()


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by :meth:`HMPConnection.next_event` when more bytes must be received."""


class Banner(msgspec.Struct, frozen=True):
    """The monitor's greeting line, e.g. ``QEMU 7.2.22 monitor - type 'help' ...``."""

    text: str


class Reply(msgspec.Struct, frozen=True):
    """The output of one command, echo and terminal controls removed.

    ``output`` has ``\\n`` line ends and no final newline. ``abandoned`` is true for the
    reply of a command whose caller gave up waiting (see
    :meth:`HMPConnection.abandon_pending`).
    """

    command: str
    output: str
    abandoned: bool = False


class Closed(msgspec.Struct, frozen=True):
    """The monitor closed the connection; every event before it has been returned."""


Event = Banner | Reply | Closed


class _PendingCommand:
    __slots__ = ("abandoned", "command")

    def __init__(self, command: str) -> None:
        self.command = command
        self.abandoned = False


def encode_command(command: str) -> bytes:
    """Return the bytes that submit ``command`` to the monitor's line editor.

    :raises ValueError: the command holds a newline or another control character (the
        line editor would act on it: complete, recall history, submit early), or is
        longer than :data:`MAX_COMMAND_BYTES` in UTF-8.
    """
    forbidden = _FORBIDDEN_IN_COMMAND.search(command)
    if forbidden is not None:
        raise ValueError(f"HMP command holds control character {forbidden.group()!r}: {command!r}")
    encoded = command.encode()
    if len(encoded) > MAX_COMMAND_BYTES:
        raise ValueError(
            f"HMP command is {len(encoded)} bytes long, the monitor keeps {MAX_COMMAND_BYTES}"
        )
    return encoded + b"\n"


def clean_output(raw: bytes) -> str:
    """Turn monitor output into text: terminal controls and CRs removed, final newline cut."""
    text = _TERMINAL_CONTROL.sub(b"", raw).decode(errors="replace")
    return text.removesuffix("\n")


def is_error_output(output: str) -> bool:
    """Whether cleaned monitor output is one of the monitor's error messages."""
    return _ERROR_FIRST_LINE.match(output) is not None or _ERROR_ANY_LINE.search(output) is not None


class HMPConnection:
    """The client side of one monitor connection, without I/O.

    Starts expecting the banner. Each :meth:`send_command` queues one expected reply;
    :meth:`next_event` yields :class:`Banner` once, then one :class:`Reply` per command in
    the order sent, :class:`Closed` once the end of stream has been received and nothing
    more can be framed, and :data:`NEED_DATA` otherwise.

    :param max_reply_bytes: the longest banner or command output kept in memory; longer
        ones raise :exc:`HMPProtocolError` (the echo is never kept, whatever its length).
    """

    def __init__(self, *, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> None:
        self._max_reply_bytes = max_reply_bytes
        self._buffer = bytearray()
        self._prompt_search_from = 0
        self._banner_received = False
        self._echo_pending = True
        self._pending: deque[_PendingCommand] = deque()
        self._end_of_stream = False
        self._error: HMPProtocolError | None = None

    @property
    def replies_pending(self) -> int:
        """How many sent commands have not had their reply returned yet."""
        return len(self._pending)

    @property
    def abandoned_pending(self) -> bool:
        """Whether a reply still to come belongs to a command its caller gave up on."""
        return any(pending.abandoned for pending in self._pending)

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the monitor; ``b""`` means the end of stream.

        :raises RuntimeError: data after the end of stream.
        """
        if self._end_of_stream:
            raise RuntimeError("received data after the end of stream")
        if data:
            self._buffer += data
        else:
            self._end_of_stream = True

    def send_command(self, command: str) -> bytes:
        """Queue the reply of ``command`` and return the bytes to write for it.

        Bytes received while no reply was pending cannot belong to this command's reply
        and are dropped here.

        :raises ValueError: see :func:`encode_command`.
        """
        data = encode_command(command)
        if self._banner_received and not self._pending:
            self._buffer.clear()
            self._prompt_search_from = 0
        self._pending.append(_PendingCommand(command))
        return data

    def abandon_pending(self) -> None:
        """Mark every pending reply as abandoned: it will come out with ``abandoned=True``."""
        for pending in self._pending:
            pending.abandoned = True

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """Return the next event framed from the received bytes.

        :raises HMPProtocolError: the peer is not an HMP monitor, or a reply is too long;
            the connection is then unusable and every later call raises it again.
        """
        if self._error is not None:
            raise self._error
        try:
            event = self._frame_next()
        except HMPProtocolError as exc:
            self._error = exc
            raise
        if event is NEED_DATA and self._end_of_stream:
            return Closed()
        return event

    def _frame_next(self) -> Event | Literal[NeedData.NEED_DATA]:
        if not self._banner_received:
            return self._frame_banner()
        if not self._pending:
            return NEED_DATA
        if self._echo_pending:
            echo_end = self._buffer.find(b"\n")
            if echo_end < 0:
                self._buffer.clear()
                return NEED_DATA
            del self._buffer[: echo_end + 1]
            self._echo_pending = False
        output_end = self._find_prompt()
        if output_end is None:
            return NEED_DATA
        output = bytes(self._buffer[:output_end])
        del self._buffer[: output_end + len(PROMPT)]
        self._prompt_search_from = 0
        self._echo_pending = True
        pending = self._pending.popleft()
        return Reply(pending.command, clean_output(output), pending.abandoned)

    def _frame_banner(self) -> Banner | Literal[NeedData.NEED_DATA]:
        if not (self._buffer.startswith(_BANNER_START) or _BANNER_START.startswith(self._buffer)):
            line = bytes(self._buffer[:80]).partition(b"\n")[0]
            raise HMPProtocolError(f"not a QEMU human monitor; it greeted with {line!r}")
        banner_end = self._find_prompt()
        if banner_end is None:
            return NEED_DATA
        banner = clean_output(bytes(self._buffer[:banner_end]))
        del self._buffer[: banner_end + len(PROMPT)]
        self._prompt_search_from = 0
        self._banner_received = True
        return Banner(banner)

    def _find_prompt(self) -> int | None:
        """Offset where a prompt starting a line begins, or None if none has come yet.

        :raises HMPProtocolError: the text before the prompt is, or is bound to be, longer
            than the limit (however the bytes were chunked).
        """
        buffer = self._buffer
        if buffer.startswith(PROMPT):
            return 0
        found = buffer.find(_LINE_PROMPT, self._prompt_search_from)
        # A prompt within the limit would be complete at this length.
        if (found < 0 and len(buffer) >= self._max_reply_bytes + len(PROMPT)) or (
            found >= self._max_reply_bytes
        ):
            raise HMPProtocolError(f"monitor reply exceeds {self._max_reply_bytes} bytes")
        if found >= 0:
            return found + 1
        self._prompt_search_from = max(0, len(buffer) - len(_LINE_PROMPT) + 1)
        return None
