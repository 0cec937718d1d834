"""Benchmark of the Ganeti driver (issue 10 §4): Ganeti's own hv_kvm vs kvm-supervisor's.

Run (as root): ``.venv/bin/python tests/bench/bench_ganeti.py [--json] [--rounds N]
[--info-calls N] [--migrations N] [--driver-calls N] [--idle-seconds S]``. Asserts
nothing: prints the figures of both drivers side by side and their ratios (exit status 0
either way).

One virtual two-node Ganeti 3.0 cluster (``tests/ganeti/vcluster.py``: a network and
mount namespace, an sshd, each node's kvm-supervisor daemon) runs the same guests in
turn on the two drivers of Ganeti's ``kvm`` hypervisor: kvm-supervisor's ("ours",
``kvm-supervisor ganeti-install`` on both nodes) and Ganeti's own hv_kvm ("stock",
``kvm-supervisor ganeti-uninstall``), every Ganeti daemon of both nodes restarted at each
switch. The visits go ours, stock, ours (a drift of the machine's load weighs on both
alike); the first start of each visit is a warm-up, not counted, and stops are not timed
(a kill at once, ``--timeout=0``). Both drivers get the same cluster parameters: the test
guest's kernel and initrd (``kernel_path``, ``initrd_path``), the serial console,
``kvm_path`` = qemu-system-x86_64 (TCG: through /usr/bin/kvm QEMU would prefer KVM, which
this host's kvm_pvm cannot give stock guests), no NICs; the guest ``b0`` has 96 MiB, the
ten idle guests 80 MiB (the test guest does not boot in 64).

1. ``gnt-instance start b0`` -> running: from the command's start until the command has
   returned AND the guest's ``KVS-GUEST-READY`` line has come out of its serial port
   (read from the serial console socket -- Ganeti's ``<ctrl>/b0.serial``, the daemon's
   ``serial.sock`` -- connected as soon as it exists); the command alone is reported
   too. Each start is followed by an untimed ``gnt-instance stop``.
2. ``gnt-instance migrate -f b0`` (live) between the nodes: the command's wall time, and
   the downtime the guest sees. A ticker typed on its serial console prints the guest's
   /proc/uptime every ~100 ms; the host notes when each line arrives, from the source's
   serial socket and then the target's. Downtime = host time between the last line from
   the source and the first from the target, minus the guest time between them (a
   paused guest's clock stands still; so the period does not limit the accuracy, the
   guest clock's 10 ms do). Ours also: QEMU's downtime from the source daemon's final
   MigrationStatus (its last ``migration.progress`` event). A guest whose kernel dies on
   the target (QEMU 7.2's TCG migration corrupts a busy guest's memory now and then, with
   bare QEMU too) is counted, gives no guest-side figure, and is started afresh. Stock
   Ganeti 3.0.2's migration fails in a virtual cluster (issue 10 §1): it is tried once,
   and the cause is reported instead of a figure.
3. ``gnt-instance info b0`` latency: the live query, which asks the node's hypervisor.
4. Ten guests running and booted (five per node): the CPU time (each process's threads'
   on-CPU time from /proc/<pid>/task/*/schedstat, to the nanosecond, plus the children
   it reaped from /proc/<pid>/stat) over an idle window of the node daemons of both
   nodes: ganeti-noded, plus kvm-supervisor for ours (stock has no
   such daemon; ganeti-kvmd would count too, but it exits unless ``user_shutdown`` is
   on). The other Ganeti daemons, alike for both, are listed apart. Ganeti's watcher is
   a cron job and there is no cron here, so none runs in the window. Then ``gnt-instance
   list`` of the ten with live fields (every node asked about all its instances): the
   latency, and the CPU per call on the nodes: the node daemons', and the QEMUs' beyond
   their rate in the idle window (stock's driver opens a QMP connection to each).
5. The driver alone, as a profile of what the Ganeti figures hide (Ganeti's jobs, RPC
   and forks take most of a second per command): ``GetAllInstancesInfo`` and
   ``GetInstanceInfo`` called by Ganeti's Python on node1 (five guests running) as noded
   calls them, a fresh driver object per call, 200 times each: wall time and CPU time
   per call -- the calling process's, plus the kvm-supervisor daemon's for ours (stock's
   QMP connections also cost QEMU CPU, not counted).

Ratios are stock / ours: above 1, ours is faster or cheaper.

Everything is cleaned up at the end, on error and on Ctrl-C too (``virtual_cluster``):
every process of the cluster's namespace killed by pid (Ganeti's daemons, both drivers'
QEMUs, the kvm-supervisor daemons, sshd), the namespaces gone with their holder, the temp
dir removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec
from bench_supervisor import QEMU, Client, ms, percentile
from benchtable import Row, format_table
from ganeti.vcluster import (
    COMMAND_TIMEOUT_S,
    GUEST_MIB,
    NODES,
    OS_NAME,
    VirtualCluster,
    missing_requirements,
    virtual_cluster,
)

from supervisor.cli.ganeti_setup import GANETI_LIB, GANETI_PYTHON
from supervisor.ganeti.settings import user_base
from supervisor.host.statedir import StateDir

Driver = Literal["ours", "stock"]

#: The visits, in order: the drivers' figures are pooled.
VISITS: tuple[Driver, ...] = ("ours", "stock", "ours")
BENCH_GUEST = "b0"
IDLE_GUESTS = tuple(f"i{index}" for index in range(10))
#: The least that boots the test guest is between 64 (no console output at all) and 80.
IDLE_GUEST_MIB = 80

START_ROUNDS = 6  # per driver, spread over its visits
INFO_CALLS = 20  # per driver
MIGRATIONS = 4  # ours; stock's are tried only if its first succeeds
IDLE_SECONDS = 60.0
LIST_CALLS = 5

READY = re.compile(rb"^KVS-GUEST-READY\b")
HEARTBEAT = re.compile(rb"^KVS-HEARTBEAT \d+$")
TICK = re.compile(rb"^KVS-TICK (\d+\.\d+)$")
#: A tick, or the guest kernel's last words.
TICK_OR_CRASH = re.compile(
    TICK.pattern + rb"|.*(?:Kernel panic|BUG: |Oops: |general protection fault|double fault)"
)
#: Typed on the serial console: the guest's clock every ~100 ms, for at most ~60 s, with
#: busybox shell builtins only (``read -t`` on a fifo nobody writes to waits, no fork).
#: The downtime's accuracy does not depend on the period (the lines carry the guest's
#: time), and a quiet guest is less exposed to QEMU 7.2's TCG migration corrupting a
#: busy guest's memory (seen with bare QEMU too).
TICKER = (
    b"\nmkfifo /tmp/kvs-tick 2>/dev/null; exec 3<>/tmp/kvs-tick; n=0; while [ $n -lt 600 ]; "
    b'do read u _ < /proc/uptime; echo "KVS-TICK $u"; read -t 0.1 _ <&3; n=$((n+1)); '
    b"done &\n"
)
STOP_TICKER = b"kill $!\n"
#: Generous: a TCG boot takes seconds, and the machine may be shared.
BOOT_TIMEOUT_S = 180.0
SERIAL_POLL_S = 0.005
TICK_TIMEOUT_S = 60.0

DRIVER_CALLS = 200
#: Run by Ganeti's Python on a node, as noded runs the driver: a fresh object per call,
#: after one call not timed; prints the medians of the wall and CPU time (this process's)
#: per call (medians: a burst of the machine's load hits a few calls only).
DRIVER_PROBE = f"""
import json, statistics, sys, time
sys.path.insert(0, {GANETI_LIB!r})
from ganeti import hypervisor
kvm = hypervisor.GetHypervisorClass("kvm")
query, calls, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def call():
    if query == "all":
        return kvm().GetAllInstancesInfo()
    return kvm().GetInstanceInfo(name)
found = call()
walls, cpus = [], []
for _ in range(calls):
    cpu, wall = time.process_time(), time.perf_counter()
    call()
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
print(json.dumps({{"driver": kvm.__module__, "wall": statistics.median(walls),
                  "cpu": statistics.median(cpus),
                  "found": len(found) if query == "all" else int(found is not None)}}))
"""

QUERY_NAMES = {"all": "GetAllInstancesInfo", "one": "GetInstanceInfo"}
DRIVER_PROBE_TEXT = (
    "the hypervisor query run by Ganeti's Python on node1 as noded runs it (a fresh driver "
    "object per call), without Ganeti's RPC, with node1's five idle guests running"
)

#: The processes counted as a driver's node daemons.
NODE_DAEMONS: dict[Driver, tuple[str, ...]] = {
    "ours": ("ganeti-noded", "ganeti-kvmd", "kvm-supervisor"),
    "stock": ("ganeti-noded", "ganeti-kvmd"),
}


def log(message: str) -> None:
    print(f"bench_ganeti: {message}", file=sys.stderr, flush=True)


def add_argv(name: str, node: str, mib: int) -> list[str]:
    """``gnt-instance add`` of a diskless test guest without NICs, not started."""
    return [
        "gnt-instance", "add", "-t", "diskless", "-o", OS_NAME, "--no-name-check",
        "--no-ip-check", "--no-start", "--no-nics", "-B", f"maxmem={mib},minmem={mib},vcpus=1",
        "-n", node, name,
    ]  # fmt: skip


def other_node(node: str) -> str:
    return next(name for name in NODES if name != node)


# --- the guests' serial ports -------------------------------------------------------------


class SerialPort:
    """What comes out of a guest's serial port, line by line, each with the host time
    (``time.perf_counter()``) it arrived: read from its serial console socket, connected
    as soon as it exists (the QEMU's output before then is not seen)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, bytes]] = []
        self.connected = asyncio.Event()
        self._arrived = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None

    async def read(self, connect_timeout_s: float) -> None:
        """Connect, then read until the QEMU closes the socket (a task)."""
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                reader, self._writer = await asyncio.open_unix_connection(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                # Not there yet, or a stale socket its QEMU left behind.
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no serial console at {self.path} within {connect_timeout_s:g} s"
                    ) from None
                await asyncio.sleep(SERIAL_POLL_S)
        self.connected.set()
        pending = b""
        try:
            while chunk := await reader.read(65536):
                arrived = time.perf_counter()
                *complete, pending = (pending + chunk).split(b"\n")
                self.lines += [(arrived, line.rstrip(b"\r")) for line in complete]
                self._arrived.set()
        finally:
            self._writer.close()

    async def type(self, text: bytes) -> None:
        await self.connected.wait()
        assert self._writer is not None
        self._writer.write(text)
        await self._writer.drain()

    async def wait_for(
        self, pattern: re.Pattern[bytes], timeout_s: float
    ) -> tuple[float, re.Match[bytes]]:
        """The arrival time and match of the first line (come or to come) that matches
        `pattern`."""
        checked = 0
        async with asyncio.timeout(timeout_s):
            while True:
                for arrived, line in self.lines[checked:]:
                    match = pattern.match(line)
                    if match:
                        return arrived, match
                checked = max(checked, len(self.lines))
                self._arrived.clear()
                await self._arrived.wait()

    def ticks(self) -> list[tuple[float, float]]:
        """The ticker's lines so far: (host arrival time, guest uptime)."""
        found = []
        for arrived, line in self.lines:
            match = TICK.match(line)
            if match:
                found.append((arrived, float(match.group(1))))
        return found


# --- CPU time of the cluster's processes --------------------------------------------------


@dataclass(frozen=True)
class ProcessCpu:
    group: str
    node: str
    seconds: float


def process_group(cmdline: list[str]) -> str:
    """What a process of the cluster's namespace is, by its command line."""
    joined = " ".join(cmdline)
    if cmdline and Path(cmdline[0]).name.startswith("qemu-system"):
        return "qemu"
    if "-m supervisor serve" in joined:
        return "kvm-supervisor"
    for word in cmdline[:2]:  # Ganeti's Python daemons run as ``python3 /usr/sbin/...``
        if word.startswith("/usr/sbin/ganeti-"):
            return Path(word).name
    return "other"


def cpu_time(pid: int) -> float:
    """Seconds `pid` has run: its live threads' on-CPU time to the nanosecond
    (/proc/<pid>/task/*/schedstat; /proc/<pid>/stat counts 10 ms ticks, too coarse for an
    idle daemon), plus the children it reaped (cutime + cstime, in ticks: noded forks for
    every request). Raises OSError when `pid` is gone."""
    nanoseconds = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            nanoseconds += int((task / "schedstat").read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return nanoseconds / 1e9 + (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(cluster: VirtualCluster) -> dict[int, ProcessCpu]:
    """Every process of the cluster's namespace: what it is, its node, its `cpu_time`."""
    found = {}
    for pid in cluster.processes():
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            seconds = cpu_time(pid)
        except OSError:  # gone meanwhile
            continue
        node = next(
            (
                item.split(b"=", 1)[1].decode()
                for item in environ
                if item.startswith(b"GANETI_HOSTNAME=")
            ),
            "-",
        )
        cmdline = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
        found[pid] = ProcessCpu(process_group(cmdline), node, seconds)
    return found


def cpu_used(before: dict[int, ProcessCpu], after: dict[int, ProcessCpu]) -> dict[str, float]:
    """CPU seconds per process group between two snapshots (a process that appeared in
    between counts whole; one that ended counts in its parent's reaped children)."""
    used: dict[str, float] = {}
    for pid, now in after.items():
        then = before.get(pid)
        delta = now.seconds - (then.seconds if then is not None else 0.0)
        used[now.group] = used.get(now.group, 0.0) + delta
    return used


# --- the benchmark ------------------------------------------------------------------------


class CommandFailed(Exception):
    def __init__(self, argv: Sequence[str], code: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {code}:\n{output}")


@dataclass
class Figures:
    """Per driver: the samples (seconds unless named otherwise)."""

    start_command: list[float] = field(default_factory=list)
    start_ready: list[float] = field(default_factory=list)
    info: list[float] = field(default_factory=list)
    migrate_total: list[float] = field(default_factory=list)
    downtime_guest_ms: list[float] = field(default_factory=list)
    downtime_qemu_ms: list[float] = field(default_factory=list)
    migrate_failure: str | None = None
    guest_crashes: int = 0
    idle_cpu: dict[str, float] = field(default_factory=dict)
    idle_seconds: float = 0.0
    idle_by_node: dict[str, float] = field(default_factory=dict)
    list_latency: list[float] = field(default_factory=list)
    list_cpu: dict[str, float] = field(default_factory=dict)
    boot_all_seconds: float = 0.0
    #: The driver alone, per query ("all", "one"): seconds per call of "wall", "cpu" (the
    #: calling process), "daemon_cpu" and "qemu_cpu" (beyond their idle use).
    driver_calls: dict[str, dict[str, float]] = field(default_factory=dict)


class GanetiBench:
    def __init__(self, cluster: VirtualCluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args
        self.figures: dict[Driver, Figures] = {"ours": Figures(), "stock": Figures()}
        self.driver: Driver = "ours"  # the cluster comes up with the driver installed
        self.primary = {BENCH_GUEST: NODES[0]}

    async def gnt(self, *argv: str, check: bool = True) -> tuple[int, str]:
        """A command on the master (node1), as `VirtualCluster.run` runs it: its exit
        status and output (stdout and stderr)."""
        proc = await asyncio.create_subprocess_exec(
            *self.cluster.inside(argv),
            env=self.cluster.ganeti_env(NODES[0]),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        code = proc.returncode
        assert code is not None
        output = out.decode(errors="replace")
        if check and code != 0:
            raise CommandFailed(argv, code, output)
        return code, output

    async def stop(self, *names: str) -> None:
        """``gnt-instance stop`` not timed: a kill at once (``--timeout=0``), both ways."""
        await self.gnt("gnt-instance", "stop", "--timeout=0", "--force-multiple", *names)

    async def timed(self, *argv: str) -> float:
        began = time.perf_counter()
        await self.gnt(*argv)
        return time.perf_counter() - began

    def serial_socket(self, node: str, name: str) -> Path:
        """Where the current driver's QEMU for `name` on `node` has its serial console."""
        if self.driver == "ours":
            return StateDir(self.cluster.state_dir(node)).instance(name).serial_socket
        ctrl = self.cluster.root(node) / "var" / "run" / "ganeti" / "kvm-hypervisor" / "ctrl"
        return ctrl / f"{name}.serial"

    # -- set-up and switching --------------------------------------------------------

    async def prepare(self) -> None:
        await self.gnt("gnt-cluster", "modify", "-H", f"kvm:kvm_path={QEMU}")
        adds = [(BENCH_GUEST, NODES[0], GUEST_MIB)]
        adds += [(name, NODES[i % 2], IDLE_GUEST_MIB) for i, name in enumerate(IDLE_GUESTS)]
        await asyncio.gather(*(self.gnt(*add_argv(*add)) for add in adds))

    async def switch(self, driver: Driver) -> None:
        if driver == self.driver:
            return
        began = time.monotonic()
        change = (
            self.cluster.install_drivers if driver == "ours" else self.cluster.uninstall_drivers
        )
        await asyncio.to_thread(change)
        await asyncio.to_thread(self.cluster.restart_ganeti)
        self.driver = driver
        log(f"switched to {driver}'s driver in {time.monotonic() - began:.1f} s")

    # -- 1. start ----------------------------------------------------------------------

    async def start_round(self) -> tuple[float, float]:
        """``gnt-instance start`` of b0: (command returned, running: returned and ready)."""
        serial = SerialPort(self.serial_socket(self.primary[BENCH_GUEST], BENCH_GUEST))
        async with asyncio.TaskGroup() as group:
            began = time.perf_counter()
            reader = group.create_task(serial.read(BOOT_TIMEOUT_S))
            await self.gnt("gnt-instance", "start", BENCH_GUEST)
            returned = time.perf_counter() - began
            ready_at, _ = await serial.wait_for(READY, BOOT_TIMEOUT_S)
            reader.cancel()
        return returned, max(returned, ready_at - began)

    async def starts(self, rounds: int) -> None:
        figures = self.figures[self.driver]
        for index in range(rounds + 1):
            returned, running = await self.start_round()
            if index > 0:  # the first is a warm-up
                figures.start_command.append(returned)
                figures.start_ready.append(running)
            if index < rounds:
                await self.stop(BENCH_GUEST)
        log(
            f"{self.driver}: start -> running (s): "
            f"{', '.join(f'{x:.2f}' for x in figures.start_ready)}"
        )

    # -- 3. info -------------------------------------------------------------------------

    async def infos(self, calls: int) -> None:
        figures = self.figures[self.driver]
        for _ in range(calls):
            figures.info.append(await self.timed("gnt-instance", "info", BENCH_GUEST))

    # -- 2. migration --------------------------------------------------------------------

    async def migrate_round(self, figures: Figures) -> bool:
        """One live migration of b0 to the other node, its figures into `figures`;
        whether Ganeti completed it."""
        source = self.primary[BENCH_GUEST]
        target = other_node(source)
        before = SerialPort(self.serial_socket(source, BENCH_GUEST))
        after = SerialPort(self.serial_socket(target, BENCH_GUEST))
        events = None
        if self.driver == "ours":
            events = await Client.connect(self.cluster.socket(source))
        try:
            if events is not None:
                params = {"instances": [BENCH_GUEST], "kinds": ["migration."]}
                await events.call("events.subscribe", params)
            async with asyncio.TaskGroup() as group:
                reading = group.create_task(before.read(TICK_TIMEOUT_S))
                # A heartbeat: the guest's shell reads its console by then.
                await before.wait_for(HEARTBEAT, BOOT_TIMEOUT_S)
                await before.type(TICKER)
                await before.wait_for(TICK, TICK_TIMEOUT_S)
                waiting = group.create_task(after.read(COMMAND_TIMEOUT_S))
                began = time.perf_counter()
                code, output = await self.gnt(
                    "gnt-instance", "migrate", "-f", BENCH_GUEST, check=False
                )
                total = time.perf_counter() - began
                if code != 0:
                    await before.type(STOP_TICKER)
                else:
                    resumed = await self.resumed(after)
                    if resumed:
                        await after.type(STOP_TICKER)
                waiting.cancel()
                reading.cancel()
        finally:
            if events is not None:
                await events.close()
        if code != 0:
            figures.migrate_failure = self.failure_cause(output, source, target)
            log(f"{self.driver}: the migration failed: {figures.migrate_failure}")
            return False
        self.primary[BENCH_GUEST] = target
        figures.migrate_total.append(total)
        if events is not None:
            completed = [
                n.params["data"]
                for n in events.notifications
                if n.params.get("kind") == "migration.progress"
                and n.params.get("data", {}).get("status") == "completed"
            ]
            if completed and completed[-1].get("downtime_ms") is not None:
                figures.downtime_qemu_ms.append(float(completed[-1]["downtime_ms"]))
        if not resumed:
            figures.guest_crashes += 1
            last = after.lines[-1][1][:120] if after.lines else b"nothing"
            log(f"{self.driver}: the guest crashed on {target} after the migration: {last!r}")
            # A fresh guest for the next round (a panicked one ignores ACPI).
            await self.stop(BENCH_GUEST)
            await self.gnt("gnt-instance", "start", BENCH_GUEST)
            return True
        (left, left_uptime), (arrived, arrived_uptime) = before.ticks()[-1], after.ticks()[0]
        figures.downtime_guest_ms.append(ms((arrived - left) - (arrived_uptime - left_uptime)))
        return True

    async def resumed(self, port: SerialPort) -> bool:
        """Whether the guest's ticker goes on after the migration (False: its kernel
        crashed, or nothing came out)."""
        try:
            _, match = await port.wait_for(TICK_OR_CRASH, TICK_TIMEOUT_S)
        except TimeoutError:
            return False
        return match.group(1) is not None

    def failure_cause(self, output: str, source: str, target: str) -> str:
        """Ganeti's error, and whether the target's QEMU got the source node's paths
        (the target node's noded logs the command it ran)."""
        reason = next(
            (
                line.strip()
                for line in reversed(output.splitlines())
                if "Could not" in line or "Failed" in line
            ),
            output.strip().splitlines()[-1] if output.strip() else "no output",
        )
        noded_log = self.cluster.root(target) / "var" / "log" / "ganeti" / "node-daemon.log"
        try:
            runs = [
                line
                for line in noded_log.read_text(errors="replace").splitlines()
                if "RunCmd" in line and "-incoming" in line
            ]
        except OSError:
            runs = []
        if runs and f"-pidfile {self.cluster.root(source)}/" in runs[-1]:
            reason += (
                f" -- the QEMU started on {target} has {source}'s argv: its -pidfile (and "
                f"sockets) are {source}'s, and the pid file is held by the running source"
            )
        return reason

    async def migrations(self, count: int) -> None:
        figures = self.figures[self.driver]
        for _ in range(count):
            if not await self.migrate_round(figures):
                break
        if figures.migrate_total:
            log(
                f"{self.driver}: migrate total (s) "
                f"{', '.join(f'{x:.2f}' for x in figures.migrate_total)}; guest-side downtime "
                f"(ms) {', '.join(f'{x:.0f}' for x in figures.downtime_guest_ms)}; QEMU's "
                f"(ms) {', '.join(f'{x:.0f}' for x in figures.downtime_qemu_ms)}"
            )
        if self.primary[BENCH_GUEST] != NODES[0]:
            # Back home, for the next visit's starts (not counted).
            await self.migrate_round(Figures())

    # -- 4. ten idle guests ------------------------------------------------------------

    async def idle(self, window_s: float, list_calls: int) -> None:
        figures = self.figures[self.driver]
        began = time.perf_counter()
        ports = [
            SerialPort(self.serial_socket(NODES[i % 2], name)) for i, name in enumerate(IDLE_GUESTS)
        ]
        async with asyncio.TaskGroup() as group:
            readers = [group.create_task(port.read(BOOT_TIMEOUT_S)) for port in ports]
            await self.gnt("gnt-instance", "start", "--force-multiple", *IDLE_GUESTS)
            # Booted: a heartbeat (one a second) once the guest's init runs.
            try:
                await asyncio.gather(*(port.wait_for(HEARTBEAT, BOOT_TIMEOUT_S) for port in ports))
            except TimeoutError:
                silent = {
                    name: port.lines[-1][1][:160] if port.lines else b"no output"
                    for name, port in zip(IDLE_GUESTS, ports, strict=True)
                    if not any(HEARTBEAT.match(line) for _, line in port.lines)
                }
                raise TimeoutError(f"guests not booted: {silent}") from None
            for reader in readers:
                reader.cancel()
        figures.boot_all_seconds = time.perf_counter() - began
        log(
            f"{self.driver}: ten guests booted in {figures.boot_all_seconds:.1f} s; idle "
            f"{window_s:g} s (load average {os.getloadavg()[0]:.1f})"
        )
        before = cpu_snapshot(self.cluster)
        started = time.perf_counter()
        await asyncio.sleep(window_s)
        after = cpu_snapshot(self.cluster)
        figures.idle_seconds = time.perf_counter() - started
        figures.idle_cpu = cpu_used(before, after)
        for pid, now in after.items():
            if now.group in NODE_DAEMONS[self.driver] and pid in before:
                key = f"{now.group}@{now.node}"
                figures.idle_by_node[key] = now.seconds - before[pid].seconds
        before, listing = cpu_snapshot(self.cluster), time.perf_counter()
        for _ in range(list_calls):
            figures.list_latency.append(
                await self.timed(
                    "gnt-instance",
                    "list",
                    "--no-headers",
                    "-o",
                    "name,status,oper_ram,oper_vcpus",
                    *IDLE_GUESTS,
                )
            )
        used = cpu_used(before, cpu_snapshot(self.cluster))
        # The guests' QEMUs: only what they used beyond their rate in the idle window
        # (stock's driver opens a QMP connection to each, for each list).
        idle_rate = figures.idle_cpu.get("qemu", 0.0) / figures.idle_seconds
        used["qemu"] = max(0.0, used.get("qemu", 0.0) - idle_rate * (time.perf_counter() - listing))
        figures.list_cpu = {group: seconds / list_calls for group, seconds in used.items()}
        for query in ("all", "one"):
            figures.driver_calls[query] = await self.driver_call(query, IDLE_GUESTS[0])
        await self.stop(*IDLE_GUESTS)

    async def driver_call(self, query: str, name: str) -> dict[str, float]:
        """`DRIVER_PROBE` on `name`'s node (node1, with its five guests): the hypervisor
        query alone, without Ganeti's RPC. Also the CPU it costs the node's other
        processes, per call: ours' daemon, and the QEMUs (stock's driver opens a QMP
        connection per instance and query), less what they use idle (measured just
        before, as long as the probe runs)."""
        node = NODES[0]
        env = self.cluster.ganeti_env(node)
        if self.driver == "ours":  # as Ganeti's daemons get it from etc/default/ganeti
            env["PYTHONUSERBASE"] = str(user_base(str(self.cluster.root(node))))
        snapshot = cpu_snapshot(self.cluster)
        watched = {
            pid: process.group
            for pid, process in snapshot.items()
            if process.node == node and process.group in ("qemu", "kvm-supervisor")
        }

        def used() -> dict[str, float]:
            totals = {"qemu": 0.0, "kvm-supervisor": 0.0}
            for pid, group in watched.items():
                with contextlib.suppress(OSError):
                    totals[group] += cpu_time(pid)
            return totals

        argv = [GANETI_PYTHON, "-c", DRIVER_PROBE, query, str(self.args.driver_calls), name]
        began, before = time.perf_counter(), used()
        proc = await asyncio.create_subprocess_exec(
            *self.cluster.inside(argv),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        probe_s, during = time.perf_counter() - began, used()
        await asyncio.sleep(probe_s)
        idle = used()
        if proc.returncode != 0:
            raise RuntimeError(f"the driver probe failed: {err.decode(errors='replace')}")
        found = json.loads(out)
        expected = "supervisor.ganeti.hypervisor" if self.driver == "ours" else "ganeti.hypervisor"
        if not found["driver"].startswith(expected):
            raise RuntimeError(f"the probe ran {found['driver']}, not {self.driver}'s driver")
        calls = self.args.driver_calls + 1  # and its call not timed
        for group, key in (("kvm-supervisor", "daemon_cpu"), ("qemu", "qemu_cpu")):
            extra = (during[group] - before[group]) - (idle[group] - during[group])
            found[key] = max(0.0, extra) / calls
        log(
            f"{self.driver}: {QUERY_NAMES[query]} from the driver alone: "
            f"{found['wall'] * 1000:.2f} ms, CPU {found['cpu'] * 1000:.2f} ms + daemon "
            f"{found['daemon_cpu'] * 1000:.2f} ms + QEMU {found['qemu_cpu'] * 1000:.2f} ms "
            f"per call ({found['found']} found)"
        )
        return {key: float(found[key]) for key in ("cpu", "wall", "daemon_cpu", "qemu_cpu")}

    # -- the whole ---------------------------------------------------------------------

    async def run(self) -> None:
        args = self.args
        await self.prepare()
        visits = {driver: VISITS.count(driver) for driver in ("ours", "stock")}
        done: dict[Driver, int] = {"ours": 0, "stock": 0}
        for driver in VISITS:
            await self.switch(driver)
            done[driver] += 1
            share = 1 / visits[driver]
            first, last = done[driver] == 1, done[driver] == visits[driver]
            log(
                f"visit {driver} {done[driver]}/{visits[driver]} "
                f"(load average {os.getloadavg()[0]:.1f})"
            )
            await self.starts(max(1, round(args.rounds * share)))
            await self.infos(max(1, round(args.info_calls * share)))
            if first:
                await self.migrations(args.migrations)
            await self.stop(BENCH_GUEST)
            if last:
                await self.idle(args.idle_seconds, LIST_CALLS)


# --- the report ---------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def median_text(values: list[float], unit: str) -> str:
    if not values:
        return "none"
    return f"{median(values):.{0 if unit == 'ms' else 2}f} {unit}"


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "none"
    scaled = [value * scale for value in values]
    return (
        f"median {median(scaled):.{digits}f}, p90 {percentile(scaled, 90):.{digits}f}, "
        f"min {min(scaled):.{digits}f}, max {max(scaled):.{digits}f} ({len(scaled)})"
    )


def node_daemons_cpu(figures: Figures, driver: Driver) -> float:
    return sum(figures.idle_cpu.get(group, 0.0) for group in NODE_DAEMONS[driver])


def list_node_cpu(figures: Figures, driver: Driver) -> float:
    """A list's CPU on the nodes: the node daemons', and the QEMUs' beyond idle."""
    counted = (*NODE_DAEMONS[driver], "qemu")
    return sum(figures.list_cpu.get(group, 0.0) for group in counted)


def compare(
    metric: str, ours: float, stock: float, unit: str, scale: float = 1.0, digits: int | None = None
) -> Row:
    if digits is None:
        digits = 0 if unit == "ms" else 2
    return Row(
        metric,
        f"{ours * scale:.{digits}f} {unit}",
        f"{stock * scale:.{digits}f} {unit} stock",
        stock / ours if ours > 0 and stock > 0 else None,
        "<= stock",
        ours <= stock,
    )


def node_side_cpu(call: dict[str, float]) -> float:
    """What one driver call costs the node: the caller, the daemon, the QEMUs."""
    return call["cpu"] + call["daemon_cpu"] + call["qemu_cpu"]


def build_rows(ours: Figures, stock: Figures) -> list[Row]:
    rows = [
        compare(
            "gnt-instance start -> guest ready (median)",
            median(ours.start_ready),
            median(stock.start_ready),
            "s",
        ),
        compare(
            "(info) gnt-instance start, the command alone",
            median(ours.start_command),
            median(stock.start_command),
            "s",
        ),
    ]
    migration = (
        ("gnt-instance migrate (live), total", ours.migrate_total, stock.migrate_total, "s"),
        ("migration downtime, guest-side", ours.downtime_guest_ms, stock.downtime_guest_ms, "ms"),
    )
    for metric, ours_values, stock_values, unit in migration:
        if ours_values and stock_values:
            rows.append(compare(metric, median(ours_values), median(stock_values), unit))
            continue
        if stock_values:
            anchor = f"{median_text(stock_values, unit)} stock"
        elif stock.migrate_failure is not None:
            anchor = "stock: fails in a virtual cluster"
        else:
            anchor = "stock: none"
        rows.append(Row(metric, median_text(ours_values, unit), anchor, None, "-", None))
    if ours.downtime_qemu_ms:
        rows.append(
            Row(
                "(info) migration downtime, QEMU's (MigrationStatus)",
                f"{median(ours.downtime_qemu_ms):.0f} ms",
                "-",
                None,
                "-",
                None,
            )
        )
    rows.append(
        compare("gnt-instance info latency (median)", median(ours.info), median(stock.info), "s")
    )
    ours_cpu = node_daemons_cpu(ours, "ours") / ours.idle_seconds
    stock_cpu = node_daemons_cpu(stock, "stock") / stock.idle_seconds
    rows.append(
        Row(
            f"node daemons' CPU, idle, {len(IDLE_GUESTS)} guests",
            f"{ours_cpu * 100:.3f} % of a core",
            f"{stock_cpu * 100:.3f} % stock",
            stock_cpu / ours_cpu if ours_cpu > 0 and stock_cpu > 0 else None,
            "<= stock",
            ours_cpu <= stock_cpu,
        )
    )
    rows.append(
        compare(
            f"gnt-instance list, {len(IDLE_GUESTS)} guests, live fields (median)",
            median(ours.list_latency),
            median(stock.list_latency),
            "s",
        )
    )
    rows.append(
        compare(
            "(info) CPU on the nodes per gnt-instance list",
            list_node_cpu(ours, "ours"),
            list_node_cpu(stock, "stock"),
            "ms",
            1000,
        )
    )
    per_node = len(IDLE_GUESTS) // len(NODES)
    queries = (("all", f"{QUERY_NAMES['all']}, {per_node} guests"), ("one", QUERY_NAMES["one"]))
    for query, label in queries:
        mine, theirs = ours.driver_calls.get(query), stock.driver_calls.get(query)
        if not mine or not theirs:
            continue
        rows.append(
            compare(f"(driver alone) {label}, wall", mine["wall"], theirs["wall"], "ms", 1000, 2)
        )
        rows.append(
            compare(
                f"(driver alone) {label}, CPU on the node",
                node_side_cpu(mine),
                node_side_cpu(theirs),
                "ms",
                1000,
                2,
            )
        )
    return rows


def format_cpu(cpu: dict[str, float], window_s: float) -> str:
    return ", ".join(
        f"{group} {seconds * 1000:.1f} ms ({seconds / window_s * 100:.3f} %)"
        for group, seconds in sorted(cpu.items())
    )


def format_notes(ours: Figures, stock: Figures, elapsed_s: float) -> str:
    lines = [
        f"Ganeti 3.0 virtual cluster, 2 nodes in one namespace; {os.cpu_count()} CPUs; load "
        f"average {os.getloadavg()[0]:.1f} at the end (other work on the machine skews every "
        f"figure); the whole run {elapsed_s:.0f} s; ratios are stock / ours (above 1: ours "
        "is better)",
    ]
    for driver, figures in (("ours", ours), ("stock", stock)):
        lines += [
            f"{driver}: start -> guest ready (s): {spread(figures.start_ready)}; the command "
            f"alone: {spread(figures.start_command)}",
            f"{driver}: gnt-instance info (s): {spread(figures.info)}",
        ]
        if figures.migrate_failure is not None:
            lines.append(f"{driver}: gnt-instance migrate failed: {figures.migrate_failure}")
        if figures.migrate_total:
            lines.append(
                f"{driver}: {figures.guest_crashes} of {len(figures.migrate_total)} migrated "
                "guests crashed on the target (kernel panic: QEMU 7.2's TCG migration, seen "
                "with bare QEMU too; no guest-side downtime for those)"
            )
            lines.append(
                f"{driver}: gnt-instance migrate (s): {spread(figures.migrate_total)}; downtime "
                f"guest-side (ms): {spread(figures.downtime_guest_ms, digits=0)}; QEMU's (ms): "
                f"{spread(figures.downtime_qemu_ms, digits=0)}"
            )
        counted = " + ".join(NODE_DAEMONS[driver])
        lines += [
            f"{driver}: {len(IDLE_GUESTS)} guests booted in {figures.boot_all_seconds:.1f} s; "
            f"idle {figures.idle_seconds:.1f} s, CPU by process: "
            f"{format_cpu(figures.idle_cpu, figures.idle_seconds)}",
            f"{driver}: node daemons counted: {counted}; per daemon and node: "
            + ", ".join(
                f"{key} {seconds * 1000:.1f} ms"
                for key, seconds in sorted(figures.idle_by_node.items())
            ),
            f"{driver}: gnt-instance list (s): {spread(figures.list_latency)}; CPU per list "
            "(QEMU's beyond idle): "
            + ", ".join(
                f"{group} {seconds * 1000:.1f} ms"
                for group, seconds in sorted(figures.list_cpu.items())
            ),
        ]
    lines.append(
        f"driver alone: {DRIVER_PROBE_TEXT}; its CPU on the node is the calling process's "
        "plus what the daemon (ours) and the node's QEMUs used beyond their idle use "
        "(measured right after, as long): "
        + "; ".join(
            f"{driver} {QUERY_NAMES[query]} {call['cpu'] * 1000:.2f} + "
            f"{call['daemon_cpu'] * 1000:.2f} + {call['qemu_cpu'] * 1000:.2f} ms"
            for driver, figures in (("ours", ours), ("stock", stock))
            for query, call in figures.driver_calls.items()
        )
    )
    lines.append(
        "stock's figures leave the kvm-supervisor daemons out: they run (the switch back "
        "needs them) but serve nothing then"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument(
        "--rounds",
        type=int,
        default=START_ROUNDS,
        metavar="N",
        help=f"timed starts per driver (default {START_ROUNDS})",
    )
    parser.add_argument(
        "--info-calls",
        type=int,
        default=INFO_CALLS,
        metavar="N",
        help=f"gnt-instance info calls per driver (default {INFO_CALLS})",
    )
    parser.add_argument(
        "--migrations",
        type=int,
        default=MIGRATIONS,
        metavar="N",
        help=f"live migrations per driver (default {MIGRATIONS})",
    )
    parser.add_argument(
        "--driver-calls",
        type=int,
        default=DRIVER_CALLS,
        metavar="N",
        help=f"calls of each query timed on the driver alone (default {DRIVER_CALLS})",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=IDLE_SECONDS,
        metavar="S",
        help=f"the idle CPU window (default {IDLE_SECONDS:g})",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        log("needs root (namespaces, Ganeti's daemons)")
        return 1
    missing = missing_requirements()
    if missing is not None:
        log(missing)
        return 1
    began = time.monotonic()
    try:
        with virtual_cluster() as cluster:
            log(f"virtual Ganeti cluster up in {cluster.setup_seconds:.1f} s, in {cluster.base}")
            bench = GanetiBench(cluster, args)
            try:
                asyncio.run(bench.run())
            except Exception:
                log(f"cluster files kept until the clean-up below: {cluster.base}")
                raise
    except KeyboardInterrupt:
        log("interrupted (cleaned up)")
        return 130
    elapsed = time.monotonic() - began
    ours, stock = bench.figures["ours"], bench.figures["stock"]
    print(format_notes(ours, stock, elapsed))
    print(format_table(build_rows(ours, stock)))
    if args.json:
        print(msgspec.json.encode(bench.figures).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
