"""The few netlink operations NIC set-up needs, over one `RouteSocket`.

Each request is built with pyroute2's message classes and sent on the caller's task
(no thread, asyncio and trio alike); a change reads its ack only. Every method raises
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
import struct
from types import TracebackType
from typing import Any, Final, Literal, Self

import msgspec
from pyroute2.netlink.rtnl import (  # type: ignore[import-untyped]
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_SETLINK,
)
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ndmsg import ndmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # type: ignore[import-untyped]

from protocols.netlink import HEADER, NLM_F_CREATE, NLM_F_REPLACE
from supervisor.host.rtnetlink import RouteSocket

__all__ = ["Device", "Link", "Netlink", "device", "devices", "set_interface_sysctl"]

#: ``RT_TABLE_MAIN``.
MAIN_TABLE: Final = 254
#: ``BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED``: the port's native VLAN.
_VLAN_NATIVE: Final = 0x2 | 0x4
_SYSCTL: Final = "/proc/sys/net"
#: From <linux/if.h>, <linux/rtnetlink.h>, <linux/neighbour.h>, <linux/socket.h>.
_IFF_UP: Final = 0x1
_RTEXT_FILTER_SKIP_STATS: Final = 1 << 3
_RTPROT_STATIC: Final = 4
_RT_SCOPE_LINK: Final = 253
_RT_SCOPE_NOWHERE: Final = 255
_RTN_UNICAST: Final = 1
_NTF_PROXY: Final = 0x08
_NUD_PERMANENT: Final = 0x80
_AF_BRIDGE: Final = 7
#: ``struct rtmsg`` after the header: family, dst_len (the byte a dump filter reads).
_RTM_DST_LEN: Final = struct.Struct("=xB")


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


class Link(Device, frozen=True, kw_only=True):
    """A network interface as NIC set-up sees it."""

    mtu: int
    #: ``bridge``, ``tun``, ``veth``...; None for a device without a kind (``lo``).
    kind: str | None
    #: Index of the bridge (or other master) it is a port of.
    master: int | None


def _link(message: Any) -> Link:
    return Link(
        index=message["index"],
        name=message.get("IFLA_IFNAME"),
        mtu=message.get("IFLA_MTU"),
        kind=message.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")),
        master=message.get("IFLA_MASTER") or None,
    )


def host_prefix(ip: str) -> str:
    """``ip/32`` or ``ip/128``: the route to exactly that address."""
    address = ipaddress.ip_address(ip)
    return f"{address}/{address.max_prefixlen}"


def _link_request(index: int = 0, **fields: Any) -> Any:
    """An ``ifinfmsg`` for interface `index`; `fields` are its header fields, and its
    attributes by their pyroute2 names (``IFLA_MTU=1500``)."""
    message = ifinfmsg()
    message["index"] = index
    message["attrs"] = [(name, value) for name, value in fields.items() if name.isupper()]
    for name, value in fields.items():
        if not name.isupper():
            message[name] = value
    return message


def _route_request(ip: str, table: int, **fields: Any) -> Any:
    """An ``rtmsg`` for the host route to `ip` in `table`; `fields` as `_link_request`'s."""
    address = ipaddress.ip_address(ip)
    message = rtmsg()
    message["family"] = socket.AF_INET if address.version == 4 else socket.AF_INET6
    message["dst_len"] = address.max_prefixlen
    # A table past 255 goes in RTA_TABLE alone (the header's byte says RT_TABLE_UNSPEC).
    message["table"] = table if table < 256 else 0
    message["attrs"] = [("RTA_DST", str(address)), ("RTA_TABLE", table)]
    message["attrs"] += [(name, value) for name, value in fields.items() if name.isupper()]
    for name, value in fields.items():
        if not name.isupper():
            message[name] = value
    return message


def _proxy_request(ip: str, index: int) -> Any:
    message = ndmsg()
    message["family"] = socket.AF_INET if ipaddress.ip_address(ip).version == 4 else socket.AF_INET6
    message["ifindex"] = index
    message["flags"] = _NTF_PROXY
    message["state"] = _NUD_PERMANENT
    message["attrs"] = [("NDA_DST", ip)]
    return message


class Netlink:
    """``async with Netlink() as netlink``: one netlink socket for a batch of operations."""

    def __init__(self) -> None:
        self._socket = RouteSocket()

    async def __aenter__(self) -> Self:
        await self._socket.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._socket.__aexit__(exc_type, exc, traceback)

    async def link(self, name: str) -> Link | None:
        """Interface `name`, or None when there is none."""
        try:
            return _link(await self._get_link(IFLA_IFNAME=name))
        except OSError as error:
            if error.errno == errno.ENODEV:
                return None
            raise

    async def _get_link(self, index: int = 0, **attrs: Any) -> Any:
        request = _link_request(index, IFLA_EXT_MASK=_RTEXT_FILTER_SKIP_STATS, **attrs)
        return await self._socket.get(RTM_GETLINK, request)

    async def set_master(self, index: int, master: int | None) -> None:
        """Make interface `index` a port of `master`, or of nothing (None)."""
        await self._socket.change(RTM_NEWLINK, _link_request(index, IFLA_MASTER=master or 0))

    async def set_mtu(self, index: int, mtu: int) -> None:
        await self._socket.change(RTM_NEWLINK, _link_request(index, IFLA_MTU=mtu))

    async def set_up(self, index: int, *, mtu: int | None = None) -> None:
        """Bring interface `index` up, with MTU `mtu` if given (one request)."""
        extra = {} if mtu is None else {"IFLA_MTU": mtu}
        request = _link_request(index, flags=_IFF_UP, change=_IFF_UP, **extra)
        await self._socket.change(RTM_NEWLINK, request)

    async def join_up(self, index: int, master: int, mtu: int) -> None:
        """Make interface `index` a port of `master` with MTU `mtu`, and up (one request)."""
        request = _link_request(
            index, flags=_IFF_UP, change=_IFF_UP, IFLA_MTU=mtu, IFLA_MASTER=master
        )
        await self._socket.change(RTM_NEWLINK, request)

    async def probe_vlan_filtering(self, bridge: Link) -> None:
        """Raise OSError (EOPNOTSUPP) when the kernel has no bridge VLAN filtering.

        Sets the bridge's ``vlan_filtering`` to the value it has: a no-op where the
        feature exists, refused where it does not; the bridge is left as it was.
        """
        data = {"attrs": [("IFLA_BR_VLAN_FILTERING", await self.vlan_filtering(bridge))]}
        info = {"attrs": [("IFLA_INFO_KIND", "bridge"), ("IFLA_INFO_DATA", data)]}
        await self._socket.change(RTM_NEWLINK, _link_request(bridge.index, IFLA_LINKINFO=info))

    async def vlan_filtering(self, bridge: Link) -> int:
        """The bridge's ``vlan_filtering`` (1 when on)."""
        message = await self._get_link(bridge.index)
        data = message.get(("IFLA_LINKINFO", "IFLA_INFO_DATA"))
        return int(data.get("IFLA_BR_VLAN_FILTERING") or 0) if data is not None else 0

    async def add_port_vlan(self, port: int, vlan: int) -> None:
        """Make `vlan` the native (PVID, untagged) VLAN of bridge port `port`."""
        spec = {"attrs": [("IFLA_BRIDGE_VLAN_INFO", {"vid": vlan, "flags": _VLAN_NATIVE})]}
        request = _link_request(port, family=_AF_BRIDGE, IFLA_AF_SPEC=spec)
        await self._socket.change(RTM_SETLINK, request)

    async def add_route(self, ip: str, oif: int, table: int = MAIN_TABLE) -> None:
        """A host route to `ip` through interface `oif` (replacing one to the same ip)."""
        request = _route_request(
            ip,
            table,
            proto=_RTPROT_STATIC,
            scope=_RT_SCOPE_LINK,
            type=_RTN_UNICAST,
            RTA_OIF=oif,
        )
        await self._socket.change(RTM_NEWROUTE, request, NLM_F_CREATE | NLM_F_REPLACE)

    async def del_route(self, ip: str, oif: int, table: int = MAIN_TABLE) -> None:
        """Remove the host route to `ip` through `oif`; OSError ESRCH when there is none."""
        request = _route_request(ip, table, scope=_RT_SCOPE_NOWHERE, RTA_OIF=oif)
        await self._socket.change(RTM_DELROUTE, request)

    async def host_route_devices(self, ip: str, table: int = MAIN_TABLE) -> list[int]:
        """The interfaces of the host routes to `ip` in `table`."""
        address = ipaddress.ip_address(ip)
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        return [
            int(route.get("RTA_OIF"))
            for route in await self._routes(family, table, address.max_prefixlen)
            if route.get("RTA_OIF") is not None
            and ipaddress.ip_address(route.get("RTA_DST")) == address
        ]

    async def default_route_device(self, family: int, table: int = MAIN_TABLE) -> int | None:
        """The interface of the default route of `family` in `table`, if there is one."""
        for route in await self._routes(family, table, 0):
            if route.get("RTA_OIF") is not None:
                return int(route.get("RTA_OIF"))
        return None

    async def _routes(self, family: int, table: int, dst_len: int) -> list[Any]:
        """The routes of `family` and prefix length `dst_len` in `table` (none when the
        kernel has no such table)."""
        message = rtmsg()
        message["family"] = family
        message["table"] = table if table < 256 else 0
        message["attrs"] = [("RTA_TABLE", table)]

        def keep(reply: bytes) -> bool:  # before decoding: a big table stays cheap
            return bool(_RTM_DST_LEN.unpack_from(reply, HEADER.size)[0] == dst_len)

        try:
            return await self._socket.dump(RTM_GETROUTE, message, keep=keep)
        except OSError as error:
            if error.errno == errno.ENOENT:
                return []
            raise

    async def add_proxy_neighbour(self, ip: str, index: int) -> None:
        """Answer neighbour solicitations for `ip` arriving on interface `index`."""
        request = _proxy_request(ip, index)
        await self._socket.change(RTM_NEWNEIGH, request, NLM_F_CREATE | NLM_F_REPLACE)

    async def del_proxy_neighbour(self, ip: str, index: int) -> None:
        """Remove that proxy entry; OSError ENOENT when there is none."""
        await self._socket.change(RTM_DELNEIGH, _proxy_request(ip, index))


def devices() -> list[Device]:
    """Every interface of the caller's network namespace (``if_nameindex``)."""
    return [Device(index=index, name=name) for index, name in socket.if_nameindex()]


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
