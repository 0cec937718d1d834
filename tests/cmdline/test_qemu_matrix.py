"""Proof against the real binary: QEMU 7.2 accepts the argv of every hvparam combination.

Each combination is validated (syntax, host, this QEMU), built, and started with ``-S``
(no guest code runs); QEMU must reach the ``prelaunch`` state, answer over QMP, print
no deprecation warning, and exit cleanly on ``quit``. NICs get real, non-persistent
taps (they vanish with their last descriptor). Together the combinations set every
hypervisor parameter at least once; the two this host cannot honour (``vhost_net``,
``cpu_type = host``) must be refused by host validation instead.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from supervisor.host.statedir import StateDir
from supervisor.model.hvparams import PARAMETER_NAMES, resolve_hvparams
from supervisor.model.spec import assign_macs, decode_spec
from supervisor.model.validation import check_host_basics, check_syntax
from supervisor.qemu.accel import probe_kvm, resolve_accelerator
from supervisor.qemu.capabilities import QemuCapabilities, check_host_qemu, parse_capabilities
from supervisor.qemu.cmdline import (
    LaunchResources,
    argv_with_fds,
    build_command_line,
    run_as_for_uid,
    socket_path_problems,
)

from . import run_paused

pytestmark = pytest.mark.qemu

QEMU = "/usr/bin/qemu-system-x86_64"
UUID = "6f1c1d2e-3b4a-4c5d-8e9f-a0b1c2d3e4f5"

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFF_MULTI_QUEUE = 0x0100
_CLONE_NEWNET = 0x40000000


class Files(msgspec.Struct, frozen=True, kw_only=True):
    """What the combinations point at, made once per module."""

    disk_dir: Path
    state_dir: Path
    raw: str
    raw2: str
    qcow2: str
    iso: str
    iso2: str
    floppy: str
    kernel: str
    initrd: str
    password: str
    x509: str | None
    vnc_dir: str
    mem_path: str
    chroot_user: str


def _multiboot_kernel(path: Path) -> None:
    """A kernel QEMU loads without complaint: a multiboot header with load addresses."""
    magic, flags = 0x1BADB002, 0x00010000
    checksum = -(magic + flags) & 0xFFFFFFFF
    load = 0x100000
    header = struct.pack("<8I", magic, flags, checksum, load, load, 0, 0, load)
    path.write_bytes(header + b"\xf4" * 56)


def _x509(directory: Path) -> str | None:
    """ca-cert.pem, server-cert.pem and server-key.pem made with openssl, if it exists."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    directory.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-subj",
        "/CN=ca",
        "-days",
        "2",
    )
    run("req", *ec, "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost")
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", "server-cert.pem", "-days", "2",
    )  # fmt: skip
    return str(directory)


@pytest.fixture(scope="module")
def files() -> Iterator[Files]:
    if not Path(QEMU).exists():
        pytest.fail(f"{QEMU} is missing: run `make deps`")
    # Disk images live on a disk filesystem: O_DIRECT (cache=none) fails on tmpfs.
    disk_dir = Path(tempfile.mkdtemp(prefix="kvs-matrix-", dir="/var/tmp"))
    # Unix socket paths must stay short.
    state_dir = Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))
    try:
        for name, fmt in (("raw.img", "raw"), ("raw2.img", "raw"), ("disk.qcow2", "qcow2")):
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", fmt, str(disk_dir / name), "16M"], check=True
            )
        for name, size in (("a.iso", 1 << 20), ("b.iso", 1 << 20), ("floppy.img", 1474560)):
            with (disk_dir / name).open("wb") as image:
                image.truncate(size)
        _multiboot_kernel(disk_dir / "kernel")
        (disk_dir / "initrd").write_bytes(b"initrd")
        (disk_dir / "password").write_text("s3cret\n")
        (disk_dir / "mem").mkdir()
        (state_dir / "vnc").mkdir()
        yield Files(
            disk_dir=disk_dir,
            state_dir=state_dir,
            raw=str(disk_dir / "raw.img"),
            raw2=str(disk_dir / "raw2.img"),
            qcow2=str(disk_dir / "disk.qcow2"),
            iso=str(disk_dir / "a.iso"),
            iso2=str(disk_dir / "b.iso"),
            floppy=str(disk_dir / "floppy.img"),
            kernel=str(disk_dir / "kernel"),
            initrd=str(disk_dir / "initrd"),
            password=str(disk_dir / "password"),
            x509=_x509(disk_dir / "x509"),
            vnc_dir=str(state_dir / "vnc"),
            mem_path=str(disk_dir / "mem"),
            chroot_user="nobody",
        )
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def caps() -> QemuCapabilities:
    outputs = [
        subprocess.run([QEMU, *args], check=True, capture_output=True, text=True).stdout
        for args in (["--help"], ["-machine", "help"], ["-device", "help"])
    ]
    return parse_capabilities(QEMU, *outputs)


def _free_port(low: int, high: int) -> int:
    # From a random start: another suite on the machine probing from `low` too would
    # pick the same port and one QEMU would fail to bind it.
    start = random.randrange(low, high)
    for port in [*range(start, high), *range(low, start)]:
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {low}-{high}")


@contextmanager
def _throwaway_netns() -> Iterator[int]:
    """This thread in a new, nameless network namespace while the block runs; yields an
    fd that keeps the namespace (and the taps made in it) alive until it is closed.

    The taps QEMU gets here never appear in the host's namespace, where another test
    run may be checking that its link list is unchanged."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.unshare(_CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        try:
            yield os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to this thread's namespace")
    finally:
        os.close(home)


def _open_tap(queues: int, vnet_hdr: bool) -> list[int]:
    """A non-persistent tap with `queues` descriptors: it goes away with the last one."""
    flags = _IFF_TAP | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)
    if queues > 1:
        flags |= _IFF_MULTI_QUEUE
    fds: list[int] = []
    name = b""
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            reply = fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name, flags))
            name = reply[:16].rstrip(b"\0")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _combinations(f: Files) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(id, hvparams, spec fields) of every combination."""
    nic = {"link": "br0"}
    disk = [{"path": f.raw}]
    x509 = f.x509 or "/nonexistent"
    return [
        ("defaults", {}, {}),
        ("one-disk", {}, {"disks": disk}),
        (
            "qcow2-nocache-native-unmap",
            {"disk_cache": "none", "disk_aio": "native", "disk_discard": "unmap"},
            {"disks": [{"path": f.qcow2, "format": "qcow2"}]},
        ),
        (
            "writeback-ignore-threads",
            {"disk_cache": "writeback", "disk_discard": "ignore", "disk_aio": "threads"},
            {"disks": disk},
        ),
        (
            "writethrough-readonly",
            {"disk_cache": "writethrough", "disk_discard": "default"},
            {"disks": [{"path": f.raw, "mode": "ro"}, {"path": f.raw2}]},
        ),
        ("ide-disks", {"disk_type": "ide"}, {"disks": [{"path": f.raw}, {"path": f.raw2}]}),
        ("scsi-lsi", {"disk_type": "scsi", "scsi_controller_type": "lsi"}, {"disks": disk}),
        (
            "scsi-hd-virtio-readonly",
            {"disk_type": "scsi-hd", "scsi_controller_type": "virtio-scsi-pci"},
            {"disks": [{"path": f.raw, "mode": "ro"}, {"path": f.qcow2, "format": "qcow2"}]},
        ),
        (
            "scsi-megasas",
            {"disk_type": "scsi-hd", "scsi_controller_type": "megasas"},
            {"disks": disk},
        ),
        ("scsi-cd-disk", {"disk_type": "scsi-cd"}, {"disks": [{"path": f.iso, "mode": "ro"}]}),
        ("boot-cdrom", {"cdrom_image_path": f.iso, "boot_order": "cdrom"}, {"disks": disk}),
        (
            "two-cdroms-scsi",
            {"cdrom_image_path": f.iso, "cdrom2_image_path": f.iso2, "cdrom_disk_type": "scsi-cd"},
            {},
        ),
        (
            "cdrom-paravirtual",
            {"cdrom_image_path": f.iso, "cdrom_disk_type": "paravirtual"},
            {"disks": disk},
        ),
        ("cdrom-ide-explicit", {"cdrom2_image_path": f.iso2, "cdrom_disk_type": "ide"}, {}),
        ("boot-floppy", {"floppy_image_path": f.floppy, "boot_order": "floppy"}, {}),
        ("boot-network", {"boot_order": "network"}, {"nics": [nic]}),
        (
            "kernel-initrd-serial-115200",
            {
                "kernel_path": f.kernel,
                "initrd_path": f.initrd,
                "root_path": "/dev/vda2",
                "kernel_args": "ro quiet",
                "serial_speed": 115200,
            },
            {"disks": disk},
        ),
        ("kernel-no-serial", {"kernel_path": f.kernel, "serial_console": False}, {}),
        ("no-acpi-exit-on-reboot", {"acpi": False, "reboot_behavior": "exit"}, {}),
        (
            "vnc-ip-keymap",
            {"vnc_bind_address": "127.0.0.1", "keymap": "de", "usb_mouse": ""},
            {},
        ),
        ("vnc-any-password", {"vnc_bind_address": "0.0.0.0", "vnc_password_file": f.password}, {}),
        ("vnc-interface-tls", {"vnc_bind_address": "lo", "vnc_tls": True}, {}),
        (
            "vnc-x509",
            {"vnc_bind_address": "127.0.0.1", "vnc_tls": True, "vnc_x509_path": x509},
            {},
        ),
        (
            "vnc-x509-verify-password",
            {
                "vnc_bind_address": "::1",
                "vnc_tls": True,
                "vnc_x509_path": x509,
                "vnc_x509_verify": True,
                "vnc_password_file": f.password,
            },
            {},
        ),
        ("vnc-unix-socket", {"vnc_bind_address": f.vnc_dir, "usb_mouse": "mouse"}, {}),
        ("spice-defaults", {"spice_bind": "127.0.0.1"}, {}),
        (
            "spice-every-option",
            {
                "spice_bind": "127.0.0.1",
                "spice_ip_version": 4,
                "spice_password_file": f.password,
                "spice_image_compression": "auto_glz",
                "spice_jpeg_wan_compression": "always",
                "spice_zlib_glz_wan_compression": "never",
                "spice_streaming_video": "filter",
                "spice_playback_compression": False,
                "spice_use_vdagent": False,
                "soundhw": "hda",
            },
            {},
        ),
        ("spice-interface-ipv4", {"spice_bind": "lo", "spice_ip_version": 4, "vga": "qxl"}, {}),
        (
            "spice-tls",
            {
                "spice_bind": "127.0.0.1",
                "spice_use_tls": True,
                "spice_tls_ciphers": "HIGH:-DES",
                "spice_image_compression": "off",
            },
            {},
        ),
        ("usb-mouse-and-devices", {"usb_mouse": "mouse", "usb_devices": "keyboard,tablet"}, {}),
        ("sound-ac97-es1370", {"soundhw": "ac97,es1370"}, {}),
        ("sound-isa-sb16", {"soundhw": "sb16"}, {}),
        ("vga-cirrus-localtime", {"vga": "cirrus", "use_localtime": True}, {}),
        ("vga-virtio", {"vga": "virtio"}, {}),
        ("vga-none", {"vga": "none"}, {}),
        (
            "cpu-model-topology",
            {"cpu_type": "qemu64", "cpu_sockets": 2, "cpu_cores": 2, "cpu_threads": 1},
            {"vcpus": 4},
        ),
        ("cpu-sockets-only", {"cpu_sockets": 2}, {"vcpus": 2, "memory_mib": 256}),
        ("mem-path", {"mem_path": f.mem_path}, {}),
        (
            "q35-everything",
            {"machine_version": "q35", "cdrom_image_path": f.iso, "use_guest_agent": True},
            {"disks": disk, "nics": [nic]},
        ),
        ("older-machine", {"machine_version": "pc-i440fx-6.2"}, {"disks": disk}),
        ("tcg-explicit", {"kvm_flag": "disabled"}, {}),
        ("kvm-explicit", {"kvm_flag": "enabled", "cpu_type": "qemu64"}, {}),
        ("run-as-user", {"security_model": "user", "security_domain": "nobody"}, {}),
        ("run-as-pool", {"security_model": "pool"}, {}),
        (
            "chroot-and-user",
            {"use_chroot": True, "security_model": "user", "security_domain": f.chroot_user},
            {},
        ),
        ("guest-agent", {"use_guest_agent": True}, {}),
        (
            "pci-reservations",
            {"kvm_pci_reservations": 4, "use_guest_agent": True},
            {"disks": [{"path": f.raw}, {"path": f.raw2}], "nics": [nic, nic]},
        ),
        ("kvm-extra", {"kvm_extra": "-device 'virtio-rng-pci,id=rng0' -msg timestamp=on"}, {}),
        ("nic-paravirtual", {"vnet_hdr": True}, {"nics": [nic]}),
        ("nic-multiqueue", {"virtio_net_queues": 4}, {"nics": [nic, nic]}),
        ("nic-no-vnet-hdr", {"vnet_hdr": False}, {"nics": [nic]}),
        ("nic-e1000", {"nic_type": "e1000"}, {"nics": [nic, nic]}),
        ("nic-rtl8139", {"nic_type": "rtl8139"}, {"nics": [nic]}),
        ("nic-ne2k-isa", {"nic_type": "ne2k_isa"}, {"nics": [nic]}),
        ("nic-ne2k-pci", {"nic_type": "ne2k_pci"}, {"nics": [nic]}),
        ("nic-i82551", {"nic_type": "i82551"}, {"nics": [nic]}),
        ("nic-i82557b", {"nic_type": "i82557b"}, {"nics": [nic]}),
        ("nic-i82559er", {"nic_type": "i82559er"}, {"nics": [nic]}),
        ("nic-pcnet", {"nic_type": "pcnet"}, {"nics": [nic]}),
        (
            "no-argv-effect",
            {
                "migration_port": 8200,
                "migration_bandwidth": 64,
                "migration_downtime": 100,
                "migration_mode": "non-live",
                "migration_caps": "xbzrle:auto-converge",
                "cpu_mask": "0:1",
                "user_shutdown": True,
                "kvm_path": QEMU,
            },
            {"vcpus": 2, "startup_memory_mib": 64},
        ),
    ]


#: Parameters this host cannot honour, with the field and reason host validation gives.
REFUSED = {
    "vhost_net": (
        {"vhost_net": True},
        "spec.hvparams.vhost_net",
        "/dev/vhost-net is missing",
    ),
    "cpu_type host": (
        {"cpu_type": "host"},
        "spec.hvparams.cpu_type",
        "host needs KVM",
    ),
}

_PLACEHOLDER = Files(
    disk_dir=Path("/x"),
    state_dir=Path("/x"),
    raw="/x",
    raw2="/x",
    qcow2="/x",
    iso="/x",
    iso2="/x",
    floppy="/x",
    kernel="/x",
    initrd="/x",
    password="/x",
    x509="/x",
    vnc_dir="/x",
    mem_path="/x",
    chroot_user="nobody",
)
IDS = [name for name, _, _ in _combinations(_PLACEHOLDER)]


def test_the_matrix_is_big_and_sets_every_parameter() -> None:
    assert len(IDS) >= 40
    assert len(set(IDS)) == len(IDS)
    assert not os.path.exists("/dev/vhost-net") or not probe_kvm().pvm_host
    used = {key for _, hvparams, _ in _combinations(_PLACEHOLDER) for key in hvparams}
    refused = {key for hvparams, _, _ in REFUSED.values() for key in hvparams}
    assert used | refused == set(PARAMETER_NAMES)


@pytest.mark.parametrize("index", range(len(IDS)), ids=IDS)
def test_qemu_accepts(index: int, files: Files, caps: QemuCapabilities) -> None:
    name, hvparams, fields = _combinations(files)[index]
    if files.x509 is None and "vnc_x509_path" in hvparams:
        pytest.skip("openssl is missing: no x509 certificates")
    instance = f"m{index}"
    spec = assign_macs(decode_spec({"name": instance, "uuid": UUID, "memory_mib": 64, **fields}))
    hv = resolve_hvparams({}, hvparams)
    kvm = probe_kvm()
    assert check_syntax(spec, hv) == []
    assert check_host_basics(spec, hv) == []
    assert check_host_qemu(spec, hv, caps, kvm=kvm) == []
    paths = StateDir(files.state_dir).create_instance_dir(instance)
    assert socket_path_problems(spec, hv, paths) == []
    if hv.use_chroot:
        paths.chroot.mkdir(parents=True, mode=0o700)
    display_port = None
    if hv.vnc_bind_address or hv.spice_bind:
        display_port = _free_port(5900, 6900)
    resources = LaunchResources(
        display_port=display_port,
        pool_user=run_as_for_uid(65534),
        vnc_address="127.0.0.1",
        spice_address="127.0.0.1",
        spice_x509_dir=files.x509 or "/nonexistent",
    )
    accel = resolve_accelerator(hv.kvm_flag, kvm, instance=instance)
    command = build_command_line(spec, hv, caps, paths, accel, resources=resources)
    with ExitStack() as stack:
        fd_numbers: dict[str, int] = {}
        if command.nics:
            with _throwaway_netns() as netns:
                stack.callback(os.close, netns)  # closed last: after the taps
                for nic in command.nics:
                    fds = _open_tap(nic.queues, nic.vnet_hdr)
                    for fd in fds:
                        stack.callback(os.close, fd)
                    fd_numbers.update(zip(nic.fd_names, fds, strict=True))
        argv = argv_with_fds(command.argv, command.nics, fd_numbers)
        stderr = run_paused(argv, paths.qmp_socket, list(fd_numbers.values()))
    assert "deprecated" not in stderr, f"{name}: {stderr}"
    if hv.serial_console:
        assert paths.serial_log.exists()


@pytest.mark.parametrize("refused", sorted(REFUSED))
def test_host_validation_refuses_what_this_host_cannot_do(
    refused: str, caps: QemuCapabilities
) -> None:
    hvparams, path, reason = REFUSED[refused]
    spec = decode_spec({"name": "refused", "nics": [{"link": "br0"}]})
    hv = resolve_hvparams({}, hvparams)
    found = [*check_host_basics(spec, hv), *check_host_qemu(spec, hv, caps)]
    assert [problem.path for problem in found] == [path]
    assert reason in found[0].reason
