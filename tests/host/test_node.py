"""Node info from /proc/meminfo and node verification, on this machine and with fakes."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest
from conftest import QEMU

from supervisor.host.node import kvm_is_paravirtual, node_info, verify_node
from supervisor.model.api import NodeInfo

MEMINFO = """\
MemTotal:        2048000 kB
MemFree:          512000 kB
MemAvailable:    1000000 kB
Buffers:           10240 kB
Cached:           102400 kB
Active:           307200 kB
Inactive:         204800 kB
HugePages_Total:       0
"""


def test_node_info_follows_ganeti(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    info = node_info((7, 2, 0), meminfo=meminfo)
    assert info == NodeInfo(
        memory_total_mib=2000,
        memory_free_mib=610,  # (512000 + 10240 + 102400) // 1024
        memory_dom0_mib=300,
        cpu_count=os.cpu_count() or 1,
        hv_version=[7, 2, 0],
    )
    assert msgspec.json.decode(msgspec.json.encode(info))["hv_version"] == [7, 2, 0]


def test_node_info_needs_memtotal(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree: 1 kB\n")
    with pytest.raises(ValueError, match="no MemTotal"):
        node_info((7, 2, 0), meminfo=meminfo)


def test_node_info_on_this_machine() -> None:
    info = node_info((7, 2, 0))
    assert 0 < info.memory_free_mib <= info.memory_total_mib
    assert 0 < info.memory_dom0_mib <= info.memory_total_mib
    assert info.cpu_count == os.cpu_count()


def test_verify_this_machine(tmp_path: Path) -> None:
    result = verify_node(qemu_path=QEMU, state_dir=tmp_path)
    assert result.problems == []
    paravirtual = Path("/sys/module/kvm_pvm").is_dir()
    assert kvm_is_paravirtual() == paravirtual
    assert any("kvm_pvm" in warning for warning in result.warnings) == paravirtual


def test_verify_reports_missing_binaries_and_devices(tmp_path: Path) -> None:
    not_executable = tmp_path / "qemu"
    not_executable.write_text("")
    result = verify_node(
        qemu_path=str(not_executable),
        qemu_img="no-such-qemu-img",
        state_dir=tmp_path / "missing",
        kvm_device=tmp_path / "kvm",
        tun_device=tmp_path / "tun",
    )
    assert result.problems == [
        f"{not_executable} is not executable",
        "no-such-qemu-img is not installed (not found in PATH)",
        f"cannot open {tmp_path / 'tun'}: No such file or directory: instances cannot have NICs",
        f"state dir {tmp_path / 'missing'} does not exist",
    ]
    assert result.warnings == [
        f"{tmp_path / 'kvm'} is missing: guests run under TCG (emulation, slow)"
    ]


def test_verify_reports_unusable_devices_and_state_dir(tmp_path: Path) -> None:
    fake_kvm = tmp_path / "kvm"
    fake_kvm.write_text("")
    result = verify_node(
        qemu_path=str(tmp_path / "absent-qemu"),
        state_dir=fake_kvm,
        kvm_device=fake_kvm,
        tun_device=Path("/dev/null"),
    )
    assert result.problems == [
        f"{tmp_path / 'absent-qemu'} is missing",
        f"{fake_kvm} is not a character device",
        f"state dir {fake_kvm} is not a directory",
    ]
    [problem] = verify_node(qemu_path=QEMU, state_dir=Path("/proc")).problems
    assert problem.startswith("state dir /proc is not writable: ")


@pytest.mark.parametrize("paravirtual", [True, False])
def test_paravirtual_kvm_is_a_warning(tmp_path: Path, paravirtual: bool) -> None:
    if not Path("/dev/kvm").exists():
        pytest.skip("this machine has no /dev/kvm")
    if paravirtual:
        (tmp_path / "kvm_pvm").mkdir()
    result = verify_node(qemu_path=QEMU, state_dir=tmp_path, modules_dir=tmp_path)
    assert result.problems == []
    assert len(result.warnings) == int(paravirtual)
