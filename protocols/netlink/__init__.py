"""Netlink for asyncio and trio, over a sans-IO core; no thread.

`NetlinkSocket` moves whole messages (our own socket I/O); :mod:`protocols.netlink.route`
builds the route-netlink requests NIC set-up sends with pyroute2's message classes, and
reads the few fields it needs of the replies as pyroute2 decodes them::

    from protocols.netlink import route

    async with route.route_socket() as netlink:
        await netlink.request(route.link_request(route.RTM_NEWLINK, index, up=True))
        (reply,) = await netlink.request(route.link_get(name="br0"))
        bridge = route.parse_link(reply)

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
