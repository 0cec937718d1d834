"""Blocking file-system work (record saves, uid-pool scans of /proc, the removal of an
instance's dir) runs off the event loop."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path

import anyio
import msgspec
import pytest

from supervisor import Supervisor
from supervisor.host import uidpool
from supervisor.model.config import Config
from supervisor.model.errors import SupervisorError
from supervisor.model.spec import decode_spec
from supervisor.qemu import runtime

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_record_saves_and_uid_pool_scans_run_in_worker_threads(
    bare_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Counter[tuple[str, bool]] = Counter()
    replace_file, uids_in_use = runtime.replace_file, uidpool.uids_in_use

    def on_loop() -> bool:
        return threading.current_thread() is threading.main_thread()

    def watched_save(path: Path, data: bytes, *, mode: int) -> None:
        calls["save", on_loop()] += 1
        replace_file(path, data, mode=mode)

    def watched_scan() -> set[int]:
        calls["uids_in_use", on_loop()] += 1
        return uids_in_use()

    monkeypatch.setattr(runtime, "replace_file", watched_save)
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
    assert calls["save", False] and calls["uids_in_use", False], calls
    assert not calls["save", True] and not calls["uids_in_use", True], calls


async def test_a_cleaned_up_dir_is_gone_at_once_and_removed_in_a_worker_thread(
    bare_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cleanup`` moves the instance's dir into the trash (one rename); its files, a
    serial log of any size among them, are removed in a worker thread."""
    removals: list[bool] = []
    rmtree = shutil.rmtree

    def watched_rmtree(path: str, *args: object, **kwargs: object) -> None:
        removals.append(threading.current_thread() is threading.main_thread())
        rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "rmtree", watched_rmtree)
    async with Supervisor(bare_config) as sup:
        await sup.start(decode_spec({"name": "w1", "memory_mib": 64}), paused=True)
        directory = sup.instance("w1").paths.directory
        await sup.stop("w1", force=True)
        await sup.cleanup("w1")
        assert not directory.exists()
        with anyio.fail_after(10):
            while any(sup.state_dir.trash_dir.iterdir()):
                await anyio.sleep(0.01)
    assert removals == [False], removals


async def test_what_a_killed_daemon_left_in_the_trash_is_removed_at_start(
    bare_config: Config,
) -> None:
    trash = Path(bare_config.state_dir) / "trash"
    (trash / "w1.0123abcd").mkdir(parents=True, mode=0o700)
    (trash / "w1.0123abcd" / "serial.log").write_text("boot\n")
    trash.chmod(0o700)
    async with Supervisor(bare_config):
        with anyio.fail_after(10):
            while any(trash.iterdir()):
                await anyio.sleep(0.01)
