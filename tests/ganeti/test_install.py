"""`kvm-supervisor ganeti-install` / `ganeti-uninstall` on a (virtual) node's root."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from supervisor.ganeti.settings import defaults_file, driver_dir, load_settings, user_base

NODE = "node7"
DEFAULTS = "# Default arguments for Ganeti daemons\nNODED_ARGS=''\nRAPI_ARGS='-b 127.0.0.1'\n"


@pytest.fixture
def node_root(short_tmp: Path) -> Iterator[Path]:
    root = short_tmp / NODE
    defaults_file(str(root)).parent.mkdir(parents=True)
    defaults_file(str(root)).write_text(DEFAULTS)
    yield root


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": str(REPO),
            "GANETI_ROOTDIR": str(root),
            "GANETI_HOSTNAME": root.name,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_install_writes_the_hook_and_says_what_it_wrote(node_root: Path) -> None:
    socket = node_root / "var" / "lib" / "kvm-supervisor" / "control.sock"
    result = cli(node_root, "--socket", str(socket), "ganeti-install")
    assert result.returncode == 0, result.stderr
    root = str(node_root)
    settings = load_settings(root)
    assert settings.socket == str(socket)
    assert settings.project == str(REPO)
    [pth] = user_base(root).glob("lib/python3*/site-packages/kvm-supervisor.pth")
    defaults = defaults_file(root).read_text()
    assert defaults.startswith(DEFAULTS)
    assert f"export PYTHONUSERBASE='{user_base(root)}'" in defaults
    for path in (driver_dir(root) / "driver.toml", pth, defaults_file(root)):
        assert f"wrote {path}:" in result.stdout
    assert "loads supervisor.ganeti.hypervisor.KvmSupervisorHypervisor" in result.stdout
    # Ganeti's job processes run as gnt-masterd: everything must be readable by others.
    for path in (pth, *pth.relative_to(driver_dir(root)).parents):
        found = driver_dir(root) / path
        wanted = 0o005 if found.is_dir() else 0o004
        assert found.stat().st_mode & wanted == wanted, found

    again = cli(node_root, "--socket", str(socket), "ganeti-install")
    assert again.returncode == 0, again.stderr
    assert defaults_file(root).read_text() == defaults  # one block, not two

    removed = cli(node_root, "ganeti-uninstall")
    assert removed.returncode == 0, removed.stderr
    assert defaults_file(root).read_text() == DEFAULTS
    assert not driver_dir(root).exists()
    assert f"removed {driver_dir(root)}" in removed.stdout
    nothing = cli(node_root, "ganeti-uninstall")
    assert nothing.returncode == 0
    assert "nothing to remove" in nothing.stdout


def test_install_refuses_what_it_cannot_do(node_root: Path) -> None:
    no_ganeti = cli(node_root, "ganeti-install", "--ganeti-lib", str(node_root / "nowhere"))
    assert no_ganeti.returncode == 2
    assert "Ganeti's Python modules are not in" in no_ganeti.stderr
    assert not driver_dir(str(node_root)).exists()

    defaults_file(str(node_root)).write_text(DEFAULTS + "export PYTHONUSERBASE=/opt/mine\n")
    taken = cli(node_root, "ganeti-install")
    assert taken.returncode == 2
    assert "sets PYTHONUSERBASE already" in taken.stderr
    assert not driver_dir(str(node_root)).exists()  # checked before anything is written

    remote = cli(node_root, "--connect", "ssh://node1", "ganeti-install")
    assert remote.returncode == 2
