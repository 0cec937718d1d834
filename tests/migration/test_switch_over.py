"""A dirty-sync pass is taken from QEMU's event, without asking QEMU anything.

QEMU sends ``MIGRATION_PASS`` for its last pass too, once it has stopped the guest for
the switch-over and while its migration thread holds the big lock: a ``query-migrate``
then waits for that lock, and the daemon's work on it and on a progress event takes CPU
from the two QEMUs; both lengthen the guest's downtime. The pass count comes from the
event; the figures wait for the next reading.
"""

from __future__ import annotations

import msgspec
import pytest
from core.conftest import guest_spec

from protocols import qmp
from supervisor.engine.instance import Instance
from supervisor.model.config import Config
from supervisor.qemu.migration_progress import MigrationProgress

from .conftest import migrate_steps, two_daemons

pytestmark = [pytest.mark.anyio]

MIB = 1024 * 1024


def test_a_pass_keeps_the_last_figures_with_its_count() -> None:
    progress = MigrationProgress(stall_timeout_s=30.0, now=0.0)
    ram = {"total": 96 * MIB, "remaining": 8 * MIB, "transferred": 70 * MIB, "dirty-sync-count": 1}
    active = progress.update({"status": "active", "ram": ram, "expected-downtime": 9}, 1.0)
    passed = progress.passed(2)
    assert passed == msgspec.structs.replace(active, dirty_sync_count=2)
    assert not progress.finished


@pytest.mark.guest
async def test_no_query_after_the_last_pass_until_completed(
    configs: tuple[Config, Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the source's migration task took from QEMU, in order: after the last pass
    (inside the switch-over) the next reading is the completed one."""
    taken: list[str] = []
    update, passed = MigrationProgress.update, MigrationProgress.passed

    def watched_update(self: MigrationProgress, reply: dict[str, object], now: float) -> object:
        status = update(self, reply, now)
        taken.append(f"read {status.status}")
        return status

    def watched_passed(self: MigrationProgress, count: int) -> object:
        taken.append("pass")
        return passed(self, count)

    monkeypatch.setattr(MigrationProgress, "update", watched_update)
    monkeypatch.setattr(MigrationProgress, "passed", watched_passed)
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"))
        runtime, ended = await migrate_steps(source, target)
        assert ended == "completed"
        await target.call("migration.finalize_target", name="vm", runtime=runtime, success=True)
        await source.call("migration.finalize_source", name="vm", success=True)
    assert "pass" in taken, taken
    last_pass = len(taken) - 1 - taken[::-1].index("pass")
    assert taken[last_pass + 1 :] == ["read completed"], taken


async def test_a_target_whose_qemu_cannot_tell_its_sizes_still_takes_over(
    configs: tuple[Config, Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The arrived guest's sizes are only figures: QEMU refusing to tell them does not
    fail ``migration.finalize_target`` (it did with an internal error, -32603)."""

    async def refused(self: Instance, client: qmp.QMPClient) -> None:
        raise qmp.ExecuteError("query-cpus-fast", "GenericError", "refused by the test")

    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"))
        runtime, ended = await migrate_steps(source, target)
        assert ended == "completed"
        monkeypatch.setattr(Instance, "read_sizes", refused)
        info = await target.call(
            "migration.finalize_target", name="vm", runtime=runtime, success=True
        )
        assert info["state"] == "running"
        await source.call("migration.finalize_source", name="vm", success=True)
        assert target.sup.info("vm").state == "running"
