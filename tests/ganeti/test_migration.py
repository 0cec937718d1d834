"""`gnt-instance migrate`, live and non-live, between the two nodes' daemons.

The guest's heartbeat counter tells a guest that moved from one that rebooted: on the
target its count goes on from where the source left it, and it never says it booted.
"""

from __future__ import annotations

import re
from pathlib import Path

from helpers import wait_gone, wait_until

from .vcluster import BOOT_TIMEOUT_S, GUEST_MIB, VirtualCluster

#: Whole lines only: the line the guest was writing at the switch-over is cut in two.
_HEARTBEAT = re.compile(rb"KVS-HEARTBEAT (\d+)\r?\n")


def last_heartbeat(log: Path) -> int:
    beats = _HEARTBEAT.findall(log.read_bytes())
    return int(beats[-1]) if beats else 0


def migrate(cluster: VirtualCluster, name: str, source: str, target: str, *options: str) -> None:
    """Migrate `name` from `source` to `target`; check the guest went on there."""
    before = last_heartbeat(cluster.serial_log(source, name))
    pid = cluster.qemu_pid(source, name)
    cluster.gnt("gnt-instance", "migrate", "-f", *options, name)
    wait_gone(pid)
    assert cluster.status(name) == [name, "running", str(GUEST_MIB), "1", target]
    info = cluster.call(target, "instance.info", {"name": name})
    assert (info["state"], info["qemu_status"]) == ("running", "running")
    log = cluster.serial_log(target, name)
    wait_until(
        lambda: last_heartbeat(log) > before,
        what=f"{name}'s heartbeat going on past {before} on {target}",
        timeout_s=BOOT_TIMEOUT_S,
    )
    assert b"KVS-GUEST-READY" not in log.read_bytes()
    assert name not in [entry["name"] for entry in cluster.call(source, "instance.list")]


def test_live_migration_both_ways(vcluster: VirtualCluster) -> None:
    vcluster.add_instance("mig1", "node1", "--no-nics")
    try:
        vcluster.wait_serial("node1", "mig1")
        migrate(vcluster, "mig1", "node1", "node2")
        migrate(vcluster, "mig1", "node2", "node1")
    finally:
        vcluster.remove_instance("mig1")


def test_non_live_migration_leaves_the_guest_running(vcluster: VirtualCluster) -> None:
    vcluster.add_instance("mig2", "node2", "--no-nics")
    try:
        vcluster.wait_serial("node2", "mig2")
        migrate(vcluster, "mig2", "node2", "node1", "--non-live")
    finally:
        vcluster.remove_instance("mig2")


def test_migration_refused_by_the_target_leaves_the_guest_on_the_source(
    vcluster: VirtualCluster,
) -> None:
    """Ganeti's abort path: the target's daemon is down, so it cannot accept."""
    vcluster.add_instance("mig3", "node1", "--no-nics")
    try:
        log = vcluster.wait_serial("node1", "mig3")
        pid = vcluster.qemu_pid("node1", "mig3")
        vcluster.kill_daemon("node2")
        result = vcluster.run(["gnt-instance", "migrate", "-f", "mig3"], check=False)
        assert result.returncode != 0
        assert "kvm-supervisor daemon unreachable" in result.stdout + result.stderr
        assert vcluster.status("mig3") == ["mig3", "running", str(GUEST_MIB), "1", "node1"]
        assert vcluster.qemu_pid("node1", "mig3") == pid
        info = vcluster.call("node1", "instance.info", {"name": "mig3"})
        assert (info["state"], info["qemu_status"]) == ("running", "running")
        vcluster.wait_serial("node1", "mig3", offset=log.stat().st_size)
    finally:
        if "node2" not in vcluster.daemons:
            vcluster.start_daemon("node2")
            vcluster.wait_daemon("node2")
        vcluster.remove_instance("mig3")
