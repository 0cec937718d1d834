"""The migration benchmark's round orders: each way first, and after each other way,
equally often over the rounds it runs (so no way always follows the same one)."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest
from bench_migration import ROUNDS_LIMITED, ROUNDS_UNLIMITED, WAYS, balanced_orders


def without(*left_out: str) -> tuple[str, ...]:
    return tuple(way for way in WAYS if way not in left_out)


# The default run, `--no-libvirt`, `--no-libvirt --control` (4, 3 and 4 ways).
@pytest.mark.parametrize(
    "ways", [without("bare_again"), without("bare_again", "libvirt"), without("libvirt")]
)
@pytest.mark.parametrize("rounds", [ROUNDS_LIMITED, ROUNDS_UNLIMITED])
def test_every_way_leads_and_follows_every_other_equally_often(
    ways: tuple[str, ...], rounds: int
) -> None:
    orders = balanced_orders(ways)
    assert all(sorted(order) == sorted(ways) for order in orders)
    run = [orders[index % len(orders)] for index in range(rounds)]
    firsts = Counter(order[0] for order in run)
    pairs = Counter(pair for order in run for pair in pairwise(order))
    assert set(firsts.values()) == {rounds // len(ways)}
    assert len(pairs) == len(ways) * (len(ways) - 1)
    assert len(set(pairs.values())) == 1
