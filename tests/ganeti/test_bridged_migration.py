"""A bridged instance keeps answering pings across live ``gnt-instance migrate``, node1 to
node2 and back.

The instance has one NIC, the cluster's default: bridged on the bridge both virtual nodes
share (they share the namespace); its eth0 is configured from ``kvs_ip=`` on its kernel
command line (tests/guest/init), set through the instance's ``kernel_args`` hvparam. The
namespace's host side has an address on the bridge and pings the guest all along
(tests/ping_loop.py); after each migration the source's QEMU has ended before the replies
counted as the target's come in.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import anyio
import pytest
from ping_loop import KERNEL_TROUBLE, MAX_LOST, REPLIES_AFTER, REPLIES_BEFORE, ping_loop

from .test_migration import migrate
from .vcluster import BOOT_TIMEOUT_S, BRIDGE, KERNEL_ARGS, VirtualCluster

pytestmark = pytest.mark.anyio

HOST_ADDRESS = "10.79.0.1/24"
GUEST_IP = "10.79.0.2"
#: Replies from the target's guest come within seconds of a completed migration.
REPLY_TIMEOUT_S = 60.0


@pytest.fixture
def anyio_backend() -> str:
    """Ganeti and the daemons run in processes of their own: one backend does."""
    return "asyncio"


@pytest.fixture
def host_side(vcluster: VirtualCluster) -> Iterator[None]:
    """The namespace's host side on the bridge, removed on the way out."""
    vcluster.run(["ip", "address", "add", HOST_ADDRESS, "dev", BRIDGE])
    try:
        yield
    finally:
        vcluster.run(["ip", "address", "del", HOST_ADDRESS, "dev", BRIDGE])


def bridge_ports(cluster: VirtualCluster) -> set[str]:
    links = json.loads(cluster.run(["ip", "-j", "link", "show", "master", BRIDGE]).stdout)
    return {link["ifname"] for link in links}


def tap(cluster: VirtualCluster, node: str, name: str) -> str:
    [nic] = cluster.call(node, "instance.info", {"name": name})["nics"]
    assert (nic["mode"], nic["link"]) == ("bridged", BRIDGE)
    tap_name = nic["tap"]
    assert isinstance(tap_name, str)
    return tap_name


async def test_a_bridged_instance_answers_pings_across_migrations(
    vcluster: VirtualCluster, host_side: None
) -> None:
    name = "ping1"
    kernel_args = f"{KERNEL_ARGS} kvs_ip={GUEST_IP}/24"
    vcluster.add_instance(name, "node1", "-H", f"kvm:kernel_args={kernel_args}")
    try:
        vcluster.wait_serial("node1", name)
        assert bridge_ports(vcluster) == {tap(vcluster, "node1", name)}
        lost_before: set[int] = set()
        async with ping_loop(vcluster.inside([]), GUEST_IP) as pings:
            await pings.wait(REPLIES_BEFORE, BOOT_TIMEOUT_S)
            for source, target in (("node1", "node2"), ("node2", "node1")):
                # Live (Ganeti's default); it returns once the source's QEMU has ended,
                # the heartbeat goes on on the target and Ganeti lists it there.
                await anyio.to_thread.run_sync(migrate, vcluster, name, source, target)
                try:
                    await pings.wait(len(pings.replies) + REPLIES_AFTER, REPLY_TIMEOUT_S)
                except TimeoutError:
                    tail = vcluster.serial_log(target, name).read_text(errors="replace")
                    raise AssertionError(
                        f"no reply after the migration to {target}; serial:\n{tail[-1500:]}"
                    ) from None
                serial = vcluster.serial_log(target, name).read_text(errors="replace")
                assert not KERNEL_TROUBLE.search(serial), serial[-1500:]
                # The source's tap went with its QEMU: the target's is the bridge's port.
                assert bridge_ports(vcluster) == {tap(vcluster, target, name)}
                lost = set(pings.lost()) - lost_before
                assert len(lost) <= MAX_LOST, (source, target, sorted(lost))
                print(f"\n{source} -> {target}: {len(lost)} pings lost", file=sys.stderr)
                lost_before |= lost
    finally:
        vcluster.remove_instance(name)
    assert bridge_ports(vcluster) == set()
