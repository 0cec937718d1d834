"""What the engine calls: name, check, open, set up and tear down an instance's NICs.

The order of a start is::

    plans = with_tap_names(plans, uuid, state_dir=...)  # kept in the runtime record
    bridges = await network.check_host(plans) # before QEMU: refuse early, change nothing
    taps = open_taps(plans)                   # fds for QEMU's -netdev tap,fd=/fds=
    try:
        ...spawn QEMU with pass_fds=every tap's fds...
    finally:
        close_taps(taps)                      # QEMU holds its own copies now
    await network.set_up(plans, bridges=bridges)  # before `cont` (a migration target:
                                              # SWITCHED_MODES before, ROUTED_MODES at
                                              # its finalize)
    ...
    await network.tear_down(plans)            # after QEMU exited (stop, crash, cleanup,
                                              # adoption of a gone QEMU, failed start)

`network` is a `Networking`: the host-wide settings (the OVSDB socket). The taps die
with QEMU (they are not persistent); `tear_down` removes what outlives them (proxy NDP
entries, Open vSwitch ports) and is safe to repeat, and to call whether the taps still
exist or not. Every failure is a `NetworkError` (code 10) whose `interface` names the
device.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Final, Literal

import anyio
import msgspec

from protocols import ovsdb
from supervisor.log import get_logger
from supervisor.model.errors import NetworkError
from supervisor.qemu.cmdline import NicPlan

from . import bridged, ovs, routed
from .hook import run_nic_hook
from .netlink import Device, Link, Netlink, device
from .tun import TUN_DEVICE, OpenTap, open_tap, tap_mac, tap_name

__all__ = [
    "ROUTED_MODES",
    "SWITCHED_MODES",
    "Networking",
    "close_taps",
    "open_taps",
    "tap_fds",
    "with_tap_names",
]

_log = get_logger(__name__)

#: NICs that are ports of a switch (a Linux bridge, Open vSwitch), and NICs the host
#: routes to: a migration target sets up the first before the guest arrives (they must
#: be up at its switch-over), the second once the migration is finalized.
SWITCHED_MODES: Final = frozenset({"bridged", "openvswitch"})
ROUTED_MODES: Final = frozenset({"routed"})

#: Seconds a teardown may take after its caller was cancelled.
TEARDOWN_TIMEOUT_S = 10.0


def with_tap_names(
    plans: Sequence[NicPlan], instance_uuid: str, *, state_dir: str
) -> list[NicPlan]:
    """The plans with `tap` set to each NIC's deterministic tap name, the daemon's of
    `state_dir` (`tap_name`)."""
    return [
        msgspec.structs.replace(plan, tap=tap_name(instance_uuid, plan.index, state_dir=state_dir))
        for plan in plans
    ]


def _tap(plan: NicPlan) -> str:
    if plan.tap is None:
        raise ValueError(f"NIC {plan.index} has no tap name: use with_tap_names first")
    return plan.tap


def open_taps(plans: Sequence[NicPlan]) -> list[OpenTap]:
    """Open every NIC's tap (its `vnet_hdr` and `queues`); on failure close those opened.

    The fds are close-on-exec: pass them to QEMU with ``pass_fds``, then `close_taps`.
    `tap_fds` maps them to the plans' fd names.
    """
    taps: list[OpenTap] = []
    try:
        for plan in plans:
            taps.append(
                open_tap(_tap(plan), vnet_hdr=plan.vnet_hdr, queues=plan.queues, vhost=plan.vhost)
            )
    except BaseException:
        close_taps(taps)
        raise
    return taps


def close_taps(taps: Sequence[OpenTap]) -> None:
    """Close the daemon's copies of the tap fds."""
    for tap in taps:
        tap.close()


def tap_fds(plans: Sequence[NicPlan], taps: Sequence[OpenTap]) -> dict[str, int]:
    """Every fd name of the plans (`NicPlan.fd_names`, `NicPlan.vhost_fd_names`) -> its fd."""
    fds: dict[str, int] = {}
    for plan, tap in zip(plans, taps, strict=True):
        fds.update(zip(plan.fd_names, tap.fds, strict=True))
        fds.update(zip(plan.vhost_fd_names, tap.vhost_fds, strict=True))
    return fds


class Networking:
    """The host's network as the engine sees it: check, set up and tear down NIC plans.

    `ovsdb_socket` is ovsdb-server's socket (config ``ovsdb_socket``), reached only for
    ``openvswitch`` NICs; `ovsdb_timeout_s` bounds connecting and each request. `hook`
    is the optional per-NIC executable (config ``nic_hook``), run with ``ACTION=up`` once
    a NIC is connected and ``ACTION=down`` before it is torn down, within
    `hook_timeout_s` (`supervisor.net.hook`).
    """

    def __init__(
        self,
        *,
        ovsdb_socket: str,
        ovsdb_timeout_s: float = 10.0,
        hook: str | None = None,
        hook_timeout_s: float = 30.0,
    ) -> None:
        self.ovsdb_socket = ovsdb_socket
        self.ovsdb_timeout_s = ovsdb_timeout_s
        self.hook = hook
        self.hook_timeout_s = hook_timeout_s

    @asynccontextmanager
    async def _ovsdb(self, plans: Sequence[NicPlan]) -> AsyncIterator[ovsdb.OVSDBClient | None]:
        """A connection to ovsdb-server when some plan is an Open vSwitch NIC, else None."""
        if not any(plan.mode == "openvswitch" for plan in plans):
            yield None
            return
        async with ovs.connect_ovsdb(self.ovsdb_socket, timeout_s=self.ovsdb_timeout_s) as db:
            yield db

    async def check_host(self, plans: Sequence[NicPlan]) -> dict[str, Link]:
        """Refuse, before anything is created, NICs this host cannot set up; the Linux
        bridges of the bridged NICs, by name (`set_up` need not look them up again).

        Checks ``/dev/net/tun``, every bridged NIC's bridge (exists, is a bridge,
        carries its VLAN), every routed NIC's table and, for IPv6, the uplink its proxy
        NDP entry goes on, and every Open vSwitch NIC's bridge (Open vSwitch running,
        the bridge in its database). Changes nothing.
        """
        bridges: dict[str, Link] = {}
        if not plans:
            return bridges
        # A stat in devtmpfs never waits for a disk: no worker thread needed.
        if not os.path.exists(TUN_DEVICE):  # noqa: ASYNC240
            raise NetworkError(TUN_DEVICE, "no tun device: the kernel needs the tun module")
        async with Netlink() as netlink, self._ovsdb(plans) as db:
            checked: set[tuple[str | None, bool]] = set()  # a bridge, with a VLAN or not
            for plan in plans:
                if plan.mode == "bridged":
                    bridge = (plan.link, plan.vlan is not None)
                    if bridge not in checked:
                        bridges[plan.link or ""] = await bridged.check(netlink, plan)
                        checked.add(bridge)
                elif plan.mode == "routed":
                    await routed.check(netlink, plan)
                else:
                    assert db is not None
                    await _check_ovs_bridge(db, plan)
        return bridges

    async def set_up(
        self,
        plans: Sequence[NicPlan],
        *,
        instance: str,
        tags: Sequence[str] = (),
        modes: Collection[str] | None = None,
        bridges: Mapping[str, Link] | None = None,
    ) -> None:
        """Connect every NIC's (open) tap as its mode says, then run the hook for it; on
        failure or cancellation undo it all (`tear_down`, shielded) and re-raise the
        failure (a teardown failure on the way is logged: the first cause is the one to
        report). With `modes`, only the NICs of those modes (`SWITCHED_MODES`,
        `ROUTED_MODES`). `bridges` are those `check_host` just found (others are looked
        up): a bridge deleted since fails the join, as one deleted after a lookup here
        would."""
        if modes is not None:
            plans = [plan for plan in plans if plan.mode in modes]
        if not plans:
            return
        try:
            async with Netlink() as netlink, self._ovsdb(plans) as db:
                found = dict(bridges or {})  # each looked up once per batch
                for plan in plans:
                    await _set_up_one(netlink, db, plan, found)
                    await self._run_hook("up", plan, instance, tags)
        except BaseException:
            try:
                await self.tear_down(plans, instance=instance, tags=tags)
            except NetworkError as error:
                _log.warning("NIC rollback failed", interface=error.interface, reason=error.reason)
            raise

    async def _run_hook(
        self, action: Literal["up", "down"], plan: NicPlan, instance: str, tags: Sequence[str]
    ) -> None:
        if self.hook is not None:
            await run_nic_hook(
                self.hook,
                action,
                instance=instance,
                plan=plan,
                tags=tags,
                timeout_s=self.hook_timeout_s,
            )

    async def tear_down(
        self, plans: Sequence[NicPlan], *, instance: str, tags: Sequence[str] = ()
    ) -> None:
        """Run the hook (``down``) for every NIC, then remove what the NICs' set-up added
        that outlives their taps; idempotent (so the hook must be too: it also runs for
        a NIC whose set-up failed before its ``up``).

        Runs shielded from cancellation, the removals within `TEARDOWN_TIMEOUT_S`
        (TimeoutError past it), each hook within its own timeout. Tries every NIC even
        when one fails (Open vSwitch gone, say), then raises the first failure.
        """
        first: NetworkError | None = None
        with anyio.CancelScope(shield=True):
            for plan in plans:
                try:
                    await self._run_hook("down", plan, instance, tags)
                except NetworkError as error:
                    first = first or error
        plans = [plan for plan in plans if _may_outlive_its_tap(plan)]
        if not plans:
            if first is not None:
                raise first
            return
        with anyio.CancelScope(shield=True), anyio.fail_after(TEARDOWN_TIMEOUT_S):
            async with AsyncExitStack() as stack:
                netlink = await stack.enter_async_context(Netlink())
                db = None
                try:
                    db = await stack.enter_async_context(self._ovsdb(plans))
                except NetworkError as error:
                    first = error
                for plan in plans:
                    try:
                        if plan.mode == "routed":
                            await routed.tear_down(netlink, plan, device(_tap(plan)))
                        elif plan.mode == "openvswitch" and db is not None:
                            await ovs.del_port(db, _tap(plan))
                    except NetworkError as error:
                        first = first or error
        if first is not None:
            raise first


def _may_outlive_its_tap(plan: NicPlan) -> bool:
    """Whether the NIC's set-up may have left something a teardown removes.

    A bridge port goes with its tap, and so do an IPv4 NIC's route and sysctls: only
    while the tap exists is its route there to remove. An IPv6 NIC's proxy NDP entry
    and an Open vSwitch port outlive it.
    """
    if plan.mode == "bridged":
        return False
    if plan.mode == "routed" and (plan.ip is None or ipaddress.ip_address(plan.ip).version == 4):
        return device(_tap(plan)) is not None
    return True


async def _check_ovs_bridge(db: ovsdb.OVSDBClient, plan: NicPlan) -> None:
    bridge = plan.link or ""
    if not await ovs.bridge_exists(db, bridge):
        raise NetworkError(bridge, f"Open vSwitch has no bridge {bridge!r}")


async def _set_up_one(
    netlink: Netlink, db: ovsdb.OVSDBClient | None, plan: NicPlan, bridges: dict[str, Link]
) -> None:
    try:
        tap = _existing_tap(plan)
        if plan.mode == "bridged":
            bridge = bridges.get(plan.link or "")
            if bridge is None:
                bridge = bridges[plan.link or ""] = await bridged.check(netlink, plan)
            await bridged.set_up(netlink, plan, tap, bridge)
        elif plan.mode == "routed":
            await routed.set_up(netlink, plan, tap)
        else:
            assert db is not None
            await _set_up_ovs(netlink, db, plan, tap)
    except OSError as error:
        # A lookup the mode modules do not expect to fail (the netlink socket itself).
        raise NetworkError(_tap(plan), f"netlink: {error.strerror or error}") from error


async def _set_up_ovs(netlink: Netlink, db: ovsdb.OVSDBClient, plan: NicPlan, tap: Device) -> None:
    """Make `tap` a port of the NIC's Open vSwitch bridge, tagged with its `vlan`, and up.

    A port of the tap's name left by an interrupted start of this instance (tap names
    are the instance's own) is replaced.
    """
    try:
        await netlink.set_up(tap.index, mtu=plan.mtu, address=tap_mac(plan.mac))
    except OSError as error:
        raise NetworkError(tap.name, f"cannot bring the tap up: {error.strerror}") from error
    await ovs.del_port(db, tap.name)
    await ovs.add_port(db, plan.link or "", tap.name, tag=plan.vlan)


def _existing_tap(plan: NicPlan) -> Device:
    tap = device(_tap(plan))
    if tap is None:
        raise NetworkError(_tap(plan), "the tap is gone (did QEMU exit?)")
    return tap
