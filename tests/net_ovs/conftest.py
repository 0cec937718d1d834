"""A private Open vSwitch for the tests: ovsdb-server with its own database and run dir,
and ovs-vswitchd (userspace datapath only), both in a network namespace the fixture
creates and always deletes, both ended by pid. The host's namespace and any system
Open vSwitch are never touched. `running_ovs` starts the pair in a namespace of the
caller's (tests/net_guest runs it next to the daemon)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from net.conftest import host_links, namespace

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
_DAEMONS = ("ovsdb-server", "ovs-vswitchd")


@dataclass(frozen=True)
class PrivateOVS:
    """A running ovsdb-server + ovs-vswitchd pair."""

    netns: str
    rundir: Path

    @property
    def socket(self) -> Path:
        return self.rundir / "db.sock"

    def vsctl(self, *args: str) -> str:
        """ovs-vsctl on this database only: the independent check of what the client did."""
        command = ["ovs-vsctl", f"--db=unix:{self.socket}", "--no-wait", "--timeout=10", *args]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()

    def in_netns(self, *command: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.netns, *command], check=True)


def _start_detached(netns: str, rundir: Path, daemon: str, *args: str) -> None:
    """Start a daemon with --detach: it returns once the daemon is ready (listening, or
    connected to its database), and the daemon's pid is in its pidfile."""
    name = daemon
    command = [
        "ip", "netns", "exec", netns, daemon, *args,
        f"--pidfile={rundir / name}.pid", f"--unixctl={rundir / name}.ctl",
        f"--log-file={rundir / name}.log", "--no-chdir", "--detach",
    ]  # fmt: skip
    env = {**os.environ, "OVS_RUNDIR": str(rundir), "OVS_DBDIR": str(rundir)}
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=30)


def _end_by_pidfile(pidfile: Path) -> None:
    """SIGTERM, then SIGKILL after 10 s, the daemon named in the pidfile; waits on its
    pidfd, which becomes readable when it has exited (zombie or reaped)."""
    try:
        pid = int(pidfile.read_text())
        pidfd = os.pidfd_open(pid)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            signal.pidfd_send_signal(pidfd, sig)
            if select.select([pidfd], [], [], 10)[0]:
                return
    except ProcessLookupError:
        return
    finally:
        os.close(pidfd)


@contextmanager
def running_ovs(netns: str) -> Iterator[PrivateOVS]:
    """ovsdb-server (a fresh database) and ovs-vswitchd in `netns`, with a run dir of
    their own in /tmp; both ended by pid and the run dir removed on the way out."""
    rundir = Path(tempfile.mkdtemp(prefix="kvs-ovs-", dir="/tmp"))
    try:
        ovs = PrivateOVS(netns, rundir)
        subprocess.run(["ovsdb-tool", "create", str(rundir / "conf.db"), str(SCHEMA)], check=True)
        _start_detached(
            netns, rundir, "ovsdb-server", str(rundir / "conf.db"), f"--remote=punix:{ovs.socket}"
        )
        # The root row ovs-vswitchd reads its configuration from.
        ovs.vsctl("init")
        _start_detached(netns, rundir, "ovs-vswitchd", f"unix:{ovs.socket}")
        yield ovs
    finally:
        # The switch first: it would log the database's disappearance.
        for daemon in reversed(_DAEMONS):
            _end_by_pidfile(rundir / f"{daemon}.pid")
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture
def private_ovs() -> Iterator[PrivateOVS]:
    before = host_links()
    with namespace("kvs-ovs") as netns, running_ovs(netns) as ovs:
        yield ovs
    # Bridges, taps and OVS ports all stayed in the test namespace.
    assert host_links() == before
