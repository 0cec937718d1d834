"""Taps, bridged and routed NICs set up and torn down inside a test network namespace,
on asyncio and trio (each scenario runs on both in one subprocess)."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import add_ipv6_uplink, ip, run_scenario
from .netdriver import UPLINK_MAC

pytestmark = pytest.mark.netns

BACKENDS = ("asyncio", "trio")


def _each(found: dict[str, Any]) -> list[dict[str, Any]]:
    assert sorted(found) == sorted(BACKENDS)
    return [found[backend] for backend in BACKENDS]


def test_taps_vnet_hdr_and_multiqueue(netns: str) -> None:
    for found in _each(run_scenario(netns, "taps")):
        single, multi = found["names"]
        assert all(len(name.encode()) <= 15 for name in found["names"])
        assert single != multi and single[:-1] == multi[:-1]
        assert "tun type tap pi off vnet_hdr on" in found["details"][single]
        assert "multi_queue" not in found["details"][single]
        assert "multi_queue numqueues 4" in found["details"][multi]
        assert "persist off" in found["details"][multi]
        assert found["fds"] == [1, 4]
        assert found["reopen"]["code"] == 10
        assert found["reopen"]["interface"] == single
        assert found["links_after"] == ["br0", "lo"]


def test_bridged_ports_follow_the_bridge_mtu(netns: str) -> None:
    for found in _each(run_scenario(netns, "bridged")):
        plain, with_mtu = found["names"]
        assert found["ports"] == {plain: 1450, with_mtu: 1400}
        assert found["up"] == [True, True]
        # Each tap has its guest's MAC with fe first (52:54:00:00:00:0i), above the
        # uplink's, so the bridge keeps the uplink's address.
        assert found["addresses"] == ["fe:54:00:00:00:00", "fe:54:00:00:00:01"]
        assert found["bridge_addresses"] == [UPLINK_MAC, UPLINK_MAC]
        # The bridge the host check found is the one the set-up joins.
        (checked_index, checked_mtu) = found["checked"]["br0"]
        assert checked_mtu == 1450 and checked_index != found["br0_index"]
        # ... so a bridge deleted in between fails the join (the one made again since is
        # another device), naming the tap, and nothing is left on the new one.
        assert found["stale"]["code"] == 10 and found["stale"]["interface"] == plain
        assert "cannot join bridge br0" in found["stale"]["message"]
        assert found["stale_ports"] == {}
        # Teardown leaves the ports to the kernel: they go with the taps.
        assert found["links_after"] == ["br0", "lo"]
    assert "vlan_filtering 0" in ip("-n", netns, "-d", "link", "show", "br0")


def test_routed_routes_proxies_and_teardown(netns: str) -> None:
    add_ipv6_uplink(netns)
    for found in _each(run_scenario(netns, "routed")):
        tap4, tap4t, tap6 = found["names"]
        assert f"10.77.0.5 dev {tap4}" in found["main"]
        assert f"fd00:77::5 dev {tap6}" in found["main"]
        assert not any("10.77.0.6" in route for route in found["main"])
        assert found["table100"] == [f"10.77.0.6 dev {tap4t}"]
        assert found["sysctl"] == ["1", "1", "1", "1"]
        assert found["proxy"][:3] == ["fd00:77::5", "dev", "up0"]
        assert found["mtu6"] == "1400"
        assert found["address4"] == "fe:54:00:00:00:00"
        assert not any("10.77" in r or "fd00:77" in r for r in found["main_after"])
        assert found["table100_after"] == []
        assert found["proxy_after"] == []
        assert found["links_after"] == ["br0", "lo", "up0", "up1"]


def test_routed_teardown_after_the_taps_died(netns: str) -> None:
    add_ipv6_uplink(netns)
    for found in _each(run_scenario(netns, "routed_taps_gone")):
        assert not any("10.77" in r or "fd00:77" in r for r in found["routes"])
        assert found["proxy"][:3] == ["fd00:77::5", "dev", "up0"]
        assert found["proxy_after"] == []
        assert found["no_uplink"]["interface"] == "100"
        assert "no IPv6 default route in table 100" in found["no_uplink"]["message"]
        assert found["links_after"] == ["br0", "lo", "up0", "up1"]


def test_missing_bridge_and_vlan_errors_leave_nothing(netns: str) -> None:
    for found in _each(run_scenario(netns, "errors")):
        for step in ("missing_check", "missing_set_up"):
            assert found[step]["code"] == 10
            assert found[step]["interface"] == "nobr0"
            assert "no such bridge" in found[step]["message"]
        # The routed NIC set up before the failing one was rolled back.
        assert not any("10.77.0.9" in route for route in found["missing_routes_after"])
        for step in ("vlan_check", "vlan_set_up"):
            assert found[step]["interface"] == "br0"
            assert "bridge VLAN filtering" in found[step]["message"]
        assert found["vlan_ports_after"] == {}
        assert found["vlan_filtering"] is True
        assert found["links_after"] == ["br0", "lo"]


@pytest.mark.qemu
def test_a_tap_lives_as_long_as_qemu_holds_it(netns: str) -> None:
    for found in _each(run_scenario(netns, "qemu")):
        name = found["name"]
        # One tap queue per virtio queue pair.
        assert found["network"].count("type=tap,fd=") == 2
        assert name in found["links"]
        assert found["ports"] == {name: 1450}
        assert found["links_after"] == ["br0", "lo"]


def test_an_embedded_supervisor_sets_up_and_tears_down_nics(netns: str) -> None:
    """Both backends (trio reaches netlink through a worker thread): the NICs are up
    with the start, and gone with QEMU, whether it was killed or stopped."""
    for found in _each(run_scenario(netns, "embedded")):
        bridged, routed = (nic[0] for nic in found["nics"])
        assert found["nics"] == [
            [bridged, "bridged", "br0", None, 1400],
            [routed, "routed", None, "10.77.9.9", None],
        ]
        for started in (found["started"], found["restarted"]):
            assert started["ports"] == {bridged: 1400}
            assert f"10.77.9.9 dev {routed}" in started["routes"]
        up = ["up vm1 0 bridged br0 -", "up vm1 1 routed - 10.77.9.9"]
        down = [line.replace("up", "down", 1) for line in up]
        # Killed, started again, stopped, cleaned up (a teardown again: idempotent).
        assert found["hook_runs"] == [*up, *down, *up, *down, *down]
        # A failing hook fails the start (error 10 with its stderr) and rolls it back.
        refused = found["refused"]
        assert refused["code"] == 10 and refused["interface"].startswith("kvs")
        assert "exited with code 3" in refused["message"]
        assert f"no uplink for {refused['interface']}" in refused["message"]
        # Down twice: the set-up's own roll-back, then the teardown after QEMU's exit.
        assert found["refused_hook_runs"] == [
            "up refused 0 bridged br0 -",
            "down refused 0 bridged br0 -",
            "down refused 0 bridged br0 -",
        ]
        assert found["after_refused"]["links"] == ["br0", "lo"]
        # QEMU failed while its NICs were set up (the hook held the first one): the
        # error is QEMU's, not the second NIC's tap gone with it.
        doomed = found["doomed"]
        assert doomed["code"] == 4, doomed
        assert "'doomed' failed to start: exited with code 1" in doomed["message"]
        assert "no-such-device" in doomed["stderr"]
        assert found["after_doomed"]["links"] == ["br0", "lo"]
        for gone in (found["after_kill"], found["after_stop"]):
            assert gone["ports"] == {}
            assert not any("10.77.9.9" in route for route in gone["routes"])
            assert gone["links"] == ["br0", "lo"]
