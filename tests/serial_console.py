"""The test guest's serial console over a unix socket (QEMU's socket chardev): wait for
output, type lines, run shell commands on the root shell tests/guest/init keeps on ttyS0.

The console is read only while a test waits on it (`SerialConsole.expect`): between
waits, what the guest prints piles up in the socket, which holds far more than a few
heartbeats.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

#: Generous: a step of a TCG guest, on a machine other test runs share.
STEP_TIMEOUT_S = 30.0
#: The end marker `SerialConsole.run` has the shell print, with the command's status.
_DONE = re.compile(rb"KVS-DONE-(\d+)-42")


@dataclass
class SerialConsole:
    """A connection to a guest's serial console and everything read from it so far.

    `details` adds to a failure message what helps explain it (QEMU's stderr, say).
    """

    stream: SocketStream
    details: Callable[[], str] = lambda: ""
    output: bytearray = field(default_factory=bytearray)
    closed: bool = False

    async def expect(
        self, pattern: re.Pattern[bytes], *, since: int = 0, wait_s: float = STEP_TIMEOUT_S
    ) -> re.Match[bytes]:
        """Wait up to ``wait_s`` for ``pattern`` in the console output from ``since`` on."""
        with anyio.move_on_after(wait_s):
            while True:
                match = pattern.search(self.output, since)
                if match is not None:
                    return match
                if self.closed:
                    break
                try:
                    self.output += await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    self.closed = True
        pytest.fail(
            f"{pattern.pattern!r} not seen on the console within {wait_s}s "
            f"(console closed: {self.closed}); console:\n{self.text(since)}\n{self.details()}"
        )

    async def type(self, line: str) -> int:
        """Type ``line`` and Enter on the console; return the output offset before it."""
        since = len(self.output)
        await self.stream.send(line.encode() + b"\n")
        return since

    async def run(self, command: str, *, check: bool = True, wait_s: float = STEP_TIMEOUT_S) -> str:
        """Run a shell command on the console and return what it printed.

        With `check`, a non-zero exit status fails the test. The end marker is computed
        by the shell, so the echo of the typed line does not contain it.
        """
        since = await self.type(f"{command}; echo KVS-DONE-$?-$((6 * 7))")
        done = await self.expect(_DONE, since=since, wait_s=wait_s)
        printed = self.output[since : done.start()].decode(errors="replace")
        if check and done.group(1) != b"0":
            pytest.fail(f"{command!r} exited with status {done.group(1).decode()}:\n{printed}")
        return printed

    def text(self, since: int = 0) -> str:
        return self.output[since:].decode(errors="replace")


@asynccontextmanager
async def connect_console(
    path: Path | str, details: Callable[[], str] = lambda: ""
) -> AsyncIterator[SerialConsole]:
    """Connect to the serial console socket at `path` (one client at a time: QEMU's
    chardev serves one connection)."""
    async with await anyio.connect_unix(path) as stream:
        yield SerialConsole(stream, details)
