"""A QEMU told to go by someone else than the supervisor is recorded with the reason QEMU
gave (its SHUTDOWN event), not as a power-down nobody asked for."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from core.conftest import config, guest_spec, state_dir

from supervisor import Supervisor
from supervisor.model.config import Config
from supervisor.model.states import InstanceState, exit_for_shutdown

from .nothing_left import qemus_of

__all__ = ["config", "state_dir"]  # fixtures

S = InstanceState


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _sigterm(sup: Supervisor, name: str) -> None:
    pid = sup.info(name).pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)


async def _qmp(sup: Supervisor, name: str, command: str) -> None:
    # An embedding program talking to QEMU itself (the RPC surface refuses these).
    client = sup.instance(name).qmp
    assert client is not None
    await client.execute(command)


async def _quit(sup: Supervisor, name: str) -> None:
    await _qmp(sup, name, "quit")


async def _system_reset(sup: Supervisor, name: str) -> None:
    await _qmp(sup, name, "system_reset")


@pytest.mark.anyio
@pytest.mark.guest
@pytest.mark.parametrize(
    ("tell_qemu", "reason", "qemu_reason", "hvparams"),
    [
        (_sigterm, "signal", "host-signal", {}),
        (_quit, "quit", "host-qmp-quit", {}),
        (_system_reset, "reset", "host-qmp-system-reset", {"reboot_behavior": "exit"}),
    ],
    ids=["sigterm", "qmp-quit", "system-reset-with-no-reboot"],
)
async def test_qemu_told_to_go_is_stopped_with_qemus_reason(
    config: Config,
    state_dir: Path,
    tell_qemu: Callable[[Supervisor, str], Awaitable[None]],
    reason: str,
    qemu_reason: str,
    hvparams: dict[str, str],
) -> None:
    async with Supervisor(config) as sup, sup.events(kinds=["instance.state"]) as events:
        await sup.start(guest_spec("told", hvparams=hvparams), paused=True)
        await tell_qemu(sup, "told")
        with anyio.fail_after(30):
            async for event in events:
                if event.data["state"] in ("stopped", "crashed"):
                    break
        assert (event.data["state"], event.data["reason"]) == ("stopped", reason)
        assert event.data["qemu_reason"] == qemu_reason
        assert (sup.info("told").state, sup.info("told").reason) == ("stopped", reason)
    assert qemus_of(state_dir) == []


@pytest.mark.parametrize(
    ("cause", "outcome"),
    [
        ("guest-shutdown", (S.STOPPED, "guest-shutdown")),
        ("guest-reset", (S.STOPPED, "guest-reset")),
        ("guest-panic", (S.CRASHED, "guest-panic")),
        ("host-error", (S.CRASHED, "host-error")),
        ("host-ui", (S.STOPPED, "ui")),
        ("subsystem-reset", (S.STOPPED, "reset")),
        ("a-cause-of-a-later-qemu", (S.STOPPED, "shutdown")),
    ],
)
def test_every_shutdown_cause_has_an_honest_reason(
    cause: str, outcome: tuple[InstanceState, str]
) -> None:
    assert exit_for_shutdown(cause) == outcome
