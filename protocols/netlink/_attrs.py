"""Netlink attributes (``struct nlattr``: length, type, payload padded to 4 bytes),
packed and parsed; sans-IO.

Only what rtnetlink requests and replies need: 8- and 32-bit integers, strings, raw
bytes (addresses) and nested attributes. Parsing keeps every attribute of a level, by
type, undecoded: a reader picks the few it wants, so a reply costs what is read of it.
"""

from __future__ import annotations

import errno
import struct
from typing import Final

from ._core import HEADER, ProtocolError

__all__ = [
    "attr",
    "message",
    "nested",
    "parse_attrs",
    "string",
    "string_of",
    "u8",
    "u8_of",
    "u32",
    "u32_of",
]

_ATTR: Final = struct.Struct("=HH")
_U8: Final = struct.Struct("=B")
_U32: Final = struct.Struct("=I")
_PADDING: Final = b"\0\0\0"
#: An attribute's type without its flags (``NLA_F_NESTED``, ``NLA_F_NET_BYTEORDER``).
_TYPE_MASK: Final = 0x3FFF


def attr(attr_type: int, payload: bytes) -> bytes:
    """One attribute, padded."""
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, attr_type) + payload + _PADDING[: -length % 4]


def u8(attr_type: int, value: int) -> bytes:
    return attr(attr_type, _U8.pack(value))


def u32(attr_type: int, value: int) -> bytes:
    return attr(attr_type, _U32.pack(value))


def string(attr_type: int, value: str) -> bytes:
    """A NUL-terminated string attribute (``NLA_NUL_STRING``, which ``NLA_STRING`` takes)."""
    return attr(attr_type, value.encode() + b"\0")


def nested(attr_type: int, *attrs: bytes) -> bytes:
    """Attributes inside one: without ``NLA_F_NESTED``, as iproute2 sends them (the
    kernel takes either for the attributes used here)."""
    return attr(attr_type, b"".join(attrs))


def message(msg_type: int, header: bytes, *attrs: bytes) -> bytes:
    """A whole netlink message: ``nlmsghdr`` (flags and sequence number left 0, for
    `Exchange.request` to stamp), the family's fixed `header`, then `attrs`."""
    body = header + b"".join(attrs)
    return HEADER.pack(HEADER.size + len(body), msg_type, 0, 0, 0) + body


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """The attributes of one level, from `offset` to the end of `data`: type (its flags
    masked off) -> payload; a type given twice keeps the last.

    :raises ProtocolError: an attribute overrunning `data` or shorter than its header.
    """
    found: dict[int, bytes] = {}
    end = len(data)
    while offset + _ATTR.size <= end:
        length, attr_type = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > end:
            raise ProtocolError(errno.EPROTO, f"a netlink attribute of {length} bytes")
        found[attr_type & _TYPE_MASK] = data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def u8_of(payload: bytes) -> int:
    return _integer(_U8, payload)


def u32_of(payload: bytes) -> int:
    return _integer(_U32, payload)


def _integer(layout: struct.Struct, payload: bytes) -> int:
    if len(payload) < layout.size:
        raise ProtocolError(errno.EPROTO, f"a {layout.size}-byte attribute of {len(payload)}")
    return int(layout.unpack_from(payload)[0])


def string_of(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace")
