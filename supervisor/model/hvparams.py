"""Ganeti's KVM hypervisor parameters: names, value sets, defaults and how they merge.

`HvParams` holds all 65 parameters of Ganeti 3.1's KVM hypervisor under Ganeti's own
names, with Ganeti's value sets and defaults, except where those defaults cannot work
on a stock Debian host (`GANETI_DEFAULT_DEVIATIONS`). Every field carries a one-line
description in its `msgspec.Meta`, so the README table and `rpc.discover` are generated
from this module (`parameter_docs`, `render_markdown_table`).

Values merge in three layers, later ones winning: the built-in defaults, the daemon
config's ``[hvparams]`` table, then the instance's ``hvparams`` (`resolve_hvparams`).

Like Ganeti, an empty string (or 0) means "not set" for the optional parameters, which
is why several value sets include ``""``.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from supervisor.model.errors import InvalidParams

__all__ = [
    "GANETI_DEFAULT_DEVIATIONS",
    "PARAMETER_NAMES",
    "PATH_PARAMETERS",
    "QEMU_PCI_SLOTS",
    "VALID_SERIAL_SPEEDS",
    "HvParams",
    "ParameterDoc",
    "CpuSet",
    "choices",
    "format_choices",
    "format_cpu_mask",
    "is_url",
    "parse_cpu_mask",
    "parameter_docs",
    "render_markdown_table",
    "resolve_hvparams",
]

BootOrder = Literal["cdrom", "disk", "floppy", "network"]
NicType = Literal[
    "e1000",
    "i82551",
    "i82559er",
    "i82557b",
    "ne2k_isa",
    "ne2k_pci",
    "paravirtual",
    "pcnet",
    "rtl8139",
]
DiskType = Literal[
    "ide",
    "mtd",
    "paravirtual",
    "pflash",
    "scsi",
    "sd",
    "scsi-generic",
    "scsi-block",
    "scsi-hd",
    "scsi-cd",
]
OptionalDiskType = Literal[
    "",
    "ide",
    "mtd",
    "paravirtual",
    "pflash",
    "scsi",
    "sd",
    "scsi-generic",
    "scsi-block",
    "scsi-hd",
    "scsi-cd",
]
ScsiControllerType = Literal["lsi", "virtio-scsi-pci", "megasas"]
DiskCache = Literal["default", "none", "writeback", "writethrough"]
DiskDiscard = Literal["", "default", "ignore", "unmap"]
DiskAio = Literal["", "threads", "native"]
UsbMouse = Literal["", "mouse", "tablet"]
MigrationMode = Literal["live", "non-live"]
SecurityModel = Literal["none", "pool", "user"]
KvmFlag = Literal["", "enabled", "disabled"]
RebootBehavior = Literal["reboot", "exit"]
SpiceIpVersion = Literal[0, 4, 6]
SpiceLosslessCompression = Literal["", "auto_glz", "auto_lz", "glz", "lz", "off", "quic"]
SpiceLossyCompression = Literal["", "always", "auto", "never"]
SpiceStreamingVideo = Literal["", "all", "filter", "off"]

#: Ganeti's ``VALID_SERIAL_SPEEDS``: the speeds ``serial_speed`` may take.
VALID_SERIAL_SPEEDS: Final = (
    75,
    110,
    300,
    600,
    1200,
    1800,
    2400,
    4800,
    9600,
    14400,
    19200,
    28800,
    38400,
    57600,
    115200,
    230400,
    345600,
    460800,
)

#: Ganeti's ``QEMU_PCI_SLOTS``: the upper bound of ``kvm_pci_reservations``.
QEMU_PCI_SLOTS: Final = 32


def _doc(text: str, *, ge: int | None = None, le: int | None = None) -> Meta:
    return Meta(description=text, ge=ge, le=le)


class HvParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Every Ganeti KVM hypervisor parameter, fully resolved (no field is ever missing).

    Build one with `resolve_hvparams`; field-level constraints (value sets, ranges) are
    enforced when it is decoded, rules across fields by `supervisor.model.validation`.
    """

    # Boot and kernel.
    kvm_path: Annotated[str, _doc("Path of the QEMU binary.")] = "/usr/bin/qemu-system-x86_64"
    kernel_path: Annotated[
        str, _doc("Kernel booted directly with -kernel; empty boots from the boot_order device.")
    ] = ""
    initrd_path: Annotated[
        str, _doc("Initial ramdisk passed with -initrd (needs kernel_path).")
    ] = ""
    root_path: Annotated[
        str, _doc("root= device appended to the kernel command line (with kernel_path).")
    ] = "/dev/vda1"
    kernel_args: Annotated[str, _doc("Extra kernel command-line arguments (with kernel_path).")] = (
        "ro"
    )
    acpi: Annotated[bool, _doc("Expose ACPI to the guest; needed for a clean ACPI shutdown.")] = (
        True
    )
    serial_console: Annotated[
        bool, _doc("Connect the first serial port to a unix socket console.")
    ] = True
    serial_speed: Annotated[
        int, _doc("Serial console speed (console=ttyS0,<speed> with kernel_path).")
    ] = 38400
    boot_order: Annotated[BootOrder, _doc("Device the guest boots from.")] = "disk"
    reboot_behavior: Annotated[
        RebootBehavior, _doc("What a guest reboot does: reboot, or exit QEMU (-no-reboot).")
    ] = "reboot"
    machine_version: Annotated[
        str, _doc("QEMU machine type (-machine); empty uses QEMU's default machine.")
    ] = ""
    kvm_flag: Annotated[
        KvmFlag,
        _doc("enabled: KVM; disabled: TCG; empty: KVM when usable, else TCG with a warning."),
    ] = ""
    kvm_extra: Annotated[str, _doc("Extra QEMU arguments, split as a shell would split them.")] = ""
    # VNC.
    vnc_bind_address: Annotated[
        str,
        _doc("VNC listen address: an IP, an interface name, or a directory for a unix socket."),
    ] = ""
    vnc_tls: Annotated[bool, _doc("Use TLS for VNC.")] = False
    vnc_x509_path: Annotated[str, _doc("Directory of the x509 certificates for VNC TLS.")] = ""
    vnc_x509_verify: Annotated[bool, _doc("Verify VNC clients' x509 certificates.")] = False
    vnc_password_file: Annotated[str, _doc("File holding the VNC password.")] = ""
    keymap: Annotated[str, _doc("Keyboard layout for VNC (e.g. en-us); empty: QEMU's.")] = ""
    # SPICE.
    spice_bind: Annotated[
        str, _doc("SPICE listen address (an IP or an interface name); empty disables SPICE.")
    ] = ""
    spice_ip_version: Annotated[
        SpiceIpVersion, _doc("IP version SPICE binds with when spice_bind is an interface.")
    ] = 0
    spice_password_file: Annotated[str, _doc("File holding the SPICE password.")] = ""
    spice_image_compression: Annotated[
        SpiceLosslessCompression, _doc("SPICE lossless image compression.")
    ] = ""
    spice_jpeg_wan_compression: Annotated[
        SpiceLossyCompression, _doc("SPICE JPEG compression over WAN links.")
    ] = ""
    spice_zlib_glz_wan_compression: Annotated[
        SpiceLossyCompression, _doc("SPICE zlib-glz compression over WAN links.")
    ] = ""
    spice_streaming_video: Annotated[SpiceStreamingVideo, _doc("SPICE video stream detection.")] = (
        ""
    )
    spice_playback_compression: Annotated[bool, _doc("Compress SPICE audio playback.")] = True
    spice_use_tls: Annotated[bool, _doc("Serve SPICE over TLS.")] = False
    spice_tls_ciphers: Annotated[str, _doc("OpenSSL cipher list for SPICE TLS.")] = (
        "HIGH:-DES:-3DES:-EXPORT:-ADH"
    )
    spice_use_vdagent: Annotated[bool, _doc("Add the SPICE guest agent (vdagent) channel.")] = True
    # Removable media.
    cdrom_image_path: Annotated[str, _doc("ISO image (path or URL) on the first CD-ROM.")] = ""
    cdrom2_image_path: Annotated[str, _doc("ISO image (path or URL) on the second CD-ROM.")] = ""
    cdrom_disk_type: Annotated[
        OptionalDiskType, _doc("Interface of the CD-ROMs; empty: ide (scsi-cd on SCSI).")
    ] = ""
    floppy_image_path: Annotated[str, _doc("Floppy disk image.")] = ""
    # Devices.
    nic_type: Annotated[NicType, _doc("Emulated NIC model (paravirtual is virtio-net).")] = (
        "paravirtual"
    )
    disk_type: Annotated[DiskType, _doc("Disk interface (paravirtual is virtio-blk).")] = (
        "paravirtual"
    )
    scsi_controller_type: Annotated[
        ScsiControllerType, _doc("SCSI controller for the scsi-* disk types.")
    ] = "lsi"
    kvm_pci_reservations: Annotated[
        int,
        _doc(
            "PCI slots left to QEMU's own devices; disks and NICs go after.",
            ge=0,
            le=QEMU_PCI_SLOTS,
        ),
    ] = 12
    disk_cache: Annotated[DiskCache, _doc("Host page-cache mode for disks.")] = "default"
    disk_aio: Annotated[DiskAio, _doc("Disk AIO mode (native needs disk_cache none).")] = "threads"
    disk_discard: Annotated[
        DiskDiscard, _doc("What the disks do with the guest's discard requests.")
    ] = "default"
    usb_mouse: Annotated[UsbMouse, _doc("USB pointing device; empty: none.")] = ""
    usb_devices: Annotated[
        str, _doc("Comma-separated -usbdevice arguments (e.g. tablet, host:046d:c52b).")
    ] = ""
    soundhw: Annotated[str, _doc("Emulated sound card(s); empty: none.")] = ""
    vga: Annotated[str, _doc("Emulated graphics card (-vga); empty: QEMU's default.")] = ""
    use_localtime: Annotated[bool, _doc("Guest RTC in local time instead of UTC.")] = False
    use_guest_agent: Annotated[
        bool, _doc("Add a virtio-serial channel for the QEMU guest agent.")
    ] = False
    # CPU and memory.
    cpu_mask: Annotated[
        str,
        _doc("CPU pinning: all, a CPU list (0-2,4), or one of those per vCPU, ':'-separated."),
    ] = "all"
    cpu_type: Annotated[str, _doc("Emulated CPU model (-cpu); empty: QEMU's default.")] = ""
    cpu_cores: Annotated[int, _doc("Cores per socket; 0: let QEMU decide.", ge=0)] = 0
    cpu_threads: Annotated[int, _doc("Threads per core; 0: let QEMU decide.", ge=0)] = 0
    cpu_sockets: Annotated[int, _doc("Sockets; 0: let QEMU decide.", ge=0)] = 0
    mem_path: Annotated[
        str, _doc("Directory (e.g. a hugetlbfs mount) backing guest memory (-mem-path).")
    ] = ""
    # Networking.
    vhost_net: Annotated[bool, _doc("Use the in-kernel vhost-net backend for virtio NICs.")] = False
    vnet_hdr: Annotated[bool, _doc("Open taps with IFF_VNET_HDR (offloads for virtio).")] = True
    virtio_net_queues: Annotated[
        int, _doc("Queues per virtio NIC (multiqueue tap).", ge=1, le=8)
    ] = 1
    # Migration.
    migration_port: Annotated[
        int, _doc("TCP port the migration target listens on.", ge=1, le=65534)
    ] = 8102
    migration_bandwidth: Annotated[
        int, _doc("Migration bandwidth limit, MiB/s; 0: no limit.", ge=0)
    ] = 32
    migration_downtime: Annotated[
        int, _doc("Maximum downtime of a live migration, milliseconds.", ge=0)
    ] = 30
    migration_mode: Annotated[MigrationMode, _doc("Default migration mode.")] = "live"
    migration_caps: Annotated[
        str, _doc("QEMU migration capabilities to enable, ':'-separated (e.g. xbzrle).")
    ] = ""
    # Security and lifecycle.
    security_model: Annotated[
        SecurityModel,
        _doc("User QEMU runs as: none (root), pool (from uid_pool) or user (security_domain)."),
    ] = "none"
    security_domain: Annotated[str, _doc("User QEMU runs as with security_model user.")] = ""
    use_chroot: Annotated[bool, _doc("Run QEMU chrooted into an empty per-instance dir.")] = False
    user_shutdown: Annotated[
        bool, _doc("A guest-initiated shutdown counts as a user shutdown, not a crash.")
    ] = False


#: Every parameter name, in declaration order.
PARAMETER_NAMES: Final[tuple[str, ...]] = HvParams.__struct_fields__

#: Defaults that differ from Ganeti 3.1's, with Ganeti's value and the reason.
GANETI_DEFAULT_DEVIATIONS: Final[Mapping[str, tuple[object, str]]] = {
    "kvm_path": (
        "/usr/bin/kvm",
        "a binary named kvm silently switches QEMU's default accelerator",
    ),
    "kernel_path": ("/boot/vmlinuz-3-kvmU", "that file does not exist on a stock host"),
}

#: Each parameter's ``Annotated[type, Meta]`` hint.
_TYPE_HINTS: Final = typing.get_type_hints(HvParams, include_extras=True)


def _base_type(name: str) -> Any:
    return typing.get_args(_TYPE_HINTS[name])[0]


_VALUE_SETS: Final[dict[str, tuple[object, ...]]] = {
    name: typing.get_args(_base_type(name))
    for name in PARAMETER_NAMES
    if typing.get_origin(_base_type(name)) is Literal
}


#: Parameters naming a file or directory on the host. Relative values in a file are
#: resolved against that file's directory; everywhere else they must be absolute.
PATH_PARAMETERS: Final = (
    "kvm_path",
    "kernel_path",
    "initrd_path",
    "floppy_image_path",
    "cdrom_image_path",
    "cdrom2_image_path",
    "vnc_x509_path",
    "vnc_password_file",
    "spice_password_file",
    "mem_path",
)

#: URL schemes QEMU's curl block driver reads CD-ROM images from (Ganeti allows URLs).
_URL_PREFIXES: Final = ("http://", "https://", "ftp://", "ftps://")


def is_url(value: str) -> bool:
    """Whether a CD-ROM image parameter names a URL rather than a host path."""
    return value.startswith(_URL_PREFIXES)


#: One entry of a parsed cpu_mask: None pins to all CPUs, otherwise the CPU numbers.
CpuSet = frozenset[int] | None


_CPU_ITEM: Final = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def _parse_cpu_list(text: str) -> frozenset[int]:
    cpus: set[int] = set()
    for item in text.split(","):
        match = _CPU_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"{item!r} is not a CPU number or range (like 0-2)")
        first = int(match[1])
        last = first if match[2] is None else int(match[2])
        if first > last:
            raise ValueError(f"range {item!r} runs backwards")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def parse_cpu_mask(mask: str) -> list[CpuSet]:
    """Parse Ganeti's multi-CPU mask: ``all``, a CPU list, or one of them per vCPU.

    ``"0-2,4:all:1,3"`` gives ``[{0, 1, 2, 4}, None, {1, 3}]``; one entry applies to
    every vCPU, several entries map to vCPUs in order; ``""`` means no pinning (``[]``).
    Raises ValueError saying what is wrong.
    """
    if not mask:
        return []
    return [None if entry == "all" else _parse_cpu_list(entry) for entry in mask.split(":")]


def format_cpu_mask(entries: list[CpuSet]) -> str:
    """The canonical text of parsed entries: ranges collapsed, CPUs in ascending order."""
    return ":".join("all" if cpus is None else _format_cpu_list(cpus) for cpus in entries)


def _format_cpu_list(cpus: frozenset[int]) -> str:
    ranges: list[str] = []
    ordered = sorted(cpus)
    start = previous = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == previous + 1:
            previous = cpu
            continue
        ranges.append(str(start) if start == previous else f"{start}-{previous}")
        if cpu is not None:
            start = previous = cpu
    return ",".join(ranges)


def choices(name: str) -> tuple[object, ...] | None:
    """The value set of parameter `name`, or None when it takes any value of its type."""
    return _VALUE_SETS.get(name)


def format_choices(values: tuple[object, ...]) -> str:
    """Render a value set for an error message: ``'', 'mouse', 'tablet'``."""
    return ", ".join(repr(value) for value in values)


class ParameterDoc(msgspec.Struct, kw_only=True, frozen=True):
    """The machine-readable description of one parameter."""

    name: str
    type: str
    default: Any
    choices: tuple[Any, ...] | None
    description: str
    ganeti_default: Any
    minimum: int | None = None
    maximum: int | None = None


def _type_name(name: str) -> str:
    value_set = choices(name)
    if value_set is not None:
        return type(value_set[0]).__name__
    return str(_base_type(name).__name__)


def parameter_docs() -> list[ParameterDoc]:
    """Describe every parameter: type, default, value set, bounds and meaning."""
    defaults = HvParams()
    docs = []
    for name in PARAMETER_NAMES:
        meta = typing.get_args(_TYPE_HINTS[name])[1]
        default = getattr(defaults, name)
        docs.append(
            ParameterDoc(
                name=name,
                type=_type_name(name),
                default=default,
                choices=choices(name),
                description=meta.description,
                ganeti_default=GANETI_DEFAULT_DEVIATIONS.get(name, (default, ""))[0],
                minimum=meta.ge,
                maximum=meta.le,
            )
        )
    return docs


def _markdown_value(value: object) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value}`"


def render_markdown_table() -> str:
    """The README's parameter table: name, default, accepted values and meaning."""
    rows = [
        "| parameter | default | values | meaning |",
        "|---|---|---|---|",
    ]
    for doc in parameter_docs():
        if doc.choices is not None:
            values = ", ".join(_markdown_value(value) for value in doc.choices)
        elif doc.name == "serial_speed":
            values = ", ".join(str(speed) for speed in VALID_SERIAL_SPEEDS)
        elif doc.minimum is not None or doc.maximum is not None:
            low = "" if doc.minimum is None else str(doc.minimum)
            high = "" if doc.maximum is None else str(doc.maximum)
            values = f"{doc.type} {low}..{high}"
        else:
            values = doc.type
        meaning = doc.description
        if doc.ganeti_default != doc.default:
            meaning += f" (Ganeti: {_markdown_value(doc.ganeti_default)})"
        rows.append(f"| `{doc.name}` | {_markdown_value(doc.default)} | {values} | {meaning} |")
    return "\n".join(rows) + "\n"


def _decode_error(
    error: msgspec.ValidationError, layers: list[tuple[str, Mapping[str, Any]]]
) -> InvalidParams:
    """Turn msgspec's error on the merged mapping into one naming the layer that set it.

    Only a value some layer set can be wrong (the defaults are valid), so the last
    layer holding the field is the one at fault.
    """
    message, _, location = str(error).partition(" - at `$.")
    name = location.rstrip("`")
    prefix, value = next(
        (layer_prefix, values[name]) for layer_prefix, values in reversed(layers) if name in values
    )
    path = f"{prefix}.{name}"
    values_set = choices(name)
    if values_set is not None and message.startswith("Invalid enum value"):
        message = f"{value!r} is not one of {format_choices(values_set)}"
    return InvalidParams(path, message)


def resolve_hvparams(
    node_defaults: Mapping[str, Any],
    instance: Mapping[str, Any],
    *,
    node_path: str = "hvparams",
    instance_path: str = "spec.hvparams",
) -> HvParams:
    """Merge built-in defaults <- `node_defaults` <- `instance` into one `HvParams`.

    `node_defaults` is the daemon config's ``[hvparams]`` table, `instance` the spec's
    ``hvparams``. Raises `InvalidParams` (an `InvalidConfigError`) naming the layer and
    key at fault: ``spec.hvparams.foo: unknown hypervisor parameter`` or
    ``hvparams.boot_order: 'usb' is not one of 'cdrom', 'disk', ...``.
    """
    layers = [(node_path, node_defaults), (instance_path, instance)]
    for prefix, values in layers:
        for key in values:
            if key not in _TYPE_HINTS:
                raise InvalidParams(f"{prefix}.{key}", "unknown hypervisor parameter")
    merged = {**node_defaults, **instance}
    try:
        return msgspec.convert(merged, HvParams)
    except msgspec.ValidationError as error:
        raise _decode_error(error, layers) from None
