"""The migration's ends a restarted daemon carries out, and resume of a guest that never
ran: paths where the guest must end up running exactly once.

- A source daemon killed (kill -9) once QEMU reported the migration ``completed``,
  before ``finalize_source``: the restarted daemon ends the source's part itself.
- A target daemon killed once the migration completed, before ``finalize_target``: the
  restarted daemon adopts the guest, which ``finalize_target`` then hands over.
- An incoming start (``migration.accept``) cut short, before ``migrate-incoming`` or
  before it answered (crash_daemon.py): the restarted target daemon stops that QEMU
  and removes its runtime, and a new ``migration.accept`` of the guest goes through.
- A source daemon killed with the stream's connection handed to its QEMU, before
  ``migrate``: the restarted daemon closes it, so the target's QEMU stops waiting.
- ``finalize_target`` with ``resume`` of a guest that was never started (``-S``,
  QEMU's ``prelaunch``) on its source: it runs on the target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from core.conftest import guest_spec
from engine.conftest import EngineDaemon
from helpers import POLL_INTERVAL_S

from protocols.jsonrpc import RPCClient, RPCConnectionLostError, RPCError
from supervisor.control.migrate import migrate
from supervisor.model.api import MigrationStatus
from supervisor.model.config import Config

from .conftest import counts_on_across, migrate_steps, serial_output, two_daemons, wait_heartbeat
from .test_daemon_faults import (
    ADOPTION_TIMEOUT_S,
    answer_when,
    client,
    copies,
    daemons,
    keeps_counting,
    progress_until,
    start_guest,
    subscribe,
)

__all__ = ["daemons"]  # the fixture, used by name

pytestmark = [pytest.mark.anyio, pytest.mark.guest]


async def nothing_listed(rpc: RPCClient) -> None:
    """Wait until the daemon lists no instance (a restarted daemon adopts, and ends what
    it must, in the background)."""
    with anyio.fail_after(ADOPTION_TIMEOUT_S):
        while await rpc.call("instance.list") != []:
            await anyio.sleep(POLL_INTERVAL_S)


async def migrate_to_completed(source: RPCClient, target: RPCClient) -> str:
    """``migration.info``, ``.accept`` and ``.start``, then the source's progress up to
    ``completed`` (the source's guest has stopped: its serial output is final), and no
    finalize; the runtime payload."""
    info = await source.call("migration.info", {"name": "vm"})
    accepted = await target.call(
        "migration.accept",
        {"spec": info["spec"], "runtime": info["runtime"], "address": "127.0.0.1"},
    )
    await subscribe(source)
    await source.call(
        "migration.start", {"name": "vm", "target": "127.0.0.1", "port": accepted["port"]}
    )
    final = await progress_until(source, lambda s: s["status"] in {"completed", "failed"})
    assert final["status"] == "completed", final
    runtime: str = info["runtime"]
    return runtime


async def finalize(source: RPCClient, target: RPCClient, runtime: str) -> dict[str, Any]:
    """Both finalizes of a completed migration, the target first; the target's instance."""
    owned: dict[str, Any] = await target.call(
        "migration.finalize_target", {"name": "vm", "runtime": runtime, "success": True}
    )
    assert await source.call("migration.finalize_source", {"name": "vm", "success": True}) == {}
    return owned


async def assert_carried_on(
    started: dict[str, Any], owned: dict[str, Any], left_behind: bytes, *nodes: EngineDaemon
) -> None:
    """The guest runs once, at the target, and counts on from where the source's serial
    output, `left_behind`, ends."""
    assert (owned["state"], owned["qemu_status"], owned["uuid"]) == (
        "running",
        "running",
        started["uuid"],
    )
    assert copies(started["uuid"], *nodes) == [owned["pid"]]
    target_log = Path(owned["serial_log"])
    await counts_on_across(left_behind, target_log)
    await keeps_counting(target_log)


async def test_a_source_daemon_killed_after_completed_ends_the_source_after_restart(
    daemons: tuple[EngineDaemon, EngineDaemon],
) -> None:
    source_node, target_node = daemons
    async with client(source_node) as source, client(target_node) as target:
        started = await start_guest(source)
        runtime = await migrate_to_completed(source, target)
        left_behind = serial_output(Path(started["serial_log"]))
        source_node.kill()
    async with client(source_node) as source, client(target_node) as target:
        # The guest lives on the target: the restarted source ends its QEMU (postmigrate)
        # and removes its runtime, as finalize_source would.
        await nothing_listed(source)
        assert copies(started["uuid"], source_node) == []
        assert not (source_node.state_dir / "instances" / "vm").exists()
        # The cluster manager's finalizes, late, still go through.
        owned = await finalize(source, target, runtime)
        await assert_carried_on(started, owned, left_behind, source_node, target_node)


async def test_a_target_daemon_killed_after_completed_adopts_the_guest_after_restart(
    daemons: tuple[EngineDaemon, EngineDaemon],
) -> None:
    source_node, target_node = daemons
    async with client(source_node) as source, client(target_node) as target:
        started = await start_guest(source)
        runtime = await migrate_to_completed(source, target)
        left_behind = serial_output(Path(started["serial_log"]))
        target_node.kill()
    async with client(source_node) as source, client(target_node) as target:
        # Adopted: the guest runs there, held for finalize_target; the source's QEMU
        # (postmigrate) waits for finalize_source and runs nothing.
        info = await answer_when(target, "instance.info", lambda i: i["state"] != "starting")
        assert (info["state"], info["qemu_status"]) == ("running", "running")
        assert copies(started["uuid"], target_node) == [info["pid"]]
        left = await source.call("instance.qmp", {"name": "vm", "command": "query-status"})
        assert left["return"]["status"] == "postmigrate"
        owned = await finalize(source, target, runtime)
        assert owned["pid"] == info["pid"]
        await assert_carried_on(started, owned, left_behind, source_node, target_node)
        assert await source.call("instance.list") == []


async def test_migrate_ends_the_source_even_when_the_target_daemon_dies_at_completion(
    daemons: tuple[EngineDaemon, EngineDaemon],
) -> None:
    """`migrate()` finalizes both ends at once: a target daemon killed the moment the
    migration completed fails the call, yet the source's QEMU (``postmigrate``: it never
    runs the guest again) is ended and its runtime removed. The guest runs at the target,
    whose restarted daemon adopts it for the ``finalize_target`` the caller retries."""
    source_node, target_node = daemons
    async with client(source_node) as source, client(target_node) as target:
        started = await start_guest(source)
        # What migrate() passes on; the caller's retry of finalize_target needs it.
        runtime = (await source.call("migration.info", {"name": "vm"}))["runtime"]

        left_behind: list[bytes] = []

        def kill_target_at_completion(status: MigrationStatus) -> None:
            if status.status == "completed":
                # The source's guest has stopped: its serial output is final.
                left_behind.append(serial_output(Path(started["serial_log"])))
                target_node.kill()

        with pytest.raises((RPCConnectionLostError, RPCError)):
            await migrate(source, target, "vm", on_progress=kill_target_at_completion)
        (source_output,) = left_behind
        assert await source.call("instance.list") == []
        assert copies(started["uuid"], source_node) == []
        assert not (source_node.state_dir / "instances" / "vm").exists()
    async with client(target_node) as target:
        adopted = await answer_when(target, "instance.info", lambda i: i["state"] != "starting")
        assert (adopted["state"], adopted["qemu_status"]) == ("running", "running")
        owned = await target.call(
            "migration.finalize_target", {"name": "vm", "runtime": runtime, "success": True}
        )
        assert owned["pid"] == adopted["pid"]
        await assert_carried_on(started, owned, source_output, source_node, target_node)


@pytest.mark.parametrize("point", ["pid-record", "startup-steps", "migrate-incoming", "accept-end"])
async def test_an_incoming_start_cut_short_is_cleaned_up_after_restart(
    daemons: tuple[EngineDaemon, EngineDaemon], point: str
) -> None:
    """The target daemon dies (crash_daemon.py) during ``migration.accept``, before QEMU
    listens or before the accept answered: nobody got a port, so no source will ever
    come. The restarted daemon stops that QEMU and removes its runtime, as a half-made
    incoming domain is; the guest is accepted again, and migrates."""
    source_node, target_node = daemons
    # Never run (-S): the migration sends little, and the point here is the target.
    spec = msgspec.to_builtins(guest_spec("vm"))
    async with client(source_node) as source:
        started = await source.call("instance.start", {"spec": spec, "paused": True})
        info = await source.call("migration.info", {"name": "vm"})
        await anyio.to_thread.run_sync(lambda: target_node.start(crash_at=point))
        async with client(target_node) as target:
            accept = {"spec": info["spec"], "runtime": info["runtime"], "address": "127.0.0.1"}
            with pytest.raises(RPCConnectionLostError):
                await target.call("migration.accept", accept)
        assert copies(started["uuid"], target_node) != []  # the QEMU it left
        target_node.kill()
        async with client(target_node) as target:
            await nothing_listed(target)
            assert copies(started["uuid"], target_node) == []
            assert not (target_node.state_dir / "instances" / "vm").exists()
            result = await migrate(source, target, "vm")
        assert result.status.status == "completed"
        assert (result.instance.state, result.instance.uuid) == ("paused", started["uuid"])
        assert copies(started["uuid"], source_node, target_node) == [result.instance.pid]


@pytest.mark.parametrize("prepared", [False, True])
async def test_a_source_daemon_killed_before_migrate_lets_the_target_go_after_restart(
    daemons: tuple[EngineDaemon, EngineDaemon], prepared: bool
) -> None:
    """The source daemon dies (crash_daemon.py) as ``migration.start`` is about to send
    ``migrate``: its QEMU holds the connection to the target (``getfd``) and sends
    nothing on it (after ``migration.prepare`` the two go in one write, and the daemon
    dies before it, holding the connection itself). The restarted daemon gives the
    guest back its state and closes that connection, so the target's QEMU, which would
    wait on it for ever, exits and the target's instance goes."""
    source_node, target_node = daemons
    spec = msgspec.to_builtins(guest_spec("vm"))
    await anyio.to_thread.run_sync(lambda: source_node.start(crash_at="migrate"))
    async with client(source_node) as source, client(target_node) as target:
        started = await source.call("instance.start", {"spec": spec, "paused": True})
        info = await source.call("migration.info", {"name": "vm"})
        accepted = await target.call(
            "migration.accept",
            {"spec": info["spec"], "runtime": info["runtime"], "address": "127.0.0.1"},
        )
        if prepared:
            assert await source.call("migration.prepare", {"name": "vm"}) == {"applied": True}
        start = {"name": "vm", "target": "127.0.0.1", "port": accepted["port"]}
        with pytest.raises(RPCConnectionLostError):
            await source.call("migration.start", start)
    source_node.kill()
    async with client(source_node) as source, client(target_node) as target:
        await nothing_listed(target)
        assert copies(started["uuid"], target_node) == []
        status = await source.call("migration.status", {"name": "vm"})
        assert status["status"] == "failed"
        assert "killed before QEMU was told to migrate" in status["error"]
        assert (await source.call("instance.info", {"name": "vm"}))["state"] == "paused"
        assert copies(started["uuid"], source_node) == [started["pid"]]
        await source.call("instance.stop", {"name": "vm", "force": True})


@pytest.mark.parametrize("resume", [True, False])
async def test_finalize_target_resumes_a_guest_that_never_ran_if_asked(
    configs: tuple[Config, Config], resume: bool
) -> None:
    """A guest started paused (``-S``) has never run; migrated, QEMU leaves it in
    ``prelaunch`` on the target. ``resume`` means: run it (it boots there)."""
    async with two_daemons(configs) as (source, target):
        started = await source.sup.start(guest_spec("vm"), paused=True)
        runtime, ended = await migrate_steps(source, target)
        assert ended == "completed"
        owned = await target.call(
            "migration.finalize_target",
            name="vm",
            runtime=runtime,
            success=True,
            resume=resume,
        )
        await source.call("migration.finalize_source", name="vm", success=True)
        assert owned["uuid"] == started.uuid
        target_log = target.sup.instance("vm").paths.serial_log
        if resume:
            assert (owned["state"], owned["qemu_status"]) == ("running", "running")
            await wait_heartbeat(target_log, 1)
        else:
            assert (owned["state"], owned["qemu_status"]) == ("paused", "prelaunch")
            assert b"KVS-HEARTBEAT" not in serial_output(target_log)
        await target.sup.stop("vm", force=True)
