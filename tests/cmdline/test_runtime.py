"""The runtime record: round trips, atomic writes, and every way a record can be unusable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from supervisor.host.statedir import StateDir
from supervisor.model.hvparams import resolve_hvparams
from supervisor.model.spec import assign_macs, decode_spec
from supervisor.qemu.accel import Accelerator
from supervisor.qemu.cmdline import LaunchResources, build_command_line
from supervisor.qemu.runtime import (
    RECORD_VERSION,
    RuntimeRecord,
    RuntimeRecordError,
    decode_record,
    encode_record,
    load_record,
    save_record,
)

from . import GANETI, modern_caps

UUID = "3d1f0c9e-8b7a-4c6d-9e5f-1a2b3c4d5e6f"


def make_record(state_dir: Path = Path("/var/lib/kvm-supervisor")) -> RuntimeRecord:
    spec = assign_macs(
        decode_spec(
            {
                "name": "vm1",
                "uuid": UUID,
                "disks": [{"path": "/srv/vm1.img"}],
                "nics": [{"link": "br0"}],
                "hvparams": {"vnc_bind_address": "0.0.0.0"},
            }
        )
    )
    hv = resolve_hvparams({}, spec.hvparams)
    caps = modern_caps()
    paths = StateDir(state_dir).instance("vm1")
    command = build_command_line(
        spec, hv, caps, paths, Accelerator.TCG, resources=LaunchResources(display_port=5901)
    )
    record = RuntimeRecord.for_start(spec, hv, command, caps, paths)
    return msgspec.structs.replace(record, started_at=1_700_000_000.5, pid=4242)


def test_string_round_trip() -> None:
    record = make_record()
    text = encode_record(record)
    assert json.loads(text)["version"] == RECORD_VERSION
    assert decode_record(text) == record
    assert decode_record(text.encode()) == record


def test_save_and_load(tmp_path: Path) -> None:
    record = make_record(tmp_path)
    path = tmp_path / "runtime.json"
    save_record(path, record)
    assert load_record(path) == record
    assert path.stat().st_mode & 0o777 == 0o640
    replaced = msgspec.structs.replace(record, pid=4343)
    save_record(path, replaced)
    assert load_record(path).pid == 4343
    # The previous version stays in the spare, which the next save writes into.
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [
        ".runtime.json.spare",
        "runtime.json",
    ]


def test_a_failed_save_keeps_the_old_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = make_record(tmp_path)
    path = tmp_path / "runtime.json"
    save_record(path, record)

    def broken_fchmod(fd: int, mode: int) -> None:  # fails once the new data is written
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fchmod", broken_fchmod)
    with pytest.raises(OSError, match="Input/output error"):
        save_record(path, msgspec.structs.replace(record, pid=1))
    monkeypatch.undo()
    assert load_record(path) == record


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_record(tmp_path / "runtime.json")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeRecordError) as caught:
        load_record(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read: Is a directory"
    assert caught.value.data["file"] == str(tmp_path)


def _error(text: str | bytes, source: str = "/run/vm1/runtime.json") -> RuntimeRecordError:
    with pytest.raises(RuntimeRecordError) as caught:
        decode_record(text, source=source)
    return caught.value


def test_ganeti_runtime_is_refused_with_the_reason() -> None:
    error = _error((GANETI / "kvm_runtime.json").read_text())
    message = str(error)
    assert message.startswith("/run/vm1/runtime.json: this is a Ganeti KVM runtime file")
    assert "cannot be converted" in message
    assert "/var/run/ganeti" in message and "uuid" in message
    assert error.data == {
        "path": "/run/vm1/runtime.json",
        "reason": error.reason,
        "file": "/run/vm1/runtime.json",
        "field": "",
    }
    # A list that is not Ganeti's layout is just not a record.
    assert _error("[1, 2]").reason == "a runtime record is a JSON object, not a list"
    assert _error("42").reason == "a runtime record is a JSON object, not int"


def test_future_and_unknown_versions() -> None:
    record = json.loads(encode_record(make_record()))
    record["version"] = RECORD_VERSION + 1
    record["a_field_from_the_future"] = True
    error = _error(json.dumps(record))
    assert error.path == "/run/vm1/runtime.json: version"
    assert error.reason == (
        f"record version {RECORD_VERSION + 1} was written by a newer kvm-supervisor;"
        f" this one reads version {RECORD_VERSION}"
    )
    record["version"] = 0
    assert _error(json.dumps(record)).reason == (
        f"unknown record version 0 (this one reads {RECORD_VERSION})"
    )
    del record["version"]
    assert _error(json.dumps(record)).reason == "missing: this is not a runtime record"
    record["version"] = "one"
    assert str(_error(json.dumps(record))) == (
        "/run/vm1/runtime.json: version: Expected `int | null`, got `str`"
    )


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"pid": "4242"}, "pid", "Expected `int | null`, got `str`"),
        ({"argv": "qemu"}, "argv", "Expected `array`, got `str`"),
        ({"spec": {"name": "vm1", "vcpus": 0}}, "spec.vcpus", "Expected `int` >= 1"),
        ({"hvparams": {"boot_order": "usb"}}, "hvparams.boot_order", "Invalid enum value 'usb'"),
        ({"surprise": 1}, "", "Object contains unknown field `surprise`"),
    ],
)
def test_wrong_fields_are_named(change: dict[str, Any], field: str, reason: str) -> None:
    record = json.loads(encode_record(make_record()))
    record.update(change)
    error = _error(json.dumps(record))
    assert (error.data["field"], error.reason) == (field, reason)


def test_a_bad_nested_field_is_named() -> None:
    record = json.loads(encode_record(make_record()))
    record["nics"][0]["mac"] = 7
    error = _error(json.dumps(record))
    assert str(error) == "/run/vm1/runtime.json: nics[0].mac: Expected `str`, got `int`"


def test_spec_must_match_the_record() -> None:
    record = json.loads(encode_record(make_record()))
    record["name"] = "vm2"
    assert str(_error(json.dumps(record))) == (
        "/run/vm1/runtime.json: spec: name and uuid differ from the record's"
    )


def test_empty_file_names_the_file() -> None:
    error = _error("")
    assert error.path == "/run/vm1/runtime.json"
    assert error.reason.startswith("not valid JSON")
