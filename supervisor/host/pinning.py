"""CPU pinning of a QEMU's threads, per Ganeti's ``cpu_mask`` (``_AssignCpuAffinity``).

The mask is parsed by `supervisor.model.hvparams.parse_cpu_mask` into one entry per vCPU, or a
single entry for the whole VM; an entry is a set of host CPUs or None for ``all``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec

from protocols.qmp import QMPClient
from supervisor.log import get_logger
from supervisor.model.hvparams import CpuSet, format_cpu_mask, parse_cpu_mask

__all__ = ["CpuPinningError", "online_cpus", "pin_vcpus"]

_log = get_logger(__name__)

ONLINE_CPUS: Final = Path("/sys/devices/system/cpu/online")


class CpuPinningError(Exception):
    """A thread could not be pinned, or the mask does not fit the VM's vCPUs."""


class _VcpuThread(msgspec.Struct, rename="kebab"):
    """One entry of ``query-cpus-fast`` (other fields ignored)."""

    cpu_index: int
    thread_id: int


def online_cpus(online: Path = ONLINE_CPUS) -> frozenset[int]:
    """The host CPUs that are online (what ``all`` means in a per-vCPU mask)."""
    # The kernel's list syntax ("0-3,6") is the cpu_mask syntax.
    [cpus] = parse_cpu_mask(online.read_text().strip())
    if cpus is None:
        raise ValueError(f"{online} does not list CPUs")
    return cpus


def _pinning_error(
    what: str, thread_id: int, cpus: frozenset[int], error: OSError
) -> CpuPinningError:
    cpu_list = format_cpu_mask([cpus])
    return CpuPinningError(
        f"cannot pin {what} (thread {thread_id}) to CPUs {cpu_list}: {error.strerror}"
    )


def _pin_process(pid: int, cpus: frozenset[int]) -> None:
    try:
        thread_ids = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    except FileNotFoundError:
        raise CpuPinningError(f"cannot pin process {pid}: it has exited") from None
    for thread_id in thread_ids:
        try:
            os.sched_setaffinity(thread_id, cpus)
        except ProcessLookupError:
            continue  # the thread ended since the listing: nothing left to pin
        except OSError as error:
            raise _pinning_error(f"process {pid}", thread_id, cpus, error) from error


async def pin_vcpus(qmp: QMPClient, pid: int, masks: Sequence[CpuSet]) -> None:
    """Pin the threads of the QEMU with pid `pid` as `masks` (a parsed cpu_mask) says.

    - No entry, or a single ``all``: nothing is pinned (the process keeps the affinity it
      inherited), as in Ganeti.
    - A single set: every thread of the process (``/proc/<pid>/task``) is pinned to it;
      threads QEMU starts later inherit it from the threads that create them.
    - One entry per vCPU: each vCPU thread (from ``query-cpus-fast``) is pinned to its
      entry; ``all`` is every online host CPU.

    Call it while the VM is paused (started with ``-S``), before ``cont``. Raises
    `CpuPinningError` when the number of entries is not the number of vCPUs or a CPU
    cannot be used; QMP errors propagate. On cancellation (only possible during the QMP
    query) nothing has been pinned.
    """
    if not masks:
        return
    if len(masks) == 1:
        if masks[0] is not None:
            _pin_process(pid, masks[0])
            _log.debug("pinned process", pid=pid, cpus=format_cpu_mask(list(masks)))
        return
    vcpus = msgspec.convert(await qmp.execute("query-cpus-fast"), list[_VcpuThread])
    vcpus.sort(key=lambda vcpu: vcpu.cpu_index)
    if [vcpu.cpu_index for vcpu in vcpus] != list(range(len(masks))):
        raise CpuPinningError(
            f"cpu_mask has {len(masks)} entries but the VM has {len(vcpus)} vCPUs"
        )
    every_cpu = online_cpus()
    for vcpu, cpus in zip(vcpus, masks, strict=True):
        wanted = every_cpu if cpus is None else cpus
        try:
            os.sched_setaffinity(vcpu.thread_id, wanted)
        except OSError as error:
            raise _pinning_error(f"vCPU {vcpu.cpu_index}", vcpu.thread_id, wanted, error) from error
    _log.debug("pinned vCPUs", pid=pid, cpu_mask=format_cpu_mask(list(masks)))
