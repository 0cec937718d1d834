"""Fixtures for supervisor tests with the real test guest: a private state dir and config."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import GUEST_DIR
from helpers import await_until, kill_leftover_qemus

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
def state_dir(short_tmp: Path) -> Iterator[Path]:
    """A short private state dir; any QEMU left in it is killed by pid afterwards."""
    try:
        yield short_tmp
    finally:
        kill_leftover_qemus(short_tmp)


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


def serial_shows(log: Path, pattern: re.Pattern[bytes], start: int = 0) -> Callable[[], bool]:
    """A check that `pattern` shows in the serial log (QEMU's chardev logfile) after `start`."""

    def shows() -> bool:
        try:
            return pattern.search(log.read_bytes(), start) is not None
        except FileNotFoundError:
            return False

    return shows


async def wait_for_serial(
    log: Path, pattern: re.Pattern[bytes], timeout_s: float = 90, *, since_end: bool = False
) -> None:
    """Wait until `pattern` shows in the serial log.

    With `since_end`, only what is appended from now on counts (the log is appended to
    across restarts of the instance).
    """
    start = log.stat().st_size if since_end and log.exists() else 0
    await await_until(
        serial_shows(log, pattern, start), what=f"{pattern.pattern!r} in {log}", timeout_s=timeout_s
    )
