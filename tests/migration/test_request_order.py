"""The order in which `migrate()` sends its requests: what each end waits on longest
goes out first. A guest that never boots (``-S``): it migrates in a fraction of a second."""

from __future__ import annotations

from typing import Any

import pytest
from core.conftest import guest_spec

from protocols.jsonrpc import RPCClient
from supervisor.control.migrate import migrate
from supervisor.model.config import Config

from .conftest import two_daemons

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]


class Recorded:
    """An `RPCClient` whose requests are noted, by end, as they go out."""

    def __init__(self, client: RPCClient, end: str, sent: list[str]) -> None:
        self.client = client
        self.end = end
        self.sent = sent

    async def call(self, method: str, params: Any = None) -> Any:
        self.sent.append(f"{self.end} {method}")
        return await self.client.call(method, params)

    def notifications(self) -> Any:
        return self.client.notifications()


async def test_the_end_of_a_migration_asks_the_source_first(configs: tuple[Config, Config]) -> None:
    """Its QEMU's exit is the longest wait of the end; the target's finalize follows at
    once, and the subscription's end last (nothing waits on it)."""
    sent: list[str] = []
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"), paused=True)
        result = await migrate(
            Recorded(source.client, "source", sent),  # type: ignore[arg-type]
            Recorded(target.client, "target", sent),  # type: ignore[arg-type]
            "vm",
        )
        assert result.status.status == "completed"
        assert sent[-3:] == [
            "source migration.finalize_source",
            "target migration.finalize_target",
            "source events.unsubscribe",
        ]
        await target.sup.stop("vm", force=True)
