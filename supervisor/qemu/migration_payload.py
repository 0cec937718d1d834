"""What a migration source hands its target: the guest, and nothing of the source host.

``migration.info`` returns a `MigrationPayload` encoded as an opaque string: the spec
as it runs (uuid and MACs filled in), the hypervisor parameters resolved when it
started, the accelerator, the resolved machine type, every device model the guest has
and where its disks and NICs sit (PCI slots, SCSI ids). The source's paths, pid, uid
lease, display port and argv stay home: the target builds its own command line, in its
own state dir, with its own leases.

QEMU migrates device state, not devices: the target's QEMU must create exactly the
devices the source's has, in the same places. `payload_problems` refuses, before
anything starts, a payload whose machine type, devices or accelerator the target's QEMU
lacks; `layout_problems` refuses a command line the target built that would place or
choose devices differently (a QEMU that builds another layout for the same parameters).

Pure: no I/O. Decoding errors name the field below ``runtime`` (``runtime.spec.vcpus``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Final

import msgspec

from supervisor.model.errors import InvalidConfigError, InvalidParams
from supervisor.model.hvparams import HvParams
from supervisor.model.spec import Disk, InstanceSpec, assign_macs
from supervisor.qemu.accel import Accelerator
from supervisor.qemu.capabilities import VGA_MODELS, QemuCapabilities
from supervisor.qemu.cmdline import DiskPlan, NicPlan
from supervisor.qemu.runtime import RuntimeRecord

__all__ = [
    "PAYLOAD_VERSION",
    "DeviceSlot",
    "MigrationPayload",
    "argv_devices",
    "argv_machine",
    "decode_payload",
    "device_layout",
    "encode_payload",
    "guest_spec",
    "layout_problems",
    "payload_for",
    "payload_problems",
]

#: The version this code writes and reads.
PAYLOAD_VERSION: Final = 1

#: The field errors are named under: the ``runtime`` parameter of ``migration.accept``.
FIELD: Final = "runtime"

#: Spec fields that say how the instance is managed, not what the guest is: a migration
#: target takes them from its own ``spec``.
MANAGEMENT_FIELDS: Final = frozenset({"autostart", "restart", "tags"})


class DeviceSlot(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where one disk, CD-ROM, floppy or NIC sits in the guest."""

    kind: str
    index: int
    device_id: str | None
    model: str | None
    pci_slot: int | None = None
    scsi_id: int | None = None


class MigrationPayload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The guest as its migration target must rebuild it (see the module docstring)."""

    version: int = PAYLOAD_VERSION
    #: The spec as it runs: its uuid and every NIC's MAC are set.
    spec: InstanceSpec
    hvparams: HvParams
    accel: Accelerator
    #: The machine type, resolved (``pc-i440fx-7.2``, never the ``pc`` alias).
    machine: str
    #: Every ``-device`` model (and the ``-vga`` card's), sorted, each once.
    devices: tuple[str, ...]
    layout: tuple[DeviceSlot, ...]
    #: The source QEMU's version, for error messages.
    qemu_version: tuple[int, int, int]


class _Versioned(msgspec.Struct):
    version: int | None = None


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(MigrationPayload)
_VERSION_DECODER: Final = msgspec.json.Decoder(_Versioned)


def encode_payload(payload: MigrationPayload) -> str:
    return _ENCODER.encode(payload).decode()


def decode_payload(text: str) -> MigrationPayload:
    """The payload in `text`; `InvalidParams` naming the field below ``runtime`` if it is
    not one, `InvalidConfigError` for another version's."""
    data = text.encode()
    try:
        version = _VERSION_DECODER.decode(data).version
    except msgspec.DecodeError as error:
        raise InvalidParams(FIELD, f"not a migration payload: {error}") from None
    if version != PAYLOAD_VERSION:
        raise InvalidConfigError(
            f"{FIELD}.version",
            f"payload version {version} (this kvm-supervisor reads {PAYLOAD_VERSION}):"
            " both daemons must run compatible versions",
        )
    try:
        payload = _DECODER.decode(data)
    except msgspec.ValidationError as error:
        raise InvalidParams.from_validation_error(error, FIELD) from None
    if payload.spec.uuid is None:
        raise InvalidParams(f"{FIELD}.spec.uuid", "missing: the payload names no uuid")
    for index, nic in enumerate(payload.spec.nics):
        if nic.mac is None:
            raise InvalidParams(f"{FIELD}.spec.nics[{index}].mac", "missing: no MAC assigned")
    return payload


def payload_for(record: RuntimeRecord) -> MigrationPayload:
    """The payload of the guest that `record`'s QEMU runs."""
    machine = argv_machine(record.argv)
    if machine is None:
        raise InvalidConfigError("argv", f"{record.name!r} runs with no -machine type")
    return MigrationPayload(
        spec=record.spec,
        hvparams=record.hvparams,
        accel=record.accel,
        machine=machine,
        devices=argv_devices(record.argv),
        layout=device_layout(record.disks, record.nics),
        qemu_version=record.qemu_version,
    )


def guest_spec(spec: InstanceSpec, payload: MigrationPayload) -> InstanceSpec:
    """The spec a migration target runs: the payload's, managed as `spec` says.

    `spec` (``migration.accept``'s) must describe the guest the payload carries: the
    same name, uuid (when it has one), MACs and hardware; only `MANAGEMENT_FIELDS` may
    differ, and the target takes those from `spec`, as it takes its disks' paths (the
    same disks in the same order and modes, reached by this host's paths: a cluster
    node's links to shared storage are its own). Raises `InvalidConfigError` naming the
    first field that differs otherwise.
    """
    guest = payload.spec
    if spec.uuid is not None and spec.uuid != guest.uuid:
        raise InvalidConfigError("spec.uuid", f"differs from the running guest's ({guest.uuid})")
    filled = assign_macs(msgspec.structs.replace(spec, uuid=guest.uuid))
    for field in InstanceSpec.__struct_fields__:
        if field in MANAGEMENT_FIELDS:
            continue
        mine, theirs = getattr(filled, field), getattr(guest, field)
        if field == "disks":
            mine, theirs = _without_paths(mine), _without_paths(theirs)
        if mine != theirs:
            shown = msgspec.json.encode(theirs).decode()
            raise InvalidConfigError(f"spec.{field}", f"differs from the running guest's ({shown})")
    return msgspec.structs.replace(
        guest, disks=spec.disks, **{field: getattr(spec, field) for field in MANAGEMENT_FIELDS}
    )


def _without_paths(disks: Sequence[Disk]) -> list[tuple[str, str | None]]:
    return [(disk.mode, disk.format) for disk in disks]


def argv_machine(argv: Sequence[str]) -> str | None:
    """The machine type a QEMU argv selects (``-machine TYPE,...`` or ``-M TYPE``), if any."""
    machine = None
    for option, value in itertools.pairwise(argv):
        if option in ("-machine", "-M"):
            first = value.split(",", 1)[0]
            if first and "=" not in first:
                machine = first
            else:
                for part in value.split(","):
                    key, _, name = part.partition("=")
                    if key == "type":
                        machine = name
    return machine


def argv_devices(argv: Sequence[str]) -> tuple[str, ...]:
    """Every device model a QEMU argv adds (``-device MODEL,...`` and the ``-vga`` card)."""
    models = set()
    for option, value in itertools.pairwise(argv):
        if option == "-device":
            models.add(value.split(",", 1)[0])
        elif option == "-vga" and value in VGA_MODELS:
            models.add(VGA_MODELS[value])
    return tuple(sorted(models))


def device_layout(disks: Sequence[DiskPlan], nics: Sequence[NicPlan]) -> tuple[DeviceSlot, ...]:
    """Where the disks and NICs of a command line sit (host details such as paths and
    tap names left out)."""
    slots = [
        DeviceSlot(
            kind=disk.kind,
            index=disk.index,
            device_id=disk.device_id,
            model=disk.model,
            pci_slot=disk.pci_slot,
            scsi_id=disk.scsi_id,
        )
        for disk in disks
    ]
    slots += [
        DeviceSlot(
            kind="nic",
            index=nic.index,
            device_id=nic.device_id,
            model=nic.model,
            pci_slot=nic.pci_slot,
        )
        for nic in nics
    ]
    return tuple(slots)


def payload_problems(
    payload: MigrationPayload, caps: QemuCapabilities, accel: Accelerator
) -> list[InvalidConfigError]:
    """Why the QEMU of `caps`, running under `accel`, cannot receive this guest."""
    return list(_payload_problems(payload, caps, accel))


def _payload_problems(
    payload: MigrationPayload, caps: QemuCapabilities, accel: Accelerator
) -> Iterator[InvalidConfigError]:
    qemu = f"QEMU {caps.version_text} at {caps.path}"
    if caps.machine(payload.machine) is None:
        yield InvalidConfigError(
            f"{FIELD}.machine",
            f"the guest's machine type {payload.machine!r} is not one {qemu} knows",
        )
    if caps.devices:
        missing = [model for model in payload.devices if not caps.has_device(model)]
        if missing:
            yield InvalidConfigError(
                f"{FIELD}.devices", f"{qemu} has no {', '.join(missing)} device (the guest has)"
            )
    if accel != payload.accel:
        yield InvalidConfigError(
            f"{FIELD}.accel",
            f"the guest runs under {payload.accel} on its source and would run under {accel}"
            " here: QEMU cannot migrate between accelerators",
        )


def layout_problems(
    payload: MigrationPayload,
    *,
    machine: str | None,
    devices: Sequence[str],
    layout: Sequence[DeviceSlot],
) -> list[InvalidConfigError]:
    """How the command line built here (its machine, devices and layout) differs from
    the guest's."""
    problems = []
    if machine != payload.machine:
        problems.append(
            InvalidConfigError(
                f"{FIELD}.machine",
                f"the command line here selects machine {machine!r}, the guest's is"
                f" {payload.machine!r}",
            )
        )
    if tuple(devices) != payload.devices:
        extra = sorted(set(devices) - set(payload.devices))
        lacking = sorted(set(payload.devices) - set(devices))
        problems.append(
            InvalidConfigError(
                f"{FIELD}.devices",
                "the command line here would add"
                f" {', '.join(extra) or 'nothing more'} and lack {', '.join(lacking) or 'nothing'}"
                f" compared with the guest's QEMU {_dotted(payload.qemu_version)}",
            )
        )
    if tuple(layout) != payload.layout:
        problems.append(
            InvalidConfigError(
                f"{FIELD}.layout",
                "the command line here would place disks or NICs elsewhere than the guest has"
                f" them: {_first_difference(layout, payload.layout)}",
            )
        )
    return problems


def _first_difference(here: Sequence[DeviceSlot], there: Sequence[DeviceSlot]) -> str:
    for mine, theirs in zip(here, there, strict=False):
        if mine != theirs:
            return f"{_slot_text(mine)} here, {_slot_text(theirs)} in the guest"
    return f"{len(here)} devices here, {len(there)} in the guest"


def _slot_text(slot: DeviceSlot) -> str:
    where = f"PCI slot {slot.pci_slot}" if slot.pci_slot is not None else "no PCI slot"
    if slot.scsi_id is not None:
        where = f"SCSI id {slot.scsi_id}"
    return f"{slot.kind} {slot.index} as {slot.model or 'a legacy drive'} at {where}"


def _dotted(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))
