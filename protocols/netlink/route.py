"""The route-netlink (rtnetlink) requests NIC set-up sends and the fields it reads of the
replies, with pyroute2's message classes (``ifinfmsg``, ``rtmsg``, ``ndmsg``,
``ifaddrmsg``) doing the encoding and most decoding; sans-IO.

A request function fills a pyroute2 message and returns it encoded, a whole message
for :meth:`NetlinkSocket.request` (which stamps flags and the sequence number). A reply
is decoded by its pyroute2 class, and only the few fields used are read of it (with
``get_attr``) into a small frozen struct (`RouteReply`, `AddressReply`). A link reply,
read at every start with NICs, is walked by hand (`attributes`) for its four fields
(`LinkReply`): pyroute2 would decode its tens of attributes first.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct
from typing import Any, Final

import msgspec
from pyroute2.netlink import nlmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl import (  # type: ignore[import-untyped]
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_SETLINK,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ndmsg import ndmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # type: ignore[import-untyped]

from ._client import NetlinkSocket
from ._core import HEADER, ProtocolError, attribute, attributes

__all__ = [
    "RTM_DELNEIGH",
    "RTM_DELROUTE",
    "RTM_NEWLINK",
    "RTM_NEWNEIGH",
    "RTM_NEWROUTE",
    "AddressReply",
    "LinkReply",
    "RouteReply",
    "address_dump",
    "bridge_port_vlan",
    "bridge_vlan_filtering",
    "host_route_request",
    "link_get",
    "link_request",
    "neighbour_request",
    "parse_address",
    "parse_link",
    "parse_route",
    "route_dst_len",
    "route_dump",
    "route_socket",
    "vlan_filtering",
]

#: ``IFLA_EXT_MASK``: no statistics in a link reply (half its bytes). <linux/rtnetlink.h>
RTEXT_FILTER_SKIP_STATS: Final = 1 << 3
AF_BRIDGE: Final = 7
#: Tables past 255 are named by ``RTA_TABLE`` alone; the header's byte says so.
RT_TABLE_UNSPEC: Final = 0
#: ``struct ifinfomsg``: family, padding, type, index, flags, change; its index.
_IFINFOMSG: Final = struct.Struct("=BxHiII")
_IFINFOMSG_SIZE: Final = _IFINFOMSG.size
_IFINFOMSG_INDEX: Final = struct.Struct("=4xi")
#: ``struct rtmsg``: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
_RTMSG: Final = struct.Struct("=BBBBBBBBI")
_U32: Final = struct.Struct("=I")
#: From <linux/rtnetlink.h>.
_RTA_DST: Final = 1
_RTA_OIF: Final = 4
_RTA_TABLE: Final = 15
#: Link attributes packed and read by hand: pyroute2 decodes every attribute of a link
#: reply (tens of them, ~0.5 ms) to read four. From <linux/if_link.h>.
_IFLA_ADDRESS: Final = 1
_IFLA_IFNAME: Final = 3
_IFLA_MTU: Final = 4
_IFLA_MASTER: Final = 10
_IFLA_LINKINFO: Final = 18
_IFLA_INFO_KIND: Final = 1
_IFLA_INFO_DATA: Final = 2
_IFLA_BR_VLAN_FILTERING: Final = 7
#: ``struct rtmsg``'s second byte, ``rtm_dst_len``: read by a dump's filter before the
#: reply is decoded.
_RTM_DST_LEN: Final = struct.Struct("=xB")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def route_socket() -> NetlinkSocket:
    """A ``NETLINK_ROUTE`` socket whose dumps the kernel filters (``NETLINK_GET_STRICT_CHK``:
    an address dump by interface, a route dump by table)."""
    return NetlinkSocket(socket.NETLINK_ROUTE, strict_check=True)


def _family(address: Address) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def _table(table: int) -> int:
    return table if table < 256 else RT_TABLE_UNSPEC


def _encoded(message: Any, msg_type: int) -> bytes:
    message["header"]["type"] = msg_type
    message.encode()
    return bytes(message.data)


def _decoded(message_class: type[nlmsg], reply: bytes) -> Any:
    """`reply` decoded by `message_class`: its fixed header; each attribute is decoded
    when it is read."""
    message = message_class(reply)
    try:
        message.decode()
    except struct.error as error:
        raise ProtocolError(errno.EPROTO, f"a netlink reply of {len(reply)} bytes") from error
    return message


# --- requests -----------------------------------------------------------------------


def link_request(
    msg_type: int,
    index: int,
    *,
    mtu: int | None = None,
    master: int | None = None,
    up: bool = False,
    address: str | None = None,
) -> bytes:
    """An ``ifinfomsg`` request about interface `index`: its MAC `address`, its MTU, its
    master (0: none), and `up` brings it up (``IFF_UP`` in flags and change); what is
    not given is left as it is. The kernel sets the address before the master: a port
    joins its bridge with the address given.

    Packed here (the bytes pyroute2 would encode, in a few microseconds rather than
    tens): it is sent for every NIC of every start.
    """
    flags = IFF_UP if up else 0
    body = [_IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, flags)]
    if address is not None:
        body.append(attribute(_IFLA_ADDRESS, bytes.fromhex(address.replace(":", ""))))
    if mtu is not None:
        body.append(attribute(_IFLA_MTU, _U32.pack(mtu)))
    if master is not None:
        body.append(attribute(_IFLA_MASTER, _U32.pack(master)))
    return _message(msg_type, body)


def _message(msg_type: int, body: list[bytes]) -> bytes:
    """A whole message: the header (flags and sequence number 0, stamped when sent)
    and `body`."""
    payload = b"".join(body)
    return HEADER.pack(HEADER.size + len(payload), msg_type, 0, 0, 0) + payload


@functools.lru_cache(maxsize=64)
def link_get(*, index: int = 0, name: str | None = None) -> bytes:
    """``RTM_GETLINK`` of one interface, by index or name, without its statistics.

    Kept encoded for the last 64 interfaces asked about: a NIC's bridge is looked up
    at each start (twice), and pyroute2 takes tens of microseconds to encode it.
    """
    message = ifinfmsg()
    message["index"] = index
    message["attrs"] = [("IFLA_EXT_MASK", RTEXT_FILTER_SKIP_STATS)]
    if name is not None:
        message["attrs"].append(("IFLA_IFNAME", name))
    return _encoded(message, RTM_GETLINK)


def bridge_vlan_filtering(index: int, value: int) -> bytes:
    """``RTM_NEWLINK`` setting bridge `index`'s ``vlan_filtering`` to `value`."""
    data = {"attrs": [("IFLA_BR_VLAN_FILTERING", value)]}
    message = ifinfmsg()
    message["index"] = index
    message["attrs"] = [
        ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "bridge"), ("IFLA_INFO_DATA", data)]})
    ]
    return _encoded(message, RTM_NEWLINK)


def bridge_port_vlan(index: int, vlan: int, flags: int) -> bytes:
    """``RTM_SETLINK`` (``AF_BRIDGE``) adding `vlan` to bridge port `index` with `flags`
    (``BRIDGE_VLAN_INFO_*``)."""
    message = ifinfmsg()
    message["family"] = AF_BRIDGE
    message["index"] = index
    spec = {"attrs": [("IFLA_BRIDGE_VLAN_INFO", {"vid": vlan, "flags": flags})]}
    message["attrs"] = [("IFLA_AF_SPEC", spec)]
    return _encoded(message, RTM_SETLINK)


def host_route_request(
    msg_type: int,
    address: Address,
    table: int,
    oif: int,
    *,
    protocol: int = 0,
    scope: int = 0,
    route_type: int = 0,
) -> bytes:
    """An ``rtmsg`` request about the host route (``/32``, ``/128``) to `address` through
    interface `oif` in `table`. Packed here, as `link_request` is."""
    header = _RTMSG.pack(
        _family(address),
        address.max_prefixlen,
        0,
        0,
        _table(table),
        protocol,
        scope,
        route_type,
        0,
    )
    body = [
        header,
        attribute(_RTA_DST, address.packed),
        attribute(_RTA_TABLE, _U32.pack(table)),
        attribute(_RTA_OIF, _U32.pack(oif)),
    ]
    return _message(msg_type, body)


def route_dump(family: int, table: int) -> bytes:
    """``RTM_GETROUTE`` dump of `table`'s routes of `family` (filtered by the kernel)."""
    message = rtmsg()
    message["family"] = family
    message["table"] = _table(table)
    message["attrs"] = [("RTA_TABLE", table)]
    return _encoded(message, RTM_GETROUTE)


def neighbour_request(
    msg_type: int, address: Address, index: int, *, flags: int, state: int
) -> bytes:
    """An ``ndmsg`` request about the entry for `address` on interface `index`."""
    message = ndmsg()
    message["family"] = _family(address)
    message["ifindex"] = index
    message["flags"] = flags
    message["state"] = state
    message["attrs"] = [("NDA_DST", str(address))]
    return _encoded(message, msg_type)


def address_dump(index: int) -> bytes:
    """``RTM_GETADDR`` dump of interface `index`'s addresses (filtered by the kernel)."""
    message = ifaddrmsg()
    message["index"] = index
    return _encoded(message, RTM_GETADDR)


# --- replies ------------------------------------------------------------------------


class LinkReply(msgspec.Struct, frozen=True, kw_only=True):
    """What NIC set-up reads of an interface."""

    index: int
    name: str
    mtu: int
    #: Index of the interface it is a port of (its bridge), None for none.
    master: int | None
    #: ``bridge``, ``tun``, ``veth``...; None for a device without one (``lo``).
    kind: str | None


class RouteReply(msgspec.Struct, frozen=True, kw_only=True):
    family: int
    dst_len: int
    #: None for a default route.
    dst: str | None
    oif: int | None


class AddressReply(msgspec.Struct, frozen=True, kw_only=True):
    family: int
    flags: int
    scope: int
    index: int
    #: ``IFA_ADDRESS``: the interface's address, or on a point-to-point link the peer's.
    address: str | None
    #: ``IFA_LOCAL``: the interface's own address, when it differs.
    local: str | None


def parse_link(reply: bytes) -> LinkReply:
    """An ``RTM_NEWLINK`` reply (to ``RTM_GETLINK``)."""
    (index,) = _IFINFOMSG_INDEX.unpack_from(_fixed(reply, _IFINFOMSG_SIZE), HEADER.size)
    found = attributes(reply, HEADER.size + _IFINFOMSG_SIZE)
    kind = _string(attributes(found.get(_IFLA_LINKINFO, b""), 0).get(_IFLA_INFO_KIND))
    return LinkReply(
        index=index,
        name=_string(found.get(_IFLA_IFNAME)) or "",
        mtu=_u32(found.get(_IFLA_MTU)) or 0,
        master=_u32(found.get(_IFLA_MASTER)) or None,
        kind=kind,
    )


def vlan_filtering(reply: bytes) -> int | None:
    """A bridge's ``vlan_filtering`` from its ``RTM_NEWLINK`` reply; None for a link
    that is no bridge."""
    found = attributes(_fixed(reply, _IFINFOMSG_SIZE), HEADER.size + _IFINFOMSG_SIZE)
    info = attributes(found.get(_IFLA_LINKINFO, b""), 0)
    if _string(info.get(_IFLA_INFO_KIND)) != "bridge":
        return None
    data = attributes(info.get(_IFLA_INFO_DATA, b""), 0)
    setting = data.get(_IFLA_BR_VLAN_FILTERING)
    return setting[0] if setting else 0


def _fixed(reply: bytes, size: int) -> bytes:
    """`reply`, refused when shorter than a header and a fixed part of `size` bytes."""
    if len(reply) < HEADER.size + size:
        raise ProtocolError(errno.EPROTO, f"a netlink reply of {len(reply)} bytes")
    return reply


def _string(payload: memoryview | None) -> str | None:
    """A string attribute's text, up to its NUL."""
    if payload is None:
        return None
    return bytes(payload).split(b"\0", 1)[0].decode(errors="replace")


def _u32(payload: memoryview | None) -> int | None:
    if payload is None or len(payload) < 4:
        return None
    return int(_U32.unpack_from(payload)[0])


def route_dst_len(reply: bytes) -> int:
    """A route reply's prefix length, read without decoding the rest (a dump's filter)."""
    if len(reply) < HEADER.size + _RTM_DST_LEN.size:
        raise ProtocolError(errno.EPROTO, f"a netlink reply of {len(reply)} bytes")
    return int(_RTM_DST_LEN.unpack_from(reply, HEADER.size)[0])


def parse_route(reply: bytes) -> RouteReply:
    """An ``RTM_NEWROUTE`` reply (of a route dump)."""
    message = _decoded(rtmsg, reply)
    return RouteReply(
        family=message["family"],
        dst_len=message["dst_len"],
        dst=message.get_attr("RTA_DST"),
        oif=message.get_attr("RTA_OIF"),
    )


def parse_address(reply: bytes) -> AddressReply:
    """An ``RTM_NEWADDR`` reply (of an address dump)."""
    message = _decoded(ifaddrmsg, reply)
    return AddressReply(
        family=message["family"],
        flags=message["flags"],
        scope=message["scope"],
        index=message["index"],
        address=message.get_attr("IFA_ADDRESS"),
        local=message.get_attr("IFA_LOCAL"),
    )
