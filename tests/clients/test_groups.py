"""`protocols.groups`: an error alone in its exception group leaves bare."""

from __future__ import annotations

import anyio
import pytest

from protocols.groups import sole_exception, ungrouped

pytestmark = pytest.mark.anyio


def test_nested_groups_of_one_give_their_exception() -> None:
    error = ValueError("x")
    assert sole_exception(ExceptionGroup("a", [ExceptionGroup("b", [error])])) is error
    pair = ExceptionGroup("a", [error, KeyError("y")])
    assert sole_exception(pair) is pair


def test_a_group_of_several_stays_a_group() -> None:
    with pytest.raises(ExceptionGroup), ungrouped():
        raise ExceptionGroup("a", [ValueError("x"), KeyError("y")])


def test_the_exception_keeps_its_cause_and_context() -> None:
    cause, context = OSError("cause"), KeyError("context")
    error = ValueError("x")
    error.__cause__, error.__context__ = cause, context
    with pytest.raises(ValueError) as raised, ungrouped():
        raise ExceptionGroup("a", [error])
    assert raised.value is error
    assert (error.__cause__, error.__context__) == (cause, context)


async def test_a_task_group_body_error_leaves_bare() -> None:
    with pytest.raises(LookupError, match="body"), ungrouped():
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep_forever)
            raise LookupError("body")
