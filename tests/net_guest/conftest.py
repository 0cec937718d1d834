"""Real test guests with NICs, under a `kvm-supervisor serve` that runs inside a network
namespace the tests create and always delete.

The namespace (``kvs-ng-<random>``) is the host as far as the daemon can tell: bridge
``br0`` with 10.77.0.1/24 is the host's side of the guests' LAN, ``up0`` carries an IPv6
default route (the uplink proxy NDP entries go on) and, for the tests that ask for it
(fixture `with_ovs`), a private Open vSwitch (bridge ``obr0``, userspace datapath) runs
there too. A guest's eth0 is configured from ``kvs_ip=`` on its kernel command line
(tests/guest/init); its serial console is a root shell.

Clean-up, whatever the test did: the daemon, every QEMU of its state dir and Open vSwitch
end by pid; then the namespace, which must hold no process any more, is deleted; the
host's links are what they were (the session fixture of tests/net, imported here).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import GUEST_DIR
from core.conftest import FAST_KERNEL_ARGS, GUEST_MIB, state_dir, wait_for_serial
from engine.conftest import EngineDaemon, kill_qemus_started_in
from helpers import wait_until
from net.conftest import add_ipv6_uplink, host_links, host_links_unchanged, ip, namespace
from net_ovs.conftest import PrivateOVS, running_ovs
from serial_console import SerialConsole, connect_console

from protocols import jsonrpc
from protocols.groups import ungrouped

__all__ = ["host_links_unchanged", "state_dir"]

BRIDGE = "br0"
OVS_BRIDGE = "obr0"
HOST_IP = "10.77.0.1"
#: Jumbo frames on the host's side; guests' NICs without an MTU of their own get it.
BRIDGE_MTU = 9000
#: The guest's shell reads its console: the ready marker, then the prompt.
SHELL_READY = re.compile(rb"KVS-GUEST-READY.*?# ", re.DOTALL)
#: A TCG boot takes seconds on an idle machine; several share two cores here.
BOOT_TIMEOUT_S = 120.0
#: What `ovs-vswitchd` creates for a userspace (netdev) bridge: taps of its own.
_OVS_DEVICES = frozenset({OVS_BRIDGE, "ovs-netdev"})
#: Routes the kernel keeps per device (IPv6 link-local and multicast): they come and
#: go with the device, and with the address autoconfiguration's timing.
_KERNEL_ROUTE = re.compile(r"^(local |multicast |anycast )?(fe80:|ff00::/8)")


def link_names(netns: str) -> set[str]:
    """The names of `netns`'s links."""
    return {link["ifname"] for link in json.loads(ip("-n", netns, "-j", "link", "show"))}


@dataclass(frozen=True)
class NetState:
    """What instances may add to a namespace, as ``ip`` and ``ovs-vsctl`` show it."""

    taps: frozenset[str]
    routes: frozenset[str]
    #: Proxy ARP/NDP entries (``ip neigh show proxy``).
    proxies: frozenset[str]
    ovs_ports: frozenset[str]


@dataclass(frozen=True)
class Lan:
    """The test namespace, and the private Open vSwitch in it if there is one."""

    netns: str
    ovs: PrivateOVS | None = None

    def ip(self, *args: str) -> str:
        return ip("-n", self.netns, *args)

    def cat(self, path: str) -> str:
        """A file as the namespace's processes see it (``/proc/sys/net`` is per namespace)."""
        command = ["ip", "netns", "exec", self.netns, "cat", path]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()

    def state(self) -> NetState:
        links = json.loads(self.ip("-d", "-j", "link", "show"))
        taps = {
            link["ifname"]
            for link in links
            if link.get("linkinfo", {}).get("info_kind") == "tun"
            and link["ifname"] not in _OVS_DEVICES
        }
        routes = {
            line.replace(" linkdown", "").strip()
            for family in ("-4", "-6")
            for line in self.ip(family, "-o", "route", "show", "table", "all").splitlines()
            if not _KERNEL_ROUTE.match(line)
        }
        proxies = {line.strip() for line in self.ip("neigh", "show", "proxy").splitlines()}
        ports = set()
        if self.ovs is not None:
            ports = set(self.ovs.vsctl("--bare", "--columns=name", "list", "Port").split())
        return NetState(frozenset(taps), frozenset(routes), frozenset(proxies), frozenset(ports))

    def assert_only(self, baseline: NetState, running: Iterable[dict[str, Any]] = ()) -> None:
        """The namespace holds `baseline` and, beyond it, only the taps, routes, proxy
        entries and Open vSwitch ports of the `running` instances' NICs (InstanceInfo)."""
        nics = [nic for info in running for nic in info["nics"]]
        taps = {nic["tap"] for nic in nics}
        names = taps | {nic["ip"] for nic in nics if nic["ip"]}
        now = self.state()

        def foreign(extra: frozenset[str]) -> list[str]:
            return sorted(line for line in extra if not names & set(line.split()))

        assert now.taps == baseline.taps | taps
        assert foreign(now.routes - baseline.routes) == []
        assert foreign(now.proxies - baseline.proxies) == []
        assert baseline.routes <= now.routes and baseline.proxies <= now.proxies
        ovs_taps = {nic["tap"] for nic in nics if nic["mode"] == "openvswitch"}
        assert now.ovs_ports == baseline.ovs_ports | ovs_taps

    async def ping(self, address: str) -> None:
        """One ping from the namespace's host side must be answered."""
        command = ["ip", "netns", "exec", self.netns, "ping", "-n", "-c", "1", "-W", "10", address]
        result = await anyio.run_process(command, check=False)
        assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")


@contextmanager
def lan_namespace(*, with_ovs: bool) -> Iterator[Lan]:
    """A fresh namespace set up as the module docstring says, deleted on the way out."""
    before = host_links()
    with namespace("kvs-ng") as netns:
        inside = ("-n", netns)
        ip(*inside, "link", "add", BRIDGE, "type", "bridge")
        ip(*inside, "address", "add", f"{HOST_IP}/24", "dev", BRIDGE)
        # Changed, the MTU is the operator's: a port with a smaller one no longer lowers it.
        ip(*inside, "link", "set", BRIDGE, "mtu", str(BRIDGE_MTU), "up")
        add_ipv6_uplink(netns)
        if not with_ovs:
            yield Lan(netns)
        else:
            with running_ovs(netns) as ovs:
                ovs.vsctl(
                    "add-br", OVS_BRIDGE, "--", "set", "bridge", OVS_BRIDGE, "datapath_type=netdev"
                )
                # ovs-vswitchd creates the bridge's devices when it reads the database.
                wait_until(
                    lambda: link_names(netns) >= _OVS_DEVICES,
                    what=f"ovs-vswitchd creates {sorted(_OVS_DEVICES)} in {netns}",
                    timeout_s=30,
                )
                yield Lan(netns, ovs)
    assert host_links() == before


@contextmanager
def netns_daemon(directory: Path, lan: Lan) -> Iterator[EngineDaemon]:
    """`kvm-supervisor serve` inside `lan`'s namespace, state in `directory`, booting the
    test guest; ended by pid (SIGTERM) with every QEMU it started (SIGKILL) afterwards."""
    daemon = EngineDaemon(directory, prefix=("ip", "netns", "exec", lan.netns))
    extra = {} if lan.ovs is None else {"ovsdb_socket": str(lan.ovs.socket)}
    daemon.write_config(
        stop_timeout_s=30,
        hvparams={
            "kernel_path": str(GUEST_DIR / "vmlinuz"),
            "initrd_path": str(GUEST_DIR / "initrd.img"),
            "kernel_args": FAST_KERNEL_ARGS,
            "serial_console": True,
        },
        **extra,
    )
    try:
        daemon.start()
        yield daemon
    finally:
        try:
            daemon.kill(signal.SIGTERM)
        finally:
            kill_qemus_started_in(directory)


@pytest.fixture
def anyio_backend() -> str:
    """The daemon runs in its own process: the tests' own loop needs one backend only."""
    return "asyncio"


@pytest.fixture
def with_ovs() -> bool:
    """Whether `lan` runs Open vSwitch: a module that needs it overrides this."""
    return False


@pytest.fixture
def lan(with_ovs: bool) -> Iterator[Lan]:
    with lan_namespace(with_ovs=with_ovs) as found:
        yield found


@pytest.fixture
def daemon(state_dir: Path, lan: Lan) -> Iterator[EngineDaemon]:
    with netns_daemon(state_dir, lan) as found:
        yield found


@pytest.fixture
async def client(daemon: EngineDaemon) -> AsyncIterator[jsonrpc.RPCClient]:
    async with jsonrpc.connect_unix(daemon.socket) as found:
        yield found


@contextmanager
def module_lan_daemon(*, with_ovs: bool) -> Iterator[tuple[Lan, EngineDaemon]]:
    """`lan_namespace` and `netns_daemon` for a module's tests to share."""
    directory = Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))
    try:
        with lan_namespace(with_ovs=with_ovs) as found, netns_daemon(directory, found) as daemon:
            yield found, daemon
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- guests --------------------------------------------------------------------------------


def guest(
    name: str, kvs_ip: str | None, *nics: dict[str, Any], vcpus: int = 1, **hvparams: Any
) -> dict[str, Any]:
    """An InstanceSpec (JSON) of the test guest, eth0 configured with `kvs_ip`."""
    kernel_args = FAST_KERNEL_ARGS + (f" kvs_ip={kvs_ip}" if kvs_ip else "")
    return {
        "name": name,
        "memory_mib": GUEST_MIB,
        "vcpus": vcpus,
        "nics": list(nics),
        "hvparams": {"kernel_args": kernel_args, **hvparams},
    }


async def start_all(
    client: jsonrpc.RPCClient, *specs: dict[str, Any], paused: bool = False
) -> list[dict[str, Any]]:
    """Start every spec at once (their boots overlap); their InstanceInfo, in order."""
    infos: dict[int, dict[str, Any]] = {}

    async def start(index: int, spec: dict[str, Any]) -> None:
        infos[index] = await client.call("instance.start", {"spec": spec, "paused": paused})

    with ungrouped():
        async with anyio.create_task_group() as group:
            for index, spec in enumerate(specs):
                group.start_soon(start, index, spec)
    return [infos[index] for index in range(len(specs))]


def _serial_tail(info: dict[str, Any]) -> Callable[[], str]:
    def tail() -> str:
        try:
            text = Path(info["serial_log"]).read_text(errors="replace")
        except OSError:
            return ""
        return f"serial log of {info['name']} (end):\n{text[-3000:]}"

    return tail


@asynccontextmanager
async def consoles(*infos: dict[str, Any]) -> AsyncIterator[list[SerialConsole]]:
    """The serial consoles of booted guests, once each guest's shell reads its console."""
    async with AsyncExitStack() as stack:
        found = []
        for info in infos:
            await wait_for_serial(Path(info["serial_log"]), SHELL_READY, BOOT_TIMEOUT_S)
            path = info["console"]["socket"]
            found.append(await stack.enter_async_context(connect_console(path, _serial_tail(info))))
        yield found


async def next_state(
    client: jsonrpc.RPCClient, name: str, states: set[str], timeout_s: float = 60
) -> dict[str, Any]:
    """The data of the next ``instance.state`` event of `name` into one of `states`
    (subscribe with `subscribe_states` before causing it)."""
    with anyio.fail_after(timeout_s):
        async for notification in client.notifications():
            params = notification.params
            if params["instance"] == name and params["data"]["state"] in states:
                data: dict[str, Any] = params["data"]
                return data
    raise AssertionError("the event stream ended")


async def subscribe_states(client: jsonrpc.RPCClient, name: str) -> None:
    await client.call("events.subscribe", {"instances": [name], "kinds": ["instance.state"]})
