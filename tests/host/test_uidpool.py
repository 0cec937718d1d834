"""The uid pool: leases on disk, exhaustion, two pools on one dir, recovery."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.host.uidpool import (
    UidLease,
    UidPool,
    UidPoolExhausted,
    uids_in_use,
)

# High uids no process on a test machine runs as.
BASE = 3_900_000_000


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ([(10, 5)], "runs backwards"),
        ([(0, 5)], "includes root"),
        ([(5, 2**32 - 1)], "beyond the largest uid"),
    ],
)
def test_bad_ranges(tmp_path: Path, ranges: list[tuple[int, int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UidPool(tmp_path, ranges)


def test_request_leases_the_lowest_free_uid_on_disk(tmp_path: Path) -> None:
    lease_dir = tmp_path / "uid-leases"
    pool = UidPool(lease_dir, [(BASE + 10, BASE + 11), (BASE, BASE + 1)])
    assert pool.describe() == f"{BASE}-{BASE + 1}, {BASE + 10}-{BASE + 11}"
    first = pool.request("vm1")
    assert first == UidLease(uid=BASE, owner="vm1")
    assert pool.request("vm2").uid == BASE + 1
    assert pool.request("vm3").uid == BASE + 10
    assert json.loads((lease_dir / str(BASE)).read_text()) == {"uid": BASE, "owner": "vm1"}
    assert (lease_dir / str(BASE)).stat().st_mode & 0o777 == 0o600
    assert lease_dir.stat().st_mode & 0o777 == 0o700
    assert sorted(path.name for path in lease_dir.iterdir()) == [
        ".lock",
        str(BASE),
        str(BASE + 1),
        str(BASE + 10),
    ]


def test_an_owner_holds_one_lease(tmp_path: Path) -> None:
    pool = UidPool(tmp_path, [(BASE, BASE + 5)])
    lease = pool.request("vm1")
    assert pool.request("vm1") == lease
    assert pool.leases() == [lease]


def test_exhaustion(tmp_path: Path) -> None:
    pool = UidPool(tmp_path, [(BASE, BASE + 1)])
    pool.request("vm1")
    pool.request("vm2")
    with pytest.raises(UidPoolExhausted, match=f"{BASE}-{BASE + 1}: 2 of 2 leased"):
        pool.request("vm3")
    with pytest.raises(UidPoolExhausted, match=r"\(empty\)"):
        UidPool(tmp_path, []).request("vm3")


def test_release(tmp_path: Path) -> None:
    pool = UidPool(tmp_path, [(BASE, BASE + 1)])
    first = pool.request("vm1")
    pool.request("vm2")
    assert not pool.release(first.uid, owner="vm2")
    assert pool.release(first.uid, owner="vm1")
    assert not pool.release(first.uid)
    assert pool.request("vm3") == UidLease(uid=first.uid, owner="vm3")
    assert pool.release(first.uid)
    assert [lease.owner for lease in pool.leases()] == ["vm2"]


def test_two_pools_on_one_dir_never_share_a_uid(tmp_path: Path) -> None:
    pools = [UidPool(tmp_path, [(BASE, BASE + 3)]) for _ in range(2)]
    leases = [pools[index % 2].request(f"vm{index}") for index in range(4)]
    assert sorted(lease.uid for lease in leases) == list(range(BASE, BASE + 4))
    with pytest.raises(UidPoolExhausted):
        pools[0].request("vm4")
    assert pools[1].release(leases[0].uid)
    assert pools[0].request("vm4").uid == leases[0].uid


@pytest.fixture
def process_as_pool_uid() -> Iterator[int]:
    """A process running as uid BASE + 1 (killed afterwards)."""
    uid = BASE + 1
    proc = subprocess.Popen(["sleep", "30"], user=uid, group=uid)
    try:
        yield uid
    finally:
        proc.kill()
        proc.wait()


def test_uids_of_running_processes_are_skipped(tmp_path: Path, process_as_pool_uid: int) -> None:
    assert process_as_pool_uid in uids_in_use()
    assert os.getuid() in uids_in_use()
    pool = UidPool(tmp_path, [(BASE, BASE + 2)])
    assert [pool.request(f"vm{index}").uid for index in range(2)] == [BASE, BASE + 2]
    with pytest.raises(UidPoolExhausted, match="2 of 3 leased, the others used by running"):
        pool.request("vm2")


def test_recover_releases_the_leases_of_dead_owners(tmp_path: Path) -> None:
    pool = UidPool(tmp_path, [(BASE, BASE + 9)])
    alive = pool.request("alive")
    pool.request("dead1")
    pool.request("dead2")
    (tmp_path / str(BASE + 5)).write_text("garbage")
    (tmp_path / "not-a-lease").write_text("")
    released = pool.recover({"alive"})
    assert released == [
        UidLease(uid=BASE + 1, owner="dead1"),
        UidLease(uid=BASE + 2, owner="dead2"),
        UidLease(uid=BASE + 5, owner=""),
    ]
    assert pool.leases() == [alive]
    assert (tmp_path / "not-a-lease").exists()


def test_an_unreadable_lease_still_holds_its_uid(tmp_path: Path) -> None:
    pool = UidPool(tmp_path, [(BASE, BASE + 1)])
    tmp_path.joinpath(str(BASE)).write_bytes(b"\xff")
    assert pool.request("vm1").uid == BASE + 1
    assert pool.leases()[0] == UidLease(uid=BASE, owner="")
