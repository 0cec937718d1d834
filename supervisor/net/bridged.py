"""Bridged NICs: the tap is a port of the bridge named by the NIC's `link`.

Nothing outlives the tap: when its last fd closes the kernel removes the port, so
teardown has nothing to undo.
"""

from __future__ import annotations

import errno

from supervisor.model.errors import NetworkError
from supervisor.qemu.cmdline import NicPlan

from .netlink import Device, Link, Netlink
from .tun import tap_mac

__all__ = ["check", "set_up"]


async def check(netlink: Netlink, plan: NicPlan) -> Link:
    """The NIC's bridge; `NetworkError` naming it when it is missing or not a bridge, or
    naming the missing feature when the NIC has a `vlan` the bridge cannot carry."""
    name = plan.link or ""
    bridge = await netlink.link(name)
    if bridge is None:
        raise NetworkError(name, "no such bridge")
    if bridge.kind != "bridge":
        raise NetworkError(name, f"not a bridge (a {bridge.kind or 'plain'} interface)")
    if plan.vlan is not None:
        try:
            await netlink.probe_vlan_filtering(bridge)
        except OSError as error:
            if error.errno != errno.EOPNOTSUPP:
                raise NetworkError(name, f"cannot query the bridge: {error.strerror}") from error
            raise NetworkError(
                name,
                f"VLAN {plan.vlan} needs bridge VLAN filtering, which this kernel lacks "
                "(CONFIG_BRIDGE_VLAN_FILTERING)",
            ) from error
        if not await netlink.vlan_filtering(bridge):
            raise NetworkError(
                name, f"VLAN {plan.vlan} needs VLAN filtering on the bridge (vlan_filtering 0)"
            )
    return bridge


async def set_up(netlink: Netlink, plan: NicPlan, tap: Device, bridge: Link) -> None:
    """Make `tap` a port of `bridge` (the NIC's, as `check` found it: MTU the bridge's
    unless the NIC sets one), with its `tap_mac`, in the NIC's VLAN if it has one, and
    up."""
    address = tap_mac(plan.mac)
    try:
        if plan.vlan is None:
            await netlink.join_up(tap.index, bridge.index, plan.mtu or bridge.mtu, address=address)
        else:
            # In its VLAN before it is up: no frame goes out untagged meanwhile.
            await netlink.set_mtu(tap.index, plan.mtu or bridge.mtu, address=address)
            await netlink.set_master(tap.index, bridge.index)
            await netlink.add_port_vlan(tap.index, plan.vlan)
            await netlink.set_up(tap.index)
    except OSError as error:
        raise NetworkError(
            tap.name, f"cannot join bridge {bridge.name}: {error.strerror}"
        ) from error
