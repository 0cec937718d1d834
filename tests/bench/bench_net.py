"""Benchmark of NIC networking (issue 8 §5): set-up and teardown, starts with NICs, 50 guests.

Run (as root): ``.venv/bin/python tests/bench/bench_net.py [--json] [--guests N]
[--parts cycles,start,guests]``.
Asserts nothing: prints the figures, their anchors (measured in the same run), the ratios
and whether each target is met (exit status 0 either way).

Everything happens in a network namespace this script creates (``kvs-bench-<hex>``: ``lo``
up, bridge ``br0`` at 10.78.0.1/16, the namespace's host side) and always deletes; the
host's own namespace is not touched. In one run it measures:

1. Set-up + teardown of one NIC, bridged (a port of ``br0``) and routed (a host route,
   proxy ARP and forwarding), with the project's code as the engine runs it
   (``with_tap_names``, ``check_host``, ``open_taps``, ``set_up``, ``close_taps`` --
   QEMU's exit, in the engine -- and ``tear_down``), against the original way: the tap
   opened the same way (``TUNSETIFF``, as Ganeti's Python opened it), then Ganeti 3.1's
   ``kvm-ifup`` run with bash (`SCRIPTS`: the bridged path sets the tap's MAC, MTU,
   bridge and up with five ``ip`` commands; the routed one brings it up, routes the ip
   and writes the sysctls); at a NIC's end Ganeti runs nothing. Both run in a process
   started with ``ip netns exec`` (this script with ``--inside cycles``), in interleaved
   rounds, on asyncio and on trio. The tap's deletion, when its last fd closes (QEMU's
   exit), is the kernel's and the same both ways; it is timed apart and left out of
   both (it waits out RCU grace periods: 15-25 ms here, depending on when it comes).
   Measured alongside: the kernel's share of the set-up (`KernelFloor`: the same system
   calls from a bare loop, the requests encoded beforehand) and, our way, the 4 NICs of
   one instance (the networking part of 2.). Target: the script's median >= 10x ours,
   both beyond the kernel's share of the set-up (`beyond_kernel`); with it, both are
   printed too.
2. ``instance.start`` (returns when the guest runs) of a guest with 4 bridged NICs vs one
   with none, in pairs, against ``kvm-supervisor serve`` running in the namespace; the
   anchor is the same pair of argvs run bare with ``qemu-system-x86_64 -daemonize``
   (the taps replaced by QEMU-internal hub ports), i.e. what QEMU itself spends on four
   more virtio-net devices. Target: the median paired difference <= +10 ms.
3. 50 guests with 2 NICs each on ``br0``, started under that daemon in batches of 10
   (each batch concurrently), every guest pinged from the namespace's host side at the
   address its kernel argument ``kvs_ip=`` gives eth0 (tests/guest/init); the daemon's
   RSS before and with the 50 running, the start time per guest (RPC, and until it
   answers pings), the wall time of the whole, then all stopped and the namespace
   checked for leftover taps and bridge ports.

Everything is cleaned up at the end, on error and on Ctrl-C too: the guests stopped with
force, the daemon sent SIGTERM, QEMUs left over killed by pid (only those whose command
line names this run's temp dir), the namespace deleted, the temp dir removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
from bench_supervisor import (
    GUEST_DIR,
    KERNEL_ARGS,
    READY_MARKER,
    REPO,
    Bench,
    Daemon,
    _read_bytes,
    kill_leftovers,
    ms,
    percentile,
    rss_mib,
)
from benchtable import Row, format_table

from protocols.netlink import HEADER, route
from supervisor.net import nics
from supervisor.qemu.cmdline import NicPlan

BRIDGE = "br0"
HOST_CIDR = "10.78.0.1/16"
#: The least that boots the test guest with two virtio NICs is 72 MiB (64 panics, out of
#: memory, during boot); a few MiB more keep it answering under load.
GUEST_MIB = 80

CYCLE_ROUNDS = 40
CYCLES_PER_ROUND = 5  # ours per round; one script and one kernel-share run per round
CYCLE_WARMUP = 3
CYCLE_TARGET_FACTOR = 10.0
ROUTED_IP = "10.79.0.5"
#: Tap names are the daemon's own: named after its state dir.
STATE_DIR = "/var/lib/kvm-supervisor"
CYCLE_UUID = "3b0f6c7e-2a55-4d1c-8f0e-6a2d9c41b7e3"

START_PAIRS = 121
START_NICS = 4
START_TARGET_EXTRA_MS = 10.0

GUESTS = 50
GUEST_NICS = 2
BATCH = 10
#: Generous: a boot takes ~3 s of CPU under TCG, and the guests share 2 cores.
READY_TIMEOUT_S = 300.0
PING_ATTEMPTS = 5
PING_CONCURRENCY = 10
GUESTS_TIMEOUT_S = 900.0


def log(message: str) -> None:
    print(f"bench_net: {message}", file=sys.stderr, flush=True)


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def ns_links(netns: str | None = None) -> list[str]:
    """The interfaces of `netns` (of this process's namespace when None)."""
    where = () if netns is None else ("-n", netns)
    listing = ip(*where, "-o", "link")
    return sorted(line.split(":")[1].strip().split("@")[0] for line in listing.splitlines())


# --- 1. NIC set-up + teardown: ours vs a script (runs inside the namespace) ---------------

#: The original way: Ganeti 3.1's ``kvm-ifup``, run per NIC once QEMU holds the tap (which
#: Ganeti's Python opened, as ours does), and the functions of its ``net-common`` it
#: calls for bridged and routed NICs: the same commands in the same order, written anew
#: here. At a NIC's end Ganeti runs nothing: the tap dies with QEMU, its bridge port and
#: route with it.
SCRIPTS = {
    "net-common": """
function check {
  if [ -z "$INTERFACE" ]; then echo "no INTERFACE"; exit 1; fi
  if [ -z "$MODE" ]; then echo "no MODE"; exit 1; fi
}

function is_instance_communication_tap {
  COMMUNICATION=$(echo "$INTERFACE" | cut -d "." -f 1-2)
  [ "$MODE" = "routed" -a "$COMMUNICATION" = "gnt.com" ]
}

function fix_mac {
  FIXED_MAC=$(ip link show $INTERFACE | \\
    awk '{if ($1 == "link/ether") printf("fe%s",substr($2,3,15))}')
  ip link set $INTERFACE address $FIXED_MAC || true
}

function setup_bridge {
  if [ "$MODE" = "bridged" ]; then
    fix_mac
    ip link set $INTERFACE up
    ip link set $INTERFACE mtu $(</sys/class/net/${LINK}/mtu)
    ip link set $INTERFACE master $LINK
  fi
}

function setup_ovs {
  if [ "$MODE" = "openvswitch" ]; then
    echo "no Open vSwitch NICs in this benchmark"; exit 1
  fi
}

function setup_route {
  if [ "$MODE" = "routed" ]; then
    ip link set $INTERFACE up
    ip route replace $IP proto static dev $INTERFACE
    if [ -d "/proc/sys/net/ipv4/conf/$INTERFACE" ]; then
      echo 1 > /proc/sys/net/ipv4/conf/$INTERFACE/proxy_arp
      echo 1 > /proc/sys/net/ipv4/conf/$INTERFACE/forwarding
    fi
    if [ -d "/proc/sys/net/ipv6/conf/$INTERFACE" ]; then
      echo 1 > /proc/sys/net/ipv6/conf/$INTERFACE/proxy_ndp
      echo 1 > /proc/sys/net/ipv6/conf/$INTERFACE/forwarding
    fi
  fi
}
""",
    "kvm-ifup": """
source "$CONF_DIR/net-common"
check
if is_instance_communication_tap && [ -x "$CONF_DIR/kvm-ifup-os" ]; then
  . "$CONF_DIR/kvm-ifup-os"
fi
if [ -x "$CONF_DIR/kvm-vif-bridge" ]; then
  exec "$CONF_DIR/kvm-vif-bridge"
fi
if ! is_instance_communication_tap; then
  setup_bridge
  setup_ovs
  setup_route
fi
""",
}


def cycle_plan(mode: str, index: int = 0) -> NicPlan:
    return NicPlan(
        index=index,
        mac=f"52:54:00:78:00:{index + 1:02x}",
        mode=mode,  # type: ignore[arg-type]
        link=BRIDGE if mode == "bridged" else None,
        ip=ROUTED_IP if mode == "routed" else None,
        netdev_id=f"net{index}",
        device_id=f"nic{index}",
        model="virtio-net-pci",
        fd_names=(f"tap{index}",),
        vnet_hdr=True,
        queues=1,
        vhost=False,
    )


#: One cycle's parts in seconds: "up", the set-up (the tap's creation included: everything
#: before QEMU would run the guest); "close", the tap's last fd closed (QEMU's exit: the
#: kernel deletes the tap, the same way whoever set it up); "teardown", what runs after.
Cycle = dict[str, float]


async def ours_cycle(network: nics.Networking, instance_plans: list[NicPlan]) -> Cycle:
    """The NICs of one instance set up and torn down the engine's way."""
    started = time.perf_counter()
    plans = nics.with_tap_names(instance_plans, CYCLE_UUID, state_dir=STATE_DIR)
    bridges = await network.check_host(plans)
    taps = nics.open_taps(plans)
    try:
        await network.set_up(plans, instance="bench", bridges=bridges)
    finally:
        set_up = time.perf_counter()
        nics.close_taps(taps)  # in the engine, QEMU's exit: the kernel deletes the tap
    closed = time.perf_counter()
    await network.tear_down(plans, instance="bench")
    done = time.perf_counter()
    return {"up": set_up - started, "close": closed - set_up, "teardown": done - closed}


#: ``TUNSETIFF`` and the flags Ganeti's ``OpenTap`` and ours set (IFF_TAP | IFF_NO_PI |
#: IFF_VNET_HDR).
TUNSETIFF = 0x400454CA
TAP_FLAGS = 0x0002 | 0x1000 | 0x4000


def create_tap(name: bytes) -> int:
    """A tap opened as Ganeti's ``OpenTap`` opens one: its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name, TAP_FLAGS))
    return fd


def cycle_tap(mode: str) -> str:
    """The tap name of the cycles' NIC."""
    return nics.with_tap_names([cycle_plan(mode)], CYCLE_UUID, state_dir=STATE_DIR)[0].tap or ""


def script_cycle(scripts: Path, mode: str) -> Cycle:
    """The same NIC set up the original way: the tap opened, then ``kvm-ifup`` run with
    the environment Ganeti gives it."""
    plan = cycle_plan(mode)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CONF_DIR": str(scripts),
        "INSTANCE": "bench",
        "MAC": plan.mac,
        "MODE": mode,
        "INTERFACE": cycle_tap(mode),
        "INTERFACE_INDEX": "0",
        "TAGS": "",
        **({"LINK": BRIDGE, "BRIDGE": BRIDGE} if mode == "bridged" else {"IP": ROUTED_IP}),
    }
    started = time.perf_counter()
    fd = create_tap(env["INTERFACE"].encode())
    try:
        done = subprocess.run(
            ["bash", str(scripts / "kvm-ifup")],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
    finally:
        set_up = time.perf_counter()
        os.close(fd)
    closed = time.perf_counter()
    if done.returncode != 0:
        raise RuntimeError(f"kvm-ifup failed for {mode}: {done.stderr.decode().strip()}")
    return {"up": set_up - started, "close": closed - set_up, "teardown": 0.0}


TAP_MAC = "fe:54:00:78:00:01"


class KernelFloor:
    """The kernel's share of one NIC's set-up: the system calls our code makes for it,
    from a bare loop with the requests encoded beforehand; and the tap's deletion.

    Set-up, in our order: bridged: the bridge looked up (``RTM_GETLINK``, the host
    check); the tap created (``open``, ``TUNSETIFF``); bridged: the tap's index
    (``if_nametoindex``) and one ``RTM_NEWLINK`` (MAC, MTU, master, up); routed: the
    index, ``RTM_NEWLINK`` (MAC, up), ``RTM_NEWROUTE`` and the two sysctl writes. Then
    the tap's last fd closed (the kernel unregisters it, and waits out RCU grace
    periods). Each request's ack is read with a blocking ``recv``. What is left above
    the set-up in our figures is our code.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.tap = cycle_tap(mode).encode()
        self.socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.seq = 0
        #: The requests naming the tap, its index patched in at the offset given.
        self.get_bridge = bytearray(route.link_get(name=BRIDGE))
        if mode == "bridged":
            bridge = socket.if_nametoindex(BRIDGE)
            self.link = route.link_request(
                route.RTM_NEWLINK, 0, mtu=1500, master=bridge, up=True, address=TAP_MAC
            )
        else:
            self.link = route.link_request(route.RTM_NEWLINK, 0, up=True, address=TAP_MAC)
            self.route = bytearray(
                route.host_route_request(
                    route.RTM_NEWROUTE,
                    ipaddress.ip_address(ROUTED_IP),
                    254,
                    0,
                    protocol=4,
                    scope=253,
                    route_type=1,
                )
            )
        self.link = bytearray(self.link)
        self.sysctls = [
            f"/proc/sys/net/ipv4/conf/{self.tap.decode()}/{key}"
            for key in ("proxy_arp", "forwarding")
        ]

    def close(self) -> None:
        self.socket.close()

    def request(self, message: bytes | bytearray, flags: int = 0x04) -> None:
        """Send `message` (NLM_F_REQUEST | `flags`) and read its replies up to the ack."""
        self.seq += 1
        struct.pack_into("=HI", message, 6, 0x01 | flags, self.seq)
        self.socket.send(message)
        while True:
            data = self.socket.recv(65536)
            _length, kind, _flags, seq, _pid = HEADER.unpack_from(data)
            if kind == 2 and seq == self.seq:  # NLMSG_ERROR: the ack
                error = struct.unpack_from("=i", data, HEADER.size)[0]
                if error:
                    raise OSError(-error, os.strerror(-error))
                return

    def cycle(self) -> Cycle:
        started = time.perf_counter()
        if self.mode == "bridged":
            self.request(self.get_bridge)  # first, as in ours: the host check
        fd = create_tap(self.tap)
        index = socket.if_nametoindex(self.tap.decode())
        struct.pack_into("=i", self.link, HEADER.size + 4, index)
        if self.mode == "bridged":
            self.request(self.link)
        else:
            self.request(self.link)
            struct.pack_into("=I", self.route, len(self.route) - 4, index)
            self.request(self.route, 0x04 | 0x400 | 0x100)  # ACK, CREATE, REPLACE
            for path in self.sysctls:
                sysctl = os.open(path, os.O_WRONLY)
                os.write(sysctl, b"1\n")
                os.close(sysctl)
        set_up = time.perf_counter()
        os.close(fd)
        return {"up": set_up - started, "close": time.perf_counter() - set_up, "teardown": 0.0}


def add(samples: dict[str, list[float]], way: str, cycle: Cycle) -> None:
    """`cycle`'s parts under "<way> <part>", and under `way` its work: set-up and
    teardown, without the tap's deletion (the kernel's, the same every way)."""
    for part, seconds in cycle.items():
        samples.setdefault(f"{way} {part}", []).append(ms(seconds))
    samples.setdefault(way, []).append(ms(cycle["up"] + cycle["teardown"]))


async def cycles(scripts: Path) -> dict[str, dict[str, list[float]]]:
    """Interleaved rounds of both ways per mode, and of the kernel's share (and, bridged,
    of an instance with `START_NICS` NICs, our way): {mode: {way: [ms], "<way> <part>":
    [ms]}} (`add`)."""
    network = nics.Networking(ovsdb_socket="/nonexistent/db.sock")  # no Open vSwitch NICs
    found: dict[str, dict[str, list[float]]] = {}
    quad = [cycle_plan("bridged", index) for index in range(START_NICS)]
    for mode in ("bridged", "routed"):
        plans = [cycle_plan(mode)]
        floor = KernelFloor(mode)
        try:
            for _ in range(CYCLE_WARMUP):
                await ours_cycle(network, plans)
                script_cycle(scripts, mode)
                floor.cycle()
            samples: dict[str, list[float]] = {}
            for _ in range(CYCLE_ROUNDS):
                add(samples, "script", script_cycle(scripts, mode))
                add(samples, "kernel", floor.cycle())
                for _ in range(CYCLES_PER_ROUND):
                    add(samples, "ours", await ours_cycle(network, plans))
                if mode == "bridged":
                    add(samples, f"ours {len(quad)} NICs", await ours_cycle(network, quad))
        finally:
            floor.close()
        found[mode] = samples
    return found


def inside_cycles() -> int:
    """``--inside cycles``: in the namespace, both backends; JSON on stdout."""
    scripts = Path(tempfile.mkdtemp(prefix="kvsn-scripts-", dir="/tmp"))
    try:
        for name, text in SCRIPTS.items():
            (scripts / name).write_text("#!/bin/bash\n" + text.lstrip("\n"))
        found: dict[str, Any] = {
            backend: anyio.run(cycles, scripts, backend=backend) for backend in ("asyncio", "trio")
        }
    finally:
        shutil.rmtree(scripts, ignore_errors=True)
    routes = ip("route", "show", f"{ROUTED_IP}/32")
    found["left"] = [name for name in ns_links() if name not in ("lo", BRIDGE)]
    found["left"] += [f"route {line}" for line in routes.splitlines()]
    print(json.dumps(found))
    return 0


def measure_cycles(netns: str) -> dict[str, Any]:
    log(
        f"NIC set-up + teardown: {CYCLE_ROUNDS} rounds of {CYCLES_PER_ROUND} ours / 1 script, "
        "per mode, asyncio then trio"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, __file__, "--inside", "cycles"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the cycles in namespace {netns} failed (exit {done.returncode})")
    found: dict[str, Any] = json.loads(done.stdout)
    if found["left"]:
        log(f"left behind in the namespace after the cycles: {found['left']}")
    return found


# --- 2. and 3. against a daemon in the namespace -----------------------------------------


class NetnsDaemon(Daemon):
    """``kvm-supervisor serve`` (and its CLI) inside `netns`: ``ip netns exec`` execs the
    command in place, so the process is the daemon itself (its pid, its RSS)."""

    def __init__(self, workdir: Path, netns: str) -> None:
        super().__init__(workdir)
        self.netns = netns

    def cli(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().cli(*args)]


def cpu_ms(pid: int) -> float:
    """The CPU time of process `pid` so far, all its threads, in ms (schedstat: ns)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e6


def guest_ip(index: int) -> str:
    return f"10.78.{1 + index // 200}.{10 + index % 200}"


def nic_spec(name: str, nics_count: int, *, index: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "memory_mib": GUEST_MIB,
        "nics": [{"link": BRIDGE} for _ in range(nics_count)],
    }
    if index is not None:
        prefix = HOST_CIDR.split("/")[1]
        spec["hvparams"] = {"kernel_args": f"{KERNEL_ARGS} kvs_ip={guest_ip(index)}/{prefix}"}
    return spec


def bare_without_taps(argv: list[str]) -> list[str]:
    """The argv with each tap netdev (its fd is the daemon's) as a QEMU-internal hub port."""
    result = []
    for arg in argv:
        kind, _, options = arg.partition(",")
        if kind == "tap":
            netdev_id = dict(part.partition("=")[::2] for part in options.split(","))["id"]
            result.append(f"hubport,id={netdev_id},hubid=0")
        else:
            result.append(arg)
    return result


class NetBench(Bench):
    """Measurements 2 and 3 against one daemon in the namespace."""

    def __init__(self, daemon: NetnsDaemon) -> None:
        super().__init__(daemon)
        self.netns = daemon.netns

    async def start_ms(self, spec: dict[str, Any]) -> float:
        return (await self.start_timed(spec))[0]

    async def start_timed(self, spec: dict[str, Any]) -> tuple[float, float, float]:
        """One start: its wall time, the daemon's CPU time meanwhile, and QEMU's CPU time
        by the time it runs (ms; CPU time counts the kernel's work in each process's
        system calls, and hardly moves with the machine's load as wall time does)."""
        daemon_before = cpu_ms(self.daemon.pid)
        started = time.perf_counter()
        info = await self.rpc.call("instance.start", {"spec": spec})
        elapsed = time.perf_counter() - started
        daemon = cpu_ms(self.daemon.pid) - daemon_before
        if info["state"] != "running":
            raise RuntimeError(f"instance.start returned state {info['state']}")
        return ms(elapsed), daemon, cpu_ms(info["pid"])

    async def measure_start_with_nics(self) -> None:
        plain = nic_spec("plain", 0)
        networked = nic_spec("nics4", START_NICS)
        log(f"start -> running, {START_NICS} NICs vs none: warming up")
        argvs = {}
        for spec in (plain, networked):
            await self.start_ms(spec)
            argvs[spec["name"]] = bare_without_taps(self.bare_argv(spec["name"]))
            await self.stop(spec["name"])
            await asyncio.to_thread(self.run_bare, argvs[spec["name"]])
        ours: dict[str, list[float]] = {"plain": [], "nics4": []}
        bare: dict[str, list[float]] = {"plain": [], "nics4": []}
        daemon_cpu: dict[str, list[float]] = {"plain": [], "nics4": []}
        qemu_cpu: dict[str, list[float]] = {"plain": [], "nics4": []}
        for i in range(START_PAIRS):
            order = (plain, networked) if i % 2 == 0 else (networked, plain)
            for spec in order:
                wall, daemon, qemu = await self.start_timed(spec)
                ours[spec["name"]].append(wall)
                daemon_cpu[spec["name"]].append(daemon)
                qemu_cpu[spec["name"]].append(qemu)
                await self.stop(spec["name"])
            for spec in order:
                bare[spec["name"]].append(
                    ms(await asyncio.to_thread(self.run_bare, argvs[spec["name"]]))
                )
        for name in ours:
            await self.rpc.call("instance.cleanup", {"name": name})
        for label, figures in (("via RPC", ours), ("bare -daemonize", bare)):
            for name, values in figures.items():
                log(f"start {name} {label} (ms): {', '.join(f'{x:.1f}' for x in values)}")
        self.figures |= {
            "start_plain_ms": ours["plain"],
            "start_nics_ms": ours["nics4"],
            "bare_plain_ms": bare["plain"],
            "bare_nics_ms": bare["nics4"],
            "daemon_cpu_plain_ms": daemon_cpu["plain"],
            "daemon_cpu_nics_ms": daemon_cpu["nics4"],
            "qemu_cpu_plain_ms": qemu_cpu["plain"],
            "qemu_cpu_nics_ms": qemu_cpu["nics4"],
        }

    async def ping(self, address: str) -> bool:
        """Whether `address` answers a ping from the namespace's host side (retried)."""
        for _ in range(PING_ATTEMPTS):
            proc = await asyncio.create_subprocess_exec(
                *("ip", "netns", "exec", self.netns, "ping", "-n", "-q", "-c", "1", "-W", "2"),
                address,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if await proc.wait() == 0:
                return True
        return False

    async def wait_ready(self, name: str) -> None:
        """Until the guest's serial log shows its ready marker (eth0 configured by then)."""
        path = self.instance_dir(name) / "serial.log"
        async with asyncio.timeout(READY_TIMEOUT_S):
            while READY_MARKER not in await asyncio.to_thread(_read_bytes, path):
                await asyncio.sleep(0.2)

    async def start_guest(self, index: int, pings: asyncio.Semaphore) -> dict[str, Any]:
        name = f"n{index:02d}"
        started = time.perf_counter()
        start_ms = await self.start_ms(nic_spec(name, GUEST_NICS, index=index))
        await self.wait_ready(name)
        async with pings:
            reachable = await self.ping(guest_ip(index))
        return {
            "name": name,
            "start_ms": start_ms,
            "reachable_s": time.perf_counter() - started,
            "reachable": reachable,
        }

    def bridge_ports(self) -> list[str]:
        listing = ip("-n", self.netns, "-o", "link", "show", "master", BRIDGE)
        return [line.split(":")[1].strip().split("@")[0] for line in listing.splitlines()]

    async def measure_guests(self, count: int) -> None:
        pings = asyncio.Semaphore(PING_CONCURRENCY)
        self.figures["rss_before_guests_mib"] = rss_mib(self.daemon.pid)
        results: list[dict[str, Any]] = []
        began = time.perf_counter()
        async with asyncio.timeout(GUESTS_TIMEOUT_S):
            for first in range(0, count, BATCH):
                batch = range(first, min(first + BATCH, count))
                results += await asyncio.gather(*(self.start_guest(i, pings) for i in batch))
                log(
                    f"guests {batch.start}..{batch.stop - 1} started and pinged "
                    f"({time.perf_counter() - began:.0f} s so far, load average "
                    f"{os.getloadavg()[0]:.1f})"
                )
        all_started_s = time.perf_counter() - began
        listing = await self.rpc.call("instance.list")
        running = sum(1 for i in listing if i["state"] == "running")
        rss_running = rss_mib(self.daemon.pid)
        ports = len(self.bridge_ports())
        # All at once, now that every guest runs: each still answers.
        swept = time.perf_counter()
        answers = await asyncio.gather(
            *(self._ping_limited(guest_ip(i), pings) for i in range(count))
        )
        sweep_s = time.perf_counter() - swept
        stopping = time.perf_counter()
        await asyncio.gather(*(self.stop(r["name"]) for r in results))
        stop_s = time.perf_counter() - stopping
        left = [name for name in ns_links(self.netns) if name not in ("lo", BRIDGE)]
        ports_after = len(self.bridge_ports())
        for r in results:
            await self.rpc.call("instance.cleanup", {"name": r["name"]})
        log(
            f"{count} guests: {sum(r['reachable'] for r in results)} answered once booted, "
            f"{sum(answers)} in the final sweep; all started in {all_started_s:.0f} s; "
            f"daemon RSS {rss_running:.1f} MiB; stopped in {stop_s:.1f} s, "
            f"left behind: {left or 'nothing'}"
        )
        self.figures |= {
            "guests": count,
            "guests_running": running,
            "guests_start_ms": [r["start_ms"] for r in results],
            "guests_reachable_s": [r["reachable_s"] for r in results],
            "guests_reachable_once_booted": sum(r["reachable"] for r in results),
            "guests_reachable_in_sweep": sum(answers),
            "guests_sweep_s": sweep_s,
            "guests_all_started_s": all_started_s,
            "guests_bridge_ports": ports,
            "guests_stop_s": stop_s,
            "guests_left_links": left,
            "guests_left_ports": ports_after,
            "rss_guests_running_mib": rss_running,
        }

    async def _ping_limited(self, address: str, pings: asyncio.Semaphore) -> bool:
        async with pings:
            return await self.ping(address)


async def run_daemon_parts(daemon: NetnsDaemon, guests: int, parts: set[str]) -> dict[str, Any]:
    daemon.spawn()
    await daemon.wait_ready()
    if "serve" not in Path(f"/proc/{daemon.pid}/cmdline").read_bytes().decode(errors="replace"):
        raise RuntimeError(f"pid {daemon.pid} is not the daemon: its RSS would be wrong")
    bench = NetBench(daemon)
    try:
        await bench.open()
        if "start" in parts:
            await bench.measure_start_with_nics()
        if "guests" in parts:
            await bench.measure_guests(guests)
    finally:
        await bench.close()
        await bench.stop_all()
    return bench.figures


# --- the namespace, the report -----------------------------------------------------------


@contextlib.contextmanager
def bench_namespace() -> Iterator[str]:
    """A fresh network namespace with ``lo`` up and bridge ``br0`` (MTU 1500, up, with the
    host side's address); always deleted."""
    name = f"kvs-bench-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    try:
        inside = ("-n", name)
        ip(*inside, "link", "set", "lo", "up")
        ip(*inside, "link", "add", BRIDGE, "type", "bridge")
        # Set after creation, the MTU is the operator's: ports joining do not change it.
        ip(*inside, "link", "set", BRIDGE, "mtu", "1500", "up")
        ip(*inside, "addr", "add", HOST_CIDR, "dev", BRIDGE)
        yield name
    finally:
        ip("netns", "delete", name)


@contextlib.contextmanager
def daemon_cleanup(netns: str) -> Iterator[NetnsDaemon]:
    workdir = Path(tempfile.mkdtemp(prefix="kvsn-", dir="/tmp"))
    daemon = NetnsDaemon(workdir, netns)
    try:
        yield daemon
    finally:
        daemon.terminate()
        kill_leftovers(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def paired(ours: list[float], anchor: list[float]) -> list[float]:
    return [a - b for a, b in zip(ours, anchor, strict=True)]


def beyond_kernel(found: dict[str, list[float]]) -> tuple[float, float]:
    """(ours, the script's) medians beyond the kernel's share of the set-up, in ms: each
    way's set-up and teardown (the tap's deletion left out: timed apart, it is the
    kernel's alone) less the median of `KernelFloor`'s set-ups."""
    kernel_up = statistics.median(found["kernel up"])
    return (
        statistics.median(found["ours"]) - kernel_up,
        statistics.median(found["script"]) - kernel_up,
    )


def cycle_rows(cycles: dict[str, Any]) -> list[Row]:
    def median(backend: str, mode: str, key: str) -> float:
        return float(statistics.median(cycles[backend][mode][key]))

    def speed_up(metric: str, ours: float, script: float, target: bool) -> Row:
        return Row(
            metric,
            f"{ours:.2f} ms",
            f"{script:.1f} ms kvm-ifup",
            script / ours,
            f">= {CYCLE_TARGET_FACTOR:g}x faster" if target else "-",
            script / ours >= CYCLE_TARGET_FACTOR if target else None,
        )

    # The target applies to the work each way does: the kernel's share (the system calls
    # themselves) is the same for both and is no one's code, so it is measured apart and
    # taken out (`KernelFloor`, `beyond_kernel`).
    rows = []
    for backend in ("asyncio", "trio"):
        for mode in ("bridged", "routed"):
            ours, script = beyond_kernel(cycles[backend][mode])
            kernel = median(backend, mode, "kernel up")
            rows.append(
                speed_up(
                    f"NIC set-up + teardown beyond the kernel's {kernel:.2f} ms, {mode}, {backend}",
                    ours,
                    script,
                    True,
                )
            )
    for mode in ("bridged", "routed"):
        rows.append(
            speed_up(
                f"(info) set-up + teardown with the kernel's set-up, {mode}, asyncio",
                median("asyncio", mode, "ours"),
                median("asyncio", mode, "script"),
                False,
            )
        )
    quad = f"ours {START_NICS} NICs"
    rows.append(
        Row(
            f"(info) set-up of {START_NICS} NICs alone, asyncio",
            f"{median('asyncio', 'bridged', f'{quad} up'):.2f} ms",
            f"{median('trio', 'bridged', f'{quad} up'):.2f} ms on trio",
            None,
            "-",
            None,
        )
    )
    return rows


def start_rows(figures: dict[str, Any]) -> list[Row]:
    extra = statistics.median(paired(figures["start_nics_ms"], figures["start_plain_ms"]))
    bare_extra = statistics.median(paired(figures["bare_nics_ms"], figures["bare_plain_ms"]))
    daemon = statistics.median(
        paired(figures["daemon_cpu_nics_ms"], figures["daemon_cpu_plain_ms"])
    )
    qemu = statistics.median(paired(figures["qemu_cpu_nics_ms"], figures["qemu_cpu_plain_ms"]))
    return [
        Row(
            f"start -> running, {START_NICS} NICs vs none",
            f"{extra:+.1f} ms",
            f"{bare_extra:+.1f} ms bare QEMU",
            None,
            f"<= +{START_TARGET_EXTRA_MS:g} ms",
            extra <= START_TARGET_EXTRA_MS,
        ),
        Row(
            f"(info) CPU time of a start, {START_NICS} NICs vs none: the daemon",
            f"{daemon:+.2f} ms",
            f"QEMU {qemu:+.2f} ms",
            None,
            "-",
            None,
        ),
    ]


def guest_rows(figures: dict[str, Any]) -> list[Row]:
    count = figures["guests"]
    rss = figures["rss_guests_running_mib"]
    before = figures["rss_before_guests_mib"]
    return [
        Row(
            f"{count} guests x {GUEST_NICS} NICs, reachable",
            f"{figures['guests_reachable_in_sweep']}/{count}",
            "-",
            None,
            f"{count}/{count}",
            figures["guests_reachable_in_sweep"] == count,
        ),
        Row(
            f"daemon RSS, {count} guests",
            f"{rss:.1f} MiB",
            f"{before:.1f} MiB before",
            rss / before,
            "-",
            None,
        ),
        Row(
            "start per guest, RPC (median)",
            f"{statistics.median(figures['guests_start_ms']):.0f} ms",
            "-",
            None,
            "-",
            None,
        ),
    ]


def spread(values: list[float], digits: int = 1) -> str:
    median, p90 = statistics.median(values), percentile(values, 90)
    return f"median {median:.{digits}f}, p90 {p90:.{digits}f}, max {max(values):.{digits}f}"


def cycle_notes(cycles: dict[str, Any]) -> list[str]:
    lines = []
    for backend in ("asyncio", "trio"):
        for mode in ("bridged", "routed"):
            found = cycles[backend][mode]

            def parts(way: str, found: dict[str, list[float]] = found) -> str:
                up, code = (
                    statistics.median(found[f"{way} {part}"]) for part in ("up", "teardown")
                )
                return f"{statistics.median(found[way]):.2f} = {up:.2f} up + {code:.2f} teardown"

            deletions = ", ".join(
                f"{way} {statistics.median(found[f'{way} close']):.1f}"
                for way in ("ours", "script", "kernel")
            )
            ours, script = beyond_kernel(found)
            lines.append(
                f"one {mode} NIC, {backend}, medians (ms): ours {parts('ours')} "
                f"({len(found['ours'])} cycles, p90 {percentile(found['ours'], 90):.2f}); "
                f"kvm-ifup {parts('script')} ({len(found['script'])}); the kernel's share "
                f"{statistics.median(found['kernel up']):.2f}; beyond it: ours {ours:.2f}, "
                f"the script's {script:.2f}; the tap's deletion, left out: {deletions}"
            )
    for backend in ("asyncio", "trio"):
        found = cycles[backend]["bridged"]
        quad = f"ours {START_NICS} NICs"
        lines.append(
            f"one instance with {START_NICS} bridged NICs, {backend}, medians (ms): "
            f"{statistics.median(found[quad]):.2f} = {statistics.median(found[f'{quad} up']):.2f}"
            f" up + {statistics.median(found[f'{quad} teardown']):.2f} teardown "
            f"({len(found[quad])}); the taps' deletion "
            f"{statistics.median(found[f'{quad} close']):.1f}"
        )
    lines.append(f"left in the namespace after the cycles: {cycles['left'] or 'nothing'}")
    return lines


def start_notes(figures: dict[str, Any]) -> list[str]:
    lines = []
    for label, key in (("plain", "plain"), (f"{START_NICS} NICs", "nics")):
        lines.append(
            f"start -> running, {label} (ms): via RPC {spread(figures[f'start_{key}_ms'])}; "
            f"bare -daemonize {spread(figures[f'bare_{key}_ms'])}"
        )
    extra = paired(figures["start_nics_ms"], figures["start_plain_ms"])
    bare_extra = paired(figures["bare_nics_ms"], figures["bare_plain_ms"])
    lines.append(
        f"{START_NICS} NICs - none, paired (ms): via RPC {', '.join(f'{x:+.1f}' for x in extra)}"
        f"; bare {', '.join(f'{x:+.1f}' for x in bare_extra)}"
    )
    daemon = paired(figures["daemon_cpu_nics_ms"], figures["daemon_cpu_plain_ms"])
    qemu = paired(figures["qemu_cpu_nics_ms"], figures["qemu_cpu_plain_ms"])
    daemon_plain = statistics.median(figures["daemon_cpu_plain_ms"])
    qemu_plain = statistics.median(figures["qemu_cpu_plain_ms"])
    lines.append(
        f"CPU time per start, {START_NICS} NICs - none, paired medians (ms): the daemon "
        f"{statistics.median(daemon):+.2f} (of {daemon_plain:.1f} without NICs), QEMU until "
        f"running {statistics.median(qemu):+.2f} (of {qemu_plain:.1f}); the kernel's work in "
        "their system calls counted in each"
    )
    return lines


def guest_notes(figures: dict[str, Any]) -> list[str]:
    count = figures["guests"]
    rss, before = figures["rss_guests_running_mib"], figures["rss_before_guests_mib"]
    return [
        f"{count} guests x {GUEST_NICS} NICs ({GUEST_MIB} MiB, TCG) started in batches of "
        f"{BATCH} in {figures['guests_all_started_s']:.0f} s (each batch booted and pinged "
        f"before the next); {figures['guests_running']}/{count} running, "
        f"{figures['guests_reachable_once_booted']}/{count} answered a ping once booted, "
        f"{figures['guests_reachable_in_sweep']}/{count} in the final sweep "
        f"({figures['guests_sweep_s']:.1f} s); {figures['guests_bridge_ports']} ports on "
        f"{BRIDGE}",
        f"start per guest via RPC (ms): {spread(figures['guests_start_ms'], 0)}; start -> "
        f"answering pings (s): {spread(figures['guests_reachable_s'])}",
        f"daemon RSS: {before:.1f} MiB before, {rss:.1f} MiB with the {count} running "
        f"({(rss - before) / count * 1024:.0f} KiB per guest)",
        f"all {count} stopped (force, concurrently) in {figures['guests_stop_s']:.1f} s; then "
        f"{figures['guests_left_ports']} ports on {BRIDGE}, links left: "
        f"{figures['guests_left_links'] or 'none'}",
    ]


def report(cycles: dict[str, Any] | None, figures: dict[str, Any]) -> str:
    """The notes, then the table, of the parts that ran."""
    notes = [
        f"NIC networking in a private namespace; {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f} at the end (other "
        "work on the machine skews every figure)",
    ]
    rows: list[Row] = []
    if cycles is not None:
        notes += cycle_notes(cycles)
        rows += cycle_rows(cycles)
    if "start_plain_ms" in figures:
        notes += start_notes(figures)
        rows += start_rows(figures)
    if "guests" in figures:
        notes += guest_notes(figures)
        rows += guest_rows(figures)
    return "\n".join(notes) + "\n" + format_table(rows)


PARTS = ("cycles", "start", "guests")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument(
        "--guests",
        type=int,
        default=GUESTS,
        metavar="N",
        help=f"guests in the last measurement (default {GUESTS})",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"the measurements to run, of {','.join(PARTS)} (default: all): 1., 2. and 3.",
    )
    parser.add_argument("--inside", choices=["cycles"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside == "cycles":
        return inside_cycles()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(parts - set(PARTS)))}")
    if os.geteuid() != 0:
        log("needs root (network namespaces, taps)")
        return 1
    if not (GUEST_DIR / "vmlinuz").exists() or not (GUEST_DIR / "initrd.img").exists():
        log(f"the test guest is missing from {GUEST_DIR}: run `make guest`")
        return 1
    began = time.monotonic()
    cycles = None
    figures: dict[str, Any] = {}
    try:
        with bench_namespace() as netns:
            log(f"namespace {netns}")
            if "cycles" in parts:
                cycles = measure_cycles(netns)
            if parts & {"start", "guests"}:
                with daemon_cleanup(netns) as daemon:
                    try:
                        figures = asyncio.run(run_daemon_parts(daemon, args.guests, parts))
                    except Exception:
                        log(f"daemon log tail: {daemon.log_tail()}")
                        raise
    except KeyboardInterrupt:
        log("interrupted (cleaned up)")
        return 130
    log(f"done in {time.monotonic() - began:.0f} s, namespace deleted")
    print(report(cycles, figures))
    if args.json:
        print(msgspec.json.encode({"cycles": cycles, "figures": figures}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
