"""Live migration between two daemons on one host, with the real test guest."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from core.conftest import guest_spec
from core.sshd import Sshd, private_sshd
from helpers import await_until, wait_gone

from protocols.jsonrpc import RPCError
from supervisor.control.migrate import migrate
from supervisor.model.api import MigrationStatus
from supervisor.model.config import Config
from supervisor.qemu.migration_progress import FINISHED

from .conftest import (
    SLOW_MIB_S,
    Daemon,
    counts_on_across,
    daemon,
    heartbeats,
    progress_until,
    serial_output,
    two_daemons,
    wait_heartbeat,
)

pytestmark = [pytest.mark.anyio, pytest.mark.guest]

CLI = [sys.executable, "-m", "supervisor.cli"]
MIGRATION_ERROR = 8


async def states_until(events: Any, state: str, timeout_s: float = 60) -> list[tuple[str, str]]:
    """``(state, reason)`` of each ``instance.state`` event up to the first into `state`."""
    seen = []
    with anyio.fail_after(timeout_s):
        async for event in events:
            if event.kind == "instance.state":
                seen.append((event.data["state"], event.data["reason"]))
                if event.data["state"] == state:
                    return seen
    raise AssertionError("the events ended")


def assert_cleaned(node: Daemon, name: str) -> None:
    """Nothing of `name` is left in `node`'s daemon: no instance, no runtime dir."""
    assert node.sup.list() == []
    assert not (Path(node.sup.config.state_dir) / "instances" / name).exists()


async def test_live_migration_carries_the_running_guest_over(
    configs: tuple[Config, Config],
) -> None:
    source_config, target_config = configs
    async with daemon(source_config) as source:
        started = await source.sup.start(guest_spec("vm", memory_mib=256))
        assert started.pid is not None
        source_log = source.sup.instance("vm").paths.serial_log
        await wait_heartbeat(source_log, 2)
        left_behind: list[bytes] = []

        def on_progress(status: MigrationStatus) -> None:
            if status.status == "completed":
                # The source's guest is stopped now: its serial output is final.
                left_behind.append(serial_output(source_log))

        async with (
            daemon(target_config) as target,
            source.sup.events(instances=["vm"], kinds=["instance.state"]) as source_states,
            target.sup.events(instances=["vm"], kinds=["instance.state"]) as target_states,
        ):
            result = await migrate(
                source.client, target.client, "vm", downtime_ms=300, on_progress=on_progress
            )
            assert result.status.status == "completed"
            assert result.status.downtime_ms is not None
            assert (result.instance.state, result.instance.uuid) == ("running", started.uuid)
            # The guest goes on counting where it was: no reboot.
            target_log = target.sup.instance("vm").paths.serial_log
            await counts_on_across(left_behind[-1], target_log)
            uuid = await target.call("instance.qmp", name="vm", command="query-uuid")
            assert uuid["return"]["UUID"] == started.uuid
            # The source is cleaned: its QEMU ended, its runtime removed.
            wait_gone(started.pid)
            assert_cleaned(source, "vm")
            assert await states_until(source_states, "stopped") == [
                ("migrating", "migration started"),
                ("stopping", "stop requested"),
                ("stopped", "migrated"),
            ]
            assert [state for state, _ in await states_until(target_states, "running")] == [
                "starting",
                "incoming",
                "running",
            ]
            pid = target.sup.info("vm").pid
        # The target's daemon left (the guest runs on): the next one adopts the instance.
        async with daemon(target_config) as target:
            await target.sup.instance("vm").monitor_ready.wait()
            adopted = target.sup.info("vm")
            assert (adopted.state, adopted.pid) == ("running", pid)
            await wait_heartbeat(target_log, max(heartbeats(target_log)) + 1)
            await target.sup.stop("vm", force=True)


async def test_non_live_migration_over_the_cli_ends_with_the_guest_running(
    configs: tuple[Config, Config],
) -> None:
    async with two_daemons(configs) as (source, target):
        started = await source.sup.start(guest_spec("vm"))
        command = [
            "migrate", "vm", "--to", str(target.socket), "--non-live", "--json",
            "--socket", str(source.socket),
        ]  # fmt: skip
        result = await anyio.run_process([*CLI, *command], check=False)
        assert result.returncode == 0, result.stderr.decode()
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        progress, outcome = lines[:-1], lines[-1]
        assert progress[-1]["status"] == "completed"
        assert outcome["outcome"] == "completed"
        assert outcome["instance"]["uuid"] == started.uuid
        # Paused for the move, running again on the target.
        info = target.sup.info("vm")
        assert (info.state, info.qemu_status) == ("running", "running")
        assert (await target.sup.qmp("vm", "query-status"))["status"] == "running"
        assert_cleaned(source, "vm")
        await target.sup.stop("vm", force=True)


async def test_cancel_mid_way_leaves_the_guest_running_on_the_source(
    configs: tuple[Config, Config],
) -> None:
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"))
        async with (
            source.sup.events(instances=["vm"], kinds=["migration.progress"]) as progress,
            anyio.create_task_group() as tg,
        ):
            outcome: list[BaseException] = []

            async def run() -> None:
                try:
                    await migrate(source.client, target.client, "vm", bandwidth_mib_s=SLOW_MIB_S)
                except RPCError as error:
                    outcome.append(error)

            tg.start_soon(run)
            await progress_until(progress, lambda s: s["transferred_mib"] > 0)
            # While it runs, the instance is held: the migration is named ...
            for method, params in (
                ("instance.stop", {}),
                ("instance.reboot", {}),
                ("instance.balloon", {"memory_mib": 64}),
            ):
                with pytest.raises(RPCError) as busy:
                    await source.call(method, name="vm", **params)
                assert busy.value.code == 9
                assert "migration to tcp:127.0.0.1:" in busy.value.message
            # ... and its figures and its cancel get through.
            assert (await source.call("migration.status", name="vm"))["status"] == "active"
            cancelled = await source.call("migration.cancel", name="vm")
            assert (cancelled["status"], cancelled["error"]) == ("cancelled", "cancelled")
        [error] = outcome
        assert error.code == MIGRATION_ERROR
        assert error.data["status"]["status"] == "cancelled"
        info = source.sup.info("vm")
        assert (info.state, info.qemu_status) == ("running", "running")
        assert (await source.sup.qmp("vm", "query-status"))["status"] == "running"
        capabilities = await source.sup.qmp("vm", "query-migrate-capabilities")
        assert not any(c["state"] for c in capabilities)
        assert_cleaned(target, "vm")


async def test_target_qemu_killed_mid_way_resumes_the_source(
    configs: tuple[Config, Config],
) -> None:
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"))
        async with (
            source.sup.events(instances=["vm"], kinds=["migration.progress"]) as progress,
            target.sup.events(instances=["vm"], kinds=["instance.state"]) as target_states,
            anyio.create_task_group() as tg,
        ):
            outcome: list[RPCError] = []

            async def run() -> None:
                with pytest.raises(RPCError) as error:
                    # Non-live: the source's guest is paused by the migration, and must
                    # be running again after it failed.
                    await migrate(
                        source.client, target.client, "vm", live=False, bandwidth_mib_s=SLOW_MIB_S
                    )
                outcome.append(error.value)

            tg.start_soon(run)
            await progress_until(progress, lambda s: s["transferred_mib"] > 0)
            pid = target.sup.info("vm").pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert (await states_until(target_states, "stopped"))[-1] == (
                "stopped",
                "migration-failed",
            )
        [error] = outcome
        assert error.code == MIGRATION_ERROR
        assert error.data["status"]["status"] == "failed"
        assert error.data["status"]["error"]  # QEMU's reason
        info = source.sup.info("vm")
        assert (info.state, info.qemu_status) == ("running", "running")
        assert (await source.sup.qmp("vm", "query-status"))["status"] == "running"
        await await_until(lambda: target.sup.list() == [], what="target clean", timeout_s=30)
        assert_cleaned(target, "vm")


async def test_source_qemu_killed_mid_way_ends_the_migration_and_cleans_the_target(
    configs: tuple[Config, Config],
) -> None:
    async with two_daemons(configs) as (source, target):
        started = await source.sup.start(guest_spec("vm"))
        assert started.pid is not None
        async with (
            source.sup.events(instances=["vm"], kinds=["migration.progress"]) as progress,
            anyio.create_task_group() as tg,
        ):
            outcome: list[RPCError] = []

            async def run() -> None:
                with pytest.raises(RPCError) as error:
                    await migrate(source.client, target.client, "vm", bandwidth_mib_s=SLOW_MIB_S)
                outcome.append(error.value)

            tg.start_soon(run)
            await progress_until(progress, lambda s: s["transferred_mib"] > 0)
            os.kill(started.pid, signal.SIGKILL)
        [error] = outcome
        assert error.code == MIGRATION_ERROR
        assert error.data["status"]["status"] == "failed"
        assert error.data["status"]["error"] == "the source's QEMU exited during the migration"
        assert (source.sup.info("vm").state, source.sup.info("vm").reason) == ("crashed", "crashed")
        await await_until(lambda: target.sup.list() == [], what="target clean", timeout_s=30)
        assert_cleaned(target, "vm")


class Relay:
    """A TCP relay between the source and the target that stops forwarding after
    `limit` bytes: a cut network (it no longer reads the source) or, with `swallow`, a
    black hole (it reads the source on and drops what it reads), without a namespace.

    The source side is a bare socket, read only when the relay asks: an anyio stream
    may read ahead into memory of its own.
    """

    def __init__(self, target_port: int, limit: int, *, swallow: bool) -> None:
        self.target_port = target_port
        self.limit = limit
        self.swallow = swallow
        self.forwarded = 0
        self.cut = anyio.Event()

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        with socket.socket() as listener:
            # Inherited by the accepted connection, and never grown by the kernel: little
            # more than `limit` leaves the source before it stalls.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            listener.setblocking(False)
            task_status.started(listener.getsockname()[1])
            await anyio.wait_readable(listener)
            connection, _ = listener.accept()
        with connection:
            connection.setblocking(False)
            async with await anyio.connect_tcp("127.0.0.1", self.target_port) as target:
                while self.forwarded < self.limit:
                    await anyio.wait_readable(connection)
                    data = connection.recv(65536)
                    await target.send(data)
                    self.forwarded += len(data)
                self.cut.set()
                while self.swallow:
                    await anyio.wait_readable(connection)
                    connection.recv(65536)
                await anyio.sleep_forever()  # both connections stay open, silent


@pytest.mark.parametrize("swallow", [False, True], ids=["cut", "black-hole"])
async def test_stall_guard_cancels_a_stream_that_stopped_moving(
    configs: tuple[Config, Config], swallow: bool
) -> None:
    """A cut stream stops moving at once; one a black hole swallows is sent to its end,
    and then the source waits for the target's confirmation (return-path), which never
    comes: either way the guest runs on at the source, never nowhere."""
    async with two_daemons(configs) as (source, target), anyio.create_task_group() as tg:
        await source.sup.start(guest_spec("vm"))
        # A booted guest's memory: a stream far larger than the socket buffers on its way,
        # which would let a stream that is only a few MiB reach `completed` regardless.
        await wait_heartbeat(source.sup.instance("vm").paths.serial_log, 1)
        # The four steps by hand: the source is sent to the relay, not to the target.
        info = await source.call("migration.info", name="vm")
        accepted = await target.call(
            "migration.accept", spec=info["spec"], runtime=info["runtime"], address="127.0.0.1"
        )
        assert accepted["instance"]["state"] == "incoming"
        relay = Relay(accepted["port"], limit=1024 * 1024, swallow=swallow)
        relay_port = await tg.start(relay.serve)
        async with source.sup.events(instances=["vm"], kinds=["migration.progress"]) as progress:
            started = await source.call(
                "migration.start", name="vm", target="127.0.0.1", port=relay_port
            )
            assert started["status"]["status"] == "setup"
            final = await progress_until(progress, lambda s: s["status"] in FINISHED)
        assert relay.cut.is_set()
        assert final["status"] == "cancelled"
        assert final["stalled"] is True
        assert final["error"].startswith("stalled: no byte moved for ")
        assert source.sup.info("vm").state == "running"
        assert (await source.sup.qmp("vm", "query-status"))["status"] == "running"
        await source.call("migration.finalize_source", name="vm", success=False)
        await target.call(
            "migration.finalize_target", name="vm", runtime=info["runtime"], success=False
        )
        assert_cleaned(target, "vm")
        assert source.sup.info("vm").state == "running"
        tg.cancel_scope.cancel()


async def read_until(fd: int, needle: bytes, timeout_s: float = 60) -> bytes:
    """What the terminal behind `fd` (a pty's master) shows, up to `needle`."""
    seen = b""
    with anyio.fail_after(timeout_s):
        while needle not in seen:
            await anyio.wait_readable(fd)
            seen += os.read(fd, 4096)
    return seen


@pytest.fixture
def sshd() -> Iterator[Sshd]:
    with private_sshd() as server:
        yield server


async def test_cli_over_ssh_shows_progress_on_a_terminal_and_ctrl_c_cancels(
    configs: tuple[Config, Config], sshd: Sshd
) -> None:
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"))
        command = [
            *CLI, "migrate", "vm", "--to", sshd.url(target.socket), "--address", "127.0.0.1",
            "--bandwidth", str(SLOW_MIB_S), "--socket", str(source.socket),
        ]  # fmt: skip
        environment = {**os.environ, "KVM_SUPERVISOR_SSH": sshd.ssh_command}
        master, terminal = pty.openpty()
        try:
            process = await anyio.open_process(
                command, stdin=subprocess.DEVNULL, stdout=terminal, env=environment
            )
            os.close(terminal)
            terminal = -1
            async with process:
                shown = await read_until(master, b"MiB to go")
                # One line, redrawn in place.
                assert shown.startswith(b"\rvm  ")
                assert b"% " in shown
                process.send_signal(signal.SIGINT)
                with anyio.fail_after(60):
                    status = await process.wait()
                assert process.stderr is not None
                complaint = await process.stderr.receive()
        finally:
            os.close(master)
            if terminal != -1:
                os.close(terminal)
        assert status == 130
        assert b"cancelled: it runs on the source" in complaint
        info = source.sup.info("vm")
        assert (info.state, info.qemu_status) == ("running", "running")
        assert_cleaned(target, "vm")
