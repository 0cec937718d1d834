"""Tap names and routing table names: pure functions, no namespace needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.model.errors import NetworkError
from supervisor.net.routed import routing_table
from supervisor.net.tun import MAX_NICS, tap_name

STATE_DIR = "/var/lib/kvm-supervisor"


def test_tap_names_are_short_stable_and_distinct() -> None:
    first = "00000000-0000-4000-8000-000000000001"
    second = "00000000-0000-4000-8000-000000000002"
    names = {
        tap_name(uuid, index, state_dir=STATE_DIR)
        for uuid in (first, second)
        for index in range(MAX_NICS)
    }
    assert len(names) == 2 * MAX_NICS
    assert max(len(name.encode()) for name in names) == 15
    assert all(name.startswith("kvs") for name in names)
    assert tap_name(first, 0, state_dir=STATE_DIR) == tap_name(
        first.upper(), 0, state_dir=STATE_DIR
    )
    # Sequential uuids share no prefix in their names: the names hash the whole uuid.
    assert (
        tap_name(first, 0, state_dir=STATE_DIR)[:5] != tap_name(second, 0, state_dir=STATE_DIR)[:5]
    )
    with pytest.raises(ValueError, match="NIC index 100"):
        tap_name(first, MAX_NICS, state_dir=STATE_DIR)


def test_two_daemons_name_the_taps_of_one_instance_apart() -> None:
    """A migration's source and target daemons on one host (one network namespace) run
    the same instance at once: each daemon's taps are its own, named after its state dir,
    and stay so across its restarts (the same state dir, the same names)."""
    instance = "00000000-0000-4000-8000-000000000001"
    source = [tap_name(instance, index, state_dir="/srv/a") for index in range(MAX_NICS)]
    target = [tap_name(instance, index, state_dir="/srv/b") for index in range(MAX_NICS)]
    assert not set(source) & set(target)
    assert source == [tap_name(instance, index, state_dir="/srv/a") for index in range(MAX_NICS)]


def test_routing_tables_by_number_or_name(tmp_path: Path) -> None:
    tables = tmp_path / "rt_tables"
    tables.write_text("255\tlocal\n254\tmain\n# comment\n100 guests # ours\n")
    assert routing_table(None, tables) == 254
    assert routing_table("42", tables) == 42
    assert routing_table("guests", tables) == 100
    with pytest.raises(NetworkError) as caught:
        routing_table("nosuch", tables)
    assert caught.value.data["interface"] == "nosuch"
