"""An async client of QEMU's human monitor (HMP), for asyncio and trio (through anyio).

It replaces ``echo CMD | socat - UNIX-CONNECT:monitor.sock`` with one persistent
connection::

    async with protocols.hmp.connect("/run/vm/hmp.sock", timeout=10.0) as monitor:
        status = await monitor.command("info status")  # "VM status: running"

:class:`QMPHumanMonitor` offers the same ``command()`` through QMP's
``human-monitor-command``, for instances without a monitor socket.

Errors are plain exceptions, all :class:`HMPError`: :class:`HMPCommandError` (the
monitor printed an error message: ``unknown command``, ``Error: ...``, an argument
complaint; HMP has no error channel, so this is recognised from the text),
:class:`HMPTimeoutError` (also a :class:`TimeoutError`), :class:`HMPConnectionLostError`
(also a :class:`ConnectionError`) and :class:`HMPProtocolError`. A command holding a
newline or another control character raises :class:`ValueError`.

:class:`HMPConnection` is the sans-IO core, usable with any I/O.
"""

from ._client import (
    DEFAULT_TIMEOUT,
    HMPClient,
    HMPConnectionLostError,
    HMPTimeoutError,
    QMPExecutor,
    QMPHumanMonitor,
    connect,
)
from ._core import (
    DEFAULT_MAX_REPLY_BYTES,
    MAX_COMMAND_BYTES,
    NEED_DATA,
    Banner,
    Closed,
    Event,
    HMPCommandError,
    HMPConnection,
    HMPError,
    HMPProtocolError,
    NeedData,
    Reply,
    clean_output,
    encode_command,
    is_error_output,
)

__all__ = [
    "DEFAULT_MAX_REPLY_BYTES",
    "DEFAULT_TIMEOUT",
    "MAX_COMMAND_BYTES",
    "NEED_DATA",
    "Banner",
    "Closed",
    "Event",
    "HMPClient",
    "HMPCommandError",
    "HMPConnection",
    "HMPConnectionLostError",
    "HMPError",
    "HMPProtocolError",
    "HMPTimeoutError",
    "NeedData",
    "QMPExecutor",
    "QMPHumanMonitor",
    "Reply",
    "clean_output",
    "connect",
    "encode_command",
    "is_error_output",
]
