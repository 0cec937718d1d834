"""The driver on its own, in Ganeti's Python, against a real daemon (driver_scenario.py).

A node of no cluster: a root directory (``GANETI_ROOTDIR``) with Ganeti's
``etc/default/ganeti``, `kvm-supervisor ganeti-install` run in it, a daemon of its own,
and the scenario run with the environment Ganeti's daemons get from that file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import GUEST_DIR, REPO
from helpers import kill_leftover_qemus, wait_until

from supervisor.ganeti.rpc import DaemonClient, DaemonUnreachable
from supervisor.ganeti.settings import user_base

from .vcluster import KERNEL_ARGS

SCENARIO = Path(__file__).with_name("driver_scenario.py")
GANETI_PYTHON = "/usr/bin/python3"
NODE = "node9"


@dataclass(frozen=True)
class DriverNode:
    root: Path
    socket: Path

    def env(self) -> dict[str, str]:
        """What ``etc/default/ganeti`` gives Ganeti's daemons on this node."""
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "GANETI_ROOTDIR": str(self.root),
            "GANETI_HOSTNAME": NODE,
            "PYTHONUSERBASE": str(user_base(str(self.root))),
        }

    def install(self, socket: Path) -> None:
        subprocess.run(
            [sys.executable, "-m", "supervisor", "--socket", str(socket), "ganeti-install"],
            env={**self.env(), "PYTHONPATH": str(REPO)},
            check=True,
            capture_output=True,
            timeout=120,
        )

    def scenario(self, *args: str) -> dict[str, Any]:
        result = subprocess.run(
            [GANETI_PYTHON, str(SCENARIO), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        found: dict[str, Any] = json.loads(result.stdout)
        return found


def _daemon_answers(proc: subprocess.Popen[bytes], socket: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"kvm-supervisor exited {proc.returncode}")
    try:
        with DaemonClient(str(socket)) as daemon:
            daemon.call("supervisor.ping")
    except DaemonUnreachable:
        return False
    return True


@pytest.fixture(scope="module")
def driver_node() -> Iterator[DriverNode]:
    if not Path(GANETI_PYTHON).exists() or not Path("/usr/share/ganeti/default").exists():
        pytest.fail("Ganeti is missing: run `make deps`")
    base = Path(tempfile.mkdtemp(prefix="kvsd-", dir="/tmp"))
    root = base / NODE
    state = root / "var" / "lib" / "kvm-supervisor"
    config = base / "supervisor.toml"
    (root / "etc" / "default").mkdir(parents=True)
    (root / "etc" / "default" / "ganeti").write_text("NODED_ARGS=''\n")
    config.write_text(
        f'state_dir = "{state}"\ninstances_dir = "{base / "defs"}"\nstop_timeout_s = 30.0\n'
    )
    node = DriverNode(root=root, socket=state / "control.sock")
    with (base / "daemon.log").open("wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "serve", "--config", str(config)],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        node.install(node.socket)
        wait_until(
            lambda: _daemon_answers(daemon, node.socket),
            what="kvm-supervisor answers",
            timeout_s=60,
        )
        yield node
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        kill_leftover_qemus(state)
        shutil.rmtree(base, ignore_errors=True)


def test_every_method_against_a_real_daemon(driver_node: DriverNode) -> None:
    r = driver_node.scenario(
        "running", str(GUEST_DIR / "vmlinuz"), str(GUEST_DIR / "initrd.img"), KERNEL_ARGS
    )
    assert r["class"] == "supervisor.ganeti.hypervisor.KvmSupervisorHypervisor"
    assert r["verify"] == {"ok": None}
    node_info = r["node_info"]["ok"]
    assert node_info["memory_total"] >= node_info["memory_free"] > 0
    assert node_info["cpu_total"] >= 1
    assert node_info["hv_version"][:2] == [7, 2]
    assert r["list_before"] == {"ok": []}
    assert r["info_before"] == {"ok": None}

    assert r["start"] == {"ok": None}
    assert r["start_again"]["error"] == "HypervisorError"
    assert "already running" in r["start_again"]["message"]
    name, pid, memory, vcpus, state, _ = r["info"]["ok"]
    assert (name, memory, vcpus, state) == ("drv1", 96, 1, 0)  # HvInstanceState.RUNNING
    assert pid > 0
    assert r["list"] == {"ok": ["drv1"]}
    assert [entry[0] for entry in r["all_info"]["ok"]] == ["drv1"]
    assert r["verify_instance"] == {"ok": True}
    assert r["verify_namesake"] == {"ok": False}

    assert r["balloon"] == {"ok": None}
    assert r["ballooned_memory"] == 80
    assert r["reboot"] == {"ok": None}
    assert r["rebooted_pid_changed"] is True

    console = r["console"]["ok"]
    assert (console["kind"], console["host"], console["user"]) == ("ssh", "node9", "root")
    assert console["command"][-3:] == [str(driver_node.socket), "console", "drv1"]
    # Another node's socket is the same path under that node's root (vcluster-aware).
    other = r["console_other_node"]["ok"]["command"]
    assert other[-3] == str(driver_node.socket).replace("/node9/", "/node8/", 1)
    assert r["console_none"]["ok"]["kind"] == "msg"
    for call in ("hotplug_supported", "hotplug_verify", "hotadd"):
        assert r[call]["error"] == "HotplugError", call

    assert r["syntax_ok"] == {"ok": None}
    for call, words in {
        "syntax_unknown": "bogus",
        "syntax_boot_order": "boot_order",
        "syntax_port": "migration_port",
        "syntax_security": "security domain",
        "validate_kernel": "kernel_path",
        "validate_user": "no-such-user-kvs",
    }.items():
        assert r[call]["error"] == "HypervisorError", call
        assert words in r[call]["message"], (call, r[call]["message"])
    assert r["validate_ok"] == {"ok": None}

    assert r["migration_info"] == {"ok": True}  # the opaque payload, a string
    # No migration here ("none"): Ganeti asks only during one, so that one is lost.
    assert r["migration_status_idle"]["ok"]["status"] == "failed"
    assert r["stop"] == {"ok": None}
    assert r["info_after_stop"] == {"ok": None}
    assert r["list_after_stop"] == {"ok": []}
    assert r["cleanup"] == {"ok": None}
    assert r["cleanup_again"] == {"ok": None}
    assert r["stop_by_name_unforced"]["error"] == "HypervisorError"
    assert r["kill_by_name_unknown"] == {"ok": None}
    assert r["stop_unknown"] == {"ok": None}
    assert r["migration_info_unknown"]["error"] == "HypervisorError"
    assert "not found" in r["migration_info_unknown"]["message"]
    with DaemonClient(str(driver_node.socket)) as daemon:
        assert daemon.call("instance.list") == []


def test_without_a_daemon_the_driver_says_so(driver_node: DriverNode) -> None:
    missing = driver_node.socket.with_name("gone.sock")
    driver_node.install(missing)
    try:
        r = driver_node.scenario("unreachable")
    finally:
        driver_node.install(driver_node.socket)
    assert "kvm-supervisor daemon unreachable" in r["verify"]["ok"]
    assert str(missing) in r["verify"]["ok"]
    for call in ("info", "list"):
        assert r[call]["error"] == "HypervisorError"
        assert "unreachable" in r[call]["message"]
