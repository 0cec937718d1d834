"""Logging set-up for the command-line program (the library never configures logging).

Logs always go to stderr: JSON lines when stderr is not a terminal, the console
renderer when it is. Context such as ``instance=`` and ``request_id=`` is bound
through structlog's contextvars.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(*, level: str = "info", json_lines: bool | None = None) -> None:
    """Send structlog output to stderr; JSON unless stderr is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
