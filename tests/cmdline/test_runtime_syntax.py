"""A runtime record that is not even JSON: the file and the byte msgspec stopped at are
named (a field path exists only for records that parse; see test_runtime.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.qemu.runtime import RuntimeRecordError, decode_record, encode_record, load_record

from .test_runtime import make_record


def test_a_truncated_record_names_the_file(tmp_path: Path) -> None:
    text = encode_record(make_record())
    path = tmp_path / "runtime.json"
    path.write_text(text[: text.index('"mac":', text.index('"argv":')) + len('"mac":"52:54')])
    with pytest.raises(RuntimeRecordError) as caught:
        load_record(path)
    assert str(caught.value) == f"{path}: not valid JSON: Input data was truncated"
    assert caught.value.data == {
        "path": str(path),
        "reason": "not valid JSON: Input data was truncated",
        "file": str(path),
        "field": "",
    }


def test_a_stray_byte_is_located() -> None:
    text = encode_record(make_record())
    at = text.index('"readonly"', text.index('"disks":['))
    with pytest.raises(RuntimeRecordError) as caught:
        decode_record(text[:at] + "\x00" + text[at:], source="/run/vm1/runtime.json")
    assert caught.value.path == "/run/vm1/runtime.json"
    assert caught.value.reason.startswith("not valid JSON: JSON is malformed: ")
    assert caught.value.reason.endswith(f" (byte {at})")
    assert caught.value.data["field"] == ""
