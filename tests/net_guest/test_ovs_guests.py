"""Guests on an Open vSwitch bridge (a private ovsdb-server and ovs-vswitchd, userspace
datapath, in the test namespace): they reach each other within their VLAN, the tag is in
OVSDB, and the ports go when the guests stop."""

from __future__ import annotations

import pytest

from protocols import jsonrpc

from .conftest import OVS_BRIDGE, Lan, consoles, guest, start_all

pytestmark = [pytest.mark.guest, pytest.mark.netns, pytest.mark.anyio]

VLAN, OTHER_VLAN = 10, 20
D_IP, E_IP, F_IP = "10.77.1.2", "10.77.1.3", "10.77.1.4"


@pytest.fixture
def with_ovs() -> bool:
    return True


def ovs_nic(vlan: int) -> dict[str, object]:
    return {"mode": "openvswitch", "link": OVS_BRIDGE, "vlan": vlan}


async def test_guests_on_an_ovs_bridge(lan: Lan, client: jsonrpc.RPCClient) -> None:
    assert lan.ovs is not None
    baseline = lan.state()
    infos = await start_all(
        client,
        guest("d", f"{D_IP}/24", ovs_nic(VLAN)),
        guest("e", f"{E_IP}/24", ovs_nic(VLAN)),
        # Same subnet, another VLAN: out of d's and e's reach.
        guest("f", f"{F_IP}/24", ovs_nic(OTHER_VLAN)),
    )
    tags = {}
    for info in infos:
        [nic] = info["nics"]
        assert (nic["mode"], nic["link"]) == ("openvswitch", OVS_BRIDGE)
        assert lan.ovs.vsctl("port-to-br", nic["tap"]) == OVS_BRIDGE
        tags[info["name"]] = int(lan.ovs.vsctl("get", "port", nic["tap"], "tag"))
    assert tags == {"d": VLAN, "e": VLAN, "f": OTHER_VLAN}
    lan.assert_only(baseline, infos)

    async with consoles(*infos) as (d, e, _):
        await d.run(f"ping -c 1 -W 10 {E_IP}")
        await e.run(f"ping -c 1 -W 10 {D_IP}")
        unanswered = await d.run(f"ping -c 1 -W 2 {F_IP}", check=False)
        assert "0 packets received" in unanswered, unanswered

    for info in infos:
        stopped = await client.call("instance.stop", {"name": info["name"], "timeout_s": 30})
        assert stopped["state"] == "stopped"
    assert lan.ovs.vsctl("list-ports", OVS_BRIDGE) == ""
    lan.assert_only(baseline)
