"""The JSON-RPC 2.0 messages of the control socket, as msgspec Structs (API.md §1, §4)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

RequestId = int | str | None
"""A request id; ``None`` is JSON ``null`` (the id of errors about unreadable requests)."""


class Request(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A request, or a notification when ``id`` is absent (``UNSET``).

    ``params`` stays undecoded JSON until :func:`~protocols.jsonrpc.decode_params` decodes
    it with the method's own type.
    """

    jsonrpc: Literal["2.0"]
    method: str
    params: msgspec.Raw | UnsetType = UNSET
    id: RequestId | UnsetType = UNSET

    @property
    def is_notification(self) -> bool:
        """Whether the request has no id, so gets no response."""
        return self.id is UNSET


class ErrorObject(msgspec.Struct, kw_only=True, frozen=True):
    """The ``error`` member of an error response."""

    code: int
    message: str
    data: Any = UNSET
    """``UNSET`` when absent."""


class Response(msgspec.Struct, kw_only=True, frozen=True):
    """A successful response."""

    jsonrpc: Literal["2.0"] = "2.0"
    result: Any
    id: RequestId


class ErrorResponse(msgspec.Struct, kw_only=True, frozen=True):
    """An error response."""

    jsonrpc: Literal["2.0"] = "2.0"
    error: ErrorObject
    id: RequestId


class Notification(msgspec.Struct, kw_only=True, frozen=True):
    """A server-to-client notification, such as ``event`` (API.md §4)."""

    jsonrpc: Literal["2.0"] = "2.0"
    method: str
    params: Any = UNSET
    """``UNSET`` when absent."""


class EventParams(msgspec.Struct, kw_only=True, frozen=True):
    """The params of an ``event`` notification (API.md §4).

    ``instance`` is ``None`` for events about no instance (such as ``events.dropped``).
    """

    subscription: int
    instance: str | None
    kind: str
    timestamp: float
    data: dict[str, Any]


Incoming = Request | ErrorResponse
"""One message decoded from a line a client sent: a request to run, or the error
response that answers an unreadable one."""

ServerMessage = Response | ErrorResponse | Notification
"""One message decoded from a line the server sent."""


class IncomingLine(msgspec.Struct, frozen=True):
    """What one line from a client held.

    ``is_batch`` tells whether the answers go back as one JSON array (see
    :func:`~protocols.jsonrpc.encode_batch`) or one by one. An unreadable line, an empty
    batch and a blank line are not batches; a blank line holds no item.
    """

    items: list[Incoming]
    is_batch: bool
