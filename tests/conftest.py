"""Shared fixtures: real QEMU processes started paused (-S), always killed by pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import start_listening

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
    proc = start_listening(
        args, [qmp_path, hmp_path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
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
