"""The state table: every move the code makes is in it, the rest are refused loudly.

Pure tests of `supervisor.model.states` and `Instance.set_state`, and a real QEMU for
the moves that need one (a stop of a crashed instance, a guest that was migrated away).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
from core.conftest import config, guest_spec, state_dir

from supervisor import Supervisor
from supervisor.engine.events import EventBus
from supervisor.engine.instance import Instance
from supervisor.host.statedir import StateDir
from supervisor.model.config import Config
from supervisor.model.errors import MigrationError
from supervisor.model.states import (
    ALIVE,
    TERMINAL,
    TRANSITIONS,
    InstanceState,
    can_transition,
    state_for_qemu_status,
)

__all__ = ["config", "state_dir"]  # fixtures

S = InstanceState

#: Every move the engine makes, and where.
MOVES_THE_CODE_MAKES = [
    (S.STOPPED, S.STARTING),  # start, reboot (after its stop), adoption
    (S.CRASHED, S.STARTING),  # restart after a crash, start
    (S.STARTING, S.RUNNING),  # start-up steps, RESUME event, adopted running QEMU
    (S.STARTING, S.PAUSED),  # started paused, adopted paused QEMU
    (S.STARTING, S.INCOMING),  # adopted QEMU in `inmigrate`
    (S.STARTING, S.MIGRATING),  # adopted QEMU in `finish-migrate`
    (S.STARTING, S.STOPPING),  # stop of an adopted QEMU whose monitor is silent
    (S.RUNNING, S.PAUSED),  # pause, STOP event
    (S.PAUSED, S.RUNNING),  # resume, RESUME event
    (S.RUNNING, S.STOPPING),  # stop
    (S.PAUSED, S.STOPPING),  # stop
    (S.STOPPING, S.RUNNING),  # a stop abandoned (cancelled) while QEMU runs
    (S.STOPPING, S.PAUSED),  # a stop abandoned while QEMU is paused
    (S.CRASHED, S.STOPPED),  # stop of a crashed instance: no restart follows
    (S.INCOMING, S.RUNNING),  # RESUME event after an incoming migration
    (S.PAUSED, S.MIGRATING),  # adopted QEMU found in `finish-migrate` on a new monitor
]


@pytest.mark.parametrize(("previous", "new"), MOVES_THE_CODE_MAKES)
def test_every_move_the_code_makes_is_in_the_table(
    previous: InstanceState, new: InstanceState
) -> None:
    assert can_transition(previous, new)


@pytest.mark.parametrize("previous", sorted(ALIVE))
def test_qemu_exiting_ends_every_live_state(previous: InstanceState) -> None:
    assert can_transition(previous, S.STOPPED)
    assert can_transition(previous, S.CRASHED)


@pytest.mark.parametrize(
    ("previous", "new"),
    [
        (S.STOPPED, S.CRASHED),  # a stopped QEMU cannot crash
        (S.STOPPED, S.RUNNING),  # only through starting
        (S.CRASHED, S.RUNNING),
        (S.RUNNING, S.STARTING),
        (S.RUNNING, S.INCOMING),
        (S.STOPPING, S.STARTING),
        (S.STOPPING, S.MIGRATING),
    ],
)
def test_moves_nothing_makes_are_illegal(previous: InstanceState, new: InstanceState) -> None:
    assert not can_transition(previous, new)


def test_the_table_names_every_state_and_only_states() -> None:
    assert set(TRANSITIONS) == set(InstanceState)
    assert set(InstanceState) == TERMINAL | ALIVE
    assert all(previous not in moves for previous, moves in TRANSITIONS.items())


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("running", S.RUNNING),
        ("paused", S.PAUSED),
        ("prelaunch", S.PAUSED),
        ("inmigrate", S.INCOMING),
        ("finish-migrate", S.MIGRATING),
        ("postmigrate", S.PAUSED),
        ("shutdown", S.STOPPING),
    ],
)
def test_qemu_run_states_map_to_ours(status: str, state: InstanceState) -> None:
    assert state_for_qemu_status(status) == state


def _instance(tmp_path: Path, bus: EventBus) -> Instance:
    return Instance("vm", paths=StateDir(tmp_path).instance("vm"), bus=bus, config=Config())


def _errors(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        record.event_dict  # type: ignore[attr-defined]
        for record in caplog.records
        if record.levelno >= logging.ERROR and record.name.startswith("supervisor")
    ]


def test_an_illegal_move_is_refused_and_logged_as_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bus = EventBus(8)
    instance = _instance(tmp_path, bus)
    with caplog.at_level(logging.INFO, logger="supervisor"):
        instance.set_state(S.RUNNING, "resumed")
    assert instance.state == S.STOPPED
    [entry] = _errors(caplog)
    assert (entry["previous"], entry["state"], entry["reason"]) == ("stopped", "running", "resumed")


def test_the_state_is_changed_only_through_the_table(tmp_path: Path) -> None:
    instance = _instance(tmp_path, EventBus(8))
    with pytest.raises(AttributeError):
        instance.state = S.RUNNING  # type: ignore[misc]
    instance.set_state(S.STARTING, "start requested")
    instance.set_state(S.STARTING, "again")  # the same state: nothing to do, no error
    assert (instance.state, instance.reason) == (S.STARTING, "start requested")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
@pytest.mark.guest
async def test_a_lifecycle_makes_no_illegal_move(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="supervisor"):
        async with (
            Supervisor(config) as sup,
            sup.events(kinds=["instance.state"]) as events,
        ):
            info = await sup.start(guest_spec("vm"), paused=True)
            await sup.resume("vm")
            await sup.pause("vm")
            # A stop abandoned (the guest, resumed to see the power button, has not booted
            # far enough to act on it): QEMU's state comes back.
            with anyio.move_on_after(0.2):
                await sup.stop("vm", timeout_s=60)
            assert sup.info("vm").state == "running"
            assert info.pid is not None
            os.kill(info.pid, signal.SIGKILL)
            with anyio.fail_after(30):
                async for event in events:
                    if event.data["state"] == "crashed":
                        break
            stopped = await sup.stop("vm")
            assert (stopped.state, stopped.reason) == ("stopped", "stop requested")
            event = await events.__anext__()
            assert (event.data["previous"], event.data["state"]) == ("crashed", "stopped")
    assert any(record.name.startswith("supervisor") for record in caplog.records)
    assert _errors(caplog) == []


@pytest.mark.anyio
@pytest.mark.guest
async def test_a_guest_migrated_away_is_never_resumed(config: Config) -> None:
    async with Supervisor(config) as sup:
        await sup.start(guest_spec("gone"))
        client = sup.instance("gone").qmp
        assert client is not None
        # An embedding program migrates it (the RPC surface refuses raw `migrate`).
        events_on = [{"capability": "events", "state": True}]
        await client.execute("migrate-set-capabilities", {"capabilities": events_on})
        async with client.events({"MIGRATION"}) as migration:
            await client.execute("migrate", {"uri": "exec:cat > /dev/null"})
            with anyio.fail_after(60):
                async for event in migration:
                    if event.data["status"] in ("completed", "failed"):
                        break
        assert event.data["status"] == "completed"
        # QEMU reports the migration completed a moment before it leaves finish-migrate.
        with anyio.fail_after(30):
            while (await client.execute("query-status"))["status"] != "postmigrate":
                await anyio.sleep(0.01)
        with pytest.raises(MigrationError) as refused:
            await sup.resume("gone")
        assert refused.value.code == 8
        assert "postmigrate" in str(refused.value)
        assert (await sup.qmp("gone", "query-status"))["status"] == "postmigrate"
        await sup.stop("gone", force=True)
