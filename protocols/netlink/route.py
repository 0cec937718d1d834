"""The route-netlink (rtnetlink) messages NIC set-up uses, encoded and decoded; sans-IO.

Requests are whole messages for :meth:`NetlinkSocket.request` (which stamps flags and
the sequence number). A reply is decoded into a small frozen struct holding only the
fields read from it (`LinkReply`, `RouteReply`, `AddressReply`); the rest of the
message is never looked at. Layouts and numbers are <linux/rtnetlink.h>,
<linux/if_link.h>, <linux/neighbour.h> and <linux/if_addr.h>.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import Final

import msgspec

from ._attrs import attr, message, nested, parse_attrs, string, string_of, u8, u8_of, u32, u32_of
from ._client import NetlinkSocket
from ._core import HEADER, ProtocolError

__all__ = [
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
    "u32",
]

RTM_NEWLINK: Final = 16
RTM_GETLINK: Final = 18
RTM_SETLINK: Final = 19
RTM_GETADDR: Final = 22
RTM_NEWROUTE: Final = 24
RTM_DELROUTE: Final = 25
RTM_GETROUTE: Final = 26
RTM_NEWNEIGH: Final = 28
RTM_DELNEIGH: Final = 29

IFLA_IFNAME: Final = 3
IFLA_MTU: Final = 4
IFLA_MASTER: Final = 10
IFLA_LINKINFO: Final = 18
IFLA_AF_SPEC: Final = 26
IFLA_EXT_MASK: Final = 29
IFLA_INFO_KIND: Final = 1
IFLA_INFO_DATA: Final = 2
IFLA_BR_VLAN_FILTERING: Final = 7
IFLA_BRIDGE_VLAN_INFO: Final = 2
RTA_DST: Final = 1
RTA_OIF: Final = 4
RTA_TABLE: Final = 15
NDA_DST: Final = 1
IFA_ADDRESS: Final = 1
IFA_LOCAL: Final = 2

IFF_UP: Final = 0x1
#: ``IFLA_EXT_MASK``: no statistics in a link reply (half its bytes).
RTEXT_FILTER_SKIP_STATS: Final = 1 << 3
AF_BRIDGE: Final = 7
#: Tables past 255 are named by ``RTA_TABLE`` alone; the header's byte says so.
RT_TABLE_UNSPEC: Final = 0

#: ``struct ifinfomsg``: family, (pad), type, index, flags, change.
_IFINFOMSG: Final = struct.Struct("=BxHiII")
#: ``struct rtmsg``: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
_RTMSG: Final = struct.Struct("=BBBBBBBBI")
#: ``struct ndmsg``: family, (pads), ifindex, state, flags, type.
_NDMSG: Final = struct.Struct("=BxxxiHBB")
#: ``struct ifaddrmsg``: family, prefixlen, flags, scope, index.
_IFADDRMSG: Final = struct.Struct("=BBBBI")
#: ``struct bridge_vlan_info``: flags, vid.
_BRIDGE_VLAN_INFO: Final = struct.Struct("=HH")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def route_socket() -> NetlinkSocket:
    """A ``NETLINK_ROUTE`` socket whose dumps the kernel filters (``NETLINK_GET_STRICT_CHK``:
    an address dump by interface, a route dump by table)."""
    return NetlinkSocket(socket.NETLINK_ROUTE, strict_check=True)


def _family(address: Address) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def _table(table: int) -> int:
    return table if table < 256 else RT_TABLE_UNSPEC


# --- requests -----------------------------------------------------------------------


def link_request(
    msg_type: int, index: int, *attrs: bytes, family: int = 0, up: bool = False
) -> bytes:
    """An ``ifinfomsg`` request about interface `index` (0: named by an ``IFLA_IFNAME``
    among `attrs`); `up` brings it up (``IFF_UP`` in flags and change)."""
    flags = IFF_UP if up else 0
    return message(msg_type, _IFINFOMSG.pack(family, 0, index, flags, flags), *attrs)


def link_get(*, index: int = 0, name: str | None = None) -> bytes:
    """``RTM_GETLINK`` of one interface, by index or name, without its statistics."""
    attrs = [u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)]
    if name is not None:
        attrs.append(string(IFLA_IFNAME, name))
    return link_request(RTM_GETLINK, index, *attrs)


def bridge_vlan_filtering(index: int, value: int) -> bytes:
    """``RTM_NEWLINK`` setting bridge `index`'s ``vlan_filtering`` to `value`."""
    data = nested(IFLA_INFO_DATA, u8(IFLA_BR_VLAN_FILTERING, value))
    info = nested(IFLA_LINKINFO, string(IFLA_INFO_KIND, "bridge"), data)
    return link_request(RTM_NEWLINK, index, info)


def bridge_port_vlan(index: int, vlan: int, flags: int) -> bytes:
    """``RTM_SETLINK`` (``AF_BRIDGE``) adding `vlan` to bridge port `index` with `flags`
    (``BRIDGE_VLAN_INFO_*``)."""
    vlan_info = attr(IFLA_BRIDGE_VLAN_INFO, _BRIDGE_VLAN_INFO.pack(flags, vlan))
    return link_request(RTM_SETLINK, index, nested(IFLA_AF_SPEC, vlan_info), family=AF_BRIDGE)


def host_route_request(
    msg_type: int,
    address: Address,
    table: int,
    *attrs: bytes,
    protocol: int = 0,
    scope: int = 0,
    route_type: int = 0,
) -> bytes:
    """An ``rtmsg`` request about the host route (``/32``, ``/128``) to `address` in
    `table`."""
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
    return message(msg_type, header, attr(RTA_DST, address.packed), u32(RTA_TABLE, table), *attrs)


def route_dump(family: int, table: int) -> bytes:
    """``RTM_GETROUTE`` dump of `table`'s routes of `family` (filtered by the kernel)."""
    header = _RTMSG.pack(family, 0, 0, 0, _table(table), 0, 0, 0, 0)
    return message(RTM_GETROUTE, header, u32(RTA_TABLE, table))


def neighbour_request(
    msg_type: int, address: Address, index: int, *, flags: int, state: int
) -> bytes:
    """An ``ndmsg`` request about the entry for `address` on interface `index`."""
    header = _NDMSG.pack(_family(address), index, state, flags, 0)
    return message(msg_type, header, attr(NDA_DST, address.packed))


def address_dump(index: int) -> bytes:
    """``RTM_GETADDR`` dump of interface `index`'s addresses (filtered by the kernel)."""
    return message(RTM_GETADDR, _IFADDRMSG.pack(0, 0, 0, 0, index))


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
    #: A bridge's ``vlan_filtering``; None for anything else.
    vlan_filtering: int | None


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


def _fixed(reply: bytes, layout: struct.Struct) -> tuple[int, ...]:
    if len(reply) < HEADER.size + layout.size:
        raise ProtocolError(errno.EPROTO, f"a netlink reply of {len(reply)} bytes")
    return layout.unpack_from(reply, HEADER.size)


def _address(payload: bytes | None) -> str | None:
    if payload is None:
        return None
    if len(payload) not in (4, 16):
        raise ProtocolError(errno.EPROTO, f"an address of {len(payload)} bytes")
    return str(ipaddress.ip_address(payload))


def parse_link(reply: bytes) -> LinkReply:
    """An ``RTM_NEWLINK`` reply (to ``RTM_GETLINK``)."""
    index = _fixed(reply, _IFINFOMSG)[2]
    attrs = parse_attrs(reply, HEADER.size + _IFINFOMSG.size)
    kind = vlan_filtering = None
    if IFLA_LINKINFO in attrs:
        info = parse_attrs(attrs[IFLA_LINKINFO])
        if IFLA_INFO_KIND in info:
            kind = string_of(info[IFLA_INFO_KIND])
        if kind == "bridge" and IFLA_INFO_DATA in info:
            data = parse_attrs(info[IFLA_INFO_DATA])
            if IFLA_BR_VLAN_FILTERING in data:
                vlan_filtering = u8_of(data[IFLA_BR_VLAN_FILTERING])
    master = u32_of(attrs[IFLA_MASTER]) if IFLA_MASTER in attrs else 0
    return LinkReply(
        index=index,
        name=string_of(attrs.get(IFLA_IFNAME, b"")),
        mtu=u32_of(attrs[IFLA_MTU]) if IFLA_MTU in attrs else 0,
        master=master or None,
        kind=kind,
        vlan_filtering=vlan_filtering,
    )


def route_dst_len(reply: bytes) -> int:
    """A route reply's prefix length, read without decoding the rest (a dump's filter)."""
    return _fixed(reply, _RTMSG)[1]


def parse_route(reply: bytes) -> RouteReply:
    """An ``RTM_NEWROUTE`` reply (of a route dump)."""
    family, dst_len, *_ = _fixed(reply, _RTMSG)
    attrs = parse_attrs(reply, HEADER.size + _RTMSG.size)
    return RouteReply(
        family=family,
        dst_len=dst_len,
        dst=_address(attrs.get(RTA_DST)),
        oif=u32_of(attrs[RTA_OIF]) if RTA_OIF in attrs else None,
    )


def parse_address(reply: bytes) -> AddressReply:
    """An ``RTM_NEWADDR`` reply (of an address dump)."""
    family, _prefixlen, flags, scope, index = _fixed(reply, _IFADDRMSG)
    attrs = parse_attrs(reply, HEADER.size + _IFADDRMSG.size)
    return AddressReply(
        family=family,
        flags=flags,
        scope=scope,
        index=index,
        address=_address(attrs.get(IFA_ADDRESS)),
        local=_address(attrs.get(IFA_LOCAL)),
    )
