"""A migration's progress, from QEMU's ``query-migrate`` answers: no I/O, no clock.

The engine's migration task reads ``query-migrate`` whenever QEMU announces a change
(the ``MIGRATION`` and ``MIGRATION_PASS`` events) and at least every progress
interval, and feeds each answer here with the time it got it. `MigrationProgress`
turns the answers into `MigrationStatus` figures and watches for a stream that stopped
moving: QEMU never times one out (a TCP peer that stops reading leaves it ``active``
for as long as TCP keeps the connection, a quarter of an hour), so the stall guard is
ours.

QEMU's states, as ``query-migrate`` reports them::

    none -> setup -> active -> [pre-switchover] -> device -> completed
                       |  \\-> postcopy-active --------------/
                       |-> cancelling -> cancelled
                       \\-> failed                 (error-desc says why)

The stream is stalled when the bytes QEMU sent (``ram.transferred``) have not grown for
``stall_timeout_s`` while the migration is neither finished nor being cancelled.

A dirty-sync pass (QEMU's ``MIGRATION_PASS`` event) is taken from the event itself
(`MigrationProgress.passed`), without asking QEMU: QEMU sends one for its last pass too,
after it has stopped the guest for the switch-over, while its migration thread holds
the big lock; a ``query-migrate`` then, and the CPU the daemon spends on it and on the
progress event it makes, would lengthen the guest's downtime. The figures of a pass wait
for the next reading (each status change, each progress interval).

QEMU sets a migration ``completed`` (and sends its ``MIGRATION`` event) a moment before
its migration thread, waiting for the big lock, computes ``total-time`` and ``downtime``:
an answer in between reads 0 for both. Such an answer is not the end yet
(`MigrationProgress.figures_pending`): the end is the next one with the figures, or,
should they never come, the one `FIGURES_WAIT_S` later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from supervisor.model.api import MigrationStatus

__all__ = ["FIGURES_WAIT_S", "FINISHED", "MigrationProgress", "parse_query_migrate"]

#: QEMU statuses after which nothing more happens.
FINISHED: Final = frozenset({"completed", "failed", "cancelled"})
#: Statuses in which no byte is expected to move.
_NOT_MOVING: Final = FINISHED | {"none", "cancelling"}
#: How long a completed migration's figures are awaited at most (they take well under a
#: millisecond once QEMU's migration thread gets the big lock, longer on a busy host).
FIGURES_WAIT_S: Final = 1.0

MIB: Final = 1024 * 1024


class _Ram(msgspec.Struct, rename="kebab"):
    total: int = 0
    remaining: int = 0
    transferred: int = 0
    mbps: float | None = None
    dirty_sync_count: int | None = None


class _Xbzrle(msgspec.Struct, rename="kebab"):
    pages: int = 0
    bytes: int = 0
    cache_miss: int = 0


class _QueryMigrate(msgspec.Struct, rename="kebab"):
    """The part of QEMU's MigrationInfo we read (QEMU may add fields: they are ignored)."""

    status: str = "none"
    ram: _Ram | None = None
    xbzrle_cache: _Xbzrle | None = None
    cpu_throttle_percentage: int | None = None
    total_time: int | None = None
    downtime: int | None = None
    expected_downtime: int | None = None
    error_desc: str | None = None


def parse_query_migrate(reply: Mapping[str, Any]) -> tuple[MigrationStatus, int]:
    """The status of a ``query-migrate`` reply, and the bytes sent so far.

    Raises `msgspec.ValidationError` when a field has a type QEMU never sends.
    """
    info = msgspec.convert(reply, _QueryMigrate)
    ram = info.ram or _Ram()
    xbzrle = info.xbzrle_cache
    if info.status == "completed":
        percent = 100.0
    elif ram.total:
        percent = round(100.0 * (ram.total - ram.remaining) / ram.total, 1)
    else:
        percent = 0.0
    status = MigrationStatus(
        status=info.status,
        transferred_mib=round(ram.transferred / MIB, 2),
        remaining_mib=round(ram.remaining / MIB, 2),
        total_mib=round(ram.total / MIB, 2),
        percent=percent,
        mbps=None if ram.mbps is None else round(ram.mbps, 1),
        dirty_sync_count=ram.dirty_sync_count,
        downtime_ms=info.downtime,
        expected_downtime_ms=info.expected_downtime,
        total_time_ms=info.total_time,
        error=info.error_desc,
        cpu_throttle_percentage=info.cpu_throttle_percentage,
        xbzrle_pages=None if xbzrle is None else xbzrle.pages,
        xbzrle_mib=None if xbzrle is None else round(xbzrle.bytes / MIB, 2),
        xbzrle_cache_miss=None if xbzrle is None else xbzrle.cache_miss,
    )
    return status, ram.transferred


class MigrationProgress:
    """The figures of one migration and its stall guard; feed it with `update`."""

    def __init__(self, *, stall_timeout_s: float, now: float) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.status = MigrationStatus(status="setup")
        self._transferred = -1
        self._moved_at = now
        #: When an answer first said completed without the figures.
        self._completed_at: float | None = None
        #: The migration completed and QEMU has not yet filled in its figures: ask again.
        self.figures_pending = False

    @property
    def finished(self) -> bool:
        return self.status.status in FINISHED and not self.figures_pending

    def update(self, reply: Mapping[str, Any], now: float) -> MigrationStatus:
        """Take a ``query-migrate`` reply received at `now` (seconds, any monotonic clock)."""
        status, transferred = parse_query_migrate(reply)
        if transferred != self._transferred or status.status in _NOT_MOVING:
            self._transferred = transferred
            self._moved_at = now
        self.figures_pending = False
        if status.status == "completed" and not status.total_time_ms:
            if self._completed_at is None:
                self._completed_at = now
            self.figures_pending = now - self._completed_at < FIGURES_WAIT_S
        self.status = status
        return status

    def passed(self, count: int) -> MigrationStatus:
        """Take QEMU's ``MIGRATION_PASS`` event: `count` dirty-sync passes so far."""
        self.status = msgspec.structs.replace(self.status, dirty_sync_count=count)
        return self.status

    def stalled(self, now: float) -> bool:
        """Whether no byte has moved for ``stall_timeout_s`` up to `now`."""
        if self.status.status in _NOT_MOVING:
            return False
        return now - self._moved_at >= self.stall_timeout_s

    def stalled_for(self, now: float) -> float:
        """Seconds since the last byte moved."""
        return now - self._moved_at
