"""The few netlink operations NIC set-up needs, over one route-netlink socket.

Requests are encoded by pyroute2's message classes (through `protocols.netlink.route`)
and sent on the caller's task by our own socket (no thread, asyncio and trio alike): the
kernel does the work inside ``send`` and a change reads its ack only; of a reply only
the fields used are read. Every method raises
`OSError` with the kernel's errno when the kernel refuses (its extended-ack message in
the text); the mode modules turn that into a `NetworkError` naming the interface.
Per-interface sysctls are file writes under ``/proc/sys/net`` of the caller's network
namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from types import TracebackType
from typing import Final, Literal, Self

import msgspec

from protocols.netlink import NLM_F_CREATE, NLM_F_REPLACE, route
from protocols.netlink.route import (
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RouteReply,
)
from protocols.netlink.route import LinkReply as Link

__all__ = ["Device", "Link", "Netlink", "device", "devices", "set_interface_sysctl"]

#: ``RT_TABLE_MAIN``.
MAIN_TABLE: Final = 254
#: ``BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED``: the port's native VLAN.
_VLAN_NATIVE: Final = 0x2 | 0x4
_SYSCTL: Final = "/proc/sys/net"
#: From <linux/rtnetlink.h> and <linux/neighbour.h>.
_RTPROT_STATIC: Final = 4
_RT_SCOPE_LINK: Final = 253
_RT_SCOPE_NOWHERE: Final = 255
_RTN_UNICAST: Final = 1
_NTF_PROXY: Final = 0x08
_NUD_PERMANENT: Final = 0x80


class Device(msgspec.Struct, frozen=True, kw_only=True):
    """A network interface by index and name (all a tap's set-up needs of it)."""

    index: int
    name: str


def device(name: str) -> Device | None:
    """Interface `name` of the caller's network namespace, or None when there is none.

    Asked with ``if_nametoindex`` (an ioctl): no netlink request, a few microseconds.
    """
    try:
        return Device(index=socket.if_nametoindex(name), name=name)
    except OSError:
        return None


def devices() -> list[Device]:
    """Every interface of the caller's network namespace (``if_nameindex``)."""
    return [Device(index=index, name=name) for index, name in socket.if_nameindex()]


def host_prefix(ip: str) -> str:
    """``ip/32`` or ``ip/128``: the route to exactly that address."""
    address = ipaddress.ip_address(ip)
    return f"{address}/{address.max_prefixlen}"


class Netlink:
    """``async with Netlink() as netlink``: one netlink socket for a batch of operations."""

    def __init__(self) -> None:
        self._socket = route.route_socket()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._socket.close()

    async def link(self, name: str) -> Link | None:
        """Interface `name` (a `Link`: index, name, MTU, kind, master), or None when
        there is none."""
        try:
            (reply,) = await self._socket.request(route.link_get(name=name))
        except OSError as error:
            if error.errno == errno.ENODEV:
                return None
            raise
        return route.parse_link(reply)

    async def set_master(self, index: int, master: int | None) -> None:
        """Make interface `index` a port of `master`, or of nothing (None)."""
        await self._socket.request(route.link_request(RTM_NEWLINK, index, master=master or 0))

    async def set_mtu(self, index: int, mtu: int, *, address: str | None = None) -> None:
        """Set interface `index`'s MTU, and its MAC `address` if given (one request)."""
        request = route.link_request(RTM_NEWLINK, index, mtu=mtu, address=address)
        await self._socket.request(request)

    async def set_up(
        self, index: int, *, mtu: int | None = None, address: str | None = None
    ) -> None:
        """Bring interface `index` up, with MTU `mtu` and MAC `address` if given (one
        request)."""
        request = route.link_request(RTM_NEWLINK, index, mtu=mtu, address=address, up=True)
        await self._socket.request(request)

    async def join_up(self, index: int, master: int, mtu: int, *, address: str) -> None:
        """Give interface `index` MAC `address` and MTU `mtu`, make it a port of
        `master`, and bring it up (one request)."""
        request = route.link_request(
            RTM_NEWLINK, index, mtu=mtu, master=master, address=address, up=True
        )
        await self._socket.request(request)

    async def probe_vlan_filtering(self, bridge: Link) -> None:
        """Raise OSError (EOPNOTSUPP) when the kernel has no bridge VLAN filtering.

        Sets the bridge's ``vlan_filtering`` to the value it has: a no-op where the
        feature exists, refused where it does not; the bridge is left as it was.
        """
        value = await self.vlan_filtering(bridge)
        await self._socket.request(route.bridge_vlan_filtering(bridge.index, value))

    async def vlan_filtering(self, bridge: Link) -> int:
        """The bridge's ``vlan_filtering`` now (1 when on)."""
        (reply,) = await self._socket.request(route.link_get(index=bridge.index))
        return route.vlan_filtering(reply) or 0

    async def add_port_vlan(self, port: int, vlan: int) -> None:
        """Make `vlan` the native (PVID, untagged) VLAN of bridge port `port`."""
        await self._socket.request(route.bridge_port_vlan(port, vlan, _VLAN_NATIVE))

    async def add_route(self, ip: str, oif: int, table: int = MAIN_TABLE) -> None:
        """A host route to `ip` through interface `oif` (replacing one to the same ip)."""
        request = route.host_route_request(
            RTM_NEWROUTE,
            ipaddress.ip_address(ip),
            table,
            oif,
            protocol=_RTPROT_STATIC,
            scope=_RT_SCOPE_LINK,
            route_type=_RTN_UNICAST,
        )
        await self._socket.request(request, flags=NLM_F_CREATE | NLM_F_REPLACE)

    async def del_route(self, ip: str, oif: int, table: int = MAIN_TABLE) -> None:
        """Remove the host route to `ip` through `oif`; OSError ESRCH when there is none."""
        request = route.host_route_request(
            RTM_DELROUTE,
            ipaddress.ip_address(ip),
            table,
            oif,
            scope=_RT_SCOPE_NOWHERE,  # whatever its scope
        )
        await self._socket.request(request)

    async def host_route_devices(self, ip: str, table: int = MAIN_TABLE) -> list[int]:
        """The interfaces of the host routes to `ip` in `table`."""
        address = ipaddress.ip_address(ip)
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        return [
            found.oif
            for found in await self._routes(family, table, address.max_prefixlen)
            if found.oif is not None and found.dst == str(address)
        ]

    async def default_route_device(self, family: int, table: int = MAIN_TABLE) -> int | None:
        """The interface of the default route of `family` in `table`, if there is one."""
        for found in await self._routes(family, table, 0):
            if found.oif is not None:
                return found.oif
        return None

    async def _routes(self, family: int, table: int, dst_len: int) -> list[RouteReply]:
        """The routes of `family` and prefix length `dst_len` in `table` (none when the
        kernel has no such table)."""

        def keep(reply: bytes) -> bool:  # before decoding: a big table stays cheap
            return route.route_dst_len(reply) == dst_len

        try:
            replies = await self._socket.request(
                route.route_dump(family, table), dump=True, keep=keep
            )
        except OSError as error:
            if error.errno == errno.ENOENT:
                return []
            raise
        return [route.parse_route(reply) for reply in replies]

    async def add_proxy_neighbour(self, ip: str, index: int) -> None:
        """Answer neighbour solicitations for `ip` arriving on interface `index`."""
        request = route.neighbour_request(
            RTM_NEWNEIGH,
            ipaddress.ip_address(ip),
            index,
            flags=_NTF_PROXY,
            state=_NUD_PERMANENT,
        )
        await self._socket.request(request, flags=NLM_F_CREATE | NLM_F_REPLACE)

    async def del_proxy_neighbour(self, ip: str, index: int) -> None:
        """Remove that proxy entry; OSError ENOENT when there is none."""
        request = route.neighbour_request(
            RTM_DELNEIGH, ipaddress.ip_address(ip), index, flags=_NTF_PROXY, state=0
        )
        await self._socket.request(request)


def set_interface_sysctl(
    family: Literal["ipv4", "ipv6"], interface: str, key: str, value: int
) -> None:
    """Write ``/proc/sys/net/<family>/conf/<interface>/<key>`` (gone with the interface).

    On the caller's thread: a sysctl is kernel memory, its write a few microseconds that
    never wait for a disk.
    """
    fd = os.open(f"{_SYSCTL}/{family}/conf/{interface}/{key}", os.O_WRONLY)
    try:
        os.write(fd, f"{value}\n".encode())
    finally:
        os.close(fd)
