"""The library's loggers: structlog's API, emitting through the standard `logging` module.

A library is silent until its host configures logging. So every logger here is a
structlog `BoundLogger` (``log.info("launched", pid=4242)``, ``.bind(instance=name)``)
wrapped around ``logging.getLogger(name)`` with its own processors: it never depends
on the global ``structlog.configure``, which belongs to the host program. The
``supervisor`` package logger has a `logging.NullHandler` (set in ``supervisor/__init__``),
so nothing is printed anywhere, not even warnings, unless the host adds handlers.

Each record's message is the event and its fields, ``launched pid=4242 instance='vm1'``,
readable by any formatter; ``record.event_dict`` holds the same as a dict (``event``,
``instance``, ...) for hosts that render records themselves, as ``kvm-supervisor serve``
does (`supervisor.cli.logs`).
"""

from __future__ import annotations

import logging
from typing import Any, Final

import structlog

__all__ = ["get_logger"]

_FIELDS: Final = structlog.processors.KeyValueRenderer(sort_keys=False)


def _to_record(
    _: Any, __: str, event_dict: structlog.typing.EventDict
) -> tuple[tuple[str], dict[str, Any]]:
    """The positional and keyword arguments of the stdlib logging call."""
    exc_info = event_dict.pop("exc_info", None)
    fields = {key: value for key, value in event_dict.items() if key != "event"}
    event = str(event_dict.get("event", ""))
    message = f"{event} {_FIELDS(None, '', fields)}" if fields else event
    return (message,), {"exc_info": exc_info, "extra": {"event_dict": event_dict}}


#: No ``merge_contextvars``: structlog's context variables belong to the host program;
#: the library's records carry what the library binds and nothing else.
_PROCESSORS: Final[list[structlog.typing.Processor]] = [
    # First, so that a disabled level costs no formatting.
    structlog.stdlib.filter_by_level,
    _to_record,
]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """The logger `name` (a module's ``__name__``) of the library."""
    return structlog.stdlib.BoundLogger(logging.getLogger(name), _PROCESSORS, {})
