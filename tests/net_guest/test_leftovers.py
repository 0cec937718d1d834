"""However an instance's QEMU ends — killed, stopped, cleaned up, a start that fails half
way, the daemon killed and restarted around it — the namespace keeps no tap, route, proxy
entry or Open vSwitch port of it, and keeps those of the instance still running next to
it (the bystander).

Both instances have a NIC of every kind: bridged, routed IPv4, routed IPv6 (a proxy NDP
entry on the uplink) and Open vSwitch with a VLAN tag. Most start paused: no guest code
runs, the host's side of their NICs is set up all the same.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from engine.conftest import EngineDaemon, qemus_started_in
from helpers import kill_if_started_in, wait_gone

from protocols import jsonrpc

from .conftest import (
    BRIDGE,
    OVS_BRIDGE,
    Lan,
    NetState,
    consoles,
    guest,
    next_state,
    start_all,
    subscribe_states,
)

pytestmark = [pytest.mark.guest, pytest.mark.netns, pytest.mark.anyio]

BYSTANDER, VICTIM = 10, 20


@pytest.fixture
def with_ovs() -> bool:
    return True


def every_mode(host: int) -> list[dict[str, Any]]:
    """One NIC of each kind; `host` makes the addresses the instance's own."""
    return [
        {"mode": "bridged", "link": BRIDGE},
        {"mode": "routed", "ip": f"10.78.0.{host}"},
        {"mode": "routed", "ip": f"fd00:78::{host}"},
        {"mode": "openvswitch", "link": OVS_BRIDGE, "vlan": 10},
    ]


def assert_set_up(state: NetState, info: dict[str, Any]) -> None:
    """The routes, the proxy NDP entry and the Open vSwitch port of `info`'s NICs are there."""
    routed4, routed6, ovs = info["nics"][1:]
    for nic in (routed4, routed6):
        assert any(line.startswith(f"{nic['ip']} dev {nic['tap']} ") for line in state.routes)
    assert any(line.startswith(f"{routed6['ip']} dev up0 ") for line in state.proxies)
    assert ovs["tap"] in state.ovs_ports


async def start_bystander(lan: Lan, client: jsonrpc.RPCClient) -> tuple[NetState, dict[str, Any]]:
    """The namespace before any instance, and the bystander's InstanceInfo."""
    baseline = lan.state()
    [bystander] = await start_all(
        client, guest("bystander", None, *every_mode(BYSTANDER)), paused=True
    )
    lan.assert_only(baseline, [bystander])
    assert_set_up(lan.state(), bystander)
    return baseline, bystander


async def start_pair(
    lan: Lan, client: jsonrpc.RPCClient, *, victim_paused: bool = True
) -> tuple[NetState, dict[str, Any], dict[str, Any]]:
    """`start_bystander`, then the victim (eth0 on br0 at 10.77.0.20); its InstanceInfo."""
    baseline, bystander = await start_bystander(lan, client)
    [victim] = await start_all(
        client,
        guest("victim", f"10.77.0.{VICTIM}/24", *every_mode(VICTIM)),
        paused=victim_paused,
    )
    lan.assert_only(baseline, [bystander, victim])
    assert_set_up(lan.state(), victim)
    return baseline, bystander, victim


async def kill_qemu(
    daemon: EngineDaemon, client: jsonrpc.RPCClient, victim: dict[str, Any]
) -> None:
    await subscribe_states(client, "victim")
    assert kill_if_started_in(victim["pid"], daemon.state_dir)
    await next_state(client, "victim", {"crashed"})


async def stop(daemon: EngineDaemon, client: jsonrpc.RPCClient, victim: dict[str, Any]) -> None:
    stopped = await client.call("instance.stop", {"name": "victim", "force": True})
    assert stopped["state"] == "stopped"


async def stop_and_clean_up(
    daemon: EngineDaemon, client: jsonrpc.RPCClient, victim: dict[str, Any]
) -> None:
    await stop(daemon, client, victim)
    assert await client.call("instance.cleanup", {"name": "victim"}) == {}
    listed = await client.call("instance.list")
    assert "victim" not in [item["name"] for item in listed]


Ending = Callable[[EngineDaemon, jsonrpc.RPCClient, dict[str, Any]], Awaitable[None]]


@pytest.mark.parametrize("end", [kill_qemu, stop, stop_and_clean_up], ids=lambda f: f.__name__)
async def test_an_ended_instance_leaves_nothing(
    lan: Lan, daemon: EngineDaemon, client: jsonrpc.RPCClient, end: Ending
) -> None:
    baseline, bystander, victim = await start_pair(lan, client)
    await end(daemon, client, victim)
    lan.assert_only(baseline, [bystander])


async def test_a_failed_start_rolls_back_the_nics_it_set_up(
    lan: Lan, daemon: EngineDaemon, client: jsonrpc.RPCClient
) -> None:
    baseline, bystander = await start_bystander(lan, client)
    # The last NIC fails in set-up, once QEMU holds the taps and the NICs before it are
    # set up: a tap's MTU cannot exceed 65521 (65535 less the Ethernet header), which
    # the spec's range (up to 65535) lets through.
    nics = [*every_mode(30), {"mode": "bridged", "link": BRIDGE, "mtu": 65535}]
    with pytest.raises(jsonrpc.RPCError) as failed:
        await client.call("instance.start", {"spec": guest("broken", None, *nics), "paused": True})
    assert failed.value.code == jsonrpc.ErrorCode.NETWORK_ERROR, failed.value
    assert failed.value.data["interface"].startswith("kvs"), failed.value.data
    lan.assert_only(baseline, [bystander])
    assert list(qemus_started_in(daemon.state_dir)) == [bystander["pid"]]


async def test_daemon_killed_and_restarted_adopts_the_nics(
    lan: Lan, daemon: EngineDaemon, client: jsonrpc.RPCClient
) -> None:
    baseline, bystander, victim = await start_pair(lan, client, victim_paused=False)
    victim_ip = f"10.77.0.{VICTIM}"
    async with consoles(victim):
        await lan.ping(victim_ip)

    daemon.kill(signal.SIGKILL)
    await anyio.to_thread.run_sync(daemon.start)
    # The adoption finishes in the background: `starting` until the monitor answers.
    await anyio.to_thread.run_sync(daemon.settled)
    async with jsonrpc.connect_unix(daemon.socket) as again:
        adopted = await again.call("instance.info", {"name": "victim"})
        assert (adopted["state"], adopted["pid"]) == ("running", victim["pid"])
        assert adopted["nics"] == victim["nics"]
        lan.assert_only(baseline, [bystander, victim])
        # Still networked: the guest answers on its bridged NIC.
        await lan.ping(victim_ip)

        stopped = await again.call("instance.stop", {"name": "victim", "force": True})
        assert stopped["state"] == "stopped"
    lan.assert_only(baseline, [bystander])


async def test_qemu_gone_while_the_daemon_was_down_leaves_nothing(
    lan: Lan, daemon: EngineDaemon, client: jsonrpc.RPCClient
) -> None:
    baseline, bystander, victim = await start_pair(lan, client)
    daemon.kill(signal.SIGKILL)
    assert kill_if_started_in(victim["pid"], daemon.state_dir)
    wait_gone(victim["pid"])
    # The kernel took the taps with QEMU; routes went with them. Left: what outlives a
    # tap (the proxy NDP entry, the Open vSwitch port), for the adoption to remove.
    await anyio.to_thread.run_sync(daemon.start)
    listed = await anyio.to_thread.run_sync(daemon.settled)
    states = {item["name"]: item["state"] for item in listed}
    assert states == {"bystander": "paused", "victim": "stopped"}
    lan.assert_only(baseline, [bystander])


async def test_a_start_with_nics_cut_short_by_a_daemon_kill_is_finished_after_restart(
    lan: Lan, daemon: EngineDaemon
) -> None:
    """The daemon dies (SIGKILL, crash_daemon.py) once the NICs are up and before `cont`;
    the next daemon finishes the start (the set-up runs again: idempotent) and, at stop,
    leaves nothing."""
    baseline = lan.state()
    daemon.kill(signal.SIGKILL)
    await anyio.to_thread.run_sync(lambda: daemon.start(crash_at="startup-steps"))
    spec = guest(
        "cut",
        None,
        {"mode": "bridged", "link": BRIDGE},
        {"mode": "routed", "ip": "10.78.0.30"},
    )
    with daemon.connect() as sock:
        daemon.send(sock, "instance.start", spec=spec, paused=True)
        with pytest.raises(ConnectionError):
            daemon.replies(sock, 1)
    daemon.kill(signal.SIGKILL)
    (pid,) = qemus_started_in(daemon.state_dir)

    await anyio.to_thread.run_sync(daemon.start)
    (item,) = await anyio.to_thread.run_sync(daemon.settled)
    assert (item["name"], item["state"], item["pid"]) == ("cut", "paused", pid)
    async with jsonrpc.connect_unix(daemon.socket) as again:
        info = await again.call("instance.info", {"name": "cut"})
        assert [nic["mode"] for nic in info["nics"]] == ["bridged", "routed"]
        lan.assert_only(baseline, [info])
        await again.call("instance.stop", {"name": "cut", "force": True})
    lan.assert_only(baseline)
