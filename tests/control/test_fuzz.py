"""Random and mutated JSON-RPC against a live `kvm-supervisor serve`: every answer is
well-formed, nothing crashes (no -32603, no crash in the log), and the daemon serves on
with its descriptors unchanged once the fuzzing connection is gone."""

from __future__ import annotations

import contextlib
import json
import select
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from core.conftest import kill_leftover_qemus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Daemon, Peer, daemon_pid, idle_fd_count

pytestmark = [pytest.mark.guest]

#: A small line limit, so that oversize lines (answered, then the connection cut) occur.
MAX_REQUEST_BYTES = 4096

METHODS = [
    "supervisor.ping",
    "supervisor.info",
    "supervisor.verify",
    "instance.list",
    "instance.info",
    "instance.stop",
    "instance.reboot",
    "instance.pause",
    "instance.resume",
    "instance.cleanup",
    "instance.balloon",
    "instance.console",
    "instance.monitor",
    "instance.qmp",
    "instance.start",
    "events.subscribe",
    "events.unsubscribe",
    "rpc.discover",
]
PARAM_NAMES = [
    "name",
    "spec",
    "paused",
    "force",
    "timeout_s",
    "memory_mib",
    "command",
    "arguments",
    "instances",
    "kinds",
    "subscription",
]
#: No instance exists, so only `instance.start` with a spec could start a VM: its params
#: always carry this unknown field, and the daemon's QEMU does not exist either.
POISON = "fuzz-poison"

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from(["vm", "vm\n", "../x", "a" * 64, "instance.state", "qmp."])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
params = st.one_of(
    st.dictionaries(st.sampled_from(PARAM_NAMES), values, max_size=4),
    st.fixed_dictionaries({"spec": st.dictionaries(st.text(max_size=12), values, max_size=4)}),
    values,
)


@st.composite
def messages(draw: st.DrawFn) -> Any:
    message: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        message["jsonrpc"] = draw(st.sampled_from(["2.0"] * 8 + ["1.0", 2]))
    if draw(st.integers(0, 9)):
        message["method"] = draw(st.sampled_from(METHODS) | st.text(max_size=20) | values)
    if draw(st.booleans()):
        message["params"] = draw(params)
    if draw(st.integers(0, 3)):
        message["id"] = draw(
            st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=8) | values
        )
    if draw(st.integers(0, 9)) == 0:
        message[draw(st.text(max_size=8))] = draw(values)
    if message.get("method") == "instance.start":
        if not isinstance(message.get("params"), dict):
            message["params"] = {}
        message["params"][POISON] = True
    return message


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


@st.composite
def mutated(draw: st.DrawFn, line: bytes) -> bytes:
    """`line` with a few bytes replaced, inserted or cut (POISON is never touched)."""
    data = bytearray(line)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "insert", "cut"]))
        noise = draw(st.binary(min_size=1, max_size=4).filter(lambda b: b"\n" not in b))
        if action == "insert" or not data:
            data[at:at] = noise
        elif action == "replace":
            data[at : at + len(noise)] = noise
        else:
            del data[at : at + len(noise)]
    mutant = bytes(data)
    return mutant if POISON.encode() in mutant or b"instance.start" not in line else line


lines = st.one_of(
    messages().map(encode),
    st.lists(messages(), max_size=6).map(encode),
    messages().map(encode).flatmap(mutated),
    st.lists(messages(), min_size=1, max_size=4).map(encode).flatmap(mutated),
    st.binary(max_size=64).map(lambda b: b.replace(b"\n", b" ")),
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * (depth % 2)),
    st.binary(min_size=MAX_REQUEST_BYTES + 1, max_size=MAX_REQUEST_BYTES + 64).map(
        lambda b: b.replace(b"\n", b" ")
    ),
)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Daemon]:
    """One daemon for every example (started once: examples are many and small)."""
    path = Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))
    d = Daemon(path)
    d.write_config(max_request_bytes=MAX_REQUEST_BYTES)
    with d.config.open("a") as config:  # under the closing [hvparams] table
        config.write('kvm_path = "/nonexistent/qemu-system-x86_64"\n')
    try:
        d.start()
        yield d
    finally:
        d.kill(signal.SIGTERM)
        kill_leftover_qemus(path)
        shutil.rmtree(path, ignore_errors=True)


def exchange(path: Path, data: bytes, timeout_s: float = 30) -> bytes:
    """Send `data` and its end while reading the answers, until the daemon closes.

    Reading while sending: a daemon blocked on answers nobody reads stops reading.
    """
    received = bytearray()
    pending = memoryview(data)
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.setblocking(False)
        while True:
            remaining = deadline - time.monotonic()
            writers = [sock] if pending else []
            readable, writable, _ = select.select([sock], writers, [], max(remaining, 0))
            if not readable and not writable:
                raise TimeoutError("the daemon neither answered nor closed the connection")
            if writable:
                try:
                    pending = pending[sock.send(pending) :]
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    pending = pending[:0]  # cut (oversize line): the answers stay readable
                if not pending:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
            if readable:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    return bytes(received)
                if not chunk:
                    return bytes(received)
                received += chunk


def check_answer(answer: Any) -> None:
    """A response (or a batch's array of them) or a notification; never a crash."""
    if isinstance(answer, list):
        assert answer, "an empty array answers nothing"
        for response in answer:
            check_answer(response)
        return
    assert answer["jsonrpc"] == "2.0"
    if "method" in answer:
        assert answer["method"] == "event"
        return
    assert "id" in answer
    assert ("result" in answer) != ("error" in answer)
    if "error" in answer:
        code = answer["error"]["code"]
        assert isinstance(code, int) and isinstance(answer["error"]["message"], str)
        assert code != -32603, answer


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sent=st.lists(lines, min_size=1, max_size=5))
def test_fuzzed_lines_are_answered_and_leave_nothing_behind(
    fuzzed: Daemon, sent: list[bytes]
) -> None:
    pid = daemon_pid(fuzzed)
    idle_fds = idle_fd_count(pid, fuzzed.socket)
    log_size = fuzzed.log.stat().st_size
    received = exchange(fuzzed.socket, b"".join(line + b"\n" for line in sent))
    for line in received.splitlines():
        check_answer(json.loads(line))
    with Peer(fuzzed.socket) as peer:
        assert peer.call("supervisor.ping")["result"]["version"]
    assert idle_fd_count(pid, fuzzed.socket) == idle_fds
    with fuzzed.log.open("rb") as log:
        log.seek(log_size)
        assert b"crashed" not in log.read()
