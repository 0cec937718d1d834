"""HvParams: Ganeti's names, value sets and defaults; merging; cpu_mask; the docs table."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.model.errors import InvalidConfigError, InvalidParams
from supervisor.model.hvparams import (
    GANETI_DEFAULT_DEVIATIONS,
    PARAMETER_NAMES,
    CpuSet,
    HvParams,
    choices,
    format_cpu_mask,
    is_url,
    parameter_docs,
    parse_cpu_mask,
    render_markdown_table,
    resolve_hvparams,
)

CLASSIC = [
    "kvm_path",
    "kernel_path",
    "initrd_path",
    "root_path",
    "kernel_args",
    "acpi",
    "serial_console",
    "serial_speed",
    "vnc_bind_address",
    "vnc_tls",
    "vnc_x509_path",
    "vnc_x509_verify",
    "vnc_password_file",
    "spice_bind",
    "spice_ip_version",
    "spice_password_file",
    "spice_image_compression",
    "spice_jpeg_wan_compression",
    "spice_zlib_glz_wan_compression",
    "spice_streaming_video",
    "spice_playback_compression",
    "spice_use_tls",
    "spice_tls_ciphers",
    "spice_use_vdagent",
    "floppy_image_path",
    "cdrom_image_path",
    "cdrom2_image_path",
    "boot_order",
    "nic_type",
    "disk_type",
    "cdrom_disk_type",
    "usb_mouse",
    "keymap",
    "migration_port",
    "migration_bandwidth",
    "migration_downtime",
    "migration_mode",
    "use_localtime",
    "disk_cache",
    "security_model",
    "security_domain",
    "kvm_flag",
    "vhost_net",
    "use_chroot",
    "mem_path",
    "reboot_behavior",
    "cpu_mask",
    "cpu_type",
    "cpu_cores",
    "cpu_threads",
    "cpu_sockets",
    "soundhw",
    "usb_devices",
    "vga",
    "kvm_extra",
    "machine_version",
]
LATER = [
    "vnet_hdr",
    "user_shutdown",
    "disk_aio",
    "migration_caps",
    "virtio_net_queues",
    "disk_discard",
    "kvm_pci_reservations",
    "scsi_controller_type",
    "use_guest_agent",
]

# Ganeti 3.1's hvcDefaults for KVM (src/Ganeti/Constants.hs), with the autoconf values
# of kvmPath and kvmKernel and opensslCiphers spelt out.
GANETI_DEFAULTS: dict[str, Any] = {
    "kvm_path": "/usr/bin/kvm",
    "kernel_path": "/boot/vmlinuz-3-kvmU",
    "initrd_path": "",
    "kernel_args": "ro",
    "root_path": "/dev/vda1",
    "acpi": True,
    "serial_console": True,
    "serial_speed": 38400,
    "vnc_bind_address": "",
    "vnc_tls": False,
    "vnc_x509_path": "",
    "vnc_x509_verify": False,
    "vnc_password_file": "",
    "scsi_controller_type": "lsi",
    "kvm_pci_reservations": 12,
    "spice_bind": "",
    "spice_ip_version": 0,
    "spice_password_file": "",
    "spice_image_compression": "",
    "spice_jpeg_wan_compression": "",
    "spice_zlib_glz_wan_compression": "",
    "spice_streaming_video": "",
    "spice_playback_compression": True,
    "spice_use_tls": False,
    "spice_tls_ciphers": "HIGH:-DES:-3DES:-EXPORT:-ADH",
    "spice_use_vdagent": True,
    "floppy_image_path": "",
    "cdrom_image_path": "",
    "cdrom2_image_path": "",
    "boot_order": "disk",
    "nic_type": "paravirtual",
    "disk_type": "paravirtual",
    "cdrom_disk_type": "",
    "disk_aio": "threads",
    "usb_mouse": "",
    "keymap": "",
    "migration_port": 8102,
    "migration_bandwidth": 32,
    "migration_downtime": 30,
    "migration_mode": "live",
    "use_guest_agent": False,
    "use_localtime": False,
    "disk_cache": "default",
    "disk_discard": "default",
    "security_model": "none",
    "security_domain": "",
    "kvm_flag": "",
    "vhost_net": False,
    "virtio_net_queues": 1,
    "use_chroot": False,
    "user_shutdown": False,
    "mem_path": "",
    "reboot_behavior": "reboot",
    "cpu_mask": "all",
    "cpu_type": "",
    "cpu_cores": 0,
    "cpu_threads": 0,
    "cpu_sockets": 0,
    "soundhw": "",
    "usb_devices": "",
    "vga": "",
    "kvm_extra": "",
    "machine_version": "",
    "migration_caps": "",
    "vnet_hdr": True,
}


def test_all_65_ganeti_parameters_by_name() -> None:
    assert len(CLASSIC) == 56
    assert len(LATER) == 9
    assert sorted(PARAMETER_NAMES) == sorted(CLASSIC + LATER)


def test_defaults_are_ganetis_except_the_documented_deviations() -> None:
    defaults = HvParams()
    assert set(GANETI_DEFAULTS) == set(PARAMETER_NAMES)
    differing = {
        name for name, value in GANETI_DEFAULTS.items() if getattr(defaults, name) != value
    }
    assert differing == set(GANETI_DEFAULT_DEVIATIONS) == {"kvm_path", "kernel_path"}
    assert defaults.kvm_path == "/usr/bin/qemu-system-x86_64"
    assert defaults.kernel_path == ""
    assert defaults.vhost_net is False
    for name, (ganeti_value, reason) in GANETI_DEFAULT_DEVIATIONS.items():
        assert GANETI_DEFAULTS[name] == ganeti_value
        assert reason


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("boot_order", ("cdrom", "disk", "floppy", "network")),
        ("security_model", ("none", "pool", "user")),
        ("kvm_flag", ("", "enabled", "disabled")),
        ("disk_aio", ("", "threads", "native")),
        ("disk_discard", ("", "default", "ignore", "unmap")),
        ("scsi_controller_type", ("lsi", "virtio-scsi-pci", "megasas")),
        ("spice_ip_version", (0, 4, 6)),
        ("migration_mode", ("live", "non-live")),
        ("reboot_behavior", ("reboot", "exit")),
        ("usb_mouse", ("", "mouse", "tablet")),
        ("kvm_path", None),
        ("serial_speed", None),
    ],
)
def test_value_sets(name: str, expected: tuple[object, ...] | None) -> None:
    assert choices(name) == expected


def test_nic_and_disk_types_are_ganetis() -> None:
    assert set(choices("nic_type") or ()) == {
        "e1000",
        "i82551",
        "i82559er",
        "i82557b",
        "ne2k_isa",
        "ne2k_pci",
        "paravirtual",
        "pcnet",
        "rtl8139",
    }
    disk_types = {
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
    }
    assert set(choices("disk_type") or ()) == disk_types
    assert set(choices("cdrom_disk_type") or ()) == disk_types | {""}


def test_layers_merge_instance_over_node_over_builtin() -> None:
    hv = resolve_hvparams(
        {"boot_order": "cdrom", "serial_speed": 9600},
        {"boot_order": "network", "acpi": False},
    )
    assert hv.boot_order == "network"
    assert hv.serial_speed == 9600
    assert hv.acpi is False
    assert hv.disk_cache == "default"


@pytest.mark.parametrize(
    ("node", "instance", "path"),
    [
        ({}, {"foo": 1}, "spec.hvparams.foo"),
        ({"foo": 1}, {}, "hvparams.foo"),
    ],
)
def test_unknown_parameter_is_named(
    node: dict[str, Any], instance: dict[str, Any], path: str
) -> None:
    with pytest.raises(InvalidParams) as caught:
        resolve_hvparams(node, instance)
    assert caught.value.path == path
    assert str(caught.value) == f"{path}: unknown hypervisor parameter"


def test_bad_value_set_member_names_the_choices() -> None:
    with pytest.raises(InvalidParams) as caught:
        resolve_hvparams({}, {"boot_order": "usb"})
    assert str(caught.value) == (
        "spec.hvparams.boot_order: 'usb' is not one of 'cdrom', 'disk', 'floppy', 'network'"
    )
    assert caught.value.code == -32602
    assert isinstance(caught.value, InvalidConfigError)


@pytest.mark.parametrize(
    ("node", "instance", "path"),
    [
        ({"serial_speed": 9600}, {"serial_speed": "fast"}, "spec.hvparams.serial_speed"),
        ({"serial_speed": "fast"}, {}, "hvparams.serial_speed"),
        ({"serial_speed": "fast"}, {"serial_speed": 9600}, None),
        ({}, {"acpi": "yes"}, "spec.hvparams.acpi"),
        ({}, {"migration_port": 0}, "spec.hvparams.migration_port"),
        ({}, {"migration_port": 65535}, "spec.hvparams.migration_port"),
        ({}, {"virtio_net_queues": 9}, "spec.hvparams.virtio_net_queues"),
        ({}, {"virtio_net_queues": 0}, "spec.hvparams.virtio_net_queues"),
        ({}, {"kvm_pci_reservations": 33}, "spec.hvparams.kvm_pci_reservations"),
        ({}, {"cpu_cores": -1}, "spec.hvparams.cpu_cores"),
        ({}, {"migration_downtime": -1}, "spec.hvparams.migration_downtime"),
        ({}, {"spice_ip_version": 5}, "spec.hvparams.spice_ip_version"),
    ],
)
def test_bad_values_are_blamed_on_the_layer_that_set_them(
    node: dict[str, Any], instance: dict[str, Any], path: str | None
) -> None:
    if path is None:
        assert resolve_hvparams(node, instance).serial_speed == 9600
        return
    with pytest.raises(InvalidParams) as caught:
        resolve_hvparams(node, instance)
    assert caught.value.path == path


def test_range_limits_are_accepted() -> None:
    hv = resolve_hvparams(
        {},
        {
            "migration_port": 65534,
            "virtio_net_queues": 8,
            "kvm_pci_reservations": 32,
            "migration_bandwidth": 0,
        },
    )
    assert (hv.migration_port, hv.virtio_net_queues, hv.kvm_pci_reservations) == (65534, 8, 32)


@pytest.mark.parametrize(
    ("mask", "parsed"),
    [
        ("all", [None]),
        ("", []),
        ("0", [frozenset({0})]),
        ("0-2,4:all:1,3", [frozenset({0, 1, 2, 4}), None, frozenset({1, 3})]),
        ("3-3", [frozenset({3})]),
    ],
)
def test_parse_cpu_mask(mask: str, parsed: list[CpuSet]) -> None:
    assert parse_cpu_mask(mask) == parsed


@pytest.mark.parametrize(
    ("mask", "reason"),
    [
        ("3-1", "range '3-1' runs backwards"),
        ("a", "'a' is not a CPU number or range (like 0-2)"),
        ("1,", "'' is not a CPU number or range (like 0-2)"),
        ("0-", "'0-' is not a CPU number or range (like 0-2)"),
        ("0::1", "'' is not a CPU number or range (like 0-2)"),
        ("-1", "'-1' is not a CPU number or range (like 0-2)"),
        ("ALL", "'ALL' is not a CPU number or range (like 0-2)"),
        ("\u00b2", "'\u00b2' is not a CPU number or range (like 0-2)"),
    ],
)
def test_parse_cpu_mask_rejects(mask: str, reason: str) -> None:
    with pytest.raises(ValueError, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        parse_cpu_mask(mask)


def test_format_cpu_mask_is_canonical() -> None:
    assert format_cpu_mask(parse_cpu_mask("4,0-2,1:all:7,5,6")) == "0-2,4:all:5-7"


cpu_sets = st.one_of(st.none(), st.frozensets(st.integers(0, 127), min_size=1, max_size=20))


@given(st.lists(cpu_sets, min_size=1, max_size=8))
def test_cpu_mask_round_trips(entries: list[CpuSet]) -> None:
    text = format_cpu_mask(entries)
    assert parse_cpu_mask(text) == entries
    assert format_cpu_mask(parse_cpu_mask(text)) == text


def test_urls_are_recognised() -> None:
    assert is_url("https://example.org/x.iso")
    assert is_url("ftp://example.org/x.iso")
    assert not is_url("/srv/x.iso")
    assert not is_url("file.iso")


def test_every_parameter_is_documented() -> None:
    docs = parameter_docs()
    assert [doc.name for doc in docs] == list(PARAMETER_NAMES)
    for doc in docs:
        assert doc.description.endswith("."), doc.name
        assert doc.default == getattr(HvParams(), doc.name)
        assert doc.ganeti_default == GANETI_DEFAULTS[doc.name]
    by_name = {doc.name: doc for doc in docs}
    assert by_name["virtio_net_queues"].minimum == 1
    assert by_name["virtio_net_queues"].maximum == 8
    assert by_name["boot_order"].type == "str"
    assert by_name["spice_ip_version"].type == "int"


def test_markdown_table_has_one_row_per_parameter() -> None:
    lines = render_markdown_table().splitlines()
    assert lines[0] == "| parameter | default | values | meaning |"
    rows = lines[2:]
    assert len(rows) == 65
    kvm_path = next(row for row in rows if row.startswith("| `kvm_path` |"))
    assert '`"/usr/bin/qemu-system-x86_64"`' in kvm_path
    assert '(Ganeti: `"/usr/bin/kvm"`)' in kvm_path
    boot = next(row for row in rows if row.startswith("| `boot_order` |"))
    assert '`"cdrom"`, `"disk"`, `"floppy"`, `"network"`' in boot
    queues = next(row for row in rows if row.startswith("| `virtio_net_queues` |"))
    assert "int 1..8" in queues
    speed = next(row for row in rows if row.startswith("| `serial_speed` |"))
    assert "38400, 57600, 115200" in speed
