"""Blocking file-system work (record saves, uid-pool scans of /proc) runs off the event loop."""

from __future__ import annotations

import os
import threading
from collections import Counter

import msgspec
import pytest

from supervisor import Supervisor
from supervisor.host import uidpool
from supervisor.model.config import Config
from supervisor.model.errors import SupervisorError
from supervisor.model.spec import decode_spec

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_record_saves_and_uid_pool_scans_run_in_worker_threads(
    bare_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Counter[tuple[str, bool]] = Counter()
    rename, uids_in_use = os.rename, uidpool.uids_in_use

    def on_loop() -> bool:
        return threading.current_thread() is threading.main_thread()

    def watched_rename(source: str, destination: str) -> None:
        calls["rename", on_loop()] += 1
        rename(source, destination)

    def watched_scan() -> set[int]:
        calls["uids_in_use", on_loop()] += 1
        return uids_in_use()

    monkeypatch.setattr(os, "rename", watched_rename)
    monkeypatch.setattr(uidpool, "uids_in_use", watched_scan)
    config = msgspec.structs.replace(bare_config, uid_pool=["64010-64011"])
    spec = {"name": "w1", "memory_mib": 64, "hvparams": {"security_model": "pool"}}
    async with Supervisor(config) as sup:
        await sup.start(decode_spec(spec), paused=True)
        await sup.reboot("w1")
        await sup.stop("w1", force=True)
        # A failed start puts the earlier record back.
        bad = {**spec, "hvparams": {"security_model": "pool", "kvm_path": "/nonexistent"}}
        with pytest.raises(SupervisorError):
            await sup.start(decode_spec(bad))
        await sup.cleanup("w1")
    assert calls["rename", False] and calls["uids_in_use", False], calls
    assert not calls["rename", True] and not calls["uids_in_use", True], calls
