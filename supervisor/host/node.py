"""What the node offers (``supervisor.info``'s ``node``) and what is wrong with it (``verify``),
as the API types that carry them (`supervisor.model.api.NodeInfo`, ``VerifyResult``).

Memory figures follow Ganeti's ``GetLinuxNodeInfo``: free memory is MemFree + Buffers +
Cached (page cache can be reclaimed for guests), and the memory used by the node itself
("dom0") is Active.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Final

from supervisor.model.api import NodeInfo, VerifyResult

__all__ = [
    "KVM_DEVICE",
    "MODULES_DIR",
    "TUN_DEVICE",
    "kvm_is_paravirtual",
    "node_info",
    "verify_node",
]

KVM_DEVICE: Final = Path("/dev/kvm")
TUN_DEVICE: Final = Path("/dev/net/tun")
MODULES_DIR: Final = Path("/sys/module")
MEMINFO: Final = Path("/proc/meminfo")


def _meminfo_kib(text: str) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields:
            values[key.strip()] = int(fields[0])
    return values


def node_info(hv_version: tuple[int, int, int], *, meminfo: Path = MEMINFO) -> NodeInfo:
    """The node's figures; `hv_version` is the probed QEMU's ``(major, minor, micro)``.

    Raises ValueError if `meminfo` lacks MemTotal or MemFree.
    """
    kib = _meminfo_kib(meminfo.read_text())
    for required in ("MemTotal", "MemFree"):
        if required not in kib:
            raise ValueError(f"{meminfo} has no {required} line")
    free = kib["MemFree"] + kib.get("Buffers", 0) + kib.get("Cached", 0)
    return NodeInfo(
        memory_total_mib=kib["MemTotal"] // 1024,
        memory_free_mib=free // 1024,
        memory_dom0_mib=kib.get("Active", 0) // 1024,
        cpu_count=os.cpu_count() or 1,
        hv_version=list(hv_version),
    )


def kvm_is_paravirtual(modules_dir: Path = MODULES_DIR) -> bool:
    """Whether /dev/kvm comes from ``kvm_pvm``, which boots only PVM-enabled guest kernels.

    Hosts without VT-x/AMD-V (nested clouds) may offer it; stock guests hang under it.
    """
    return (modules_dir / "kvm_pvm").is_dir()


def _binary_problem(program: str) -> str | None:
    path = program if os.sep in program else shutil.which(program)
    if path is None:
        return f"{program} is not installed (not found in PATH)"
    if not os.path.isfile(path):
        return f"{path} is missing"
    if not os.access(path, os.X_OK):
        return f"{path} is not executable"
    return None


def _device_problem(device: Path) -> str | None:
    try:
        if not stat.S_ISCHR(device.stat().st_mode):
            return f"{device} is not a character device"
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except OSError as error:
        return f"cannot open {device}: {error.strerror}"
    return None


def _state_dir_problem(state_dir: Path) -> str | None:
    if not state_dir.exists():
        return f"state dir {state_dir} does not exist"
    if not state_dir.is_dir():
        return f"state dir {state_dir} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=state_dir):
            pass
    except OSError as error:
        return f"state dir {state_dir} is not writable: {error.strerror}"
    return None


def verify_node(
    *,
    qemu_path: str,
    state_dir: Path,
    qemu_img: str = "qemu-img",
    kvm_device: Path = KVM_DEVICE,
    tun_device: Path = TUN_DEVICE,
    modules_dir: Path = MODULES_DIR,
) -> VerifyResult:
    """Check what instances need from the node.

    Problems: a missing or non-executable QEMU or qemu-img (a bare name is looked up in
    PATH), a /dev/kvm that exists but cannot be opened, no usable /dev/net/tun (no NICs), a
    state dir that is missing or not writable. Warnings: no /dev/kvm, or a paravirtual one
    (``kvm_pvm``), so that guests run under TCG.
    """
    problems: list[str] = []
    warnings: list[str] = []
    for program in (qemu_path, qemu_img):
        if problem := _binary_problem(program):
            problems.append(problem)
    if not kvm_device.exists():
        warnings.append(f"{kvm_device} is missing: guests run under TCG (emulation, slow)")
    elif problem := _device_problem(kvm_device):
        problems.append(problem)
    elif kvm_is_paravirtual(modules_dir):
        warnings.append(
            f"{kvm_device} is kvm_pvm (paravirtual KVM, no VT-x/AMD-V): stock guest kernels "
            'hang under it, so guests run under TCG unless kvm_flag = "enabled"'
        )
    if problem := _device_problem(tun_device):
        problems.append(f"{problem}: instances cannot have NICs")
    if problem := _state_dir_problem(state_dir):
        problems.append(problem)
    return VerifyResult(problems=problems, warnings=warnings)
