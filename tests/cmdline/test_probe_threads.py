"""Probing QEMU runs its children without a thread on either backend (asyncio's child
watcher on Python 3.11 would start one per child): the library owns no threads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest
from conftest import QEMU, run_python

from supervisor.model.errors import HypervisorError
from supervisor.qemu.process import run_captured

pytestmark = [pytest.mark.anyio]


#: Probes QEMU and runs a shell under each backend in a fresh interpreter (pytest's trio
#: runner drives trio in guest mode, from threads of its own), and prints the names of
#: the threads started meanwhile.
_PROGRAM = """
import json, sys, threading
import anyio
from supervisor.qemu.capabilities import probe_qemu
from supervisor.qemu.process import run_captured

started = []
original = threading.Thread.start

def start(thread):
    started.append(thread.name)
    original(thread)

async def main():
    threading.Thread.start = start
    await probe_qemu(sys.argv[1])
    await run_captured(["sh", "-c", "echo out; echo err >&2"])
    threading.Thread.start = original
    return started

print(json.dumps({backend: anyio.run(main, backend=backend) for backend in ("asyncio", "trio")}))
"""


@pytest.mark.qemu
def test_probing_starts_no_thread() -> None:
    result = run_python(_PROGRAM, QEMU)
    assert json.loads(result.stdout) == {"asyncio": [], "trio": []}


async def test_output_and_exit_status() -> None:
    status, stdout, stderr = await run_captured(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (status.code, stdout, stderr) == (3, b"out\n", b"err\n")


async def test_output_beyond_the_bound_kills_the_child() -> None:
    with pytest.raises(HypervisorError, match="more than 1000 bytes"):
        await run_captured(["sh", "-c", "yes; sleep 600"], max_output_bytes=1000)


async def test_cancellation_kills_and_reaps_the_child(tmp_path: Path) -> None:
    fifo = tmp_path / "pid"
    os.mkfifo(fifo)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_captured, ["sh", "-c", f"echo $$ > {fifo}; exec sleep 600"])
        pid = int(await anyio.Path(fifo).read_text())
        tg.cancel_scope.cancel()
    assert not Path(f"/proc/{pid}").exists()  # killed, and reaped: not even a zombie


async def test_a_missing_program_is_oserror() -> None:
    with pytest.raises(FileNotFoundError):
        await run_captured(["/nonexistent/qemu"])
