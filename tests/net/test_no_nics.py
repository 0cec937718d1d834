"""No NIC to set up or tear down costs the networking code nothing: no netlink socket is
opened (one costs a socket and pyroute2's set-up, about 0.1 ms on an idle host and
milliseconds on a busy one) for an instance without NICs, nor for the modes a migration
sets up at one end when the instance has none of them."""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.net import nics
from supervisor.qemu.cmdline import NicPlan

pytestmark = pytest.mark.anyio


class NoNetlink:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a netlink socket was opened with no NIC to set up")


def bridged_nic() -> NicPlan:
    return NicPlan(
        index=0,
        mac="aa:00:00:12:34:56",
        mode="bridged",
        link="br0",
        netdev_id="net0",
        device_id="nic0",
        model="virtio-net-pci",
        fd_names=("tap0",),
        vnet_hdr=True,
        queues=1,
        vhost=False,
        tap="kvsabcdefghij0",
    )


async def test_no_nic_opens_no_netlink_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nics, "Netlink", NoNetlink)
    network = nics.Networking(ovsdb_socket="/nonexistent/db.sock")
    await network.check_host([])
    await network.set_up([], instance="vm1")
    await network.set_up([bridged_nic()], instance="vm1", modes=nics.ROUTED_MODES)
    await network.tear_down([], instance="vm1")
