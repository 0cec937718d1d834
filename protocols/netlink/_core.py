"""Netlink requests and their replies, sans-IO: framing, sequence numbers, acks, errors.

A netlink socket carries datagrams of one or more messages, each behind a ``nlmsghdr``
(length, type, flags, sequence number, port id). One :class:`Exchange` is one request:
:meth:`Exchange.request` stamps the request's flags and sequence number into the
message the caller encoded; :meth:`Exchange.receive` takes each datagram read from the
socket, keeps the replies carrying that sequence number and skips any other (those of an
exchange abandoned earlier on the same socket). States::

    WAITING --the ack (NLMSG_ERROR, error 0) or NLMSG_DONE--> DONE
    WAITING --NLMSG_ERROR with an errno, or NLMSG_DONE with one--> DONE, and
                                         `result` raises `NetlinkError`
    WAITING --ProtocolError (a malformed or over-long reply)--> BROKEN

A request that is no dump always asks for an ack (``NLM_F_ACK``): its end is the ack,
after the one reply a ``get`` has. A dump ends with ``NLMSG_DONE``. The kernel's own
words for a refusal (extended acks, ``NETLINK_EXT_ACK``) go into the error's message.
No I/O, no clock.
"""

from __future__ import annotations

import enum
import errno
import os
import struct
from collections.abc import Callable
from typing import Final

__all__ = [
    "DEFAULT_MAX_REPLIES",
    "HEADER",
    "NLM_F_CREATE",
    "NLM_F_EXCL",
    "NLM_F_REPLACE",
    "Exchange",
    "NetlinkError",
    "ProtocolError",
    "attribute",
    "attributes",
]

#: ``struct nlmsghdr``: length, type, flags, sequence number, port id (host order).
HEADER: Final = struct.Struct("=IHHII")
#: ``struct nlmsgerr``'s error (a negative errno, 0 for an ack); the header of the
#: request follows it (and, without ``NETLINK_CAP_ACK``, the request's payload).
_ERROR: Final = struct.Struct("=i")
#: ``struct nlattr``: length, type.
_ATTR: Final = struct.Struct("=HH")
#: An attribute's type without ``NLA_F_NESTED`` and ``NLA_F_NET_BYTEORDER``.
_NLA_TYPE_MASK: Final = 0x3FFF

NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4
NLM_F_REQUEST: Final = 0x01
NLM_F_MULTI: Final = 0x02
NLM_F_ACK: Final = 0x04
NLM_F_DUMP: Final = 0x300
#: On a ``NEW`` request: replace what exists, create what does not, or refuse to.
NLM_F_REPLACE: Final = 0x100
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400
#: On an ack: the request was not echoed (``NETLINK_CAP_ACK``), and attributes follow.
NLM_F_CAPPED: Final = 0x100
NLM_F_ACK_TLVS: Final = 0x200
NLMSGERR_ATTR_MSG: Final = 1
_ALIGN: Final = 4

DEFAULT_MAX_REPLIES: Final = 4096
"""Most replies an exchange keeps (a dump of every address of one interface, or of the
routes a filter selects); more is a :exc:`ProtocolError`, so that a huge dump (a router's
full table) never fills memory."""


class NetlinkError(OSError):
    """The kernel refused a request: ``errno`` is its error; the message adds the
    kernel's extended ack, when it gave one (``Device is not a bridge``, say)."""

    def __init__(self, code: int, detail: str = "") -> None:
        strerror = os.strerror(code)
        super().__init__(code, f"{strerror} ({detail})" if detail else strerror)
        self.detail = detail


class ProtocolError(OSError):
    """A reply that breaks netlink's framing, or more replies than the bound allows; the
    socket's remaining datagrams can no longer be trusted (``errno`` ``EPROTO`` or
    ``EMSGSIZE``)."""


class _State(enum.Enum):
    WAITING = "waiting"
    DONE = "done"
    BROKEN = "broken"


def _align(length: int) -> int:
    return (length + _ALIGN - 1) & ~(_ALIGN - 1)


class Exchange:
    """One request and what the kernel answers to it.

    `seq` is the request's sequence number (a socket's own counter: see
    :meth:`next_seq`); `dump` marks a dump (``NLM_F_DUMP``, ends with ``NLMSG_DONE``),
    otherwise the request asks for an ack. `keep`, when given, is asked of every reply
    (the whole message, header included) and only those it accepts are kept: a dump's
    filter that needs no decoding. At most `max_replies` are kept.
    """

    def __init__(
        self,
        seq: int,
        *,
        dump: bool = False,
        keep: Callable[[bytes], bool] | None = None,
        max_replies: int = DEFAULT_MAX_REPLIES,
    ) -> None:
        self.seq = seq
        self.dump = dump
        self._keep = keep
        self._max_replies = max_replies
        self._state = _State.WAITING
        self._replies: list[bytes] = []
        self._error: NetlinkError | None = None

    @staticmethod
    def next_seq(seq: int) -> int:
        """The sequence number after `seq` (32 bits, never 0: the kernel's own)."""
        return seq % 0xFFFFFFFF + 1

    @property
    def done(self) -> bool:
        """Whether the exchange has ended (with its ack, its ``NLMSG_DONE`` or an error)."""
        return self._state is _State.DONE

    def request(self, message: bytes, flags: int = 0) -> bytes:
        """`message` (a whole netlink message, its header's length and type set, as an
        encoder writes it) with this exchange's flags, the request's
        own `flags` (``NLM_F_CREATE``...) and its sequence number; the port id is left to
        the kernel (0)."""
        length, msg_type, _flags, _seq, _pid = HEADER.unpack_from(message)
        if length != len(message):
            raise ValueError(f"the header says {length} bytes, the message has {len(message)}")
        flags |= NLM_F_REQUEST | (NLM_F_DUMP if self.dump else NLM_F_ACK)
        return HEADER.pack(length, msg_type, flags, self.seq, 0) + message[HEADER.size :]

    def receive(self, datagram: bytes | memoryview) -> None:
        """Take one datagram read from the socket (whatever it carries: replies to this
        request, to an abandoned one, or nothing of ours).

        :raises ProtocolError: a message that overruns the datagram or is shorter than
            its header, an error message cut short, or more than `max_replies` kept.
        """
        if self._state is not _State.WAITING:
            raise ProtocolError(errno.EPROTO, f"the exchange is {self._state.value}")
        try:
            self._receive(datagram)
        except ProtocolError:
            self._state = _State.BROKEN
            raise

    def _receive(self, datagram: bytes | memoryview) -> None:
        offset, end = 0, len(datagram)
        while offset + HEADER.size <= end and self._state is _State.WAITING:
            length, msg_type, flags, seq, _pid = HEADER.unpack_from(datagram, offset)
            if length < HEADER.size or offset + length > end:
                raise ProtocolError(
                    errno.EPROTO, f"a netlink message of {length} bytes in {end - offset}"
                )
            message = datagram[offset : offset + length]
            offset += _align(length)
            if seq != self.seq or msg_type in (NLMSG_NOOP, NLMSG_OVERRUN):
                continue
            if msg_type == NLMSG_ERROR:
                self._ack(message, flags)
            elif msg_type == NLMSG_DONE:
                self._done(message)
            else:
                reply = bytes(message)
                if self._keep is not None and not self._keep(reply):
                    continue
                if len(self._replies) >= self._max_replies:
                    raise ProtocolError(
                        errno.EMSGSIZE, f"more than {self._max_replies} netlink replies"
                    )
                self._replies.append(reply)

    def _done(self, message: bytes | memoryview) -> None:
        # The end of a dump carries its status: an error when the dump failed midway.
        self._state = _State.DONE
        if len(message) >= HEADER.size + _ERROR.size:
            (error,) = _ERROR.unpack_from(message, HEADER.size)
            if error < 0:
                self._error = NetlinkError(-error)

    def _ack(self, message: bytes | memoryview, flags: int) -> None:
        if len(message) < HEADER.size + _ERROR.size:
            raise ProtocolError(errno.EPROTO, "a netlink error message without its error")
        (error,) = _ERROR.unpack_from(message, HEADER.size)
        self._state = _State.DONE
        if error == 0:
            return
        detail = ""
        if flags & NLM_F_ACK_TLVS:
            # The request's header (and, unless capped, its payload) comes before them.
            echoed = HEADER.size
            if not flags & NLM_F_CAPPED and len(message) >= 2 * HEADER.size + _ERROR.size:
                echoed = HEADER.unpack_from(message, HEADER.size + _ERROR.size)[0]
            detail = _ack_message(message, HEADER.size + _ERROR.size + _align(echoed))
        self._error = NetlinkError(-error, detail)

    def result(self) -> list[bytes]:
        """The replies kept (whole messages, header included), once `done`.

        :raises NetlinkError: the kernel refused the request.
        """
        if self._state is not _State.DONE:
            raise ProtocolError(errno.EPROTO, f"the exchange is {self._state.value}")
        if self._error is not None:
            raise self._error
        return self._replies


def _ack_message(message: bytes | memoryview, offset: int) -> str:
    """The text of an extended ack's ``NLMSGERR_ATTR_MSG`` from `offset` on, or ""."""
    text = attributes(message, offset).get(NLMSGERR_ATTR_MSG)
    return "" if text is None else bytes(text).split(b"\0", 1)[0].decode(errors="replace")


def attribute(attr_type: int, payload: bytes) -> bytes:
    """A ``struct nlattr`` of `attr_type` and its `payload`, padded to 4 bytes."""
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, attr_type) + payload + bytes(-length % 4)


def attributes(message: bytes | memoryview, offset: int) -> dict[int, memoryview]:
    """The attributes (``struct nlattr``) from `offset` to the end of `message`: type ->
    payload, the first of each type; the type's flag bits (``NLA_F_NESTED``,
    ``NLA_F_NET_BYTEORDER``) cleared. A nested attribute's payload is walked the same
    way (`offset` 0). Stops at the first attribute that does not fit."""
    view = memoryview(message)
    end = len(view)
    found: dict[int, memoryview] = {}
    while offset + _ATTR.size <= end:
        length, attr_type = _ATTR.unpack_from(view, offset)
        if length < _ATTR.size or offset + length > end:
            break
        found.setdefault(attr_type & _NLA_TYPE_MASK, view[offset + _ATTR.size : offset + length])
        offset += _align(length)
    return found
