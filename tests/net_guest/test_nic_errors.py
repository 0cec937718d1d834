"""NICs the host cannot give, or that clash: refused with an error naming what is wrong,
before any QEMU runs, leaving the namespace as it was."""

from __future__ import annotations

from typing import Any

import pytest
from engine.conftest import EngineDaemon, qemus_started_in

from protocols import jsonrpc

from .conftest import BRIDGE, Lan, guest, start_all

pytestmark = [pytest.mark.guest, pytest.mark.netns, pytest.mark.anyio]

MAC = "52:54:00:77:00:01"
BRIDGED = {"mode": "bridged", "link": BRIDGE}


async def refused(client: jsonrpc.RPCClient, spec: dict[str, Any]) -> jsonrpc.RPCError:
    with pytest.raises(jsonrpc.RPCError) as failed:
        await client.call("instance.start", {"spec": spec, "paused": True})
    return failed.value


@pytest.mark.parametrize(
    ("nics", "hvparams", "code", "data", "says"),
    [
        pytest.param(
            [BRIDGED, {"mode": "bridged", "link": "nobr0"}],
            {},
            jsonrpc.ErrorCode.NETWORK_ERROR,
            {"interface": "nobr0"},
            "no such bridge",
            id="missing-bridge",
        ),
        pytest.param(
            [BRIDGED],
            {"vhost_net": True},
            jsonrpc.ErrorCode.INVALID_CONFIG,
            {"path": "spec.hvparams.vhost_net"},
            "/dev/vhost-net",
            id="vhost-net",
        ),
        pytest.param(
            [{**BRIDGED, "vlan": 10}],
            {},
            jsonrpc.ErrorCode.NETWORK_ERROR,
            {"interface": BRIDGE},
            "CONFIG_BRIDGE_VLAN_FILTERING",
            id="bridged-vlan",
        ),
        pytest.param(
            [{**BRIDGED, "mac": MAC}, {"mode": "routed", "ip": "10.78.0.9", "mac": MAC}],
            {},
            jsonrpc.ErrorCode.INVALID_CONFIG,
            {"path": "spec.nics[1].mac"},
            "same MAC",
            id="same-mac-twice",
        ),
    ],
)
async def test_refused_start_leaves_nothing(
    lan: Lan,
    daemon: EngineDaemon,
    client: jsonrpc.RPCClient,
    nics: list[dict[str, Any]],
    hvparams: dict[str, Any],
    code: int,
    data: dict[str, str],
    says: str,
) -> None:
    baseline = lan.state()
    error = await refused(client, guest("refused", None, *nics, **hvparams))
    assert error.code == code, error
    assert error.data.items() >= data.items(), error.data
    assert says in f"{error.message} {error.data}", error
    assert qemus_started_in(daemon.state_dir) == {}
    lan.assert_only(baseline)


async def test_mac_of_a_running_instance_is_refused(
    lan: Lan, daemon: EngineDaemon, client: jsonrpc.RPCClient
) -> None:
    baseline = lan.state()
    [first] = await start_all(client, guest("first", None, {**BRIDGED, "mac": MAC}), paused=True)
    error = await refused(client, guest("second", None, {**BRIDGED, "mac": MAC}, BRIDGED))
    assert error.code == jsonrpc.ErrorCode.INVALID_CONFIG, error
    assert error.data["path"] == "spec.nics[0].mac", error.data
    assert "first" in f"{error.message} {error.data}", error
    assert list(qemus_started_in(daemon.state_dir)) == [first["pid"]]
    lan.assert_only(baseline, [first])
