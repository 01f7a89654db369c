"""The process state machine's events and pending switches (``engine/state.py``; issue 12).

Every change of the machine's snapshot reaches the subscribers as one :class:`StateEvent`: a
transition with its old and new state, a change of the pending switches, a detail of the state.
A transition that is not allowed raises and tells nobody. Unit tests: no process is started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone

import pytest

from aic_vllm_proxy.engine.state import (
    TRANSITIONS,
    EventKind,
    InvalidTransition,
    ProcessStateMachine,
    StateEvent,
)
from aic_vllm_proxy.schemas import ProcessState
from aic_vllm_proxy.spec import ModelSpec

S = ProcessState
ALLOWED = [(a, b) for a in S for b in S if b in TRANSITIONS[a]]
REFUSED = [(a, b) for a in S for b in S if b not in TRANSITIONS[a]]


def _path_to(state: ProcessState) -> list[ProcessState]:
    """The shortest way from STOPPED to ``state`` along allowed transitions (found in the table)."""
    paths: dict[ProcessState, list[ProcessState]] = {S.STOPPED: []}
    frontier = [S.STOPPED]
    while frontier:
        here = frontier.pop(0)
        for there in sorted(TRANSITIONS[here], key=lambda s: s.value):
            if there not in paths:
                paths[there] = [*paths[here], there]
                frontier.append(there)
    return paths[state]


async def _machine_in(state: ProcessState) -> tuple[ProcessStateMachine, list[StateEvent]]:
    """A machine in ``state`` and the list its events go to from now on."""
    machine = ProcessStateMachine()
    for step in _path_to(state):
        await machine.transition(step)
    assert machine.state is state
    events: list[StateEvent] = []
    machine.subscribe(events.append)
    return machine, events


def test_every_state_can_be_reached_and_draining_is_between_ready_and_stopping() -> None:
    assert set(TRANSITIONS) == set(S)
    for state in S:
        assert _path_to(state)[-1:] == ([state] if state is not S.STOPPED else [])
    assert TRANSITIONS[S.DRAINING] == {S.STOPPING, S.FAILED}  # a drain ends in a stop (or a death)
    assert S.DRAINING in TRANSITIONS[S.READY]
    assert all(S.DRAINING not in TRANSITIONS[s] for s in S if s is not S.READY)


@pytest.mark.parametrize(("start", "to"), ALLOWED, ids=[f"{a.value}->{b.value}" for a, b in ALLOWED])
async def test_each_allowed_transition_emits_one_event(start: ProcessState, to: ProcessState) -> None:
    machine, events = await _machine_in(start)
    wall, mono = datetime.now(timezone.utc), time.monotonic()
    snap = await machine.transition(to, error="why") if to is S.FAILED else await machine.transition(to)
    assert len(events) == 1, events
    event = events[0]
    assert (event.kind, event.old, event.new) == (EventKind.TRANSITION, start, to)
    assert event.snapshot is snap is machine.snapshot
    assert event.at.tzinfo is not None and abs(event.at - wall) < timedelta(seconds=5)
    assert mono <= event.monotonic <= time.monotonic()


@pytest.mark.parametrize(("start", "to"), REFUSED, ids=[f"{a.value}->{b.value}" for a, b in REFUSED])
async def test_a_refused_transition_raises_and_emits_nothing(start: ProcessState, to: ProcessState) -> None:
    machine, events = await _machine_in(start)
    before = machine.snapshot
    with pytest.raises(InvalidTransition, match=f"from {start.value} to {to.value}"):
        await machine.transition(to)
    assert machine.snapshot is before and events == []


async def test_transition_if_from_another_state_emits_nothing() -> None:
    machine, events = await _machine_in(S.DRAINING)
    assert await machine.transition_if(frozenset({S.READY}), S.FAILED) is None
    assert events == []
    assert await machine.transition_if(frozenset({S.READY, S.DRAINING}), S.FAILED, error="died")
    assert [(e.old, e.new) for e in events] == [(S.DRAINING, S.FAILED)]


async def test_pending_switches_in_order_with_an_event_each() -> None:
    machine, events = await _machine_in(S.READY)
    a, b, c = ModelSpec.parse("a"), ModelSpec.parse("b --x 1"), ModelSpec.parse("a")  # c equals a
    assert not machine.snapshot.switching
    machine.queue_switch(a)
    machine.queue_switch(b)
    machine.queue_switch(c)
    assert machine.snapshot.pending == (a, b, c) and machine.snapshot.switching
    machine.start_switch(b)  # b got the switch lock first: it is being loaded
    assert [s.raw for s in machine.snapshot.pending] == ["b --x 1", "a", "a"]
    machine.end_switch(c)  # this very object, not the first equal one
    assert machine.snapshot.pending[1] is a and len(machine.snapshot.pending) == 2
    machine.end_switch(c)  # no longer pending: no change, no event
    machine.end_switch(b)
    machine.end_switch(a)
    assert machine.snapshot.pending == () and not machine.snapshot.switching
    kinds = [(e.kind, e.old, e.new) for e in events]
    assert kinds == [(EventKind.PENDING, S.READY, S.READY)] * 7
    assert [len(e.snapshot.pending) for e in events] == [1, 2, 3, 3, 2, 1, 0]


async def test_a_new_launch_keeps_the_pending_switches() -> None:
    machine, _ = await _machine_in(S.FAILED)
    spec = ModelSpec.parse("m")
    machine.queue_switch(spec)
    snap = await machine.transition(S.STARTING, model_spec="m")
    assert snap.pending == (spec,) and snap.model_spec == "m"


async def test_updates_emit_an_event_and_cannot_change_the_state_or_the_pending_list() -> None:
    machine, events = await _machine_in(S.STARTING)
    await machine.update(pid=42)
    assert [(e.kind, e.old, e.new, e.snapshot.pid) for e in events] == [
        (EventKind.UPDATE, S.STARTING, S.STARTING, 42)
    ]
    with pytest.raises(TypeError, match="state"):
        await machine.update(state=S.READY)
    with pytest.raises(TypeError, match="pending"):
        await machine.transition(S.READY, pending=())
    assert machine.state is S.STARTING and len(events) == 1


async def test_a_failing_subscriber_is_logged_and_breaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    machine = ProcessStateMachine()

    def broken(event: StateEvent) -> None:
        raise RuntimeError("subscriber bug")

    seen: list[StateEvent] = []
    machine.subscribe(broken)
    machine.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="aic_vllm_proxy.engine.state"):
        snap = await machine.transition(S.STARTING)
    assert snap.state is S.STARTING and machine.state is S.STARTING
    assert [(e.old, e.new) for e in seen] == [(S.STOPPED, S.STARTING)]  # the next one still heard
    assert "subscriber bug" in caplog.text and "failed" in caplog.text


async def test_a_subscriber_cannot_change_the_machine_inside_a_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Changes never nest: one made from inside another (here by a subscriber) is refused with
    ConcurrentChange (logged as that subscriber's failure), and the first change stands alone."""
    machine = ProcessStateMachine()
    spec = ModelSpec.parse("m")
    seen: list[StateEvent] = []

    def meddler(event: StateEvent) -> None:
        machine.queue_switch(spec)

    machine.subscribe(meddler)
    machine.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="aic_vllm_proxy.engine.state"):
        await machine.transition(S.STARTING)
    assert machine.snapshot.pending == () and [(e.old, e.new) for e in seen] == [(S.STOPPED, S.STARTING)]
    assert "ConcurrentChange" in caplog.text


async def test_unsubscribe() -> None:
    machine = ProcessStateMachine()
    seen: list[StateEvent] = []
    unsubscribe = machine.subscribe(seen.append)
    await machine.transition(S.STARTING)
    unsubscribe()
    unsubscribe()  # twice is harmless
    await machine.transition(S.READY)
    assert [e.new for e in seen] == [S.STARTING]


async def test_waiters_see_every_change_of_the_snapshot() -> None:
    """A waiter's predicate reads the snapshot only, and it looks again on every change: the
    pending list included (no ``poke``)."""
    machine, _ = await _machine_in(S.READY)
    spec = ModelSpec.parse("m")
    machine.queue_switch(spec)
    waiter = asyncio.ensure_future(machine.wait_for(lambda s: not s.switching, 5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    machine.end_switch(spec)
    snap = await asyncio.wait_for(waiter, 1)
    assert snap.state is S.READY and snap.pending == ()
