"""Embedding under asyncio and trio: the library starts, controls and leaves VMs running."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import wait_gone

from supervisor import Supervisor
from supervisor.control.server import serve_control
from supervisor.model.config import Config

from .conftest import guest_spec

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_embedded_supervisor_on_both_backends(config: Config, state_dir: Path) -> None:
    async with Supervisor(config) as sup:
        info = await sup.start(guest_spec("emb"), paused=True)
        assert (info.state, info.qemu_status) == ("paused", "paused")
        assert (await sup.qmp("emb", "query-status"))["status"] == "prelaunch"
        async with sup.events(instances=["emb"], kinds=["instance.state"]) as events:
            resumed = await sup.resume("emb")
            assert resumed.state == "running"
            event = await events.__anext__()
            assert (event.data["previous"], event.data["state"]) == ("paused", "running")
    # Leaving the block leaves the VM running; a second supervisor adopts it.
    assert info.pid is not None
    async with Supervisor(config) as sup:
        await sup.instance("emb").monitor_ready.wait()  # adoption goes on in the background
        adopted = sup.info("emb")
        assert (adopted.state, adopted.pid) == ("running", info.pid)
        stopped = await sup.stop("emb", force=True)
        assert stopped.state == "stopped"
    wait_gone(info.pid)


async def test_errors_of_the_embedding_block_leave_bare(config: Config) -> None:
    # Both layers run task groups, which would wrap the body's exception in a group.
    with pytest.raises(LookupError, match="the body's own"):
        async with Supervisor(config) as sup, serve_control(sup) as path:
            assert path.is_socket()
            raise LookupError("the body's own")
    assert not config.control_socket.exists()
