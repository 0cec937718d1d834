"""A scripted QMP server for fault injection: what real QEMU will not do on demand.

A test passes a scenario, a coroutine that plays the server's side of one connection
through a :class:`FakeQMPPeer`. Leaving ``async with FakeQMPServer(...)`` waits for
the scenario to finish, so its assertions count; scenarios end when the client hangs up.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketListener, UNIXSocketStream

GREETING: dict[str, Any] = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"},
        "capabilities": ["oob"],
    }
}
SCENARIO_DEADLINE_S = 10.0


def event_message(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"event": name, "data": data or {}, "timestamp": {"seconds": 1, "microseconds": 2}}


class FakeQMPPeer:
    """The server's end of one connection."""

    def __init__(self, stream: UNIXSocketStream) -> None:
        self.stream = stream
        self.received = bytearray()
        """Every byte the client sent, in order."""
        self.fd_reads: list[tuple[range, list[int]]] = []
        """For every read that brought descriptors: where its bytes are in `received`, and
        the descriptors. The kernel hands descriptors over with the read that reaches the
        first byte sent with them, and ends that read with the bytes sent with them."""
        self._consumed = 0

    async def send(self, message: object) -> None:
        await self.send_raw(json.dumps(message).encode() + b"\r\n")

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send(data)

    async def greet(self, capabilities: list[str] | None = None) -> None:
        greeting = json.loads(json.dumps(GREETING))
        if capabilities is not None:
            greeting["QMP"]["capabilities"] = capabilities
        await self.send(greeting)

    async def receive_command(self) -> dict[str, Any]:
        """The next command the client sent (commands end with a newline)."""
        while (end := self.received.find(b"\n", self._consumed)) < 0:
            if not await self._receive():
                raise EOFError("the client hung up")
        command: dict[str, Any] = json.loads(self.received[self._consumed : end])
        self._consumed = end + 1
        return command

    async def reply(self, command: dict[str, Any], value: object = None) -> None:
        await self.send({"return": {} if value is None else value, "id": command["id"]})

    async def negotiate(self, capabilities: list[str] | None = None) -> dict[str, Any]:
        """Greet, answer qmp_capabilities and return that command."""
        await self.greet(capabilities)
        command = await self.receive_command()
        assert command["execute"] == "qmp_capabilities"
        await self.reply(command)
        return command

    async def wait_hang_up(self) -> None:
        """Read (and keep) whatever the client sends until it closes the connection."""
        while await self._receive():
            pass

    async def _receive(self) -> bool:
        try:
            data, fds = await self.stream.receive_fds(65536, 16)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return False
        if fds:
            self.fd_reads.append((range(len(self.received), len(self.received) + len(data)), fds))
        self.received += data
        return bool(data)


Scenario = Callable[[FakeQMPPeer], Awaitable[None]]


class FakeQMPServer(anyio.AsyncContextManagerMixin):
    """Listens on `path` and plays `scenario` with the first client that connects."""

    def __init__(self, path: Path, scenario: Scenario) -> None:
        self.path = path
        self.scenario = scenario
        self.peer: FakeQMPPeer | None = None

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[FakeQMPServer]:
        listener = await anyio.create_unix_listener(self.path)
        finished = anyio.Event()
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._serve_one, listener, finished)
                yield self
                with anyio.fail_after(SCENARIO_DEADLINE_S):
                    await finished.wait()
        finally:
            await listener.aclose()
            self.path.unlink(missing_ok=True)

    async def _serve_one(self, listener: SocketListener, finished: anyio.Event) -> None:
        stream = await listener.accept()
        assert isinstance(stream, UNIXSocketStream)
        async with stream:
            self.peer = FakeQMPPeer(stream)
            await self.scenario(self.peer)
        finished.set()
