"""QEMUs adopted in the middle of a migration: states the migration code builds on.

A guest whose state went to a migration target (``postmigrate``) or comes from one
(``inmigrate``) must never run here through `resume` or `stop`'s power button.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import wait_gone

from protocols import qmp
from supervisor import Supervisor
from supervisor.model.config import Config
from supervisor.model.errors import MigrationError
from supervisor.model.spec import InstanceSpec, decode_spec

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def bare_spec(name: str, **fields: Any) -> InstanceSpec:
    return decode_spec({"name": name, "memory_mib": 64, **fields})


async def start_and_leave(config: Config, spec: InstanceSpec) -> tuple[int, Path]:
    """Start `spec` paused and leave the supervisor: QEMU keeps running, unsupervised."""
    async with Supervisor(config) as sup:
        info = await sup.start(spec, paused=True)
        assert info.pid is not None
        return info.pid, sup.instance(spec.name).paths.qmp_socket


async def migrate_away(qmp_socket: Path) -> None:
    async with qmp.connect(qmp_socket, timeout=10) as client:
        await client.execute("migrate", {"uri": "exec:cat > /dev/null"})
        # No event marks `postmigrate` (it follows MIGRATION "completed"): ask for it.
        with anyio.fail_after(30):
            while (await client.execute("query-status"))["status"] != "postmigrate":
                await anyio.sleep(0.01)


async def adopt_and_check(config: Config, name: str, state: str, qemu_status: str) -> None:
    async with Supervisor(config) as sup:
        with anyio.fail_after(30):
            await sup.instance(name).monitor_ready.wait()
        assert sup.info(name).state == state
        with pytest.raises(MigrationError):
            await sup.resume(name)
        assert (await sup.qmp(name, "query-status"))["status"] == qemu_status
        # Not forced, yet killed: the power button would need a `cont`.
        kinds = ["qmp.RESUME", "instance.state"]
        async with sup.events(instances=[name], kinds=kinds) as events:
            stopped = await sup.stop(name, timeout_s=30)
            assert (stopped.state, stopped.reason) == ("stopped", "killed")
            seen = []
            with anyio.fail_after(30):
                async for event in events:
                    seen.append(event.kind)
                    if event.data.get("state") == "stopped":
                        break
        assert "qmp.RESUME" not in seen, seen


async def test_a_qemu_adopted_after_migrating_away_is_never_resumed(
    bare_config: Config,
) -> None:
    pid, qmp_socket = await start_and_leave(bare_config, bare_spec("away"))
    await migrate_away(qmp_socket)
    await adopt_and_check(bare_config, "away", "paused", "postmigrate")
    wait_gone(pid)


async def test_a_qemu_adopted_while_waiting_for_a_migration_is_incoming(
    bare_config: Config,
) -> None:
    spec = bare_spec("inbound", hvparams={"kvm_extra": "-incoming defer"})
    pid, _ = await start_and_leave(bare_config, spec)
    await adopt_and_check(bare_config, "inbound", "incoming", "inmigrate")
    wait_gone(pid)
