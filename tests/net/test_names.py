"""Tap names and routing table names: pure functions, no namespace needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.model.errors import NetworkError
from supervisor.net.routed import routing_table
from supervisor.net.tun import MAX_NICS, tap_name


def test_tap_names_are_short_stable_and_distinct() -> None:
    first = "00000000-0000-4000-8000-000000000001"
    second = "00000000-0000-4000-8000-000000000002"
    names = {tap_name(uuid, index) for uuid in (first, second) for index in range(MAX_NICS)}
    assert len(names) == 2 * MAX_NICS
    assert max(len(name.encode()) for name in names) == 15
    assert tap_name(first, 0) == tap_name(first.upper(), 0)
    # Sequential uuids share no prefix in their names: the names hash the whole uuid.
    assert tap_name(first, 0)[:5] != tap_name(second, 0)[:5]
    with pytest.raises(ValueError, match="NIC index 100"):
        tap_name(first, MAX_NICS)


def test_routing_tables_by_number_or_name(tmp_path: Path) -> None:
    tables = tmp_path / "rt_tables"
    tables.write_text("255\tlocal\n254\tmain\n# comment\n100 guests # ours\n")
    assert routing_table(None, tables) == 254
    assert routing_table("42", tables) == 42
    assert routing_table("guests", tables) == 100
    with pytest.raises(NetworkError) as caught:
        routing_table("nosuch", tables)
    assert caught.value.data["interface"] == "nosuch"
