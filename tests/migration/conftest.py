"""Two daemons on one host, in the test's event loop: each a `Supervisor` with its own
state dir and control socket, and a JSON-RPC client of each socket.

The test guest boots under TCG; any QEMU a test leaves in either state dir is killed by
pid afterwards.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import GUEST_DIR
from core.conftest import FAST_KERNEL_ARGS, check_config_dict
from helpers import await_until, kill_leftover_qemus

from protocols.jsonrpc import RPCClient, connect_unix
from supervisor import Supervisor
from supervisor.control.server import serve_control
from supervisor.model.config import Config
from supervisor.qemu.migration_progress import FINISHED

#: A whole heartbeat line: one the guest was writing when it stopped is cut in two, its
#: start in the source's log and its end in the target's.
HEARTBEAT = re.compile(rb"KVS-HEARTBEAT (\d+)\r?\n")
#: Short, so the stall guard's test does not wait 30 s.
STALL_TIMEOUT_S = 2.0
#: Slow enough that a test can act while the migration runs (a test guest sends tens of
#: MiB), fast enough for the migrations that are meant to complete.
SLOW_MIB_S = 1


@pytest.fixture
def anyio_backend() -> str:
    """Real-guest tests run on asyncio (embedding is tested on both backends elsewhere)."""
    return "asyncio"


def _state_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))


@pytest.fixture
def state_dirs() -> Iterator[tuple[Path, Path]]:
    """Two short private state dirs; QEMUs left in them are killed, by pid, afterwards."""
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail("the test guest is missing: run `make guest`")
    dirs = (_state_dir(), _state_dir())
    try:
        yield dirs
    finally:
        for path in dirs:
            kill_leftover_qemus(path)
            shutil.rmtree(path, ignore_errors=True)


def daemon_config(state_dir: Path, **extra: Any) -> Config:
    return check_config_dict(
        {
            "state_dir": str(state_dir),
            "instances_dir": str(state_dir / "defs"),
            "migration_stall_timeout_s": STALL_TIMEOUT_S,
            "migration_progress_interval_s": 0.2,
            "hvparams": {
                "kernel_path": str(GUEST_DIR / "vmlinuz"),
                "initrd_path": str(GUEST_DIR / "initrd.img"),
                "kernel_args": FAST_KERNEL_ARGS,
                "serial_console": True,
            },
            **extra,
        }
    )


@pytest.fixture
def configs(state_dirs: tuple[Path, Path]) -> tuple[Config, Config]:
    return daemon_config(state_dirs[0]), daemon_config(state_dirs[1])


@dataclass
class Daemon:
    """A supervisor serving its control socket, and a client of that socket."""

    sup: Supervisor
    socket: Path
    client: RPCClient

    async def call(self, method: str, **params: Any) -> Any:
        return await self.client.call(method, params)


@asynccontextmanager
async def daemon(config: Config) -> AsyncIterator[Daemon]:
    async with (
        Supervisor(config) as sup,
        serve_control(sup) as path,
        connect_unix(path) as client,
    ):
        yield Daemon(sup, path, client)


@asynccontextmanager
async def two_daemons(configs: tuple[Config, Config]) -> AsyncIterator[tuple[Daemon, Daemon]]:
    """The source's daemon and the target's."""
    async with AsyncExitStack() as stack:
        source = await stack.enter_async_context(daemon(configs[0]))
        target = await stack.enter_async_context(daemon(configs[1]))
        yield source, target


async def migrate_steps(
    source: Daemon,
    target: Daemon,
    name: str = "vm",
    *,
    accept: dict[str, Any] | None = None,
    start: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """``migration.info``, ``.accept`` and ``.start`` of `name` (with the params in
    `accept` and `start` besides), followed to its end on the source's events, without
    finalizing: the runtime payload and the last status."""
    info = await source.call("migration.info", name=name)
    accepted = await target.call(
        "migration.accept",
        spec=info["spec"],
        runtime=info["runtime"],
        address="127.0.0.1",
        **(accept or {}),
    )
    async with source.sup.events(instances=[name], kinds=["migration.progress"]) as events:
        await source.call(
            "migration.start",
            name=name,
            target="127.0.0.1",
            port=accepted["port"],
            **(start or {}),
        )
        with anyio.fail_after(60):
            async for event in events:
                if event.data["status"] in FINISHED:
                    return info["runtime"], str(event.data["status"])
    raise AssertionError("the source's events ended before the migration did")


def serial_output(log: Path) -> bytes:
    """What a serial log holds so far; nothing before QEMU made it."""
    try:
        return log.read_bytes()
    except FileNotFoundError:
        return b""


def heartbeats_in(text: bytes) -> list[int]:
    """The numbers of the whole heartbeat lines in serial output, in order."""
    return [int(number) for number in HEARTBEAT.findall(text)]


def heartbeats(log: Path) -> list[int]:
    """The numbers of the whole heartbeat lines in a serial log, in order."""
    return heartbeats_in(serial_output(log))


async def counts_on_across(left_behind: bytes, target_log: Path) -> None:
    """The guest counts on at the target from where it stopped at the source, no number
    skipped and no reboot. `left_behind` is the source's serial output once its guest
    stopped for good; the two logs read as one console, since the line the guest was
    writing at the switch-over begins in one and ends in the other."""
    last = heartbeats_in(left_behind)[-1]
    await wait_heartbeat(target_log, last + 2)
    arrived = serial_output(target_log)
    numbers = heartbeats_in(left_behind + arrived)
    assert numbers[numbers.index(last) :][:3] == [last, last + 1, last + 2]
    assert b"KVS-GUEST-READY" not in arrived


async def wait_heartbeat(log: Path, at_least: int, timeout_s: float = 90) -> list[int]:
    """Wait for a heartbeat numbered `at_least` or more; the numbers seen."""
    await await_until(
        lambda: any(n >= at_least for n in heartbeats(log)),
        what=f"heartbeat {at_least} in {log}",
        timeout_s=timeout_s,
    )
    return heartbeats(log)


async def progress_until(events: Any, predicate: Any, timeout_s: float = 60) -> dict[str, Any]:
    """The first ``migration.progress`` event's data that `predicate` accepts."""
    with anyio.fail_after(timeout_s):
        async for event in events:
            if event.kind == "migration.progress" and predicate(event.data):
                return dict(event.data)
    raise AssertionError("the events ended")
