"""Errors during start-up leave as one SupervisorError with its own code, and nothing behind.

The start-up steps (passwords, pinning, balloon, ``cont``) run inside task groups; what
they raise reaches the caller as itself, never as an exception group or as a generic
hypervisor error.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest
from core.conftest import config, guest_spec, state_dir

from supervisor import Supervisor
from supervisor.model.config import Config
from supervisor.model.errors import InvalidConfigError, MonitorError, OperationTimeout

from .nothing_left import assert_nothing_left

__all__ = ["config", "state_dir"]  # fixtures

pytestmark = [pytest.mark.anyio, pytest.mark.guest]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_failing_startup_qmp_command_is_a_monitor_error(
    config: Config, state_dir: Path
) -> None:
    # A VNC server on a unix socket takes no password (Ganeti's rule, so QEMU is not
    # given `password=on`): QEMU refuses the `set_password` of the start-up steps.
    password = state_dir / "vnc-password"
    password.write_text("hunter2\n")
    vnc_dir = state_dir / "vnc"
    vnc_dir.mkdir()
    hvparams = {"vnc_bind_address": str(vnc_dir), "vnc_password_file": str(password)}
    async with Supervisor(config) as sup:
        with pytest.raises(MonitorError) as error:
            await sup.start(guest_spec("vncpw", hvparams=hvparams), paused=True)
        assert error.value.code == 5
        assert error.value.data["class"] == "GenericError"
        assert "set_password" in error.value.data["desc"]
        assert "'vncpw'" in str(error.value)
        assert "hunter2" not in str(error.value)
        assert_nothing_left(sup, state_dir, "vncpw")


async def test_a_pinning_failure_names_cpu_mask(
    config: Config, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: validation is told the host has 64 CPUs (as if CPU 63 went
    # offline between validation and start-up), so pinning itself fails.
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    async with Supervisor(config) as sup:
        with pytest.raises(InvalidConfigError) as error:
            await sup.start(guest_spec("pinned", hvparams={"cpu_mask": "63"}), paused=True)
        assert error.value.code == 7
        assert error.value.path == "spec.hvparams.cpu_mask"
        assert "cannot pin" in error.value.reason
        assert "63" in error.value.reason
        assert_nothing_left(sup, state_dir, "pinned")


async def test_the_start_deadline_is_a_timeout(config: Config, state_dir: Path) -> None:
    # No QEMU execs, initialises and greets on its monitor within a millisecond.
    config = msgspec.structs.replace(config, start_timeout_s=0.001)
    async with Supervisor(config) as sup:
        with pytest.raises(OperationTimeout) as error:
            await sup.start(guest_spec("late"), paused=True)
        assert error.value.code == 6
        assert error.value.data["timeout_s"] == 0.001
        assert "start of 'late'" in str(error.value)
        assert "start_timeout_s" in str(error.value)
        assert_nothing_left(sup, state_dir, "late")


async def test_the_supervisor_keeps_working_after_failed_starts(
    config: Config, state_dir: Path
) -> None:
    async with Supervisor(config) as sup:
        with pytest.raises(InvalidConfigError):
            await sup.start(guest_spec("again", hvparams={"cpu_mask": "0:1"}), paused=True)
        info = await sup.start(guest_spec("again"), paused=True)
        assert info.state == "paused"
        assert (await sup.stop("again", force=True)).state == "stopped"
