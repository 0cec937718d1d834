"""The instance is `starting` from the moment its QEMU is spawned, and a start whose
record cannot be saved after the spawn leaves neither QEMU nor trace."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from supervisor import Supervisor
from supervisor.engine import launcher
from supervisor.model.config import Config
from supervisor.model.errors import HypervisorError
from supervisor.model.spec import decode_spec
from supervisor.qemu.runtime import RuntimeRecord

from .conftest import qemus_started_in

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]

SPEC = {"name": "held", "memory_mib": 64}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_the_instance_is_starting_while_its_pid_is_saved(
    bare_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The save with the pid is held (a slow fsync on a busy disk) until the test has looked.
    save, looked, seen = launcher.store_record, anyio.Event(), []

    async def held_save(path: Path, record: RuntimeRecord) -> None:
        if record.pid is not None and not looked.is_set():
            seen.append((sup.list()[0].state, sup.instance("held").record.pid))
            looked.set()
        await save(path, record)

    monkeypatch.setattr(launcher, "store_record", held_save)
    async with Supervisor(bare_config) as sup:
        info = await sup.start(decode_spec(SPEC), paused=True)
        assert seen == [("starting", info.pid)]
        await sup.stop(info.name, force=True)


async def test_a_record_that_cannot_be_saved_after_the_spawn_leaves_nothing(
    bare_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = launcher.store_record

    async def failing_save(path: Path, record: RuntimeRecord) -> None:
        if record.pid is not None:
            raise OSError(28, "No space left on device")
        await save(path, record)

    monkeypatch.setattr(launcher, "store_record", failing_save)
    async with Supervisor(bare_config) as sup:
        with pytest.raises(HypervisorError, match="No space left on device") as failed:
            await sup.start(decode_spec(SPEC), paused=True)
        assert failed.value.code == 4
        assert qemus_started_in(Path(bare_config.state_dir)) == {}
        assert [item.name for item in sup.list()] == []
        assert not (Path(bare_config.state_dir) / "instances" / "held").exists()
