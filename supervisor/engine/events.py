"""Fan-out of supervisor events to subscribers with bounded, never-blocking queues.

A publisher never waits for a subscriber: each subscriber has its own bounded
queue, and when it is full the events that do not fit are counted. The
subscriber then receives one ``events.dropped`` event (``data: {count}``) at the
place in the stream where the loss happened, and continues (API.md §4).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec

DROPPED_KIND = "events.dropped"


class SupervisorEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event: an instance's state change, migration progress or a QMP event."""

    #: None for events about no instance (``events.dropped``).
    instance: str | None
    kind: str
    timestamp: float
    data: Mapping[str, Any] = msgspec.field(default_factory=dict)


def make_event(
    instance: str | None, kind: str, data: Mapping[str, Any] | None = None
) -> SupervisorEvent:
    """An event stamped with the current wall-clock time."""
    return SupervisorEvent(instance=instance, kind=kind, timestamp=time.time(), data=data or {})


class _Dropped:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 1


class EventFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which events a subscriber wants: instance names, and kinds or kind prefixes ("qmp.")."""

    instances: frozenset[str] | None = None
    kinds: tuple[str, ...] | None = None

    def matches(self, event: SupervisorEvent) -> bool:
        if self.instances is not None and event.instance not in self.instances:
            return False
        if self.kinds is None:
            return True
        return any(
            event.kind == kind or (kind.endswith(".") and event.kind.startswith(kind))
            for kind in self.kinds
        )


class Subscription:
    """A subscriber's queue; iterate it with ``async for``.

    Iteration ends when the bus closes. Cancelling a pending ``__anext__`` loses
    nothing: the event stays queued.
    """

    def __init__(self, event_filter: EventFilter, max_buffer: int) -> None:
        self.filter = event_filter
        self._max_buffer = max_buffer
        self._queue: deque[SupervisorEvent | _Dropped] = deque()
        self._wakeup = anyio.Event()
        self._closed = False
        self.dropped_total = 0

    def offer(self, event: SupervisorEvent) -> None:
        """Queue an event without ever blocking; count it as dropped when the queue is full."""
        if self._closed or not self.filter.matches(event):
            return
        if len(self._queue) < self._max_buffer:
            self._queue.append(event)
        else:
            self.dropped_total += 1
            last = self._queue[-1]
            if isinstance(last, _Dropped):
                last.count += 1
            else:
                # One slot past the bound, so the loss shows where it happened.
                self._queue.append(_Dropped())
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> SupervisorEvent:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        item = self._queue.popleft()
        if isinstance(item, _Dropped):
            return make_event(None, DROPPED_KIND, {"count": item.count})
        return item


class EventBus:
    """Publishes events to every matching subscription."""

    def __init__(self, default_max_buffer: int = 1000) -> None:
        self._subscriptions: set[Subscription] = set()
        self._default_max_buffer = default_max_buffer

    def publish(self, event: SupervisorEvent) -> None:
        for subscription in tuple(self._subscriptions):
            subscription.offer(event)

    def open(
        self,
        *,
        instances: Iterable[str] | None = None,
        kinds: Iterable[str] | None = None,
        max_buffer: int | None = None,
    ) -> Subscription:
        """Register a subscription; the caller must ``close`` it (see ``subscribe``)."""
        event_filter = EventFilter(
            instances=frozenset(instances) if instances is not None else None,
            kinds=tuple(kinds) if kinds is not None else None,
        )
        subscription = Subscription(event_filter, max_buffer or self._default_max_buffer)
        self._subscriptions.add(subscription)
        return subscription

    def close(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        subscription.close()

    @asynccontextmanager
    async def subscribe(
        self,
        *,
        instances: Iterable[str] | None = None,
        kinds: Iterable[str] | None = None,
        max_buffer: int | None = None,
    ) -> AsyncIterator[Subscription]:
        """A subscription that is closed when the block is left."""
        subscription = self.open(instances=instances, kinds=kinds, max_buffer=max_buffer)
        try:
            yield subscription
        finally:
            self.close(subscription)

    def close_all(self) -> None:
        for subscription in tuple(self._subscriptions):
            self.close(subscription)
