"""Daemon config and instance files: defaults, unknown keys, types, relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.model.config import (
    Config,
    check_config,
    instance_file,
    instance_files,
    load_config,
    load_instance_file,
)
from supervisor.model.errors import InvalidConfigError, InvalidParams
from supervisor.model.hvparams import resolve_hvparams
from supervisor.model.validation import check_syntax

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "config" / "supervisor.toml"
SHIPPED_INSTANCES = REPO / "config" / "instances"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_no_file_means_builtin_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.state_dir == "/var/lib/kvm-supervisor"
    assert config.instances_dir == "/etc/kvm-supervisor/instances"
    assert config.control_group == "root"
    assert config.max_request_bytes == 1024 * 1024
    assert config.shutdown_on_exit is False
    assert config.stop_timeout_s == 120
    assert config.uid_pool == []
    assert config.display_port_range == (5900, 6899)
    assert config.hvparams == {}
    assert config.control_socket == Path("/var/lib/kvm-supervisor/control.sock")


def test_a_file_with_only_state_dir_is_complete(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "c.toml", 'state_dir = "/x"\n'))
    assert config == Config(state_dir="/x")
    assert config.control_socket == Path("/x/control.sock")


def test_an_empty_file_is_complete(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "c.toml", "")) == Config()


@pytest.mark.parametrize(
    ("text", "path", "reason"),
    [
        ("stat_dir = '/x'\n", "stat_dir", "unknown field"),
        ("max_request_bytes = '1M'\n", "max_request_bytes", "Expected `int`, got `str`"),
        ("max_request_bytes = 10\n", "max_request_bytes", "Expected `int` >= 4096"),
        ("shutdown_on_exit = 1\n", "shutdown_on_exit", "Expected `bool`, got `int`"),
        ("stop_timeout_s = 0\n", "stop_timeout_s", "Expected `float` > 0.0"),
        ("control_group = ''\n", "control_group", None),
        ("uid_pool = ['5000-', '1']\n", "uid_pool[0]", None),
        ("uid_pool = '5000-5099'\n", "uid_pool", "Expected `array`, got `str`"),
        ("display_port_range = [0, 10]\n", "display_port_range[0]", "Expected `int` >= 1"),
        ("display_port_range = [1]\n", "display_port_range", None),
        ("event_queue_size = 0\n", "event_queue_size", None),
        ("[hvparams]\nfoo = 1\n", "hvparams.foo", "unknown hypervisor parameter"),
        (
            "[hvparams]\nboot_order = 'usb'\n",
            "hvparams.boot_order",
            "'usb' is not one of 'cdrom', 'disk', 'floppy', 'network'",
        ),
        ("[hvparams]\nacpi = 'yes'\n", "hvparams.acpi", "Expected `bool`, got `str`"),
        ("[extra]\nx = 1\n", "extra", "unknown field"),
    ],
)
def test_bad_keys_and_values_are_named(
    tmp_path: Path, text: str, path: str, reason: str | None
) -> None:
    with pytest.raises(InvalidParams) as caught:
        load_config(write(tmp_path / "c.toml", text))
    assert caught.value.path == path
    if reason is not None:
        assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("text", "path", "reason"),
    [
        ("uid_pool = ['5000', '6000-5999']\n", "uid_pool[1]", "uid range 6000-5999 runs backwards"),
        (
            "uid_pool = ['4294967296']\n",
            "uid_pool[0]",
            "uid range 4294967296-4294967296 goes beyond the largest uid 4294967294",
        ),
        (
            "display_port_range = [6000, 5999]\n",
            "display_port_range",
            "range 6000-5999 runs backwards",
        ),
    ],
)
def test_rules_across_values(tmp_path: Path, text: str, path: str, reason: str) -> None:
    with pytest.raises(InvalidConfigError) as caught:
        load_config(write(tmp_path / "c.toml", text))
    assert not isinstance(caught.value, InvalidParams)
    assert (caught.value.path, caught.value.reason) == (path, reason)
    assert caught.value.code == 7


def test_check_config_checks_hand_built_hvparams() -> None:
    with pytest.raises(InvalidParams, match=r"^hvparams\.nic: unknown hypervisor parameter$"):
        check_config(Config(hvparams={"nic": "e1000"}))


@pytest.mark.parametrize(
    ("config", "path"),
    [
        (Config(uid_pool=["5000", "x"]), "uid_pool[1]"),
        (Config(max_request_bytes=1), "max_request_bytes"),
        (Config(display_port_range=(10, 0)), "display_port_range[1]"),
    ],
)
def test_check_config_decodes_hand_built_configs(config: Config, path: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        check_config(config)
    assert caught.value.path == path


def test_uid_ranges_in_ganeti_syntax(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "c.toml", "uid_pool = ['5000-5099', '6000']\n"))
    assert config.uid_ranges() == [(5000, 5099), (6000, 6000)]


def test_relative_paths_are_resolved_against_the_files_directory(tmp_path: Path) -> None:
    text = """
state_dir = "state"
instances_dir = "../defs"
[hvparams]
kernel_path = "boot/vmlinuz"
cdrom_image_path = "https://example.org/boot.iso"
mem_path = "/dev/hugepages"
keymap = "en-us"
"""
    config = load_config(write(tmp_path / "etc" / "c.toml", text))
    assert config.state_dir == str(tmp_path / "etc" / "state")
    assert config.instances_dir == str(tmp_path / "defs")
    assert config.hvparams["kernel_path"] == str(tmp_path / "etc" / "boot" / "vmlinuz")
    assert config.hvparams["cdrom_image_path"] == "https://example.org/boot.iso"
    assert config.hvparams["mem_path"] == "/dev/hugepages"
    assert config.hvparams["keymap"] == "en-us"


def test_unreadable_and_malformed_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(InvalidConfigError) as caught:
        load_config(missing)
    assert str(caught.value) == f"{missing}: cannot read: No such file or directory"
    broken = write(tmp_path / "broken.toml", "state_dir = \n")
    with pytest.raises(InvalidParams) as caught:
        load_config(broken)
    assert caught.value.path == str(broken)


def test_instance_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    spec = load_instance_file(write(tmp_path / "vm1.toml", "memory_mib = 256\n"))
    assert spec.name == "vm1"
    assert spec.memory_mib == 256


def test_instance_name_must_match_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "vm1.toml", 'name = "vm2"\n')
    with pytest.raises(InvalidParams) as caught:
        load_instance_file(path)
    assert str(caught.value) == "spec.name: 'vm2' does not match the file name 'vm1.toml'"
    assert caught.value.data["file"] == str(path)


def test_instance_file_errors_name_field_and_file(tmp_path: Path) -> None:
    text = "[[nics]]\nlink = 'br0'\n[[nics]]\nmac = 'nope'\n"
    path = write(tmp_path / "vm1.toml", text)
    with pytest.raises(InvalidParams) as caught:
        load_instance_file(path)
    assert caught.value.path == "spec.nics[1].mac"
    assert caught.value.data["file"] == str(path)


def test_instance_file_that_is_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "vm1.toml", "name = \n")
    with pytest.raises(InvalidParams) as caught:
        load_instance_file(path)
    assert caught.value.path == str(path)


def test_instance_paths_are_resolved_against_the_files_directory(tmp_path: Path) -> None:
    text = """
[[disks]]
path = "images/root.img"
[[disks]]
path = "/dev/vg/data"
[hvparams]
kernel_path = "../kernels/vmlinuz"
initrd_path = "initrd.img"
cdrom_image_path = "http://example.org/a.iso"
cdrom2_image_path = "isos/b.iso"
floppy_image_path = "f.img"
vnc_password_file = "secrets/vnc"
spice_password_file = "secrets/spice"
vnc_x509_path = "pki"
mem_path = "hugepages"
kvm_path = "/usr/bin/qemu-system-x86_64"
root_path = "/dev/vda1"
"""
    base = tmp_path / "defs"
    spec = load_instance_file(write(base / "vm1.toml", text))
    assert [disk.path for disk in spec.disks] == [str(base / "images/root.img"), "/dev/vg/data"]
    hv = spec.hvparams
    assert hv["kernel_path"] == str(tmp_path / "kernels" / "vmlinuz")
    assert hv["initrd_path"] == str(base / "initrd.img")
    assert hv["cdrom_image_path"] == "http://example.org/a.iso"
    assert hv["cdrom2_image_path"] == str(base / "isos/b.iso")
    assert hv["floppy_image_path"] == str(base / "f.img")
    assert hv["vnc_password_file"] == str(base / "secrets/vnc")
    assert hv["spice_password_file"] == str(base / "secrets/spice")
    assert hv["vnc_x509_path"] == str(base / "pki")
    assert hv["mem_path"] == str(base / "hugepages")
    assert hv["kvm_path"] == "/usr/bin/qemu-system-x86_64"
    assert hv["root_path"] == "/dev/vda1"


def test_instance_files_are_listed_by_name(tmp_path: Path) -> None:
    write(tmp_path / "b.toml", "")
    write(tmp_path / "a.toml", "")
    write(tmp_path / "notes.txt", "")
    (tmp_path / "dir.toml").mkdir()
    assert instance_files(tmp_path) == [tmp_path / "a.toml", tmp_path / "b.toml"]
    assert instance_files(tmp_path / "missing") == []
    assert instance_file(tmp_path, "a") == tmp_path / "a.toml"


def test_shipped_config_loads() -> None:
    config = load_config(SHIPPED_CONFIG)
    assert config.instances_dir == str(SHIPPED_INSTANCES)
    # Every key is spelt out in the shipped file; one whose default is None (TOML has
    # no null) in a comment.
    text = SHIPPED_CONFIG.read_text()
    for key in Config.__struct_fields__:
        unset = getattr(Config(), key) is None and f"\n# {key} = " in text
        assert f"\n{key} = " in text or f"[{key}]" in text or unset, key
    assert config == Config(instances_dir=str(SHIPPED_INSTANCES))


def test_shipped_instances_load_and_pass_the_syntax_checks() -> None:
    files = instance_files(SHIPPED_INSTANCES)
    assert {path.stem for path in files} >= {"demo", "example-full"}
    node = load_config(SHIPPED_CONFIG).hvparams
    for path in files:
        spec = load_instance_file(path)
        assert check_syntax(spec, resolve_hvparams(node, spec.hvparams)) == [], path


def test_demo_instance_is_the_test_guest() -> None:
    spec = load_instance_file(SHIPPED_INSTANCES / "demo.toml")
    guest = REPO / ".cache" / "guest"
    assert spec.hvparams["kernel_path"] == str(guest / "vmlinuz")
    assert spec.hvparams["initrd_path"] == str(guest / "initrd.img")
    hv = resolve_hvparams({}, spec.hvparams)
    assert hv.serial_console is True
    assert hv.vnc_bind_address == hv.spice_bind == ""
    assert (spec.memory_mib, spec.vcpus, spec.autostart) == (128, 1, True)
    assert spec.nics == []
    assert spec.disks == []


def test_full_example_shows_every_spec_field() -> None:
    text = (SHIPPED_INSTANCES / "example-full.toml").read_text()
    for key in ("name", "uuid", "memory_mib", "startup_memory_mib", "vcpus", "tags"):
        assert f"\n{key} = " in text, key
    for key in ("network_port", "autostart", "restart"):
        assert f"\n{key} = " in text, key
    for table in ("[[disks]]", "[[nics]]", "[hvparams]"):
        assert table in text
    for key in ("mode", "format", "mac", "link", "ip", "vlan", "mtu"):
        assert f"\n{key} = " in text, key
    spec = load_instance_file(SHIPPED_INSTANCES / "example-full.toml")
    assert spec.autostart is False
    assert {nic.mode for nic in spec.nics} == {"bridged", "routed", "openvswitch"}
