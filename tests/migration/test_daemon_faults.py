"""A daemon killed (kill -9) in the middle of a migration, and started again: the guest
runs exactly once afterwards, where the migration left it, and keeps counting.

Both daemons are `kvm-supervisor serve` processes here (the other migration tests run
them in the test's event loop), so that they can be killed; the migrations are slowed
to `SLOW_MIB_S` so that there is time to kill one.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from core.conftest import FAST_KERNEL_ARGS, guest_spec
from engine.conftest import EngineDaemon, kill_qemus_started_in, qemus_started_in, uuid_of
from helpers import POLL_INTERVAL_S

from protocols.jsonrpc import RPCClient, RPCConnectionLostError, RPCError, connect_unix
from supervisor.control.migrate import migrate
from supervisor.qemu.migration_progress import FINISHED

from .conftest import GUEST_DIR, SLOW_MIB_S, STALL_TIMEOUT_S, heartbeats, wait_heartbeat

pytestmark = [pytest.mark.anyio, pytest.mark.guest]

BUSY = 9
#: Generous: the machine is shared by other test runs.
ADOPTION_TIMEOUT_S = 60.0


@pytest.fixture
def daemons(state_dirs: tuple[Path, Path]) -> Iterator[tuple[EngineDaemon, EngineDaemon]]:
    """The source's and the target's daemon processes (not started); both ended after
    the test, and every QEMU started in their state dirs killed."""
    pair = tuple(EngineDaemon(path) for path in state_dirs)
    for node in pair:
        node.write_config(
            migration_stall_timeout_s=STALL_TIMEOUT_S,
            migration_progress_interval_s=0.2,
            hvparams={
                "kernel_path": str(GUEST_DIR / "vmlinuz"),
                "initrd_path": str(GUEST_DIR / "initrd.img"),
                "kernel_args": FAST_KERNEL_ARGS,
                "serial_console": True,
            },
        )
    try:
        yield pair[0], pair[1]
    finally:
        for node in pair:
            try:
                node.kill(signal.SIGTERM)
            finally:
                kill_qemus_started_in(node.state_dir)


@asynccontextmanager
async def client(node: EngineDaemon) -> AsyncIterator[RPCClient]:
    """A connection to `node`'s daemon, (re)started if it does not run."""
    if node.proc is None or node.proc.poll() is not None:
        node.start()
    async with connect_unix(node.socket) as rpc:
        yield rpc


def copies(uuid: str, *nodes: EngineDaemon) -> list[int]:
    """The live QEMUs of the guest `uuid` started by any of `nodes`."""
    return [
        pid
        for node in nodes
        for pid, args in qemus_started_in(node.state_dir).items()
        if uuid_of(args) == uuid
    ]


async def start_guest(rpc: RPCClient) -> dict[str, Any]:
    """The test guest, started and counting heartbeats."""
    spec = msgspec.to_builtins(guest_spec("vm"))
    started: dict[str, Any] = await rpc.call("instance.start", {"spec": spec})
    await wait_heartbeat(Path(started["serial_log"]), 1)
    return started


async def subscribe(rpc: RPCClient) -> None:
    """Have `rpc` get the ``migration.progress`` events of the guest."""
    await rpc.call("events.subscribe", {"instances": ["vm"], "kinds": ["migration.progress"]})


async def progress_until(
    rpc: RPCClient, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 60
) -> dict[str, Any]:
    """The first ``migration.progress`` figures (see `subscribe`) `predicate` accepts."""
    with anyio.fail_after(timeout_s):
        async for notification in rpc.notifications():
            data: dict[str, Any] = notification.params["data"]
            if predicate(data):
                return data
    raise AssertionError("the events ended")


async def sent_some(rpc: RPCClient) -> None:
    """Wait until the migration has sent something (see `subscribe`)."""
    await progress_until(rpc, lambda s: s["status"] == "active" and s["transferred_mib"] > 0)


async def answer_when(
    rpc: RPCClient, method: str, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """`method`'s answer about the guest, once `predicate` accepts it (the daemon's
    adoption goes on in the background: nothing announces its end to a new client)."""
    with anyio.fail_after(ADOPTION_TIMEOUT_S):
        while True:
            answer: dict[str, Any] = await rpc.call(method, {"name": "vm"})
            if predicate(answer):
                return answer
            await anyio.sleep(POLL_INTERVAL_S)


async def keeps_counting(serial_log: Path) -> None:
    """The guest behind `serial_log` runs: it counts on."""
    await wait_heartbeat(serial_log, max(heartbeats(serial_log), default=0) + 2)


async def hand_over(source: RPCClient, target: RPCClient) -> str:
    """``migration.info``, ``migration.accept``, ``migration.start`` (slowed): the
    migration runs and has sent something; the runtime payload."""
    info = await source.call("migration.info", {"name": "vm"})
    accepted = await target.call(
        "migration.accept",
        {"spec": info["spec"], "runtime": info["runtime"], "address": "127.0.0.1"},
    )
    await subscribe(source)
    await source.call(
        "migration.start",
        {
            "name": "vm",
            "target": "127.0.0.1",
            "port": accepted["port"],
            "bandwidth_mib_s": SLOW_MIB_S,
        },
    )
    await sent_some(source)
    runtime: str = info["runtime"]
    return runtime


async def test_source_daemon_killed_and_restarted_follows_the_migration_again(
    daemons: tuple[EngineDaemon, EngineDaemon],
) -> None:
    """The restarted source daemon finds the migration in the runtime record and in
    QEMU, and holds the instance as `migration.start` did; a cancel then gives the
    guest back its run at the source, and only there."""
    source_node, target_node = daemons
    async with client(source_node) as source, client(target_node) as target:
        started = await start_guest(source)
        runtime = await hand_over(source, target)
        source_node.kill()
    async with client(source_node) as source, client(target_node) as target:
        info = await answer_when(source, "instance.info", lambda i: i["state"] == "migrating")
        assert info["pid"] == started["pid"]
        assert (await source.call("migration.status", {"name": "vm"}))["status"] == "active"
        with pytest.raises(RPCError) as busy:
            await source.call("instance.stop", {"name": "vm"})
        assert busy.value.code == BUSY
        assert "migration to tcp:127.0.0.1:" in busy.value.message
        cancelled = await source.call("migration.cancel", {"name": "vm"})
        assert (cancelled["status"], cancelled["error"]) == ("cancelled", "cancelled")
        await target.call(
            "migration.finalize_target", {"name": "vm", "runtime": runtime, "success": False}
        )
        info = await source.call("instance.info", {"name": "vm"})
        assert (info["state"], info["qemu_status"]) == ("running", "running")
        assert await target.call("instance.list") == []
        assert copies(started["uuid"], source_node, target_node) == [started["pid"]]
        await keeps_counting(Path(started["serial_log"]))


async def test_source_daemon_killed_under_migrate_resumes_the_guest_after_its_restart(
    daemons: tuple[EngineDaemon, EngineDaemon],
) -> None:
    """`migrate()` loses the source and gives the migration up (the target's QEMU is
    stopped); the restarted source daemon finds the migration failed and resumes the
    guest a non-live migration had paused, saying why in `migration.status`."""
    source_node, target_node = daemons
    async with client(source_node) as source, client(target_node) as target:
        started = await start_guest(source)
        async with client(source_node) as watcher, anyio.create_task_group() as tg:
            await subscribe(watcher)

            async def run() -> None:
                with pytest.raises(RPCConnectionLostError):
                    await migrate(source, target, "vm", live=False, bandwidth_mib_s=SLOW_MIB_S)

            tg.start_soon(run)
            await sent_some(watcher)
            source_node.kill()
        assert await target.call("instance.list") == []
    async with client(source_node) as source:
        status = await answer_when(source, "migration.status", lambda s: s["status"] in FINISHED)
        assert status["status"] == "failed"
        assert status["error"].startswith("ended while the source's daemon was down: ")
        info = await answer_when(source, "instance.info", lambda i: i["state"] != "paused")
        assert (info["state"], info["qemu_status"], info["pid"]) == (
            "running",
            "running",
            started["pid"],
        )
        assert copies(started["uuid"], source_node, target_node) == [started["pid"]]
        await keeps_counting(Path(started["serial_log"]))


async def test_target_daemon_killed_under_migrate_cancels_and_its_restart_cleans(
    daemons: tuple[EngineDaemon, EngineDaemon],
) -> None:
    """`migrate()` sees the target's daemon go and cancels: the guest runs on at the
    source; the target's QEMU exits by itself (its stream ended), and the restarted
    target daemon removes what was left of the incoming instance."""
    source_node, target_node = daemons
    async with client(source_node) as source:
        started = await start_guest(source)
        async with (
            client(source_node) as watcher,
            client(target_node) as target,
            anyio.create_task_group() as tg,
        ):
            await subscribe(watcher)

            async def run() -> None:
                with pytest.raises(RPCConnectionLostError):
                    await migrate(source, target, "vm", bandwidth_mib_s=SLOW_MIB_S)

            tg.start_soon(run)
            await sent_some(watcher)
            target_node.kill()
            final = await progress_until(watcher, lambda s: s["status"] in FINISHED)
        assert (final["status"], final["error"]) == ("cancelled", "cancelled")
        info = await source.call("instance.info", {"name": "vm"})
        assert (info["state"], info["qemu_status"]) == ("running", "running")
        async with client(target_node) as target:
            assert await anyio.to_thread.run_sync(target_node.settled) == []
        assert not (target_node.state_dir / "instances" / "vm").exists()
        assert copies(started["uuid"], source_node, target_node) == [started["pid"]]
        await keeps_counting(Path(started["serial_log"]))
