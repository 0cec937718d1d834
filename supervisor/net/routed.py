"""Routed NICs: a host route to the NIC's `ip` through the tap, and the host answering
ARP (IPv4) or neighbour solicitations (IPv6) for it.

`link`, when given, is the routing table (a number, or a name from
``/etc/iproute2/rt_tables``). IPv4: proxy ARP and forwarding on the tap. IPv6:
forwarding on the tap and a proxy NDP entry for the address on the interface of the
table's IPv6 default route (the uplink; ``proxy_ndp`` must be on there, which is the
operator's to set: nothing else on the host changes). The route and the tap's sysctls go
with the tap; the proxy entry does not, so teardown removes it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path
from typing import Final

from supervisor.model.errors import NetworkError
from supervisor.qemu.cmdline import NicPlan

from .netlink import MAIN_TABLE, Device, Netlink, devices, set_interface_sysctl
from .tun import tap_mac

__all__ = ["check", "routing_table", "set_up", "tear_down"]

RT_TABLES: Final = Path("/etc/iproute2/rt_tables")
_GONE: Final = (errno.ENOENT, errno.ESRCH, errno.ENODEV)


def routing_table(link: str | None, rt_tables: Path = RT_TABLES) -> int:
    """The table `link` names: main when None, a number, or a name in `rt_tables`."""
    if link is None:
        return MAIN_TABLE
    if link.isdigit():
        return int(link)
    try:
        lines = rt_tables.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) == 2 and fields[1] == link and fields[0].isdigit():
            return int(fields[0])
    raise NetworkError(link, f"no routing table of that name in {rt_tables}")


async def check(netlink: Netlink, plan: NicPlan) -> int | None:
    """Refuse a NIC whose table is unknown, or whose IPv6 address has no uplink to proxy
    NDP on; return that uplink's index (None for IPv4, or without an ip)."""
    table = routing_table(plan.link)
    if plan.ip is None or ipaddress.ip_address(plan.ip).version == 4:
        return None
    uplink = await netlink.default_route_device(socket.AF_INET6, table)
    if uplink is None:
        raise NetworkError(
            plan.link or plan.ip, f"no IPv6 default route in table {table} to proxy NDP on"
        )
    return uplink


async def set_up(netlink: Netlink, plan: NicPlan, tap: Device) -> None:
    """Bring `tap` up (with the NIC's MTU and its `tap_mac`) and route the NIC's ip to
    it."""
    uplink = await check(netlink, plan)
    table = routing_table(plan.link)
    try:
        await netlink.set_up(tap.index, mtu=plan.mtu, address=tap_mac(plan.mac))
        if plan.ip is None:
            return
        address = ipaddress.ip_address(plan.ip)
        await netlink.add_route(plan.ip, tap.index, table)
        if address.version == 4:
            set_interface_sysctl("ipv4", tap.name, "proxy_arp", 1)
            set_interface_sysctl("ipv4", tap.name, "forwarding", 1)
            return
        set_interface_sysctl("ipv6", tap.name, "forwarding", 1)
    except OSError as error:
        raise NetworkError(tap.name, f"cannot route {plan.ip}: {error.strerror}") from error
    try:
        if uplink is not None:
            await netlink.add_proxy_neighbour(plan.ip, uplink)
    except OSError as error:
        raise NetworkError(tap.name, f"cannot proxy NDP for {plan.ip}: {error.strerror}") from error


async def tear_down(netlink: Netlink, plan: NicPlan, tap: Device | None) -> None:
    """Remove what `set_up` added that outlives the tap; what is gone already is fine.

    The route goes when the tap is still there (the kernel drops it with the tap
    otherwise); the proxy NDP entries for the ip go from every interface (the uplink
    may have changed since set-up), unless the ip is routed to another interface: the
    other end of a migration on this host, whose NIC has the same ip and shares the
    entry (the target's after the switch-over, the source's when the target gives up).
    """
    if plan.ip is None:
        return
    table = routing_table(plan.link)
    try:
        if tap is not None:
            try:
                await netlink.del_route(plan.ip, tap.index, table)
            except OSError as error:
                if error.errno not in _GONE:
                    raise
        if ipaddress.ip_address(plan.ip).version == 6 and not await netlink.host_route_devices(
            plan.ip, table
        ):
            for link in devices():
                try:
                    await netlink.del_proxy_neighbour(plan.ip, link.index)
                except OSError as error:
                    if error.errno not in _GONE:
                        raise
    except OSError as error:
        name = plan.tap or plan.link or plan.ip
        raise NetworkError(name, f"cannot remove routing of {plan.ip}: {error.strerror}") from error
