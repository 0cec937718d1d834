"""Fixtures for tests/engine: the private state dir of tests/core, and for the restart
and adoption tests a daemon that may be killed at will.

Guests here never boot: specs have no kernel, and most starts are paused (``-S``), so
the tests measure the supervisor, not TCG. Every QEMU a test's state dir started is
found by its command line (``-pidfile`` under the state dir) and killed afterwards,
whether or not any record or pid file names it.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import QEMU, REPO
from core.conftest import check_config_dict, state_dir
from helpers import kill_if_started_in, wait_gone, wait_until

from supervisor.model.config import Config

__all__ = ["EngineDaemon", "bare_config", "engine_daemon", "qemus_started_in", "state_dir"]

CLI = [sys.executable, "-m", "supervisor.cli"]
#: Runs the daemon with a fault injected (see crash_daemon.py).
CRASH_DAEMON = [sys.executable, str(Path(__file__).with_name("crash_daemon.py"))]
DEADLINE_S = 90.0


def qemus_started_in(state_dir: Path) -> dict[int, list[str]]:
    """Live (non-zombie) processes started for `state_dir`: ``-pidfile`` lies under it.

    A child of one of them is left out: a shell wrapper's fork shows the wrapper's
    command line until it execs (seen under load as a fifth of four gated launches).
    """
    found: dict[int, list[str]] = {}
    parents: dict[int, int] = {}
    prefix = f"{state_dir}/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (FileNotFoundError, ProcessLookupError):
            continue
        pidfiles = [b for a, b in itertools.pairwise(args) if a == "-pidfile"]
        if state != "Z" and pidfiles and pidfiles[-1].startswith(prefix):
            found[int(entry.name)] = args
            parents[int(entry.name)] = int(ppid)
    return {pid: args for pid, args in found.items() if parents[pid] not in found}


def uuid_of(args: Sequence[str]) -> str | None:
    return next((b for a, b in itertools.pairwise(args) if a == "-uuid"), None)


def kill_qemus_started_in(state_dir: Path) -> None:
    """Also those no record or pid file names (a launch held at a gate, see test_startup_order)."""
    for pid in qemus_started_in(state_dir):
        if kill_if_started_in(pid, state_dir):
            wait_gone(pid)


def toml_lines(values: dict[str, Any]) -> str:
    """``key = value`` lines; a dict becomes an inline table (of strings, numbers, bools)."""

    def value(item: Any) -> str:
        if isinstance(item, dict):
            return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in item.items()) + " }"
        return json.dumps(item)

    return "".join(f"{key} = {value(item)}\n" for key, item in values.items())


class RPCFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error['code']}: {error['message']}")
        self.code: int = error["code"]
        self.message: str = error["message"]


class EngineDaemon:
    """`kvm-supervisor serve` (or its fault-injecting variant) on a private state dir.

    `prefix` goes before the interpreter (``ip netns exec NAME`` runs the daemon in a
    network namespace); the daemon imports this checkout whatever the prefix does to
    the environment.
    """

    def __init__(self, state_dir: Path, *, prefix: Sequence[str] = ()) -> None:
        self.state_dir = state_dir
        self.prefix = tuple(prefix)
        self.defs = state_dir / "defs"
        self.config = state_dir / "supervisor.toml"
        self.socket = state_dir / "control.sock"
        self.log = state_dir / "daemon.log"
        self.notify_path = state_dir / "notify.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self._notify: socket.socket | None = None
        self._ids = itertools.count(1)

    def write_config(self, **extra: Any) -> None:
        self.defs.mkdir(exist_ok=True)
        values = {"state_dir": str(self.state_dir), "instances_dir": str(self.defs), **extra}
        self.config.write_text(toml_lines(values))

    def define(self, name: str, **fields: Any) -> None:
        """An instance file: no kernel (nothing boots), 64 MiB, and `fields`."""
        (self.defs / f"{name}.toml").write_text(toml_lines({"memory_mib": 64, **fields}))

    def spawn(self, *, crash_at: str | None = None) -> None:
        """Start the daemon; returns at once (see `wait_ready`, `connect`)."""
        if self._notify is not None:  # a restart of the daemon: a fresh notify socket
            self._notify.close()
        self.notify_path.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self.notify_path))
        program = CLI if crash_at is None else [*CRASH_DAEMON, crash_at]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *program, "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "NOTIFY_SOCKET": str(self.notify_path), "PYTHONPATH": str(REPO)},
            )

    def wait_ready(self, timeout_s: float = DEADLINE_S) -> bytes:
        """Wait for the daemon's sd_notify READY=1."""
        assert self._notify is not None
        notify = self._notify
        notify.setblocking(False)

        def ready() -> bytes | None:
            self._check_alive()
            try:
                message = notify.recv(4096)
            except BlockingIOError:
                return None
            return message if b"READY=1" in message else None

        message: bytes = wait_until(ready, what="READY=1 from the daemon", timeout_s=timeout_s)
        return message

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {self.log.read_text()[-3000:]}")

    def start(self, *, crash_at: str | None = None) -> None:
        self.spawn(crash_at=crash_at)
        self.wait_ready()

    def connect(self, timeout_s: float = DEADLINE_S) -> socket.socket:
        """A connection to the control socket, made the moment the daemon accepts one."""

        def connected() -> socket.socket | None:
            self._check_alive()
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(str(self.socket))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                return None
            sock.settimeout(DEADLINE_S)
            return sock

        sock: socket.socket = wait_until(
            connected, what=f"{self.socket} serves", timeout_s=timeout_s
        )
        return sock

    def send(self, sock: socket.socket, method: str, **params: Any) -> int:
        request_id = next(self._ids)
        line = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        sock.sendall(json.dumps(line).encode() + b"\n")
        return request_id

    @staticmethod
    def replies(sock: socket.socket, count: int) -> dict[int, dict[str, Any]]:
        """The next `count` replies by id (notifications skipped)."""
        data = b""
        found: dict[int, dict[str, Any]] = {}
        while len(found) < count:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed after {len(found)} of {count} replies")
            data += chunk
            *lines, data = data.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "id" in message:
                    found[message["id"]] = message
        return found

    def call(self, method: str, **params: Any) -> Any:
        with self.connect() as sock:
            request_id = self.send(sock, method, **params)
            reply = self.replies(sock, 1)[request_id]
        if "error" in reply:
            raise RPCFailed(reply["error"])
        return reply["result"]

    def settled(self, timeout_s: float = DEADLINE_S) -> list[dict[str, Any]]:
        """`instance.list` once no instance is `starting` (adoption happens in the background)."""

        def listed() -> list[dict[str, Any]] | None:
            items: list[dict[str, Any]] = self.call("instance.list")
            # A list with no instance would be false: wrap it.
            return [items] if all(item["state"] != "starting" for item in items) else None

        found = wait_until(listed, what="no instance starting", timeout_s=timeout_s)
        return found[0]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=DEADLINE_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise
        finally:
            if self._notify is not None:
                self._notify.close()
                self._notify = None


@pytest.fixture
def bare_config(state_dir: Path) -> Iterator[Config]:
    """The embedded supervisor's config for guests that never boot; QEMUs killed afterwards."""
    (state_dir / "defs").mkdir()
    try:
        yield check_config_dict(
            {"state_dir": str(state_dir), "instances_dir": str(state_dir / "defs")}
        )
    finally:
        kill_qemus_started_in(state_dir)


@pytest.fixture
def engine_daemon(state_dir: Path) -> Iterator[EngineDaemon]:
    if not Path(QEMU).exists():
        pytest.fail(f"{QEMU} is missing: run `make deps`")
    daemon = EngineDaemon(state_dir)
    daemon.write_config()
    try:
        yield daemon
    finally:
        try:
            daemon.kill(signal.SIGTERM)
        finally:
            kill_qemus_started_in(state_dir)
