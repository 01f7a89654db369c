"""The life of the one managed vLLM process as an explicit state machine.

Everything the supervisor knows about the process and the switches asked of it is one
:class:`Snapshot`: the state, the launch's details and the switches queued or being loaded
(``pending``). Only :class:`ProcessStateMachine` replaces it: a state change goes along
:data:`TRANSITIONS` only (:meth:`~ProcessStateMachine.transition`); the pending list changes
through :meth:`~ProcessStateMachine.queue_switch`, :meth:`~ProcessStateMachine.start_switch`
and :meth:`~ProcessStateMachine.end_switch`. Each change is one synchronous step on the event
loop under the machine's lock (nothing is awaited between reading the snapshot and replacing
it; a change attempted while another is under way, from a subscriber or another thread, is a
bug and raises :class:`ConcurrentChange` instead of waiting). After each change the waiters
(:meth:`~ProcessStateMachine.wait_for`) look again and every subscriber
(:meth:`~ProcessStateMachine.subscribe`) gets one :class:`StateEvent`.

::

    STOPPED ──► STARTING ──► READY ──► DRAINING ──► STOPPING ──► STOPPED
    STARTING ──► STOPPING                 (a start given up: a stop, a failed switch's clean-up)
    READY ──► STOPPING                    (nothing in flight to drain, or force)
    STARTING | READY | DRAINING | STOPPING ──► FAILED
    FAILED ──► STARTING | STOPPING | STOPPED
    READY ──► PARKING ──► SLEEPING ──► WAKING ──► READY      (sleep mode: a model parked)
    PARKING | SLEEPING | WAKING ──► STOPPING | FAILED        (a sleep or wake given up; a death)

READY is the only state in which requests are forwarded. DRAINING: a stop or switch is waiting
for the requests in flight to finish (``--drain-timeout``); new ones wait for the next model.
PARKING is the same wait before vLLM is put to sleep; SLEEPING holds no GPU memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum

from aic_vllm_proxy.schemas import ProcessState
from aic_vllm_proxy.spec import ModelSpec

log = logging.getLogger(__name__)
S = ProcessState

#: The allowed transitions; anything else is a bug and raises :class:`InvalidTransition`.
TRANSITIONS: dict[ProcessState, frozenset[ProcessState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.DRAINING, S.STOPPING, S.FAILED, S.PARKING}),
    S.DRAINING: frozenset({S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING, S.STOPPED}),
    S.PARKING: frozenset({S.SLEEPING, S.STOPPING, S.FAILED}),
    S.SLEEPING: frozenset({S.WAKING, S.STOPPING, S.FAILED}),
    S.WAKING: frozenset({S.READY, S.STOPPING, S.FAILED}),
}


class InvalidTransition(RuntimeError):
    pass


class ConcurrentChange(RuntimeError):
    """The machine was changed while a change was under way (a subscriber or another thread)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Snapshot:
    """Everything known about the current (or last) launch and the switches asked for, replaced
    as a whole on change."""

    state: ProcessState = S.STOPPED
    pid: int | None = None
    model_spec: str | None = None
    model: str | None = None
    log_path: str | None = None
    started_at: datetime | None = None
    ready_at: datetime | None = None
    exit_code: int | None = None
    error: str | None = None
    launched_monotonic: float | None = None
    #: Sleep mode: the level it sleeps at, and since when (None while awake).
    sleep_level: int | None = None
    slept_at: datetime | None = None
    #: The switches queued or under way, in order; the one being loaded comes first.
    pending: tuple[ModelSpec, ...] = ()
    #: The log that shows why it failed, when not ``log_path``: a rank's on another node.
    failed_log: str | None = None

    @property
    def switching(self) -> bool:
        return bool(self.pending)


class EventKind(str, Enum):
    """What a :class:`StateEvent` reports."""

    TRANSITION = "transition"  #: the state changed (``old`` and ``new`` differ)
    PENDING = "pending"  #: a switch was queued, began loading or ended
    UPDATE = "update"  #: details of the current state changed (the pid once known, the log's name)


@dataclass(frozen=True)
class StateEvent:
    """One change of the machine, as its subscribers see it."""

    kind: EventKind
    old: ProcessState
    new: ProcessState
    snapshot: Snapshot  #: the snapshot after the change
    at: datetime = field(default_factory=_now)  #: wall clock (UTC)
    monotonic: float = field(default_factory=time.monotonic)


#: A subscriber: called synchronously after every change; it must not block nor change the machine.
Subscriber = Callable[[StateEvent], None]

#: Fields that only the machine's own methods change.
_OWN_FIELDS = frozenset({"state", "pending"})


class ProcessStateMachine:
    """Holds the current :class:`Snapshot`; the only place it changes."""

    def __init__(self) -> None:
        self._snapshot = Snapshot()
        self._changed = asyncio.Event()  # set (and replaced) on every change
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()  # held for each change; never waited for

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def state(self) -> ProcessState:
        return self._snapshot.state

    # ------------------------------------------------------------------ changes

    async def transition(self, to: ProcessState, **fields: object) -> Snapshot:
        """Move to ``to`` (which must be allowed from the current state) and update ``fields``.

        Entering STARTING begins a new launch: the previous launch's details are cleared.
        Entering STOPPED clears ``error`` and ``exit_code`` unless ``fields`` set them (the exit
        code of the process a stop ended).
        """
        snapshot = await self.transition_if(None, to, **fields)
        assert snapshot is not None
        return snapshot

    async def transition_if(
        self, only_from: frozenset[ProcessState] | None, to: ProcessState, **fields: object
    ) -> Snapshot | None:
        """Like :meth:`transition`, but do nothing and return None unless the current state is in
        ``only_from`` (for observers that race with a switch, such as the exit watcher)."""
        _check_fields(fields)
        with self._locked():
            current = self._snapshot.state
            if only_from is not None and current not in only_from:
                return None
            if to not in TRANSITIONS[current]:
                raise InvalidTransition(f"vLLM process cannot go from {current.value} to {to.value}")
            base = self._snapshot
            if to is S.STARTING:
                base = Snapshot(started_at=_now(), launched_monotonic=time.monotonic(), pending=base.pending)
            elif to is S.READY:
                base = replace(base, ready_at=_now(), error=None)
            elif to is S.STOPPED:
                # Nothing runs: a failure before the stop is history, not the current state.
                base = replace(base, pid=None, error=None, exit_code=None)
            return self._change(EventKind.TRANSITION, replace(base, state=to, **fields))  # type: ignore[arg-type]

    async def update(self, **fields: object) -> Snapshot:
        """Change details of the current state (e.g. the pid once known), not the state."""
        _check_fields(fields)
        with self._locked():
            return self._change(EventKind.UPDATE, replace(self._snapshot, **fields))  # type: ignore[arg-type]

    def queue_switch(self, spec: ModelSpec) -> Snapshot:
        """A switch to ``spec`` was asked for: it is pending (last in line) from now on."""
        with self._locked():
            return self._change(
                EventKind.PENDING, replace(self._snapshot, pending=(*self._snapshot.pending, spec))
            )

    def start_switch(self, spec: ModelSpec) -> Snapshot:
        """The queued switch to ``spec`` (this very object) is being done: it comes first."""
        with self._locked():
            rest = _without(self._snapshot.pending, spec)
            return self._change(EventKind.PENDING, replace(self._snapshot, pending=(spec, *rest)))

    def end_switch(self, spec: ModelSpec) -> Snapshot:
        """The switch to ``spec`` (this very object) is over, however it ended (no change, and
        no event, when it is not pending)."""
        with self._locked():
            pending = _without(self._snapshot.pending, spec)
            if pending is self._snapshot.pending:
                return self._snapshot
            return self._change(EventKind.PENDING, replace(self._snapshot, pending=pending))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise ConcurrentChange("the vLLM state machine was changed while a change was under way")
        try:
            yield
        finally:
            self._lock.release()

    def _change(self, kind: EventKind, snapshot: Snapshot) -> Snapshot:
        """Replace the snapshot, wake the waiters, tell the subscribers (under the lock)."""
        old, self._snapshot = self._snapshot, snapshot
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        event = StateEvent(kind, old.state, snapshot.state, snapshot)
        for subscriber in tuple(self._subscribers):
            try:
                subscriber(event)
            except Exception:  # a subscriber never breaks a change
                log.exception("state event subscriber %r failed on %s", subscriber, kind.value)
        return snapshot

    # --------------------------------------------------------------- observers

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` with a :class:`StateEvent` after every change; returns the call that
        unsubscribes it. Callbacks run synchronously in the changing step: they must be quick,
        must not block and must not change the machine; one that raises is logged and skipped."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    async def wait_for(self, predicate: Callable[[Snapshot], bool], timeout: float | None) -> Snapshot:
        """Wait until ``predicate(snapshot)`` is true; raise :class:`TimeoutError` after ``timeout``.
        The predicate is looked at again after every change of the snapshot."""

        async def _wait() -> Snapshot:
            while not predicate(self._snapshot):
                await self._changed.wait()
            return self._snapshot

        return await asyncio.wait_for(_wait(), timeout)


def _check_fields(fields: dict[str, object]) -> None:
    own = _OWN_FIELDS.intersection(fields)
    if own:
        raise TypeError(f"{', '.join(sorted(own))} change only through the machine's own methods")


def _without(pending: tuple[ModelSpec, ...], spec: ModelSpec) -> tuple[ModelSpec, ...]:
    """``pending`` without the entry that is ``spec`` itself (an equal spec queued twice is two
    switches)."""
    for index, queued in enumerate(pending):
        if queued is spec:
            return pending[:index] + pending[index + 1 :]
    return pending
