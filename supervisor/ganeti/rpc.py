"""A blocking JSON-RPC 2.0 client of the control socket, on the standard library alone.

Ganeti calls its hypervisor driver from plain threads and processes of its own Python,
which has neither anyio nor msgspec, so the driver cannot use `protocols.jsonrpc`. The
wire format is the one API.md §1 fixes: one compact JSON message per ``\\n``-terminated
line. Server notifications (events) are skipped: the driver never subscribes, and the
answer to a request is matched by its id.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final

#: The longest reply line read; ``migration.info`` payloads are the largest (kilobytes).
MAX_REPLY_BYTES: Final = 16 * 1024 * 1024
#: Deadline of a call that names none: the daemon answers most methods in milliseconds.
DEFAULT_TIMEOUT_S: Final = 60.0
_READ_CHUNK: Final = 65536

# Application error codes of API.md §2 the driver tells apart.
INSTANCE_NOT_FOUND: Final = 1
INSTANCE_EXISTS: Final = 2
INSTANCE_NOT_RUNNING: Final = 3


class DaemonError(Exception):
    """The daemon answered with a JSON-RPC error object (API.md §2)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        detail = f" {json.dumps(data, sort_keys=True)}" if data else ""
        super().__init__(f"{message}{detail}")
        self.code = code
        self.message = message
        self.data = data


class DaemonUnreachable(Exception):
    """No daemon answers on the socket, or the connection broke, or the reply was late."""


class DaemonClient:
    """One connection to a kvm-supervisor control socket, used as a context manager."""

    def __init__(self, socket_path: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._next_id = 1

    def __enter__(self) -> DaemonClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.socket_path)
        except OSError as error:
            sock.close()
            raise DaemonUnreachable(
                f"kvm-supervisor daemon unreachable at {self.socket_path}: "
                f"{error.strerror or error}"
            ) from None
        self._sock = sock
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """Send one request and return its result.

        Raises `DaemonError` for an error reply and `DaemonUnreachable` when the
        connection breaks or no reply comes within `timeout_s` (the client's default
        when None).
        """
        if self._sock is None:
            raise RuntimeError("DaemonClient.call outside its `with` block")
        request_id = self._next_id
        self._next_id += 1
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        line = json.dumps(request, separators=(",", ":"), ensure_ascii=False) + "\n"
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        try:
            self._sock.sendall(line.encode())
            while True:
                reply = self._read_message(deadline, method)
                if reply.get("id") == request_id:
                    return _result(reply)
        except (TimeoutError, OSError) as error:
            raise DaemonUnreachable(f"{method} on {self.socket_path}: {_describe(error)}") from None

    def _read_message(self, deadline: float, method: str) -> dict[str, Any]:
        assert self._sock is not None
        while (newline := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise DaemonUnreachable(f"{method}: reply longer than {MAX_REPLY_BYTES} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply in time")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(_READ_CHUNK)
            if not chunk:
                raise ConnectionResetError("the daemon closed the connection")
            self._buffer += chunk
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        try:
            message = json.loads(line)
        except ValueError as error:
            raise DaemonUnreachable(f"{method}: the daemon sent no JSON: {error}") from None
        if not isinstance(message, dict):
            raise DaemonUnreachable(f"{method}: the daemon sent {type(message).__name__}")
        return message


def _result(reply: Mapping[str, Any]) -> Any:
    error = reply.get("error")
    if isinstance(error, dict):
        raise DaemonError(
            int(error.get("code", 0)), str(error.get("message", "")), error.get("data")
        )
    return reply.get("result")


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no reply in time"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
