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
from anyio.abc import SocketStream
from benchtable import Row, format_table
from qemu.qmp import QMPClient as ReferenceClient

from protocols.qmp import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import start_listening

QEMU = os.environ.get("KVM_SUPERVISOR_TEST_QEMU", "/usr/bin/qemu-system-x86_64")
ROUNDS = 9
SEQUENTIAL_CALLS = 300
IN_FLIGHT = 50
THROUGHPUT_CALLS = 2000
STOP_SAMPLES = 30
FLOOD_EVENTS = 100_000
FLOOD_PHASES = 10


# --- the three clients -----------------------------------------------------------


@contextlib.asynccontextmanager
async def reference_client(path: Path) -> AsyncIterator[ReferenceClient]:
    client = ReferenceClient("bench")
    await client.connect(str(path))
    try:
        yield client
    finally:
        await client.disconnect()


async def ours_sequential(path: Path) -> float:
    async with connect(path) as qmp:
        return await median_latency(lambda: qmp.execute("query-status"))


async def reference_sequential(path: Path) -> float:
    async with reference_client(path) as qmp:
        return await median_latency(lambda: qmp.execute("query-status"))


async def median_latency(call: Callable[[], Awaitable[object]]) -> float:
    for _ in range(20):
        await call()
    samples = []
    for _ in range(SEQUENTIAL_CALLS):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


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


async def ours_stop_to_event(path: Path) -> float:
    samples = []
    async with connect(path) as qmp, qmp.events({"STOP"}) as events:
        for _ in range(STOP_SAMPLES):
            await qmp.execute("cont")
            async with anyio.create_task_group() as task_group:
                start = time.perf_counter()
                task_group.start_soon(qmp.execute, "stop")
                await anext(events)
                samples.append(time.perf_counter() - start)
    return statistics.median(samples)


async def reference_stop_to_event(path: Path) -> float:
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
    return statistics.median(samples)


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

def serve(conn):
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

while True:
    conn, _ = listener.accept()
    try:
        serve(conn)
    except OSError:
        pass  # the client hung up early, e.g. the start-up probe
    conn.close()
"""


def start_instant_server(path: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-c", INSTANT_SERVER, str(path)]
    return start_listening(args, [path], stdout=subprocess.DEVNULL)


# --- driver ----------------------------------------------------------------------


def start_qemu(workdir: Path) -> subprocess.Popen[bytes]:
    qmp_path = workdir / "qmp.sock"
    args = [QEMU, "-S", "-nodefaults", "-display", "none", "-machine", "accel=tcg", "-m", "64"]
    args += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    return start_listening(args, [qmp_path], stdout=subprocess.DEVNULL)


Figures = dict[str, list[float]]
"""One figure per round for each measurement."""
Measure = Callable[[Path], Awaitable[float]]


async def run_rounds(path: Path, measures: dict[str, Measure]) -> Figures:
    figures: Figures = {name: [] for name in measures}
    order = list(measures.items())
    for _ in range(ROUNDS):
        for name, measure in order:
            figures[name].append(await measure(path))
        # So that no client always runs right after the same other one.
        order.reverse()
    return figures


def compare(figures: Figures, metric: str, ours: str, anchor: str, unit: str, target: str) -> Row:
    """The medians of both, and the median of their per-round ratios: robust to the load
    of the machine changing from one round to the next."""
    scale = 1e6 if unit == "us" else 1.0
    ratio = statistics.median(o / a for o, a in zip(figures[ours], figures[anchor], strict=True))
    bound = float(target[2:].rstrip("x"))
    met = ratio <= bound if target.startswith("<=") else ratio >= bound
    return Row(
        metric,
        f"{statistics.median(figures[ours]) * scale:.0f} {unit}",
        f"{statistics.median(figures[anchor]) * scale:.0f} {unit}",
        ratio,
        target,
        met,
    )


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="kvs-bench-", dir="/tmp"))
    try:
        qemu = start_qemu(workdir)
        try:
            qmp_path = workdir / "qmp.sock"
            figures = anyio.run(run_rounds, qmp_path, QEMU_MEASURES, backend="asyncio")
            figures |= anyio.run(run_rounds, qmp_path, TRIO_MEASURES, backend="trio")
        finally:
            qemu.kill()
            qemu.wait()
        instant_path = workdir / "instant.sock"
        instant_server = start_instant_server(instant_path)
        try:
            figures |= anyio.run(run_rounds, instant_path, INSTANT_MEASURES, backend="asyncio")
        finally:
            instant_server.kill()
            instant_server.wait()
        flood_path = workdir / "flood.sock"
        ours_mem = anyio.run(flood_rss, flood_path, ours_flood, backend="asyncio")
        reference_mem = anyio.run(flood_rss, flood_path, reference_flood, backend="asyncio")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    tput = f"{IN_FLIGHT}-in-flight throughput"
    rows = [
        compare(figures, "query-status latency", "seq ours", "seq qemu.qmp", "us", "<=0.75x"),
        compare(figures, f"{tput} vs qemu.qmp", "tput ours", "tput qemu.qmp", "calls/s", ">=1.3x"),
        compare(figures, f"{tput} vs bare asyncio", "tput ours", "tput bare", "calls/s", ">=0.9x"),
        compare(figures, "stop -> STOP event", "stop ours", "stop qemu.qmp", "us", "<=1.0x"),
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
    informative = [
        compare(figures, "(info) trio latency vs asyncio", "seq trio", "seq ours", "us", "<=1x"),
        compare(
            figures, "(info) trio tput vs asyncio", "tput trio", "tput ours", "calls/s", ">=1x"
        ),
        compare(
            figures,
            "(info) instant server: tput vs qemu.qmp",
            "instant ours",
            "instant qemu.qmp",
            "calls/s",
            ">=1.3x",
        ),
        compare(
            figures,
            "(info) instant server: tput vs bare",
            "instant ours",
            "instant bare",
            "calls/s",
            ">=0.9x",
        ),
    ]
    for row in informative:
        row.met = None
    print(f"QEMU {QEMU}, Python {sys.version.split()[0]}, {ROUNDS} interleaved rounds")
    print("ours, anchor: medians over the rounds; ratio: median of the per-round ratios")
    print(
        f"memory: RSS {before:.1f} MiB before, {first:.1f} after "
        f"{FLOOD_EVENTS // FLOOD_PHASES} events, {after:.1f} after {FLOOD_EVENTS}; "
        f"{dropped} dropped (qemu.qmp: {ref_before:.1f} -> {ref_after:.1f} MiB)"
    )
    print(format_table(rows + informative))


QEMU_MEASURES: dict[str, Measure] = {
    "seq ours": ours_sequential,
    "seq qemu.qmp": reference_sequential,
    "tput ours": ours_throughput,
    "tput qemu.qmp": reference_throughput,
    "tput bare": bare_throughput,
    "stop ours": ours_stop_to_event,
    "stop qemu.qmp": reference_stop_to_event,
}
TRIO_MEASURES: dict[str, Measure] = {"seq trio": ours_sequential, "tput trio": ours_throughput}
INSTANT_MEASURES: dict[str, Measure] = {
    "instant ours": ours_throughput,
    "instant qemu.qmp": reference_throughput,
    "instant bare": bare_throughput,
}


if __name__ == "__main__":
    main()
