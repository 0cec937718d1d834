"""The event bus: filtering, bounded queues, the dropped-count event, closing."""

from __future__ import annotations

import anyio
import pytest

from supervisor.engine.events import DROPPED_KIND, EventBus, make_event

pytestmark = pytest.mark.anyio


async def test_filters_by_instance_and_kind_prefix() -> None:
    bus = EventBus()
    async with bus.subscribe(instances=["a"], kinds=["qmp.", "instance.state"]) as sub:
        bus.publish(make_event("b", "qmp.STOP"))
        bus.publish(make_event("a", "migration.progress"))
        bus.publish(make_event("a", "qmp.STOP"))
        bus.publish(make_event("a", "instance.state", {"state": "paused"}))
        bus.publish(make_event("a", "instance.stateX"))
        bus.close_all()
        kinds = [event.kind async for event in sub]
    assert kinds == ["qmp.STOP", "instance.state"]


async def test_overflow_is_counted_and_reported_in_place() -> None:
    bus = EventBus()
    async with bus.subscribe(max_buffer=3) as sub:
        for n in range(10):
            bus.publish(make_event("a", "qmp.X", {"n": n}))
        bus.publish(make_event("a", "qmp.X", {"n": 99}))
        bus.close_all()
        received = [event async for event in sub]
    assert [e.data.get("n") for e in received[:3]] == [0, 1, 2]
    assert received[3].kind == DROPPED_KIND
    assert received[3].data == {"count": 8}
    assert len(received) == 4
    assert sub.dropped_total == 8


async def test_queue_keeps_flowing_after_a_drop() -> None:
    bus = EventBus()
    async with bus.subscribe(max_buffer=1) as sub:
        bus.publish(make_event("a", "k", {"n": 1}))
        bus.publish(make_event("a", "k", {"n": 2}))
        first = await sub.__anext__()
        dropped = await sub.__anext__()
        bus.publish(make_event("a", "k", {"n": 3}))
        third = await sub.__anext__()
    assert (first.data["n"], dropped.data, third.data["n"]) == (1, {"count": 1}, 3)


async def test_a_waiting_subscriber_wakes_on_publish() -> None:
    bus = EventBus()
    received = []
    async with bus.subscribe() as sub, anyio.create_task_group() as tg:

        async def read_one() -> None:
            received.append(await sub.__anext__())

        tg.start_soon(read_one)
        await anyio.wait_all_tasks_blocked()
        bus.publish(make_event("a", "instance.state"))
    assert [e.kind for e in received] == ["instance.state"]


async def test_a_reader_that_never_reads_holds_only_its_bound() -> None:
    bus = EventBus()
    async with bus.subscribe(max_buffer=10) as sub:
        for n in range(100_000):
            bus.publish(make_event("a", "qmp.X", {"n": n}))
        assert sub.dropped_total == 100_000 - 10
        assert len(sub._queue) == 11
