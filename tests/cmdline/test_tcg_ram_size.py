"""The RAM size on the command line: a TCG guest's is not a multiple of 256 KiB.

QEMU 7.2 under TCG loses guest stores during a live migration of a RAM block whose size
is a multiple of 64 pages (supervisor.qemu.cmdline.TCG_RAM_PAD_KIB says why); KVM
guests get exactly ``memory_mib``.
"""

from __future__ import annotations

import pytest

from supervisor.qemu.accel import Accelerator
from supervisor.qemu.cmdline import TCG_RAM_PAD_KIB

from .test_builder import build, option

#: 64 target pages: QEMU's fast dirty-bitmap sync takes blocks sized in these.
FAST_SYNC_UNIT_KIB = 256


@pytest.mark.parametrize("memory_mib", [96, 128, 2048, 4096])
def test_a_tcg_guest_gets_ram_qemu_syncs_page_by_page(memory_mib: int) -> None:
    command = build({"memory_mib": memory_mib}, accel=Accelerator.TCG)
    [size] = option(command, "-m")
    assert size == f"{memory_mib * 1024 + TCG_RAM_PAD_KIB}k"
    kib = int(size.removesuffix("k"))
    assert kib % FAST_SYNC_UNIT_KIB != 0
    # QEMU rounds RAM up to 8 KiB: the size is the one the guest gets.
    assert kib % 8 == 0
    assert kib >= memory_mib * 1024


def test_a_kvm_guest_gets_exactly_its_memory() -> None:
    command = build({"memory_mib": 96}, accel=Accelerator.KVM)
    assert option(command, "-m") == ["96"]
