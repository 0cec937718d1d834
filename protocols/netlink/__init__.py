"""Netlink for asyncio and trio, over a sans-IO core; no thread.

The messages themselves (``ifinfmsg``, ``rtmsg``...) are encoded and decoded by the
caller (pyroute2's message classes do it well); this package moves them::

    async with NetlinkSocket(socket.NETLINK_ROUTE) as netlink:
        await netlink.request(message)                 # -> [] once acked
        links = await netlink.request(message, dump=True)

A refusal is :class:`NetlinkError` (an `OSError` with the kernel's errno and its
extended-ack message); a reply breaking the framing, or more replies than the bound,
is :class:`ProtocolError` (also an `OSError`). :class:`Exchange` is the sans-IO core.
"""

from ._client import NetlinkSocket
from ._core import (
    DEFAULT_MAX_REPLIES,
    HEADER,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    Exchange,
    NetlinkError,
    ProtocolError,
)

__all__ = [
    "DEFAULT_MAX_REPLIES",
    "HEADER",
    "NLM_F_CREATE",
    "NLM_F_EXCL",
    "NLM_F_REPLACE",
    "Exchange",
    "NetlinkError",
    "NetlinkSocket",
    "ProtocolError",
]
