"""The project's exception types, one per application error code of the control protocol.

Each `SupervisorError` carries what the JSON-RPC error object needs: `code` (API.md §2),
a human `message` (``str(error)``) and a structured `data` dict. The RPC layer turns any
of them into ``{"code": e.code, "message": str(e), "data": e.data}`` without knowing the
subclass.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import msgspec

__all__ = [
    "Busy",
    "HypervisorError",
    "InstanceExists",
    "InstanceNotFound",
    "InstanceNotRunning",
    "InvalidConfigError",
    "InvalidParams",
    "MigrationError",
    "MonitorError",
    "NetworkError",
    "OperationTimeout",
    "SupervisorError",
    "host_io_errors",
]


class SupervisorError(Exception):
    """Base of every error the supervisor reports to a client."""

    code: ClassVar[int] = 0

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.data: dict[str, Any] = data


class InstanceNotFound(SupervisorError):
    """No instance of that name is defined or running."""

    code = 1

    def __init__(self, name: str) -> None:
        super().__init__(f"instance {name!r} not found", name=name)


class InstanceExists(SupervisorError):
    """The instance is already running or defined."""

    code = 2

    def __init__(self, name: str, detail: str = "already exists") -> None:
        super().__init__(f"instance {name!r} {detail}", name=name)


class InstanceNotRunning(SupervisorError):
    """The operation needs a running instance."""

    code = 3

    def __init__(self, name: str, state: str = "stopped") -> None:
        super().__init__(f"instance {name!r} is not running (state {state})", name=name)


class HypervisorError(SupervisorError):
    """QEMU failed to start or died; carries the tail of its stderr and its exit status."""

    code = 4

    def __init__(self, message: str, *, stderr: str = "", exit_status: int | None = None) -> None:
        super().__init__(message, stderr=stderr, exit_status=exit_status)
        self.stderr = stderr
        self.exit_status = exit_status


@contextmanager
def host_io_errors(operation: str, where: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a host I/O failure (state dir not writable, disk full) into `HypervisorError`.

    The message names the file when the OS did, else `where` (the directory the
    operation writes to), e.g. ``start of 'vm' failed: /var/lib/.../vm: Read-only
    file system``.
    """
    try:
        yield
    except OSError as error:
        path = error.filename if error.filename is not None else os.fspath(where)
        raise HypervisorError(
            f"{operation} failed: {os.fsdecode(path)}: {error.strerror or error}"
        ) from error


class MonitorError(SupervisorError):
    """A QMP or HMP command failed; `error_class` is QEMU's (e.g. ``GenericError``)."""

    code = 5

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}", **{"class": error_class, "desc": desc})
        self.error_class = error_class
        self.desc = desc


class OperationTimeout(SupervisorError):
    """An operation ran past its deadline of `timeout_s` seconds."""

    code = 6

    def __init__(self, operation: str, timeout_s: float) -> None:
        super().__init__(f"{operation} timed out after {timeout_s:g} s", timeout_s=timeout_s)
        self.timeout_s = timeout_s


class InvalidConfigError(SupervisorError):
    """A spec, config or hypervisor parameter is wrong: `path` names the field.

    ``str(error)`` is ``"<path>: <reason>"``, e.g.
    ``spec.hvparams.serial_speed: 1234 is not one of 75, 110, ...``.
    """

    code = 7

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}", path=path, reason=reason)
        self.path = path
        self.reason = reason


class InvalidParams(InvalidConfigError):
    """The input could not be decoded (wrong type, bad pattern, unknown field).

    The control protocol reports these as JSON-RPC -32602 (invalid params) rather than
    7, which is for rules across fields and checks against the host.
    """

    code = -32602

    @classmethod
    def from_validation_error(cls, error: msgspec.ValidationError, root: str) -> InvalidParams:
        """Translate msgspec's error into one whose path starts at `root` (may be empty).

        ``Expected `int`, got `str` - at `$.nics[1].mtu``` with root ``spec`` becomes
        path ``spec.nics[1].mtu``, reason ``Expected `int`, got `str```; an unknown or
        missing field is named in the path itself.
        """
        message, _, location = str(error).partition(" - at `$")
        path = (root + location.rstrip("`")).removeprefix(".")
        field = _FIELD_MESSAGE.fullmatch(message)
        if field is not None:
            return cls(f"{path}.{field['name']}".removeprefix("."), field["what"])
        return cls(path or "$", message)


_FIELD_MESSAGE = re.compile(
    r"Object (?:contains )?(?P<what>unknown field|missing required field) `(?P<name>[^`]*)`"
)


class MigrationError(SupervisorError):
    """A migration failed or was cancelled."""

    code = 8


class Busy(SupervisorError):
    """Another operation on this instance is in progress."""

    code = 9

    def __init__(self, name: str, operation: str) -> None:
        super().__init__(
            f"instance {name!r} is busy with {operation}", name=name, operation=operation
        )


class NetworkError(SupervisorError):
    """Setting up a tap, bridge or route failed; `interface` names the device."""

    code = 10

    def __init__(self, interface: str, reason: str) -> None:
        super().__init__(f"{interface}: {reason}", interface=interface, reason=reason)
        self.interface = interface
        self.reason = reason
