"""What the engine calls: name, check, open, set up and tear down an instance's NICs.

The order of a start is::

    plans = with_tap_names(plans, uuid)       # names kept in the runtime record
    await check_host(plans)                   # before QEMU: refuse early, change nothing
    taps = open_taps(plans)                   # fds for QEMU's -netdev tap,fd=/fds=
    try:
        ...spawn QEMU with pass_fds=every tap's fds...
    finally:
        close_taps(taps)                      # QEMU holds its own copies now
    await set_up(plans)                       # before `cont`
    ...
    await tear_down(plans)                    # after QEMU exited (stop, crash, cleanup,
                                              # adoption of a gone QEMU, failed start)

The taps die with QEMU (they are not persistent); `tear_down` removes what outlives them
(proxy NDP entries) and is safe to repeat, and to call whether the taps still exist or
not. Every failure is a `NetworkError` (code 10) whose `interface` names the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import msgspec

from supervisor.log import get_logger
from supervisor.model.errors import NetworkError
from supervisor.qemu.cmdline import NicPlan

from . import bridged, routed
from .netlink import Link, Netlink
from .tun import TUN_DEVICE, OpenTap, open_tap, tap_name

__all__ = ["check_host", "close_taps", "open_taps", "set_up", "tear_down", "with_tap_names"]

_log = get_logger(__name__)

#: Seconds a teardown may take after its caller was cancelled.
TEARDOWN_TIMEOUT_S = 10.0


def with_tap_names(plans: Sequence[NicPlan], instance_uuid: str) -> list[NicPlan]:
    """The plans with `tap` set to each NIC's deterministic tap name."""
    return [
        msgspec.structs.replace(plan, tap=tap_name(instance_uuid, plan.index)) for plan in plans
    ]


def _tap(plan: NicPlan) -> str:
    if plan.tap is None:
        raise ValueError(f"NIC {plan.index} has no tap name: use with_tap_names first")
    return plan.tap


async def check_host(plans: Sequence[NicPlan]) -> None:
    """Refuse, before anything is created, NICs this host cannot set up.

    Checks ``/dev/net/tun``, every bridged NIC's bridge (exists, is a bridge, carries
    its VLAN), every routed NIC's table and, for IPv6, the uplink its proxy NDP entry
    goes on. Changes nothing.
    """
    if plans and not await anyio.Path(TUN_DEVICE).exists():
        raise NetworkError(TUN_DEVICE, "no tun device: the kernel needs the tun module")
    async with Netlink() as netlink:
        for plan in plans:
            if plan.mode == "bridged":
                await bridged.check(netlink, plan)
            elif plan.mode == "routed":
                await routed.check(netlink, plan)
            else:
                raise NetworkError(
                    plan.link or _tap(plan), "openvswitch NICs are not available yet"
                )


def open_taps(plans: Sequence[NicPlan]) -> list[OpenTap]:
    """Open every NIC's tap (its `vnet_hdr` and `queues`); on failure close those opened.

    The fds are close-on-exec: pass them to QEMU with ``pass_fds``, then `close_taps`.
    """
    taps: list[OpenTap] = []
    try:
        for plan in plans:
            taps.append(open_tap(_tap(plan), vnet_hdr=plan.vnet_hdr, queues=plan.queues))
    except BaseException:
        close_taps(taps)
        raise
    return taps


def close_taps(taps: Sequence[OpenTap]) -> None:
    """Close the daemon's copies of the tap fds."""
    for tap in taps:
        tap.close()


async def set_up(plans: Sequence[NicPlan]) -> None:
    """Connect every NIC's (open) tap as its mode says; on failure or cancellation undo
    it all (`tear_down`, shielded) and re-raise the failure (a teardown failure on the
    way is logged: the first cause is the one to report)."""
    try:
        async with Netlink() as netlink:
            for plan in plans:
                await _set_up_one(netlink, plan)
    except BaseException:
        try:
            await tear_down(plans)
        except NetworkError as error:
            _log.warning("NIC rollback failed", interface=error.interface, reason=error.reason)
        raise


async def _set_up_one(netlink: Netlink, plan: NicPlan) -> None:
    try:
        tap = await _existing_tap(netlink, plan)
        if plan.mode == "bridged":
            await bridged.set_up(netlink, plan, tap)
        elif plan.mode == "routed":
            await routed.set_up(netlink, plan, tap)
        else:
            raise NetworkError(plan.link or tap.name, "openvswitch NICs are not available yet")
    except OSError as error:
        # A lookup the mode modules do not expect to fail (the netlink socket itself).
        raise NetworkError(_tap(plan), f"netlink: {error.strerror or error}") from error


async def _existing_tap(netlink: Netlink, plan: NicPlan) -> Link:
    tap = await netlink.link(_tap(plan))
    if tap is None:
        raise NetworkError(_tap(plan), "the tap is gone (did QEMU exit?)")
    return tap


async def tear_down(plans: Sequence[NicPlan]) -> None:
    """Remove what the NICs' set-up added that outlives their taps; idempotent.

    Runs shielded from cancellation, within `TEARDOWN_TIMEOUT_S` (TimeoutError past it).
    Tries every NIC even when one fails, then raises the first failure.
    """
    first: NetworkError | None = None
    with anyio.CancelScope(shield=True), anyio.fail_after(TEARDOWN_TIMEOUT_S):
        async with Netlink() as netlink:
            for plan in plans:
                if plan.mode != "routed":
                    continue
                try:
                    await routed.tear_down(netlink, plan, await netlink.link(_tap(plan)))
                except NetworkError as error:
                    first = first or error
    if first is not None:
        raise first
