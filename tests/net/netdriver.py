"""Scenarios run inside a test network namespace (``ip netns exec NS python netdriver.py
SCENARIO``), each on asyncio and on trio; prints one JSON object per backend.

Taps die with the process that holds them, so what a scenario observes (with ``ip``,
inside the same namespace) it observes while it still holds their fds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from protocols import qmp
from supervisor.model.errors import HypervisorError, NetworkError
from supervisor.net import nics
from supervisor.net.tun import OpenTap
from supervisor.qemu.cmdline import NicPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import await_until, kill_leftover_qemus, start_listening, wait_until

QEMU = os.environ.get("KVM_SUPERVISOR_TEST_QEMU", "/usr/bin/qemu-system-x86_64")
#: Tap names are the daemon's own: named after its state dir.
STATE_DIR = "/var/lib/kvm-supervisor"
UUID = "6f1c0a52-3d2b-4c39-9a8e-0d7f4e2b1a10"
#: No Open vSwitch NICs here: the socket is never reached.
UPLINK_MAC = "52:54:00:ff:00:01"
NETWORK = nics.Networking(ovsdb_socket="/nonexistent/db.sock")


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def plan(index: int, mode: str, **fields: Any) -> NicPlan:
    defaults: dict[str, Any] = {
        "mac": f"52:54:00:00:00:{index:02x}",
        "netdev_id": f"netdev{index}",
        "device_id": f"nic{index}",
        "model": "virtio-net-pci",
        "fd_names": ("tapfd",),
        "vnet_hdr": True,
        "queues": 1,
        "vhost": False,
    }
    return NicPlan(index=index, mode=mode, **{**defaults, **fields})  # type: ignore[arg-type]


def links() -> list[str]:
    return sorted(
        line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link").splitlines()
    )


def error_of(error: NetworkError) -> dict[str, Any]:
    return {"code": error.code, "interface": error.data["interface"], "message": str(error)}


async def taps() -> dict[str, Any]:
    plans = nics.with_tap_names(
        [plan(0, "bridged"), plan(1, "bridged", queues=4)], UUID, state_dir=STATE_DIR
    )
    opened = nics.open_taps(plans)
    try:
        details = {tap.name: ip("-d", "-o", "link", "show", tap.name) for tap in opened}
        fds = [len(tap.fds) for tap in opened]
        reopen: dict[str, Any] | None = None
        try:
            nics.open_taps(plans[:1])
        except NetworkError as error:
            reopen = error_of(error)
    finally:
        nics.close_taps(opened)
    return {
        "names": [p.tap for p in plans],
        "details": details,
        "fds": fds,
        "reopen": reopen,
        "links_after": links(),
    }


async def with_open(plans: list[NicPlan], body: Callable[[], Awaitable[Any]]) -> Any:
    opened: list[OpenTap] = nics.open_taps(plans)
    try:
        return await body()
    finally:
        nics.close_taps(opened)


def address(name: str) -> str:
    """Interface `name`'s MAC address."""
    (link,) = json.loads(ip("-j", "link", "show", name))
    return str(link["address"])


def bridge_ports(bridge: str) -> dict[str, int]:
    ports = {}
    for line in ip("-o", "link", "show", "master", bridge).splitlines():
        fields = line.split()
        ports[fields[1].rstrip(":")] = int(fields[fields.index("mtu") + 1])
    return ports


async def bridged() -> dict[str, Any]:
    plans = nics.with_tap_names(
        [plan(0, "bridged", link="br0"), plan(1, "bridged", link="br0", mtu=1400)],
        UUID,
        state_dir=STATE_DIR,
    )

    async def body() -> dict[str, Any]:
        # An uplink port: the bridge has its address (lower than the taps').
        ip("link", "add", "upl0", "address", UPLINK_MAC, "type", "veth", "peer", "name", "upl1")
        ip("link", "set", "upl0", "master", "br0", "up")
        bridge_address = address("br0")
        bridges = await NETWORK.check_host(plans)
        await NETWORK.set_up(plans, instance="vm1", bridges=bridges)
        ports = {name: mtu for name, mtu in bridge_ports("br0").items() if "upl0" not in name}
        up = ["UP" in ip("-o", "link", "show", p.tap or "").split(">")[0] for p in plans]
        addresses = [address(p.tap or "") for p in plans]
        bridge_addresses = [bridge_address, address("br0")]
        ip("link", "del", "upl0")
        await NETWORK.tear_down(plans, instance="vm1")
        checked = {name: [link.index, link.mtu] for name, link in bridges.items()}
        return {
            "ports": ports,
            "up": up,
            "addresses": addresses,
            "bridge_addresses": bridge_addresses,
            "ports_after_teardown": bridge_ports("br0"),
            "checked": checked,
        }

    found = await with_open(plans, body)
    # A bridge the check found, deleted (and made again: a new device) before the set-up.
    bridges = await NETWORK.check_host(plans)
    ip("link", "del", "br0")
    ip("link", "add", "br0", "type", "bridge")
    ip("link", "set", "br0", "mtu", "1450", "up")

    async def stale() -> None:
        try:
            await NETWORK.set_up(plans, instance="vm1", bridges=bridges)
        except NetworkError as error:
            found["stale"] = error_of(error)
        found["stale_ports"] = bridge_ports("br0")

    await with_open(plans, stale)
    return {
        **found,
        "names": [p.tap for p in plans],
        "br0_index": int(ip("-o", "link", "show", "br0").split(":")[0]),
        "links_after": links(),
    }


def routes(*table: str) -> list[str]:
    """The routes (destination and device) of both families; a family may have no table."""
    found = []
    for family in ("-4", "-6"):
        shown = subprocess.run(
            ["ip", family, "route", "show", *table], capture_output=True, text=True, check=False
        )
        found += [" ".join(line.split()[:3]) for line in shown.stdout.splitlines()]
    return found


def sysctl(family: str, name: str, key: str) -> str:
    return Path(f"/proc/sys/net/{family}/conf/{name}/{key}").read_text().strip()


async def routed() -> dict[str, Any]:
    plans = nics.with_tap_names(
        [
            plan(0, "routed", ip="10.77.0.5"),
            plan(1, "routed", ip="10.77.0.6", link="100"),
            plan(2, "routed", ip="fd00:77::5", mtu=1400),
        ],
        UUID,
        state_dir=STATE_DIR,
    )
    tap4, tap4t, tap6 = (p.tap or "" for p in plans)

    async def body() -> dict[str, Any]:
        await NETWORK.check_host(plans)
        await NETWORK.set_up(plans, instance="vm1")
        seen = {
            "main": routes(),
            "table100": routes("table", "100"),
            "sysctl": [
                sysctl("ipv4", tap4, "proxy_arp"),
                sysctl("ipv4", tap4, "forwarding"),
                sysctl("ipv4", tap4t, "proxy_arp"),
                sysctl("ipv6", tap6, "forwarding"),
            ],
            "proxy": ip("-6", "neigh", "show", "proxy").split(),
            "address4": address(tap4),
            "mtu6": ip("-o", "link", "show", tap6).split("mtu")[1].split()[0],
        }
        await NETWORK.tear_down(plans, instance="vm1")
        await NETWORK.tear_down(plans, instance="vm1")  # idempotent
        return {
            **seen,
            "main_after": routes(),
            "table100_after": routes("table", "100"),
            "proxy_after": ip("-6", "neigh", "show", "proxy").split(),
        }

    found = await with_open(plans, body)
    return {**found, "names": [tap4, tap4t, tap6], "links_after": links()}


async def routed_taps_gone() -> dict[str, Any]:
    """Teardown after the taps died with their QEMU (a crash, or an adopted instance whose
    QEMU is gone): the kernel took the routes, teardown takes the proxy entry."""
    plans = nics.with_tap_names(
        [plan(0, "routed", ip="10.77.0.5"), plan(1, "routed", ip="fd00:77::5")],
        UUID,
        state_dir=STATE_DIR,
    )
    no_uplink = nics.with_tap_names(
        [plan(2, "routed", ip="fd00:77::6", link="100")], UUID, state_dir=STATE_DIR
    )
    refused: dict[str, Any] | None = None
    try:
        await NETWORK.check_host(no_uplink)
    except NetworkError as error:
        refused = error_of(error)
    await with_open(plans, lambda: NETWORK.set_up(plans, instance="vm1"))
    seen = {"routes": routes(), "proxy": ip("-6", "neigh", "show", "proxy").split()}
    await NETWORK.tear_down(plans, instance="vm1")
    return {
        **seen,
        "no_uplink": refused,
        "proxy_after": ip("-6", "neigh", "show", "proxy").split(),
        "links_after": links(),
    }


async def errors() -> dict[str, Any]:
    missing = nics.with_tap_names(
        [plan(0, "routed", ip="10.77.0.9"), plan(1, "bridged", link="nobr0")],
        UUID,
        state_dir=STATE_DIR,
    )
    vlan = nics.with_tap_names([plan(0, "bridged", link="br0", vlan=42)], UUID, state_dir=STATE_DIR)
    found: dict[str, Any] = {}
    for label, plans in (("missing", missing), ("vlan", vlan)):
        try:
            await NETWORK.check_host(plans)
        except NetworkError as error:
            found[f"{label}_check"] = error_of(error)

        async def body(plans: list[NicPlan] = plans, label: str = label) -> None:
            try:
                await NETWORK.set_up(plans, instance="vm1")
            except NetworkError as error:
                found[f"{label}_set_up"] = error_of(error)
            found[f"{label}_routes_after"] = routes()
            found[f"{label}_ports_after"] = bridge_ports("br0")

        await with_open(plans, body)
    found["vlan_filtering"] = "vlan_filtering 0" in ip("-d", "link", "show", "br0")
    found["links_after"] = links()
    return found


async def qemu_holds_the_tap() -> dict[str, Any]:
    """A QEMU started -S with a 2-queue tap's fds: the tap lives while QEMU does (the
    daemon's copies closed), is a port of br0, and is gone once QEMU is killed."""
    plans = nics.with_tap_names(
        [plan(0, "bridged", link="br0", queues=2)], UUID, state_dir=STATE_DIR
    )
    name = plans[0].tap or ""
    workdir = Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))
    qmp_path = workdir / "qmp.sock"
    try:
        opened = nics.open_taps(plans)
        fds = opened[0].fds
        args = [
            QEMU, "-S", "-nodefaults", "-display", "none", "-machine", "accel=tcg", "-m", "64",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-netdev", f"tap,id=n0,fds={':'.join(map(str, fds))}",
            "-device", "virtio-net-pci,netdev=n0,mq=on,vectors=6",
        ]  # fmt: skip
        try:
            proc = start_listening(
                args, [qmp_path], pass_fds=fds, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        finally:
            nics.close_taps(opened)
        try:
            # QMP listens before QEMU opens its netdevs: its reply proves they are set up.
            async with qmp.connect(qmp_path) as client:
                network = await client.execute(
                    "human-monitor-command", {"command-line": "info network"}
                )
            await NETWORK.set_up(plans, instance="vm1")
            while_alive = {"links": links(), "ports": bridge_ports("br0")}
        finally:
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        wait_until(lambda: name not in links(), what=f"{name} gone", timeout_s=30)
        await NETWORK.tear_down(plans, instance="vm1")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"name": name, "network": network, **while_alive, "links_after": links()}


async def embedded() -> dict[str, Any]:
    """An embedded `Supervisor` starts an instance (paused: no guest code runs) with a
    bridged and a routed NIC, loses its QEMU to SIGKILL, starts it again and stops it."""
    from core.conftest import check_config_dict, guest_spec

    from supervisor.engine.supervisor import Supervisor

    workdir = Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))
    (workdir / "defs").mkdir()
    hook, hook_log = workdir / "nic-hook", workdir / "hook.log"
    hook.write_text(
        "#!/bin/sh\n"
        f'echo "$ACTION $INSTANCE $INTERFACE_INDEX $MODE ${{BRIDGE:--}} ${{IP:--}}" >> {hook_log}\n'
        'if [ "$INSTANCE" = refused ]; then echo "no uplink for $INTERFACE" >&2; exit 3; fi\n'
        # Holds the set-up of "doomed"'s first NIC until its QEMU has failed.
        'if [ "$INSTANCE" = doomed ] && [ "$ACTION" = up ]; then sleep 2; fi\n'
    )
    hook.chmod(0o755)
    config = check_config_dict(
        {
            "state_dir": str(workdir),
            "instances_dir": str(workdir / "defs"),
            "hvparams": {},
            "nic_hook": str(hook),
        }
    )
    spec = guest_spec(
        "vm1",
        uuid=UUID,
        nics=[{"link": "br0", "mtu": 1400}, {"mode": "routed", "ip": "10.77.9.9"}],
    )
    found: dict[str, Any] = {}

    def snapshot() -> dict[str, Any]:
        return {"ports": bridge_ports("br0"), "routes": routes(), "links": links()}

    try:
        async with Supervisor(config) as sup:
            info = await sup.start(spec, paused=True)
            found["nics"] = [[nic.tap, nic.mode, nic.link, nic.ip, nic.mtu] for nic in info.nics]
            found["started"] = snapshot()
            assert info.pid is not None
            os.kill(info.pid, 9)
            await await_until(
                lambda: sup.info("vm1").state == "crashed", what="crashed", timeout_s=30
            )
            found["after_kill"] = snapshot()
            await sup.start(name="vm1", paused=True)
            found["restarted"] = snapshot()
            await sup.stop("vm1", force=True)
            found["after_stop"] = snapshot()
            await sup.cleanup("vm1")
            found["hook_runs"] = hook_log.read_text().splitlines()
            hook_log.unlink()
            try:
                await sup.start(guest_spec("refused", nics=[{"link": "br0"}]), paused=True)
            except NetworkError as error:
                found["refused"] = error_of(error)
            found["refused_hook_runs"] = hook_log.read_text().splitlines()
            found["after_refused"] = snapshot()
            # The NICs are set up while QEMU initializes: a QEMU that fails meanwhile
            # (an unknown device) takes its taps along, and the start says why QEMU failed.
            doomed = guest_spec(
                "doomed",
                nics=[{"link": "br0"}, {"link": "br0"}],
                hvparams={"kvm_extra": "-device no-such-device"},
            )
            try:
                await sup.start(doomed, paused=True)
            except HypervisorError as error:
                found["doomed"] = {
                    "code": error.code,
                    "message": str(error),
                    "stderr": error.stderr,
                }
            found["after_doomed"] = snapshot()
    finally:
        kill_leftover_qemus(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    return found


SCENARIOS = {
    "embedded": embedded,
    "taps": taps,
    "bridged": bridged,
    "routed": routed,
    "routed_taps_gone": routed_taps_gone,
    "errors": errors,
    "qemu": qemu_holds_the_tap,
}


def main() -> None:
    scenario = SCENARIOS[sys.argv[1]]
    print(json.dumps({b: anyio.run(scenario, backend=b) for b in ("asyncio", "trio")}))


if __name__ == "__main__":
    main()
