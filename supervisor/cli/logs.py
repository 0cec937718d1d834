"""Logging set-up for the command-line program (the library never configures logging).

The library logs through the standard `logging` module (`supervisor.log`); the program
is its host: it gives the root logger one handler on stderr, whose formatter renders
every record with structlog's renderers: JSON lines when stderr is not a terminal, the
console renderer when it is. The fields the library bound (``instance=``,
``request_id=``) come from each record's ``event_dict``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def _library_fields(_: Any, __: str, event_dict: structlog.typing.EventDict) -> Any:
    """Replace the rendered message of a library record by the fields it was made from."""
    fields = getattr(event_dict["_record"], "event_dict", None)
    if fields is not None:
        event_dict.update(fields)
    return event_dict


def configure_logging(*, level: str = "info", json_lines: bool | None = None) -> None:
    """Send every log record to stderr; JSON unless stderr is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=True)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                _library_fields,
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelNamesMapping()[level.upper()])
