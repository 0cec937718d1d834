"""Open vSwitch ports through OVSDB (RFC 7047) on ovsdb-server's unix socket: no shell,
no ``ovs-vsctl``.

A port is a Port row and its Interface row, both non-root tables: they live as long as
a Bridge row's ``ports`` refers to them. Adding one inserts both and adds the Port to
the bridge's ``ports`` in one transaction, guarded by a ``wait`` that the bridge exists;
removing one takes it out of ``ports`` and the server garbage-collects both rows.
Every failure is a `NetworkError` naming the port (or the missing bridge).
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from protocols import ovsdb
from supervisor.model.errors import NetworkError

__all__ = ["add_port", "bridge_exists", "connect_ovsdb", "del_port", "port_exists"]

DATABASE = "Open_vSwitch"
_VLAN_MAX = 4095


@asynccontextmanager
async def connect_ovsdb(
    socket_path: str | os.PathLike[str], *, timeout_s: float
) -> AsyncGenerator[ovsdb.OVSDBClient]:
    """A connection to ovsdb-server (config key ``ovsdb_socket``); ``timeout_s`` bounds
    connecting and each request.

    :raises NetworkError: on entering, the socket is missing or refuses connections
        (Open vSwitch is not installed or not running), or connecting timed out.
    """
    connected = False
    try:
        async with ovsdb.connect(socket_path, timeout=timeout_s) as db:
            connected = True
            yield db
    except (OSError, ovsdb.OVSDBTimeoutError) as exc:
        if connected:
            raise
        if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
            reason = "Open vSwitch is not running (no ovsdb-server listens on it)"
        else:
            reason = f"cannot reach ovsdb-server: {exc}"
        raise NetworkError(str(socket_path), reason) from None


async def add_port(
    db: ovsdb.OVSDBClient,
    bridge: str,
    port_name: str,
    tag: int | None = None,
    trunks: Sequence[int] | None = None,
) -> None:
    """Make the network device ``port_name`` (a tap) a port of OVS bridge ``bridge``.

    ``tag`` makes it an access port of that VLAN; ``trunks`` limits the VLANs it carries
    (all when empty or ``None``). Cancellation leaves the port added or not, never half.

    :raises NetworkError: the bridge does not exist (naming it), the port already exists,
        a VLAN is out of 0..4095, or OVSDB failed.
    """
    vlans = ([] if tag is None else [tag]) + list(trunks or ())
    bad = [vlan for vlan in vlans if not 0 <= vlan <= _VLAN_MAX]
    if bad:
        raise NetworkError(port_name, f"VLAN {bad[0]} is out of range 0..{_VLAN_MAX}")
    port_row = {
        "name": port_name,
        "interfaces": ovsdb.named_uuid("interface"),
        "tag": ovsdb.oset([] if tag is None else [tag]),
        "trunks": ovsdb.oset(trunks or ()),
    }
    ops = [
        _bridge_present(bridge),
        ovsdb.insert("Interface", {"name": port_name}, uuid_name="interface"),
        ovsdb.insert("Port", port_row, uuid_name="port"),
        ovsdb.mutate(
            "Bridge",
            [("name", "==", bridge)],
            [("ports", "insert", ovsdb.oset([ovsdb.named_uuid("port")]))],
        ),
        ovsdb.comment(f"kvm-supervisor: add port {port_name} to {bridge}"),
    ]
    try:
        await _transact(db, port_name, ops)
    except ovsdb.TransactError as exc:
        if exc.op_index == 0:
            raise NetworkError(bridge, f"Open vSwitch bridge {bridge!r} does not exist") from None
        if exc.error == "constraint violation" and "identical values" in exc.details:
            raise NetworkError(
                port_name, "an Open vSwitch port or interface of that name already exists"
            ) from None
        raise NetworkError(port_name, f"Open vSwitch refused the port: {exc}") from None


async def del_port(db: ovsdb.OVSDBClient, port_name: str) -> None:
    """Remove port ``port_name`` from whichever bridge holds it; nothing when none does.

    :raises NetworkError: OVSDB failed.
    """
    port = await _port_uuid(db, port_name)
    if port is None:
        return
    ops = [
        ovsdb.mutate(
            "Bridge",
            [("ports", "includes", ovsdb.uuid(port))],
            [("ports", "delete", ovsdb.oset([ovsdb.uuid(port)]))],
        ),
        ovsdb.comment(f"kvm-supervisor: delete port {port_name}"),
    ]
    try:
        await _transact(db, port_name, ops)
    except ovsdb.TransactError as exc:
        raise NetworkError(port_name, f"Open vSwitch refused to delete the port: {exc}") from None


async def port_exists(db: ovsdb.OVSDBClient, port_name: str) -> bool:
    """Whether OVSDB holds a port of that name.

    :raises NetworkError: OVSDB failed.
    """
    return await _port_uuid(db, port_name) is not None


async def bridge_exists(db: ovsdb.OVSDBClient, bridge: str) -> bool:
    """Whether OVSDB holds a bridge of that name.

    :raises NetworkError: OVSDB failed.
    """
    ops = [ovsdb.select("Bridge", [("name", "==", bridge)], ["_uuid"])]
    try:
        results = await _transact(db, bridge, ops)
    except ovsdb.TransactError as exc:
        raise NetworkError(bridge, f"Open vSwitch refused the query: {exc}") from None
    return bool(results[0].get("rows"))


def _bridge_present(bridge: str) -> dict[str, Any]:
    return ovsdb.wait_rows(
        "Bridge", [("name", "==", bridge)], ["name"], [{"name": bridge}], until="=="
    )


async def _port_uuid(db: ovsdb.OVSDBClient, port_name: str) -> str | None:
    ops = [ovsdb.select("Port", [("name", "==", port_name)], ["_uuid"])]
    try:
        results = await _transact(db, port_name, ops)
    except ovsdb.TransactError as exc:
        raise NetworkError(port_name, f"Open vSwitch refused the query: {exc}") from None
    rows = results[0].get("rows") or []
    if not rows:
        return None
    reference = rows[0].get("_uuid")
    if not (isinstance(reference, list) and len(reference) == 2 and reference[0] == "uuid"):
        raise NetworkError(port_name, f"OVSDB returned a malformed uuid: {reference!r:.100}")
    return str(reference[1])


async def _transact(
    db: ovsdb.OVSDBClient, interface: str, ops: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``db.transact`` on Open_vSwitch; its failures but `TransactError` as NetworkError."""
    try:
        return await db.transact(DATABASE, ops)
    except ovsdb.TransactError:
        raise
    except ovsdb.OVSDBError as exc:
        raise NetworkError(interface, f"OVSDB failed: {exc}") from None
