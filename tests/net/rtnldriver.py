"""The netlink operations against the kernel, run inside a test network namespace
(``ip netns exec NS python rtnldriver.py``) on asyncio and trio; prints one JSON object
per backend with what `ip` saw after each operation and what the kernel refused."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import anyio

from supervisor.net.netlink import Netlink
from supervisor.net.tun import open_tap

TAP = "kvsrtnl0"


def ip_json(*args: str) -> Any:
    return json.loads(subprocess.run(["ip", "-j", *args], check=True, capture_output=True).stdout)


async def refusal(operation: Any) -> dict[str, Any]:
    try:
        await operation
    except OSError as error:
        return {"errno": error.errno, "message": str(error)}
    return {}


async def operations() -> dict[str, Any]:
    found: dict[str, Any] = {}
    tap = open_tap(TAP, vnet_hdr=True)
    try:
        async with Netlink() as netlink:
            bridge = await netlink.link("br0")
            port = await netlink.link(TAP)
            assert bridge is not None and port is not None
            found["bridge"] = [bridge.index, bridge.name, bridge.mtu, bridge.kind, bridge.master]
            found["bridge_vlan_filtering"] = await netlink.vlan_filtering(bridge)
            found["missing"] = await netlink.link("no-such-if0")
            await netlink.join_up(port.index, bridge.index, 1400, address="fe:54:00:12:34:56")
            joined = await netlink.link(TAP)
            assert joined is not None
            found["port"] = [joined.index, joined.name, joined.mtu, joined.kind, joined.master]
            (shown,) = ip_json("-d", "link", "show", TAP)
            found["port_ip"] = [
                shown["ifindex"],
                shown["ifname"],
                shown["mtu"],
                shown["linkinfo"]["info_kind"],
                shown["master"],
                "UP" in shown["flags"],
                shown["address"],
            ]
            found["bridge_index_ip"] = ip_json("link", "show", "br0")[0]["ifindex"]
            await netlink.set_master(port.index, None)
            found["master_after_release"] = ip_json("link", "show", TAP)[0].get("master")
            # Routes: the main table, a table by its header byte, one past 255, IPv6.
            for ip, table in (("10.77.1.5", 254), ("10.77.1.6", 100), ("10.77.1.7", 1000)):
                await netlink.add_route(ip, port.index, table)
                await netlink.add_route(ip, port.index, table)  # a replace: still one route
            await netlink.add_route("fd00:77::9", port.index)
            found["routes"] = {
                table: [
                    [r["dst"], r["dev"], r.get("protocol"), r.get("scope")]
                    for r in ip_json("route", "show", "table", table)
                    if r["dst"].startswith("10.77.1.")
                ]
                for table in ("main", "100", "1000")
            }
            found["route6"] = [
                [r["dst"], r["dev"], r.get("protocol")]
                for r in ip_json("-6", "route", "show")
                if r["dst"].startswith("fd00:77::")
            ]
            found["route_devices"] = [
                await netlink.host_route_devices("10.77.1.5"),
                await netlink.host_route_devices("10.77.1.7", 1000),
                await netlink.host_route_devices("fd00:77::9"),
                await netlink.host_route_devices("10.77.1.99"),
            ]
            found["tap_index"] = port.index
            found["no_table"] = await netlink.host_route_devices("10.77.1.5", 4242)
            await netlink.del_route("10.77.1.6", port.index, 100)
            found["table100_after_del"] = ip_json("route", "show", "table", "100")
            found["del_again"] = await refusal(netlink.del_route("10.77.1.6", port.index, 100))
            # Proxy neighbour entries, IPv4 and IPv6.
            await netlink.add_proxy_neighbour("fd00:77::9", port.index)
            await netlink.add_proxy_neighbour("10.77.1.5", port.index)
            found["proxies"] = sorted(
                [entry["dst"], entry["dev"]] for entry in ip_json("neigh", "show", "proxy")
            )
            await netlink.del_proxy_neighbour("fd00:77::9", port.index)
            await netlink.del_proxy_neighbour("10.77.1.5", port.index)
            found["proxies_after"] = ip_json("neigh", "show", "proxy")
            found["proxy_del_again"] = await refusal(
                netlink.del_proxy_neighbour("10.77.1.5", port.index)
            )
            # Refusals carry the kernel's errno and, where it gives one, its message.
            found["mtu_too_big"] = await refusal(netlink.set_mtu(port.index, 1 << 20))
            found["not_a_bridge"] = await refusal(
                netlink.join_up(port.index, 1, 1500, address="fe:54:00:12:34:56")
            )
            found["vlan_filtering"] = await refusal(netlink.probe_vlan_filtering(bridge))
    finally:
        tap.close()
    return found


def main() -> None:
    print(json.dumps({b: anyio.run(operations, backend=b) for b in ("asyncio", "trio")}))


if __name__ == "__main__":
    main()
