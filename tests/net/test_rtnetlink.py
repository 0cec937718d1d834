"""Our rtnetlink requests as the kernel takes them, and its replies and refusals as we
read them, checked with `ip` inside a test network namespace, on asyncio and trio."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import run_python

pytestmark = pytest.mark.netns

DRIVER = Path(__file__).with_name("rtnldriver.py")


def test_requests_replies_and_refusals_agree_with_ip(netns: str) -> None:
    code = (
        "import runpy, warnings; warnings.simplefilter('error'); "
        f"runpy.run_path({str(DRIVER)!r}, run_name='__main__')"
    )
    result = run_python(code, prefix=("ip", "netns", "exec", netns))
    assert result.stderr == ""
    backends: dict[str, Any] = json.loads(result.stdout)
    assert sorted(backends) == ["asyncio", "trio"]
    for found in backends.values():
        index = found["tap_index"]
        bridge = found["bridge_index_ip"]
        # A link reply: what `ip` shows of the bridge and of the tap once joined (the
        # one request set MAC, MTU, master and up).
        assert found["bridge"] == [bridge, "br0", 1450, "bridge", None]
        assert found["bridge_vlan_filtering"] == 0
        assert found["missing"] is None
        assert found["port"] == [index, "kvsrtnl0", 1400, "tun", bridge]
        assert found["port_ip"] == [
            index,
            "kvsrtnl0",
            1400,
            "tun",
            "br0",
            True,
            "fe:54:00:12:34:56",
        ]
        assert found["master_after_release"] is None
        # Host routes in the main table, in table 100 (the header's byte) and in table
        # 1000 (RTA_TABLE alone), replaced rather than doubled; IPv6.
        assert found["routes"] == {
            "main": [["10.77.1.5", "kvsrtnl0", "static", "link"]],
            "100": [["10.77.1.6", "kvsrtnl0", "static", "link"]],
            "1000": [["10.77.1.7", "kvsrtnl0", "static", "link"]],
        }
        assert found["route6"] == [["fd00:77::9", "kvsrtnl0", "static"]]
        assert found["route_devices"] == [[index], [index], [index], []]
        assert found["no_table"] == []
        assert found["table100_after_del"] == []
        assert found["del_again"]["errno"] == errno.ESRCH
        assert found["proxies"] == [["10.77.1.5", "kvsrtnl0"], ["fd00:77::9", "kvsrtnl0"]]
        assert found["proxies_after"] == []
        assert found["proxy_del_again"]["errno"] == errno.ENOENT
        # Refusals: the kernel's errno, and its extended-ack message when it gives one.
        assert found["mtu_too_big"] == {
            "errno": errno.EINVAL,
            "message": "[Errno 22] Invalid argument (mtu greater than device maximum)",
        }
        assert found["not_a_bridge"]["errno"] == errno.EOPNOTSUPP
        # This kernel has no bridge VLAN filtering (README: limits of this kernel).
        assert found["vlan_filtering"]["errno"] == errno.EOPNOTSUPP
