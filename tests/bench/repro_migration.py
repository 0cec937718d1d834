"""Bare-QMP reproduction of a live migration of the test guest between two plain QEMUs.

No daemon: two ``qemu-system-x86_64`` with the argv kvm-supervisor 7.2-era builds for
a one-NIC bridged test guest under TCG (``-m 96``; ``--mem-kib 98312`` gives the size
the daemon now gives a TCG guest), driven by raw QMP (``migrate-incoming`` on a
deferred target, capabilities, parameters, ``migrate``, ``cont``), in a network
namespace of its own (bridge ``br0`` 10.77.0.1/24, one tap per QEMU), the host side
pinging the guest every 0.1 s.

A run is judged two ways:

- memory (``--compare``): the target gets ``stop`` while incoming (QEMU's autostart
  off), so once the migration has completed neither end runs guest code; both RAMs are
  saved (``pmemsave``) and compared page by page, twice 1 s apart (a snapshot that
  moves would make the comparison meaningless). A page that differs was lost in
  transit: ``corrupt-memory``.
- behaviour: the target's guest runs for ``--watch`` seconds; it must print heartbeats,
  answer pings and print no kernel complaint (``not a head``, ``BUG``, ...), else
  ``guest-broken``.

Run as root: ``python3 tests/bench/repro_migration.py --runs 10 --compare [variant]``
(``--help`` lists the variants). One line per run, then the counts; the RAM dumps of a
corrupt run are kept. Every QEMU and ping ends with its run, the namespace with the
script. This is how the QEMU 7.2 TCG dirty-tracking bug described at
`supervisor.qemu.cmdline.TCG_RAM_PAD_KIB` was found (README, "TCG guests").
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QEMU = os.environ.get("KVM_SUPERVISOR_TEST_QEMU", "/usr/bin/qemu-system-x86_64")
GUEST_DIR = Path(__file__).resolve().parents[2] / ".cache" / "guest"
KERNEL_ARGS = "root=/dev/vda1 quiet tsc=reliable no_timer_check mitigations=off"
HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"
BRIDGE_MTU = 9000
PAGE = 4096
#: A pc machine's RAM below 4 GiB, less the legacy VGA and ROM hole (640 KiB-1 MiB).
LOW_RAM_END, HIGH_RAM_START = 0xA0000, 0x100000
TROUBLE = re.compile(
    rb"not a head|BUG|corruption|Oops|panic|soft lockup|general protection|invalid opcode"
)
HEARTBEAT = re.compile(rb"KVS-HEARTBEAT (\d+)")
FINISHED = ("completed", "failed", "cancelled")
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


class QMP:
    """A blocking QMP client (events are read past and dropped)."""

    def __init__(self, path: Path) -> None:
        wait(path.exists, 60, f"{path}")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("QEMU closed its monitor")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        while True:
            message = self._read()
            if "error" in message:
                raise RuntimeError(f"{command}: {message['error']['desc']}")
            if "return" in message:
                return message["return"]

    def close(self) -> None:
        with suppress(OSError):
            self.file.close()
            self.sock.close()


@dataclass
class Variant:
    #: "machine": ``-machine ...,accel=tcg`` as the daemon writes it; "single"/"multi":
    #: ``-accel tcg,thread=...``.
    accel: str
    smp: int
    mem_kib: int
    caps: list[str]
    #: ``cont`` to the target while it is incoming, as the daemon does.
    autostart: bool
    live: bool
    netdev: str  # tap | user | none
    vnet_hdr: bool
    ping: bool
    busy: str
    replies_before: int
    delay_s: float
    bandwidth_mib: int
    downtime_ms: int
    compare: bool
    watch_s: float
    postcopy_after: int | None


@dataclass
class Qemu:
    directory: Path
    process: subprocess.Popen[bytes]
    qmp: QMP
    fds: list[int] = field(default_factory=list)

    def serial(self) -> bytes:
        try:
            return (self.directory / "serial.log").read_bytes()
        except FileNotFoundError:
            return b""

    def end(self) -> None:
        self.qmp.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for fd in self.fds:
            os.close(fd)


def open_tap(name: str, vnet_hdr: bool) -> int:
    """A tap on br0, as the daemon opens it (QEMU gets the fd)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    flags = _IFF_TAP | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    ip("link", "set", name, "mtu", str(BRIDGE_MTU), "master", "br0", "up")
    return fd


def argv(v: Variant, directory: Path, tap_fd: int | None, incoming: bool) -> list[str]:
    """The daemon's argv of the test guest (QMP on a path instead of a passed fd)."""
    args = [QEMU, "-S", "-name", "vm,debug-threads=on"]
    args += ["-uuid", "3f088ec5-ca15-40c5-b887-a0ede73f1e5c"]
    if v.accel == "machine":
        args += ["-machine", "pc-i440fx-7.2,accel=tcg"]
    else:
        args += ["-machine", "pc-i440fx-7.2", "-accel", f"tcg,thread={v.accel}"]
    args += ["-m", f"{v.mem_kib}k", "-smp", str(v.smp), "-nodefaults"]
    args += ["-pidfile", str(directory / "qemu.pid")]
    args += ["-chardev", f"socket,id=qmp,path={directory / 'qmp.sock'},server=on,wait=off"]
    args += ["-mon", "chardev=qmp,mode=control"]
    serial = f"socket,id=serial0,path={directory / 'serial.sock'},server=on,wait=off"
    args += ["-chardev", f"{serial},logfile={directory / 'serial.log'},logappend=on"]
    args += ["-serial", "chardev:serial0", "-display", "none", "-vga", "std"]
    args += ["-kernel", str(GUEST_DIR / "vmlinuz"), "-initrd", str(GUEST_DIR / "initrd.img")]
    kvs_ip = f" kvs_ip={GUEST_IP}/24" if v.netdev != "none" else ""
    args += ["-append", f"{KERNEL_ARGS}{kvs_ip} console=ttyS0,38400"]
    if v.netdev != "none":
        netdev = f"tap,id=net0,fd={tap_fd}" if v.netdev == "tap" else "user,id=net0"
        nic = "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:fc:d6:68,bus=pci.0,addr=0xc"
        args += ["-netdev", netdev, "-device", nic]
    args += ["-device", "virtio-balloon-pci,id=balloon0"]
    if incoming:
        args += ["-incoming", "defer"]
    return args


def launch(v: Variant, name: str, run_dir: Path, incoming: bool) -> Qemu:
    directory = run_dir / name
    directory.mkdir()
    fds = [open_tap(f"vcr{name}", v.vnet_hdr)] if v.netdev == "tap" else []
    with open(directory / "qemu.log", "wb") as log:
        command = argv(v, directory, fds[0] if fds else None, incoming)
        process = subprocess.Popen(command, pass_fds=fds, stdout=log, stderr=log)
    try:
        return Qemu(directory, process, QMP(directory / "qmp.sock"), fds)
    except BaseException:
        process.kill()
        process.wait()
        for fd in fds:
            os.close(fd)
        raise


class Pinger:
    """``ping`` from the namespace's host side every 0.1 s, its output in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "wb") as out:
            command = ["ping", "-n", "-i", "0.1", GUEST_IP]
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL)

    def replies(self) -> int:
        return self.path.read_bytes().count(b"bytes from")

    def end(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait()


def type_on_console(q: Qemu, command: str) -> None:
    """Type `command` on the guest's root shell and wait until it has started."""
    wait(lambda: b"# " in q.serial().partition(b"KVS-GUEST-READY")[2], 60, "the shell")
    with socket.socket(socket.AF_UNIX) as console:
        console.connect(str(q.directory / "serial.sock"))
        console.sendall(b"echo STARTED-$((6*7)); " + command.encode() + b"\n")
        wait(lambda: b"STARTED-42" in q.serial(), 30, "the command starts")


def ram(q: Qemu, kib: int, scratch: Path) -> dict[int, bytes]:
    """The guest's RAM by guest-physical page address (``pmemsave``)."""
    pages = {}
    for start, end in ((0, LOW_RAM_END), (HIGH_RAM_START, kib * 1024)):
        q.qmp.execute("pmemsave", val=start, size=end - start, filename=str(scratch))
        data = scratch.read_bytes()
        pages |= {start + at: data[at : at + PAGE] for at in range(0, len(data), PAGE)}
    scratch.unlink()
    return pages


def differing(a: dict[int, bytes], b: dict[int, bytes]) -> list[int]:
    return [address for address in sorted(a) if a[address] != b[address]]


def migrate(v: Variant, source: Qemu, target: Qemu) -> dict[str, Any]:
    """Migrate as the daemon does; QEMU's last ``query-migrate`` on the source."""
    caps = [{"capability": c, "state": True} for c in v.caps]
    target.qmp.execute("migrate-set-capabilities", capabilities=caps)
    target.qmp.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = target.qmp.execute("query-migrate")["socket-address"][0]["port"]
    target.qmp.execute("cont" if v.autostart else "stop")
    source.qmp.execute("migrate-set-capabilities", capabilities=caps)
    parameters = {"max-bandwidth": v.bandwidth_mib << 20, "downtime-limit": v.downtime_ms}
    source.qmp.execute("migrate-set-parameters", **parameters)
    if not v.live:
        source.qmp.execute("stop")
    source.qmp.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
    switched = False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status: dict[str, Any] = source.qmp.execute("query-migrate")
        if status.get("status") in FINISHED:
            return status | {"switched to postcopy": switched}
        passes = status.get("ram", {}).get("dirty-sync-count", 0)
        after = v.postcopy_after
        if after is not None and not switched and status["status"] == "active" and passes >= after:
            source.qmp.execute("migrate-start-postcopy")
            switched = True
        time.sleep(0.05)
    raise TimeoutError("the migration did not end in 300 s")


@dataclass
class Outcome:
    verdict: str  # ok | corrupt-memory | guest-broken | error
    detail: str


def one_run(v: Variant, run_dir: Path) -> Outcome:
    run_dir.mkdir()
    source = target = pinger = None
    keep = False
    try:
        source = launch(v, "s", run_dir, incoming=False)
        source.qmp.execute("cont")
        wait(lambda: b"KVS-GUEST-READY" in source.serial(), 120, "the guest boots")
        if v.busy:
            type_on_console(source, v.busy)
        if v.ping:
            pinger = Pinger(run_dir / "ping.out")
            wait(lambda: pinger.replies() >= v.replies_before, 60, "ping replies")
        time.sleep(v.delay_s)
        target = launch(v, "t", run_dir, incoming=True)
        status = migrate(v, source, target)
        if status["status"] != "completed":
            return Outcome("error", f"migration {status['status']}: {status.get('error-desc')}")
        detail = f"downtime {status.get('downtime')} ms"
        if v.postcopy_after is not None:
            detail += f", postcopy: {status['switched to postcopy']}"
        # The target loads the last of the state a moment after the source says completed.
        wait(lambda: target.qmp.execute("query-migrate").get("status") in FINISHED, 60, "target")
        if v.compare:
            scratch = run_dir / "scratch.ram"
            left, arrived = ram(source, v.mem_kib, scratch), ram(target, v.mem_kib, scratch)
            time.sleep(1)
            moved = differing(left, ram(source, v.mem_kib, scratch))
            moved += differing(arrived, ram(target, v.mem_kib, scratch))
            if moved:
                return Outcome("error", f"a stopped guest's RAM changed: {len(moved)} pages")
            stale = differing(left, arrived)
            detail += f"; {len(stale)} of {len(left)} pages differ"
            if stale:
                keep = True
                detail += ": " + " ".join(f"{address:#x}" for address in stale[:8])
                for name, pages in (("source.ram", left), ("target.ram", arrived)):
                    (run_dir / name).write_bytes(b"".join(pages[a] for a in stale))
        if not v.autostart:
            target.qmp.execute("cont")
        seen = len(target.serial())
        source.end()
        source = None
        replies = pinger.replies() if pinger else 0
        time.sleep(v.watch_s)
        after = target.serial()[seen:]
        replies = pinger.replies() - replies if pinger else 0
        beats = len(HEARTBEAT.findall(after))
        detail += f"; on the target: {beats} heartbeats, {replies} ping replies in {v.watch_s} s"
        if trouble := TROUBLE.search(after):
            start = after.rfind(b"\n", 0, trouble.start()) + 1
            line = after[start : after.find(b"\n", trouble.end())].decode(errors="replace")
            detail += f"; kernel: {line.strip()}"
        if keep:
            return Outcome("corrupt-memory", detail)
        if trouble or beats < v.watch_s / 2 or (pinger and replies == 0):
            keep = True
            return Outcome("guest-broken", detail)
        return Outcome("ok", detail)
    except Exception as error:  # a run that cannot be judged is counted apart
        keep = True
        return Outcome("error", f"{type(error).__name__}: {error}")
    finally:
        for ending in (pinger, source, target):
            if ending is not None:
                ending.end()
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--runs", type=int, default=10)
    add("--accel", choices=["machine", "single", "multi"], default="machine")
    add("--smp", type=int, default=1)
    add("--mem-kib", type=int, default=96 * 1024, help="guest RAM (-m ...k)")
    add("--no-return-path", action="store_true")
    add("--no-events", action="store_true")
    add("--no-autostart", action="store_true", help="the target gets `stop`, then `cont`")
    add("--non-live", action="store_true", help="`stop` the source before `migrate`")
    add("--netdev", choices=["tap", "user", "none"], default="tap")
    add("--no-vnet-hdr", action="store_true")
    add("--no-ping", action="store_true")
    add("--busy", default="", help="a shell command typed on the guest's console first")
    add("--replies-before", type=int, default=3, help="ping replies before migrating")
    add("--delay", type=float, default=0.0, help="then wait this long (s)")
    add("--bandwidth", type=int, default=32, help="MiB/s (the daemon's default)")
    add("--downtime", type=int, default=30, help="ms (the daemon's default)")
    add("--compare", action="store_true", help="compare the RAMs (implies --no-autostart)")
    add("--watch", type=float, default=8.0, help="seconds the target's guest is watched")
    add("--postcopy-after", type=int, default=None, help="postcopy after N dirty syncs")
    add("--keep-dir", default=None)
    add("--inside", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def variant(args: argparse.Namespace) -> Variant:
    caps = ([] if args.no_events else ["events"]) + ([] if args.no_return_path else ["return-path"])
    if args.postcopy_after is not None:
        caps.append("postcopy-ram")
    return Variant(
        accel=args.accel,
        smp=args.smp,
        mem_kib=args.mem_kib,
        caps=caps,
        autostart=not (args.no_autostart or args.compare),
        live=not args.non_live,
        netdev=args.netdev,
        vnet_hdr=not args.no_vnet_hdr,
        ping=not args.no_ping and args.netdev == "tap",
        busy=args.busy,
        replies_before=args.replies_before,
        delay_s=args.delay,
        bandwidth_mib=args.bandwidth,
        downtime_ms=args.downtime,
        compare=args.compare,
        watch_s=args.watch,
        postcopy_after=args.postcopy_after,
    )


@contextmanager
def namespace() -> Iterator[str]:
    name = f"kvs-repro-{secrets.token_hex(3)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "add", "br0", "type", "bridge")
        ip("-n", name, "address", "add", f"{HOST_IP}/24", "dev", "br0")
        ip("-n", name, "link", "set", "br0", "mtu", str(BRIDGE_MTU), "up")
        yield name
    finally:
        ip("netns", "del", name)


def inside(args: argparse.Namespace) -> int:
    v = variant(args)
    base = Path(args.keep_dir or tempfile.mkdtemp(prefix="kvs-repro-", dir="/tmp"))
    base.mkdir(exist_ok=True)
    print(f"variant: {v}", flush=True)
    counts: dict[str, int] = {}
    for index in range(args.runs):
        started = time.monotonic()
        outcome = one_run(v, base / f"run{index}")
        counts[outcome.verdict] = counts.get(outcome.verdict, 0) + 1
        took = time.monotonic() - started
        print(f"run {index}: {outcome.verdict} ({took:.0f} s) {outcome.detail}", flush=True)
    judged = sum(n for verdict, n in counts.items() if verdict != "error")
    print(f"counts: {counts}; bad {judged - counts.get('ok', 0)}/{judged}; runs kept in {base}")
    return 0


def main() -> int:
    args = parse()
    if args.inside:
        return inside(args)
    with namespace() as netns:
        command = ["ip", "netns", "exec", netns, sys.executable, *sys.argv, "--inside", netns]
        return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
