"""Ganeti's objects to kvm-supervisor's messages and back (API.md §3).

- ``objects.Instance`` (with its block devices) -> an InstanceSpec: the name, uuid,
  maximum memory and vCPUs of its beparams, its NICs with their nicparams, its disks' block
  device paths, its tags and all its hvparams (Ganeti's fully filled KVM parameters,
  which kvm-supervisor takes under the same names);
- InstanceInfo -> the ``(name, id, memory, vcpus, state, times)`` tuple of
  ``hv_base.BaseHypervisor.GetInstanceInfo``;
- ``supervisor.info`` -> ``GetNodeInfo``'s dict; MigrationStatus -> Ganeti's.

Runs inside Ganeti's Python: the standard library and Ganeti's modules only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from ganeti import constants, errors, objects
from ganeti.hypervisor import hv_base

#: States in which QEMU runs the instance (or is about to, or is receiving it): Ganeti
#: counts all of them as running, as its own KVM driver counts a live QEMU process.
ALIVE_STATES: Final = frozenset(
    {"starting", "running", "paused", "stopping", "migrating", "incoming"}
)
#: Why a guest stopped when it powered itself off (API.md §4, ``instance.state``).
GUEST_SHUTDOWN: Final = "guest-shutdown"

#: QEMU's migration statuses that Ganeti must keep polling through: its migration loop
#: takes any status outside ``active``/``postcopy-active`` as the end of the transfer.
_STILL_MIGRATING: Final = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug"})
_MIB: Final = 1024 * 1024


def instance_spec(
    instance: objects.Instance, block_devices: Sequence[tuple[Any, str, str | None]]
) -> dict[str, Any]:
    """The InstanceSpec that runs `instance` with `block_devices` (Ganeti's tuples
    ``(disk, link_name, drive_uri)``).

    It depends on Ganeti's configuration only, never on the node (free memory), so a
    migration target builds the very spec the source runs.
    """
    beparams = instance.beparams
    memory = int(beparams[constants.BE_MAXMEM])
    spec: dict[str, Any] = {
        "name": instance.name,
        "uuid": instance.uuid,
        "memory_mib": memory,
        "vcpus": int(beparams[constants.BE_VCPUS]),
        "disks": [_disk(index, *device) for index, device in enumerate(block_devices)],
        "nics": [_nic(index, nic) for index, nic in enumerate(instance.nics)],
        "tags": sorted(instance.GetTags()),
        # Ganeti's watcher restarts instances that went down: never twice.
        "restart": "never",
        "hvparams": dict(instance.hvparams),
    }
    if instance.network_port:
        spec["network_port"] = int(instance.network_port)
    return spec


def _disk(index: int, disk: Any, link_name: str, drive_uri: str | None) -> dict[str, Any]:
    access = (disk.params or {}).get(constants.LDP_ACCESS, constants.DISK_KERNELSPACE)
    if drive_uri and access == constants.DISK_USERSPACE:
        raise errors.HypervisorError(
            f"disk {index}: userspace access ({drive_uri}) is not supported by kvm-supervisor;"
            " use kernelspace access"
        )
    mode = "ro" if disk.mode == constants.DISK_RDONLY else "rw"
    return {"path": link_name, "mode": mode, "format": "raw"}


def _nic(index: int, nic: objects.NIC) -> dict[str, Any]:
    params = nic.nicparams
    entry: dict[str, Any] = {"mac": nic.mac, "mode": params[constants.NIC_MODE]}
    if params.get(constants.NIC_LINK):
        entry["link"] = params[constants.NIC_LINK]
    if nic.ip:
        entry["ip"] = nic.ip
    vlan = params.get(constants.NIC_VLAN)
    if vlan:
        entry["vlan"] = _access_vlan(index, vlan)
    return entry


def _access_vlan(index: int, vlan: str) -> int:
    """Ganeti writes an access VLAN as ``.N`` (or ``N``) and trunks as ``:N:M`` or
    ``.N:M``; kvm-supervisor's NICs carry one VLAN."""
    text = vlan[1:] if vlan.startswith(".") else vlan
    if not text.isdigit():
        raise errors.HypervisorError(
            f"NIC {index}: vlan {vlan!r}: kvm-supervisor takes one access VLAN (.N), no trunks"
        )
    return int(text)


def instance_tuple(
    info: Mapping[str, Any], hvparams: Mapping[str, Any] | None
) -> tuple[str, int, int, int, int, int] | None:
    """``GetInstanceInfo``'s tuple for an InstanceInfo; None when Ganeti must see the
    instance as down.

    A guest that powered itself off counts as a user shutdown (``HvInstanceState.SHUTDOWN``)
    when `hvparams` enable ``user_shutdown``, as for Ganeti's own KVM driver.
    """
    state = info.get("state")
    if state in ALIVE_STATES:
        return (
            str(info["name"]),
            int(info.get("pid") or 0),
            int(info.get("memory_mib") or 0),
            int(info.get("vcpus") or 0),
            hv_base.HvInstanceState.RUNNING,
            0,
        )
    user_shutdown = bool((hvparams or {}).get(constants.HV_KVM_USER_SHUTDOWN))
    if state == "stopped" and info.get("reason") == GUEST_SHUTDOWN and user_shutdown:
        return (str(info["name"]), -1, 0, 0, hv_base.HvInstanceState.SHUTDOWN, 0)
    return None


def alive_names(summaries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The names in ``instance.list``'s answer whose QEMU runs."""
    return [str(entry["name"]) for entry in summaries if entry.get("state") in ALIVE_STATES]


def node_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """``GetNodeInfo``'s dict from ``supervisor.info`` (memory in MiB)."""
    node = info["node"]
    cpus = int(node["cpu_count"])
    return {
        "memory_total": int(node["memory_total_mib"]),
        "memory_free": int(node["memory_free_mib"]),
        "memory_dom0": int(node["memory_dom0_mib"]),
        "cpu_total": cpus,
        # As Ganeti's KVM driver: the node's OS sees every CPU; NUMA is not reported.
        "cpu_dom0": cpus,
        "cpu_nodes": 1,
        "cpu_sockets": 1,
        constants.HV_NODEINFO_KEY_VERSION: tuple(int(part) for part in node["hv_version"]),
    }


def startup_memory(instance: objects.Instance, memory_free_mib: int) -> int:
    """Ganeti's rule (``BaseHypervisor._InstanceStartupMemory``): the maximum memory if
    the node has it free, never below the minimum."""
    beparams = instance.beparams
    highest = min(int(beparams[constants.BE_MAXMEM]), memory_free_mib)
    return max(int(beparams[constants.BE_MINMEM]), highest)


def migration_status(status: Mapping[str, Any]) -> objects.MigrationStatus:
    """Ganeti's ``MigrationStatus`` for kvm-supervisor's (API.md §3).

    QEMU's transitional statuses read as ``active``, so that Ganeti keeps polling;
    ``none`` (no migration known here any more) reads as ``failed``.
    """
    qemu_status = str(status.get("status", "none"))
    if qemu_status in _STILL_MIGRATING:
        ganeti_status = constants.HV_MIGRATION_ACTIVE
    elif qemu_status in constants.HV_KVM_MIGRATION_VALID_STATUSES:
        ganeti_status = qemu_status
    elif qemu_status == "cancelling":
        ganeti_status = constants.HV_MIGRATION_CANCELLED
    else:
        ganeti_status = constants.HV_MIGRATION_FAILED
    result = objects.MigrationStatus(status=ganeti_status)
    if status.get("total_mib") is not None:
        result.transferred_ram = int(float(status.get("transferred_mib") or 0) * _MIB)
        result.total_ram = int(float(status["total_mib"]) * _MIB)
    return result
