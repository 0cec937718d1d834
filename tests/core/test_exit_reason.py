"""How QEMU's exit is judged when its last QMP event and its exit arrive together."""

from __future__ import annotations

import os
import signal

import anyio
import pytest
from helpers import wait_gone

from supervisor import Supervisor
from supervisor.engine.events import Subscription, SupervisorEvent
from supervisor.model.config import Config

from .conftest import guest_spec

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]

#: Each round is one chance for the race; before the fix about one in three lost it.
ROUNDS = 8


async def final_state(events: Subscription) -> SupervisorEvent:
    with anyio.fail_after(60):
        async for event in events:
            if event.data["state"] in ("stopped", "crashed"):
                return event
    raise AssertionError("the instance.state events ended")


async def test_a_shutdown_seen_together_with_the_exit_is_a_stop_not_a_crash(
    config: Config,
) -> None:
    async with (
        Supervisor(config) as sup,
        sup.events(instances=["term"], kinds=["instance.state"]) as events,
    ):
        spec = guest_spec("term", restart="on-crash")
        for _ in range(ROUNDS):
            info = await sup.start(spec, paused=True)
            assert info.pid is not None
            # QEMU shuts down cleanly on SIGTERM: a SHUTDOWN event, then its exit. The
            # event loop is held (blocking calls) until it has exited, as a loaded
            # machine may hold it: the event and the pidfd then turn readable together.
            os.kill(info.pid, signal.SIGTERM)
            wait_gone(info.pid)
            final = await final_state(events)
            assert final.data["state"] == "stopped", final.data
            assert sup.info("term").restarts == 0
