"""The life of the one managed vLLM process as an explicit state machine.

Every change of state goes through :meth:`ProcessStateMachine.transition`, under one lock,
and only along :data:`TRANSITIONS`. Waiters (proxied requests during a switch, the
``/switch`` handler) are woken on every change.

::

    STOPPED ──► STARTING ──► READY ──► STOPPING ──► STOPPED
       ▲           │  │        │          ▲  │
       │           │  └────────┴─► FAILED ┘  │ (a failed or stuck process is still stopped)
       └───────────┴──────────────── ◄───────┘
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from aic_vllm_proxy.schemas import ProcessState

S = ProcessState

#: The allowed transitions; anything else is a bug and raises :class:`InvalidTransition`.
TRANSITIONS: dict[ProcessState, frozenset[ProcessState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING, S.STOPPED}),
}


class InvalidTransition(RuntimeError):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Snapshot:
    """Everything known about the current (or last) launch, replaced as a whole on change."""

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


class ProcessStateMachine:
    """Holds the current :class:`Snapshot`; the only place it changes."""

    def __init__(self) -> None:
        self._snapshot = Snapshot()
        self._changed = asyncio.Condition()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def state(self) -> ProcessState:
        return self._snapshot.state

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
        async with self._changed:
            current = self._snapshot.state
            if only_from is not None and current not in only_from:
                return None
            if to not in TRANSITIONS[current]:
                raise InvalidTransition(f"vLLM process cannot go from {current.value} to {to.value}")
            base = self._snapshot
            if to is S.STARTING:
                base = Snapshot(started_at=_now(), launched_monotonic=time.monotonic())
            elif to is S.READY:
                base = replace(base, ready_at=_now(), error=None)
            elif to is S.STOPPED:
                # Nothing runs: a failure before the stop is history, not the current state.
                base = replace(base, pid=None, error=None, exit_code=None)
            self._snapshot = replace(base, state=to, **fields)  # type: ignore[arg-type]
            self._changed.notify_all()
            return self._snapshot

    async def update(self, **fields: object) -> Snapshot:
        """Change details of the current state (e.g. the pid once known), not the state."""
        async with self._changed:
            self._snapshot = replace(self._snapshot, **fields)  # type: ignore[arg-type]
            self._changed.notify_all()
            return self._snapshot

    async def wait_for(self, predicate: Callable[[Snapshot], bool], timeout: float | None) -> Snapshot:
        """Wait until ``predicate(snapshot)`` is true; raise :class:`TimeoutError` after ``timeout``."""

        async def _wait() -> Snapshot:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self._snapshot))
                return self._snapshot

        return await asyncio.wait_for(_wait(), timeout)

    async def poke(self) -> None:
        """Wake the waiters without a change (their predicates may read other state)."""
        async with self._changed:
            self._changed.notify_all()
