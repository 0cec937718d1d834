"""The final figures of a migration are QEMU's, never the zeros it shows for a moment.

QEMU 7.2 sets a migration ``completed`` (and sends the ``MIGRATION`` event) before its
migration thread, waiting for the big lock, has computed ``total-time`` and ``downtime``:
a ``query-migrate`` answered in between reads 0 for both (seen in the migration
benchmark: a 76 MiB migration reported with 0 ms downtime and 0 ms total time).
"""

from __future__ import annotations

from typing import Any

from supervisor.qemu import migration_progress
from supervisor.qemu.migration_progress import MigrationProgress

MIB = 1024 * 1024


def completed(total_time_ms: int, downtime_ms: int) -> dict[str, Any]:
    return {
        "status": "completed",
        "setup-time": 1,
        "total-time": total_time_ms,
        "downtime": downtime_ms,
        "ram": {"total": 96 * MIB, "remaining": 0, "transferred": 76 * MIB, "mbps": 0},
    }


def test_a_completed_answer_without_figures_is_not_the_end() -> None:
    progress = MigrationProgress(stall_timeout_s=2.0, now=0.0)
    progress.update({"status": "active", "ram": {"transferred": 10 * MIB}}, 0.05)
    progress.update(completed(0, 0), 0.1)
    assert not progress.finished
    assert progress.figures_pending
    assert not progress.stalled(10.0)
    status = progress.update(completed(64, 7), 0.102)
    assert progress.finished and not progress.figures_pending
    assert (status.status, status.total_time_ms, status.downtime_ms) == ("completed", 64, 7)


def test_figures_that_never_come_are_awaited_for_a_bounded_time() -> None:
    progress = MigrationProgress(stall_timeout_s=2.0, now=0.0)
    progress.update(completed(0, 0), 1.0)
    assert not progress.finished
    progress.update(completed(0, 0), 1.0 + migration_progress.FIGURES_WAIT_S)
    assert progress.finished and not progress.figures_pending


def test_failed_and_cancelled_migrations_end_at_once() -> None:
    for status in ("failed", "cancelled"):
        progress = MigrationProgress(stall_timeout_s=2.0, now=0.0)
        progress.update({"status": status, "total-time": 0}, 1.0)
        assert progress.finished and not progress.figures_pending
