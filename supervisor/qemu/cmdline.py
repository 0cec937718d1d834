"""The QEMU command line of an instance, as Ganeti's ``_GenerateKVMRuntime`` builds it.

`build_command_line` is pure: from the spec, its resolved hypervisor parameters, the
QEMU capabilities, the instance's paths, the accelerator and what the host leased for
this start (`LaunchResources`), it returns a `CommandLine`: the argv plus the plans of
the NICs (netdev ids, MACs, the fd names of their taps) and disks (drive and device
ids, PCI slots), which the runtime record keeps for reboots, migration and hotplug.
Options are written in the syntax the probed QEMU accepts: modern on QEMU 7.2
(``server=on,wait=off``, ``-audiodev``, ``-machine ...,acpi=off``), old only where
the probe says the binary predates it.

Differences from Ganeti, on purpose:

- ``-nodefaults``, so the guest gets exactly the devices the parameters ask for (no
  phantom empty CD-ROM, parallel port or default NIC); a VGA is then added explicitly
  (``vga``, else ``qxl`` with SPICE, else ``std``, QEMU's own default on ``pc``).
- No ``-daemonize``: the supervisor starts QEMU in its own session and watches it.
- The accelerator is always explicit (``-machine <type>,accel=kvm|tcg``) and the
  machine type is resolved (``pc`` becomes ``pc-i440fx-7.2``), so a migration target
  with a newer QEMU keeps the guest's hardware.
- The serial console is a socket chardev with ``logfile=``: every byte the guest
  writes is kept in ``serial.log``, whether or not anyone is attached.
- ``-name NAME,debug-threads=on`` names the vCPU threads, which CPU pinning uses.
- Under TCG the guest gets `TCG_RAM_PAD_KIB` more RAM than ``memory_mib``: QEMU before
  9.0 loses guest stores during a live migration of a RAM block sized in whole 256 KiB.
- Read-only disks are supported (``readonly=on``); Ganeti refused them.
- ``kvm_extra`` is split as a shell would split it (`shlex.split`, no shell is run)
  and goes last, where it can add to or override what precedes it.
- A CD-ROM with an empty ``cdrom_disk_type`` is IDE (``scsi-cd`` with SCSI disks),
  not a virtio disk.

Taps are passed as file descriptors when QEMU is launched. The argv names them by
fd name (``-netdev tap,id=net0,fd=tap0``): `argv_with_fds` puts the real
numbers in. The launcher adds ``-S`` (start paused) and ``-incoming`` itself, and sets
the VNC and SPICE passwords over QMP (``change-vnc-password``, ``set_password``)
before resuming the guest, as Ganeti does.
"""

from __future__ import annotations

import os
import pwd
import shlex
import socket
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final, Literal

import msgspec

from supervisor.host.chroot import create_chroot
from supervisor.host.interfaces import interface_addresses
from supervisor.host.statedir import MAX_SOCKET_PATH_BYTES, InstancePaths, StateDir
from supervisor.host.uidpool import UidPool
from supervisor.model.config import Config, load_instance_file
from supervisor.model.errors import InvalidConfigError
from supervisor.model.hvparams import HvParams
from supervisor.model.spec import InstanceSpec, assign_macs, ensure_uuid
from supervisor.model.validation import ip_version, raise_first, validated_hvparams
from supervisor.qemu.accel import Accelerator, probe_kvm, resolve_accelerator
from supervisor.qemu.capabilities import (
    NIC_MODELS,
    SOUND_MODELS,
    QemuCapabilities,
    check_host_qemu,
    disk_device_model,
    probe_qemu,
    scsi_controller_model,
    usb_device_model,
)

__all__ = [
    "SPICE_X509_DIR",
    "TCG_RAM_PAD_KIB",
    "VNC_BASE_PORT",
    "CommandLine",
    "DiskPlan",
    "LaunchResources",
    "NicPlan",
    "argv_for_spec_file",
    "argv_with_fds",
    "build_command_line",
    "free_port",
    "guest_agent_socket",
    "launch_resources",
    "run_as_for_uid",
    "socket_path_problems",
]

HV: Final = "spec.hvparams"

#: VNC display N listens on port 5900 + N.
VNC_BASE_PORT: Final = 5900
#: Where the SPICE TLS files (ca-cert.pem, server-cert.pem, server-key.pem) are read
#: from unless `LaunchResources.spice_x509_dir` says otherwise; one set per host, as
#: Ganeti's cluster-wide ``spice.pem``.
SPICE_X509_DIR: Final = "/etc/kvm-supervisor/spice-tls"
#: What a guest under TCG gets beyond its ``memory_mib`` (``-m 98312k`` for 96 MiB), so
#: that a live migration keeps its memory intact. QEMU before 9.0 (fixed there by commit
#: 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory access")
#: syncs the migration's dirty bitmap of a RAM block whose size is a multiple of 64 pages
#: (256 KiB) on a fast path that leaves TCG's TLB as it was: a store through a TLB entry
#: filled before the sync marks nothing dirty, so the page is not sent again and the
#: target's guest finds stale kernel data (slab corruption, virtio rings "not a head").
#: A guest with network traffic lost such stores in nearly every migration; any other
#: size takes the page-by-page path, which resets the TLB, and migrated intact in every
#: run (tests/bench/repro_migration.py and the README give the counts). 8 KiB is the
#: smallest step QEMU sizes RAM in. Both ends of a migration run TCG (the accelerators
#: must match), so both build the same size. KVM tracks dirty pages itself.
TCG_RAM_PAD_KIB: Final = 8

#: ``boot_order`` -> the ``-boot`` drive letter.
_BOOT_LETTERS: Final = {"disk": "c", "cdrom": "d", "floppy": "a", "network": "n"}
#: The chipset's own devices in slots 0-1 and the VGA in slot 2 (pc); q35's ICH9 owns 31.
_PCI_SLOTS: Final = {"pci.0": range(3, 32), "pcie.0": range(2, 31)}
_SCSI_BUS: Final = "scsi.0"
_HOST_MTU_SINCE: Final = (2, 9, 0)
_SCSI_CONTROLLER_ID: Final = "scsi"


class NicPlan(msgspec.Struct, frozen=True, kw_only=True):
    """One NIC as QEMU sees it and as the networking code must set it up."""

    index: int
    mac: str
    mode: Literal["bridged", "routed", "openvswitch"]
    link: str | None = None
    ip: str | None = None
    vlan: int | None = None
    mtu: int | None = None
    netdev_id: str
    #: The ``-device`` id; None with the old ``-net nic`` syntax.
    device_id: str | None
    #: The qdev model (``virtio-net-pci``) or, with the old ``-net nic``, the model name.
    model: str
    #: The fd names the tap option uses, one per queue; see `argv_with_fds`.
    fd_names: tuple[str, ...]
    #: The fd names of its ``/dev/vhost-net`` descriptors (``vhostfd=``/``vhostfds=``),
    #: one per queue when `vhost` is on.
    vhost_fd_names: tuple[str, ...] = ()
    #: Open the tap with IFF_VNET_HDR (virtio offloads).
    vnet_hdr: bool
    #: Open the tap with IFF_MULTI_QUEUE: one fd per queue.
    queues: int
    vhost: bool
    pci_slot: int | None = None
    #: The host tap device, set by the networking code once it exists.
    tap: str | None = None


class DiskPlan(msgspec.Struct, frozen=True, kw_only=True):
    """One disk (or CD-ROM, or floppy) as QEMU sees it."""

    kind: Literal["disk", "cdrom", "floppy"]
    index: int
    path: str
    format: Literal["raw", "qcow2"]
    readonly: bool
    drive_id: str
    #: The ``-device`` id and model; None for an old-style ``-drive if=<type>``.
    device_id: str | None = None
    model: str | None = None
    pci_slot: int | None = None
    scsi_id: int | None = None


class LaunchResources(msgspec.Struct, frozen=True, kw_only=True):
    """What the host assigned to this start of the instance.

    The builder stays pure: ports, uids and interface addresses are looked up or
    leased by the caller and handed in here.
    """

    #: The VNC/SPICE port when the spec has no ``network_port`` (leased from the range).
    display_port: int | None = None
    #: ``-runas``/``-run-with user=`` value for ``security_model = "pool"``.
    pool_user: str | None = None
    #: The address of the interface named by ``vnc_bind_address``.
    vnc_address: str | None = None
    #: The address of the interface named by ``spice_bind``.
    spice_address: str | None = None
    spice_x509_dir: str = SPICE_X509_DIR


class CommandLine(msgspec.Struct, frozen=True, kw_only=True):
    """A QEMU argv and what it sets up."""

    argv: tuple[str, ...]
    nics: tuple[NicPlan, ...]
    disks: tuple[DiskPlan, ...]
    accel: Accelerator
    #: The machine type, resolved (never an alias).
    machine: str
    #: The VNC or SPICE port, when there is a display.
    display_port: int | None = None
    #: Whom QEMU runs as after start-up (None: root).
    run_as: str | None = None


#: The tap options that name descriptors, by fd name, in the argv the builder writes.
_FD_KEYS: Final = ("fd", "fds", "vhostfd", "vhostfds")


def argv_with_fds(
    argv: Sequence[str], nics: Sequence[NicPlan], fds: Mapping[str, int]
) -> list[str]:
    """`argv` with each NIC's fd names replaced by descriptor numbers from `fds`.

    The tap options are found by their netdev id (``-netdev tap,id=net0,...`` or the old
    ``-net tap,...,name=net0,...``), so the argv may have been changed around them
    (``-S``, QMP on a descriptor) after it was built. `fds` maps every name in every
    `NicPlan.fd_names` and `NicPlan.vhost_fd_names` to the number the descriptor has in
    QEMU (``pass_fds`` keeps numbers). Raises KeyError naming a missing name, and
    ValueError naming a NIC whose tap option is not in `argv`.
    """
    netdev_ids = {nic.netdev_id for nic in nics}
    filled: set[str] = set()
    result = []
    for arg in argv:
        parts = arg.split(",")
        options = dict(part.partition("=")[::2] for part in parts[1:])
        netdev_id = options.get("id") or options.get("name")
        if parts[0] != "tap" or netdev_id not in netdev_ids:
            result.append(arg)
            continue
        for position, part in enumerate(parts):
            key, _, value = part.partition("=")
            if key in _FD_KEYS:
                parts[position] = f"{key}={':'.join(str(fds[name]) for name in value.split(':'))}"
        filled.add(netdev_id)
        result.append(",".join(parts))
    missing = sorted(netdev_ids - filled)
    if missing:
        raise ValueError(f"no tap option for netdev {missing[0]} in the argv")
    return result


def _fd_option(key: str, names: Sequence[str]) -> str:
    """``fd=NAME`` for one queue, ``fds=NAME:NAME...`` for several (``vhostfd``/``vhostfds``)."""
    return f"{key}={names[0]}" if len(names) == 1 else f"{key}s={':'.join(names)}"


def guest_agent_socket(paths: InstancePaths) -> Path:
    """The unix socket of the QEMU guest agent channel (``use_guest_agent``)."""
    return paths.directory / "qga.sock"


def _vnc_socket(hv: HvParams, name: str) -> str:
    return f"{hv.vnc_bind_address}/{name}.vnc"


def socket_path_problems(
    spec: InstanceSpec, hv: HvParams, paths: InstancePaths
) -> list[InvalidConfigError]:
    """Every unix socket the argv names that does not fit the 107-byte address limit."""
    sockets = {"spec.name": [paths.qmp_socket]}
    if hv.serial_console:
        sockets["spec.name"].append(paths.serial_socket)
    if hv.use_guest_agent:
        sockets["spec.name"].append(guest_agent_socket(paths))
    if hv.vnc_bind_address.startswith("/"):
        sockets[f"{HV}.vnc_bind_address"] = [Path(_vnc_socket(hv, spec.name))]
    problems = []
    for field, candidates in sockets.items():
        for path in candidates:
            length = len(os.fsencode(path))
            if length > MAX_SOCKET_PATH_BYTES:
                problems.append(
                    InvalidConfigError(
                        field,
                        f"instance {spec.name!r}: socket {path} is {length} bytes, over the"
                        f" {MAX_SOCKET_PATH_BYTES}-byte limit of unix sockets: use a shorter"
                        " name or state_dir",
                    )
                )
    return problems


class _Options:
    """Writes option values in the syntax of one QEMU."""

    def __init__(self, caps: QemuCapabilities) -> None:
        self.caps = caps

    def flag(self, name: str) -> str:
        """A boolean sub-option turned on: ``server=on``, or the old short form ``server``."""
        return f"{name}=on" if self.caps.on_off_booleans else name

    @property
    def server(self) -> str:
        """A listening socket that does not wait for its first client."""
        return f"{self.flag('server')},{'wait=off' if self.caps.on_off_booleans else 'nowait'}"

    def unix_server(self, path: Path | str) -> str:
        return f"unix:{path},{self.server}"


class _PciSlots:
    """Hands out the slots of the main PCI bus after the reserved ones, as Ganeti does."""

    def __init__(self, bus: str | None, reservations: int) -> None:
        self.bus = bus
        self._free: Iterator[int] = iter(
            [] if bus is None else [s for s in _PCI_SLOTS[bus] if s >= reservations]
        )

    def take(self, what: str) -> tuple[str, int | None]:
        """The ``bus=...,addr=...`` suffix (empty without a known bus) and the slot."""
        if self.bus is None:
            return "", None
        slot = next(self._free, None)
        if slot is None:
            raise InvalidConfigError(
                f"{HV}.kvm_pci_reservations",
                f"no PCI slot left for {what}: lower kvm_pci_reservations",
            )
        return f",bus={self.bus},addr={slot:#x}", slot


def _pci_bus(machine: str) -> str | None:
    if "q35" in machine:
        return "pcie.0"
    if machine.startswith("pc"):
        return "pci.0"
    # microvm, isapc: no PCI bus to place devices on by address.
    return None


def build_command_line(
    spec: InstanceSpec,
    hv: HvParams,
    caps: QemuCapabilities,
    paths: InstancePaths,
    accel: Accelerator,
    *,
    resources: LaunchResources | None = None,
) -> CommandLine:
    """The QEMU command line that starts `spec` with `hv` on the QEMU described by `caps`.

    Pure: reads nothing, runs nothing. The spec must have its uuid and every NIC its MAC
    (`supervisor.model.spec.ensure_uuid`, `assign_macs`), and should have passed validation;
    what cannot be expressed still raises `InvalidConfigError` naming the field (no PCI
    slot left, a display without a port, an interface without its address).
    """
    builder = _Builder(
        spec=spec,
        hv=hv,
        caps=caps,
        paths=paths,
        accel=accel,
        resources=resources or LaunchResources(),
    )
    return builder.build()


class _Builder:
    def __init__(
        self,
        *,
        spec: InstanceSpec,
        hv: HvParams,
        caps: QemuCapabilities,
        paths: InstancePaths,
        accel: Accelerator,
        resources: LaunchResources,
    ) -> None:
        self.spec = spec
        self.hv = hv
        self.caps = caps
        self.paths = paths
        self.accel = accel
        self.resources = resources
        self.opt = _Options(caps)
        self.argv: list[str] = [hv.kvm_path]
        self.nics: list[NicPlan] = []
        self.disks: list[DiskPlan] = []
        machine = hv.machine_version or caps.default_machine
        if machine is None:
            raise InvalidConfigError(
                f"{HV}.machine_version", "QEMU names no default machine type: set one"
            )
        known = caps.machine(machine)
        self.machine = known.name if known is not None else machine
        self.pci = _PciSlots(_pci_bus(self.machine), hv.kvm_pci_reservations)
        self.display_port = spec.network_port or resources.display_port
        self.run_as: str | None = None
        # The LSI controller has 7 targets (the 8th id is its own); the others use 255.
        self.scsi_ids = iter(range(7 if hv.scsi_controller_type == "lsi" else 255))
        self.nic_devices = False

    def add(self, *args: str) -> None:
        self.argv.extend(args)

    def build(self) -> CommandLine:
        if self.spec.uuid is None:
            raise InvalidConfigError("spec.uuid", "the instance has no uuid yet")
        self._identity(self.spec.uuid)
        self._machine()
        self._memory_and_cpus()
        self._lifecycle()
        self._monitors()
        self._serial()
        self._display()
        self._clock_and_boot()
        self._kernel()
        self._drives()
        self._nics()
        self._devices()
        self._confinement()
        self.add(*shlex.split(self.hv.kvm_extra))
        return CommandLine(
            argv=tuple(self.argv),
            nics=tuple(self.nics),
            disks=tuple(self.disks),
            accel=self.accel,
            machine=self.machine,
            display_port=self.display_port if self._has_display else None,
            run_as=self.run_as,
        )

    @property
    def _has_display(self) -> bool:
        return bool(self.hv.vnc_bind_address or self.hv.spice_bind)

    # -- the machine ---------------------------------------------------------------

    def _identity(self, uuid: str) -> None:
        name = self.spec.name
        self.add("-name", f"{name},debug-threads=on" if self.caps.name_debug_threads else name)
        if self.caps.uuid:
            self.add("-uuid", uuid)

    def _machine(self) -> None:
        hv, caps = self.hv, self.caps
        if caps.machine_option:
            machine = f"{self.machine},accel={self.accel}"
            if not hv.acpi and caps.machine_acpi:
                machine += ",acpi=off"
            self.add("-machine", machine)
        else:
            self.add("-M", self.machine)
            if self.accel is Accelerator.KVM:
                self.add("-enable-kvm")
        if not hv.acpi and not (caps.machine_option and caps.machine_acpi):
            self.add("-no-acpi")
        if hv.cpu_type:
            self.add("-cpu", hv.cpu_type)

    def _memory_and_cpus(self) -> None:
        hv = self.hv
        if self.accel is Accelerator.TCG:
            self.add("-m", f"{self.spec.memory_mib * 1024 + TCG_RAM_PAD_KIB}k")
        else:
            self.add("-m", str(self.spec.memory_mib))
        if hv.mem_path:
            self.add("-mem-path", hv.mem_path, "-mem-prealloc")
        smp = [str(self.spec.vcpus)]
        for name, count in (
            ("cores", hv.cpu_cores),
            ("threads", hv.cpu_threads),
            ("sockets", hv.cpu_sockets),
        ):
            if count:
                smp.append(f"{name}={count}")
        self.add("-smp", ",".join(smp))

    def _lifecycle(self) -> None:
        self.add("-nodefaults")
        if self.hv.reboot_behavior == "exit":
            self.add("-no-reboot")
        self.add("-pidfile", str(self.paths.pid_file))

    def _monitors(self) -> None:
        # QMP only: the daemon reaches the human monitor through QMP's
        # human-monitor-command, and an HMP socket would be an unfiltered way around it.
        if self.caps.qmp:
            self.add("-qmp", self.opt.unix_server(self.paths.qmp_socket))

    def _serial(self) -> None:
        if not self.hv.serial_console:
            return
        if self.caps.chardev_logfile:
            self.add(
                "-chardev",
                f"socket,id=serial0,path={self.paths.serial_socket},{self.opt.server},"
                f"logfile={self.paths.serial_log},logappend=on",
                "-serial",
                "chardev:serial0",
            )
        else:
            self.add("-serial", self.opt.unix_server(self.paths.serial_socket))

    # -- display -------------------------------------------------------------------

    def _display(self) -> None:
        hv = self.hv
        if hv.vnc_bind_address:
            self._vnc()
        elif hv.spice_bind:
            self._spice()
        elif self.caps.display:
            self.add("-display", "none")
        else:
            self.add("-nographic")
        if hv.keymap:
            self.add("-k", hv.keymap)
        vga = hv.vga or ("qxl" if hv.spice_bind else "std")
        self.add("-vga", vga)

    def _port(self, field: str) -> int:
        if self.display_port is None:
            raise InvalidConfigError(
                field, "a display needs a port: set spec.network_port or lease one"
            )
        return self.display_port

    def _vnc(self) -> None:
        hv = self.hv
        address = hv.vnc_bind_address
        if address.startswith("/"):
            # Ganeti's rule: no TLS or password on a unix socket, QEMU would mix up paths.
            self.add("-vnc", f"unix:{_vnc_socket(hv, self.spec.name)}")
            return
        if ip_version(address) is None:
            if self.resources.vnc_address is None:
                raise InvalidConfigError(
                    f"{HV}.vnc_bind_address", f"the address of interface {address} is unknown"
                )
            address = self.resources.vnc_address
        port = self._port("spec.network_port")
        if port < VNC_BASE_PORT:
            raise InvalidConfigError(
                "spec.network_port", f"{port} is below {VNC_BASE_PORT}, the first VNC port"
            )
        display = port - VNC_BASE_PORT
        if address == "0.0.0.0":
            vnc = f":{display}"
        elif ip_version(address) == 6:
            vnc = f"[{address}]:{display}"
        else:
            vnc = f"{address}:{display}"
        if hv.vnc_tls:
            credentials = ["id=vnctls0", "endpoint=server"]
            kind = "tls-creds-anon"
            if hv.vnc_x509_path:
                kind = "tls-creds-x509"
                credentials += [
                    f"dir={hv.vnc_x509_path}",
                    f"verify-peer={'yes' if hv.vnc_x509_verify else 'no'}",
                ]
            self.add("-object", ",".join([kind, *credentials]))
            vnc += ",tls-creds=vnctls0"
        if hv.vnc_password_file:
            vnc += f",{self.opt.flag('password')}"
        self.add("-vnc", vnc)

    def _spice(self) -> None:
        hv, flag = self.hv, self.opt.flag
        address = hv.spice_bind
        family = 0
        if ip_version(address) is None:
            if self.resources.spice_address is None:
                raise InvalidConfigError(
                    f"{HV}.spice_bind", f"the address of interface {address} is unknown"
                )
            address = self.resources.spice_address
            family = hv.spice_ip_version or (ip_version(address) or 0)
        port = self._port("spec.network_port")
        options = [f"addr={address}"]
        if hv.spice_use_tls:
            options += [f"tls-port={port}", f"x509-dir={self.resources.spice_x509_dir}"]
            if hv.spice_tls_ciphers:
                options.append(f"tls-ciphers={hv.spice_tls_ciphers}")
        else:
            options.append(f"port={port}")
        if not hv.spice_password_file:
            options.append(flag("disable-ticketing"))
        if family:
            options.append(flag(f"ipv{family}"))
        for key, value in (
            ("image-compression", hv.spice_image_compression),
            ("jpeg-wan-compression", hv.spice_jpeg_wan_compression),
            ("zlib-glz-wan-compression", hv.spice_zlib_glz_wan_compression),
            ("streaming-video", hv.spice_streaming_video),
        ):
            if value:
                options.append(f"{key}={value}")
        if not hv.spice_playback_compression:
            options.append("playback-compression=off")
        if not hv.spice_use_vdagent:
            options.append("agent-mouse=off")
        self.add("-spice", ",".join(options))

    # -- clock, boot and kernel ----------------------------------------------------

    def _clock_and_boot(self) -> None:
        hv = self.hv
        if hv.use_localtime:
            if self.caps.rtc:
                self.add("-rtc", "base=localtime")
            else:
                self.add("-localtime")
        if not hv.kernel_path:
            letter = _BOOT_LETTERS[hv.boot_order]
            self.add("-boot", f"order={letter}" if self.caps.boot_order_option else letter)

    def _kernel(self) -> None:
        hv = self.hv
        if not hv.kernel_path:
            return
        self.add("-kernel", hv.kernel_path)
        if hv.initrd_path:
            self.add("-initrd", hv.initrd_path)
        append = [f"root={hv.root_path}", hv.kernel_args]
        if hv.serial_console:
            append.append(f"console=ttyS0,{hv.serial_speed}")
        self.add("-append", " ".join(filter(None, append)))

    # -- storage -------------------------------------------------------------------

    def _boot_flag(self, booting: bool) -> str:
        """Old QEMUs (``-drive ...,boot=on|off``) need it to boot from a non-IDE drive."""
        return ",boot=on" if booting and self.caps.drive_boot_flag else ""

    def _drives(self) -> None:
        hv = self.hv
        options = ""
        if hv.disk_cache != "default":
            options += f",cache={hv.disk_cache}"
        if hv.disk_aio == "native":
            options += ",aio=native"
        if hv.disk_discard not in ("", "default"):
            options += f",discard={hv.disk_discard}"
        model = disk_device_model(hv.disk_type)
        uses_devices = model is not None and self.caps.has_device(model)
        boot_disk = not hv.kernel_path and hv.boot_order == "disk"
        for index, disk in enumerate(self.spec.disks):
            drive_id = f"drive-disk{index}"
            readonly = disk.mode == "ro"
            drive = (
                f"file={disk.path},format={disk.format or 'raw'}"
                f"{options}{',readonly=on' if readonly else ''}"
            )
            if uses_devices:
                self.add("-drive", f"{drive},if=none,id={drive_id}")
            else:
                interface = "virtio" if hv.disk_type == "paravirtual" else hv.disk_type
                booting = boot_disk and index == 0 and hv.disk_type != "ide"
                self.add("-drive", f"{drive},if={interface}{self._boot_flag(booting)}")
            self.disks.append(
                DiskPlan(
                    kind="disk",
                    index=index,
                    path=disk.path,
                    format=disk.format or "raw",
                    readonly=readonly,
                    drive_id=drive_id,
                    device_id=f"disk{index}" if uses_devices else None,
                    model=model if uses_devices else None,
                )
            )
        for index, image in enumerate(filter(None, (hv.cdrom_image_path, hv.cdrom2_image_path))):
            booting = index == 0 and not hv.kernel_path and hv.boot_order == "cdrom"
            self._cdrom(index, image, booting)
        if hv.floppy_image_path:
            self.add("-drive", f"file={hv.floppy_image_path},format=raw,if=floppy,media=disk")
            self.disks.append(
                DiskPlan(
                    kind="floppy",
                    index=0,
                    path=hv.floppy_image_path,
                    format="raw",
                    readonly=False,
                    drive_id="floppy0",
                )
            )

    def _cdrom_model(self, booting: bool) -> tuple[str, str]:
        """The ``-drive if=`` interface and the qdev model of the CD-ROMs."""
        hv = self.hv
        kind = hv.cdrom_disk_type or ("scsi" if hv.disk_type.startswith("scsi") else "ide")
        if booting:
            # SeaBIOS boots CD-ROMs from IDE (ATAPI) only; Ganeti forces it too.
            kind = "ide"
        if kind == "paravirtual":
            return "virtio", "virtio-blk-pci"
        if kind.startswith("scsi"):
            return "scsi", "scsi-cd"
        return kind, "ide-cd"

    def _cdrom(self, index: int, image: str, booting: bool) -> None:
        interface, model = self._cdrom_model(booting)
        drive_id = f"drive-cdrom{index}"
        drive = f"file={image},format=raw,readonly=on"
        # virtio-blk has no removable media: the image is a read-only disk there.
        media = "" if model == "virtio-blk-pci" else ",media=cdrom"
        uses_devices = self.caps.has_device(model) and interface in ("ide", "scsi", "virtio")
        if uses_devices:
            self.add("-drive", f"{drive}{media},if=none,id={drive_id}")
        else:
            self.add("-drive", f"{drive}{media},if={interface}{self._boot_flag(booting)}")
        self.disks.append(
            DiskPlan(
                kind="cdrom",
                index=index,
                path=image,
                format="raw",
                readonly=True,
                drive_id=drive_id,
                device_id=f"cdrom{index}" if uses_devices else None,
                model=model if uses_devices else None,
            )
        )

    # -- network -------------------------------------------------------------------

    def _nics(self) -> None:
        hv = self.hv
        paravirtual = hv.nic_type == "paravirtual"
        model = NIC_MODELS[hv.nic_type]
        self.nic_devices = self.caps.netdev and self.caps.has_device(model)
        if paravirtual and not self.nic_devices:
            # Without qdev, the virtio NIC is -net nic,model=virtio.
            model = "virtio"
        queues = hv.virtio_net_queues if paravirtual else 1
        for index, nic in enumerate(self.spec.nics):
            if nic.mac is None:
                raise InvalidConfigError(f"spec.nics[{index}].mac", "no MAC assigned yet")
            fd_names = (
                (f"tap{index}",)
                if queues == 1
                else tuple(f"tap{index}q{queue}" for queue in range(queues))
            )
            vhost = hv.vhost_net and paravirtual
            vhost_fd_names = tuple(name.replace("tap", "vhost", 1) for name in fd_names)
            fds = _fd_option("fd", fd_names)
            netdev_id = f"net{index}"
            # The daemon opens /dev/vhost-net itself: QEMU may run unprivileged.
            vhost_option = f",vhost=on,{_fd_option('vhostfd', vhost_fd_names)}" if vhost else ""
            if self.nic_devices:
                self.add("-netdev", f"tap,id={netdev_id},{fds}{vhost_option}")
            else:
                self.add("-net", f"tap,vlan={index},name={netdev_id},{fds}{vhost_option}")
                self.add("-net", f"nic,vlan={index},macaddr={nic.mac},model={model}")
            self.nics.append(
                NicPlan(
                    index=index,
                    mac=nic.mac,
                    mode=nic.mode,
                    link=nic.link,
                    ip=nic.ip,
                    vlan=nic.vlan,
                    mtu=nic.mtu,
                    netdev_id=netdev_id,
                    device_id=f"nic{index}" if self.nic_devices else None,
                    model=model,
                    fd_names=fd_names,
                    vhost_fd_names=vhost_fd_names if vhost else (),
                    vnet_hdr=hv.vnet_hdr and paravirtual,
                    queues=queues,
                    vhost=vhost,
                )
            )

    # -- devices -------------------------------------------------------------------

    def _devices(self) -> None:
        """Every ``-device``: explicitly placed ones first, so QEMU's picks avoid them."""
        self._storage_devices()
        self._guest_agent()
        self._nic_devices()
        self._balloon()
        self._usb()
        self._sound()
        self._spice_agent()

    def _storage_devices(self) -> None:
        if any((disk.model or "").startswith("scsi") for disk in self.disks):
            controller = scsi_controller_model(self.hv.scsi_controller_type)
            self.add("-device", f"{controller},id={_SCSI_CONTROLLER_ID}")
        for position, disk in enumerate(self.disks):
            if disk.model is None or disk.device_id is None:
                continue
            device = f"{disk.model},drive={disk.drive_id},id={disk.device_id}"
            slot = scsi_id = None
            if disk.model.startswith("scsi"):
                scsi_id = next(self.scsi_ids, None)
                if scsi_id is None:
                    raise InvalidConfigError(
                        f"{HV}.scsi_controller_type",
                        f"{self.hv.scsi_controller_type} has no SCSI target left for"
                        f" {disk.kind} {disk.index}",
                    )
                device += f",bus={_SCSI_BUS},channel=0,scsi-id={scsi_id},lun=0"
            elif disk.model.endswith("-pci"):
                placement, slot = self.pci.take(f"{disk.kind} {disk.index}")
                device += placement
            self.add("-device", device)
            self.disks[position] = msgspec.structs.replace(disk, pci_slot=slot, scsi_id=scsi_id)

    def _guest_agent(self) -> None:
        if not self.hv.use_guest_agent:
            return
        placement, _ = self.pci.take("the guest agent channel")
        self.add(
            "-chardev",
            f"socket,id=qga0,path={guest_agent_socket(self.paths)},{self.opt.server}",
            "-device",
            f"virtio-serial-pci,id=qga0-serial{placement}",
            "-device",
            "virtserialport,bus=qga0-serial.0,chardev=qga0,name=org.qemu.guest_agent.0",
        )

    @property
    def _host_mtu(self) -> bool:
        """Whether virtio-net-pci has ``host_mtu`` (QEMU 2.9 added it)."""
        return self.caps.version >= _HOST_MTU_SINCE

    def _nic_devices(self) -> None:
        if not self.nic_devices:
            return
        booting = not self.hv.kernel_path and self.hv.boot_order == "network"
        for position, nic in enumerate(self.nics):
            device = f"{nic.model},netdev={nic.netdev_id},id={nic.device_id},mac={nic.mac}"
            slot = None
            if nic.model != "ne2k_isa":
                placement, slot = self.pci.take(f"NIC {nic.index}")
                device += placement
            if nic.mtu is not None and nic.model == "virtio-net-pci" and self._host_mtu:
                # The guest's driver reads its MTU from the device (QEMU 2.9+): the same
                # as the tap's, so the guest never sends frames the host side drops.
                device += f",host_mtu={nic.mtu}"
            if nic.queues > 1:
                # linux-kvm.org's multiqueue advice: 2 vectors per queue pair, plus 2.
                device += f",mq=on,vectors={2 * nic.queues + 2}"
            if booting and nic.index == 0:
                # Firmware boots the devices with a bootindex first (UEFI knows no other
                # order); -boot order=n ranks, for SeaBIOS, the devices without one.
                device += ",bootindex=1"
            self.add("-device", device)
            self.nics[position] = msgspec.structs.replace(nic, pci_slot=slot)

    def _balloon(self) -> None:
        if self.caps.has_device("virtio-balloon-pci"):
            self.add("-device", "virtio-balloon-pci,id=balloon0")
        elif self.caps.balloon_option:
            self.add("-balloon", "virtio")

    def _usb(self) -> None:
        hv = self.hv
        mouse = hv.usb_mouse or ("tablet" if hv.vnc_bind_address else "")
        names = [name for name in (mouse, *hv.usb_devices.split(",")) if name]
        if not names:
            return
        self.add("-usb")
        for name in names:
            model = usb_device_model(name)
            if model is not None and self.caps.has_device(model):
                self.add("-device", model)
            else:
                self.add("-usbdevice", name)

    def _sound(self) -> None:
        cards = [card for card in self.hv.soundhw.split(",") if card]
        if not cards:
            return
        models = [model for card in cards for model in SOUND_MODELS.get(card, ())]
        if self.caps.audiodev and models and all(map(self.caps.has_device, models)):
            # Sound goes to the SPICE client when there is one, nowhere otherwise.
            driver = "spice" if self.hv.spice_bind else "none"
            self.add("-audiodev", f"{driver},id=audio0")
            for model in models:
                # The HDA controller has no audio of its own: its codec (hda-duplex) has.
                self.add("-device", model if model == "intel-hda" else f"{model},audiodev=audio0")
        else:
            self.add("-soundhw", ",".join(cards))

    def _spice_agent(self) -> None:
        if not (self.hv.spice_bind and self.hv.spice_use_vdagent):
            return
        self.add(
            "-device",
            "virtio-serial-pci,id=spice",
            "-device",
            "virtserialport,chardev=spicechannel0,name=com.redhat.spice.0",
            "-chardev",
            "spicevmc,id=spicechannel0,name=vdagent",
        )

    # -- confinement ---------------------------------------------------------------

    def _confinement(self) -> None:
        hv = self.hv
        if hv.security_model == "user":
            self.run_as = hv.security_domain
        elif hv.security_model == "pool":
            if self.resources.pool_user is None:
                raise InvalidConfigError(
                    f"{HV}.security_model", "pool needs a uid leased from the uid pool"
                )
            self.run_as = self.resources.pool_user
        chroot = str(self.paths.chroot) if hv.use_chroot else None
        if self.caps.run_with:
            settings = []
            if chroot is not None:
                settings.append(f"chroot={chroot}")
            if self.run_as is not None:
                settings.append(f"user={self.run_as}")
            if settings:
                self.add("-run-with", ",".join(settings))
            return
        if chroot is not None:
            self.add("-chroot", chroot)
        if self.run_as is not None:
            self.add("-runas", self.run_as)


# -- the host side: what `argv_for_spec_file` and the launcher look up -------------------


async def _interface_address(name: str, family: int, field: str) -> str:
    try:
        ipv4, ipv6 = await interface_addresses(name)
    except OSError as error:
        raise InvalidConfigError(field, f"interface {name}: {error.strerror}") from None
    candidates = ipv6 if family == 6 else ipv4 if family == 4 else ipv4 or ipv6
    if not candidates:
        wanted = f"IPv{family} address" if family else "address"
        raise InvalidConfigError(field, f"interface {name} has no {wanted}")
    return candidates[0]


def run_as_for_uid(uid: int) -> str:
    """What QEMU's ``-runas`` takes for a pool `uid`: its user name, else ``uid:uid``."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"{uid}:{uid}"


def free_port(low: int, high: int, taken: Collection[int] = ()) -> int | None:
    """The first TCP port of ``low..high`` that is not in `taken` and can be bound now."""
    for port in range(low, high + 1):
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    return None


async def launch_resources(
    spec: InstanceSpec,
    hv: HvParams,
    *,
    port_range: tuple[int, int],
    taken_ports: Collection[int] = (),
    uid: int | None = None,
) -> LaunchResources:
    """What a start of `spec` takes from the host, found now; nothing is leased here.

    The addresses of the interfaces that ``vnc_bind_address`` and ``spice_bind`` name, a
    display port of `port_range` that is not in `taken_ports` and can be bound (unless
    the spec has a ``network_port``), and the ``-runas`` user of the pool `uid` the
    caller leased. Raises `InvalidConfigError` naming the field at fault.
    """
    vnc_address = spice_address = None
    vnc = hv.vnc_bind_address
    if vnc and ip_version(vnc) is None and not vnc.startswith("/"):
        vnc_address = await _interface_address(vnc, 4, f"{HV}.vnc_bind_address")
    if hv.spice_bind and ip_version(hv.spice_bind) is None:
        spice_address = await _interface_address(
            hv.spice_bind, hv.spice_ip_version, f"{HV}.spice_bind"
        )
    display_port = None
    if (vnc or hv.spice_bind) and spec.network_port is None:
        low, high = port_range
        display_port = free_port(low, high, taken_ports)
        if display_port is None:
            raise InvalidConfigError("display_port_range", f"no free port in {low}-{high}")
    return LaunchResources(
        display_port=display_port,
        pool_user=None if uid is None else run_as_for_uid(uid),
        vnc_address=vnc_address,
        spice_address=spice_address,
    )


async def argv_for_spec_file(path: Path, config: Config) -> list[str]:
    """The argv ``instance.start`` would run for the instance file at `path`.

    Loads and validates the spec (syntax, host, then this QEMU), probes QEMU, builds
    the command line and creates the empty directories it names (the instance dir and,
    with ``use_chroot``, the chroot), so the argv can be run by hand. A spec without
    uuid gets a fresh one (``start`` keeps its own); a display without
    ``network_port`` gets the first free port of the configured range, and a
    ``pool`` instance the first uid the daemon would lease, neither leased. Taps appear by fd name.
    Raises `InvalidConfigError` naming the field at fault (and, in ``data["file"]``,
    the spec file), `HypervisorError` when QEMU cannot be probed.
    """
    try:
        return await _argv_for_spec_file(path, config)
    except InvalidConfigError as error:
        error.data.setdefault("file", str(path))
        raise


async def _argv_for_spec_file(path: Path, config: Config) -> list[str]:
    spec = assign_macs(ensure_uuid(load_instance_file(path)))
    hv = validated_hvparams(spec, config.hvparams)
    caps = await probe_qemu(hv.kvm_path)
    kvm = probe_kvm()
    raise_first(check_host_qemu(spec, hv, caps, kvm=kvm))
    state_dir = StateDir(config.state_dir)
    paths = state_dir.instance(spec.name)
    raise_first(socket_path_problems(spec, hv, paths))
    accel = resolve_accelerator(hv.kvm_flag, kvm, instance=spec.name)
    uid = None
    if hv.security_model == "pool":
        uid = UidPool(state_dir.uid_lease_dir, config.uid_ranges()).first_free()
    resources = await launch_resources(spec, hv, port_range=config.display_port_range, uid=uid)
    command = build_command_line(spec, hv, caps, paths, accel, resources=resources)
    state_dir.create_instance_dir(spec.name)
    if hv.use_chroot:
        create_chroot(paths.chroot)
    return list(command.argv)
