"""Ganeti's uid pool (``security_model = "pool"``): one user id per instance, leased on disk.

A lease is a file ``<lease_dir>/<uid>`` holding the owner (the instance name) as JSON. A
uid is free when no lease names it and no process runs with it as its real, effective,
saved or filesystem uid (Ganeti asks ``pgrep -u``; we read ``/proc/*/status``). Leases
outlive the daemon, so after a crash `UidPool.recover` releases those whose instance no
longer runs.

Every lease operation holds an exclusive ``flock`` on ``<lease_dir>/.lock``, so pools on the
same directory (in this process or another) never hand out one uid twice. ``flock`` rather
than ``fcntl.lockf``: a POSIX record lock belongs to the process, so two pools in one
process would not exclude each other, and closing any descriptor of the file would drop it.
The operations are synchronous and short: a scan of the process table and a few small files.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Final

import msgspec

from supervisor.log import get_logger
from supervisor.model.config import check_uid_range
from supervisor.model.errors import InvalidConfigError

__all__ = [
    "UidLease",
    "UidPool",
    "UidPoolExhausted",
    "uids_in_use",
]

_log = get_logger(__name__)


class UidLease(msgspec.Struct, frozen=True, kw_only=True):
    """A uid leased to `owner` (an instance name; empty for an unreadable lease file)."""

    uid: int
    owner: str


_LEASE_DECODER: Final = msgspec.json.Decoder(UidLease)
_LEASE_ENCODER: Final = msgspec.json.Encoder()


class UidPoolExhausted(InvalidConfigError):
    """Every uid of the pool is leased or used by a running process (path ``uid_pool``)."""

    def __init__(self, reason: str) -> None:
        super().__init__("uid_pool", reason)


def uids_in_use() -> set[int]:
    """Every real, effective, saved and filesystem uid of the running processes."""
    used: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as status:
                lines = status.read().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process exited during the scan
        for line in lines:
            if line.startswith(b"Uid:"):
                used.update(int(uid) for uid in line.split()[1:])
                break
    return used


class UidPool:
    """The uids of `ranges` (inclusive ``(first, last)`` pairs), leased in `lease_dir`."""

    def __init__(self, lease_dir: Path, ranges: Iterable[tuple[int, int]]) -> None:
        self.lease_dir = lease_dir
        self.ranges = sorted(ranges)
        for first, last in self.ranges:
            check_uid_range(first, last)

    def __repr__(self) -> str:
        return f"<UidPool {self.describe()} in {self.lease_dir}>"

    def describe(self) -> str:
        """The pool in Ganeti's syntax, e.g. ``5000-5099, 6000``."""
        return ", ".join(
            str(first) if first == last else f"{first}-{last}" for first, last in self.ranges
        )

    def _uids(self) -> Iterator[int]:
        return itertools.chain.from_iterable(range(first, last + 1) for first, last in self.ranges)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.lease_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lease_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # Blocks only while another pool on this directory is in one of these methods.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_leases(self) -> dict[int, UidLease]:
        leases: dict[int, UidLease] = {}
        for entry in os.scandir(self.lease_dir):
            if not entry.name.isdigit():
                continue
            uid = int(entry.name)
            try:
                with open(entry.path, "rb") as lease_file:
                    lease = _LEASE_DECODER.decode(lease_file.read())
            except (msgspec.DecodeError, UnicodeDecodeError):
                _log.warning("unreadable uid lease", path=entry.path)
                lease = UidLease(uid=uid, owner="")
            leases[uid] = UidLease(uid=uid, owner=lease.owner)
        return leases

    def _write_lease(self, lease: UidLease) -> None:
        temporary = self.lease_dir / f".{lease.uid}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, _LEASE_ENCODER.encode(lease))
            os.fsync(fd)
        finally:
            os.close(fd)
        temporary.rename(self.lease_dir / str(lease.uid))

    def request(self, owner: str, *, uid: int | None = None) -> UidLease:
        """Lease the lowest free uid of the pool (or exactly `uid`) to `owner`.

        An owner holds at most one lease: asking again returns the one it holds. Raises
        `UidPoolExhausted` when no uid is free (or `uid` is not).
        """
        with self._locked():
            leases = self._read_leases()
            for lease in leases.values():
                if lease.owner == owner and uid in (None, lease.uid):
                    return lease
            taken = leases.keys() | uids_in_use()
            if uid is not None:
                if uid in taken or not self._in_pool(uid):
                    raise UidPoolExhausted(f"uid {uid} is not free in the pool {self.describe()}")
                lease = UidLease(uid=uid, owner=owner)
                self._write_lease(lease)
                return lease
            lease = UidLease(uid=self._lowest_free(leases, taken), owner=owner)
            self._write_lease(lease)
        _log.debug("uid leased", uid=lease.uid, instance=owner)
        return lease

    def first_free(self) -> int:
        """The uid `request` would lease to a new owner now, without leasing it.

        Raises `UidPoolExhausted` when no uid is free.
        """
        with self._locked():
            leases = self._read_leases()
            return self._lowest_free(leases, leases.keys() | uids_in_use())

    def _lowest_free(self, leases: Mapping[int, UidLease], taken: Collection[int]) -> int:
        for uid in self._uids():
            if uid not in taken:
                return uid
        in_pool = sum(last - first + 1 for first, last in self.ranges)
        leased = sum(1 for uid in leases if self._in_pool(uid))
        raise UidPoolExhausted(
            f"no free uid in the pool {self.describe() or '(empty)'}: {leased} of {in_pool} "
            "leased, the others used by running processes"
        )

    def _in_pool(self, uid: int) -> bool:
        return any(first <= uid <= last for first, last in self.ranges)

    def release(self, uid: int, *, owner: str | None = None) -> bool:
        """Release the lease of `uid`; returns whether there was one to release.

        With `owner`, a lease that now belongs to someone else is left alone.
        """
        with self._locked():
            lease = self._read_leases().get(uid)
            if lease is None:
                return False
            if owner is not None and lease.owner != owner:
                _log.warning("uid lease held by another owner", uid=uid, owner=lease.owner)
                return False
            (self.lease_dir / str(uid)).unlink()
        _log.debug("uid released", uid=uid, instance=lease.owner)
        return True

    def leases(self) -> list[UidLease]:
        """Every lease, by uid."""
        with self._locked():
            return sorted(self._read_leases().values(), key=lambda lease: lease.uid)

    def recover(self, live_owners: Collection[str]) -> list[UidLease]:
        """Release the leases whose owner is not in `live_owners`; returns them.

        For the daemon's start-up: `live_owners` are the instances whose QEMU still runs.
        """
        released: list[UidLease] = []
        with self._locked():
            for uid, lease in sorted(self._read_leases().items()):
                if lease.owner not in live_owners:
                    (self.lease_dir / str(uid)).unlink()
                    released.append(lease)
        for lease in released:
            _log.info("stale uid lease released", uid=lease.uid, instance=lease.owner)
        return released
