"""An instance's state events, told on the event bus (``aic_vllm_proxy.events``).

:class:`StateReporter` is subscribed to each instance's state machine: every transition becomes
a ``state`` event (and a launch's pid and log, known a moment after ``starting``, a ``launched``
event), and the ones that mean more become their own event too: ``load`` (ready after
a launch or a wake, with the seconds it took), ``unload`` (a model that was ready left its GPUs:
stopped or parked; not one that had died or slept, which held no GPU any more) and ``failure``
(with the root cause and the log tail, read off the event loop, so it comes a moment after its
``state`` event). The metrics count from these events (``Metrics.heard``): a transition is
interpreted here, once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

from aic_vllm_proxy.engine.logs import tail_with_cause
from aic_vllm_proxy.engine.state import EventKind, StateEvent
from aic_vllm_proxy.events import EventBus, detached
from aic_vllm_proxy.schemas import ProcessState

S = ProcessState
#: Lines of the log a ``failure`` event carries (the root cause's lines come first when earlier).
FAILURE_TAIL_LINES = 20


class Named(Protocol):
    @property
    def name(self) -> str: ...


class StateReporter:
    """One instance's state events, published on ``bus`` (a state machine subscriber)."""

    def __init__(self, instance: Named, bus: EventBus) -> None:
        self.instance = instance
        self.bus = bus
        self._waking_since: float | None = None  # monotonic: when its wake began
        self._holding = False  # ready (or draining, parking) since its last load: on its GPUs
        self._tasks: set[asyncio.Task[None]] = set()
        self._pid: int | None = None  # the pid last told (a launch's comes after its starting)

    def _launched(self, pid: int, log_path: str | None, model_spec: str | None) -> None:
        """vLLM was spawned: its pid and its log's final name (a moment after ``starting``)."""
        self._pid = pid
        self.bus.publish("launched", self.instance.name, pid=pid, log_path=log_path, model_spec=model_spec)

    def __call__(self, event: StateEvent) -> None:
        snap = event.snapshot
        if event.kind is EventKind.UPDATE and snap.pid is not None and snap.pid != self._pid:
            self._launched(snap.pid, snap.log_path, snap.model_spec)
        if event.kind is not EventKind.TRANSITION:
            return
        old, new = event.old, event.new
        self._pid = snap.pid
        name = self.instance.name
        self.bus.publish(
            "state",
            name,
            old=old.value,
            new=new.value,
            pid=snap.pid,
            model_spec=snap.model_spec,
            error=snap.error,
            exit_code=snap.exit_code,
            sleep_level=snap.sleep_level,
        )
        held = self._holding
        if new is S.READY:
            self._holding = True
        elif new not in (S.DRAINING, S.PARKING, S.STOPPING):  # on the way out: still holding
            self._holding = False
        if new is S.WAKING:
            self._waking_since = event.monotonic
        elif new is S.READY:
            began, reason = (
                (snap.launched_monotonic, "start") if old is S.STARTING else (self._waking_since, "wake")
            )
            seconds = None if began is None else round(max(event.monotonic - began, 0.0), 3)
            self.bus.publish("load", name, reason=reason, seconds=seconds, model_spec=snap.model_spec)
        elif new is S.SLEEPING:
            self.bus.publish("unload", name, reason="parked", model_spec=snap.model_spec)
        elif new is S.STOPPED and held:  # not a model that failed, or slept, before its stop
            self.bus.publish("unload", name, reason="stopped", model_spec=snap.model_spec)
        elif new is S.FAILED:
            reason = "load" if old is S.STARTING else "died"
            logged = snap.failed_log or snap.log_path
            path = Path(logged) if logged else None
            task = asyncio.ensure_future(
                detached(self._failure(name, reason, snap.error, snap.exit_code, snap.model_spec, path))
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if old is S.WAKING:
            self._waking_since = None

    async def _failure(
        self,
        name: str,
        reason: str,
        error: str | None,
        exit_code: int | None,
        model_spec: str | None,
        path: Path | None,
    ) -> None:
        tail: list[str] = []
        cause = None
        if path is not None:
            try:
                tail, found = await tail_with_cause(path, FAILURE_TAIL_LINES)
                cause = found.text if found is not None else None
            except OSError:
                pass
        self.bus.publish(
            "failure",
            name,
            reason=reason,
            error=error,
            root_cause=cause,
            exit_code=exit_code,
            model_spec=model_spec,
            log_tail=tail,
        )
