"""Open vSwitch ports through the OVSDB client, against a private ovsdb-server and
ovs-vswitchd (userspace datapath) in a test network namespace; checked through the client
and, independently, through ovs-vsctl on the same database."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import anyio
import pytest

from protocols import ovsdb
from supervisor.model.errors import NetworkError
from supervisor.net.ovs import add_port, bridge_exists, connect_ovsdb, del_port, port_exists

from .conftest import SCHEMA, PrivateOVS

BRIDGE = "br-kvs"
TAP = "kvstap0"


async def create_bridge(db: ovsdb.OVSDBClient, name: str) -> None:
    await db.transact(
        "Open_vSwitch",
        [
            ovsdb.insert("Bridge", {"name": name, "datapath_type": "netdev"}, uuid_name="br"),
            ovsdb.mutate(
                "Open_vSwitch", [], [("bridges", "insert", ovsdb.oset([ovsdb.named_uuid("br")]))]
            ),
        ],
    )


async def select_port(db: ovsdb.OVSDBClient, name: str) -> list[dict[str, object]]:
    results = await db.transact(
        "Open_vSwitch", [ovsdb.select("Port", [("name", "==", name)], ["name", "tag", "trunks"])]
    )
    rows: list[dict[str, object]] = results[0]["rows"]
    return rows


async def interface_count(db: ovsdb.OVSDBClient, name: str) -> int:
    results = await db.transact(
        "Open_vSwitch", [ovsdb.select("Interface", [("name", "==", name)], ["name"])]
    )
    return len(results[0]["rows"])


@pytest.fixture
def tap(private_ovs: PrivateOVS) -> str:
    """A tap inside the test namespace; it goes with the namespace."""
    private_ovs.in_netns("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
    return TAP


@pytest.mark.anyio
async def test_port_with_vlan_tag_added_then_deleted(private_ovs: PrivateOVS, tap: str) -> None:
    async with connect_ovsdb(private_ovs.socket, timeout_s=10) as db:
        await create_bridge(db, BRIDGE)
        assert await bridge_exists(db, BRIDGE)
        assert not await port_exists(db, tap)
        await add_port(db, BRIDGE, tap, tag=100)
        assert await port_exists(db, tap)
        assert await select_port(db, tap) == [{"name": tap, "tag": 100, "trunks": ["set", []]}]
        assert private_ovs.vsctl("get", "port", tap, "tag") == "100"
        assert private_ovs.vsctl("port-to-br", tap) == BRIDGE
        await del_port(db, tap)
        assert not await port_exists(db, tap)
        # Port and Interface are garbage-collected with the reference from the bridge.
        assert await interface_count(db, tap) == 0
        assert private_ovs.vsctl("list-ports", BRIDGE) == ""
        # Deleting again is nothing: teardown may repeat.
        await del_port(db, tap)


@pytest.mark.anyio
async def test_schema_read_back_whole(private_ovs: PrivateOVS) -> None:
    """A large reply (the schema, about 60 KB) arrives in many reads and is cut right."""
    async with connect_ovsdb(private_ovs.socket, timeout_s=10) as db:
        schema = await db.get_schema("Open_vSwitch")
    # The server writes types in their normal form: compare what normalizing leaves alone.
    expected = json.loads(SCHEMA.read_text())
    assert schema["version"] == expected["version"]
    assert {table: sorted(value["columns"]) for table, value in schema["tables"].items()} == {
        table: sorted(value["columns"]) for table, value in expected["tables"].items()
    }


@pytest.mark.anyio
async def test_trunk_port(private_ovs: PrivateOVS, tap: str) -> None:
    async with connect_ovsdb(private_ovs.socket, timeout_s=10) as db:
        await create_bridge(db, BRIDGE)
        await add_port(db, BRIDGE, tap, trunks=[10, 20])
        assert private_ovs.vsctl("get", "port", tap, "trunks") == "[10, 20]"
        assert private_ovs.vsctl("get", "port", tap, "tag") == "[]"
        await del_port(db, tap)
        assert private_ovs.vsctl("list-ports", BRIDGE) == ""


@pytest.mark.anyio
async def test_missing_bridge_is_a_network_error_naming_it(private_ovs: PrivateOVS) -> None:
    async with connect_ovsdb(private_ovs.socket, timeout_s=10) as db:
        with pytest.raises(NetworkError, match="bridge 'br-missing' does not exist") as caught:
            await add_port(db, "br-missing", TAP, tag=100)
        assert caught.value.code == 10
        assert caught.value.data["interface"] == "br-missing"
        assert not await port_exists(db, TAP)
        assert await interface_count(db, TAP) == 0


@pytest.mark.anyio
async def test_duplicate_port_is_refused_and_changes_nothing(
    private_ovs: PrivateOVS, tap: str
) -> None:
    async with connect_ovsdb(private_ovs.socket, timeout_s=10) as db:
        await create_bridge(db, BRIDGE)
        await add_port(db, BRIDGE, tap, tag=5)
        with pytest.raises(NetworkError, match="exists") as caught:
            await add_port(db, BRIDGE, tap, tag=6)
        assert caught.value.data["interface"] == tap
        assert private_ovs.vsctl("get", "port", tap, "tag") == "5"
        await del_port(db, tap)


@pytest.mark.anyio
async def test_vlan_out_of_range(private_ovs: PrivateOVS) -> None:
    async with connect_ovsdb(private_ovs.socket, timeout_s=10) as db:
        with pytest.raises(NetworkError, match="VLAN 4096 is out of range"):
            await add_port(db, BRIDGE, TAP, trunks=[1, 4096])


@pytest.mark.anyio
async def test_absent_socket_says_ovs_is_not_running(tmp_path: Path) -> None:
    path = tmp_path / "db.sock"
    with pytest.raises(NetworkError, match="Open vSwitch is not running") as caught:
        async with connect_ovsdb(path, timeout_s=10):
            pass
    assert caught.value.data["interface"] == str(path)


@pytest.mark.anyio
async def test_refusing_socket_says_ovs_is_not_running(tmp_path: Path) -> None:
    path = tmp_path / "db.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        # Bound and not listening: what a dead ovsdb-server leaves behind.
        stale.bind(str(path))
        with pytest.raises(NetworkError, match="Open vSwitch is not running"):
            async with connect_ovsdb(path, timeout_s=10):
                pass


@pytest.mark.anyio
async def test_errors_of_the_body_are_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "db.sock"
    listener = await anyio.create_unix_listener(path)
    async with listener:
        with pytest.raises(FileNotFoundError, match="from the body"):
            async with connect_ovsdb(path, timeout_s=10):
                raise FileNotFoundError("from the body")
