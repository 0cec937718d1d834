"""Shared fixtures: real QEMU processes started paused (-S), always killed by pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

QEMU = os.environ.get("KVM_SUPERVISOR_TEST_QEMU", "/usr/bin/qemu-system-x86_64")
REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO / ".cache" / "guest"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Protocol tests run on both backends; real-guest tests override this to asyncio."""
    return str(request.param)


@dataclass
class PausedQemu:
    """A QEMU started with -S (no guest code runs) and its monitor sockets."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    qmp_path: Path
    hmp_path: Path
    extra_args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _listening_unix_sockets() -> set[str]:
    """Paths of the unix sockets in listening state (/proc/net/unix flag __SO_ACCEPTCON)."""
    listening = set()
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and int(fields[3], 16) & 0x10000:
                listening.add(fields[7])
    return listening


def _wait_for_sockets(paths: list[Path], proc: subprocess.Popen[bytes], deadline_s: float) -> None:
    # QEMU creates a socket file a moment before it listens on it: wait for listening.
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"qemu exited with {proc.returncode}: {stderr}")
        if {str(p) for p in paths} <= _listening_unix_sockets():
            return
        time.sleep(0.01)
    raise TimeoutError(f"qemu did not listen on {paths} within {deadline_s}s")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_paused_qemu(workdir: Path, extra_args: list[str] | None = None) -> PausedQemu:
    """Start QEMU paused with a QMP socket and an HMP socket in workdir."""
    qmp_path = workdir / "qmp.sock"
    hmp_path = workdir / "hmp.sock"
    args = [
        QEMU,
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-machine",
        "accel=tcg",
        "-m",
        "64",
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
        "-monitor",
        f"unix:{hmp_path},server=on,wait=off",
        *(extra_args or []),
    ]
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _wait_for_sockets([qmp_path, hmp_path], proc, 20.0)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise
    return PausedQemu(proc, workdir, qmp_path, hmp_path, list(extra_args or []))


@pytest.fixture
def paused_qemu(short_tmp: Path) -> Iterator[PausedQemu]:
    """One QEMU 7.2 started -S; killed (and resumed first if SIGSTOP'd) after the test."""
    if not Path(QEMU).exists():
        pytest.fail(f"{QEMU} is missing: run `make deps`")
    qemu = start_paused_qemu(short_tmp)
    try:
        yield qemu
    finally:
        if qemu.proc.poll() is None:
            os.kill(qemu.pid, signal.SIGCONT)
        qemu.kill()


def run_python(
    code: str, *args: str, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter that imports this checkout, to its end.

    `prefix` goes before the interpreter (``ip netns exec NAME``). Fails the test with the
    program's stderr when it exits non-zero.
    """
    result = subprocess.run(
        [*prefix, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result
