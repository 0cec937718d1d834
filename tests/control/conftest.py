"""Fixtures for the control socket's tests: a `kvm-supervisor serve` child and raw peers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from core.conftest import kill_leftover_qemus
from core.test_daemon import Daemon

from supervisor.control.server import serve_control
from supervisor.engine.supervisor import Supervisor
from supervisor.model.config import Config


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    """A daemon of its own state dir (configured, not started); stopped and removed after."""
    path = Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))
    d = Daemon(path)
    d.write_config()
    try:
        yield d
    finally:
        d.kill(signal.SIGTERM)
        kill_leftover_qemus(path)
        shutil.rmtree(path, ignore_errors=True)


class Peer:
    """A raw connection to the control socket, for what the client library never sends."""

    def __init__(self, path: Path, timeout_s: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self._buffer = b""

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, method: str, params: Any = None, request_id: int = 1) -> Any:
        """Send one request and return its response (no other request may be in flight)."""
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        self.send(json.dumps(request).encode() + b"\n")
        return self.message()

    def message(self) -> Any:
        """The next line the daemon sent, decoded; EOFError when it closed the connection."""
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def messages_until_closed(self) -> list[Any]:
        """Every line the daemon sends until it closes the connection."""
        messages = []
        while True:
            try:
                messages.append(self.message())
            except (EOFError, ConnectionResetError):
                return messages


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_kib(pid: int) -> int:
    """The resident set size of a process (VmRSS), in KiB."""
    return proc_status_kib(pid, "VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_connections(pid: int, socket_path: Path) -> int:
    """How many connections accepted on `socket_path` process `pid` holds open.

    Accepted unix sockets carry the listener's path in /proc/net/unix; the listener
    itself is the one in listening state (flag __SO_ACCEPTCON).
    """
    accepted = set()
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            listening = len(fields) >= 8 and int(fields[3], 16) & 0x10000
            if len(fields) >= 8 and fields[7] == str(socket_path) and not listening:
                accepted.add(f"socket:[{fields[6]}]")
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held += os.readlink(f"/proc/{pid}/fd/{fd}") in accepted
        except FileNotFoundError:
            continue
    return held


def idle_fd_count(pid: int, socket_path: Path) -> int:
    """The descriptors process `pid` holds once it has closed every connection."""
    wait_until(lambda: open_connections(pid, socket_path) == 0, "the connections to close")
    return fd_count(pid)


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    """Wait for a condition the test cannot be told about (another process's state)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def daemon_pid(d: Daemon) -> int:
    assert d.proc is not None
    return d.proc.pid


@pytest.fixture
def control_config() -> Iterator[Config]:
    """A config of a fresh state dir, for a `Supervisor` served in the test's own loop."""
    path = Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))
    try:
        yield Config(state_dir=str(path), instances_dir=str(path / "defs"))
    finally:
        kill_leftover_qemus(path)
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def served(config: Config) -> AsyncIterator[Path]:
    """A `Supervisor` and its control socket, in the test's event loop."""
    async with Supervisor(config) as sup, serve_control(sup) as path:
        yield path


class AsyncPeer:
    """A raw connection to a control socket served in the test's own event loop."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self._lines = BufferedByteReceiveStream(stream)

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: Path) -> AsyncIterator[AsyncPeer]:
        async with await anyio.connect_unix(path) as stream:
            yield cls(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def message(self) -> Any:
        with anyio.fail_after(30):
            return json.loads(await self._lines.receive_until(b"\n", 64 * 1024 * 1024))

    async def call(self, method: str, params: Any = None, request_id: int = 1) -> Any:
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        await self.send(json.dumps(request).encode() + b"\n")
        return await self.message()


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    """`wait_until` inside an event loop."""
    with anyio.fail_after(timeout_s):
        while not predicate():
            await anyio.sleep(0.02)
