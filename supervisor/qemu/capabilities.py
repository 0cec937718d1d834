"""What a QEMU binary can do, from its own help texts, and the host checks that need it.

A QEMU binary is asked three questions, once: ``--help``, ``-machine help`` and
``-device help``. `parse_capabilities` turns the answers into a frozen
`QemuCapabilities`; it is pure (text in, struct out), so the tests run it over every
help text Ganeti keeps (QEMU 0.9.1 to 5.2.0) as well as the live binary's.
`probe_qemu` runs the binary; `CapabilityCache` remembers the answer per binary until
its path, mtime or size changes.

The features are those Ganeti's ``hv_kvm`` detects with regular expressions, plus the
ones newer QEMUs force on us (``-run-with`` instead of ``-runas``/``-chroot``,
``-audio`` instead of ``-soundhw``, ``on|off`` booleans instead of ``server,nowait``,
``migrate-set-parameters`` instead of the removed ``migrate_set_speed``). Where the
help text says nothing about a feature, the version decides; the struct's docstrings
say which.

`check_host_qemu` holds the validation rules that need these answers (SPICE support,
machine types, device models, CPU models needing KVM); the rules that need only the
host live in `supervisor.model.validation`.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator
from typing import Final

import anyio
import msgspec

from supervisor.log import get_logger
from supervisor.model.errors import HypervisorError, InvalidConfigError
from supervisor.model.hvparams import HvParams
from supervisor.model.spec import InstanceSpec
from supervisor.qemu.accel import KvmAvailability, probe_kvm
from supervisor.qemu.process import run_captured

__all__ = [
    "NIC_MODELS",
    "SOUND_MODELS",
    "VGA_MODELS",
    "CapabilityCache",
    "MachineType",
    "QemuCapabilities",
    "check_host_qemu",
    "disk_device_model",
    "parse_capabilities",
    "parse_device_help",
    "parse_machine_help",
    "parse_version",
    "probe_qemu",
    "scsi_controller_model",
    "usb_device_model",
]

_log = get_logger(__name__)

HV: Final = "spec.hvparams"

#: QEMU's answer to a help question never takes long; a hung binary must not hang us.
PROBE_TIMEOUT_S: Final = 30.0

#: Ganeti's ``_VERSION_RE``, applied to the first line of ``--help``.
_VERSION: Final = re.compile(r"\b(\d+)\.(\d+)(?:\.(\d+))?\b")
#: The description after the version number, without the copyright notice old QEMUs append.
_VERSION_TEXT: Final = re.compile(r"version\s+(\d+\.\d+(?:\.\d+)?.*?)(?:,\s*Copyright.*)?$")
_MACHINE_LINE: Final = re.compile(r"^(\S+)\s+(.*?)\s*$")
_ALIAS: Final = re.compile(r"\s*\(alias of ([^)]+)\)")
_DEVICE_LINE: Final = re.compile(r'^name "([^"]+)"(.*)$')
_DEVICE_ALIAS: Final = re.compile(r'alias "([^"]+)"')

#: ``nic_type`` -> the qdev model QEMU knows it by (paravirtual is virtio-net).
NIC_MODELS: Final = {
    "paravirtual": "virtio-net-pci",
    "e1000": "e1000",
    "i82551": "i82551",
    "i82557b": "i82557b",
    "i82559er": "i82559er",
    "ne2k_isa": "ne2k_isa",
    "ne2k_pci": "ne2k_pci",
    "pcnet": "pcnet",
    "rtl8139": "rtl8139",
}

#: ``soundhw`` card names (``-soundhw``/``-audio model=``) -> the qdev models they add.
SOUND_MODELS: Final = {
    "ac97": ("AC97",),
    "adlib": ("adlib",),
    "cs4231a": ("cs4231a",),
    "es1370": ("ES1370",),
    "gus": ("gus",),
    "hda": ("intel-hda", "hda-duplex"),
    "sb16": ("sb16",),
}

#: ``-vga`` cards -> the qdev model each one is.
VGA_MODELS: Final = {
    "std": "VGA",
    "cirrus": "cirrus-vga",
    "vmware": "vmware-svga",
    "qxl": "qxl-vga",
    "virtio": "virtio-vga",
}

#: ``-usbdevice`` names of the emulated USB devices -> their ``-device`` models.
_USB_DEVICE_MODELS: Final = {
    "braille": "usb-braille",
    "keyboard": "usb-kbd",
    "mouse": "usb-mouse",
    "tablet": "usb-tablet",
    "wacom-tablet": "usb-wacom-tablet",
}

#: ``disk_type`` values served by a qdev model (the rest use ``-drive if=<type>``).
_DISK_MODELS: Final = {
    "paravirtual": "virtio-blk-pci",
    "ide": "ide-hd",
    "scsi": "scsi-hd",
    "scsi-hd": "scsi-hd",
    "scsi-cd": "scsi-cd",
    "scsi-block": "scsi-block",
    "scsi-generic": "scsi-generic",
}

_SCSI_CONTROLLER_MODELS: Final = {
    "lsi": "lsi53c895a",
    "megasas": "megasas",
    "virtio-scsi-pci": "virtio-scsi-pci",
}


class MachineType(msgspec.Struct, frozen=True, kw_only=True):
    """One line of ``-machine help``."""

    name: str
    description: str
    #: The machine this name stands for (``pc`` -> ``pc-i440fx-7.2``), if it is an alias.
    alias_of: str | None = None
    is_default: bool = False
    deprecated: bool = False


class QemuCapabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What one QEMU binary supports; build it with `parse_capabilities` or `probe_qemu`.

    Each flag is read from ``--help`` unless its comment says otherwise.
    """

    path: str
    version: tuple[int, int, int]
    #: The version as QEMU prints it, with its build description: ``7.2.22 (Debian ...)``.
    version_text: str
    qmp: bool
    spice: bool
    #: ``vhost=on|off`` on ``-net``/``-netdev``.
    vhost_net: bool
    #: ``fds=x:y:...:z`` on ``-net``/``-netdev``: multiqueue taps.
    multiqueue_tap: bool
    enable_kvm: bool
    netdev: bool
    display: bool
    #: ``-machine`` exists (otherwise only ``-M``).
    machine_option: bool
    #: ``-drive ...,boot=on|off``: QEMUs before 0.14 need it to boot from virtio disks.
    drive_boot_flag: bool
    uuid: bool
    #: ``-name ...,debug-threads=on``: vCPU threads named for pinning and ``top``.
    name_debug_threads: bool
    #: ``-run-with chroot=...,user=...`` (QEMU 9.1), replacing ``-chroot`` and ``-runas``.
    run_with: bool
    runas: bool
    chroot: bool
    #: ``-audio driver,model=...`` (QEMU 7.1), replacing ``-soundhw``.
    audio: bool
    #: ``-audiodev`` (QEMU 4.0): sound cards as ``-device`` with an explicit backend.
    audiodev: bool
    soundhw: bool
    no_acpi_option: bool
    #: The x86 machines' ``acpi=on|off`` property; the help text is silent: QEMU >= 5.1.
    machine_acpi: bool
    rtc: bool
    localtime_option: bool
    #: The legacy ``-balloon virtio`` option (removed in QEMU 3.1 for ``-device``).
    balloon_option: bool
    #: Booleans written ``server=on,wait=off`` rather than the ``server,nowait`` short form.
    on_off_booleans: bool
    #: ``-chardev ...,logfile=``: every byte of the serial console kept in a file.
    chardev_logfile: bool
    #: ``-boot order=...`` rather than the bare ``-boot c``.
    boot_order_option: bool
    usbdevice: bool
    object_option: bool
    #: QMP ``migrate-set-parameters`` (max-bandwidth, downtime-limit): QEMU >= 2.8.
    migrate_set_parameters: bool
    #: The old ``migrate_set_speed``/``migrate_set_downtime``: removed in QEMU 7.2.
    migrate_set_speed: bool
    #: ``-machine help``, in QEMU's order.
    machines: tuple[MachineType, ...]
    #: The machine QEMU picks without ``-machine`` (resolved, never an alias), if it says.
    default_machine: str | None
    #: Every ``-device`` model name and alias.
    devices: frozenset[str]
    #: Identifies this binary's answers: equal fingerprints mean the same capabilities.
    fingerprint: str

    def machine(self, name: str) -> MachineType | None:
        """The machine type `name` (an alias resolves to what it stands for), or None."""
        by_name = {machine.name: machine for machine in self.machines}
        machine = by_name.get(name)
        if machine is not None and machine.alias_of is not None:
            return by_name.get(machine.alias_of, machine)
        return machine

    def has_device(self, model: str) -> bool:
        """Whether ``-device <model>`` exists."""
        return model in self.devices


def parse_version(help_text: str) -> tuple[tuple[int, int, int], str]:
    """The version tuple and text from the first line of ``--help``.

    ``QEMU emulator version 1.0 (qemu-kvm-1.0 Debian 1.0+dfsg-2), Copyright ...`` gives
    ``((1, 0, 0), "1.0 (qemu-kvm-1.0 Debian 1.0+dfsg-2)")``. Raises ValueError when the
    first line holds no version.
    """
    first_line = help_text.split("\n", 1)[0].strip()
    match = _VERSION.search(first_line)
    if match is None:
        raise ValueError(f"no QEMU version in {first_line!r}")
    version = (int(match[1]), int(match[2]), int(match[3] or 0))
    text = _VERSION_TEXT.search(first_line)
    return version, (text[1] if text else match[0])


def _option_blocks(help_text: str) -> dict[str, list[str]]:
    """Each option's help, with its continuation lines: ``{"-netdev": [block, ...]}``.

    An option begins a line with ``-``; lines starting with blanks continue it; anything
    else (a section title, an empty line) ends it. Searching inside one block is what
    Ganeti's ``_BOOT_RE`` does by hand.
    """
    blocks: dict[str, list[str]] = {}
    option: str | None = None
    for line in help_text.splitlines():
        if line.startswith("-"):
            option = line.split(None, 1)[0]
            blocks.setdefault(option, []).append(line)
        elif option is not None and line[:1].isspace() and line.strip():
            blocks[option][-1] += "\n" + line
        else:
            option = None
    return blocks


def parse_machine_help(text: str) -> tuple[tuple[MachineType, ...], str | None]:
    """The machine types of ``-machine help`` (or ``-M ?``) and the default one, resolved."""
    machines: list[MachineType] = []
    for line in text.splitlines():
        match = _MACHINE_LINE.match(line)
        if match is None or line.startswith(("Supported machines", " ")):
            continue
        name, description = match[1], match[2]
        alias = _ALIAS.search(description)
        is_default = "(default)" in description
        deprecated = "(deprecated)" in description
        for marker in ("(default)", "(deprecated)"):
            description = description.replace(marker, "")
        description = _ALIAS.sub("", description).strip()
        machines.append(
            MachineType(
                name=name,
                description=description,
                alias_of=alias[1] if alias else None,
                is_default=is_default,
                deprecated=deprecated,
            )
        )
    default = next((machine for machine in machines if machine.is_default), None)
    if default is None:
        return tuple(machines), None
    return tuple(machines), default.alias_of or default.name


def parse_device_help(text: str) -> frozenset[str]:
    """Every model name and alias of ``-device help``."""
    devices: set[str] = set()
    for line in text.splitlines():
        match = _DEVICE_LINE.match(line)
        if match is not None:
            devices.add(match[1])
            devices.update(_DEVICE_ALIAS.findall(match[2]))
    return frozenset(devices)


def parse_capabilities(
    path: str, help_text: str, machine_text: str, device_text: str
) -> QemuCapabilities:
    """Build the capabilities of the binary at `path` from its three help texts.

    Pure: nothing is run or read. Raises ValueError when `help_text` has no version.
    """
    version, version_text = parse_version(help_text)
    blocks = _option_blocks(help_text)

    def has(option: str) -> bool:
        return option in blocks

    def mentions(options: tuple[str, ...], text: str) -> bool:
        return any(text in block for option in options for block in blocks.get(option, []))

    machines, default_machine = parse_machine_help(machine_text)
    digest = hashlib.sha256()
    for text in (help_text, machine_text, device_text):
        digest.update(text.encode())
        digest.update(b"\0")
    return QemuCapabilities(
        path=path,
        version=version,
        version_text=version_text,
        qmp=has("-qmp"),
        spice=has("-spice"),
        vhost_net=mentions(("-net", "-netdev"), "vhost=on|off"),
        multiqueue_tap=mentions(("-net", "-netdev"), "fds=x:y:...:z"),
        enable_kvm=has("-enable-kvm"),
        netdev=has("-netdev"),
        display=has("-display"),
        machine_option=has("-machine"),
        drive_boot_flag=mentions(("-drive",), ",boot=on|off"),
        uuid=has("-uuid"),
        name_debug_threads=mentions(("-name",), "debug-threads"),
        run_with=has("-run-with"),
        runas=has("-runas"),
        chroot=has("-chroot"),
        audio=has("-audio"),
        audiodev=has("-audiodev"),
        soundhw=has("-soundhw"),
        no_acpi_option=has("-no-acpi"),
        machine_acpi=version >= (5, 1, 0),
        rtc=has("-rtc"),
        localtime_option=has("-localtime"),
        balloon_option=has("-balloon"),
        on_off_booleans=mentions(("-chardev",), "server=on|off"),
        chardev_logfile=mentions(("-chardev",), "logfile="),
        boot_order_option=mentions(("-boot",), "order="),
        usbdevice=has("-usbdevice"),
        object_option=has("-object"),
        migrate_set_parameters=version >= (2, 8, 0),
        migrate_set_speed=version < (7, 2, 0),
        machines=machines,
        default_machine=default_machine,
        devices=parse_device_help(device_text),
        fingerprint=f"{'.'.join(map(str, version))}-{digest.hexdigest()[:16]}",
    )


async def _output(path: str, *args: str, may_fail: bool = False) -> str:
    command = [path, *args]
    try:
        with anyio.fail_after(PROBE_TIMEOUT_S):
            status, stdout, stderr = await run_captured(command)
    except TimeoutError:
        raise HypervisorError(
            f"{' '.join(command)} did not answer within {PROBE_TIMEOUT_S:g} s"
        ) from None
    except OSError as error:
        raise HypervisorError(f"cannot run {path}: {error.strerror}") from None
    if status.code != 0 and not may_fail:
        raise HypervisorError(
            f"{' '.join(command)} failed: {status.describe()}",
            stderr=stderr.decode(errors="replace")[-2000:],
            exit_status=status.code,
        )
    return stdout.decode(errors="replace")


async def probe_qemu(path: str) -> QemuCapabilities:
    """Run the QEMU binary at `path` three times and return what it can do.

    Raises `HypervisorError` when it cannot be run, fails, hangs or prints no version.
    On cancellation the running child is killed (by `run_captured`).
    """
    help_text = await _output(path, "--help")
    try:
        version, _ = parse_version(help_text)
    except ValueError as error:
        raise HypervisorError(f"{path} --help: {error}") from None
    # "help" replaced "?" as the listing keyword in QEMU 1.3; the old QEMUs' -M lists too.
    keyword = "help" if version >= (1, 3, 0) else "?"
    machine_option = "-machine" if "-machine" in _option_blocks(help_text) else "-M"
    machine_text = await _output(path, machine_option, keyword)
    # Ganeti accepts a failing -device listing: QEMUs without qdev have none.
    device_text = await _output(path, "-device", keyword, may_fail=True)
    capabilities = parse_capabilities(path, help_text, machine_text, device_text)
    _log.debug("probed qemu", path=path, version=capabilities.version_text)
    return capabilities


class CapabilityCache:
    """Probes each QEMU binary once, until its path, mtime or size changes.

    One per daemon; safe to share between tasks (concurrent callers for one binary wait
    for a single probe).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, int], QemuCapabilities]] = {}
        self._lock = anyio.Lock()

    async def get(self, path: str) -> QemuCapabilities:
        """The capabilities of the binary at `path`, probing it if it is new or changed.

        Raises `HypervisorError` as `probe_qemu` does, or when the binary is missing.
        """
        async with self._lock:
            try:
                status = os.stat(path)
            except OSError as error:
                raise HypervisorError(f"cannot run {path}: {error.strerror}") from None
            identity = (status.st_mtime_ns, status.st_size)
            entry = self._entries.get(path)
            if entry is not None and entry[0] == identity:
                return entry[1]
            capabilities = await probe_qemu(path)
            self._entries[path] = (identity, capabilities)
            return capabilities


def disk_device_model(disk_type: str) -> str | None:
    """The qdev model serving `disk_type` (``ide`` -> ``ide-hd``), or None for if=-only types."""
    return _DISK_MODELS.get(disk_type)


def scsi_controller_model(controller_type: str) -> str:
    """The qdev model of a ``scsi_controller_type`` (``lsi`` -> ``lsi53c895a``)."""
    return _SCSI_CONTROLLER_MODELS[controller_type]


def usb_device_model(name: str) -> str | None:
    """The ``-device`` model of a ``-usbdevice`` name (``tablet`` -> ``usb-tablet``), if any."""
    return _USB_DEVICE_MODELS.get(name)


def check_host_qemu(
    spec: InstanceSpec,
    hv: HvParams,
    caps: QemuCapabilities,
    *,
    kvm: KvmAvailability | None = None,
) -> list[InvalidConfigError]:
    """Every problem of `spec` and `hv` that this QEMU (and this host's KVM) reveals.

    Run it after `supervisor.model.validation.check_syntax` came back clean. `kvm` defaults
    to `supervisor.qemu.accel.probe_kvm()`; tests pass their own.
    """
    if kvm is None:
        kvm = probe_kvm()
    return [
        *_supervision_problems(hv, caps),
        *_display_problems(hv, caps),
        *_machine_problems(hv, caps),
        *_cpu_problems(hv, caps, kvm),
        *_device_problems(spec, hv, caps),
        *_security_problems(hv, caps),
    ]


def _supervision_problems(hv: HvParams, caps: QemuCapabilities) -> Iterator[InvalidConfigError]:
    # The supervisor drives QEMU over QMP and recognises its processes by -uuid.
    missing = [
        option for option, present in (("-qmp", caps.qmp), ("-uuid", caps.uuid)) if not present
    ]
    if missing:
        yield InvalidConfigError(
            f"{HV}.kvm_path",
            f"QEMU {caps.version_text} at {hv.kvm_path} has no {' or '.join(missing)}:"
            " kvm-supervisor needs QEMU 0.14 or newer",
        )


def _display_problems(hv: HvParams, caps: QemuCapabilities) -> Iterator[InvalidConfigError]:
    if hv.spice_bind and not caps.spice:
        yield InvalidConfigError(
            f"{HV}.spice_bind", f"QEMU {caps.version_text} at {caps.path} has no SPICE support"
        )
    if hv.vnc_tls and not caps.object_option:
        yield InvalidConfigError(
            f"{HV}.vnc_tls", f"QEMU {caps.version_text} has no -object for TLS credentials"
        )


def _machine_problems(hv: HvParams, caps: QemuCapabilities) -> Iterator[InvalidConfigError]:
    if hv.machine_version and caps.machine(hv.machine_version) is None:
        known = ", ".join(machine.name for machine in caps.machines)
        yield InvalidConfigError(
            f"{HV}.machine_version",
            f"{hv.machine_version!r} is not a machine type of QEMU {caps.version_text}"
            f" (it knows {known})",
        )
    if not hv.machine_version and caps.default_machine is None:
        yield InvalidConfigError(
            f"{HV}.machine_version",
            f"QEMU {caps.version_text} names no default machine type: set one",
        )


def _cpu_problems(
    hv: HvParams, caps: QemuCapabilities, kvm: KvmAvailability
) -> Iterator[InvalidConfigError]:
    # -cpu host passes the host CPU through, which only a hardware accelerator can do;
    # under kvm_pvm QEMU even aborts on it (an MSR assertion), so usable-for-stock-guests
    # is the bar, whatever kvm_flag says.
    if hv.cpu_type == "host" and (hv.kvm_flag == "disabled" or not kvm.usable_for_stock_guests):
        why = "kvm_flag is disabled" if hv.kvm_flag == "disabled" else kvm.reason
        yield InvalidConfigError(f"{HV}.cpu_type", f"host needs KVM, and {why}")
    if hv.kvm_flag == "enabled" and not caps.machine_option and not caps.enable_kvm:
        yield InvalidConfigError(
            f"{HV}.kvm_flag", f"QEMU {caps.version_text} offers no way to enable KVM"
        )


def _device_problems(
    spec: InstanceSpec, hv: HvParams, caps: QemuCapabilities
) -> Iterator[InvalidConfigError]:
    if not caps.devices:
        # Without a device listing (QEMU before qdev) only the legacy options are used.
        return
    if spec.nics:
        model = NIC_MODELS[hv.nic_type]
        if not caps.has_device(model) and hv.nic_type != "paravirtual":
            yield InvalidConfigError(f"{HV}.nic_type", f"QEMU has no {model} device")
    if hv.vhost_net and not caps.vhost_net:
        yield InvalidConfigError(f"{HV}.vhost_net", f"QEMU {caps.version_text} has no vhost-net")
    if hv.virtio_net_queues > 1 and spec.nics and not caps.multiqueue_tap:
        yield InvalidConfigError(
            f"{HV}.virtio_net_queues", f"QEMU {caps.version_text} has no multiqueue taps"
        )
    yield from _disk_device_problems(spec, hv, caps)
    for card in filter(None, hv.soundhw.split(",")):
        models = SOUND_MODELS.get(card)
        if models is None:
            yield InvalidConfigError(
                f"{HV}.soundhw",
                f"{card!r} is not one of {', '.join(repr(name) for name in SOUND_MODELS)}",
            )
        elif not all(caps.has_device(model) for model in models):
            yield InvalidConfigError(f"{HV}.soundhw", f"QEMU has no {card} sound card")
    if hv.soundhw and not (caps.audiodev or caps.soundhw):
        yield InvalidConfigError(f"{HV}.soundhw", f"QEMU {caps.version_text} has no sound option")
    for name in filter(None, hv.usb_devices.split(",")):
        usb_model = usb_device_model(name)
        if usb_model is None and not caps.usbdevice:
            yield InvalidConfigError(
                f"{HV}.usb_devices",
                f"{name!r} is not an emulated USB device and QEMU has no -usbdevice",
            )
        elif usb_model is not None and not caps.has_device(usb_model):
            yield InvalidConfigError(f"{HV}.usb_devices", f"QEMU has no {usb_model} device")
    if hv.vga and hv.vga != "none":
        vga_model = VGA_MODELS.get(hv.vga)
        if vga_model is None:
            yield InvalidConfigError(
                f"{HV}.vga",
                f"{hv.vga!r} is not one of 'none', {', '.join(map(repr, VGA_MODELS))}",
            )
        elif not caps.has_device(vga_model):
            yield InvalidConfigError(f"{HV}.vga", f"QEMU has no {hv.vga!r} graphics card")


def _disk_device_problems(
    spec: InstanceSpec, hv: HvParams, caps: QemuCapabilities
) -> Iterator[InvalidConfigError]:
    model = disk_device_model(hv.disk_type)
    if spec.disks and hv.disk_type in ("sd", "mtd"):
        yield InvalidConfigError(
            f"{HV}.disk_type", f"x86 machines have no {hv.disk_type} interface"
        )
    has_cdrom = bool(hv.cdrom_image_path or hv.cdrom2_image_path)
    if has_cdrom and hv.cdrom_disk_type in ("sd", "mtd", "pflash"):
        yield InvalidConfigError(
            f"{HV}.cdrom_disk_type", f"x86 machines cannot attach CD-ROMs as {hv.cdrom_disk_type}"
        )
    if spec.disks and hv.disk_type == "pflash":
        yield InvalidConfigError(
            f"{HV}.disk_type", "x86 machines map pflash drives as the firmware, not as disks"
        )
    if spec.disks and model is not None and not caps.has_device(model):
        yield InvalidConfigError(f"{HV}.disk_type", f"QEMU has no {model} device")
    if spec.disks and hv.disk_type.startswith("scsi"):
        controller = scsi_controller_model(hv.scsi_controller_type)
        if not caps.has_device(controller):
            yield InvalidConfigError(
                f"{HV}.scsi_controller_type", f"QEMU has no {controller} device"
            )
    for index, disk in enumerate(spec.disks):
        if disk.mode == "ro" and hv.disk_type == "ide":
            yield InvalidConfigError(
                f"spec.disks[{index}].mode",
                f"QEMU cannot attach a read-only disk as {hv.disk_type}: use paravirtual or scsi",
            )
        if hv.disk_type == "scsi-block" and not _is_device(disk.path, block=True):
            yield InvalidConfigError(
                f"spec.disks[{index}].path", f"scsi-block needs a block device, not {disk.path}"
            )
        if hv.disk_type == "scsi-generic" and not _is_device(disk.path, block=False):
            yield InvalidConfigError(
                f"spec.disks[{index}].path",
                f"scsi-generic needs a SCSI generic (/dev/sg*) device, not {disk.path}",
            )


def _is_device(path: str, *, block: bool) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISBLK(mode) if block else stat.S_ISCHR(mode)


def _security_problems(hv: HvParams, caps: QemuCapabilities) -> Iterator[InvalidConfigError]:
    if hv.security_model != "none" and not (caps.run_with or caps.runas):
        yield InvalidConfigError(
            f"{HV}.security_model", f"QEMU {caps.version_text} cannot change its user"
        )
    if hv.use_chroot and not (caps.run_with or caps.chroot):
        yield InvalidConfigError(f"{HV}.use_chroot", f"QEMU {caps.version_text} cannot chroot")
