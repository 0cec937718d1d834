"""Sans-IO line framing of the control socket: one JSON-RPC message (or batch) per line."""

from __future__ import annotations

from typing import Final

import msgspec

DEFAULT_MAX_LINE_BYTES: Final = 1024 * 1024


class Oversize(msgspec.Struct, frozen=True):
    """A line grew past the limit; API.md §1 answers -32600 and closes the connection."""

    max_line_bytes: int


class LineFramer:
    """Cut a byte stream into ``\\n``-terminated lines.

    :meth:`feed` returns the complete lines (without their ``\\n``) in order. A line
    longer than ``max_line_bytes`` (not counting the ``\\n``) yields :class:`Oversize` as
    soon as the limit is passed, without waiting for its end; the framer then discards
    everything, since where the next line starts is unknowable.
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._oversize = False
        self._end_of_stream = False

    @property
    def holds_partial_line(self) -> bool:
        """Whether the bytes received so far end inside a line (one yet to be completed)."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[bytes | Oversize]:
        """Add received bytes and return the lines they complete.

        ``b""`` means the end of stream: an unterminated last line is returned as a line
        (``printf '{...}' | socat`` sends no newline).

        :raises RuntimeError: data after the end of stream.
        """
        if self._end_of_stream:
            raise RuntimeError("received data after the end of stream")
        if self._oversize:
            return []
        buffer = self._buffer
        if not data:
            self._end_of_stream = True
            rest = bytes(buffer)
            buffer.clear()
            return [rest] if rest else []
        limit = self._max_line_bytes
        lines: list[bytes | Oversize] = []
        start = 0
        # The buffer held no newline before, so only the new bytes need searching.
        search_from = len(buffer)
        buffer += data
        newline = buffer.find(b"\n", search_from)
        while newline >= 0:
            if newline - start > limit:
                return self._overflow(lines)
            lines.append(bytes(buffer[start:newline]))
            start = newline + 1
            newline = buffer.find(b"\n", start)
        del buffer[:start]
        if len(buffer) > limit:
            return self._overflow(lines)
        return lines

    def _overflow(self, lines: list[bytes | Oversize]) -> list[bytes | Oversize]:
        self._oversize = True
        self._buffer.clear()
        lines.append(Oversize(self._max_line_bytes))
        return lines
