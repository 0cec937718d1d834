"""Exception groups at an API boundary: an error that is alone in its group leaves bare.

anyio's task groups wrap whatever leaves them, the body's own exception included, in an
exception group; the APIs of this project promise plain exceptions. `ungrouped` around a
task group gives that promise back: a group holding one exception (however deeply
nested) is re-raised as that exception, with its traceback, cause and context; a group
of several stays a group, since dropping any of them would hide an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["sole_exception", "ungrouped"]


def sole_exception(error: BaseException) -> BaseException:
    """The exception alone inside `error` (groups of one, nested or not), else `error`."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


@contextmanager
def ungrouped() -> Iterator[None]:
    """Re-raise an exception group holding one exception as that exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        sole = sole_exception(group)
        if sole is group:
            raise
        # Raising here would make the group the exception's context: keep its own.
        context = sole.__context__
        try:
            raise sole
        finally:
            sole.__context__ = context
