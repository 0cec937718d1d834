"""JSON-RPC error codes (the standard ones and API.md §2's) and the exceptions."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.IntEnum):
    """Error codes of the control socket; ``code.name.lower()`` is API.md's name."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    INSTANCE_NOT_FOUND = 1
    INSTANCE_EXISTS = 2
    INSTANCE_NOT_RUNNING = 3
    HYPERVISOR_ERROR = 4
    MONITOR_ERROR = 5
    TIMEOUT = 6
    INVALID_CONFIG = 7
    MIGRATION_ERROR = 8
    BUSY = 9
    NETWORK_ERROR = 10


class RPCError(Exception):
    """An error response: raised by a method for the server to answer with, and by the
    client for an error response received.

    :ivar code: the error code; an :class:`ErrorCode` when it is a known one.
    :ivar message: the human message.
    :ivar data: the structured details, or ``None`` when there are none.
    """

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code: int
        try:
            self.code = ErrorCode(code)
        except ValueError:
            self.code = code
        self.message = message
        self.data = data

    def __repr__(self) -> str:
        return f"RPCError({self.code!r}, {self.message!r}, {self.data!r})"


class ProtocolError(Exception):
    """The peer sent something that is not JSON-RPC 2.0 (client side: the server)."""


class RPCConnectionLostError(ConnectionError):
    """The connection to the server is gone: it closed the connection, the socket failed,
    it broke the protocol (``__cause__`` is the :exc:`ProtocolError`), or the client was
    closed. A call pending at that moment may or may not have run.
    """
