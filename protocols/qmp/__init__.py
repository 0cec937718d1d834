"""An async QMP client for asyncio and trio (through anyio), over a sans-IO core.

Usage::

    async with protocols.qmp.connect("/run/vm/qmp.sock", timeout=10.0) as qmp:
        print(qmp.version)
        status = await qmp.execute("query-status")
        async with qmp.events({"STOP", "RESUME"}) as events:
            await qmp.execute("stop")
            async for event in events:
                ...

Subscriptions yield :class:`QMPEvent` items, and an :class:`EventsDropped` item where
their bounded buffer overflowed. ``await qmp.wait_closed()`` returns when QEMU goes away.

Errors are plain exceptions (never exception groups), all :class:`QMPError`:
:class:`ExecuteError` (QEMU's error class and description), :class:`QMPTimeoutError`
(also a :class:`TimeoutError`), :class:`ConnectionLostError` (``__cause__`` holds the
root cause, e.g. a :class:`ProtocolError`) and :class:`ProtocolError`.
An error reply without an id means QEMU could not parse our input: the two sides no
longer agree where a command starts, so the connection is dropped as a protocol error.

:class:`QMPProtocol` is the sans-IO core, usable with any I/O.
"""

from ._client import DEFAULT_TIMEOUT, QMPClient, connect
from ._core import (
    DEFAULT_MAX_LINE_BYTES,
    NEED_DATA,
    ConnectionClosed,
    ConnectionState,
    ErrorReply,
    Event,
    Greeting,
    QMPEvent,
    QMPProtocol,
    QMPVersion,
    ReturnReply,
)
from ._errors import (
    ConnectionLostError,
    ExecuteError,
    LocalProtocolError,
    ProtocolError,
    QMPError,
    QMPTimeoutError,
)
from ._subscription import DEFAULT_MAX_BUFFER, EventsDropped, EventSubscription

__all__ = [
    "DEFAULT_MAX_BUFFER",
    "DEFAULT_MAX_LINE_BYTES",
    "DEFAULT_TIMEOUT",
    "NEED_DATA",
    "ConnectionClosed",
    "ConnectionLostError",
    "ConnectionState",
    "ErrorReply",
    "Event",
    "EventSubscription",
    "EventsDropped",
    "ExecuteError",
    "Greeting",
    "LocalProtocolError",
    "ProtocolError",
    "QMPClient",
    "QMPError",
    "QMPEvent",
    "QMPProtocol",
    "QMPTimeoutError",
    "QMPVersion",
    "ReturnReply",
    "connect",
]
