"""Benchmark of protocols.qmp against qemu.qmp and a bare asyncio client.

Run: ``.venv/bin/python tests/bench/bench_qmp.py``. Starts one QEMU with -S (killed by
pid at the end), interleaves the clients round by round so that they share the
machine's conditions, and prints medians and ratios. Asserts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketStream
from qemu.qmp import QMPClient as ReferenceClient

from protocols.qmp import connect

QEMU = os.environ.get("KVM_SUPERVISOR_TEST_QEMU", "/usr/bin/qemu-system-x86_64")
ROUNDS = 5
SEQUENTIAL_CALLS = 300
IN_FLIGHT = 50
THROUGHPUT_CALLS = 2000
STOP_SAMPLES = 30
FLOOD_EVENTS = 100_000
FLOOD_PHASES = 10


class Row(msgspec.Struct):
    metric: str
    ours: str
    anchor: str
    ratio: float
    target: str
    met: bool | None


# --- the three clients -----------------------------------------------------------


@contextlib.asynccontextmanager
async def reference_client(path: Path) -> AsyncIterator[ReferenceClient]:
    client = ReferenceClient("bench")
    await client.connect(str(path))
    try:
        yield client
    finally:
        await client.disconnect()


async def ours_sequential(path: Path) -> list[float]:
    async with connect(path) as qmp:
        return await time_each(lambda: qmp.execute("query-status"))


async def reference_sequential(path: Path) -> list[float]:
    async with reference_client(path) as qmp:
        return await time_each(lambda: qmp.execute("query-status"))


async def time_each(call: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(20):
        await call()
    samples = []
    for _ in range(SEQUENTIAL_CALLS):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


async def in_flight_rate(call: Callable[[], Awaitable[object]]) -> float:
    """Calls per second with IN_FLIGHT workers each calling in a loop."""

    async def worker() -> None:
        for _ in range(THROUGHPUT_CALLS // IN_FLIGHT):
            await call()

    start = time.perf_counter()
    async with anyio.create_task_group() as task_group:
        for _ in range(IN_FLIGHT):
            task_group.start_soon(worker)
    return THROUGHPUT_CALLS / (time.perf_counter() - start)


async def ours_throughput(path: Path) -> float:
    async with connect(path) as qmp:
        return await in_flight_rate(lambda: qmp.execute("query-status"))


async def reference_throughput(path: Path) -> float:
    async with reference_client(path) as qmp:
        return await in_flight_rate(lambda: qmp.execute("query-status"))


async def bare_throughput(path: Path) -> float:
    """A minimal asyncio client: keeps IN_FLIGHT commands written, counts reply lines."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        await reader.readline()
        writer.write(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n')
        await reader.readline()
        start = time.perf_counter()
        writer.write(
            b"".join(b'{"execute": "query-status", "id": %d}\n' % i for i in range(IN_FLIGHT))
        )
        sent = IN_FLIGHT
        for _ in range(THROUGHPUT_CALLS):
            await reader.readline()
            if sent < THROUGHPUT_CALLS:
                writer.write(b'{"execute": "query-status", "id": %d}\n' % sent)
                sent += 1
        return THROUGHPUT_CALLS / (time.perf_counter() - start)
    finally:
        writer.close()
        await writer.wait_closed()


async def ours_stop_to_event(path: Path) -> list[float]:
    samples = []
    async with connect(path) as qmp, qmp.events({"STOP"}) as events:
        for _ in range(STOP_SAMPLES):
            await qmp.execute("cont")
            async with anyio.create_task_group() as task_group:
                start = time.perf_counter()
                task_group.start_soon(qmp.execute, "stop")
                await anext(events)
                samples.append(time.perf_counter() - start)
    return samples


async def reference_stop_to_event(path: Path) -> list[float]:
    samples = []
    async with reference_client(path) as qmp:
        with qmp.listener("STOP") as listener:
            for _ in range(STOP_SAMPLES):
                await qmp.execute("cont")
                async with anyio.create_task_group() as task_group:
                    start = time.perf_counter()
                    task_group.start_soon(qmp.execute, "stop")
                    await listener.get()
                    samples.append(time.perf_counter() - start)
    return samples


# --- memory: a fake server floods events at a subscriber that never reads ---------


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def serve_flood(stream: SocketStream) -> None:
    """Greet, then answer every command; ``bench-flood`` first sends a burst of events."""
    burst = b"".join(
        b'{"timestamp": {"seconds": 1, "microseconds": %d}, "event": "BENCH", '
        b'"data": {"seq": %d}}\n' % (i % 1_000_000, i)
        for i in range(FLOOD_EVENTS // FLOOD_PHASES)
    )
    greeting = {
        "QMP": {
            "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
            "capabilities": [],
        }
    }
    decoder = json.JSONDecoder()
    async with stream:
        await stream.send(json.dumps(greeting).encode() + b"\n")
        pending = ""
        while True:
            try:
                pending += (await stream.receive()).decode()
            except anyio.EndOfStream:
                return
            # qemu.qmp does not end its commands with a newline: split on JSON values.
            while pending := pending.lstrip():
                try:
                    command, end = decoder.raw_decode(pending)
                except json.JSONDecodeError:
                    break
                pending = pending[end:]
                if command["execute"] == "bench-flood":
                    await stream.send(burst)
                reply: dict[str, object] = {"return": {}}
                if "id" in command:
                    reply["id"] = command["id"]
                await stream.send(json.dumps(reply).encode() + b"\n")


async def flood_rss(path: Path, subscribe_and_flood: Callable[[Path], Awaitable[Any]]) -> Any:
    listener = await anyio.create_unix_listener(path)
    async with listener, anyio.create_task_group() as task_group:

        async def serve_one() -> None:
            await serve_flood(await listener.accept())

        task_group.start_soon(serve_one)
        result = await subscribe_and_flood(path)
    path.unlink()
    return result


async def ours_flood(path: Path) -> tuple[float, float, float, int]:
    async with connect(path) as qmp, qmp.events() as events:
        gc.collect()
        before = rss_mib()
        await qmp.execute("bench-flood")
        first_phase = rss_mib()
        for _ in range(FLOOD_PHASES - 1):
            await qmp.execute("bench-flood")
        gc.collect()
        return before, first_phase, rss_mib(), events.dropped


async def reference_flood(path: Path) -> tuple[float, float, float, int]:
    async with reference_client(path) as qmp:
        with qmp.listener("BENCH"):
            gc.collect()
            before = rss_mib()
            await qmp.execute("bench-flood")
            first_phase = rss_mib()
            for _ in range(FLOOD_PHASES - 1):
                await qmp.execute("bench-flood")
            gc.collect()
            return before, first_phase, rss_mib(), 0


# --- an instant server in another process: what the clients cost, without QEMU -----

INSTANT_SERVER = r"""
import json, socket, sys
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen()
greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                    "capabilities": ["oob"]}}
decoder = json.JSONDecoder()
while True:
    conn, _ = listener.accept()
    conn.sendall(json.dumps(greeting).encode() + b"\r\n")
    pending = ""
    while data := conn.recv(65536):
        pending += data.decode()
        replies = []
        while pending := pending.lstrip():
            try:
                command, end = decoder.raw_decode(pending)
            except json.JSONDecodeError:
                break
            pending = pending[end:]
            reply = {"return": {"status": "paused", "running": False}}
            if "id" in command:
                reply["id"] = command["id"]
            replies.append(json.dumps(reply) + "\r\n")
        conn.sendall("".join(replies).encode())
    conn.close()
"""


def start_instant_server(path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", INSTANT_SERVER, str(path)])
    deadline = time.monotonic() + 10
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the instant server did not start")
        time.sleep(0.01)
    return proc


async def run_instant_rounds(path: Path) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"instant ours": [], "instant reference": []}
    figures["instant bare"] = []
    for _ in range(ROUNDS):
        figures["instant ours"].append(await ours_throughput(path))
        figures["instant reference"].append(await reference_throughput(path))
        figures["instant bare"].append(await bare_throughput(path))
    return figures


# --- driver ----------------------------------------------------------------------


def start_qemu(workdir: Path) -> subprocess.Popen[bytes]:
    qmp_path = workdir / "qmp.sock"
    args = [QEMU, "-S", "-nodefaults", "-display", "none", "-machine", "accel=tcg", "-m", "64"]
    args += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not qmp_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("qemu did not start")
        time.sleep(0.01)
    return proc


async def run_rounds(qmp_path: Path) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}

    def add(name: str, values: list[float]) -> None:
        figures.setdefault(name, []).extend(values)

    for _ in range(ROUNDS):
        add("seq ours", await ours_sequential(qmp_path))
        add("seq reference", await reference_sequential(qmp_path))
        add("tput ours", [await ours_throughput(qmp_path)])
        add("tput reference", [await reference_throughput(qmp_path)])
        add("tput bare", [await bare_throughput(qmp_path)])
        add("stop ours", await ours_stop_to_event(qmp_path))
        add("stop reference", await reference_stop_to_event(qmp_path))
    return figures


async def run_trio_rounds(qmp_path: Path) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"seq trio": [], "tput trio": []}
    for _ in range(ROUNDS):
        figures["seq trio"] += await ours_sequential(qmp_path)
        figures["tput trio"].append(await ours_throughput(qmp_path))
    return figures


def ratio_row(metric: str, ours: float, anchor: float, unit: str, target: str) -> Row:
    ratio = ours / anchor
    bound = float(target[2:].rstrip("x"))
    met = ratio <= bound if target.startswith("<=") else ratio >= bound
    return Row(metric, f"{ours:.0f} {unit}", f"{anchor:.0f} {unit}", ratio, target, met)


def print_table(rows: list[Row]) -> None:
    header = ("metric", "ours", "anchor", "ratio", "target", "met")
    cells = [
        (
            r.metric,
            r.ours,
            r.anchor,
            f"{r.ratio:.2f}x",
            r.target,
            "-" if r.met is None else ("yes" if r.met else "no"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    for row in [header, *cells]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="kvs-bench-", dir="/tmp"))
    proc = start_qemu(workdir)
    try:
        qmp_path = workdir / "qmp.sock"
        figures = anyio.run(run_rounds, qmp_path, backend="asyncio")
        figures |= anyio.run(run_trio_rounds, qmp_path, backend="trio")
    finally:
        proc.kill()
        proc.wait()
    instant_server = start_instant_server(workdir / "instant.sock")
    try:
        figures |= anyio.run(run_instant_rounds, workdir / "instant.sock", backend="asyncio")
    finally:
        instant_server.kill()
        instant_server.wait()
    try:
        flood_path = workdir / "flood.sock"
        ours_mem = anyio.run(flood_rss, flood_path, ours_flood, backend="asyncio")
        reference_mem = anyio.run(flood_rss, flood_path, reference_flood, backend="asyncio")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def median(name: str) -> float:
        return statistics.median(figures[name])

    us = 1e6
    rows = [
        ratio_row(
            "query-status latency (median)",
            median("seq ours") * us,
            median("seq reference") * us,
            "us",
            "<=0.75x",
        ),
        ratio_row(
            f"{IN_FLIGHT}-in-flight throughput vs qemu.qmp",
            median("tput ours"),
            median("tput reference"),
            "calls/s",
            ">=1.3x",
        ),
        ratio_row(
            f"{IN_FLIGHT}-in-flight throughput vs bare asyncio",
            median("tput ours"),
            median("tput bare"),
            "calls/s",
            ">=0.9x",
        ),
        ratio_row(
            "stop -> STOP event (median)",
            median("stop ours") * us,
            median("stop reference") * us,
            "us",
            "<=1.0x",
        ),
    ]
    before, first, after, dropped = ours_mem
    ref_before, _, ref_after, _ = reference_mem
    growth, ref_growth = after - before, ref_after - ref_before
    rows.append(
        Row(
            f"RSS growth, {FLOOD_EVENTS} unread events",
            f"{growth:+.1f} MiB",
            f"{ref_growth:+.1f} MiB",
            growth / ref_growth,
            "flat (<2 MiB)",
            growth < 2,
        )
    )
    rows.append(
        ratio_row(
            "(info) trio latency vs ours on asyncio",
            median("seq trio") * us,
            median("seq ours") * us,
            "us",
            "<=1.0x",
        )
    )
    rows.append(
        ratio_row(
            "(info) trio throughput vs ours on asyncio",
            median("tput trio"),
            median("tput ours"),
            "calls/s",
            ">=1.0x",
        )
    )
    rows.append(
        ratio_row(
            "(info) instant server: throughput vs qemu.qmp",
            median("instant ours"),
            median("instant reference"),
            "calls/s",
            ">=1.3x",
        )
    )
    rows.append(
        ratio_row(
            "(info) instant server: throughput vs bare asyncio",
            median("instant ours"),
            median("instant bare"),
            "calls/s",
            ">=0.9x",
        )
    )
    for row in rows[-4:]:
        row.met = None
    print(f"QEMU {QEMU}, {ROUNDS} interleaved rounds, Python {sys.version.split()[0]}")
    print(
        f"memory: RSS {before:.1f} MiB before, {first:.1f} after "
        f"{FLOOD_EVENTS // FLOOD_PHASES} events, {after:.1f} after {FLOOD_EVENTS}; "
        f"{dropped} dropped (qemu.qmp: {ref_before:.1f} -> {ref_after:.1f} MiB)"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
