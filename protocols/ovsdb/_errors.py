"""The OVSDB client's exceptions."""

from __future__ import annotations

from typing import Any


class OVSDBError(Exception):
    """Base of every error of :mod:`protocols.ovsdb`."""


class ProtocolError(OVSDBError):
    """The server sent something that is not OVSDB's JSON-RPC 1.0."""


class LocalProtocolError(OVSDBError):
    """The caller used the sans-IO core wrongly (data after end of file, say)."""


class RequestError(OVSDBError):
    """The server answered a request with an error (``{"error": ..., "id": ...}``).

    :ivar error: the server's ``error`` member (a string for OVSDB's own errors).
    """

    def __init__(self, method: str, error: Any) -> None:
        super().__init__(f"{method}: {error}")
        self.method = method
        self.error = error


class TransactError(OVSDBError):
    """A ``transact`` was refused: an operation, or the commit, failed (RFC 7047 §4.1.3).

    :ivar op_index: the index of the failed operation in the transaction, or ``None`` when
        the commit itself failed (a constraint violation, found after every operation).
    :ivar error: OVSDB's error name (``"constraint violation"``, ``"timed out"``, ...).
    :ivar details: its human details, ``""`` when absent.
    """

    def __init__(self, op_index: int | None, error: str, details: str) -> None:
        where = "commit" if op_index is None else f"operation {op_index}"
        super().__init__(f"{where}: {error}" + (f": {details}" if details else ""))
        self.op_index = op_index
        self.error = error
        self.details = details


class ConnectionLostError(OVSDBError, ConnectionError):
    """The connection is gone (closed by either side, failed, or broken by a
    :exc:`ProtocolError`, then its ``__cause__``). A transaction pending at that moment may
    or may not have been committed."""


class OVSDBTimeoutError(OVSDBError, TimeoutError):
    """A request, or connecting, took longer than its deadline."""
