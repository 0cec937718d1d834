"""``migration.prepare``: the source's settings given to QEMU beside ``migration.accept``,
so that ``migration.start`` sends only ``getfd`` and ``migrate``; a start with other
settings, or after a client's QMP command, sets its own. Guests that never boot (``-S``):
they migrate in a fraction of a second."""

from __future__ import annotations

from typing import Any

import pytest
from core.conftest import guest_spec

from protocols.jsonrpc import RPCError
from supervisor.control.migrate import migrate
from supervisor.engine import migration
from supervisor.model.config import Config

from .conftest import Daemon, migrate_steps, two_daemons

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]

MIB = 1024 * 1024
INSTANCE_EXISTS = 2


async def qemu(daemon: Daemon, command: str) -> Any:
    """Ask the instance's QEMU directly (a client's ``instance.qmp`` would count as a
    change behind the daemon's back)."""
    return await daemon.sup.instance("vm").require_running().execute(command)


async def capabilities_on(daemon: Daemon) -> set[str]:
    return {c["capability"] for c in await qemu(daemon, "query-migrate-capabilities") if c["state"]}


async def finish(source: Daemon, target: Daemon, runtime: str) -> None:
    """Finalize a completed migration and stop the guest where it went."""
    await target.call("migration.finalize_target", name="vm", runtime=runtime, success=True)
    await source.call("migration.finalize_source", name="vm", success=True)
    await target.sup.stop("vm", force=True)


@pytest.fixture
def settings_sent(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The settings each ``migration.start`` sent QEMU itself."""
    sent: list[Any] = []
    hand_over = migration._settle_and_hand_over

    async def spy(client: Any, settings: Any, stream: Any) -> None:
        sent.append(settings)
        await hand_over(client, settings, stream)

    monkeypatch.setattr(migration, "_settle_and_hand_over", spy)
    return sent


async def test_a_start_with_the_prepared_settings_sends_only_migrate(
    configs: tuple[Config, Config], settings_sent: list[Any]
) -> None:
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"), paused=True)
        prepared = await source.call(
            "migration.prepare",
            name="vm",
            bandwidth_mib_s=100,
            downtime_ms=40,
            capabilities=["xbzrle"],
        )
        assert prepared == {"applied": True}
        assert await capabilities_on(source) == {"events", "return-path", "xbzrle"}
        parameters = await qemu(source, "query-migrate-parameters")
        assert (parameters["max-bandwidth"], parameters["downtime-limit"]) == (100 * MIB, 40)
        runtime, ended = await migrate_steps(
            source,
            target,
            accept={"capabilities": ["xbzrle"]},
            start={"bandwidth_mib_s": 100, "downtime_ms": 40, "capabilities": ["xbzrle"]},
        )
        assert ended == "completed"
        assert settings_sent == []
        await finish(source, target, runtime)


@pytest.mark.parametrize("change", ["other settings", "a client's QMP command"])
async def test_a_start_that_cannot_use_the_preparation_sets_its_own(
    configs: tuple[Config, Config], settings_sent: list[Any], change: str
) -> None:
    """Other settings at the start: the prepared capabilities are cleared, its own set.
    A client's command after the preparation: the start sets its settings again (a
    migration run by what the client set, 1 byte/s, would stall, not complete)."""
    other = change == "other settings"
    bandwidth, capabilities = (200, []) if other else (100, ["xbzrle"])
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"), paused=True)
        await source.call(
            "migration.prepare", name="vm", bandwidth_mib_s=100, capabilities=["xbzrle"]
        )
        if not other:
            await source.call(
                "instance.qmp",
                name="vm",
                command="migrate-set-parameters",
                arguments={"max-bandwidth": 1},
            )
        runtime, ended = await migrate_steps(
            source,
            target,
            accept={"capabilities": capabilities},
            start={"bandwidth_mib_s": bandwidth, "capabilities": capabilities},
        )
        assert ended == "completed"
        assert len(settings_sent) == 1
        # The source's QEMU, in ``postmigrate`` until finalize_source, migrated so:
        assert await capabilities_on(source) == {"events", "return-path", *capabilities}
        parameters = await qemu(source, "query-migrate-parameters")
        assert parameters["max-bandwidth"] == bandwidth * MIB
        await finish(source, target, runtime)


async def test_a_failed_accept_clears_the_prepared_settings_and_leaves_the_guest_be(
    configs: tuple[Config, Config],
) -> None:
    """`migrate` prepares the source beside the accept; the target refuses (it runs an
    instance of that name), so the source's settings are undone, its guest left paused."""
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"), paused=True)
        await target.sup.start(guest_spec("vm"), paused=True)
        with pytest.raises(RPCError) as refused:
            await migrate(source.client, target.client, "vm", capabilities=["xbzrle"])
        assert refused.value.code == INSTANCE_EXISTS
        assert await capabilities_on(source) == set()
        assert (await source.call("instance.info", name="vm"))["state"] == "paused"
        assert (await qemu(source, "query-status"))["status"] == "prelaunch"  # never run
        assert (await target.call("instance.info", name="vm"))["state"] == "paused"
        await source.sup.stop("vm", force=True)
        await target.sup.stop("vm", force=True)


async def test_finalize_source_after_prepare_alone_clears_the_settings(
    configs: tuple[Config, Config],
) -> None:
    async with two_daemons(configs) as (source, _):
        await source.sup.start(guest_spec("vm"), paused=True)
        await source.call("migration.prepare", name="vm", capabilities=["xbzrle"])
        await source.call("migration.finalize_source", name="vm", success=False)
        assert await capabilities_on(source) == set()
        assert (await source.call("instance.info", name="vm"))["state"] == "paused"
        assert (await qemu(source, "query-status"))["status"] == "prelaunch"
        await source.sup.stop("vm", force=True)


async def test_a_non_live_migration_is_not_prepared(configs: tuple[Config, Config]) -> None:
    """Its guest is paused at the start, just before ``migrate``: nothing to do before."""
    async with two_daemons(configs) as (source, _):
        await source.sup.start(guest_spec("vm"), paused=True)
        prepared = await source.call("migration.prepare", name="vm", live=False)
        assert prepared == {"applied": False}
        assert await capabilities_on(source) == set()
        with pytest.raises(RPCError) as refused:
            await source.call("migration.prepare", name="vm", capabilities=["warp"])
        assert refused.value.data["path"] == "capabilities"
        await source.sup.stop("vm", force=True)


async def test_a_preparation_whose_qemu_exited_is_dropped_at_the_next(
    configs: tuple[Config, Config],
) -> None:
    """An instance prepared and then stopped, never started nor finalized, leaves no
    preparation (and no QMP connection) behind once another instance is prepared."""
    async with two_daemons(configs) as (source, _):
        await source.sup.start(guest_spec("vm"), paused=True)
        await source.sup.start(guest_spec("other"), paused=True)
        await source.call("migration.prepare", name="vm")
        await source.sup.stop("vm", force=True)
        await source.call("migration.prepare", name="other")
        assert list(source.sup.migrations._prepared) == ["other"]
        await source.sup.stop("other", force=True)
