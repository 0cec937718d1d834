"""Faults under Ganeti: a node's daemon killed, a guest that ignores the power button."""

from __future__ import annotations

import re
import time

from helpers import wait_gone

from .vcluster import KERNEL_ARGS, VirtualCluster

#: `gnt-instance stop --timeout`: the ACPI wait before the kill.
STOP_TIMEOUT_S = 5
#: What the kill, QEMU's exit and Ganeti's job add to it, on a loaded machine.
STOP_MARGIN_S = 60


def test_daemon_killed_while_ganeti_runs_an_instance(vcluster: VirtualCluster) -> None:
    vcluster.add_instance("db1", "node2")
    try:
        log = vcluster.wait_serial("node2", "db1")
        pid = vcluster.qemu_pid("node2", "db1")
        vcluster.kill_daemon("node2")
        # Ganeti cannot tell without the daemon, and its verify says why; the guest runs on.
        down = vcluster.gnt("gnt-instance", "list", "--no-headers", "-o", "status", "db1")
        assert down.strip() != "running"
        verify = vcluster.run(["gnt-cluster", "verify", "--error-codes"], check=False).stdout
        assert re.search(r"ERROR:ENODEHV:node:node2:.*kvm-supervisor daemon unreachable", verify), (
            verify
        )
        vcluster.start_daemon("node2")
        vcluster.wait_daemon("node2")
        assert vcluster.status("db1")[:2] == ["db1", "running"]
        assert vcluster.qemu_pid("node2", "db1") == pid  # adopted, not restarted
        vcluster.wait_serial("node2", "db1", offset=log.stat().st_size)
    finally:
        if "node2" not in vcluster.daemons:
            vcluster.start_daemon("node2")
            vcluster.wait_daemon("node2")
        vcluster.remove_instance("db1")


def test_stop_of_a_guest_ignoring_acpi_ends_within_ganetis_timeout(
    vcluster: VirtualCluster,
) -> None:
    # acpi=off: the guest kernel never sees the power button.
    vcluster.add_instance("deaf1", "node2", "-H", f"kvm:kernel_args={KERNEL_ARGS} acpi=off")
    try:
        log = vcluster.wait_serial("node2", "deaf1")
        pid = vcluster.qemu_pid("node2", "deaf1")
        # Ganeti removes the log with the instance's runtime files: read it through an
        # open file.
        with log.open("rb") as serial:
            started = time.monotonic()
            vcluster.gnt("gnt-instance", "stop", f"--timeout={STOP_TIMEOUT_S}", "deaf1")
            elapsed = time.monotonic() - started
            wait_gone(pid)
            assert b"Power down" not in serial.read()
        assert vcluster.status("deaf1")[:2] == ["deaf1", "ADMIN_down"]
        assert STOP_TIMEOUT_S <= elapsed < STOP_TIMEOUT_S + STOP_MARGIN_S
    finally:
        vcluster.remove_instance("deaf1")
