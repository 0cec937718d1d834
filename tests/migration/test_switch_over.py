"""What QEMU's events tell about the switch-over is taken from them, without asking QEMU.

QEMU sends ``MIGRATION_PASS`` for its last pass too, once it has stopped the guest for
the switch-over and while its migration thread holds the big lock: a ``query-migrate``
then waits for that lock, and the daemon's work on it and on a progress event takes CPU
from the two QEMUs; both lengthen the guest's downtime. The pass count comes from the
event; the figures wait for the next reading.

On the target, a live guest's ``RESUME`` and then ``MIGRATION`` ``completed`` say how the
migration ended: ``migration.finalize_target`` asks QEMU nothing about it then (a round
trip less to a QEMU busy with the guest it just took over), nor which migration
capabilities to turn off: those ``migration.accept`` turned on, unless a client's QMP
command went to that QEMU since.
"""

from __future__ import annotations

import anyio
import msgspec
import pytest
from core.conftest import guest_spec

from protocols import qmp
from supervisor.engine import migration
from supervisor.engine.instance import Instance
from supervisor.model.config import Config
from supervisor.qemu.migration_progress import MigrationProgress

from .conftest import Daemon, migrate_steps, two_daemons

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


@pytest.mark.guest
@pytest.mark.parametrize("live", [True, False], ids=["live", "non-live"])
async def test_the_target_asks_how_the_migration_ended_only_when_its_events_did_not_say(
    configs: tuple[Config, Config], monkeypatch: pytest.MonkeyPatch, live: bool
) -> None:
    """A live guest's end is in the target's events; a non-live one arrives paused (no
    ``RESUME``), so QEMU is asked. Either way the guest runs on the target."""
    asked = spy_on_migration_commands(monkeypatch)
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"))
        async with target.sup.events(instances=["vm"], kinds=["qmp.MIGRATION"]) as seen:
            runtime, ended = await migrate_steps(source, target, start={"live": live})
            assert ended == "completed"
            with anyio.fail_after(30):
                async for event in seen:  # the target's monitor saw it too
                    if event.data["status"] == "completed":
                        break
        asked.clear()
        info = await target.call(
            "migration.finalize_target", name="vm", runtime=runtime, success=True
        )
        assert info["state"] == "running"
        assert ("query-migrate" in asked) == (not live), asked
        # Asked with the other questions, or not at all: accept's own are known.
        assert asked.count("query-migrate-capabilities") == (not live), asked
        assert await capabilities_on(target) == [], "finalize_target turns them all off"
        await source.call("migration.finalize_source", name="vm", success=True)


@pytest.mark.guest
async def test_a_capability_a_client_turned_on_in_the_incoming_qemu_is_turned_off_too(
    configs: tuple[Config, Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's QMP command to the incoming QEMU may have changed its capabilities:
    QEMU is asked which are on, rather than the daemon trusting accept's list."""
    asked = spy_on_migration_commands(monkeypatch)
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"))
        info = await source.call("migration.info", name="vm")
        accepted = await target.call(
            "migration.accept", spec=info["spec"], runtime=info["runtime"], address="127.0.0.1"
        )
        on = [{"capability": "auto-converge", "state": True}]
        await target.sup.qmp("vm", "migrate-set-capabilities", {"capabilities": on})
        async with source.sup.events(instances=["vm"], kinds=["migration.progress"]) as events:
            await source.call(
                "migration.start", name="vm", target="127.0.0.1", port=accepted["port"]
            )
            with anyio.fail_after(60):
                async for event in events:
                    if event.data["status"] == "completed":
                        break
        asked.clear()
        await target.call(
            "migration.finalize_target", name="vm", runtime=info["runtime"], success=True
        )
        assert "query-migrate-capabilities" in asked, asked
        assert await capabilities_on(target) == []
        await source.call("migration.finalize_source", name="vm", success=True)


def spy_on_migration_commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The QMP commands the migration module sends from now on, by name."""
    asked: list[str] = []
    execute, execute_in_order = migration._execute, migration._execute_in_order

    async def spied(client: qmp.QMPClient, command: str, *args: object, **kw: object) -> object:
        asked.append(command)
        return await execute(client, command, *args, **kw)  # type: ignore[arg-type]

    async def spied_in_order(
        client: qmp.QMPClient, *commands: tuple[str, object], **kw: object
    ) -> object:
        asked.extend(command for command, _ in commands)
        return await execute_in_order(client, *commands, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(migration, "_execute", spied)
    monkeypatch.setattr(migration, "_execute_in_order", spied_in_order)
    return asked


async def capabilities_on(daemon: Daemon) -> list[str]:
    """The migration capabilities on in the QEMU of the daemon's instance ``vm``."""
    states = await daemon.sup.qmp("vm", "query-migrate-capabilities")
    return [state["capability"] for state in states if state["state"]]
