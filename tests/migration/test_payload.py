"""The migration payload, the progress figures and who may migrate: pure, no QEMU."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from cmdline import modern_caps

from supervisor.control.privilege import MIGRATION_METHODS, Privilege, authorize
from supervisor.host.statedir import StateDir
from supervisor.model import api
from supervisor.model.config import Config
from supervisor.model.errors import InvalidConfigError, InvalidParams
from supervisor.model.hvparams import resolve_hvparams
from supervisor.model.spec import assign_macs, decode_spec
from supervisor.qemu.accel import Accelerator
from supervisor.qemu.cmdline import LaunchResources, build_command_line
from supervisor.qemu.migration_payload import (
    decode_payload,
    device_layout,
    encode_payload,
    guest_spec,
    layout_problems,
    payload_for,
    payload_problems,
)
from supervisor.qemu.migration_progress import MigrationProgress, parse_query_migrate
from supervisor.qemu.runtime import RuntimeRecord

UUID = "0b6b7f1e-5d4c-4b3a-9f8e-7d6c5b4a3f2e"
MIB = 1024 * 1024


def record(state_dir: str = "/var/lib/kvs-a", **hvparams: Any) -> RuntimeRecord:
    spec = assign_macs(
        decode_spec(
            {
                "name": "vm1",
                "uuid": UUID,
                "memory_mib": 256,
                "disks": [{"path": "/srv/images/vm1.img"}],
                "hvparams": hvparams,
            }
        )
    )
    hv = resolve_hvparams({}, spec.hvparams)
    caps = modern_caps()
    paths = StateDir(state_dir).instance("vm1")
    resources = LaunchResources(display_port=5901, pool_user=None)
    command = build_command_line(spec, hv, caps, paths, Accelerator.TCG, resources=resources)
    return RuntimeRecord.for_start(spec, hv, command, caps, paths)


def test_the_payload_holds_the_guest_and_nothing_of_the_source_host() -> None:
    source = msgspec.structs.replace(record(), pid=4242, uid=5001, started_at=1.0)
    text = encode_payload(payload_for(source))
    assert "/var/lib/kvs-a" not in text
    for host_detail in ('"argv"', '"pid"', '"uid"', '"paths"', "4242", "5001"):
        assert host_detail not in text
    payload = decode_payload(text)
    assert payload.spec == source.spec
    assert payload.hvparams == source.hvparams
    assert payload.machine == "pc-i440fx-7.2"
    assert "virtio-blk-pci" in payload.devices and "VGA" in payload.devices
    [disk] = payload.layout
    assert (disk.kind, disk.model, disk.pci_slot) == ("disk", "virtio-blk-pci", 12)


def test_the_target_rebuilds_the_same_layout_in_its_own_state_dir() -> None:
    payload = payload_for(record())
    here = record("/srv/kvs-b")
    assert here.paths != record().paths
    assert (
        layout_problems(
            payload,
            machine="pc-i440fx-7.2",
            devices=payload.devices,
            layout=device_layout(here.disks, here.nics),
        )
        == []
    )
    # Another PCI reservation moves the disk: refused, saying where.
    moved = record(kvm_pci_reservations=16)
    [problem] = layout_problems(
        payload,
        machine="pc-i440fx-7.2",
        devices=payload.devices,
        layout=device_layout(moved.disks, moved.nics),
    )
    assert problem.path == "runtime.layout"
    assert "PCI slot 16 here, disk 0 as virtio-blk-pci at PCI slot 12 in the guest" in str(problem)


def test_a_qemu_without_the_machine_or_a_device_or_with_another_accelerator_is_refused() -> None:
    payload = payload_for(record())
    caps = modern_caps()
    assert payload_problems(payload, caps, Accelerator.TCG) == []
    older = msgspec.structs.replace(
        caps,
        machines=tuple(m for m in caps.machines if "7.2" not in m.name),
        devices=caps.devices - {"virtio-blk-pci"},
    )
    problems = payload_problems(payload, older, Accelerator.KVM)
    assert [problem.path for problem in problems] == [
        "runtime.machine",
        "runtime.devices",
        "runtime.accel",
    ]
    assert "machine type 'pc-i440fx-7.2'" in str(problems[0])
    assert "has no virtio-blk-pci device" in str(problems[1])


def test_a_payload_that_is_not_one_is_refused_naming_the_field() -> None:
    text = encode_payload(payload_for(record()))
    with pytest.raises(InvalidParams) as error:
        decode_payload("not json")
    assert error.value.path == "runtime"
    with pytest.raises(InvalidConfigError) as error:
        decode_payload(text.replace('"version":1', '"version":2'))
    assert error.value.path == "runtime.version"
    with pytest.raises(InvalidParams) as error:
        decode_payload(text.replace('"vcpus":1', '"vcpus":"many"'))
    assert error.value.path == "runtime.spec.vcpus"


def test_accept_takes_the_guest_from_the_payload_and_management_from_its_spec() -> None:
    payload = payload_for(record())
    spec = msgspec.structs.replace(payload.spec, uuid=None, restart="on-crash", tags=["moved"])
    target = guest_spec(spec, payload)
    assert (target.uuid, target.restart, target.tags) == (UUID, "on-crash", ["moved"])
    assert target.disks == payload.spec.disks
    for change, path in (
        ({"memory_mib": 512}, "spec.memory_mib"),
        ({"uuid": "11111111-2222-3333-4444-555555555555"}, "spec.uuid"),
        ({"hvparams": {"cpu_type": "qemu64"}}, "spec.hvparams"),
    ):
        with pytest.raises(InvalidConfigError) as error:
            guest_spec(msgspec.structs.replace(payload.spec, **change), payload)
        assert error.value.path == path


def test_accept_takes_its_own_paths_to_the_same_disks() -> None:
    payload = payload_for(record())
    assert payload.spec.disks, "the record under test needs a disk"
    here = [msgspec.structs.replace(disk, path=f"/node2{disk.path}") for disk in payload.spec.disks]
    target = guest_spec(msgspec.structs.replace(payload.spec, disks=here), payload)
    assert target.disks == here
    first = payload.spec.disks[0]
    for changed in (
        [msgspec.structs.replace(first, mode="ro" if first.mode == "rw" else "rw")],
        [*payload.spec.disks, first],
    ):
        with pytest.raises(InvalidConfigError) as error:
            guest_spec(msgspec.structs.replace(payload.spec, disks=changed), payload)
        assert error.value.path == "spec.disks"


def test_progress_figures_and_the_stall_guard() -> None:
    status, sent = parse_query_migrate(
        {
            "status": "active",
            "expected-downtime": 300,
            "total-time": 410,
            "ram": {
                "total": 256 * MIB,
                "remaining": 64 * MIB,
                "transferred": 100 * MIB,
                "mbps": 537.13,
                "dirty-sync-count": 2,
                "a-field-of-a-later-qemu": 1,
            },
        }
    )
    assert (status.percent, status.total_mib, status.remaining_mib) == (75.0, 256.0, 64.0)
    assert (status.mbps, status.dirty_sync_count, status.expected_downtime_ms) == (537.1, 2, 300)
    assert sent == 100 * MIB
    # The target's answer while it listens: no status, no figures.
    assert parse_query_migrate({"socket-address": []})[0].status == "none"

    progress = MigrationProgress(stall_timeout_s=2.0, now=0.0)
    progress.update({"status": "active", "ram": {"transferred": 10}}, 1.0)
    progress.update({"status": "active", "ram": {"transferred": 20}}, 2.5)
    assert not progress.stalled(4.4)
    progress.update({"status": "active", "ram": {"transferred": 20}}, 4.5)
    assert progress.stalled(4.5)
    progress.update({"status": "cancelling", "ram": {"transferred": 20}}, 5.0)
    assert not progress.stalled(9.0)
    progress.update({"status": "cancelled"}, 9.0)
    assert progress.finished and not progress.stalled(20.0)


@pytest.mark.parametrize("method", MIGRATION_METHODS)
def test_only_admins_migrate(method: str) -> None:
    params = api.NameParams(name="vm1")
    with pytest.raises(InvalidConfigError) as error:
        authorize(Privilege.MEMBER, method, params, Config())
    assert error.value.path == "method"
    assert "only root may migrate" in str(error.value)
    authorize(Privilege.ADMIN, method, params, Config())
