"""A ``vlan`` on a bridged NIC passes spec validation and is judged by the host check:
on this kernel, without bridge VLAN filtering, network_error names the missing feature."""

from __future__ import annotations

import json

import msgspec
import pytest
from cmdline import modern_caps
from conftest import run_python

from supervisor.host.statedir import StateDir
from supervisor.model.hvparams import resolve_hvparams
from supervisor.model.spec import assign_macs, decode_spec
from supervisor.model.validation import check_syntax
from supervisor.net.nics import with_tap_names
from supervisor.qemu.accel import Accelerator
from supervisor.qemu.cmdline import LaunchResources, build_command_line

pytestmark = pytest.mark.netns

#: Tap names are the daemon's own: named after its state dir.
STATE_DIR = "/var/lib/kvm-supervisor"
UUID = "0b6b7f1e-5d4c-4b3a-9f8e-7d6c5b4a3f2e"

CHECK_HOST = """
import json, sys, warnings
import anyio, msgspec
from supervisor.model.errors import NetworkError
from supervisor.net import nics
from supervisor.qemu.cmdline import NicPlan

warnings.simplefilter("error")
plans = msgspec.json.decode(sys.argv[1], type=list[NicPlan])

async def check():
    try:
        await nics.Networking(ovsdb_socket="/nonexistent").check_host(plans)
    except NetworkError as error:
        return {"code": error.code, "interface": error.interface, "reason": error.reason}
    return None

print(json.dumps([anyio.run(check, backend=backend) for backend in ("asyncio", "trio")]))
"""


def test_a_bridged_vlan_reaches_the_host_check(netns: str) -> None:
    spec = assign_macs(
        decode_spec({"name": "vm1", "uuid": UUID, "nics": [{"link": "br0", "vlan": 42}]})
    )
    hv = resolve_hvparams({}, {})
    assert check_syntax(spec, hv) == []
    command = build_command_line(
        spec,
        hv,
        modern_caps(),
        StateDir("/var/lib/kvm-supervisor").instance("vm1"),
        Accelerator.TCG,
        resources=LaunchResources(),
    )
    plans = with_tap_names(command.nics, UUID, state_dir=STATE_DIR)
    assert plans[0].vlan == 42
    result = run_python(
        CHECK_HOST, msgspec.json.encode(plans).decode(), prefix=("ip", "netns", "exec", netns)
    )
    assert result.stderr == ""
    for error in json.loads(result.stdout):
        assert error["code"] == 10
        assert error["interface"] == "br0"
        assert "CONFIG_BRIDGE_VLAN_FILTERING" in error["reason"]
