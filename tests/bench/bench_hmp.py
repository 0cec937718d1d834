"""Benchmark of protocols.hmp against ``echo CMD | socat`` and bare socket exchanges.

Run: ``.venv/bin/python tests/bench/bench_hmp.py``. Starts one QEMU with -S (killed by
pid at the end) and measures ``info status`` round by round, the clients interleaved so
that they share the machine's conditions (QEMU serves one monitor client at a time, so
each one connects, measures and disconnects in turn). Prints medians and ratios;
asserts nothing.

- ours: :func:`protocols.hmp.connect`, one persistent connection (asyncio; trio as info).
- socat: ``echo 'info status' | socat - UNIX-CONNECT:hmp.sock`` run as a subprocess per
  command, the original design's way (socat then waits out its 0.5 s half-close
  timeout, since QEMU keeps the connection open).
- bare: a minimal hand-written exchange on one connection: send the line, read until the
  prompt; once with asyncio's streams, once with a blocking socket.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from benchtable import Row, format_table

from protocols import hmp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import start_listening

QEMU = os.environ.get("KVM_SUPERVISOR_TEST_QEMU", "/usr/bin/qemu-system-x86_64")
COMMAND = "info status"
ROUNDS = 5
CALLS = 300
WARM_UP = 20
SOCAT_CALLS = 4
PROMPT = b"(qemu) "


async def time_each(call: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(WARM_UP):
        await call()
    samples = []
    for _ in range(CALLS):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


async def ours(path: Path) -> list[float]:
    async with hmp.connect(path) as monitor:
        return await time_each(lambda: monitor.command(COMMAND))


async def bare_asyncio(path: Path) -> list[float]:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        await reader.readuntil(b"\n" + PROMPT)

        async def exchange() -> bytes:
            writer.write(COMMAND.encode() + b"\n")
            return await reader.readuntil(b"\n" + PROMPT)

        return await time_each(exchange)
    finally:
        writer.close()
        await writer.wait_closed()


def bare_blocking(path: Path) -> list[float]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))

        def read_to_prompt() -> bytes:
            data = b""
            while not data.endswith(b"\n" + PROMPT):
                chunk = sock.recv(65536)
                if not chunk:
                    raise EOFError("QEMU closed the monitor")
                data += chunk
            return data

        read_to_prompt()
        samples = []
        for index in range(WARM_UP + CALLS):
            start = time.perf_counter()
            sock.sendall(COMMAND.encode() + b"\n")
            read_to_prompt()
            if index >= WARM_UP:
                samples.append(time.perf_counter() - start)
        return samples


def socat(path: Path) -> list[float]:
    samples = []
    for _ in range(SOCAT_CALLS):
        start = time.perf_counter()
        done = subprocess.run(
            ["sh", "-c", f"echo '{COMMAND}' | socat - UNIX-CONNECT:{path}"],
            capture_output=True,
            check=True,
        )
        samples.append(time.perf_counter() - start)
        if b"VM status" not in done.stdout:
            raise RuntimeError(f"socat got no reply: {done.stdout!r}")
    return samples


def start_qemu(workdir: Path) -> subprocess.Popen[bytes]:
    hmp_path = workdir / "hmp.sock"
    args = [QEMU, "-S", "-nodefaults", "-display", "none", "-machine", "accel=tcg", "-m", "64"]
    args += ["-monitor", f"unix:{hmp_path},server=on,wait=off"]
    return start_listening(args, [hmp_path], stdout=subprocess.DEVNULL)


def run_rounds(path: Path) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}

    def add(name: str, values: list[float]) -> None:
        figures.setdefault(name, []).extend(values)

    for _ in range(ROUNDS):
        add("ours", anyio.run(ours, path, backend="asyncio"))
        add("bare asyncio", anyio.run(bare_asyncio, path, backend="asyncio"))
        add("bare blocking", bare_blocking(path))
        add("ours trio", anyio.run(ours, path, backend="trio"))
        add("socat", socat(path))
    return figures


def ratio_row(metric: str, ours_s: float, anchor_s: float, target: str | None) -> Row:
    """A row comparing latencies: ``<=`` targets bound ours / anchor, ``>=`` targets bound
    the speed-up anchor / ours, and the ratio shown is the one the target bounds."""
    if target is not None and target.startswith(">="):
        ratio = anchor_s / ours_s
        met: bool | None = ratio >= float(target[2:].rstrip("x"))
    else:
        ratio = ours_s / anchor_s
        met = None if target is None else ratio <= float(target[2:].rstrip("x"))
    return Row(
        metric, f"{ours_s * 1e6:.0f} us", f"{anchor_s * 1e6:.0f} us", ratio, target or "-", met
    )


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="kvs-bench-", dir="/tmp"))
    try:
        proc = start_qemu(workdir)
        try:
            figures = run_rounds(workdir / "hmp.sock")
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def median(name: str) -> float:
        return statistics.median(figures[name])

    rows = [
        ratio_row(
            f"{COMMAND!r} speed-up over socat subprocess", median("ours"), median("socat"), ">=15x"
        ),
        ratio_row(
            f"{COMMAND!r} latency vs bare asyncio", median("ours"), median("bare asyncio"), "<=1.2x"
        ),
        ratio_row(
            f"{COMMAND!r} latency vs bare blocking socket",
            median("ours"),
            median("bare blocking"),
            "<=1.2x",
        ),
        ratio_row(
            "(info) trio latency vs ours on asyncio", median("ours trio"), median("ours"), None
        ),
    ]
    print(
        f"QEMU {QEMU}, {ROUNDS} interleaved rounds of {CALLS} calls ({SOCAT_CALLS} for socat), "
        f"Python {sys.version.split()[0]}; medians"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
