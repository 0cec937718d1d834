"""NICs across a migration between two daemons in one network namespace (tests/net_guest's
namespace: bridge br0, IPv6 uplink up0), each daemon with its own state dir and so its
own tap names.

A routed guest's host
routes move to the target's taps at ``finalize_target`` only (Ganeti's order), its
IPv6 proxy NDP entry stays, and nothing of the source is left (taps, routes, proxy
entries); a target that gives up takes nothing of the source's with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from engine.conftest import EngineDaemon
from net_guest.conftest import Lan, guest, lan_namespace, netns_daemon

from protocols import jsonrpc
from supervisor.qemu.migration_progress import FINISHED

pytestmark = [pytest.mark.anyio, pytest.mark.guest, pytest.mark.netns]

ROUTED_IPS = ("10.78.0.2", "fd00:78::2")


@contextmanager
def lan_daemons(state_dirs: tuple[Path, Path]) -> Iterator[tuple[Lan, EngineDaemon, EngineDaemon]]:
    """The namespace and two daemons in it: the source's and the target's."""
    with (
        lan_namespace(with_ovs=False) as lan,
        netns_daemon(state_dirs[0], lan) as source,
        netns_daemon(state_dirs[1], lan) as target,
    ):
        yield lan, source, target


def taps(info: dict[str, Any]) -> list[str]:
    return [nic["tap"] for nic in info["nics"]]


def routed_via(lan: Lan, address: str) -> str | None:
    """The device of the namespace's host route to `address`, if any."""
    family = "-6" if ":" in address else "-4"
    shown = lan.ip(family, "-o", "route", "show", address).split()
    return shown[shown.index("dev") + 1] if "dev" in shown else None


def proxied(lan: Lan, address: str) -> bool:
    return any(line.split()[0] == address for line in lan.ip("neigh", "show", "proxy").splitlines())


async def wait_finished(client: jsonrpc.RPCClient, subscription: int) -> dict[str, Any]:
    """The last ``migration.progress`` figures of `subscription`."""
    with anyio.fail_after(120):
        async for notification in client.notifications():
            event = notification.params
            if event["subscription"] == subscription and event["data"]["status"] in FINISHED:
                data: dict[str, Any] = event["data"]
                return data
    raise AssertionError("the events ended")


async def test_routed_nics_move_to_the_target_at_finalize_target(
    state_dirs: tuple[Path, Path],
) -> None:
    nics = [{"mode": "routed", "ip": ip} for ip in ROUTED_IPS]
    with lan_daemons(state_dirs) as (lan, source_daemon, target_daemon):
        baseline = lan.state()
        async with (
            jsonrpc.connect_unix(source_daemon.socket) as source,
            jsonrpc.connect_unix(target_daemon.socket) as target,
        ):
            # Paused: no guest code needs to run for the host's side of the NICs.
            spec = guest("vm", None, *nics)
            before = await source.call("instance.start", {"spec": spec, "paused": True})
            source_taps = taps(before)

            def assert_on_source() -> None:
                assert [routed_via(lan, ip) for ip in ROUTED_IPS] == source_taps
                assert proxied(lan, ROUTED_IPS[1])

            assert_on_source()
            info = await source.call("migration.info", {"name": "vm"})
            accept = {"spec": info["spec"], "runtime": info["runtime"], "address": "127.0.0.1"}

            # A target that gives up takes nothing of the source's with it.
            await target.call("migration.accept", accept)
            await target.call(
                "migration.finalize_target",
                {"name": "vm", "runtime": info["runtime"], "success": False},
            )
            assert_on_source()
            lan.assert_only(baseline, [before])

            accepted = await target.call("migration.accept", accept)
            target_taps = taps(accepted["instance"])
            assert set(target_taps).isdisjoint(source_taps)
            # The target's taps exist, unrouted: the guest has not moved.
            assert set(target_taps) <= lan.state().taps
            assert_on_source()
            subscribed = await source.call(
                "events.subscribe", {"instances": ["vm"], "kinds": ["migration.progress"]}
            )
            await source.call(
                "migration.start", {"name": "vm", "target": "127.0.0.1", "port": accepted["port"]}
            )
            ended = await wait_finished(source, subscribed["subscription"])
            assert ended["status"] == "completed"
            # Switched over, not finalized: the routes stay where they were.
            assert_on_source()
            # Paused before, paused after (as `migrate()` finalizes it).
            finalize = {"name": "vm", "runtime": info["runtime"], "success": True, "resume": False}
            finalized = await target.call("migration.finalize_target", finalize)
            assert finalized["state"] == "paused"
            assert [routed_via(lan, ip) for ip in ROUTED_IPS] == target_taps
            assert proxied(lan, ROUTED_IPS[1])
            await source.call("migration.finalize_source", {"name": "vm", "success": True})
            # The source's taps are gone; its teardown left the target's routes and
            # proxy entry (the same ip, the same uplink) alone.
            assert [routed_via(lan, ip) for ip in ROUTED_IPS] == target_taps
            assert proxied(lan, ROUTED_IPS[1])
            lan.assert_only(baseline, [finalized])
            await target.call("instance.stop", {"name": "vm", "force": True})
        lan.assert_only(baseline)
