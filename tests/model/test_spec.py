"""InstanceSpec decoding, uuid generation and MAC derivation."""

from __future__ import annotations

import re
import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.model.errors import InvalidParams
from supervisor.model.spec import (
    MAC_PATTERN,
    NIC,
    InstanceSpec,
    assign_macs,
    decode_spec,
    ensure_uuid,
    generated_mac,
)

UUID = "6f1c2b9e-4d3a-4e8f-9a51-0c7d2e4b8a13"


def test_defaults_are_the_apis() -> None:
    spec = decode_spec({"name": "vm1"})
    assert spec.memory_mib == 128
    assert spec.vcpus == 1
    assert spec.restart == "never"
    assert spec.autostart is False
    assert spec.uuid is None
    assert spec.startup_memory_mib is None
    assert spec.network_port is None
    assert (spec.disks, spec.nics, spec.tags, spec.hvparams) == ([], [], [], {})


def test_full_spec_decodes() -> None:
    spec = decode_spec(
        {
            "name": "web-1.example",
            "uuid": UUID,
            "memory_mib": 512,
            "startup_memory_mib": 256,
            "vcpus": 2,
            "disks": [{"path": "/d/root.img"}, {"path": "/d/data", "mode": "ro", "format": "raw"}],
            "nics": [
                {"mode": "routed", "ip": "192.0.2.1"},
                {"mac": "52:54:00:aa:bb:cc", "link": "br0", "vlan": 7, "mtu": 9000},
            ],
            "tags": ["a"],
            "network_port": 5901,
            "autostart": True,
            "restart": "on-crash",
            "hvparams": {"boot_order": "cdrom", "anything": [1, 2]},
        }
    )
    assert spec.disks[0].mode == "rw"
    assert spec.disks[0].format is None
    assert spec.disks[1].format == "raw"
    assert spec.nics[1].mode == "bridged"
    assert spec.nics[1].vlan == 7
    # hvparams stays free-form until resolve_hvparams looks at it.
    assert spec.hvparams["anything"] == [1, 2]


@pytest.mark.parametrize("name", ["a", "A0", "web-1.example_2", "x" * 63, "0"])
def test_good_names(name: str) -> None:
    assert decode_spec({"name": name}).name == name


@pytest.mark.parametrize("name", ["../x", "a/b", "", "-x", ".hidden", "_x", "x" * 64, "a b", "é"])
def test_bad_names_are_decode_errors_naming_name(name: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        decode_spec({"name": name})
    assert caught.value.path == "spec.name"
    assert caught.value.code == -32602
    assert caught.value.data == {"path": "spec.name", "reason": caught.value.reason}


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        ({}, "spec.name", "missing required field"),
        ({"name": "x", "foo": 1}, "spec.foo", "unknown field"),
        ({"name": "x", "disks": [{"path": "/a", "foo": 1}]}, "spec.disks[0].foo", "unknown field"),
        ({"name": "x", "disks": [{}]}, "spec.disks[0].path", "missing required field"),
        (
            {"name": "x", "nics": [{}, {"mac": "52:54:00:zz:00:00"}]},
            "spec.nics[1].mac",
            "Expected `str` matching regex '^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$(?!\\n)'",
        ),
        (
            {"name": "x", "nics": [{}, {"mtu": "big"}]},
            "spec.nics[1].mtu",
            "Expected `int | null`, got `str`",
        ),
        ({"name": "x", "nics": [{"mode": "nat"}]}, "spec.nics[0].mode", "Invalid enum value 'nat'"),
        ({"name": "x", "disks": [{"path": "/a", "mode": "wo"}]}, "spec.disks[0].mode", None),
        ({"name": "x", "disks": [{"path": "/a", "format": "vmdk"}]}, "spec.disks[0].format", None),
        ({"name": "x", "disks": [{"path": ""}]}, "spec.disks[0].path", None),
        ({"name": "x", "uuid": "not-a-uuid"}, "spec.uuid", None),
        ({"name": "x", "memory_mib": 16}, "spec.memory_mib", "Expected `int` >= 32"),
        ({"name": "x", "memory_mib": 2**20 + 1}, "spec.memory_mib", None),
        ({"name": "x", "startup_memory_mib": 8}, "spec.startup_memory_mib", None),
        ({"name": "x", "vcpus": 0}, "spec.vcpus", "Expected `int` >= 1"),
        ({"name": "x", "vcpus": 256}, "spec.vcpus", "Expected `int` <= 255"),
        ({"name": "x", "network_port": 0}, "spec.network_port", None),
        ({"name": "x", "restart": "always"}, "spec.restart", None),
        ({"name": "x", "nics": [{"vlan": 4095}]}, "spec.nics[0].vlan", None),
        ({"name": "x", "nics": [{"link": "x" * 16}]}, "spec.nics[0].link", None),
        ({"name": "x", "tags": "web"}, "spec.tags", "Expected `array`, got `str`"),
        ({"name": "x", "hvparams": []}, "spec.hvparams", "Expected `object`, got `array`"),
        ([], "spec", "Expected `object`, got `array`"),
    ],
)
def test_decode_errors_name_the_field(spec: Any, path: str, reason: str | None) -> None:
    with pytest.raises(InvalidParams) as caught:
        decode_spec(spec)
    assert caught.value.path == path
    if reason is not None:
        assert caught.value.reason == reason
        assert str(caught.value) == f"{path}: {reason}"


def test_decode_root_is_configurable() -> None:
    with pytest.raises(InvalidParams) as caught:
        decode_spec({"name": "x", "vcpus": "2"}, root="params.spec")
    assert caught.value.path == "params.spec.vcpus"


def test_ensure_uuid_keeps_an_existing_one() -> None:
    spec = decode_spec({"name": "x", "uuid": UUID})
    assert ensure_uuid(spec) is spec


def test_ensure_uuid_generates_a_fresh_one() -> None:
    spec = decode_spec({"name": "x"})
    first, second = ensure_uuid(spec), ensure_uuid(spec)
    assert first.uuid is not None
    assert second.uuid is not None
    assert first.uuid != second.uuid
    assert str(uuid.UUID(first.uuid)) == first.uuid
    # The generated uuid passes the spec's own pattern.
    assert decode_spec(msgspec.to_builtins(first)).uuid == first.uuid


def test_generated_mac_is_deterministic_local_unicast() -> None:
    mac = generated_mac(UUID, 0)
    assert mac == generated_mac(UUID, 0)
    assert mac == generated_mac(UUID.upper(), 0)
    assert mac.startswith("52:54:00:")
    assert re.fullmatch(MAC_PATTERN, mac)
    first_octet = int(mac[:2], 16)
    assert first_octet & 0b10  # locally administered
    assert not first_octet & 0b01  # unicast
    assert generated_mac(UUID, 1) != mac
    assert generated_mac(UUID, 0, attempt=1) != mac
    assert generated_mac(str(uuid.uuid4()), 0) != mac


def test_assign_macs_fills_in_missing_macs_only() -> None:
    spec = decode_spec({"name": "x", "uuid": UUID, "nics": [{}, {"mac": "52:54:00:AA:BB:CC"}, {}]})
    macs = [nic.mac for nic in assign_macs(spec).nics]
    assert macs == [generated_mac(UUID, 0), "52:54:00:aa:bb:cc", generated_mac(UUID, 2)]
    assert assign_macs(assign_macs(spec)) == assign_macs(spec)


def test_assign_macs_steps_around_a_clash() -> None:
    clash = generated_mac(UUID, 1)
    spec = decode_spec({"name": "x", "uuid": UUID, "nics": [{"mac": clash}, {}]})
    macs = [nic.mac for nic in assign_macs(spec).nics]
    assert macs == [clash, generated_mac(UUID, 1, attempt=1)]


def test_assign_macs_needs_a_uuid() -> None:
    with pytest.raises(ValueError, match="instance 'x' has no uuid"):
        assign_macs(decode_spec({"name": "x", "nics": [{}]}))


@given(st.uuids(), st.integers(min_value=0, max_value=16))
def test_assigned_macs_are_distinct_valid_unicast(instance_uuid: uuid.UUID, count: int) -> None:
    spec = InstanceSpec(name="x", uuid=str(instance_uuid), nics=[NIC() for _ in range(count)])
    macs = [nic.mac for nic in assign_macs(spec).nics]
    assert len(set(macs)) == count
    for mac in macs:
        assert mac is not None
        assert re.fullmatch(MAC_PATTERN, mac)
        assert not int(mac[:2], 16) & 1
