"""Syntax and host validation: every rule, good and bad, with the exact error path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from supervisor.model.errors import InvalidConfigError, InvalidParams
from supervisor.model.hvparams import HvParams, resolve_hvparams
from supervisor.model.spec import InstanceSpec, decode_spec
from supervisor.model.validation import (
    SPICE_OPTIONS_NEEDING_BIND,
    VNC_X509_FILES,
    check_host_basics,
    check_syntax,
    raise_first,
    validated_hvparams,
)

ROUTED = {"mode": "routed", "ip": "192.0.2.1"}


def syntax(spec: dict[str, Any] | None = None, /, **hvparams: Any) -> list[str]:
    """The problems check_syntax finds, as 'path: reason' strings."""
    decoded = decode_spec({"name": "vm", **(spec or {})})
    found = check_syntax(decoded, resolve_hvparams({}, hvparams))
    return [str(problem) for problem in found]


def paths(spec: dict[str, Any] | None = None, /, **hvparams: Any) -> list[str]:
    decoded = decode_spec({"name": "vm", **(spec or {})})
    return [problem.path for problem in check_syntax(decoded, resolve_hvparams({}, hvparams))]


def test_defaults_are_clean() -> None:
    assert syntax() == []


def test_all_problems_are_reported_at_once() -> None:
    found = paths(
        {"startup_memory_mib": 256},
        serial_speed=1234,
        disk_aio="native",
        vnc_x509_verify=True,
    )
    assert found == [
        "spec.hvparams.serial_speed",
        "spec.hvparams.vnc_x509_verify",
        "spec.hvparams.disk_aio",
        "spec.startup_memory_mib",
    ]


def test_raise_first() -> None:
    raise_first([])
    first, second = InvalidConfigError("a", "x"), InvalidConfigError("b", "y")
    with pytest.raises(InvalidConfigError) as caught:
        raise_first([first, second])
    assert caught.value is first


# Boot.


def test_kernel_needs_a_root_path() -> None:
    assert syntax(kernel_path="/boot/k", root_path="") == [
        "spec.hvparams.root_path: a root partition is needed with kernel_path"
    ]
    assert syntax(kernel_path="/boot/k") == []


def test_initrd_needs_a_kernel() -> None:
    assert syntax(initrd_path="/boot/i") == [
        "spec.hvparams.initrd_path: an initrd needs kernel_path"
    ]
    assert syntax(initrd_path="/boot/i", kernel_path="/boot/k") == []


@pytest.mark.parametrize(
    ("hvparams", "spec", "problem"),
    [
        (
            {"boot_order": "cdrom"},
            {},
            "spec.hvparams.boot_order: booting from cdrom needs an ISO in cdrom_image_path",
        ),
        ({"boot_order": "cdrom", "cdrom_image_path": "/i.iso"}, {}, None),
        ({"boot_order": "cdrom", "cdrom_image_path": "https://x/i.iso"}, {}, None),
        (
            {"boot_order": "floppy"},
            {},
            "spec.hvparams.boot_order: booting from floppy needs an image in floppy_image_path",
        ),
        ({"boot_order": "floppy", "floppy_image_path": "/f.img"}, {}, None),
        (
            {"boot_order": "network"},
            {},
            "spec.hvparams.boot_order: booting from network needs a NIC",
        ),
        ({"boot_order": "network"}, {"nics": [ROUTED]}, None),
    ],
)
def test_boot_device_must_exist(
    hvparams: dict[str, Any], spec: dict[str, Any], problem: str | None
) -> None:
    assert syntax(spec, **hvparams) == ([problem] if problem else [])


# Console and displays.


def test_serial_speed_is_checked_when_the_console_is_on() -> None:
    assert syntax(serial_speed=1234) == [
        "spec.hvparams.serial_speed: 1234 is not one of 75, 110, 300, 600, 1200, 1800, 2400,"
        " 4800, 9600, 14400, 19200, 28800, 38400, 57600, 115200, 230400, 345600, 460800"
    ]
    assert syntax(serial_speed=1234, serial_console=False) == []
    assert syntax(serial_speed=115200) == []


def test_vnc_x509_verify_needs_a_path() -> None:
    assert syntax(vnc_x509_verify=True) == ["spec.hvparams.vnc_x509_verify: needs vnc_x509_path"]
    assert syntax(vnc_x509_verify=True, vnc_x509_path="/etc/pki/vnc") == []


@pytest.mark.parametrize("address", ["0.0.0.0", "::1", "eth0", "/run/vnc"])
def test_vnc_bind_addresses(address: str) -> None:
    assert syntax(vnc_bind_address=address) == []


def test_vnc_socket_dir_must_be_normalised() -> None:
    assert paths(vnc_bind_address="/run/../vnc") == ["spec.hvparams.vnc_bind_address"]
    assert paths(vnc_bind_address="/run/vnc/") == ["spec.hvparams.vnc_bind_address"]


SPICE_VALUES: dict[str, Any] = {
    "spice_ip_version": 4,
    "spice_password_file": "/etc/spice.pw",
    "spice_image_compression": "glz",
    "spice_jpeg_wan_compression": "auto",
    "spice_zlib_glz_wan_compression": "never",
    "spice_streaming_video": "filter",
    "spice_use_tls": True,
}


@pytest.mark.parametrize("name", SPICE_OPTIONS_NEEDING_BIND)
def test_spice_options_need_spice_bind(name: str) -> None:
    value = SPICE_VALUES[name]
    assert syntax(**{name: value}) == [f"spec.hvparams.{name}: needs spice_bind"]
    assert syntax(**{name: value, "spice_bind": "127.0.0.1"}) == []


def test_spice_options_with_set_defaults_do_not_need_spice_bind() -> None:
    assert set(SPICE_VALUES) == set(SPICE_OPTIONS_NEEDING_BIND)
    assert syntax(spice_playback_compression=True, spice_use_vdagent=True) == []


@pytest.mark.parametrize(
    ("bind", "version", "problem"),
    [
        ("127.0.0.1", 4, None),
        ("127.0.0.1", 0, None),
        ("127.0.0.1", 6, "spice_bind '127.0.0.1' is an IPv4 address, not IPv6"),
        ("::1", 6, None),
        ("::1", 4, "spice_bind '::1' is an IPv6 address, not IPv4"),
        ("eth0", 6, None),
    ],
)
def test_spice_ip_version_matches_the_address(bind: str, version: int, problem: str | None) -> None:
    expected = [f"spec.hvparams.spice_ip_version: {problem}"] if problem else []
    assert syntax(spice_bind=bind, spice_ip_version=version) == expected


def test_spice_and_vnc_exclude_each_other() -> None:
    assert syntax(spice_bind="127.0.0.1", vnc_bind_address="127.0.0.1") == [
        "spec.hvparams.spice_bind: SPICE and VNC (vnc_bind_address) cannot both be enabled"
    ]


# Security.


@pytest.mark.parametrize(
    ("model", "domain", "problem"),
    [
        ("user", "", "security_model user needs a user to run QEMU as"),
        ("user", "nobody", None),
        ("none", "nobody", "must be empty with security_model none"),
        ("pool", "nobody", "must be empty with security_model pool"),
        ("none", "", None),
        ("pool", "", None),
    ],
)
def test_security_domain(model: str, domain: str, problem: str | None) -> None:
    expected = [f"spec.hvparams.security_domain: {problem}"] if problem else []
    assert syntax(security_model=model, security_domain=domain) == expected


# Disks.


def test_native_aio_needs_cache_none() -> None:
    assert syntax(disk_aio="native") == [
        "spec.hvparams.disk_aio: native needs disk_cache none, not default"
    ]
    assert syntax(disk_aio="native", disk_cache="none") == []
    assert syntax(disk_aio="threads", disk_cache="writeback") == []


def test_disks_must_be_distinct_absolute_paths() -> None:
    disks = [{"path": "/d/a"}, {"path": "rel.img"}, {"path": "/d/x/../a", "mode": "ro"}]
    assert syntax({"disks": disks}) == [
        "spec.disks[1].path: 'rel.img' is not an absolute path",
        "spec.disks[2].path: same path as disks[0]",
    ]


@pytest.mark.parametrize(
    "name",
    [
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
    ],
)
def test_path_parameters_must_be_absolute(name: str) -> None:
    found = syntax(**{"kernel_path": "/k", "spice_bind": "::1", name: "relative/file"})
    assert found == [f"spec.hvparams.{name}: 'relative/file' is not an absolute path"]


# CPUs.


@pytest.mark.parametrize(
    ("vcpus", "mask", "problem"),
    [
        (1, "all", None),
        (4, "0-1", None),
        (2, "0:1", None),
        (3, "0:1:all", None),
        (3, "0:1", "2 per-vCPU entries for 3 vCPU(s)"),
        (1, "0:1", "2 per-vCPU entries for 1 vCPU(s)"),
        (1, "2-1", "range '2-1' runs backwards"),
        (1, "x", "'x' is not a CPU number or range (like 0-2)"),
        (1, "", None),
    ],
)
def test_cpu_mask(vcpus: int, mask: str, problem: str | None) -> None:
    expected = [f"spec.hvparams.cpu_mask: {problem}"] if problem else []
    assert syntax({"vcpus": vcpus}, cpu_mask=mask) == expected


@pytest.mark.parametrize(
    ("vcpus", "topology", "problem"),
    [
        (4, {}, None),
        (4, {"cpu_sockets": 2, "cpu_cores": 2, "cpu_threads": 1}, None),
        (
            4,
            {"cpu_sockets": 1, "cpu_cores": 2, "cpu_threads": 1},
            "cpu_sockets 1 * cpu_cores 2 * cpu_threads 1 = 2, not 4",
        ),
        (4, {"cpu_cores": 2}, None),
        (6, {"cpu_cores": 2, "cpu_threads": 3}, None),
        (3, {"cpu_threads": 2}, "3 vCPU(s) cannot be split into cpu_threads 2"),
        (2, {"cpu_sockets": 4}, "2 vCPU(s) cannot be split into cpu_sockets 4"),
    ],
)
def test_smp_topology_matches_vcpus(
    vcpus: int, topology: dict[str, int], problem: str | None
) -> None:
    expected = [f"spec.vcpus: {problem}"] if problem else []
    assert syntax({"vcpus": vcpus}, **topology) == expected


# NICs.


@pytest.mark.parametrize(
    ("nic", "problem"),
    [
        ({"mode": "bridged", "link": "br0"}, None),
        ({"mode": "bridged"}, "spec.nics[0].link: a bridged NIC needs a link"),
        ({"mode": "openvswitch"}, "spec.nics[0].link: a openvswitch NIC needs a link"),
        ({"mode": "openvswitch", "link": "ovs0", "vlan": 10}, None),
        ({"mode": "routed", "ip": "2001:db8::1"}, None),
        ({"mode": "routed"}, "spec.nics[0].ip: a routed NIC needs an IP address"),
        (
            {"mode": "routed", "ip": "192.0.2.300"},
            "spec.nics[0].ip: '192.0.2.300' is not an IP address",
        ),
        # Whether the bridge can carry it is for the host check (bridge VLAN filtering).
        ({"mode": "bridged", "link": "br0", "vlan": 5}, None),
        (
            {"mode": "routed", "ip": "192.0.2.7", "vlan": 5},
            "spec.nics[0].vlan: a routed NIC has no VLAN: use bridged or openvswitch",
        ),
        (
            {"mode": "bridged", "link": "br0", "mac": "01:00:5e:00:00:01"},
            "spec.nics[0].mac: 01:00:5e:00:00:01 is a multicast address",
        ),
        ({"mode": "bridged", "link": "br0", "mac": "aa:00:00:bf:2f:16"}, None),
    ],
)
def test_nic_rules(nic: dict[str, Any], problem: str | None) -> None:
    assert syntax({"nics": [nic]}) == ([problem] if problem else [])


def test_multiqueue_needs_paravirtual_nics() -> None:
    nics = {"nics": [{"link": "br0"}]}
    assert syntax(nics, virtio_net_queues=4, nic_type="e1000") == [
        "spec.hvparams.virtio_net_queues: 4 queues need nic_type paravirtual, not e1000"
    ]
    assert syntax(nics, virtio_net_queues=4, nic_type="paravirtual") == []
    assert syntax(nics, virtio_net_queues=1, nic_type="e1000") == []
    # Without NICs neither matters (a node-wide default may set either).
    assert syntax({}, virtio_net_queues=4, nic_type="e1000") == []


def test_duplicate_macs() -> None:
    nics = [{**ROUTED, "mac": "52:54:00:00:00:01"}, {**ROUTED, "mac": "52:54:00:00:00:01".upper()}]
    assert syntax({"nics": nics}) == ["spec.nics[1].mac: same MAC as nics[0]"]


# Memory and the rest.


def test_startup_memory_fits_in_memory() -> None:
    assert syntax({"memory_mib": 256, "startup_memory_mib": 512}) == [
        "spec.startup_memory_mib: 512 exceeds memory_mib 256"
    ]
    assert syntax({"memory_mib": 256, "startup_memory_mib": 256}) == []


def test_migration_capabilities_are_names() -> None:
    assert syntax(migration_caps="xbzrle:auto-converge") == []
    assert syntax(migration_caps="xbzrle:Bad Cap") == [
        "spec.hvparams.migration_caps: 'Bad Cap' is not a capability name"
    ]


def test_kvm_extra_must_split_like_a_shell() -> None:
    assert syntax(kvm_extra="-device 'virtio-rng-pci,id=rng0'") == []
    assert syntax(kvm_extra="-device 'oops") == [
        "spec.hvparams.kvm_extra: cannot be split: No closing quotation"
    ]


# Hand-built structs get the decoder's scrutiny too.


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        (InstanceSpec(name="../x"), "spec.name"),
        (InstanceSpec(name="x", memory_mib=8), "spec.memory_mib"),
        (InstanceSpec(name="x", vcpus=0), "spec.vcpus"),
        (InstanceSpec(name="x", vcpus=256), "spec.vcpus"),
    ],
)
def test_hand_built_spec_is_decoded_again(spec: InstanceSpec, path: str) -> None:
    found = check_syntax(spec, HvParams())
    assert [problem.path for problem in found] == [path]
    assert isinstance(found[0], InvalidParams)


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"boot_order": "usb"}, "spec.hvparams.boot_order"),
        ({"migration_port": 0}, "spec.hvparams.migration_port"),
        ({"virtio_net_queues": 9}, "spec.hvparams.virtio_net_queues"),
        ({"cpu_threads": -1}, "spec.hvparams.cpu_threads"),
    ],
)
def test_hand_built_hvparams_are_decoded_again(changes: dict[str, Any], path: str) -> None:
    hv = msgspec.structs.replace(HvParams(), **changes)
    assert [problem.path for problem in check_syntax(InstanceSpec(name="x"), hv)] == [path]


# Host layer.


@pytest.fixture
def regular_file(tmp_path: Path) -> str:
    path = tmp_path / "file"
    path.write_bytes(b"x")
    return str(path)


def host(
    spec: dict[str, Any] | None = None,
    /,
    *,
    kvm_device: str = "/dev/kvm",
    vhost_net_device: str = "/dev/vhost-net",
    **hvparams: Any,
) -> list[str]:
    decoded = decode_spec({"name": "vm", **(spec or {})})
    hv = resolve_hvparams({}, hvparams)
    found = check_host_basics(decoded, hv, kvm_device=kvm_device, vhost_net_device=vhost_net_device)
    return [str(problem) for problem in found]


def test_host_defaults_are_clean() -> None:
    assert host() == []


def test_security_domain_user_must_exist() -> None:
    assert host(security_model="user", security_domain="root") == []
    assert host(security_model="user", security_domain="no-such-user-kvs") == [
        "spec.hvparams.security_domain: no user 'no-such-user-kvs' on this host"
    ]


@pytest.mark.parametrize("address", ["127.0.0.1", "::", "lo"])
def test_vnc_binds_to_an_address_or_interface(address: str) -> None:
    assert host(vnc_bind_address=address) == []


def test_vnc_binds_to_a_socket_directory(tmp_path: Path) -> None:
    assert host(vnc_bind_address=str(tmp_path)) == []
    missing = tmp_path / "missing"
    assert host(vnc_bind_address=str(missing)) == [
        f"spec.hvparams.vnc_bind_address: no directory {missing} for the VNC socket"
    ]
    assert host(vnc_bind_address="nosuchif0") == [
        "spec.hvparams.vnc_bind_address: 'nosuchif0' is neither an IP address, an interface,"
        " nor an absolute directory"
    ]


def test_spice_binds_to_an_address_or_interface() -> None:
    assert host(spice_bind="lo") == []
    assert host(spice_bind="127.0.0.1") == []
    assert host(spice_bind="nosuchif0") == [
        "spec.hvparams.spice_bind: 'nosuchif0' is neither an IP address nor an interface"
    ]


@pytest.mark.parametrize(
    "name",
    [
        "kernel_path",
        "initrd_path",
        "floppy_image_path",
        "cdrom_image_path",
        "cdrom2_image_path",
        "vnc_password_file",
        "spice_password_file",
    ],
)
def test_files_must_exist(name: str, regular_file: str, tmp_path: Path) -> None:
    assert host(**{name: regular_file}) == []
    missing = tmp_path / "missing"
    assert host(**{name: str(missing)}) == [f"spec.hvparams.{name}: {missing} does not exist"]
    assert host(**{name: str(tmp_path)}) == [f"spec.hvparams.{name}: {tmp_path} is a directory"]


def test_cdrom_urls_are_not_looked_up() -> None:
    assert host(cdrom_image_path="https://example.org/x.iso") == []


def test_kvm_path_must_be_executable(regular_file: str, tmp_path: Path) -> None:
    assert host(kvm_path=regular_file) == [
        f"spec.hvparams.kvm_path: {regular_file} is not an executable file"
    ]
    assert host(kvm_path=str(tmp_path)) == [
        f"spec.hvparams.kvm_path: {tmp_path} is not an executable file"
    ]
    os.chmod(regular_file, 0o755)
    assert host(kvm_path=regular_file) == []


def test_mem_path_must_be_a_directory(tmp_path: Path, regular_file: str) -> None:
    assert host(mem_path=str(tmp_path)) == []
    assert host(mem_path=regular_file) == [f"spec.hvparams.mem_path: no directory {regular_file}"]


def test_vnc_x509_dir_and_its_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert host(vnc_x509_path=str(missing)) == [
        f"spec.hvparams.vnc_x509_path: no directory {missing}"
    ]
    assert host(vnc_x509_path=str(tmp_path)) == []
    assert host(vnc_x509_path=str(tmp_path), vnc_tls=True) == [
        f"spec.hvparams.vnc_x509_path: {tmp_path} lacks ca-cert.pem, server-cert.pem,"
        " server-key.pem"
    ]
    for name in VNC_X509_FILES:
        (tmp_path / name).write_text("pem")
    assert host(vnc_x509_path=str(tmp_path), vnc_tls=True) == []


def test_disks_must_exist(tmp_path: Path, regular_file: str) -> None:
    disks = [
        {"path": regular_file},
        {"path": str(tmp_path / "missing"), "mode": "ro"},
        {"path": str(tmp_path)},
    ]
    assert host({"disks": disks}) == [
        f"spec.disks[1].path: {tmp_path / 'missing'} does not exist",
        f"spec.disks[2].path: {tmp_path} is a directory",
    ]


def test_vhost_net_needs_the_device(tmp_path: Path, regular_file: str) -> None:
    missing = str(tmp_path / "vhost-net")
    assert host(vhost_net=True, vhost_net_device=missing) == [
        f"spec.hvparams.vhost_net: {missing} is missing (load the vhost_net module,"
        " or set vhost_net false)"
    ]
    assert host(vhost_net=True, vhost_net_device=regular_file) == []
    assert host(vhost_net=False, vhost_net_device=missing) == []


def test_kvm_enabled_needs_an_openable_device(tmp_path: Path, regular_file: str) -> None:
    missing = str(tmp_path / "kvm")
    assert host(kvm_flag="enabled", kvm_device=missing) == [
        f"spec.hvparams.kvm_flag: cannot open {missing}: No such file or directory"
    ]
    assert host(kvm_flag="enabled", kvm_device=regular_file) == []
    assert host(kvm_flag="", kvm_device=missing) == []
    assert host(kvm_flag="disabled", kvm_device=missing) == []


def test_cpu_mask_names_existing_cpus() -> None:
    cpus = os.cpu_count() or 1
    assert host({"vcpus": 2}, cpu_mask=f"0:{cpus - 1}") == []
    assert host({"vcpus": 2}, cpu_mask=f"0:0-{cpus}") == [
        f"spec.hvparams.cpu_mask: CPU {cpus} does not exist (this host has {cpus})"
    ]
    assert host(cpu_mask="not-a-mask") == []


def test_validated_hvparams_runs_both_layers(tmp_path: Path) -> None:
    spec = decode_spec({"name": "vm", "hvparams": {"serial_speed": 9600}})
    assert validated_hvparams(spec, {"acpi": False}).acpi is False
    bad_syntax = decode_spec({"name": "vm", "hvparams": {"disk_aio": "native"}})
    with pytest.raises(InvalidConfigError, match=r"^spec\.hvparams\.disk_aio: "):
        validated_hvparams(bad_syntax, {})
    missing = str(tmp_path / "vmlinuz")
    bad_host = decode_spec({"name": "vm", "hvparams": {"kernel_path": missing}})
    with pytest.raises(
        InvalidConfigError, match=r"^spec\.hvparams\.kernel_path: .* does not exist"
    ):
        validated_hvparams(bad_host, {})
    assert validated_hvparams(bad_host, {}, check_host=False).kernel_path == missing
    with pytest.raises(InvalidParams, match=r"^hvparams\.bogus: unknown"):
        validated_hvparams(spec, {"bogus": 1})
