"""The few netlink operations NIC set-up needs, over one `RouteSocket`.

Every method raises `OSError` with the kernel's errno when the kernel refuses; the mode
modules turn that into a `NetworkError` naming the interface. Per-interface sysctls are
file writes under ``/proc/sys/net`` of the caller's network namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from types import TracebackType
from typing import Any, Final, Literal, Self

import anyio
import msgspec
from pyroute2.netlink.rtnl.ndmsg import NTF_PROXY  # type: ignore[import-untyped]

from supervisor.host.rtnetlink import RouteSocket

__all__ = ["Device", "Link", "Netlink", "device"]

#: ``RT_TABLE_MAIN``.
MAIN_TABLE: Final = 254
#: ``BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED``: the port's native VLAN.
_VLAN_NATIVE: Final = 0x2 | 0x4
_SYSCTL: Final = anyio.Path("/proc/sys/net")


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
            (message,) = await self._socket.request("link", "get", ifname=name)
        except OSError as error:
            if error.errno == errno.ENODEV:
                return None
            raise
        return _link(message)

    async def links(self) -> list[Link]:
        """Every interface of the namespace."""
        return [_link(message) for message in await self._socket.request("get_links")]

    async def set_master(self, index: int, master: int | None) -> None:
        """Make interface `index` a port of `master`, or of nothing (None)."""
        await self._socket.request("link", "set", index=index, master=master or 0)

    async def set_mtu(self, index: int, mtu: int) -> None:
        await self._socket.request("link", "set", index=index, mtu=mtu)

    async def set_up(self, index: int, *, mtu: int | None = None) -> None:
        """Bring interface `index` up, with MTU `mtu` if given (one request)."""
        extra = {} if mtu is None else {"mtu": mtu}
        await self._socket.request("link", "set", index=index, state="up", **extra)

    async def join_up(self, index: int, master: int, mtu: int) -> None:
        """Make interface `index` a port of `master` with MTU `mtu`, and up (one request)."""
        await self._socket.request("link", "set", index=index, master=master, mtu=mtu, state="up")

    async def probe_vlan_filtering(self, bridge: Link) -> None:
        """Raise OSError (EOPNOTSUPP) when the kernel has no bridge VLAN filtering.

        Sets the bridge's ``vlan_filtering`` to the value it has: a no-op where the
        feature exists, refused where it does not; the bridge is left as it was.
        """
        await self._socket.request(
            "link",
            "set",
            index=bridge.index,
            kind="bridge",
            br_vlan_filtering=await self.vlan_filtering(bridge),
        )

    async def vlan_filtering(self, bridge: Link) -> int:
        """The bridge's ``vlan_filtering`` (1 when on)."""
        (message,) = await self._socket.request("link", "get", index=bridge.index)
        data = message.get(("IFLA_LINKINFO", "IFLA_INFO_DATA"))
        return int(data.get("IFLA_BR_VLAN_FILTERING") or 0) if data is not None else 0

    async def add_port_vlan(self, port: int, vlan: int) -> None:
        """Make `vlan` the native (PVID, untagged) VLAN of bridge port `port`."""
        await self._socket.request(
            "vlan_filter", "add", index=port, vlan_info={"vid": vlan, "flags": _VLAN_NATIVE}
        )

    async def add_route(self, ip: str, oif: int, table: int = MAIN_TABLE) -> None:
        """A host route to `ip` through interface `oif` (replacing one to the same ip)."""
        await self._socket.request(
            "route", "replace", dst=host_prefix(ip), oif=oif, table=table, proto="static"
        )

    async def del_route(self, ip: str, oif: int, table: int = MAIN_TABLE) -> None:
        """Remove the host route to `ip` through `oif`; OSError ESRCH when there is none."""
        await self._socket.request("route", "del", dst=host_prefix(ip), oif=oif, table=table)

    async def host_route_devices(self, ip: str, table: int = MAIN_TABLE) -> list[int]:
        """The interfaces of the host routes to `ip` in `table`."""
        address = ipaddress.ip_address(ip)
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        routes = await self._socket.request("route", "dump", family=family, table=table)
        return [
            int(route.get("RTA_OIF"))
            for route in routes
            if route["dst_len"] == address.max_prefixlen
            and route.get("RTA_OIF") is not None
            and ipaddress.ip_address(route.get("RTA_DST")) == address
        ]

    async def default_route_device(self, family: int, table: int = MAIN_TABLE) -> int | None:
        """The interface of the default route of `family` in `table`, if there is one."""
        routes = await self._socket.request("route", "dump", family=family, table=table)
        for route in routes:
            if route["dst_len"] == 0 and route.get("RTA_OIF") is not None:
                return int(route.get("RTA_OIF"))
        return None

    async def add_proxy_neighbour(self, ip: str, index: int) -> None:
        """Answer neighbour solicitations for `ip` arriving on interface `index`."""
        await self._socket.request("neigh", "replace", dst=ip, ifindex=index, flags=NTF_PROXY)

    async def del_proxy_neighbour(self, ip: str, index: int) -> None:
        """Remove that proxy entry; OSError ENOENT when there is none."""
        await self._socket.request("neigh", "del", dst=ip, ifindex=index, flags=NTF_PROXY)


async def set_interface_sysctl(
    family: Literal["ipv4", "ipv6"], interface: str, key: str, value: int
) -> None:
    """Write ``/proc/sys/net/<family>/conf/<interface>/<key>`` (gone with the interface)."""
    await (_SYSCTL / family / "conf" / interface / key).write_text(f"{value}\n")
