"""The instance specification (API.md §3): what a VM is, as the user writes it.

An `InstanceSpec` arrives as JSON over the control socket or as a TOML file in the
instances directory. Everything a single field can get wrong (type, pattern, range,
unknown key) is a decoding error raised by `decode_spec`; rules across fields and
against the host live in `supervisor.model.validation`. ``hvparams`` stays a free mapping
here: `supervisor.model.hvparams.resolve_hvparams` merges and checks it.

A spec may leave out its uuid and its NICs' MACs. `ensure_uuid` generates the uuid (the
caller persists it, so it survives restarts) and `assign_macs` derives every missing
MAC from the uuid and the NIC's index, deterministically, so the same instance gets the
same MACs on every start and on every host it migrates to.
"""

from __future__ import annotations

import hashlib
import uuid as uuidlib
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from supervisor.model.errors import InvalidParams

__all__ = [
    "MAC_PATTERN",
    "MAC_PREFIX",
    "MAX_MEMORY_MIB",
    "MAX_VCPUS",
    "MIN_MEMORY_MIB",
    "NAME_PATTERN",
    "PATTERN_END",
    "UUID_PATTERN",
    "NIC",
    "Disk",
    "InstanceSpec",
    "assign_macs",
    "decode_spec",
    "ensure_uuid",
    "generated_mac",
]

#: How every pattern ends. msgspec matches patterns with Python's `re.search`, where `$`
#: also matches before a trailing newline (so "vm\n" passed as a name); the OpenRPC
#: document hands the same patterns to JSON Schema validators, whose ECMA-262 regexes
#: have no `\Z`. `$` followed by "not a newline" (a literal one: error messages show the
#: pattern's repr, which would double a backslash) ends the string in both dialects.
PATTERN_END: Final = "$(?!\n)"

#: Instance names: no path separators, ever (names become file and socket names).
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}" + PATTERN_END
MAC_PATTERN: Final = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}" + PATTERN_END
UUID_PATTERN: Final = (
    r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}" + PATTERN_END
)

#: Prefix of generated MACs: QEMU's and libvirt's own. Its first octet, 0x52, has the
#: locally-administered bit set and the multicast bit clear, so generated addresses
#: never collide with a vendor's and are always unicast.
MAC_PREFIX: Final = "52:54:00"

#: Below this no mainstream guest kernel boots: firmware, option ROMs and the kernel
#: itself need tens of MiB.
MIN_MEMORY_MIB: Final = 32
#: QEMU's x86 limit with the default 40-bit physical address space is 1 TiB.
MAX_MEMORY_MIB: Final = 1024 * 1024
#: The pc/q35 machines' limit without an IOMMU (x2APIC ids beyond 254 need one).
MAX_VCPUS: Final = 255

InstanceName = Annotated[str, Meta(pattern=NAME_PATTERN, description="Instance name.")]
MacAddress = Annotated[str, Meta(pattern=MAC_PATTERN, description="MAC address (xx:xx:...).")]
MemoryMib = Annotated[int, Meta(ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)]


class Disk(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One disk: an image file or a block device."""

    path: Annotated[str, Meta(min_length=1, description="Image file or block device.")]
    mode: Literal["rw", "ro"] = "rw"
    format: Literal["raw", "qcow2"] | None = None


class NIC(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One network interface; `mac` is generated from the instance uuid when absent."""

    mac: MacAddress | None = None
    mode: Literal["bridged", "routed", "openvswitch"] = "bridged"
    link: Annotated[str, Meta(min_length=1, max_length=15)] | None = None
    ip: str | None = None
    vlan: Annotated[int, Meta(ge=1, le=4094)] | None = None
    mtu: Annotated[int, Meta(ge=68, le=65535)] | None = None


class InstanceSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """A VM definition (API.md §3); ``hvparams`` holds overrides of Ganeti's KVM params."""

    name: InstanceName
    uuid: Annotated[str, Meta(pattern=UUID_PATTERN)] | None = None
    memory_mib: MemoryMib = 128
    startup_memory_mib: MemoryMib | None = None
    vcpus: Annotated[int, Meta(ge=1, le=MAX_VCPUS)] = 1
    disks: list[Disk] = msgspec.field(default_factory=list)
    nics: list[NIC] = msgspec.field(default_factory=list)
    tags: list[str] = msgspec.field(default_factory=list)
    network_port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    autostart: bool = False
    restart: Literal["never", "on-crash"] = "never"
    hvparams: dict[str, Any] = msgspec.field(default_factory=dict)


def decode_spec(value: object, *, root: str = "spec") -> InstanceSpec:
    """Decode builtins (parsed JSON or TOML) into an `InstanceSpec`.

    Raises `InvalidParams` whose path starts at `root`, e.g. ``spec.nics[1].mac``.
    """
    try:
        return msgspec.convert(value, InstanceSpec)
    except msgspec.ValidationError as error:
        raise InvalidParams.from_validation_error(error, root) from None


def ensure_uuid(spec: InstanceSpec) -> InstanceSpec:
    """Return `spec` with a uuid: its own, or a fresh random one the caller must persist."""
    if spec.uuid is not None:
        return spec
    return msgspec.structs.replace(spec, uuid=str(uuidlib.uuid4()))


def generated_mac(instance_uuid: str, index: int, attempt: int = 0) -> str:
    """The MAC of NIC `index` of the instance with `instance_uuid`, under `MAC_PREFIX`.

    The last three octets come from a SHA-256 of the (lower-cased) uuid, the index and
    `attempt`; `assign_macs` bumps `attempt` on the rare clash inside one instance.
    """
    seed = f"{instance_uuid.lower()}/{index}/{attempt}".encode()
    tail = hashlib.sha256(seed).digest()[:3]
    return MAC_PREFIX + "".join(f":{octet:02x}" for octet in tail)


def assign_macs(spec: InstanceSpec) -> InstanceSpec:
    """Return `spec` with every NIC's MAC set, lower-cased, and distinct within the spec.

    Missing MACs are `generated_mac` values; raises ValueError when the spec has no
    uuid yet (call `ensure_uuid` first).
    """
    if spec.uuid is None:
        raise ValueError(f"instance {spec.name!r} has no uuid to derive MACs from")
    taken = {nic.mac.lower() for nic in spec.nics if nic.mac is not None}
    nics = []
    for index, nic in enumerate(spec.nics):
        if nic.mac is not None:
            nics.append(msgspec.structs.replace(nic, mac=nic.mac.lower()))
            continue
        attempt = 0
        mac = generated_mac(spec.uuid, index)
        while mac in taken:
            attempt += 1
            mac = generated_mac(spec.uuid, index, attempt)
        taken.add(mac)
        nics.append(msgspec.structs.replace(nic, mac=mac))
    return msgspec.structs.replace(spec, nics=nics)
