"""A netlink socket for asyncio and trio: one request at a time, no thread.

The kernel handles a request to it inside ``send``: by the time ``send`` returns, the
ack (and a ``get``'s reply, a dump's first part) is queued on the socket. So a request
reads its replies at once and waits for the socket (``anyio.wait_readable``) only when
nothing is there yet: most requests never touch the event loop. ``EINTR`` is retried by
Python itself (PEP 475).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Final, Self

import anyio
import anyio.lowlevel

from ._core import DEFAULT_MAX_REPLIES, Exchange, ProtocolError

__all__ = ["NetlinkSocket"]

SOL_NETLINK: Final = 270
#: An ack echoes only the request's header, not its payload.
NETLINK_CAP_ACK: Final = 10
#: An error ack carries the kernel's message (``Device is not a bridge``).
NETLINK_EXT_ACK: Final = 11
#: rtnetlink checks dump requests strictly, and filters dumps by their fields (a route
#: dump by table, an address dump by interface) in the kernel.
NETLINK_GET_STRICT_CHK: Final = 12
#: Bytes read at once. The kernel builds dump datagrams up to the reader's buffer, at most
#: 32 KiB; one message longer than this buffer is a `ProtocolError` (``EMSGSIZE``).
RECEIVE_BYTES: Final = 64 * 1024


class NetlinkSocket:
    """``async with NetlinkSocket(socket.NETLINK_ROUTE) as netlink:``, then
    ``await netlink.request(message)``.

    The socket opens on the first request. A request not seen to its end (cancelled, or
    broken by a `ProtocolError`) closes it, so that nothing of it is read as another's;
    the next request opens a fresh one. `strict_check` turns on
    ``NETLINK_GET_STRICT_CHK`` (rtnetlink: dumps filtered in the kernel).
    """

    def __init__(self, protocol: int, *, strict_check: bool = False) -> None:
        self._protocol = protocol
        self._strict_check = strict_check
        self._socket: socket.socket | None = None
        self._seq = 0
        self._buffer = bytearray(RECEIVE_BYTES)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _open(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, self._protocol)
            try:
                sock.setblocking(False)
                for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                    with contextlib.suppress(OSError):  # before Linux 4.3 / 4.12: no matter
                        sock.setsockopt(SOL_NETLINK, option, 1)
                if self._strict_check:
                    sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            except BaseException:
                sock.close()
                raise
            self._socket = sock
        return self._socket

    async def request(
        self,
        message: bytes,
        *,
        flags: int = 0,
        dump: bool = False,
        keep: Callable[[bytes], bool] | None = None,
        max_replies: int = DEFAULT_MAX_REPLIES,
    ) -> list[bytes]:
        """Send `message` (a whole netlink message, its length and type set; its flags,
        `flags` with the exchange's own, and sequence number are stamped here) and return
        its replies, whole messages.

        `dump`, `keep` and `max_replies` are :class:`Exchange`'s. On cancellation the
        socket is closed and the request's outcome is unknown (it may have been done).

        :raises NetlinkError: the kernel refused the request (its errno).
        :raises ProtocolError: a malformed reply, or too many.
        :raises OSError: the socket failed (``ENOBUFS``: replies were lost).
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        sock = self._open()
        self._seq = Exchange.next_seq(self._seq)
        exchange = Exchange(self._seq, dump=dump, keep=keep, max_replies=max_replies)
        try:
            # Handled by the kernel inside send (never EAGAIN): the ack is queued on return.
            sock.send(exchange.request(message, flags))
            while not exchange.done:
                exchange.receive(await self._read(sock))
        except BaseException:
            self.close()
            raise
        return exchange.result()

    async def _read(self, sock: socket.socket) -> memoryview:
        """The next datagram (a view of the socket's buffer, valid until the next read)."""
        buffer = self._buffer
        while True:
            try:
                length = sock.recv_into(buffer, len(buffer), socket.MSG_TRUNC)
                break
            except BlockingIOError:
                await anyio.wait_readable(sock)
        if length > len(buffer):
            raise ProtocolError(
                errno.EMSGSIZE, f"a netlink datagram of {length} bytes (> {len(buffer)})"
            )
        return memoryview(buffer)[:length]
