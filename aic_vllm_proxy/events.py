"""The daemon's event bus: what happens to its models, as it happens (``GET /events``, docs/events.md).

The engine and the hooks publish each occurrence once (:meth:`EventBus.publish`): a state
transition, a load or unload, an eviction, a TTL expiry, a restart, a drain, a switch's progress,
a hook's report, a failure. Each becomes one JSON-able payload with an ``id`` (one sequence per
daemon run), a ``type``, a ``time``, the ``model`` (the instance's name) and the ``request_id``
of the request that caused it, read from :data:`CURRENT_REQUEST` (the pipeline and the control
routes set it; tasks inherit it from the request that made them, and the long-lived ones clear
it: :func:`detached`).

Two kinds of readers: *listeners* are called synchronously with every payload (the metrics
count from them); *subscribers* (:meth:`EventBus.subscribe`, one per ``/events`` connection)
get their own bounded queue. A subscriber that reads slower than events come loses the oldest
ones and is told how many (a ``dropped`` event before the rest): publishing never waits for a
reader, so a slow one never slows the daemon. The last :data:`HISTORY` events are kept for a
reader that reconnects with ``Last-Event-ID``.

Events are rare (a few per load or switch, none per request or token): a payload is a plain
dict built once and shared by every reader.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from aic_vllm_proxy.schemas import EVENT_TYPES

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The X-Request-Id of the request being served (or that made the current task), if any.
CURRENT_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("aic_request_id", default=None)
#: How many recent events are kept for readers that reconnect (``Last-Event-ID``).
HISTORY = 256
#: A subscriber's queue, unless the daemon is told otherwise (``--event-queue-size``).
QUEUE_SIZE = 1000

Event = dict[str, Any]
Listener = Callable[[Event], None]


async def detached(work: Awaitable[T]) -> T:
    """Run ``work`` with no request id: for tasks that outlive the request that started them
    (exit watchers, health checks, TTL checks, restarts), whose events no request caused."""
    CURRENT_REQUEST.set(None)  # the task's own copy of the context: the request keeps its id
    return await work


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def encode(event: Event) -> bytes:
    """One Server-Sent Events message: ``id:`` and one ``data:`` line of JSON."""
    return b"id: %d\ndata: %s\n\n" % (event["id"], json.dumps(event, separators=(",", ":")).encode())


class Subscription:
    """One reader's bounded queue (:meth:`EventBus.subscribe`); close it when done."""

    def __init__(self, bus: EventBus, size: int) -> None:
        self._bus = bus
        self._queue: deque[Event] = deque()
        self._size = max(size, 1)
        self._ready = asyncio.Event()
        self.dropped = 0  # events lost since the reader last took one (reported, then reset)
        self.closed = False

    def put(self, event: Event) -> None:
        """Queue ``event``; the oldest one goes when the queue is full. Never waits."""
        if len(self._queue) >= self._size:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._ready.set()

    def close(self) -> None:
        """No more events: :meth:`get` returns None once the queue is empty."""
        self.closed = True
        self._ready.set()
        self._bus._subscribers.discard(self)

    async def get(self, timeout: float) -> Event | None:
        """The next event; a ``dropped`` event first when some were lost. Raises
        :class:`TimeoutError` after ``timeout`` seconds without one; None once closed."""
        while not self._queue:
            if self.closed:
                return None
            self._ready.clear()
            await asyncio.wait_for(self._ready.wait(), timeout)
        if self.dropped:
            count, self.dropped = self.dropped, 0
            return self._bus.make("dropped", None, count=count)
        return self._queue.popleft()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Publishes events to its listeners and subscribers (one per application)."""

    def __init__(self, queue_size: int = QUEUE_SIZE) -> None:
        self.queue_size = queue_size
        self.last_id = 0
        self._history: deque[Event] = deque(maxlen=HISTORY)
        self._listeners: list[Listener] = []
        self._subscribers: set[Subscription] = set()

    def make(self, type_: str, model: str | None, **fields: Any) -> Event:
        """A payload with no id of its own (0): for one subscriber (``hello``, ``dropped``)."""
        return {"id": 0, "type": type_, "time": _now(), "model": model, "request_id": None, **fields}

    def publish(self, type_: str, model: str | None = None, **fields: Any) -> Event:
        """Publish one event of ``type_`` about ``model``. Synchronous and never waits."""
        assert type_ in EVENT_TYPES, type_  # schemas.EVENT_TYPES: the client knows them too
        self.last_id += 1
        event = self.make(type_, model, **fields)
        event["id"], event["request_id"] = self.last_id, CURRENT_REQUEST.get()
        self._history.append(event)
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener never breaks what reported the event
                log.exception("event listener %r failed on %s", listener, type_)
        for subscription in tuple(self._subscribers):
            subscription.put(event)
        return event

    def listen(self, listener: Listener) -> None:
        """Call ``listener`` synchronously with every event (quick; it must not publish)."""
        self._listeners.append(listener)

    def subscribe(self, after: int | None = None) -> Subscription:
        """A new reader's queue. ``after``: the id of the last event it saw (``Last-Event-ID``):
        the later events still kept come first, and a ``dropped`` count for those no longer kept."""
        subscription = Subscription(self, self.queue_size)
        if after is not None and 0 <= after < self.last_id:
            kept = [event for event in self._history if event["id"] > after]
            first = kept[0]["id"] if kept else self.last_id + 1
            missed = first - after - 1
            subscription.dropped = missed
            for event in kept:
                subscription.put(event)
        self._subscribers.add(subscription)
        return subscription

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        """The daemon is stopping: every reader's stream ends."""
        for subscription in tuple(self._subscribers):
            subscription.close()


#: What engine objects made without an application (unit tests) publish to: nobody reads it.
UNHEARD = EventBus()
