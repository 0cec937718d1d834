"""A real two-node Ganeti 3.0 cluster on kvm-supervisor (the tests' fixture, the benchmark).

Ganeti's virtual-cluster mode (vcluster: every node's files under a root directory of
its own, ``GANETI_ROOTDIR``/``GANETI_HOSTNAME``) runs two nodes on this host, inside a
network namespace the fixture creates: only ``lo``, the node and cluster addresses on
it, a bridge both nodes share, no route out (``gnt-cluster init`` refuses a cluster IP
that answers, and this host's network answers any off-host address). One long-lived
process (the holder) keeps the namespace and a mount namespace in which temp files are
bind-mounted over ``/etc/hosts``, ``/etc/resolv.conf`` and ``/etc/ssh/ssh_config`` (the
key Ganeti's ssh uses), a tmpfs over ``/run`` (sshd's ``/run/sshd``), a sysfs of the
namespace over ``/sys`` (Ganeti checks bridges in ``/sys/class/net``) and a temp dir over
``/srv`` (Ganeti's OS search path starts at ``/srv/ganeti/os``: a trivial OS lives
there). Every command runs in both namespaces through ``nsenter``.

Each node gets its own kvm-supervisor daemon (own state dir and socket, the test guest's
kernel as default) and the driver through `kvm-supervisor ganeti-install`, before
``gnt-cluster init`` and ``gnt-node add`` start Ganeti's daemons. At the end every
process in the namespace is killed by pid (all of them are ours: the namespace is), the
holder ends, the namespaces go with it, the temp dir is removed; the host's Ganeti
directories must come out as they went in. ``tests/bench/bench_ganeti.py`` also runs the
cluster on Ganeti's own KVM driver: `VirtualCluster.uninstall_drivers` and
`VirtualCluster.restart_ganeti` switch it over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import GUEST_DIR, REPO
from helpers import wait_gone, wait_until

from supervisor.ganeti.rpc import DaemonClient, DaemonUnreachable

NODES = ("node1", "node2")
NODE_IPS = {"node1": "192.0.2.10", "node2": "192.0.2.11"}
CLUSTER_NAME = "cluster"
CLUSTER_IP = "192.0.2.1"
#: Shared by both nodes (they share the namespace): a bridge "both hosts" reach.
BRIDGE = "gnt-br0"
OS_NAME = "noop"
#: Boots the test guest quickly under TCG (tests/core/conftest.py's FAST_KERNEL_ARGS).
KERNEL_ARGS = "quiet tsc=reliable no_timer_check mitigations=off"
GANETI_TOOLS = Path("/usr/lib/ganeti/tools")
DAEMON_UTIL = Path("/usr/lib/ganeti/daemon-util")
#: Host paths of Ganeti's own that a virtual cluster must leave as they were.
HOST_GANETI_PATHS = (
    "/etc/ganeti",
    "/var/lib/ganeti",
    "/var/log/ganeti",
    "/run/ganeti",
    "/var/run/ganeti",
    "/srv",
    "/root/.ssh",
    "/etc/hosts",
)
COMMAND_TIMEOUT_S = 300
GUEST_MIB = 96
#: A guest boots in seconds under TCG; the machine may be shared with other test runs.
BOOT_TIMEOUT_S = 120.0
_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _host_state() -> dict[str, Any]:
    """What the host's Ganeti paths hold: names and sizes (the files' content for files)."""
    state: dict[str, Any] = {}
    for name in HOST_GANETI_PATHS:
        path = Path(name)
        if path.is_file():
            state[name] = path.read_bytes()
        elif path.is_dir():
            state[name] = sorted(
                (str(entry.relative_to(path)), entry.is_dir()) for entry in path.rglob("*")
            )
        else:
            state[name] = None
    return state


def _net_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


@dataclass
class VirtualCluster:
    """The running cluster: its directory, the namespace holder and each node's daemon."""

    base: Path
    holder: subprocess.Popen[bytes]
    #: The network namespace (``net:[inode]``), noted once the holder runs: it identifies
    #: the cluster's processes even after the holder is gone.
    namespace: str | None = None
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sshd: subprocess.Popen[bytes] | None = None
    setup_seconds: float = 0.0

    # -- paths ------------------------------------------------------------------------

    def root(self, node: str) -> Path:
        return self.base / "vc" / node

    def daemon_config(self, node: str) -> Path:
        return self.root(node) / "etc" / "kvm-supervisor" / "supervisor.toml"

    def state_dir(self, node: str) -> Path:
        return self.root(node) / "var" / "lib" / "kvm-supervisor"

    def socket(self, node: str) -> Path:
        return self.state_dir(node) / "control.sock"

    # -- commands ---------------------------------------------------------------------

    def inside(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in the cluster's network and mount namespaces."""
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-m", "--", *argv]

    def ganeti_env(self, node: str) -> dict[str, str]:
        """A clean environment on `node`, as an administrator's shell there has."""
        return {
            "PATH": _PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "GANETI_ROOTDIR": str(self.root(node)),
            "GANETI_HOSTNAME": node,
        }

    def run(
        self,
        argv: Sequence[str],
        *,
        node: str = "node1",
        check: bool = True,
        input: str | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on `node` (Ganeti's environment, inside the namespaces)."""
        result = subprocess.run(
            self.inside(argv),
            env=self.ganeti_env(node),
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} on {node} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def gnt(self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S) -> str:
        """A ``gnt-*`` command on the master (node1); its stdout."""
        return self.run(argv, check=check, timeout=timeout).stdout

    # -- kvm-supervisor daemons -------------------------------------------------------

    def call(self, node: str, method: str, params: dict[str, Any] | None = None) -> Any:
        """One request to `node`'s daemon."""
        with DaemonClient(str(self.socket(node))) as daemon:
            return daemon.call(method, params)

    def start_daemon(self, node: str) -> subprocess.Popen[bytes]:
        """Start `node`'s kvm-supervisor inside the namespaces; returns once it answers."""
        log = (self.base / f"{node}-kvm-supervisor.log").open("ab")
        try:
            proc = subprocess.Popen(
                self.inside(
                    [
                        sys.executable,
                        "-m",
                        "supervisor",
                        "serve",
                        "--config",
                        str(self.daemon_config(node)),
                    ]
                ),
                env={**self.ganeti_env(node), "PYTHONPATH": str(REPO)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        self.daemons[node] = proc
        return proc

    def wait_daemon(self, node: str) -> None:
        proc = self.daemons[node]

        def answers() -> bool:
            if proc.poll() is not None:
                log = (self.base / f"{node}-kvm-supervisor.log").read_text(errors="replace")
                raise RuntimeError(f"{node}'s kvm-supervisor exited {proc.returncode}:\n{log}")
            try:
                self.call(node, "supervisor.ping")
            except DaemonUnreachable:
                return False
            return True

        wait_until(answers, what=f"{node}'s kvm-supervisor answers", timeout_s=60)

    def kill_daemon(self, node: str) -> None:
        """SIGKILL `node`'s daemon (its VMs keep running) and reap it."""
        proc = self.daemons.pop(node)
        proc.kill()
        proc.wait(timeout=30)

    # -- the driver -------------------------------------------------------------------

    def _supervisor_cli(self, node: str, verb: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "supervisor", "--config", str(self.daemon_config(node))]
        return subprocess.Popen(
            [*command, verb],
            env={**self.ganeti_env(node), "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def _on_every_node(self, verb: str) -> None:
        """``kvm-supervisor <verb>`` on every node, at once, as its documentation says."""
        runs = [self._supervisor_cli(node, verb) for node in NODES]
        for run in runs:
            _, err = run.communicate(timeout=120)
            if run.returncode != 0:
                raise RuntimeError(f"kvm-supervisor {verb} exited {run.returncode}: {err.decode()}")

    def install_drivers(self) -> None:
        """`kvm-supervisor ganeti-install` on every node (Ganeti's daemons started after
        it, or restarted, use the driver)."""
        self._on_every_node("ganeti-install")

    def uninstall_drivers(self) -> None:
        """`kvm-supervisor ganeti-uninstall` on every node: Ganeti's own KVM driver again,
        once Ganeti's daemons are restarted."""
        self._on_every_node("ganeti-uninstall")

    def restart_ganeti(self) -> None:
        """Restart every Ganeti daemon of both nodes through daemon-util, which reads the
        node's ``etc/default/ganeti`` (where the driver's installation exports the hook);
        returns once each is ready. They all stop at once (each takes seconds to); the
        master starts last, as it asks the other nodes to vote for it."""
        daemon_util = str(DAEMON_UTIL)
        stops = [
            (
                node,
                daemon,
                subprocess.Popen(
                    self.inside([daemon_util, "stop", daemon]),
                    env=self.ganeti_env(node),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                ),
            )
            for node in NODES
            for daemon in self.run([daemon_util, "list-stop-daemons"], node=node).stdout.split()
        ]
        for node, daemon, stop in stops:
            _, err = stop.communicate(timeout=COMMAND_TIMEOUT_S)
            if stop.returncode != 0:
                raise RuntimeError(f"stopping {daemon} on {node} failed: {err.decode()}")
        for node in reversed(NODES):
            self.run([daemon_util, "start-all"], node=node)

    # -- instances --------------------------------------------------------------------

    def serial_log(self, node: str, instance: str) -> Path:
        """The instance's serial log, as its node's daemon names it."""
        info = self.call(node, "instance.info", {"name": instance})
        return Path(info["serial_log"])

    def add_instance(self, name: str, node: str, *options: str) -> None:
        """``gnt-instance add`` of a diskless test guest (one NIC on the bridge) on `node`."""
        self.gnt(
            "gnt-instance", "add", "-t", "diskless", "-o", OS_NAME, "--no-name-check",
            "--no-ip-check", "-B", f"maxmem={GUEST_MIB},minmem={GUEST_MIB},vcpus=1",
            "-n", node, *options, name,
        )  # fmt: skip

    def remove_instance(self, name: str) -> None:
        self.gnt("gnt-instance", "remove", "-f", "--shutdown-timeout=0", name)

    def wait_serial(
        self, node: str, name: str, marker: bytes = b"KVS-HEARTBEAT", offset: int = 0
    ) -> Path:
        """Wait for `marker` in the serial log `node`'s daemon names, after `offset`."""
        log = self.serial_log(node, name)
        wait_until(
            lambda: shows_after(log, marker, offset),
            what=f"{marker!r} of {name} in {log}",
            timeout_s=BOOT_TIMEOUT_S,
        )
        return log

    def status(self, name: str) -> list[str]:
        """``name status oper_ram oper_vcpus pnode`` as ``gnt-instance list`` shows them."""
        out = self.gnt(
            "gnt-instance", "list", "--no-headers", "--units=m", "-o",
            "name,status,oper_ram,oper_vcpus,pnode", name,
        )  # fmt: skip
        return out.split()

    def qemu_pid(self, node: str, name: str) -> int:
        pid = self.call(node, "instance.info", {"name": name})["pid"]
        assert isinstance(pid, int)
        return pid

    def processes(self) -> list[int]:
        """Every process in the cluster's network namespace but the holder."""
        found = []
        for entry in Path("/proc").iterdir():
            if (
                entry.name.isdigit()
                and int(entry.name) != self.holder.pid
                and self.namespace is not None
                and _net_namespace(int(entry.name)) == self.namespace
            ):
                found.append(int(entry.name))
        return found


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _prepare_files(base: Path) -> None:
    """The files bind-mounted in the namespace, sshd's config and key, the trivial OS."""
    etc = base / "etc"
    hosts = ["127.0.0.1 localhost", f"{CLUSTER_IP} {CLUSTER_NAME}"]
    hosts += [f"{ip} {node}" for node, ip in NODE_IPS.items()]
    _write(etc / "hosts", "\n".join(hosts) + "\n")
    _write(etc / "resolv.conf", "")
    ssh = base / "ssh"
    ssh.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "id_ed25519")],
        check=True,
        timeout=30,
    )
    shutil.copy(ssh / "id_ed25519.pub", ssh / "authorized_keys")
    _write(
        etc / "ssh_config", f"Host *\n    IdentityFile {ssh / 'id_ed25519'}\n    BatchMode yes\n"
    )
    # Only the RSA host key: `gnt-cluster init` records the host's RSA key in Ganeti's
    # known_hosts, and Ganeti's ssh checks the host against that file.
    listen = "".join(f"ListenAddress {ip}\n" for ip in NODE_IPS.values())
    _write(
        ssh / "sshd_config",
        f"{listen}HostKey /etc/ssh/ssh_host_rsa_key\nPidFile {ssh / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n",
    )
    os_dir = base / "srv" / "ganeti" / "os" / OS_NAME
    _write(os_dir / "ganeti_api_version", "20\n")
    _write(os_dir / "parameters.list", "")
    for script in ("create", "export", "import", "rename", "verify"):
        _write(os_dir / script, "#!/bin/sh\nexit 0\n", 0o755)
    for directory in (os_dir, *os_dir.relative_to(base).parents):
        (base / directory).chmod(0o755)


def _namespace_script(base: Path) -> str:
    etc = base / "etc"
    addresses = [f"ip addr add {ip}/32 dev lo" for ip in NODE_IPS.values()]
    return "\n".join(
        [
            "set -e",
            f"mount --bind {etc / 'hosts'} /etc/hosts",
            f"mount --bind {etc / 'resolv.conf'} /etc/resolv.conf",
            f"mount --bind {etc / 'ssh_config'} /etc/ssh/ssh_config",
            "mount -t tmpfs -o mode=0755 tmpfs /run",
            "mkdir -p /run/sshd",
            "mount -t sysfs sysfs /sys",
            f"mount --bind {base / 'srv'} /srv",
            "ip link set lo up",
            *addresses,
            f"ip link add {BRIDGE} type bridge",
            f"ip link set {BRIDGE} up",
        ]
    )


def _daemon_config(cluster: VirtualCluster, node: str) -> str:
    state = cluster.state_dir(node)
    return (
        f'state_dir = "{state}"\n'
        f'instances_dir = "{cluster.root(node) / "etc" / "kvm-supervisor" / "instances"}"\n'
        "stop_timeout_s = 30.0\n"
        "[hvparams]\n"
        f'kernel_path = "{GUEST_DIR / "vmlinuz"}"\n'
        f'initrd_path = "{GUEST_DIR / "initrd.img"}"\n'
        f'kernel_args = "{KERNEL_ARGS}"\n'
    )


def _sshd_listens(proc: subprocess.Popen[bytes]) -> bool:
    """Whether sshd listens on port 22 (its namespace's /proc/PID/net/tcp, state 0A)."""
    if proc.poll() is not None:
        raise RuntimeError(f"sshd exited {proc.returncode}")
    with open(f"/proc/{proc.pid}/net/tcp") as table:
        listening = [line.split() for line in table if " 0A " in line]
    return sum(1 for fields in listening if fields[1].endswith(":0016")) >= len(NODE_IPS)


def _end_everything(cluster: VirtualCluster) -> None:
    """Kill every process in the namespace by pid, then let the holder go."""
    for _ in range(5):  # a dying parent may still fork (Ganeti's job processes)
        pids = cluster.processes()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            wait_gone(pid)
    for proc in [*cluster.daemons.values(), cluster.sshd]:
        if proc is not None:
            proc.wait(timeout=30)
    if cluster.holder.stdin is not None:
        cluster.holder.stdin.close()
    cluster.holder.wait(timeout=30)


def _vcluster_setup(cluster: VirtualCluster) -> None:
    """Ganeti's per-node directories (no /etc/hosts, no addresses: done already)."""
    (cluster.base / "vc").mkdir(mode=0o755)
    setup = [str(GANETI_TOOLS / "vcluster-setup"), "-E", "-N", "-c", str(len(NODES))]
    setup += ["-i", "0", "-p", "192.0.2", "-n", "lo", str(cluster.base / "vc")]
    subprocess.run(cluster.inside(setup), check=True, capture_output=True, timeout=60)


def _start_sshd(cluster: VirtualCluster) -> None:
    config = cluster.base / "ssh" / "sshd_config"
    with (cluster.base / "sshd.log").open("wb") as log:
        cluster.sshd = subprocess.Popen(
            cluster.inside(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _init_cluster(cluster: VirtualCluster) -> None:
    hvparams = (
        f"kvm:kernel_path={GUEST_DIR / 'vmlinuz'},initrd_path={GUEST_DIR / 'initrd.img'},"
        f"kernel_args={KERNEL_ARGS}"
    )
    # The instance policy admits the test guest's 96 MiB.
    bounds = (
        "min:disk-size=0,cpu-count=1,disk-count=0,memory-size=1,nic-count=0,spindle-use=0"
        "/max:disk-size=1048576,cpu-count=8,disk-count=16,memory-size=32768,nic-count=8,"
        "spindle-use=12"
    )
    cluster.gnt(
        "gnt-cluster", "init", "--no-etc-hosts", "--no-ssh-init", "--master-netdev=lo",
        "--enabled-disk-templates=diskless", "--enabled-hypervisors=kvm", "-H", hvparams,
        "-N", f"link={BRIDGE}", f"--ipolicy-bounds-specs={bounds}", CLUSTER_NAME,
    )  # fmt: skip
    for node in NODES[1:]:
        cluster.gnt("gnt-node", "add", "--no-ssh-key-check", node)


def missing_requirements() -> str | None:
    """What the cluster needs and this host lacks, as a sentence; None when nothing."""
    for tool in ("/usr/sbin/gnt-cluster", "/usr/sbin/sshd", str(GANETI_TOOLS / "vcluster-setup")):
        if not Path(tool).exists():
            return f"{tool} is missing: run `make deps` (Ganeti 3.0 and openssh-server)"
    if not (GUEST_DIR / "vmlinuz").exists():
        return "the test guest is missing: run `make guest`"
    return None


@contextlib.contextmanager
def virtual_cluster() -> Iterator[VirtualCluster]:
    """The two-node cluster, master node1, both nodes vm-capable, the driver installed;
    everything of it gone at the end (AssertionError if the host's Ganeti files changed)."""
    host_before = _host_state()
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="kvsg-", dir="/tmp"))
    base.chmod(0o755)  # Ganeti's daemons run as its own users
    # The holder: `cat` ends when its stdin closes, also when its parent dies; in a
    # session of its own, so that a Ctrl-C ends the run, which cleans up, not the holder.
    holder = subprocess.Popen(
        ["unshare", "--net", "--mount", "--propagation", "private", "--", "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    cluster = VirtualCluster(base=base, holder=holder)
    try:
        own = _net_namespace(os.getpid())
        cluster.namespace = wait_until(
            lambda: (namespace := _net_namespace(holder.pid)) != own and namespace,
            what="the namespace holder runs",
            timeout_s=30,
        )
        _prepare_files(base)
        script = _namespace_script(base)
        subprocess.run(cluster.inside(["sh", "-c", script]), check=True, timeout=60)
        _vcluster_setup(cluster)
        _start_sshd(cluster)
        for node in NODES:
            _write(cluster.daemon_config(node), _daemon_config(cluster, node))
            cluster.start_daemon(node)
        cluster.install_drivers()
        for node in NODES:
            cluster.wait_daemon(node)
        sshd = cluster.sshd
        assert sshd is not None
        wait_until(lambda: _sshd_listens(sshd), what="sshd listens", timeout_s=30)
        _init_cluster(cluster)
        cluster.setup_seconds = time.monotonic() - started
        yield cluster
    finally:
        _end_everything(cluster)
        shutil.rmtree(base, ignore_errors=True)
        assert _host_state() == host_before, "the virtual cluster changed the host's Ganeti files"


def shows_after(log: Path, marker: bytes, offset: int) -> bool:
    """Whether `marker` was written to `log` after `offset`."""
    try:
        with log.open("rb") as file:
            file.seek(offset)
            return marker in file.read()
    except FileNotFoundError:
        return False
