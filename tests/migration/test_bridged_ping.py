"""A bridged guest keeps answering pings across a live migration between two daemons in
one network namespace (tests/net_guest's: bridge br0), both ends on br0.

The host side pings the guest every `PING_INTERVAL_S` from before the migration until
the target's guest has answered `REPLIES_AFTER` more times; the source's QEMU has ended
by then, so those replies come from the target. Each daemon builds its own taps, and
nothing of the guest is left in the namespace after its stop.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteReceiveStream
from net_guest.conftest import BOOT_TIMEOUT_S, BRIDGE, Lan, guest

from protocols import jsonrpc
from supervisor.control.migrate import migrate

from .test_nics import lan_daemons, taps

pytestmark = [pytest.mark.anyio, pytest.mark.guest, pytest.mark.netns]

BRIDGED_IP = "10.77.0.2"
PING_INTERVAL_S = 0.1
#: Replies to wait for before the migration, and after it (from the target's guest).
REPLIES_BEFORE, REPLIES_AFTER = 3, 5
#: Pings lost across the migration: a live one stops the guest for tens to hundreds of
#: ms; 3 s of pings is far more than that, far less than a guest lost for good.
MAX_LOST = 30
_REPLY = re.compile(rb"bytes from .* icmp_seq=(\d+)")
#: What the guest's kernel prints when it finds its memory broken.
_KERNEL_TROUBLE = re.compile(r"BUG|Oops|corruption|not a head|soft lockup|panic")


class Pings:
    """The sequence numbers of the replies a ``ping`` loop got, as they come."""

    def __init__(self) -> None:
        self.replies: list[int] = []
        self._arrived = anyio.Event()

    async def read(self, stdout: ByteReceiveStream) -> None:
        buffer = b""
        async for chunk in stdout:
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                if match := _REPLY.search(line):
                    self.replies.append(int(match[1]))
                    self._arrived.set()
                    self._arrived = anyio.Event()

    async def wait(self, count: int, timeout_s: float) -> None:
        """Until `count` replies have come in all."""
        with anyio.fail_after(timeout_s):
            while len(self.replies) < count:
                await self._arrived.wait()

    def lost(self) -> list[int]:
        """The pings between the first reply and the last that got none."""
        got = set(self.replies)
        return [seq for seq in range(min(got), max(got) + 1) if seq not in got]


@asynccontextmanager
async def ping_loop(lan: Lan, address: str) -> AsyncIterator[Pings]:
    """``ping`` from the namespace's host side every `PING_INTERVAL_S`, ended (by pid)
    on the way out."""
    command = ["ip", "netns", "exec", lan.netns, "ping", "-n", "-i", str(PING_INTERVAL_S), address]
    pings = Pings()
    # `ip netns exec` execs ping: the pid is ping's.
    async with await anyio.open_process(command, stderr=subprocess.DEVNULL) as process:
        assert process.stdout is not None
        async with anyio.create_task_group() as group:
            group.start_soon(pings.read, process.stdout)
            try:
                yield pings
            finally:
                process.send_signal(signal.SIGTERM)
                with anyio.CancelScope(shield=True):
                    await process.wait()


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
            async with ping_loop(lan, BRIDGED_IP) as pings:
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
            assert not _KERNEL_TROUBLE.search(await serial(target)), await serial(target)
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
