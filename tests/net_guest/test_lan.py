"""Bridged and routed guests on one daemon: they reach each other and the host's side of
the namespace, with the MTU and the queues their NICs say; a routed guest's route goes
when it stops.

The three guests boot once for the module, at the same time: ``a`` and ``b`` on bridge
br0, ``c`` routed. The tests read them (the last one stops ``c``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from engine.conftest import EngineDaemon

from protocols import jsonrpc

from .conftest import BRIDGE_MTU, HOST_IP, Lan, NetState, consoles, guest, module_lan_daemon

pytestmark = [pytest.mark.guest, pytest.mark.netns, pytest.mark.anyio]

A_IP, B_IP, C_IP = "10.77.0.2", "10.77.0.3", "10.78.0.2"
MTU = 1400
QUEUES = 4
SPECS = (
    guest("a", f"{A_IP}/24", {"mode": "bridged", "link": "br0", "mtu": MTU}),
    # The guest's virtio_net uses one queue pair per vCPU, up to the device's: four
    # queues show only with four vCPUs.
    guest(
        "b",
        f"{B_IP}/24",
        {"mode": "bridged", "link": "br0"},
        vcpus=QUEUES,
        virtio_net_queues=QUEUES,
    ),
    # A routed guest owns its address alone (/32); its default route goes out of eth0,
    # where the host answers ARP (see `guest_routes_via_eth0`).
    guest("c", f"{C_IP}/32", {"mode": "routed", "ip": C_IP}),
)


@dataclass(frozen=True)
class LanGuests:
    lan: Lan
    daemon: EngineDaemon
    #: The namespace before any guest started.
    baseline: NetState
    infos: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def lan_guests() -> Iterator[LanGuests]:
    with module_lan_daemon(with_ovs=False) as (lan, daemon):
        baseline = lan.state()
        # Each start returns once QEMU runs: the boots overlap.
        infos = {spec["name"]: daemon.call("instance.start", spec=spec) for spec in SPECS}
        yield LanGuests(lan, daemon, baseline, infos)


def test_instance_info_lists_the_nics(lan_guests: LanGuests) -> None:
    infos = lan_guests.infos
    [a_nic], [b_nic], [c_nic] = (infos[name]["nics"] for name in "abc")
    assert (a_nic["mode"], a_nic["link"], a_nic["mtu"]) == ("bridged", "br0", MTU)
    assert (b_nic["mode"], b_nic["link"], b_nic["mtu"]) == ("bridged", "br0", None)
    assert (c_nic["mode"], c_nic["ip"]) == ("routed", C_IP)
    taps = [nic["tap"] for nic in (a_nic, b_nic, c_nic)]
    assert len(set(taps)) == 3 and all(0 < len(tap.encode()) <= 15 for tap in taps)
    assert len({nic["mac"] for nic in (a_nic, b_nic, c_nic)}) == 3
    lan_guests.lan.assert_only(lan_guests.baseline, infos.values())
    assert lan_guests.lan.ip("-o", "link", "show", "master", "br0").count("master br0") == 2


async def test_bridged_guests_ping_each_other(lan_guests: LanGuests) -> None:
    infos = lan_guests.infos
    async with consoles(infos["a"], infos["b"]) as (a, b):
        await a.run(f"ping -c 1 -W 10 {B_IP}")
        await b.run(f"ping -c 1 -W 10 {A_IP}")


async def test_host_side_pings_bridged_guests(lan_guests: LanGuests) -> None:
    infos = lan_guests.infos
    async with consoles(infos["a"], infos["b"]) as (a, _):
        for address in (A_IP, B_IP):
            await lan_guests.lan.ping(address)
        await a.run(f"ping -c 1 -W 10 {HOST_IP}")


async def test_nic_mtu_is_what_the_guest_sees(lan_guests: LanGuests) -> None:
    infos = lan_guests.infos
    [a_nic], [b_nic] = infos["a"]["nics"], infos["b"]["nics"]
    assert f" mtu {MTU} " in lan_guests.lan.ip("link", "show", a_nic["tap"])
    # Without an MTU of its own, a port takes the bridge's.
    assert f" mtu {BRIDGE_MTU} " in lan_guests.lan.ip("link", "show", b_nic["tap"])
    async with consoles(infos["a"], infos["b"]) as (a, b):
        assert re.search(rf"^{MTU}\r?$", await a.run("cat /sys/class/net/eth0/mtu"), re.M)
        assert re.search(r"^1500\r?$", await b.run("cat /sys/class/net/eth0/mtu"), re.M)
        # Full-size frames of 1400 bytes pass unfragmented between the two.
        await a.run(f"ping -c 1 -W 10 -s {MTU - 28} {B_IP}")


async def test_four_queues_the_guest_sees(lan_guests: LanGuests) -> None:
    [b_nic] = lan_guests.infos["b"]["nics"]
    async with consoles(lan_guests.infos["b"]) as (b,):
        listed = set((await b.run("ls /sys/class/net/eth0/queues")).split())
    wanted = {f"{kind}-{queue}" for kind in ("rx", "tx") for queue in range(QUEUES)}
    assert wanted <= listed and not {f"rx-{QUEUES}", f"tx-{QUEUES}"} & listed, listed
    # QEMU attaches a tap queue when the guest's driver enables its queue pair.
    details = lan_guests.lan.ip("-d", "link", "show", b_nic["tap"])
    assert f"multi_queue numqueues {QUEUES}" in details, details


async def guest_routes_via_eth0(console: Any) -> None:
    """The routed guest's default route: out of eth0, on-link (the host proxies ARP)."""
    await console.run("ip route replace default dev eth0")


async def test_routed_guest_answers_the_host_side(lan_guests: LanGuests) -> None:
    lan = lan_guests.lan
    [c_nic] = lan_guests.infos["c"]["nics"]
    tap = c_nic["tap"]
    assert lan.ip("route", "show", C_IP).split()[:3] == [C_IP, "dev", tap]
    for setting in ("proxy_arp", "forwarding"):
        sysctl = f"/proc/sys/net/ipv4/conf/{tap}/{setting}"
        shown = lan.cat(sysctl)
        assert shown == "1", f"{sysctl}: {shown}"
    async with consoles(lan_guests.infos["c"]) as (c,):
        await guest_routes_via_eth0(c)
        await lan.ping(C_IP)


async def test_routed_route_gone_after_stop(lan_guests: LanGuests) -> None:
    lan, infos = lan_guests.lan, lan_guests.infos
    [c_nic] = infos["c"]["nics"]
    async with jsonrpc.connect_unix(lan_guests.daemon.socket) as client:
        stopped = await client.call("instance.stop", {"name": "c"})
    assert stopped["state"] == "stopped"
    assert lan.ip("route", "show", C_IP) == ""
    assert c_nic["tap"] not in lan.ip("-o", "link")
    lan.assert_only(lan_guests.baseline, [infos["a"], infos["b"]])
