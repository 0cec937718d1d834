"""One operation at a time per instance: who holds the lock, what a busy caller may touch,
and what an operation queued behind another finds when its turn comes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest
from core.conftest import config, guest_spec, state_dir

from supervisor import Supervisor
from supervisor.engine import instance as instance_module
from supervisor.engine.events import EventBus
from supervisor.engine.instance import Instance
from supervisor.host.statedir import StateDir
from supervisor.model.config import Config
from supervisor.model.errors import Busy, InstanceNotRunning

from .nothing_left import qemus_of

__all__ = ["config", "state_dir"]  # fixtures

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _round_of_three(instance: Instance, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`h` holds the lock and lets go while `x` waits (it gets the lock) and `w` gives up."""
    running: list[str] = []
    results: dict[str, str] = {}
    release_h = anyio.Event()

    async def operation(name: str, hold: anyio.Event | None) -> None:
        try:
            async with instance.operation(name):
                running.append(name)
                assert running == [name], f"operations at once: {running}"
                if hold is not None:
                    await hold.wait()
                await anyio.lowlevel.checkpoint()
                running.remove(name)
        except Busy:
            results[name] = "busy"
        except Exception as error:  # the failure this test looks for
            results[name] = repr(error)
        else:
            results[name] = "ok"

    async with anyio.create_task_group() as tg:
        tg.start_soon(operation, "h", release_h)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(operation, "x", None)
        await anyio.wait_all_tasks_blocked()
        # `w` gives up at its first wait, in the same round as `h` lets go.
        monkeypatch.setattr(instance_module, "BUSY_WAIT_S", 0)
        tg.start_soon(operation, "w", None)
        release_h.set()
    monkeypatch.undo()
    return results


async def test_a_waiter_that_gives_up_never_runs_nor_releases_anothers_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `w` must get Busy whatever order the scheduler runs `w` and `x` in (trio shuffles
    # it, hence the rounds); before, `w` could run without the lock and `x` get Busy.
    instance = Instance(
        "vm", paths=StateDir(tmp_path).instance("vm"), bus=EventBus(8), config=Config()
    )
    for _ in range(20):
        assert await _round_of_three(instance, monkeypatch) == {
            "h": "ok",
            "x": "ok",
            "w": "busy",
        }
        async with instance.operation("after"):  # the lock is free again
            pass


@pytest.mark.guest
async def test_a_busy_start_touches_nothing(
    config: Config, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Supervisor(config) as sup:
        await sup.start(guest_spec("kept"), paused=True)
        await sup.stop("kept", force=True)
        instance = sup.instance("kept")
        record_file = instance.paths.runtime_record
        before = (record_file.stat().st_ino, record_file.read_bytes(), instance.record)
        # A defined instance whose directory exists but has no record yet (as
        # `kvm-supervisor cmdline` leaves it).
        (Path(config.instances_dir) / "fresh.toml").write_text('name = "fresh"\nmemory_mib = 96\n')
        fresh_dir = sup.state_dir.create_instance_dir("fresh").directory
        refusals: list[str] = []

        async def start(name: str) -> None:
            try:
                await sup.start(name=name)
            except Busy as error:
                refusals.append(str(error))

        for name in ("kept", "fresh"):
            # Another operation is in progress (held here for as long as the test needs).
            async with sup.instance(name).operation("other"), anyio.create_task_group() as tg:
                monkeypatch.setattr(instance_module, "BUSY_WAIT_S", 0)
                tg.start_soon(start, name)
            monkeypatch.undo()
        assert refusals == [
            "instance 'kept' is busy with other",
            "instance 'fresh' is busy with other",
        ]
        after = (record_file.stat().st_ino, record_file.read_bytes(), instance.record)
        assert after == before
        assert fresh_dir.is_dir()
        assert [(i.name, i.state) for i in sup.list()] == [
            ("fresh", "stopped"),
            ("kept", "stopped"),
        ]


@pytest.mark.guest
async def test_a_reboot_queued_behind_a_stop_finds_the_instance_stopped(
    config: Config, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reboot waits for the stop however long a loaded machine makes that.
    monkeypatch.setattr(instance_module, "BUSY_WAIT_S", 300)
    async with Supervisor(config) as sup, sup.events(kinds=["instance.state"]) as events:
        info = await sup.start(guest_spec("vm"))  # not booted yet: ACPI goes unanswered
        assert info.pid is not None
        outcomes: dict[str, object] = {}

        async def stop() -> None:
            outcomes["stop"] = (await sup.stop("vm", timeout_s=120)).state

        async def reboot() -> None:
            try:
                outcomes["reboot"] = (await sup.reboot("vm")).state
            except InstanceNotRunning as error:
                outcomes["reboot"] = error

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop)
            with anyio.fail_after(30):
                async for event in events:
                    if event.data["state"] == "stopping":
                        break
            tg.start_soon(reboot)
            await anyio.wait_all_tasks_blocked()  # the reboot waits for the stop
            os.kill(info.pid, signal.SIGTERM)  # QEMU goes: the stop completes
        assert outcomes["stop"] == "stopped"
        refused = outcomes["reboot"]
        assert isinstance(refused, InstanceNotRunning)
        assert refused.code == 3
        assert sup.info("vm").state == "stopped"
        assert qemus_of(state_dir) == []
