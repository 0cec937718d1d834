"""Benchmark of the kvm-supervisor daemon against bare QEMU and libvirt (issue 4 §9).

Run: ``.venv/bin/python tests/bench/bench_supervisor.py [--json] [--no-libvirt]
[--libvirt-json FILE]``. Asserts nothing: prints the figures, their anchors, the ratios
and whether each target is met (exit status 0 either way).

It starts its own ``kvm-supervisor serve`` on a private state dir under /tmp and talks to
it over the control socket (a minimal NDJSON JSON-RPC client lives in this file, so the
figures are the daemon's, not a client library's). In one run it measures:

1. ``instance.start`` with a spec (returns when the guest runs), against the same argv
   run bare with ``qemu-system-x86_64 -daemonize`` (taken from the runtime record, with
   the socket and pid file paths moved to a scratch dir), timed until the ``-daemonize``
   parent returns; in pairs (each start followed by its bare run), 9 pairs. Target: the
   median of the paired differences at most 25 ms. The reply's ``started_at`` and the
   ``instance.state`` events give a breakdown (request -> spawn, the runtime record's
   fsync, spawn -> running, running -> reply). Also the whole
   ``kvm-supervisor start --spec`` command, next to libvirt's ``virsh create`` (both
   whole commands, client start-up included).
2. ``kill -9`` of QEMU -> the ``instance.state`` crashed event at an RPC subscriber;
   p50, target <= 10 ms; libvirt's anchor next to it. Each sample is paired with the
   kernel's part: the same argv run bare, killed after as long, until its pidfd is
   readable (the exit of a QEMU takes milliseconds of memory teardown).
3. ``instance.info`` latency, p50 and p99, with 20 concurrent clients (one connection
   each) on a running instance, next to one client alone; ``supervisor.ping`` under the
   same load (the RPC layer without QMP), and the daemon's CPU time per call.
4. 20 tiny guests (96 MiB, TCG) under the daemon: its RSS idle before and with the 20
   running (measured once all are ``running``, not booted); target <= 2x libvirtd's with
   10 guests (the anchor measured in this run, and the static one).
5. The daemon's own CPU (utime + stime) over 30 s with the 20 guests running; target < 1 %.

The libvirt anchors come from ``bench_libvirt.measure()`` (run first, before our daemon
starts), from a file written by ``bench_libvirt.py --json`` (``--libvirt-json`` or the
``KVS_BENCH_LIBVIRT_JSON`` environment variable, which ``run.py`` sets), or, with
``--no-libvirt``, the fallback figures of bench_libvirt.

Everything is cleaned up at the end, on error and on Ctrl-C too: guests stopped with
force, the daemon sent SIGTERM, QEMUs left over killed by pid (only those whose command
line names this run's temp dir), the temp dir removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
from benchtable import Row, format_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import kill_if_started_in, kill_leftover_qemus, wait_gone

QEMU = os.environ.get("KVM_SUPERVISOR_TEST_QEMU", "/usr/bin/qemu-system-x86_64")
REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
GUEST_DIR = REPO / ".cache" / "guest"
KERNEL_ARGS = "quiet tsc=reliable no_timer_check mitigations=off"
READY_MARKER = b"KVS-GUEST-READY"
GUEST_MIB = 96

START_SAMPLES = 9
CLI_START_SAMPLES = 3
CRASH_SAMPLES = 7
CRASH_RUN_S = 0.3  # how long a guest runs before its QEMU is killed
INFO_CLIENTS = 20
INFO_CALLS = 50
INFO_WARMUP_CALLS = 5
INFO_SINGLE_CALLS = 200
GUESTS = 20
START_CONCURRENCY = 4
CPU_WINDOW_S = 30.0

START_TARGET_EXTRA_MS = 25.0
CRASH_TARGET_MS = 10.0
CPU_TARGET_PERCENT = 1.0
RSS_TARGET_FACTOR = 2.0

CALL_TIMEOUT_S = 120.0


def log(message: str) -> None:
    print(f"bench_supervisor: {message}", file=sys.stderr, flush=True)


# --- a minimal JSON-RPC client of the control socket -----------------------------------

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class RPCError(Exception):
    def __init__(self, method: str, error: dict[str, Any]) -> None:
        super().__init__(f"{method}: {error.get('code')} {error.get('message')}")
        self.code = error.get("code")
        self.data = error.get("data")


class Notification(msgspec.Struct):
    arrived: float  # time.perf_counter() when the line was read
    params: dict[str, Any]


class Client:
    """One connection: concurrent calls routed by id; notifications kept with arrival times."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.notifications: list[Notification] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, path: Path) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=64 * 1024 * 1024)
        return cls(reader, writer)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        request_id = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.write(_encoder.encode(message) + b"\n")
            await self._writer.drain()
            reply = await asyncio.wait_for(future, CALL_TIMEOUT_S)
        finally:
            self._pending.pop(request_id, None)
        if "error" in reply:
            raise RPCError(method, reply["error"])
        return reply["result"]

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                arrived = time.perf_counter()
                message = _decoder.decode(line)
                if "id" in message and message.get("method") is None:
                    future = self._pending.get(message["id"])
                    if future is not None and not future.done():
                        future.set_result(message)
                elif message.get("method") == "event":
                    self.notifications.append(Notification(arrived, message["params"]))
                    self._arrived.set()
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("the daemon closed the connection"))

    async def wait_event(
        self, predicate: Callable[[Notification], bool], timeout_s: float = 30.0
    ) -> Notification:
        """The first notification (kept so far or arriving) that satisfies `predicate`."""
        checked = 0
        async with asyncio.timeout(timeout_s):
            while True:
                while checked < len(self.notifications):
                    notification = self.notifications[checked]
                    checked += 1
                    if predicate(notification):
                        return notification
                self._arrived.clear()
                await self._arrived.wait()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


def state_event(name: str, state: str, after: float) -> Callable[[Notification], bool]:
    def matches(notification: Notification) -> bool:
        params = notification.params
        return (
            notification.arrived >= after
            and params.get("instance") == name
            and params.get("kind") == "instance.state"
            and params.get("data", {}).get("state") == state
        )

    return matches


# --- processes -------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kill_leftovers(workdir: Path) -> None:
    killed = kill_leftover_qemus(workdir)
    if killed:
        log(f"killed leftover QEMUs {killed}")


class Daemon:
    """``kvm-supervisor serve`` in its own session, with a private config and state dir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.state_dir = workdir
        self.config = workdir / "supervisor.toml"
        self.socket = workdir / "control.sock"
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        defs = self.workdir / "defs"
        defs.mkdir(exist_ok=True)
        self.config.write_text(
            f"state_dir = {json.dumps(str(self.state_dir))}\n"
            f"instances_dir = {json.dumps(str(defs))}\n"
            "stop_timeout_s = 30\n"
            "[hvparams]\n"
            f"kernel_path = {json.dumps(str(GUEST_DIR / 'vmlinuz'))}\n"
            f"initrd_path = {json.dumps(str(GUEST_DIR / 'initrd.img'))}\n"
            f"kernel_args = {json.dumps(KERNEL_ARGS)}\n"
            "serial_console = true\n"
        )

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "supervisor.cli", "--config", str(self.config), *args]

    def spawn(self) -> None:
        self.write_config()
        with self.log_path.open("ab") as daemon_log:
            self.proc = subprocess.Popen(
                self.cli("serve"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=daemon_log,
                cwd=REPO,
                start_new_session=True,  # ^C reaches this script only: it cleans up in order
            )

    async def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemon did not answer in 30 s: {self.log_tail()}")
            if self.socket.exists():
                with contextlib.suppress(OSError):
                    client = await Client.connect(self.socket)
                    try:
                        await client.call("supervisor.ping")
                        return
                    finally:
                        await client.close()
            await asyncio.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def terminate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log("the daemon ignored SIGTERM for 30 s: killing it")
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-lines:])


# --- the figures ----------------------------------------------------------------------


def percentile(samples: list[float], p: int) -> float:
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1]


def ms(seconds: float) -> float:
    return seconds * 1000


def spec(name: str) -> dict[str, Any]:
    return {"name": name, "memory_mib": GUEST_MIB}


class Bench:
    """The measurements, in order, against one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.scratch = daemon.workdir / "bare"
        self.scratch.mkdir()
        self.figures: dict[str, Any] = {}
        self.control: Client | None = None
        self.watcher: Client | None = None

    async def open(self) -> None:
        self.control = await Client.connect(self.daemon.socket)
        self.watcher = await Client.connect(self.daemon.socket)
        await self.watcher.call("events.subscribe", {"kinds": ["instance.state"]})

    async def close(self) -> None:
        for client in (self.control, self.watcher):
            if client is not None:
                await client.close()
        self.control = self.watcher = None

    @property
    def rpc(self) -> Client:
        assert self.control is not None
        return self.control

    @property
    def events(self) -> Client:
        assert self.watcher is not None
        return self.watcher

    # 1. start latency --------------------------------------------------------------

    def instance_dir(self, name: str) -> Path:
        return self.daemon.state_dir / "instances" / name

    def bare_argv(self, name: str, *, daemonize: bool = True) -> list[str]:
        """The instance's argv from its runtime record, paths moved to the scratch dir."""
        record = json.loads((self.instance_dir(name) / "runtime.json").read_text())
        own = str(self.instance_dir(name))
        argv = [arg.replace(own, str(self.scratch)) for arg in record["argv"]]
        if any(str(self.daemon.state_dir / "instances") in arg for arg in argv):
            raise RuntimeError(f"the bare argv still names the state dir: {argv}")
        return [*argv, "-daemonize"] if daemonize else argv

    def run_bare(self, argv: list[str]) -> float:
        """Run the argv with -daemonize; the parent's wall time; then kill the QEMU."""
        for leftover in self.scratch.iterdir():
            leftover.unlink()
        errors = self.daemon.workdir / "bare.err"
        with errors.open("wb") as stderr:
            # No pipes: the daemonized QEMU holds its stdio a while after the parent exits.
            start = time.perf_counter()
            result = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
            elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"bare QEMU failed: {errors.read_text(errors='replace')}")
        pid = int((self.scratch / "qemu.pid").read_text().strip())
        if kill_if_started_in(pid, self.scratch):
            wait_gone(pid)
        return elapsed

    def bare_kill_floor(self, argv: list[str]) -> float:
        """Run the argv bare for as long as a crash sample runs; kill -9 -> pidfd readable."""
        for leftover in self.scratch.iterdir():
            leftover.unlink()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            time.sleep(CRASH_RUN_S)
            pidfd = os.pidfd_open(proc.pid)
            try:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                killed = time.perf_counter()
                os.kill(proc.pid, signal.SIGKILL)
                poller.poll(10_000)
                return time.perf_counter() - killed
            finally:
                os.close(pidfd)
        finally:
            proc.kill()
            proc.wait()

    async def start_ours(self, name: str) -> tuple[float, dict[str, float]]:
        """`instance.start` until its reply; where the time went, from the reply's
        ``started_at`` (taken right after the spawn) and the ``instance.state`` events."""
        sent_wall = time.time()
        sent = time.perf_counter()
        info = await self.rpc.call("instance.start", {"spec": spec(name)})
        elapsed = time.perf_counter() - sent
        replied_wall = sent_wall + elapsed
        if info["state"] != "running":
            raise RuntimeError(f"instance.start returned state {info['state']}")
        starting = await self.events.wait_event(state_event(name, "starting", sent), 10)
        running = await self.events.wait_event(state_event(name, "running", sent), 10)
        spawned_at = info["started_at"]
        running_at = running.params["timestamp"]
        breakdown = {
            "request -> QEMU spawned": spawned_at - sent_wall,
            "spawned -> 'starting' published": starting.params["timestamp"] - spawned_at,
            "spawned -> 'running' published": running_at - spawned_at,
            "'running' -> reply received": replied_wall - running_at,
        }
        return elapsed, breakdown

    async def stop(self, name: str) -> None:
        await self.rpc.call("instance.stop", {"name": name, "force": True})

    async def measure_start(self) -> None:
        name = "start"
        log("start latency: warming up (the daemon probes QEMU on its first start)")
        await self.start_ours(name)
        argv = self.bare_argv(name)
        await self.stop(name)
        await asyncio.to_thread(self.run_bare, argv)
        ours: list[float] = []
        bare: list[float] = []
        parts: dict[str, list[float]] = {}
        for _ in range(START_SAMPLES):
            elapsed, breakdown = await self.start_ours(name)
            await self.stop(name)
            ours.append(ms(elapsed))
            for part, seconds in breakdown.items():
                parts.setdefault(part, []).append(ms(seconds))
            bare.append(ms(await asyncio.to_thread(self.run_bare, argv)))
        await self.rpc.call("instance.cleanup", {"name": name})
        log(f"start via RPC (ms): {', '.join(f'{x:.1f}' for x in ours)}")
        log(f"bare -daemonize (ms): {', '.join(f'{x:.1f}' for x in bare)}")
        self.figures["start_ms"] = ours
        self.figures["bare_ms"] = bare
        self.figures["start_breakdown_ms"] = {k: statistics.median(v) for k, v in parts.items()}

        spec_file = self.daemon.workdir / "cli-start.json"
        spec_file.write_text(json.dumps(spec("clistart")))
        cli: list[float] = []
        for _ in range(CLI_START_SAMPLES):
            command = self.daemon.cli("start", "--spec", str(spec_file), "--json")
            started = time.perf_counter()
            result = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, cwd=REPO, check=False
            )
            cli.append(ms(time.perf_counter() - started))
            if result.returncode != 0:
                raise RuntimeError(f"kvm-supervisor start failed: {result.stderr.decode()}")
            await self.stop("clistart")
        await self.rpc.call("instance.cleanup", {"name": "clistart"})
        log(f"kvm-supervisor start --spec (ms): {', '.join(f'{x:.0f}' for x in cli)}")
        self.figures["cli_start_ms"] = cli

    # 2. crash event ---------------------------------------------------------------

    async def measure_crash(self) -> None:
        name = "crash"
        latencies: list[float] = []
        published: list[float] = []
        floor: list[float] = []
        for i in range(CRASH_SAMPLES):
            info = await self.rpc.call("instance.start", {"spec": spec(name)})
            if i == 0:
                argv = self.bare_argv(name, daemonize=False)
            await asyncio.sleep(CRASH_RUN_S)
            killed_wall = time.time()
            killed = time.perf_counter()
            os.kill(info["pid"], signal.SIGKILL)
            event = await self.events.wait_event(state_event(name, "crashed", killed), 10)
            latencies.append(ms(event.arrived - killed))
            published.append(ms(event.params["timestamp"] - killed_wall))
            floor.append(ms(await asyncio.to_thread(self.bare_kill_floor, argv)))
        await self.rpc.call("instance.cleanup", {"name": name})
        log(f"crash event (ms): {', '.join(f'{x:.2f}' for x in latencies)}")
        log(f"bare kill -9 -> pidfd readable (ms): {', '.join(f'{x:.2f}' for x in floor)}")
        self.figures["crash_ms"] = latencies
        self.figures["crash_published_ms"] = published
        self.figures["crash_floor_ms"] = floor

    # 3. instance.info under 20 clients ------------------------------------------------

    async def measure_info(self) -> None:
        name = "info"
        await self.rpc.call("instance.start", {"spec": spec(name)})
        single: list[float] = []
        for i in range(INFO_WARMUP_CALLS + INFO_SINGLE_CALLS):
            started = time.perf_counter()
            await self.rpc.call("instance.info", {"name": name})
            if i >= INFO_WARMUP_CALLS:
                single.append(ms(time.perf_counter() - started))

        loaded, calls_per_s = await self.under_load("instance.info", {"name": name})
        pings, ping_calls_per_s = await self.under_load("supervisor.ping", None)
        await self.stop(name)
        await self.rpc.call("instance.cleanup", {"name": name})
        self.figures["info_single_ms"] = single
        self.figures["info_loaded_ms"] = loaded
        self.figures["info_calls_per_s"] = calls_per_s
        self.figures["ping_loaded_ms"] = pings
        self.figures["ping_calls_per_s"] = ping_calls_per_s
        log(
            f"instance.info: 1 client p50 {statistics.median(single):.2f} ms; "
            f"{INFO_CLIENTS} clients p50 {statistics.median(loaded):.2f} ms, "
            f"p99 {percentile(loaded, 99):.2f} ms, {calls_per_s:.0f} calls/s; "
            f"supervisor.ping, {INFO_CLIENTS} clients: p50 {statistics.median(pings):.2f} ms"
        )

    async def under_load(
        self, method: str, params: dict[str, Any] | None
    ) -> tuple[list[float], float]:
        """`INFO_CLIENTS` connections calling `method` at once, `INFO_CALLS` times each:
        every call's latency (ms) and the calls per second. Also keeps the daemon's and
        this process's CPU time per call (µs) in the figures."""
        clients = [await Client.connect(self.daemon.socket) for _ in range(INFO_CLIENTS)]
        go = asyncio.Event()

        async def one_client(client: Client) -> list[float]:
            for _ in range(INFO_WARMUP_CALLS):
                await client.call(method, params)
            await go.wait()
            samples = []
            for _ in range(INFO_CALLS):
                started = time.perf_counter()
                await client.call(method, params)
                samples.append(ms(time.perf_counter() - started))
            return samples

        try:
            tasks = [asyncio.create_task(one_client(client)) for client in clients]
            await asyncio.sleep(0.5)  # every client connected and warmed up
            daemon_cpu = cpu_seconds(self.daemon.pid)
            own_cpu = time.process_time()
            began = time.perf_counter()
            go.set()
            results = await asyncio.gather(*tasks)
            wall = time.perf_counter() - began
            daemon_cpu = cpu_seconds(self.daemon.pid) - daemon_cpu
            own_cpu = time.process_time() - own_cpu
        finally:
            for client in clients:
                await client.close()
        samples = [x for result in results for x in result]
        self.figures[f"{method} daemon_cpu_us_per_call"] = daemon_cpu / len(samples) * 1e6
        self.figures[f"{method} client_cpu_us_per_call"] = own_cpu / len(samples) * 1e6
        return samples, len(samples) / wall

    # 4. and 5. 20 guests: RSS and idle CPU ------------------------------------------------

    async def measure_guests(self, cpu_window_s: float) -> None:
        names = [f"g{i:02d}" for i in range(GUESTS)]
        semaphore = asyncio.Semaphore(START_CONCURRENCY)
        start_ms: list[float] = []

        async def start(name: str) -> None:
            async with semaphore:
                started = time.perf_counter()
                await self.rpc.call("instance.start", {"spec": spec(name)})
                start_ms.append(ms(time.perf_counter() - started))

        began = time.perf_counter()
        await asyncio.gather(*(start(name) for name in names))
        all_started_s = time.perf_counter() - began
        listing = await self.rpc.call("instance.list")
        running = sorted(i["name"] for i in listing if i["state"] == "running")
        if running != names:
            raise RuntimeError(f"not all guests running: {listing}")
        rss_running = rss_mib(self.daemon.pid)
        log(
            f"{GUESTS} guests running after {all_started_s:.1f} s "
            f"(concurrency {START_CONCURRENCY}, start median {statistics.median(start_ms):.0f} ms)"
            f": daemon RSS {rss_running:.1f} MiB"
        )
        # Idle: no client talks to the daemon during the window.
        await self.close()
        log(f"daemon CPU over {cpu_window_s:g} s with {GUESTS} guests running ...")
        cpu_before = cpu_seconds(self.daemon.pid)
        wall_before = time.monotonic()
        await asyncio.sleep(cpu_window_s)
        cpu_used = cpu_seconds(self.daemon.pid) - cpu_before
        wall = time.monotonic() - wall_before
        rss_after = rss_mib(self.daemon.pid)
        booted = sum(
            1
            for name in names
            if READY_MARKER in _read_bytes(self.instance_dir(name) / "serial.log")
        )
        log(
            f"daemon CPU {cpu_used:.2f} s in {wall:.1f} s; RSS {rss_after:.1f} MiB; "
            f"{booted}/{GUESTS} guests booted"
        )
        await self.open()
        self.figures |= {
            "guests_start_ms": start_ms,
            "guests_all_started_s": all_started_s,
            "rss_guests_running_mib": rss_running,
            "rss_guests_after_window_mib": rss_after,
            "cpu_percent": cpu_used / wall * 100,
            "cpu_seconds": cpu_used,
            "cpu_window_s": wall,
            "guests_booted": booted,
        }

    async def stop_all(self) -> None:
        """Stop every running instance with force (cleanup path; never raises)."""
        try:
            client = await Client.connect(self.daemon.socket)
        except OSError as error:
            log(f"cannot reach the daemon to stop the guests: {error}")
            return
        try:
            listing = await client.call("instance.list")
            alive = [i["name"] for i in listing if i["pid"] is not None]
            results = await asyncio.gather(
                *(client.call("instance.stop", {"name": n, "force": True}) for n in alive),
                return_exceptions=True,
            )
            for name, result in zip(alive, results, strict=True):
                if isinstance(result, BaseException):
                    log(f"stop {name} failed: {result}")
        except (OSError, RPCError, TimeoutError) as error:
            log(f"stopping the guests failed: {error}")
        finally:
            await client.close()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


async def run_bench(daemon: Daemon, cpu_window_s: float) -> dict[str, Any]:
    daemon.spawn()
    await daemon.wait_ready()
    figures: dict[str, Any] = {
        "rss_started_mib": rss_mib(daemon.pid),
        "loadavg_before": os.getloadavg()[0],
    }
    bench = Bench(daemon)
    try:
        await bench.open()
        await bench.measure_start()
        await asyncio.sleep(1)
        figures["rss_idle_mib"] = rss_mib(daemon.pid)
        await bench.measure_crash()
        await bench.measure_info()
        figures["loadavg_before_guests"] = os.getloadavg()[0]
        await bench.measure_guests(cpu_window_s)
    finally:
        await bench.close()
        await bench.stop_all()
    return figures | bench.figures


# --- anchors and report ---------------------------------------------------------------


def load_anchors(args: argparse.Namespace) -> Any:
    """The libvirt anchors: from a file, the fallback, or measured now."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    bench_libvirt = importlib.import_module("bench_libvirt")
    if args.libvirt_json:
        path = Path(args.libvirt_json)
        try:
            return msgspec.json.decode(path.read_bytes(), type=bench_libvirt.LibvirtAnchors)
        except (OSError, msgspec.DecodeError) as error:
            log(f"cannot use the libvirt anchors in {path}: {error}; measuring them now")
    if args.no_libvirt:
        return bench_libvirt.fallback("--no-libvirt")
    log("measuring the libvirt anchors first (bench_libvirt.measure)")
    return bench_libvirt.measure()


def static_anchors() -> Any:
    return importlib.import_module("bench_libvirt").fallback("static")


def start_differences(figures: dict[str, Any]) -> list[float]:
    return [o - b for o, b in zip(figures["start_ms"], figures["bare_ms"], strict=True)]


def build_rows(figures: dict[str, Any], anchors: Any) -> list[Row]:
    static = static_anchors()
    ours_start = statistics.median(figures["start_ms"])
    bare_start = statistics.median(figures["bare_ms"])
    # Paired (each start is followed by its bare run): drifts in the machine's load cancel.
    start_extra = statistics.median(start_differences(figures))
    cli_start = statistics.median(figures["cli_start_ms"])
    crash = statistics.median(figures["crash_ms"])
    single = figures["info_single_ms"]
    loaded = figures["info_loaded_ms"]
    rss_guests = max(figures["rss_guests_running_mib"], figures["rss_guests_after_window_mib"])
    measured_label = "measured" if anchors.source.startswith("measured") else "fallback"
    rows = [
        Row(
            "start -> running, RPC (median)",
            f"{ours_start:.1f} ms",
            f"{bare_start:.1f} ms bare",
            ours_start / bare_start,
            f"<= bare+{START_TARGET_EXTRA_MS:g} ms",
            start_extra <= START_TARGET_EXTRA_MS,
        ),
        Row(
            "start, whole CLI command (median)",
            f"{cli_start:.0f} ms",
            f"{anchors.virsh_create_ms:g} ms virsh create",
            cli_start / anchors.virsh_create_ms,
            "-",
            None,
        ),
        Row(
            "kill -9 -> crashed event (p50)",
            f"{crash:.2f} ms",
            f"{anchors.crash_event_ms:g} ms libvirt",
            crash / anchors.crash_event_ms,
            f"<= {CRASH_TARGET_MS:g} ms",
            crash <= CRASH_TARGET_MS,
        ),
        Row(
            f"instance.info p50, {INFO_CLIENTS} clients",
            f"{statistics.median(loaded):.2f} ms",
            f"{statistics.median(single):.2f} ms 1 client",
            statistics.median(loaded) / statistics.median(single),
            "-",
            None,
        ),
        Row(
            f"instance.info p99, {INFO_CLIENTS} clients",
            f"{percentile(loaded, 99):.2f} ms",
            f"{percentile(single, 99):.2f} ms 1 client",
            percentile(loaded, 99) / percentile(single, 99),
            "-",
            None,
        ),
        Row(
            "daemon RSS, idle",
            f"{figures['rss_idle_mib']:.1f} MiB",
            f"{anchors.libvirtd_rss_idle_mib:g} MiB libvirtd",
            figures["rss_idle_mib"] / anchors.libvirtd_rss_idle_mib,
            "-",
            None,
        ),
        Row(
            f"daemon RSS, {GUESTS} guests",
            f"{rss_guests:.1f} MiB",
            f"{anchors.libvirtd_rss_10_guests_mib:g} MiB libvirtd/{anchors.guests} "
            f"({measured_label})",
            rss_guests / anchors.libvirtd_rss_10_guests_mib,
            f"<= {RSS_TARGET_FACTOR * anchors.libvirtd_rss_10_guests_mib:g} MiB",
            rss_guests <= RSS_TARGET_FACTOR * anchors.libvirtd_rss_10_guests_mib,
        ),
        Row(
            f"daemon RSS, {GUESTS} guests (static anchor)",
            f"{rss_guests:.1f} MiB",
            f"{static.libvirtd_rss_10_guests_mib:g} MiB libvirtd/{static.guests}",
            rss_guests / static.libvirtd_rss_10_guests_mib,
            f"<= {RSS_TARGET_FACTOR * static.libvirtd_rss_10_guests_mib:g} MiB",
            rss_guests <= RSS_TARGET_FACTOR * static.libvirtd_rss_10_guests_mib,
        ),
        Row(
            f"daemon CPU, {GUESTS} guests, {figures['cpu_window_s']:.0f} s",
            f"{figures['cpu_percent']:.2f} %",
            "-",
            None,
            f"< {CPU_TARGET_PERCENT:g} %",
            figures["cpu_percent"] < CPU_TARGET_PERCENT,
        ),
    ]
    return rows


def format_notes(figures: dict[str, Any], anchors: Any) -> str:
    def samples(values: list[float], digits: int = 1) -> str:
        return ", ".join(f"{v:.{digits}f}" for v in values)

    breakdown = figures["start_breakdown_ms"]
    lines = [
        f"kvm-supervisor daemon vs bare QEMU ({QEMU}, TCG) and libvirt; "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; load average "
        f"{figures['loadavg_before']:.1f} at the start, {figures['loadavg_before_guests']:.1f} "
        f"before the {GUESTS} guests (other work on the machine skews every figure)",
        f"libvirt anchors: {anchors.source}"
        + (f" (libvirt {anchors.libvirt_version})" if anchors.libvirt_version else "")
        + (f"; note: {anchors.reason}" if anchors.reason else ""),
        f"start via RPC (ms): {samples(figures['start_ms'])}",
        f"bare -daemonize (ms): {samples(figures['bare_ms'])}",
        f"ours - bare, paired (ms): {samples(start_differences(figures))}; median "
        f"{statistics.median(start_differences(figures)):.1f} (the target's figure)",
        "start breakdown, medians (ms; the 'starting' event follows the runtime record's "
        "fsync, while QEMU initialises): "
        + ", ".join(f"{part} {value:.1f}" for part, value in breakdown.items()),
        f"kvm-supervisor start --spec (ms): {samples(figures['cli_start_ms'], 0)}",
        f"crash event at the subscriber (ms): {samples(figures['crash_ms'], 2)}; "
        f"p50 {statistics.median(figures['crash_ms']):.2f}; published by the daemon "
        f"(daemon clock) p50 {statistics.median(figures['crash_published_ms']):.2f}; bare QEMU "
        f"kill -9 -> pidfd readable (the kernel's part) p50 "
        f"{statistics.median(figures['crash_floor_ms']):.2f}",
        f"instance.info: {len(figures['info_loaded_ms'])} calls from {INFO_CLIENTS} clients, "
        f"{figures['info_calls_per_s']:.0f} calls/s; 1 client: "
        f"{len(figures['info_single_ms'])} calls; supervisor.ping from {INFO_CLIENTS} clients "
        f"(no QMP): p50 {statistics.median(figures['ping_loaded_ms']):.2f} ms, "
        f"p99 {percentile(figures['ping_loaded_ms'], 99):.2f} ms, "
        f"{figures['ping_calls_per_s']:.0f} calls/s",
        "CPU per call under that load (µs; daemon / this benchmark's clients): instance.info "
        f"{figures['instance.info daemon_cpu_us_per_call']:.0f} / "
        f"{figures['instance.info client_cpu_us_per_call']:.0f}, supervisor.ping "
        f"{figures['supervisor.ping daemon_cpu_us_per_call']:.0f} / "
        f"{figures['supervisor.ping client_cpu_us_per_call']:.0f}",
        f"daemon RSS: {figures['rss_started_mib']:.1f} MiB started, "
        f"{figures['rss_idle_mib']:.1f} idle, {figures['rss_guests_running_mib']:.1f} once "
        f"{GUESTS} guests were running, {figures['rss_guests_after_window_mib']:.1f} "
        f"{figures['cpu_window_s']:.0f} s later ({figures['guests_booted']}/{GUESTS} booted); "
        f"libvirtd: {anchors.libvirtd_rss_idle_mib:g} idle, "
        f"{anchors.libvirtd_rss_10_guests_mib:g} with {anchors.guests} guests",
        f"{GUESTS} guests started in {figures['guests_all_started_s']:.1f} s "
        f"({START_CONCURRENCY} at a time; start median "
        f"{statistics.median(figures['guests_start_ms']):.0f} ms under load); daemon CPU "
        f"{figures['cpu_seconds']:.2f} s in {figures['cpu_window_s']:.1f} s",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def workdir_cleanup() -> Iterator[tuple[Path, Daemon]]:
    workdir = Path(tempfile.mkdtemp(prefix="kvsb-", dir="/tmp"))
    daemon = Daemon(workdir)
    try:
        yield workdir, daemon
    finally:
        daemon.terminate()
        kill_leftovers(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument(
        "--no-libvirt", action="store_true", help="use bench_libvirt's fallback anchors"
    )
    parser.add_argument(
        "--libvirt-json",
        metavar="FILE",
        default=os.environ.get("KVS_BENCH_LIBVIRT_JSON"),
        help="libvirt anchors written by `bench_libvirt.py --json`",
    )
    parser.add_argument(
        "--cpu-window",
        type=float,
        default=CPU_WINDOW_S,
        metavar="S",
        help=f"seconds of the idle-CPU window (default {CPU_WINDOW_S:g})",
    )
    args = parser.parse_args(argv)
    if not (GUEST_DIR / "vmlinuz").exists() or not (GUEST_DIR / "initrd.img").exists():
        log(f"the test guest is missing from {GUEST_DIR}: run `make guest`")
        return 1
    try:
        anchors = load_anchors(args)
        with workdir_cleanup() as (_, daemon):
            try:
                figures = asyncio.run(run_bench(daemon, args.cpu_window))
            except Exception:
                log(f"daemon log tail: {daemon.log_tail()}")
                raise
    except KeyboardInterrupt:
        log("interrupted (cleaned up)")
        return 130
    rows = build_rows(figures, anchors)
    print(format_notes(figures, anchors))
    print(format_table(rows))
    if args.json:
        print(msgspec.json.encode({"rows": rows, "figures": figures}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
