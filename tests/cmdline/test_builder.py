"""The command-line builder without QEMU: golden argvs, old-QEMU syntax, plans and errors.

Golden files hold one argument per line; regenerate them after an intended change with
``KVS_UPDATE_GOLDEN=1 pytest tests/cmdline/test_builder.py`` (the tests whose file it
rewrites fail), review the diff and run again without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from supervisor.host.statedir import StateDir
from supervisor.model.errors import InvalidConfigError
from supervisor.model.hvparams import resolve_hvparams
from supervisor.model.spec import assign_macs, decode_spec
from supervisor.qemu.accel import Accelerator
from supervisor.qemu.capabilities import QemuCapabilities
from supervisor.qemu.cmdline import (
    CommandLine,
    LaunchResources,
    argv_with_fds,
    build_command_line,
    guest_agent_socket,
    run_as_for_uid,
    socket_path_problems,
)

from . import GOLDEN, check_golden, ganeti_caps, modern_caps

UUID = "0b6b7f1e-5d4c-4b3a-9f8e-7d6c5b4a3f2e"
STATE_DIR = StateDir("/var/lib/kvm-supervisor")
RESOURCES = LaunchResources(
    display_port=5905,
    pool_user="kvm-pool-1",
    vnc_address="192.0.2.10",
    spice_address="2001:db8::10",
    spice_x509_dir="/etc/kvm-supervisor/spice-tls",
)

OLD_DEVICES = "\n".join(
    f'name "{model}", bus PCI'
    for model in ("virtio-net-pci", "virtio-blk-pci", "virtio-balloon-pci", "e1000")
)


def build(
    spec: dict[str, Any] | None = None,
    caps: QemuCapabilities | None = None,
    accel: Accelerator = Accelerator.KVM,
    resources: LaunchResources = RESOURCES,
    **hvparams: Any,
) -> CommandLine:
    fields = {"name": "vm1", "uuid": UUID, **(spec or {})}
    decoded = assign_macs(decode_spec(fields))
    return build_command_line(
        decoded,
        resolve_hvparams({}, hvparams),
        caps or modern_caps(),
        STATE_DIR.instance(decoded.name),
        accel,
        resources=resources,
    )


def option(command: CommandLine, name: str) -> list[str]:
    """Every value given to option `name`, in order."""
    return [command.argv[i + 1] for i, arg in enumerate(command.argv) if arg == name]


# -- golden argvs -----------------------------------------------------------------------

GOLDEN_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "minimal": ({}, {}, "modern"),
    "server": (
        {
            "memory_mib": 2048,
            "vcpus": 2,
            "disks": [
                {"path": "/srv/vm/root.qcow2", "format": "qcow2"},
                {"path": "/srv/vm/data.img", "mode": "ro"},
            ],
            "nics": [
                {"link": "br0", "mac": "52:54:00:12:34:56"},
                {"mode": "routed", "ip": "192.0.2.20"},
            ],
        },
        {
            "disk_cache": "none",
            "disk_aio": "native",
            "disk_discard": "unmap",
            "vnc_bind_address": "0.0.0.0",
            "vnc_password_file": "/etc/kvm-supervisor/vnc.pw",
            "keymap": "en-us",
            "use_guest_agent": True,
            "kvm_extra": "-global 'kvm-pit.lost_tick_policy=delay'",
        },
        "modern",
    ),
    "spice": (
        {"network_port": 6100},
        {
            "spice_bind": "eth0",
            "spice_ip_version": 6,
            "spice_use_tls": True,
            "spice_password_file": "/etc/kvm-supervisor/spice.pw",
            "spice_image_compression": "auto_glz",
            "spice_streaming_video": "all",
            "soundhw": "hda",
        },
        "modern",
    ),
    "q35-confined": (
        {
            "vcpus": 4,
            "disks": [{"path": "/dev/vg/vm-root"}, {"path": "/dev/vg/vm-swap"}],
            "nics": [{"link": "br0"}],
        },
        {
            "machine_version": "q35",
            "disk_type": "scsi-hd",
            "scsi_controller_type": "virtio-scsi-pci",
            "cdrom_image_path": "/srv/iso/install.iso",
            "boot_order": "cdrom",
            "virtio_net_queues": 2,
            "acpi": False,
            "reboot_behavior": "exit",
            "use_localtime": True,
            "cpu_type": "qemu64",
            "cpu_sockets": 1,
            "cpu_cores": 2,
            "cpu_threads": 2,
            "use_chroot": True,
            "security_model": "pool",
        },
        "modern",
    ),
    "kernel-legacy-qemu": (
        {"disks": [{"path": "/srv/vm/root.img"}], "nics": [{"link": "br0"}]},
        {
            "kernel_path": "/boot/vmlinuz",
            "initrd_path": "/boot/initrd.img",
            "serial_speed": 115200,
            "vnc_bind_address": "192.0.2.1",
            "soundhw": "ac97",
            "use_localtime": True,
            "security_model": "user",
            "security_domain": "kvm",
        },
        "qemu-1.1.2",
    ),
}


def _golden_command(name: str) -> CommandLine:
    spec, hvparams, caps_name = GOLDEN_CASES[name]
    caps = modern_caps() if caps_name == "modern" else ganeti_caps("kvm_1.1.2_help.txt")
    return build({"name": name, **spec}, caps, **hvparams)


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden(name: str) -> None:
    argv = "".join(f"{arg}\n" for arg in _golden_command(name).argv)
    check_golden(GOLDEN / f"{name}.argv", argv)


def test_every_golden_file_has_a_case() -> None:
    assert sorted(path.stem for path in GOLDEN.glob("*.argv")) == sorted(GOLDEN_CASES)


# -- option syntax ----------------------------------------------------------------------


def test_modern_syntax() -> None:
    command = build(acpi=False, use_localtime=True, soundhw="ac97")
    assert option(command, "-machine") == ["pc-i440fx-7.2,accel=kvm,acpi=off"]
    assert "-no-acpi" not in command.argv
    assert option(command, "-rtc") == ["base=localtime"]
    assert option(command, "-qmp") == [
        "unix:/var/lib/kvm-supervisor/instances/vm1/qmp.sock,server=on,wait=off"
    ]
    assert option(command, "-device")[-1] == "AC97,audiodev=audio0"
    assert option(command, "-audiodev") == ["none,id=audio0"]
    assert option(command, "-device")[0] == "virtio-balloon-pci,id=balloon0"


def test_old_qemu_syntax() -> None:
    caps = ganeti_caps("kvm_0.12.5_help.txt")
    command = build(
        {"disks": [{"path": "/d.img"}], "nics": [{"link": "br0"}]},
        caps,
        acpi=False,
        soundhw="es1370",
    )
    argv = command.argv
    assert option(command, "-M") == ["pc"]
    assert "-enable-kvm" in argv and "-no-acpi" in argv
    assert "-monitor" not in argv  # the daemon talks HMP through QMP only
    # No chardev logfile before QEMU 2.6: the serial socket is a plain -serial.
    assert option(command, "-serial") == [
        "unix:/var/lib/kvm-supervisor/instances/vm1/serial.sock,server,nowait"
    ]
    assert "-chardev" not in argv
    # Booting from a virtio disk needs boot=on on these QEMUs.
    assert option(command, "-drive") == ["file=/d.img,format=raw,if=virtio,boot=on"]
    assert option(command, "-net") == [
        "tap,vlan=0,name=net0,fd=tap0",
        "nic,vlan=0,macaddr=" + command.nics[0].mac + ",model=virtio",
    ]
    assert command.nics[0].device_id is None
    assert option(command, "-soundhw") == ["es1370"]
    assert option(command, "-balloon") == ["virtio"]
    assert option(command, "-boot") == ["order=c"]


def test_oldest_qemu_syntax() -> None:
    command = build(caps=ganeti_caps("kvm_0.9.1_help.txt"), use_localtime=True)
    assert "-localtime" in command.argv
    assert "-uuid" not in command.argv
    assert "-nographic" in command.argv
    assert option(command, "-boot") == ["c"]
    assert command.accel is Accelerator.KVM


def test_run_with_replaces_runas_and_chroot() -> None:
    caps = modern_caps(run_with=True, runas=False, chroot=False)
    command = build(caps=caps, use_chroot=True, security_model="user", security_domain="kvm")
    assert option(command, "-run-with") == ["chroot=/var/lib/kvm-supervisor/chroot/vm1,user=kvm"]
    assert "-runas" not in command.argv and "-chroot" not in command.argv
    assert command.run_as == "kvm"
    assert option(build(caps=caps, security_model="pool"), "-run-with") == ["user=kvm-pool-1"]


def test_kvm_extra_is_split_like_a_shell() -> None:
    command = build(kvm_extra="-device 'virtio-rng-pci,id=rng0' -msg \"timestamp=on\"")
    assert command.argv[-4:] == ("-device", "virtio-rng-pci,id=rng0", "-msg", "timestamp=on")


def test_machine_alias_resolves_and_microvm_gets_no_pci_addresses() -> None:
    assert build(machine_version="pc").machine == "pc-i440fx-7.2"
    assert build().machine == "pc-i440fx-7.2"
    micro = build({"disks": [{"path": "/d.img"}]}, machine_version="microvm")
    assert option(micro, "-device")[0] == "virtio-blk-pci,drive=drive-disk0,id=disk0"
    assert micro.disks[0].pci_slot is None


def test_vnc_forms() -> None:
    assert option(build(vnc_bind_address="0.0.0.0"), "-vnc") == [":5"]
    assert option(build(vnc_bind_address="::1"), "-vnc") == ["[::1]:5"]
    assert option(build(vnc_bind_address="lo"), "-vnc") == ["192.0.2.10:5"]
    assert option(build(vnc_bind_address="/run/vnc"), "-vnc") == ["unix:/run/vnc/vm1.vnc"]
    anon = build(vnc_bind_address="127.0.0.1", vnc_tls=True)
    assert option(anon, "-object") == ["tls-creds-anon,id=vnctls0,endpoint=server"]
    assert option(anon, "-vnc") == ["127.0.0.1:5,tls-creds=vnctls0"]
    verify = build(
        vnc_bind_address="127.0.0.1",
        vnc_tls=True,
        vnc_x509_path="/etc/x509",
        vnc_x509_verify=True,
    )
    assert option(verify, "-object") == [
        "tls-creds-x509,id=vnctls0,endpoint=server,dir=/etc/x509,verify-peer=yes"
    ]
    # A VNC display without a mouse gets Ganeti's default tablet.
    assert option(anon, "-device")[-1] == "usb-tablet"
    assert "-usb" in anon.argv
    assert anon.display_port == 5905


def test_spice_forms() -> None:
    plain = build({"network_port": 5999}, spice_bind="192.0.2.5", spice_use_vdagent=False)
    assert option(plain, "-spice") == [
        "addr=192.0.2.5,port=5999,disable-ticketing=on,agent-mouse=off"
    ]
    assert option(plain, "-vga") == ["qxl"]
    assert plain.display_port == 5999
    interface = build(spice_bind="eth0")
    assert option(interface, "-spice")[0].startswith("addr=2001:db8::10,port=5905,")
    assert "ipv6=on" in option(interface, "-spice")[0]
    assert option(interface, "-chardev")[-1] == "spicevmc,id=spicechannel0,name=vdagent"


def test_usb_devices_map_to_device_models() -> None:
    command = build(usb_mouse="mouse", usb_devices="keyboard,host:1234:5678")
    assert option(command, "-device")[-2:] == ["usb-mouse", "usb-kbd"]
    assert option(command, "-usbdevice") == ["host:1234:5678"]


def test_boot_orders_and_kernel() -> None:
    assert option(build(boot_order="network"), "-boot") == ["order=n"]
    assert option(build(boot_order="floppy", floppy_image_path="/f.img"), "-boot") == ["order=a"]
    assert option(build(boot_order="floppy", floppy_image_path="/f.img"), "-drive") == [
        "file=/f.img,format=raw,if=floppy,media=disk"
    ]
    kernel = build(kernel_path="/k", kernel_args="", serial_console=False, root_path="/dev/sda")
    assert "-boot" not in kernel.argv
    assert option(kernel, "-append") == ["root=/dev/sda"]
    assert "-serial" not in kernel.argv


def test_cdrom_types() -> None:
    def cdrom_device(**hvparams: Any) -> str:
        return option(build(cdrom_image_path="/a.iso", **hvparams), "-device")[0]

    assert cdrom_device() == "ide-cd,drive=drive-cdrom0,id=cdrom0"
    assert cdrom_device(disk_type="scsi-hd").startswith("lsi53c895a,id=scsi")
    assert cdrom_device(cdrom_disk_type="paravirtual") == (
        "virtio-blk-pci,drive=drive-cdrom0,id=cdrom0,bus=pci.0,addr=0xc"
    )
    # Booting from CD-ROM forces IDE: SeaBIOS boots only ATAPI CD-ROMs.
    assert cdrom_device(cdrom_disk_type="paravirtual", boot_order="cdrom").startswith("ide-cd,")
    assert option(build(cdrom_image_path="/a.iso", cdrom_disk_type="paravirtual"), "-drive") == [
        "file=/a.iso,format=raw,readonly=on,if=none,id=drive-cdrom0"
    ]


# -- plans ------------------------------------------------------------------------------


def test_disk_and_nic_plans() -> None:
    command = build(
        {
            "disks": [{"path": "/a.img"}, {"path": "/b.qcow2", "format": "qcow2", "mode": "ro"}],
            "nics": [{"link": "br0"}, {"mode": "routed", "ip": "192.0.2.9", "mtu": 1400}],
        },
        cdrom_image_path="/c.iso",
        vhost_net=True,
        virtio_net_queues=2,
    )
    assert [(d.kind, d.drive_id, d.device_id, d.pci_slot) for d in command.disks] == [
        ("disk", "drive-disk0", "disk0", 12),
        ("disk", "drive-disk1", "disk1", 13),
        ("cdrom", "drive-cdrom0", "cdrom0", None),
    ]
    assert command.disks[1].readonly and command.disks[1].format == "qcow2"
    first, second = command.nics
    assert (first.netdev_id, first.device_id, first.pci_slot) == ("net0", "nic0", 14)
    assert first.fd_names == ("tap0q0", "tap0q1")
    assert first.vhost and first.vnet_hdr and first.queues == 2
    assert (second.mode, second.ip, second.mtu, second.pci_slot) == (
        "routed",
        "192.0.2.9",
        1400,
        15,
    )
    assert first.vhost_fd_names == ("vhost0q0", "vhost0q1")
    assert option(command, "-netdev")[0] == (
        "tap,id=net0,fds=tap0q0:tap0q1,vhost=on,vhostfds=vhost0q0:vhost0q1"
    )
    assert (
        first.mac
        == assign_macs(decode_spec({"name": "vm1", "uuid": UUID, "nics": [{"link": "br0"}]}))
        .nics[0]
        .mac
    )


def test_scsi_disks_get_targets() -> None:
    command = build(
        {"disks": [{"path": "/a.img"}, {"path": "/b.img"}]},
        disk_type="scsi",
        scsi_controller_type="megasas",
    )
    assert option(command, "-device")[:3] == [
        "megasas,id=scsi",
        "scsi-hd,drive=drive-disk0,id=disk0,bus=scsi.0,channel=0,scsi-id=0,lun=0",
        "scsi-hd,drive=drive-disk1,id=disk1,bus=scsi.0,channel=0,scsi-id=1,lun=0",
    ]
    assert [disk.scsi_id for disk in command.disks] == [0, 1]


def test_argv_with_fds() -> None:
    command = build({"nics": [{"link": "br0"}, {"link": "br1"}]}, virtio_net_queues=2)
    # Found by netdev id: arguments added before them (as the launcher does) are no matter.
    launched = ["-S", "-chardev", "socket,id=qmp,fd=3", *command.argv]
    argv = argv_with_fds(
        launched, command.nics, {"tap0q0": 10, "tap0q1": 11, "tap1q0": 12, "tap1q1": 13}
    )
    assert option_of(argv, "-netdev") == ["tap,id=net0,fds=10:11", "tap,id=net1,fds=12:13"]
    assert argv[:3] == launched[:3]
    # The template itself is unchanged: the record keeps the names.
    assert option(command, "-netdev")[0] == "tap,id=net0,fds=tap0q0:tap0q1"
    with pytest.raises(KeyError, match="tap1q1"):
        argv_with_fds(command.argv, command.nics, {"tap0q0": 10, "tap0q1": 11, "tap1q0": 12})
    without_second = [arg for arg in command.argv if not arg.startswith("tap,id=net1")]
    with pytest.raises(ValueError, match="net1"):
        argv_with_fds(without_second, command.nics, dict.fromkeys(["tap0q0", "tap0q1"], 9))


def test_a_nic_mtu_reaches_the_virtio_device() -> None:
    command = build({"nics": [{"link": "br0"}, {"link": "br0", "mtu": 1400}]})
    first, second = (d for d in option(command, "-device") if d.startswith("virtio-net-pci"))
    assert "host_mtu" not in first
    assert ",host_mtu=1400" in second
    e1000 = build({"nics": [{"link": "br0", "mtu": 1400}]}, nic_type="e1000")
    assert not any("host_mtu" in device for device in option(e1000, "-device"))


def test_argv_with_fds_vhost_and_old_net_syntax() -> None:
    command = build({"nics": [{"link": "br0"}]}, vhost_net=True)
    argv = argv_with_fds(command.argv, command.nics, {"tap0": 7, "vhost0": 8})
    assert option_of(argv, "-netdev") == ["tap,id=net0,fd=7,vhost=on,vhostfd=8"]
    old = ["-net", "tap,vlan=0,name=net0,fd=tap0", "-net", "nic,vlan=0,model=virtio"]
    assert argv_with_fds(old, command.nics, {"tap0": 5})[1] == "tap,vlan=0,name=net0,fd=5"


def option_of(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == name]


# -- what cannot be built ---------------------------------------------------------------


def _error(**kwargs: Any) -> str:
    with pytest.raises(InvalidConfigError) as caught:
        build(**kwargs)
    return str(caught.value)


def test_errors_name_the_field() -> None:
    no_port = LaunchResources()
    assert _error(resources=no_port, vnc_bind_address="127.0.0.1") == (
        "spec.network_port: a display needs a port: set spec.network_port or lease one"
    )
    assert _error(spec={"network_port": 5800}, vnc_bind_address="127.0.0.1") == (
        "spec.network_port: 5800 is below 5900, the first VNC port"
    )
    assert _error(resources=LaunchResources(display_port=5901), vnc_bind_address="eth9") == (
        "spec.hvparams.vnc_bind_address: the address of interface eth9 is unknown"
    )
    assert _error(resources=LaunchResources(display_port=5901), spice_bind="eth9") == (
        "spec.hvparams.spice_bind: the address of interface eth9 is unknown"
    )
    assert _error(resources=LaunchResources(), security_model="pool") == (
        "spec.hvparams.security_model: pool needs a uid leased from the uid pool"
    )
    assert _error(spec={"nics": [{"link": "br0"}, {"link": "br1"}]}, kvm_pci_reservations=31) == (
        "spec.hvparams.kvm_pci_reservations: no PCI slot left for NIC 1: lower kvm_pci_reservations"
    )
    eight = {"disks": [{"path": f"/d{index}.img"} for index in range(8)]}
    assert _error(spec=eight, disk_type="scsi-hd") == (
        "spec.hvparams.scsi_controller_type: lsi has no SCSI target left for disk 7"
    )
    build(eight, disk_type="scsi-hd", scsi_controller_type="virtio-scsi-pci")
    assert _error(caps=modern_caps(default_machine=None)) == (
        "spec.hvparams.machine_version: QEMU names no default machine type: set one"
    )


def test_uuid_and_macs_must_be_assigned() -> None:
    paths = STATE_DIR.instance("vm1")
    hv = resolve_hvparams({}, {})
    with pytest.raises(InvalidConfigError, match=r"spec\.uuid"):
        build_command_line(decode_spec({"name": "vm1"}), hv, modern_caps(), paths, Accelerator.TCG)
    spec = decode_spec({"name": "vm1", "uuid": UUID, "nics": [{"link": "br0"}]})
    with pytest.raises(InvalidConfigError, match=r"spec.nics\[0\].mac"):
        build_command_line(spec, hv, modern_caps(), paths, Accelerator.TCG)


def test_socket_path_limit_names_the_instance() -> None:
    long_dir = StateDir("/" + "d" * 60)
    spec = decode_spec({"name": "a" * 40})
    hv = resolve_hvparams({}, {"use_guest_agent": True, "vnc_bind_address": "/" + "v" * 100})
    problems = socket_path_problems(spec, hv, long_dir.instance(spec.name))
    fields = [problem.path for problem in problems]
    assert fields == ["spec.name"] * 3 + ["spec.hvparams.vnc_bind_address"]
    assert problems[0].reason.startswith(f"instance '{'a' * 40}': socket /ddd")
    assert "over the 107-byte limit" in problems[0].reason
    short = decode_spec({"name": "vm1"})
    assert socket_path_problems(short, resolve_hvparams({}, {}), STATE_DIR.instance("vm1")) == []
    assert guest_agent_socket(STATE_DIR.instance("vm1")) == Path(
        "/var/lib/kvm-supervisor/instances/vm1/qga.sock"
    )


# -- host lookups -----------------------------------------------------------------------


def test_run_as_for_uid() -> None:
    assert run_as_for_uid(0) == "root"
    assert run_as_for_uid(4_000_000_000) == "4000000000:4000000000"
