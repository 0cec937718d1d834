"""Instances through Ganeti's own commands, run by each node's kvm-supervisor.

One instance (one bridged NIC on the bridge both nodes share, the test guest) serves
the tests of this module in turn: add, info and list, the serial console, stop and
start, reboot. Each test leaves it running; the fixture removes it.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Iterator

import pytest
from helpers import wait_gone

from .vcluster import BOOT_TIMEOUT_S, BRIDGE, GUEST_MIB, VirtualCluster


@pytest.fixture(scope="module")
def web1(vcluster: VirtualCluster) -> Iterator[str]:
    vcluster.add_instance("web1", "node1")
    try:
        vcluster.wait_serial("node1", "web1")
        yield "web1"
    finally:
        vcluster.remove_instance("web1")


def test_add_runs_the_guest_on_kvm_supervisor(vcluster: VirtualCluster, web1: str) -> None:
    info = vcluster.call("node1", "instance.info", {"name": web1})
    assert info["state"] == "running"
    assert info["memory_mib"] == GUEST_MIB
    [nic] = info["nics"]
    assert (nic["mode"], nic["link"]) == ("bridged", BRIDGE)
    assert vcluster.status(web1) == [web1, "running", str(GUEST_MIB), "1", "node1"]
    details = vcluster.gnt("gnt-instance", "info", web1)
    assert "actual state is up" in details
    # Ganeti's uuid and MAC are the daemon's: the spec came from Ganeti's objects.
    assert info["uuid"] in details
    assert nic["mac"] in details


def test_console_is_the_serial_console_over_ssh(vcluster: VirtualCluster, web1: str) -> None:
    shown = vcluster.gnt("gnt-instance", "console", "--show-cmd", web1)
    assert "ssh" in shown and f"console {web1}" in shown
    console = subprocess.Popen(
        vcluster.inside(["gnt-instance", "console", web1]),
        env=vcluster.ganeti_env("node1"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert console.stdin is not None and console.stdout is not None
    seen = b""

    def read_until(marker: bytes) -> None:
        nonlocal seen
        assert console.stdout is not None
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while marker not in seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {marker!r} on the console: {seen[-2000:]!r}"
            readable, _, _ = select.select([console.stdout], [], [], remaining)
            if readable:
                chunk = os.read(console.stdout.fileno(), 65536)
                assert chunk, f"the console ended: {seen[-2000:]!r}"
                seen += chunk

    try:
        # Typed before the console is attached, a line would go to the remote terminal
        # before kvm-supervisor's console switches it to raw mode, which flushes it.
        read_until(b"attached to")
        console.stdin.write(b"echo kvs-$((6*7))\n")
        console.stdin.flush()
        read_until(b"kvs-42")
        console.stdin.write(b"\x1d")  # Ctrl-]: kvm-supervisor's console detaches
        console.stdin.close()
        assert console.wait(timeout=60) == 0
    finally:
        if console.poll() is None:
            console.kill()
            console.wait()
        console.stdout.close()


def test_stop_and_start(vcluster: VirtualCluster, web1: str) -> None:
    pid = vcluster.qemu_pid("node1", web1)
    vcluster.gnt("gnt-instance", "stop", web1)
    wait_gone(pid)
    assert vcluster.status(web1)[:2] == [web1, "ADMIN_down"]
    # Ganeti cleans up after a stop: the daemon forgets the instance.
    assert vcluster.call("node1", "instance.list") == []
    vcluster.gnt("gnt-instance", "start", web1)
    vcluster.wait_serial("node1", web1)
    assert vcluster.status(web1)[:2] == [web1, "running"]


def test_hard_reboot(vcluster: VirtualCluster, web1: str) -> None:
    """Ganeti's default reboot: its own stop, clean-up and start (a new serial log)."""
    pid = vcluster.qemu_pid("node1", web1)
    vcluster.gnt("gnt-instance", "reboot", "--type=hard", web1)
    wait_gone(pid)
    assert vcluster.qemu_pid("node1", web1) != pid
    vcluster.wait_serial("node1", web1, b"KVS-GUEST-READY")
    assert vcluster.status(web1)[:2] == [web1, "running"]


def test_soft_reboot(vcluster: VirtualCluster, web1: str) -> None:
    """The driver's RebootInstance: the daemon's reboot (ACPI, then the same runtime)."""
    pid = vcluster.qemu_pid("node1", web1)
    uuid = vcluster.call("node1", "instance.info", {"name": web1})["uuid"]
    log = vcluster.wait_serial("node1", web1)  # the guest handles ACPI once it runs
    offset = log.stat().st_size
    vcluster.gnt("gnt-instance", "reboot", "--type=soft", web1)
    wait_gone(pid)
    vcluster.wait_serial("node1", web1, b"KVS-GUEST-READY", offset)
    vcluster.wait_serial("node1", web1, b"KVS-HEARTBEAT 1\r", offset)
    assert vcluster.call("node1", "instance.info", {"name": web1})["uuid"] == uuid
    assert vcluster.status(web1)[:2] == [web1, "running"]
