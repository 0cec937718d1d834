"""An async OVSDB client (RFC 7047) for asyncio and trio, over a sans-IO core.

Enough of the protocol to edit Open vSwitch's database without ``ovs-vsctl``::

    from protocols import ovsdb

    async with ovsdb.connect("/var/run/openvswitch/db.sock", timeout=5.0) as db:
        rows = await db.transact("Open_vSwitch", [
            ovsdb.select("Bridge", [("name", "==", "br0")], ["_uuid", "ports"]),
        ])

The server's ``echo`` keep-alives are answered by the client's reader task. Errors are
plain exceptions, all :class:`OVSDBError`: :class:`TransactError` (a refused
transaction, naming the failed operation), :class:`RequestError`,
:class:`OVSDBTimeoutError`, :class:`ConnectionLostError` and :class:`ProtocolError`.

:class:`OVSDBProtocol` and :class:`JSONStreamSplitter` are the sans-IO core.
"""

from ._client import DEFAULT_TIMEOUT, OVSDBClient, connect
from ._core import (
    DEFAULT_MAX_MESSAGE_BYTES,
    NEED_DATA,
    ConnectionClosed,
    ConnectionState,
    Echo,
    Event,
    JSONStreamSplitter,
    Notification,
    OVSDBProtocol,
    Reply,
)
from ._errors import (
    ConnectionLostError,
    LocalProtocolError,
    OVSDBError,
    OVSDBTimeoutError,
    ProtocolError,
    RequestError,
    TransactError,
)
from ._ops import (
    Condition,
    check_transact_result,
    comment,
    delete,
    insert,
    mutate,
    named_uuid,
    omap,
    oset,
    select,
    update,
    uuid,
    wait_rows,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TIMEOUT",
    "NEED_DATA",
    "Condition",
    "ConnectionClosed",
    "ConnectionLostError",
    "ConnectionState",
    "Echo",
    "Event",
    "JSONStreamSplitter",
    "LocalProtocolError",
    "Notification",
    "OVSDBClient",
    "OVSDBError",
    "OVSDBProtocol",
    "OVSDBTimeoutError",
    "ProtocolError",
    "Reply",
    "RequestError",
    "TransactError",
    "check_transact_result",
    "comment",
    "connect",
    "delete",
    "insert",
    "mutate",
    "named_uuid",
    "omap",
    "oset",
    "select",
    "update",
    "uuid",
    "wait_rows",
]
