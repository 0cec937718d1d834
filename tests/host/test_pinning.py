"""CPU pinning of a real QEMU (-S, -smp 2), checked in /proc/<pid>/task/<tid>/status."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PausedQemu, start_paused_qemu

from protocols.qmp import QMPClient, connect
from supervisor.host.pinning import CpuPinningError, online_cpus, pin_vcpus
from supervisor.model.hvparams import parse_cpu_mask

pytestmark = pytest.mark.anyio

EVERY_CPU = "0-1"


@pytest.fixture(autouse=True)
def two_cpus() -> None:
    if online_cpus() != frozenset({0, 1}):
        pytest.skip("these tests expect a host with exactly CPUs 0 and 1")


@pytest.fixture
def smp2_qemu(short_tmp: Path) -> Iterator[PausedQemu]:
    qemu = start_paused_qemu(short_tmp, ["-smp", "2"])
    try:
        yield qemu
    finally:
        qemu.kill()
        if qemu.proc.stderr is not None:
            qemu.proc.stderr.close()


def allowed_cpus(pid: int, thread_id: int) -> str:
    status = Path(f"/proc/{pid}/task/{thread_id}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("Cpus_allowed_list:")]
    return line.split()[1]


async def vcpu_threads(qmp: QMPClient) -> list[int]:
    cpus = await qmp.execute("query-cpus-fast")
    return [cpu["thread-id"] for cpu in sorted(cpus, key=lambda cpu: cpu["cpu-index"])]


def all_threads(pid: int) -> list[int]:
    return [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]


async def test_one_mask_per_vcpu(smp2_qemu: PausedQemu) -> None:
    async with connect(smp2_qemu.qmp_path) as qmp:
        threads = await vcpu_threads(qmp)
        assert len(set(threads)) == 2
        await pin_vcpus(qmp, smp2_qemu.pid, parse_cpu_mask("1:0"))
        assert [allowed_cpus(smp2_qemu.pid, thread) for thread in threads] == ["1", "0"]
        await pin_vcpus(qmp, smp2_qemu.pid, parse_cpu_mask("all:0"))
        assert [allowed_cpus(smp2_qemu.pid, thread) for thread in threads] == [EVERY_CPU, "0"]
    # The main thread is left as it was.
    assert allowed_cpus(smp2_qemu.pid, smp2_qemu.pid) == EVERY_CPU


async def test_one_mask_for_the_whole_process(smp2_qemu: PausedQemu) -> None:
    async with connect(smp2_qemu.qmp_path) as qmp:
        await pin_vcpus(qmp, smp2_qemu.pid, parse_cpu_mask("1"))
        threads = all_threads(smp2_qemu.pid)
        assert len(threads) > 2
        assert {allowed_cpus(smp2_qemu.pid, thread) for thread in threads} == {"1"}
        # A single "all" pins nothing, as in Ganeti: the process keeps its affinity.
        await pin_vcpus(qmp, smp2_qemu.pid, parse_cpu_mask("all"))
        await pin_vcpus(qmp, smp2_qemu.pid, parse_cpu_mask(""))
        assert {allowed_cpus(smp2_qemu.pid, thread) for thread in threads} == {"1"}


async def test_mask_and_vcpu_count_must_agree(smp2_qemu: PausedQemu) -> None:
    async with connect(smp2_qemu.qmp_path) as qmp:
        threads = await vcpu_threads(qmp)
        with pytest.raises(CpuPinningError, match="3 entries but the VM has 2 vCPUs"):
            await pin_vcpus(qmp, smp2_qemu.pid, parse_cpu_mask("0:1:0"))
        assert [allowed_cpus(smp2_qemu.pid, thread) for thread in threads] == [EVERY_CPU] * 2


async def test_cpus_the_host_lacks(smp2_qemu: PausedQemu) -> None:
    async with connect(smp2_qemu.qmp_path) as qmp:
        with pytest.raises(CpuPinningError, match=r"vCPU 1 \(thread \d+\) to CPUs 5-6: Invalid"):
            await pin_vcpus(qmp, smp2_qemu.pid, parse_cpu_mask("0:5-6"))
        with pytest.raises(CpuPinningError, match=rf"process {smp2_qemu.pid} .* to CPUs 7"):
            await pin_vcpus(qmp, smp2_qemu.pid, parse_cpu_mask("7"))


async def test_a_process_that_is_gone(tmp_path: Path) -> None:
    with pytest.raises(CpuPinningError, match="it has exited"):
        # No QMP call is made for a single mask.
        await pin_vcpus(None, 2**22 + 1, parse_cpu_mask("0"))  # type: ignore[arg-type]


def test_online_cpus(tmp_path: Path) -> None:
    online = tmp_path / "online"
    online.write_text("0-3,6\n")
    assert online_cpus(online) == frozenset({0, 1, 2, 3, 6})
    assert online_cpus() == frozenset(range(os.cpu_count() or 1))
