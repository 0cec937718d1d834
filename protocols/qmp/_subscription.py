"""Event subscriptions: a name filter and a bounded buffer per subscriber.

The connection's reader hands every event to every subscription without waiting: a
full buffer drops the event and counts it, so a subscriber that does not read never
slows the replies or the other subscribers.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Final, Self

import anyio
import msgspec

from ._core import QMPEvent
from ._errors import ConnectionLostError

DEFAULT_MAX_BUFFER: Final = 1024


class EventsDropped(msgspec.Struct, frozen=True):
    """Yielded where events were lost because the subscriber's buffer was full: ``count``
    events that matched the filter arrived between the previous item and the next one.
    """

    count: int


class _State(enum.Enum):
    NEW = enum.auto()
    ACTIVE = enum.auto()
    CLOSED = enum.auto()


class EventSubscription:
    """An async context manager yielding itself, an async iterator of events.

    Iteration yields :class:`~protocols.qmp.QMPEvent` items in the order QEMU sent
    them, and an :class:`EventsDropped` marker at the place where events were lost to
    overflow. Once the connection is lost and the buffer is drained, iteration raises
    :class:`~protocols.qmp.ConnectionLostError`. After the ``async with`` block ends,
    iteration stops.

    Create it with :meth:`QMPClient.events() <protocols.qmp.QMPClient.events>`.
    """

    def __init__(
        self,
        names: Collection[str] | None,
        max_buffer: int,
        attach: Callable[[EventSubscription], None],
        detach: Callable[[EventSubscription], None],
    ) -> None:
        if isinstance(names, str):
            raise TypeError(f"names must be a collection of event names, not {names!r}")
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be at least 1, not {max_buffer}")
        self._names = None if names is None else frozenset(names)
        self._max_buffer = max_buffer
        self._attach = attach
        self._detach = detach
        self._items: deque[QMPEvent | EventsDropped] = deque()
        self._wakeup: anyio.Event | None = None
        self._state = _State.NEW
        self._connection_lost_error: Callable[[], ConnectionLostError] | None = None
        self.dropped = 0
        """How many matching events were dropped because the buffer was full."""

    @property
    def names(self) -> frozenset[str] | None:
        """The event names this subscription receives, or ``None`` for all."""
        return self._names

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError("an event subscription can be entered only once")
        self._state = _State.ACTIVE
        self._attach(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._state = _State.CLOSED
        self._detach(self)
        self._items.clear()
        self._wake()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> QMPEvent | EventsDropped:
        """Return the next buffered item, waiting for one if need be.

        Raises:
            ConnectionLostError: the connection is gone and the buffer is empty.
            StopAsyncIteration: the subscription's ``async with`` block has ended.

        On cancellation, nothing is consumed.
        """
        while True:
            if self._state is not _State.ACTIVE:
                if self._state is _State.NEW:
                    raise RuntimeError("enter the subscription with `async with` first")
                raise StopAsyncIteration
            if self._items:
                return self._items.popleft()
            if self._connection_lost_error is not None:
                raise self._connection_lost_error()
            self._wakeup = wakeup = anyio.Event()
            await wakeup.wait()

    def _publish(self, event: QMPEvent) -> None:
        """Buffer an event if it matches the filter; never blocks. Called by the reader."""
        if self._names is not None and event.name not in self._names:
            return
        items = self._items
        if len(items) < self._max_buffer:
            items.append(event)
            self._wake()
            return
        self.dropped += 1
        # The buffer may exceed max_buffer by this one marker, which later drops merge
        # into until the subscriber makes room.
        last = items[-1]
        if isinstance(last, EventsDropped):
            items[-1] = EventsDropped(last.count + 1)
        else:
            items.append(EventsDropped(1))

    def _connection_lost(self, error: Callable[[], ConnectionLostError]) -> None:
        """Let the iterator raise ``error()`` once drained. Called by the client."""
        self._connection_lost_error = error
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
