"""Capability probing: the parser over Ganeti's help texts and the live QEMU, the cache,
and the host checks that need QEMU's answers."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from supervisor.model.errors import HypervisorError
from supervisor.model.hvparams import resolve_hvparams
from supervisor.model.spec import decode_spec
from supervisor.qemu.accel import KvmAvailability, probe_kvm
from supervisor.qemu.capabilities import (
    CapabilityCache,
    QemuCapabilities,
    check_host_qemu,
    parse_capabilities,
    parse_device_help,
    parse_machine_help,
    parse_version,
    probe_qemu,
)

from . import GANETI, modern_caps

QEMU = "/usr/bin/qemu-system-x86_64"

#: Every flag of QemuCapabilities that the help text alone decides.
HELP_FLAGS = (
    "qmp",
    "spice",
    "vhost_net",
    "multiqueue_tap",
    "enable_kvm",
    "netdev",
    "display",
    "machine_option",
    "drive_boot_flag",
    "uuid",
    "name_debug_threads",
    "run_with",
    "runas",
    "chroot",
    "audio",
    "audiodev",
    "soundhw",
    "no_acpi_option",
    "rtc",
    "localtime_option",
    "balloon_option",
    "on_off_booleans",
    "chardev_logfile",
    "boot_order_option",
    "usbdevice",
    "object_option",
)

_OLD_KVM = {"soundhw", "no_acpi_option", "usbdevice"}
_QEMU_0_12 = _OLD_KVM | {
    "qmp",
    "enable_kvm",
    "netdev",
    "uuid",
    "runas",
    "chroot",
    "rtc",
    "balloon_option",
    "boot_order_option",
}
_QEMU_0_15 = (_QEMU_0_12 | {"spice", "vhost_net", "machine_option", "display"}) - {
    "drive_boot_flag"
}
_QEMU_5_2 = (_QEMU_0_15 - {"balloon_option"}) | {
    "multiqueue_tap",
    "name_debug_threads",
    "audiodev",
    "chardev_logfile",
    "object_option",
}

#: file -> (version, version text, the help flags that are set; every other is clear).
GANETI_HELP = {
    "kvm_0.9.1_help.txt": (
        (0, 9, 1),
        "0.9.1 (kvm-72)",
        _OLD_KVM | {"drive_boot_flag", "localtime_option"},
    ),
    # Ganeti's boot-regexp test: a fake option splits the -drive help, boot=on|off is
    # then another option's.
    "kvm_0.9.1_help_boot_test.txt": ((0, 9, 1), "0.9.1 (kvm-72)", _OLD_KVM | {"localtime_option"}),
    "kvm_0.12.5_help.txt": (
        (0, 12, 5),
        "0.12.5 (qemu-kvm-0.12.5)",
        _QEMU_0_12 | {"drive_boot_flag"},
    ),
    "kvm_0.15.90_help.txt": ((0, 15, 90), "0.15.90", _QEMU_0_15),
    "kvm_1.0_help.txt": ((1, 0, 0), "1.0 (qemu-kvm-1.0 Debian 1.0+dfsg-2)", _QEMU_0_15),
    "kvm_1.1.2_help.txt": (
        (1, 1, 2),
        "1.1.2 (qemu-kvm-1.1.2+dfsg-2~bpo60+1, Debian)",
        _QEMU_0_15,
    ),
    "kvm_5.2.0_help.txt": ((5, 2, 0), "5.2.0 (Debian 1:5.2+dfsg-11+deb11u1)", _QEMU_5_2),
    "kvm_current_help.txt": ((5, 2, 0), "5.2.0 (Debian 1:5.2+dfsg-11+deb11u1)", _QEMU_5_2),
}


def test_every_ganeti_help_text_is_covered() -> None:
    assert sorted(path.name for path in GANETI.glob("kvm_*_help*.txt")) == sorted(GANETI_HELP)


@pytest.mark.parametrize("name", sorted(GANETI_HELP))
def test_ganeti_help_texts(name: str) -> None:
    version, text, flags = GANETI_HELP[name]
    caps = parse_capabilities("/usr/bin/kvm", (GANETI / name).read_text(), "", "")
    assert caps.version == version
    assert caps.version_text == text
    assert {flag for flag in HELP_FLAGS if getattr(caps, flag)} == flags
    # What the help does not say, the version decides.
    assert caps.machine_acpi == (version >= (5, 1, 0))
    assert caps.migrate_set_parameters == (version >= (2, 8, 0))
    assert caps.migrate_set_speed


def test_current_help_is_a_symlink_to_5_2() -> None:
    # Ganeti's own layout: the "current" help is a git symlink.
    assert os.readlink(GANETI / "kvm_current_help.txt") == "kvm_5.2.0_help.txt"


def test_version_without_micro_and_with_copyright_on_the_line() -> None:
    assert parse_version("QEMU emulator version 1.0, Copyright (c) 2003-2008\n") == (
        (1, 0, 0),
        "1.0",
    )


def test_no_version_is_an_error() -> None:
    with pytest.raises(ValueError, match="no QEMU version"):
        parse_version("usage: something else\n")


def test_ganeti_machine_list() -> None:
    machines, default = parse_machine_help((GANETI / "kvm_6.0.0_machine.txt").read_text())
    assert default == "pc-i440fx-impish"
    by_name = {machine.name: machine for machine in machines}
    assert by_name["ubuntu"].alias_of == "pc-i440fx-impish"
    assert by_name["ubuntu"].description == "Ubuntu 21.10 PC (i440FX + PIIX, 1996)"
    assert by_name["pc"].alias_of == "pc-i440fx-6.0"
    assert by_name["pc-i440fx-impish"].is_default
    assert by_name["pc-q35-6.0"].description == "Standard PC (Q35 + ICH9, 2009)"
    assert "Supported" not in by_name
    caps = msgspec.structs.replace(modern_caps(), machines=machines, default_machine=default)
    assert caps.machine("q35") == by_name["pc-q35-6.0"]
    assert caps.machine("pc-i440fx-1.4") == by_name["pc-i440fx-1.4"]
    assert caps.machine("pc-q35-9.9") is None


def test_device_list_names_and_aliases() -> None:
    text = (
        "Network devices:\n"
        'name "virtio-net-pci", bus PCI, alias "virtio-net"\n'
        'name "e1000", bus PCI, alias "e1000-82540em", desc "Intel Gigabit Ethernet"\n'
        'name "ne2k_isa", bus ISA\n'
    )
    assert parse_device_help(text) == {
        "virtio-net-pci",
        "virtio-net",
        "e1000",
        "e1000-82540em",
        "ne2k_isa",
    }


def test_fingerprint_follows_the_answers() -> None:
    help_text = (GANETI / "kvm_5.2.0_help.txt").read_text()
    first = parse_capabilities("/a", help_text, "pc  PC (default)\n", "")
    assert (
        first.fingerprint
        == parse_capabilities("/b", help_text, "pc  PC (default)\n", "").fingerprint
    )
    assert first.fingerprint.startswith("5.2.0-")
    assert (
        first.fingerprint
        != parse_capabilities("/a", help_text, "q35  PC (default)\n", "").fingerprint
    )


@pytest.mark.qemu
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_live_qemu() -> None:
    caps = await probe_qemu(QEMU)
    assert caps.version >= (7, 2, 0)
    assert caps.version_text.startswith("7.2")
    # QEMU 7.2: the modern syntax everywhere, the old options gone.
    for flag in ("qmp", "spice", "netdev", "machine_option", "uuid", "audio", "audiodev"):
        assert getattr(caps, flag), flag
    for flag in ("on_off_booleans", "chardev_logfile", "name_debug_threads", "multiqueue_tap"):
        assert getattr(caps, flag), flag
    for flag in ("soundhw", "balloon_option", "localtime_option", "drive_boot_flag"):
        assert not getattr(caps, flag), flag
    assert caps.migrate_set_parameters and not caps.migrate_set_speed
    assert caps.machine_acpi
    assert caps.default_machine == "pc-i440fx-7.2"
    assert caps.machine("pc") is not None and caps.machine("pc").name == "pc-i440fx-7.2"
    assert caps.machine("q35") is not None
    for model in ("virtio-net-pci", "virtio-blk-pci", "virtio-balloon", "usb-tablet", "qxl-vga"):
        assert caps.has_device(model), model
    assert caps.fingerprint.startswith(".".join(map(str, caps.version)) + "-")


def _fake_qemu(directory: Path, help_text: str) -> Path:
    """A script answering the three probe questions, logging each call to ``calls``."""
    (directory / "help.txt").write_text(help_text)
    (directory / "machine.txt").write_text("pc-i440fx-7.2  Standard PC (default)\n")
    (directory / "device.txt").write_text('name "virtio-net-pci", bus PCI\n')
    script = directory / "qemu"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {directory}/calls\n'
        'case "$1" in\n'
        f"  --help) cat {directory}/help.txt ;;\n"
        f"  -machine) cat {directory}/machine.txt ;;\n"
        f"  -device) cat {directory}/device.txt ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return script


@pytest.mark.anyio
async def test_cache_probes_once_until_the_binary_changes(tmp_path: Path) -> None:
    script = _fake_qemu(tmp_path, (GANETI / "kvm_5.2.0_help.txt").read_text())
    cache = CapabilityCache()
    first = await cache.get(str(script))
    assert await cache.get(str(script)) is first
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["--help", "-machine help", "-device help"]
    assert first.default_machine == "pc-i440fx-7.2"
    assert first.devices == {"virtio-net-pci"}
    status = script.stat()
    os.utime(script, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    second = await cache.get(str(script))
    assert second is not first
    assert len((tmp_path / "calls").read_text().splitlines()) == 6


@pytest.mark.anyio
async def test_old_qemu_is_asked_with_question_marks(tmp_path: Path) -> None:
    script = _fake_qemu(tmp_path, (GANETI / "kvm_0.12.5_help.txt").read_text())
    caps = await probe_qemu(str(script))
    assert caps.version == (0, 12, 5)
    assert (tmp_path / "calls").read_text().splitlines() == ["--help", "-M ?", "-device ?"]


@pytest.mark.anyio
async def test_probe_failures_are_hypervisor_errors(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="cannot run"):
        await CapabilityCache().get(str(tmp_path / "missing"))
    silent = _fake_qemu(tmp_path, "usage: not a qemu\n")
    with pytest.raises(HypervisorError, match="no QEMU version"):
        await probe_qemu(str(silent))
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(HypervisorError, match="failed") as caught:
        await probe_qemu(str(failing))
    assert caught.value.exit_status == 3
    assert "broken" in caught.value.stderr


# -- host checks needing QEMU -----------------------------------------------------------

STOCK_KVM = KvmAvailability(device_openable=True, pvm_host=False)
PVM_KVM = KvmAvailability(device_openable=True, pvm_host=True, reason="this is a kvm_pvm host")


def problems(
    caps: QemuCapabilities | None = None,
    kvm: KvmAvailability = STOCK_KVM,
    spec: dict[str, object] | None = None,
    **hvparams: object,
) -> list[str]:
    decoded = decode_spec({"name": "vm", **(spec or {})})
    found = check_host_qemu(decoded, resolve_hvparams({}, hvparams), caps or modern_caps(), kvm=kvm)
    return [str(problem) for problem in found]


def test_a_plain_instance_passes() -> None:
    assert problems() == []


def test_qemu_must_be_supervisable() -> None:
    assert problems(modern_caps(qmp=False, uuid=False)) == [
        "spec.hvparams.kvm_path: QEMU 7.2.0 (fixed test capabilities) at"
        " /usr/bin/qemu-system-x86_64 has no -qmp or -uuid: kvm-supervisor needs QEMU 0.14"
        " or newer"
    ]


def test_spice_needs_qemu_support() -> None:
    assert problems(modern_caps(spice=False), spice_bind="127.0.0.1") == [
        "spec.hvparams.spice_bind: QEMU 7.2.0 (fixed test capabilities) at"
        " /usr/bin/qemu-system-x86_64 has no SPICE support"
    ]
    assert problems(spice_bind="127.0.0.1") == []


def test_machine_version_must_be_known() -> None:
    assert problems(machine_version="q35") == []
    assert problems(machine_version="pc-i440fx-6.2") == []
    [problem] = problems(machine_version="pc-i440fx-99.0")
    assert problem.startswith(
        "spec.hvparams.machine_version: 'pc-i440fx-99.0' is not a machine type of QEMU"
    )
    assert "pc-q35-7.2" in problem
    assert problems(modern_caps(default_machine=None)) == [
        "spec.hvparams.machine_version: QEMU 7.2.0 (fixed test capabilities) names no"
        " default machine type: set one"
    ]


def test_cpu_host_needs_kvm_for_stock_guests() -> None:
    assert problems(cpu_type="host") == []
    assert problems(kvm=PVM_KVM, cpu_type="host") == [
        "spec.hvparams.cpu_type: host needs KVM, and this is a kvm_pvm host"
    ]
    assert problems(kvm=PVM_KVM, cpu_type="host", kvm_flag="enabled") == [
        "spec.hvparams.cpu_type: host needs KVM, and this is a kvm_pvm host"
    ]
    assert problems(cpu_type="host", kvm_flag="disabled") == [
        "spec.hvparams.cpu_type: host needs KVM, and kvm_flag is disabled"
    ]
    # Other CPU models run under TCG too.
    assert problems(kvm=PVM_KVM, cpu_type="qemu64") == []


def test_vhost_net_and_multiqueue_need_qemu_support() -> None:
    nic = {"nics": [{"link": "br0"}]}
    assert problems(modern_caps(vhost_net=False), spec=nic, vhost_net=True) == [
        "spec.hvparams.vhost_net: QEMU 7.2.0 (fixed test capabilities) has no vhost-net"
    ]
    assert problems(modern_caps(multiqueue_tap=False), spec=nic, virtio_net_queues=4) == [
        "spec.hvparams.virtio_net_queues: QEMU 7.2.0 (fixed test capabilities) has no"
        " multiqueue taps"
    ]
    # Multiqueue on a non-paravirtual NIC is a syntax problem (`check_syntax`), not QEMU's.
    assert problems(spec=nic, virtio_net_queues=4, nic_type="e1000") == []
    assert problems(modern_caps(devices=frozenset({"VGA"})), spec=nic, nic_type="e1000") == [
        "spec.hvparams.nic_type: QEMU has no e1000 device"
    ]


def test_disk_types_this_qemu_and_machine_can_serve(tmp_path: Path) -> None:
    disk = {"disks": [{"path": "/var/tmp/disk.img"}]}
    assert problems(spec=disk, disk_type="scsi-hd", scsi_controller_type="virtio-scsi-pci") == []
    assert problems(spec=disk, disk_type="sd") == [
        "spec.hvparams.disk_type: x86 machines have no sd interface"
    ]
    assert problems(spec=disk, disk_type="mtd") == [
        "spec.hvparams.disk_type: x86 machines have no mtd interface"
    ]
    assert problems(spec=disk, disk_type="pflash") == [
        "spec.hvparams.disk_type: x86 machines map pflash drives as the firmware, not as disks"
    ]
    # Without disks the disk type does not matter.
    assert problems(disk_type="sd") == []
    assert problems(cdrom_image_path="/a.iso", cdrom_disk_type="mtd") == [
        "spec.hvparams.cdrom_disk_type: x86 machines cannot attach CD-ROMs as mtd"
    ]
    assert problems(cdrom_image_path="/a.iso", cdrom_disk_type="scsi-block") == []
    no_megasas = modern_caps(devices=modern_caps().devices - {"megasas"})
    assert problems(no_megasas, spec=disk, disk_type="scsi", scsi_controller_type="megasas") == [
        "spec.hvparams.scsi_controller_type: QEMU has no megasas device"
    ]
    read_only = {"disks": [{"path": "/var/tmp/disk.img", "mode": "ro"}]}
    assert problems(spec=read_only) == []
    assert problems(spec=read_only, disk_type="ide") == [
        "spec.disks[0].mode: QEMU cannot attach a read-only disk as ide: use paravirtual or scsi"
    ]
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    file_disk = {"disks": [{"path": str(image)}]}
    assert problems(spec=file_disk, disk_type="scsi-block") == [
        f"spec.disks[0].path: scsi-block needs a block device, not {image}"
    ]
    assert problems(spec=file_disk, disk_type="scsi-generic") == [
        f"spec.disks[0].path: scsi-generic needs a SCSI generic (/dev/sg*) device, not {image}"
    ]


def test_sound_usb_and_vga_models() -> None:
    assert problems(soundhw="hda,ac97") == []
    assert problems(soundhw="pcspk") == [
        "spec.hvparams.soundhw: 'pcspk' is not one of 'ac97', 'adlib', 'cs4231a', 'es1370',"
        " 'gus', 'hda', 'sb16'"
    ]
    assert problems(soundhw="gus") == ["spec.hvparams.soundhw: QEMU has no gus sound card"]
    assert problems(usb_devices="tablet,keyboard") == []
    assert problems(modern_caps(usbdevice=False), usb_devices="host:1234:5678") == [
        "spec.hvparams.usb_devices: 'host:1234:5678' is not an emulated USB device and QEMU"
        " has no -usbdevice"
    ]
    assert problems(usb_devices="braille") == [
        "spec.hvparams.usb_devices: QEMU has no usb-braille device"
    ]
    assert problems(vga="qxl") == []
    assert problems(vga="std") == []
    assert problems(vga="none") == []
    assert problems(vga="cirrus") == ["spec.hvparams.vga: QEMU has no 'cirrus' graphics card"]
    assert problems(vga="hercules") == [
        "spec.hvparams.vga: 'hercules' is not one of 'none', 'std', 'cirrus', 'vmware', 'qxl',"
        " 'virtio'"
    ]


def test_user_and_chroot_need_qemu_options() -> None:
    unable = modern_caps(runas=False, chroot=False, run_with=False)
    assert problems(unable, security_model="user", security_domain="nobody") == [
        "spec.hvparams.security_model: QEMU 7.2.0 (fixed test capabilities) cannot change its user"
    ]
    assert problems(unable, use_chroot=True) == [
        "spec.hvparams.use_chroot: QEMU 7.2.0 (fixed test capabilities) cannot chroot"
    ]
    assert problems(modern_caps(runas=False, chroot=False, run_with=True), use_chroot=True) == []


def test_the_default_kvm_probe_is_used_when_none_is_given() -> None:
    # This host's KVM decides; the answer must match what probe_kvm says about it.
    decoded = decode_spec({"name": "vm"})
    hv = resolve_hvparams({}, {"cpu_type": "host"})
    found = check_host_qemu(decoded, hv, modern_caps())
    assert bool(found) == (not probe_kvm().usable_for_stock_guests)
