"""What a migration refuses before anything moves, on both anyio backends: guests that
never boot (``-S``), so these run in seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from core.conftest import guest_spec

from protocols.jsonrpc import RPCError
from supervisor.control.migrate import migrate
from supervisor.model.config import Config

from .conftest import daemon, two_daemons

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]

INVALID_CONFIG = 7
BUSY = 9


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def tampered(runtime: str, **changes: Any) -> str:
    payload = json.loads(runtime)
    payload.update(changes)
    return json.dumps(payload)


def instance_dirs(config: Config) -> list[Path]:
    root = Path(config.state_dir) / "instances"
    return list(root.iterdir()) if root.exists() else []


async def test_an_unknown_capability_is_refused_naming_it(
    configs: tuple[Config, Config],
) -> None:
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"), paused=True)
        # On the target, before it listens (its QEMU is stopped again) ...
        with pytest.raises(RPCError) as refused:
            await migrate(source.client, target.client, "vm", capabilities=["xbzrle", "warp"])
        assert refused.value.code == INVALID_CONFIG
        assert refused.value.data["path"] == "capabilities"
        assert "'warp' is not a migration capability" in refused.value.message
        assert target.sup.list() == []
        assert instance_dirs(configs[1]) == []
        # ... and on the source, before anything changes there.
        info = await source.call("migration.info", name="vm")
        accepted = await target.call(
            "migration.accept", spec=info["spec"], runtime=info["runtime"], address="127.0.0.1"
        )
        with pytest.raises(RPCError) as refused:
            await source.call(
                "migration.start",
                name="vm",
                target="127.0.0.1",
                port=accepted["port"],
                capabilities=["warp"],
            )
        assert refused.value.code == INVALID_CONFIG
        assert "'warp'" in refused.value.message
        assert source.sup.info("vm").state == "paused"
        assert (await source.call("migration.status", name="vm"))["status"] == "none"
        # Not held: other operations run again.
        await source.call("instance.resume", name="vm")
        await target.call(
            "migration.finalize_target", name="vm", runtime=info["runtime"], success=False
        )
        assert target.sup.list() == []


async def test_a_guest_the_target_qemu_cannot_build_is_refused_before_anything_starts(
    configs: tuple[Config, Config],
) -> None:
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"), paused=True)
        info = await source.call("migration.info", name="vm")
        payload = json.loads(info["runtime"])
        # Nothing of the source host travels.
        assert str(configs[0].state_dir) not in info["runtime"]
        assert "argv" not in payload and "pid" not in payload
        assert payload["machine"].startswith("pc-i440fx-")
        assert "virtio-balloon-pci" in payload["devices"]
        for changes, path, words in (
            ({"machine": "pc-i440fx-1999.1"}, "runtime.machine", "is not one QEMU"),
            ({"devices": ["warp-drive-pci"]}, "runtime.devices", "has no warp-drive-pci"),
            ({"accel": "kvm"}, "runtime.accel", "cannot migrate between accelerators"),
        ):
            with pytest.raises(RPCError) as refused:
                await target.call(
                    "migration.accept",
                    spec=info["spec"],
                    runtime=tampered(info["runtime"], **changes),
                    address="127.0.0.1",
                )
            assert (refused.value.code, refused.value.data["path"]) == (INVALID_CONFIG, path)
            assert words in refused.value.message
            assert target.sup.list() == []
            assert instance_dirs(configs[1]) == []
        with pytest.raises(RPCError) as refused:
            await target.call(
                "migration.accept",
                spec={**info["spec"], "memory_mib": 512},
                runtime=info["runtime"],
                address="127.0.0.1",
            )
        assert refused.value.data["path"] == "spec.memory_mib"
        with pytest.raises(RPCError) as refused:
            await target.call(
                "migration.accept", spec=info["spec"], runtime="{}", address="127.0.0.1"
            )
        assert refused.value.data["path"] == "runtime.version"


async def test_an_incoming_instance_is_held_and_adopted_after_a_daemon_restart(
    configs: tuple[Config, Config],
) -> None:
    async with daemon(configs[0]) as source:
        await source.sup.start(guest_spec("vm"), paused=True)
        info = await source.call("migration.info", name="vm")
        async with daemon(configs[1]) as target:
            accepted = await target.call(
                "migration.accept", spec=info["spec"], runtime=info["runtime"], address="127.0.0.1"
            )
            pid = accepted["instance"]["pid"]
        async with daemon(configs[1]) as target:
            await target.sup.instance("vm").monitor_ready.wait()
            adopted = target.sup.info("vm")
            assert (adopted.state, adopted.pid) == ("incoming", pid)
            with pytest.raises(RPCError) as busy:
                await target.call("instance.stop", name="vm")
            assert busy.value.code == BUSY
            assert "incoming migration" in busy.value.message
            status = await target.call("migration.status", name="vm")
            assert status["status"] == "none"  # listening, nothing sent yet
            cancelled = await target.call("migration.cancel", name="vm")
            assert cancelled["status"] == "cancelled"
            assert target.sup.list() == []
            assert instance_dirs(configs[1]) == []
