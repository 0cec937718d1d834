"""Libvirt anchors for the supervisor benchmark (issue 4 §9).

Run: ``.venv/bin/python tests/bench/bench_libvirt.py [--json]``. Asserts nothing; prints
a table of figures (with ``--json``: one JSON object on stdout, the table on stderr).

What it does, all in one run:

* installs libvirt from Debian's packages if it is missing (``libvirt-daemon``,
  ``libvirt-daemon-driver-qemu``, ``libvirt-clients``, without recommends: 8 packages);
* starts its own privileged ``libvirtd`` in the foreground, under this script (with a
  prompt zombie reaper in between, see ``REAPER``), in a private mount namespace where
  /etc/libvirt, /run/libvirt, /var/{lib,cache,log}/libvirt, /etc/passwd and /etc/group
  are bind-mounted from a temp dir: the daemon's config, state and sockets are its own
  (the sockets are in the temp dir). On the host, only the empty mount points are made
  if missing, and removed at the end. Its QEMUs run as root, without cgroups, namespaces
  or a security driver; its /etc/passwd has a ``libvirt-qemu`` user because libvirtd
  resolves that name before it reads qemu.conf;
* measures libvirtd's RSS once started, idle (after one client asked for the QEMU
  capabilities, as any long-running daemon has), and with 10 running test guests
  (96 MiB, TCG, kernel and initrd direct boot, no disks, serial console to a file);
  the latency of ``virsh create`` (the whole command, as an admin or a script sees it);
  and the crash event latency: ``kill -9`` of a guest's QEMU until ``virsh event --loop
  --event lifecycle`` prints the domain stopped;
* destroys its domains, stops its daemon, kills by pid any QEMU left over, removes the
  mount points it created and its temp dir.

Import it to get the figures: ``from bench_libvirt import measure`` (with tests/bench on
``sys.path``); ``measure()`` never raises for libvirt trouble: it returns the fallback
anchors measured earlier on this kind of machine, labelled as such, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

import msgspec

QEMU = os.environ.get("KVM_SUPERVISOR_TEST_QEMU", "/usr/bin/qemu-system-x86_64")
REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO / ".cache" / "guest"
PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients")
QEMU_DRIVER = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")
KERNEL_ARGS = "console=ttyS0 quiet tsc=reliable no_timer_check mitigations=off"
GUEST_MIB = 96
GUESTS = 10
CREATE_SAMPLES = 5
CRASH_SAMPLES = 7
READY_TIMEOUT_S = 180.0
VIRSH_TIMEOUT_S = 120.0
# The host paths the private daemon sees replaced by its own directories.
PRIVATE_DIRS = {
    "etc": Path("/etc/libvirt"),
    "run": Path("/run/libvirt"),
    "lib": Path("/var/lib/libvirt"),
    "cache": Path("/var/cache/libvirt"),
    "log": Path("/var/log/libvirt"),
}
NAME_PREFIX = "kvsbench"


class LibvirtAnchors(msgspec.Struct):
    """The figures; ``source`` says whether they were measured now or are the fallback."""

    source: str
    reason: str | None
    libvirt_version: str | None
    libvirtd_rss_startup_mib: float | None
    libvirtd_rss_idle_mib: float
    libvirtd_rss_10_guests_mib: float
    guests: int
    guests_ready: int | None
    virsh_create_ms: float
    virsh_create_ms_samples: list[float]
    crash_event_ms: float
    crash_event_ms_samples: list[float]


def fallback(reason: str) -> LibvirtAnchors:
    """The anchors measured earlier on this kind of machine (2 cores, TCG, libvirt 9.0)."""
    return LibvirtAnchors(
        source="fallback (measured earlier on this kind of machine, not in this run)",
        reason=reason,
        libvirt_version=None,
        libvirtd_rss_startup_mib=None,
        libvirtd_rss_idle_mib=22.5,
        libvirtd_rss_10_guests_mib=28.5,
        guests=GUESTS,
        guests_ready=None,
        virsh_create_ms=389.0,
        virsh_create_ms_samples=[],
        crash_event_ms=20.0,
        crash_event_ms_samples=[],
    )


class LibvirtUnavailable(Exception):
    """Libvirt cannot be made to work here; the message says why."""


def log(message: str) -> None:
    print(f"bench_libvirt: {message}", file=sys.stderr, flush=True)


# --- installation ------------------------------------------------------------------


def _installed(package: str) -> bool:
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return status.returncode == 0 and "ok installed" in status.stdout


def ensure_libvirt() -> None:
    """Install the libvirt packages that are missing (root only); raise if impossible."""
    missing = [package for package in PACKAGES if not _installed(package)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise LibvirtUnavailable(f"{' '.join(missing)} not installed and not running as root")
    if shutil.which("apt-get") is None:
        raise LibvirtUnavailable(f"{' '.join(missing)} not installed and no apt-get here")
    log(f"installing {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, stdout=sys.stderr, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=sys.stderr, check=False)
        result = subprocess.run(install, env=env, stdout=sys.stderr, check=False)
        if result.returncode != 0:
            raise LibvirtUnavailable(f"apt-get install {' '.join(missing)} failed")


# --- the private daemon ------------------------------------------------------------

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

# $1 is the temp dir: bind its directories over the host's, then become libvirtd
# (unshare and sh exec, so libvirtd keeps the pid the reaper below forked).
NAMESPACE_SCRIPT = """\
set -e
mount --bind "$1/etc" /etc/libvirt
mount --bind "$1/run" /run/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/cache" /var/cache/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$1/passwd" /etc/passwd
mount --bind "$1/group" /etc/group
exec libvirtd -f "$1/etc/libvirtd.conf" -p "$1/libvirtd.pid"
"""

# libvirtd's parent: a child subreaper that reaps every orphan at once. libvirt
# daemonizes QEMU, and after QEMU dies it reports the domain stopped only once the
# process is gone (reaped). Left to this machine's pid 1, which reaps every ~2 s, the
# crash event takes ~1.5 s; under systemd, or the supervisor (a subreaper itself), the
# reaping is immediate. Even so libvirt may see the monitor's EOF before the zombie is
# reaped, and then polls every 200 ms: samples are ~10 ms or ~210 ms, hence several.
# This process forwards SIGTERM to libvirtd and exits with it.
REAPER = """\
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
daemon = os.fork()
if daemon == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
running = True
def forward(signum, frame):
    if running:
        os.kill(daemon, signum)
signal.signal(signal.SIGTERM, forward)
while True:
    pid, status = os.wait()
    if pid == daemon:
        running = False
        sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LibvirtUnavailable(f"no VmRSS for pid {pid}")


class PrivateLibvirtd:
    """A libvirtd started by this script in its own mount namespace, and its domains."""

    def __init__(self, workdir: Path, *, host_uuid: str | None = None) -> None:
        self.workdir = workdir
        #: libvirtd's own host UUID (None: the machine's): two daemons on one host need
        #: distinct ones to migrate between them.
        self.host_uuid = host_uuid
        self.socket = workdir / "sock" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        self.created_mount_points: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None  # the reaper
        self.daemon_pid: int | None = None
        self.started_domains: set[str] = set()

    # lifecycle

    def start(self) -> None:
        if os.geteuid() != 0:
            raise LibvirtUnavailable("a privileged libvirtd needs root")
        if shutil.which("unshare") is None or shutil.which("libvirtd") is None:
            raise LibvirtUnavailable("unshare or libvirtd is not on PATH")
        if not QEMU_DRIVER.exists():
            raise LibvirtUnavailable(f"{QEMU_DRIVER} is missing")
        for name in [*PRIVATE_DIRS, "sock", "guests"]:
            (self.workdir / name).mkdir()
        (self.workdir / "etc" / "qemu").mkdir()
        (self.workdir / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (self.workdir / "etc" / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.workdir / "sock"}"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_ro = "none"\n'
            'auth_unix_rw = "none"\n'
            'log_outputs = "3:stderr"\n'
            + ("" if self.host_uuid is None else f'host_uuid = "{self.host_uuid}"\n')
        )
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        if not re.search(r"^libvirt-qemu:", passwd, re.MULTILINE):
            passwd += "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
        for name, gid in (("kvm", 64054), ("libvirt-qemu", 64055)):
            if not re.search(rf"^{name}:", group, re.MULTILINE):
                group += f"{name}:x:{gid}:\n"
        (self.workdir / "passwd").write_text(passwd)
        (self.workdir / "group").write_text(group)
        for mount_point in PRIVATE_DIRS.values():
            if not mount_point.exists():
                mount_point.mkdir()
                self.created_mount_points.append(mount_point)
        with (self.workdir / "libvirtd.log").open("wb") as daemon_log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", REAPER, "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", NAMESPACE_SCRIPT, "sh", str(self.workdir)],
                stdin=subprocess.DEVNULL,
                stdout=daemon_log,
                stderr=daemon_log,
                start_new_session=True,  # ^C reaches this script only: it cleans up in order
            )  # fmt: skip
        deadline = time.monotonic() + 30
        pid_file = self.workdir / "libvirtd.pid"
        while not (self.socket.exists() and pid_file.exists()):
            if self.proc.poll() is not None:
                raise LibvirtUnavailable(
                    f"libvirtd exited with {self.proc.returncode}: {self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise LibvirtUnavailable(f"libvirtd made no socket in 30 s: {self.log_tail()}")
            time.sleep(0.05)
        self.daemon_pid = int(pid_file.read_text())
        if not self._is_libvirtd(self.daemon_pid):
            raise LibvirtUnavailable(f"pid {self.daemon_pid} from {pid_file} is not libvirtd")

    @staticmethod
    def _is_libvirtd(pid: int) -> bool:
        try:
            return Path(os.readlink(f"/proc/{pid}/exe")).name == "libvirtd"
        except OSError:
            return False

    def stop(self) -> None:
        """Destroy this run's domains, stop the daemon, kill leftover QEMUs by pid."""
        if self.proc is not None and self.proc.poll() is None:
            for name in sorted(self.started_domains):
                self.virsh("destroy", name, check=False, timeout=30)
            self.proc.terminate()  # forwarded to libvirtd
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                if self.daemon_pid is not None and self._is_libvirtd(self.daemon_pid):
                    os.kill(self.daemon_pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        for name in self.started_domains:
            pid = self.qemu_pid(name)
            if pid is not None:
                log(f"killing leftover QEMU {pid} of {name}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for mount_point in reversed(self.created_mount_points):
            with contextlib.suppress(OSError):
                mount_point.rmdir()

    @property
    def pid(self) -> int:
        """libvirtd's pid."""
        assert self.daemon_pid is not None
        return self.daemon_pid

    def log_tail(self) -> str:
        try:
            lines = (self.workdir / "libvirtd.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-5:])

    # clients

    def virsh(
        self, *args: str, check: bool = True, timeout: float = VIRSH_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise LibvirtUnavailable(
                f"virsh {' '.join(args)} failed: {result.stderr.strip()} "
                f"(daemon: {self.log_tail()})"
            )
        return result

    def domain_xml(self, name: str, memory_mib: int = GUEST_MIB) -> Path:
        serial_log = self.serial_log(name)
        xml = f"""\
<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(GUEST_DIR / "vmlinuz"))}</kernel>
    <initrd>{escape(str(GUEST_DIR / "initrd.img"))}</initrd>
    <cmdline>{escape(KERNEL_ARGS)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(QEMU)}</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{escape(str(serial_log))}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""
        path = self.workdir / f"{name}.xml"
        path.write_text(xml)
        return path

    def serial_log(self, name: str) -> Path:
        return self.workdir / "guests" / f"{name}.log"

    def create(self, name: str, memory_mib: int = GUEST_MIB) -> float:
        """``virsh create`` a test guest; return the command's wall time in ms."""
        xml = self.domain_xml(name, memory_mib)
        start = time.perf_counter()
        self.started_domains.add(name)
        self.virsh("create", str(xml))
        return (time.perf_counter() - start) * 1000

    def destroy(self, name: str) -> None:
        self.virsh("destroy", name)
        self.started_domains.discard(name)

    def qemu_pid(self, name: str) -> int | None:
        """The pid of a domain's QEMU, from libvirt's pid file, if that QEMU still runs."""
        try:
            pid = int((self.workdir / "run" / "qemu" / f"{name}.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if f"guest={name},".encode() in cmdline else None


@contextlib.contextmanager
def lifecycle_events(daemon: PrivateLibvirtd) -> Iterator[queue.Queue[tuple[float, str]]]:
    """``virsh event --loop --event lifecycle`` on a pty (line-buffered), its lines
    timestamped with time.monotonic() as they arrive."""
    lines: queue.Queue[tuple[float, str]] = queue.Queue()
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        ["virsh", "-q", "-c", daemon.uri, "event", "--loop", "--event", "lifecycle"],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)

    def read() -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once virsh is gone
                return
            if not chunk:
                return
            now = time.monotonic()
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                lines.put((now, line.decode(errors="replace").strip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        os.close(master)


def wait_line(
    lines: queue.Queue[tuple[float, str]], pattern: re.Pattern[str], timeout_s: float
) -> float:
    """The arrival time of the next line matching ``pattern``."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LibvirtUnavailable(f"no event matching {pattern.pattern!r} in {timeout_s} s")
        try:
            arrived, line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if pattern.search(line):
            return arrived


# --- the measurements --------------------------------------------------------------


def measure_with(daemon: PrivateLibvirtd, guests: int) -> LibvirtAnchors:
    rss_startup = rss_mib(daemon.pid)
    version = daemon.virsh("version").stdout  # the first QEMU question: probes QEMU
    match = re.search(r"Running against daemon: (\S+)|Using library: libvirt (\S+)", version)
    libvirt_version = next((g for g in match.groups() if g), None) if match else None
    time.sleep(2)
    rss_idle = rss_mib(daemon.pid)
    log(f"libvirtd {libvirt_version}: RSS {rss_startup:.1f} MiB started, {rss_idle:.1f} idle")

    create_ms = []
    for i in range(CREATE_SAMPLES):
        name = f"{NAME_PREFIX}-create{i}"
        create_ms.append(daemon.create(name))
        daemon.destroy(name)
    log(f"virsh create: {', '.join(f'{ms:.0f}' for ms in create_ms)} ms")

    crash_ms = []
    with lifecycle_events(daemon) as lines:
        for i in range(CRASH_SAMPLES):
            name = f"{NAME_PREFIX}-crash{i}"
            daemon.create(name)
            # The Started event also proves the event stream is registered.
            wait_line(lines, re.compile(rf"'{name}': Started"), 30)
            time.sleep(1)
            pid = daemon.qemu_pid(name)
            if pid is None:
                raise LibvirtUnavailable(f"no QEMU pid for {name}")
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            stopped = wait_line(lines, re.compile(rf"'{name}': Stopped"), 30)
            crash_ms.append((stopped - killed) * 1000)
            daemon.started_domains.discard(name)
    log(f"crash event: {', '.join(f'{ms:.1f}' for ms in crash_ms)} ms")

    names = [f"{NAME_PREFIX}-{i}" for i in range(guests)]
    for name in names:
        daemon.create(name)
    deadline = time.monotonic() + READY_TIMEOUT_S
    ready = 0
    while time.monotonic() < deadline:
        ready = sum(
            1
            for name in names
            if daemon.serial_log(name).exists()
            and b"KVS-GUEST-READY" in daemon.serial_log(name).read_bytes()
        )
        if ready == guests:
            break
        time.sleep(0.5)
    time.sleep(1)
    rss_guests = rss_mib(daemon.pid)
    running = daemon.virsh("list", "--name").stdout.split()
    log(f"{len(running)} guests running, {ready} booted: RSS {rss_guests:.1f} MiB")
    for name in names:
        daemon.destroy(name)
    return LibvirtAnchors(
        source="measured in this run",
        reason=None if ready == guests else f"only {ready} of {guests} guests booted in time",
        libvirt_version=libvirt_version,
        libvirtd_rss_startup_mib=round(rss_startup, 1),
        libvirtd_rss_idle_mib=round(rss_idle, 1),
        libvirtd_rss_10_guests_mib=round(rss_guests, 1),
        guests=guests,
        guests_ready=ready,
        virsh_create_ms=round(statistics.median(create_ms), 1),
        virsh_create_ms_samples=[round(ms, 1) for ms in create_ms],
        crash_event_ms=round(statistics.median(crash_ms), 1),
        crash_event_ms_samples=[round(ms, 1) for ms in crash_ms],
    )


def measure(guests: int = GUESTS) -> LibvirtAnchors:
    """Measure the anchors now; the labelled fallback if libvirt cannot be made to work."""
    if not (GUEST_DIR / "vmlinuz").exists() or not (GUEST_DIR / "initrd.img").exists():
        return fallback(f"the test guest is missing from {GUEST_DIR}: run `make guest`")
    try:
        ensure_libvirt()
    except LibvirtUnavailable as exc:
        return fallback(str(exc))
    workdir = Path(tempfile.mkdtemp(prefix="kvs-lv-", dir="/tmp"))
    daemon = PrivateLibvirtd(workdir)
    try:
        daemon.start()
        return measure_with(daemon, guests)
    except (LibvirtUnavailable, OSError, subprocess.SubprocessError) as exc:
        return fallback(f"{type(exc).__name__}: {exc}")
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def table(anchors: LibvirtAnchors) -> str:
    def figure(value: float | None, unit: str) -> str:
        return "-" if value is None else f"{value:g} {unit}"

    rows = [
        ("libvirtd RSS, started", figure(anchors.libvirtd_rss_startup_mib, "MiB")),
        ("libvirtd RSS, idle", figure(anchors.libvirtd_rss_idle_mib, "MiB")),
        (
            f"libvirtd RSS, {anchors.guests} guests",
            figure(anchors.libvirtd_rss_10_guests_mib, "MiB"),
        ),
        ("virsh create (median)", figure(anchors.virsh_create_ms, "ms")),
        ("crash event after kill -9 (median)", figure(anchors.crash_event_ms, "ms")),
    ]
    width = max(len(name) for name, _ in rows)
    out = [f"libvirt anchors: {anchors.source}"]
    if anchors.libvirt_version:
        out.append(f"libvirt {anchors.libvirt_version}")
    if anchors.reason:
        out.append(f"note: {anchors.reason}")
    out += [f"  {name:<{width}}  {value}" for name, value in rows]
    if anchors.virsh_create_ms_samples:
        samples = ", ".join(f"{ms:g}" for ms in anchors.virsh_create_ms_samples)
        out.append(f"  virsh create samples (ms): {samples}")
    if anchors.crash_event_ms_samples:
        samples = ", ".join(f"{ms:g}" for ms in anchors.crash_event_ms_samples)
        out.append(f"  crash event samples (ms): {samples}")
    if anchors.guests_ready is not None:
        out.append(f"  guests booted (ready marker seen): {anchors.guests_ready}/{anchors.guests}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--guests", type=int, default=GUESTS, help="guests for the RSS figure")
    args = parser.parse_args(argv)
    try:
        anchors = measure(args.guests)
    except KeyboardInterrupt:  # measure() has cleaned up on the way out
        log("interrupted")
        return 130
    if args.json:
        print(table(anchors), file=sys.stderr)
        print(msgspec.json.encode(anchors).decode())
    else:
        print(table(anchors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
