"""A guest pinged continuously from a network namespace's host side across a migration:
a ``ping -i`` process run in the namespace, its replies counted by sequence number.

Shared by the migration tests (two daemons, tests/migration/test_bridged_ping.py) and the
Ganeti tests (a two-node virtual cluster, tests/ganeti/test_bridged_migration.py).
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ByteReceiveStream

PING_INTERVAL_S = 0.1
#: Replies to wait for before the migration, and after it (from the target's guest).
REPLIES_BEFORE, REPLIES_AFTER = 3, 5
#: Pings lost across the migration: a live one stops the guest for tens to hundreds of
#: ms; 3 s of pings is far more than that, far less than a guest lost for good.
MAX_LOST = 30
#: What the guest's kernel prints when it finds its memory broken.
KERNEL_TROUBLE = re.compile(r"BUG|Oops|corruption|not a head|soft lockup|panic")
_REPLY = re.compile(rb"bytes from .* icmp_seq=(\d+)")


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
async def ping_loop(enter: Sequence[str], address: str) -> AsyncIterator[Pings]:
    """``ping`` `address` every `PING_INTERVAL_S` from the namespace `enter` runs a
    command in, ended (by pid) on the way out.

    `enter` is the argv prefix that execs the command there (``ip netns exec NAME``,
    ``nsenter -t PID -n --``), so the process started is ping itself.
    """
    command = [*enter, "ping", "-n", "-i", str(PING_INTERVAL_S), address]
    pings = Pings()
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
