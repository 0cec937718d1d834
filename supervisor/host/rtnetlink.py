"""Route netlink (``NETLINK_ROUTE``) for asyncio and trio, with no thread.

The messages are pyroute2's message classes (``ifinfmsg``, ``rtmsg``, ``ndmsg``,
``ifaddrmsg``): they encode a request and decode a reply when one is wanted; the socket
and its exchanges are `protocols.netlink`'s (a request is sent and its ack read at once:
the kernel has answered by the time ``send`` returns). A change asks for its ack only,
and nothing of a reply is decoded unless it is asked for. Everything speaking netlink
goes through `RouteSocket`.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from pyroute2.netlink import nlmsg  # type: ignore[import-untyped]

from protocols.netlink import NetlinkSocket, ProtocolError

__all__ = ["RouteSocket"]


def _encode(msg_type: int, message: nlmsg) -> bytes:
    message["header"]["type"] = msg_type
    message.encode()
    return bytes(message.data)


def _decode(message_class: type[nlmsg], data: bytes) -> Any:
    message = message_class(data)
    message.decode()
    return message


class RouteSocket:
    """``async with RouteSocket() as rtnl: await rtnl.change(RTM_NEWLINK, ifinfmsg(...))``.

    A kernel refusal is `protocols.netlink.NetlinkError`, an `OSError` with the
    kernel's errno, so callers test ``error.errno``. Dumps are filtered by the kernel
    (``NETLINK_GET_STRICT_CHK``): an address dump by the request's interface, a route
    dump by its table. On cancellation a request is abandoned (the socket is closed) and
    may or may not have been carried out.
    """

    def __init__(self) -> None:
        self._socket = NetlinkSocket(socket.NETLINK_ROUTE, strict_check=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._socket.close()

    async def change(self, msg_type: int, message: nlmsg, flags: int = 0) -> None:
        """Send a request that changes something (``RTM_NEWLINK``...), with `flags`
        (``NLM_F_CREATE | NLM_F_REPLACE``...); return at its ack."""
        await self._socket.request(_encode(msg_type, message), flags=flags)

    async def get(self, msg_type: int, message: nlmsg) -> Any:
        """The one reply to a ``get`` request, decoded by the request's message class."""
        replies = await self._socket.request(_encode(msg_type, message))
        if len(replies) != 1:
            raise ProtocolError(errno.EPROTO, f"{len(replies)} replies to a netlink get")
        return _decode(type(message), replies[0])

    async def dump(
        self, msg_type: int, message: nlmsg, *, keep: Callable[[bytes], bool] | None = None
    ) -> list[Any]:
        """The replies to a dump request, decoded by the request's message class; only
        those `keep` accepts (asked of each undecoded message) when it is given."""
        replies = await self._socket.request(_encode(msg_type, message), dump=True, keep=keep)
        return [_decode(type(message), reply) for reply in replies]
