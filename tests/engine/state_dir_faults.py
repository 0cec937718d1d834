"""Child of `test_host_io_errors`: starts against a full state dir and a read-only one.

Run as ``unshare -m --propagation private python -m engine.state_dir_faults BACKEND DIR``
with the test's `Config` as JSON on stdin: it mounts a small tmpfs at DIR in its own
mount namespace (gone with the process), runs the starts and prints one JSON line of
what it saw. Every QEMU it started is killed by pid before it exits.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec

from supervisor import Supervisor
from supervisor.model.config import Config
from supervisor.model.errors import SupervisorError
from supervisor.model.spec import decode_spec

from .nothing_left import qemus_of

#: Room for the lock file and a started instance's files, not for much more.
TMPFS_SIZE = "512k"


async def _mount(*args: str) -> None:
    await anyio.run_process(["mount", *args])


def _fill(path: Path) -> None:
    """Write `path` until the filesystem is full."""
    chunk = b"\0" * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


async def _failed_start(sup: Supervisor, state_dir: Path, name: str) -> dict[str, Any]:
    spec = decode_spec({"name": name, "memory_mib": 96})
    try:
        await sup.start(spec, paused=True)
    except SupervisorError as error:
        outcome: dict[str, Any] = {"code": error.code, "message": str(error)}
    else:
        outcome = {"code": None, "message": "started"}
        await sup.stop(name, force=True)
    outcome["listed"] = [summary.name for summary in sup.list()]
    outcome["dir_left"] = (state_dir / "instances" / name).exists()
    outcome["qemus"] = qemus_of(state_dir)
    return outcome


async def _good_start(sup: Supervisor, name: str) -> list[str]:
    started = await sup.start(decode_spec({"name": name, "memory_mib": 96}), paused=True)
    stopped = await sup.stop(name, force=True)
    await sup.cleanup(name)
    return [started.state, stopped.state]


async def main(state_dir: Path, config: Config) -> dict[str, Any]:
    await _mount("-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "kvs-test", str(state_dir))
    config = msgspec.structs.replace(config, state_dir=str(state_dir))
    seen: dict[str, Any] = {}
    try:
        async with Supervisor(config) as sup:
            ballast = state_dir / "ballast"
            _fill(ballast)
            seen["full"] = await _failed_start(sup, state_dir, "full")
            ballast.unlink()
            seen["after_full"] = await _good_start(sup, "full")

            # The instances dir read-only (the lock file, open for writing, keeps the
            # whole tmpfs from being remounted so).
            instances = str(state_dir / "instances")
            await _mount("--bind", instances, instances)
            await _mount("-o", "remount,bind,ro", instances)
            seen["read_only"] = await _failed_start(sup, state_dir, "ro")
            await anyio.run_process(["umount", instances])
            seen["after_read_only"] = await _good_start(sup, "ro")
    finally:
        for pid in qemus_of(state_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return seen


if __name__ == "__main__":
    backend, directory = sys.argv[1], Path(sys.argv[2])
    config = msgspec.json.decode(sys.stdin.buffer.read(), type=Config)
    print(json.dumps(anyio.run(main, directory, config, backend=backend)))
