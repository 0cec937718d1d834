"""A bridged guest keeps answering pings across a live migration between two daemons in
one network namespace (tests/net_guest's: bridge br0), both ends on br0.

The host side pings the guest (tests/ping_loop.py) from before the migration until
the target's guest has answered `REPLIES_AFTER` more times; the source's QEMU has ended
by then, so those replies come from the target. Each daemon builds its own taps, and
nothing of the guest is left in the namespace after its stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from net_guest.conftest import BOOT_TIMEOUT_S, BRIDGE, guest
from ping_loop import KERNEL_TROUBLE, MAX_LOST, REPLIES_AFTER, REPLIES_BEFORE, ping_loop

from protocols import jsonrpc
from supervisor.control.migrate import migrate

from .test_nics import lan_daemons, taps

pytestmark = [pytest.mark.anyio, pytest.mark.guest, pytest.mark.netns]

BRIDGED_IP = "10.77.0.2"


async def serial(client: jsonrpc.RPCClient) -> str:
    info: dict[str, Any] = await client.call("instance.info", {"name": "vm"})
    return Path(info["serial_log"]).read_text(errors="replace")


async def test_a_bridged_guest_answers_pings_across_a_live_migration(
    state_dirs: tuple[Path, Path],
) -> None:
    with lan_daemons(state_dirs) as (lan, source_daemon, target_daemon):
        baseline = lan.state()
        async with (
            jsonrpc.connect_unix(source_daemon.socket) as source,
            jsonrpc.connect_unix(target_daemon.socket) as target,
        ):
            spec = guest("vm", f"{BRIDGED_IP}/24", {"mode": "bridged", "link": BRIDGE})
            before = await source.call("instance.start", {"spec": spec})
            async with ping_loop(["ip", "netns", "exec", lan.netns], BRIDGED_IP) as pings:
                await pings.wait(REPLIES_BEFORE, BOOT_TIMEOUT_S)
                result = await migrate(source, target, "vm")
                assert result.status.status == "completed"
                # The source's QEMU has ended: these replies come from the target's guest.
                try:
                    await pings.wait(len(pings.replies) + REPLIES_AFTER, 60)
                except TimeoutError:
                    tail = (await serial(target))[-1500:]
                    raise AssertionError(f"no reply after the migration; serial:\n{tail}") from None
            # Its kernel found nothing broken either.
            assert not KERNEL_TROUBLE.search(await serial(target)), await serial(target)
            after = await target.call("instance.info", {"name": "vm"})
            assert after["state"] == "running"
            # Each daemon's taps are its own (the payload carries no host names).
            assert set(taps(after)).isdisjoint(taps(before))
            lost = pings.lost()
            assert len(lost) <= MAX_LOST, lost
            assert await source.call("instance.list") == []
            lan.assert_only(baseline, [after])
            await target.call("instance.stop", {"name": "vm", "force": True})
        lan.assert_only(baseline)
