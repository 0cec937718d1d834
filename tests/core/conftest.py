"""Fixtures for supervisor tests with the real test guest: a private state dir and config."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import GUEST_DIR

from supervisor.model.config import Config, check_config
from supervisor.model.spec import InstanceSpec, decode_spec

#: Boots the test guest quickly under TCG (see tests/guest/init).
FAST_KERNEL_ARGS = "quiet tsc=reliable no_timer_check mitigations=off"
READY = re.compile(rb"KVS-GUEST-READY")
GUEST_MIB = 96


@pytest.fixture
def anyio_backend() -> str:
    """Real-guest tests need one backend only (embedding is tested on both elsewhere)."""
    return "asyncio"


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short private state dir; any QEMU left in it is killed by pid afterwards."""
    path = Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))
    try:
        yield path
    finally:
        kill_leftover_qemus(path)
        shutil.rmtree(path, ignore_errors=True)


def kill_leftover_qemus(state_dir: Path) -> None:
    """Kill QEMUs whose pid file lies in `state_dir` (only ours: the pid file says so)."""
    for pid_file in state_dir.glob("instances/*/qemu.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(state_dir).encode() in cmdline:
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def config(state_dir: Path) -> Config:
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail("the test guest is missing: run `make guest`")
    instances = state_dir / "defs"
    instances.mkdir()
    return check_config_dict(
        {
            "state_dir": str(state_dir),
            "instances_dir": str(instances),
            "stop_timeout_s": 30.0,
            "hvparams": {
                "kernel_path": str(GUEST_DIR / "vmlinuz"),
                "initrd_path": str(GUEST_DIR / "initrd.img"),
                "kernel_args": FAST_KERNEL_ARGS,
                "serial_console": True,
            },
        }
    )


def check_config_dict(values: dict[str, Any]) -> Config:
    import msgspec

    config = msgspec.convert(values, Config)
    check_config(config)
    return config


def guest_spec(name: str, **fields: Any) -> InstanceSpec:
    return decode_spec({"name": name, "memory_mib": GUEST_MIB, **fields})


async def wait_for_serial(
    log: Path, pattern: re.Pattern[bytes], timeout_s: float = 90, *, since_end: bool = False
) -> None:
    """Wait until `pattern` shows in the serial log (QEMU's chardev logfile).

    With `since_end`, only what is appended from now on counts (the log is appended to
    across restarts of the instance).
    """
    start = log.stat().st_size if since_end and log.exists() else 0
    with anyio.fail_after(timeout_s):
        while True:
            with contextlib.suppress(FileNotFoundError):
                if pattern.search(log.read_bytes(), start):
                    return
            await anyio.sleep(0.1)


def wait_gone(pid: int, timeout_s: float = 10) -> None:
    """Wait until `pid` is gone or a zombie."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.02)
    raise TimeoutError(f"process {pid} still alive")
