"""Where a model may run and what must go to make room for it: pure policy over a snapshot.

The fleet hands these functions a read-only :class:`InstanceView` of each instance and acts on
the answer; nothing here waits, launches or stops.

- A model **fits** (:func:`fits`) when, on each of its GPUs, the shares
  (``gpu_memory_utilization``) of the instances there plus its own stay at most 1.0. An instance
  with no GPUs (no GPU set known: ``--gpus`` not given and none found) takes the whole node: it
  shares with every other instance, so the node runs one model at a time, as it always did.
- To make room (:func:`plan_room`), only instances on the candidate's GPUs may go, and only
  when they are unpinned and not already leaving. Idle ones go before busy ones (a busy one is
  drained first), the least recently used first, and the plan takes the fewest evictions that
  make the candidate fit. **Anti-thrash**: an instance loaded less than ``min_residency``
  seconds ago that has requests in flight or waiting serves them first; it may go once it is
  idle or older. When nothing can make room, :class:`NoRoom` names the instances in the way.
- An idle instance **expires** (:func:`expired`) ``ttl`` seconds after its last use.

Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aic_vllm_proxy.schemas import ProcessState

S = ProcessState
#: Slack for float sums: 0.3 + 0.3 + 0.4 is 1.0000000000000002.
EPSILON = 1e-9
#: States whose process holds (or is about to hold) GPU memory (a sleeping one holds none).
HOLDING = frozenset({S.STARTING, S.READY, S.DRAINING, S.STOPPING, S.PARKING, S.WAKING})
#: States of an instance already on its way out: its room is freed without an eviction.
LEAVING = frozenset({S.DRAINING, S.STOPPING, S.PARKING})
#: With more evictable instances than this on the candidate's GPUs, the fewest evictions are
#: looked for greedily (LRU order, then dropping the ones not needed) instead of exhaustively.
EXACT_SEARCH_LIMIT = 12


class Placed(Protocol):
    """Anything with a name, GPUs and a share of each: a candidate or an instance."""

    @property
    def name(self) -> str: ...
    @property
    def gpus(self) -> tuple[str, ...]: ...
    @property
    def utilization(self) -> float: ...


@dataclass(frozen=True)
class Candidate:
    """A model the fleet wants to load: its name and its footprint's GPUs and share."""

    name: str
    gpus: tuple[str, ...]
    utilization: float


@dataclass(frozen=True)
class InstanceView:
    """What the policy reads of one instance. ``waiting``: requests queued for it (e.g. while it
    loads); ``last_used``: when a request last arrived or finished (the fleet starts it at the
    load); ``loaded_at``: when it became ready (None: still starting)."""

    name: str
    gpus: tuple[str, ...]
    utilization: float
    state: ProcessState = S.READY
    pinned: bool = False
    in_flight: int = 0
    waiting: int = 0
    last_used: float = 0.0
    loaded_at: float | None = None

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.waiting > 0


@dataclass(frozen=True)
class Plan:
    """Room can be made: stop the ``unload`` instances (idle), drain then stop the ``drain``
    ones (busy), and wait for ``wait_for`` (already draining or stopping); then the candidate
    fits. All empty: it fits now."""

    unload: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    wait_for: tuple[str, ...] = ()

    @property
    def evictions(self) -> tuple[str, ...]:
        return self.unload + self.drain


@dataclass(frozen=True)
class Blocker:
    """An instance in the way and why: ``pinned``, or ``busy`` and loaded ``age`` seconds ago
    (None: still loading), safe from eviction for ``protected_for`` more seconds."""

    name: str
    pinned: bool
    age: float | None = None
    protected_for: float = 0.0

    @property
    def reason(self) -> str:
        if self.pinned:
            return "pinned"
        if self.age is None:
            return "busy, still loading"
        return f"busy, loaded {self.age:.0f} s ago"


@dataclass(frozen=True)
class NoRoom:
    """Nothing can make room for ``candidate`` on ``gpus``; ``blockers`` are in the way.
    ``retry_after``: seconds after which every blocker may be evicted (they are all busy and
    young); None when one is pinned or still loading."""

    candidate: str
    gpus: tuple[str, ...]
    blockers: tuple[Blocker, ...]

    @property
    def retry_after(self) -> float | None:
        waits = [b.protected_for for b in self.blockers if not b.pinned and b.age is not None]
        return max(waits) if waits and len(waits) == len(self.blockers) else None

    @property
    def message(self) -> str:
        where = f"on GPUs {','.join(self.gpus)}" if self.gpus else "(no GPU set: one model at a time)"
        names = ", ".join(f"{b.name} ({b.reason})" for b in self.blockers)
        verb = "is" if len(self.blockers) == 1 else "are"
        return f"cannot place {self.candidate} {where}: {names} {verb} in the way"


def shares_gpu(a: Placed, b: Placed) -> bool:
    """True when ``a`` and ``b`` have a GPU in common; one without GPUs takes the whole node."""
    return not a.gpus or not b.gpus or not set(a.gpus).isdisjoint(b.gpus)


def _others(candidate: Placed, instances: Iterable[InstanceView]) -> list[InstanceView]:
    """The instances that hold memory the candidate would share (not the candidate itself)."""
    return [
        i for i in instances if i.state in HOLDING and i.name != candidate.name and shares_gpu(candidate, i)
    ]


def fits(candidate: Placed, instances: Iterable[InstanceView]) -> bool:
    """True when ``candidate`` can start now beside ``instances`` (see the module's doc)."""
    others = _others(candidate, instances)
    if not candidate.gpus or any(not i.gpus for i in others):
        return not others
    for gpu in candidate.gpus:
        used = sum(i.utilization for i in others if gpu in i.gpus)
        if used + candidate.utilization > 1.0 + EPSILON:
            return False
    return True


def _protected_for(instance: InstanceView, now: float, min_residency: float) -> float:
    """Seconds this instance is still safe from eviction (0: evictable unless pinned)."""
    if not instance.busy:
        return 0.0
    if instance.loaded_at is None:
        return min_residency if min_residency > 0 else 0.0
    return max(0.0, instance.loaded_at + min_residency - now)


def plan_room(
    candidate: Placed, instances: Sequence[InstanceView], now: float, min_residency: float
) -> Plan | NoRoom:
    """What must go for ``candidate`` to fit (see the module's doc): a :class:`Plan`, or
    :class:`NoRoom` naming the instances in the way."""
    others = _others(candidate, instances)
    leaving = [i for i in others if i.state in LEAVING]
    staying = [i for i in others if i.state not in LEAVING]
    blockers = [i for i in staying if i.pinned or _protected_for(i, now, min_residency) > 0]
    evictable = [i for i in staying if i.name not in {b.name for b in blockers}]
    # Idle before busy, least recently used first; the name breaks ties, for a stable answer.
    evictable.sort(key=lambda i: (i.busy, i.last_used, i.name))

    def fits_without(gone: Iterable[InstanceView]) -> bool:
        names = {i.name for i in gone}
        return fits(candidate, [i for i in staying if i.name not in names])

    if not fits_without(evictable):
        in_way = [i for i in blockers if _in_the_way(candidate, i, blockers)]
        return NoRoom(
            candidate.name,
            candidate.gpus,
            tuple(_blocker(i, now, min_residency) for i in in_way),
        )
    if len(evictable) > EXACT_SEARCH_LIMIT:
        chosen = _greedy(evictable, fits_without)
    else:
        chosen = _fewest(evictable, fits_without)
    kept = [i for i in others if i.name not in {c.name for c in chosen}]
    return Plan(
        unload=tuple(i.name for i in chosen if not i.busy),
        drain=tuple(i.name for i in chosen if i.busy),
        # The ones leaving anyway are waited for only when their room is needed.
        wait_for=() if fits(candidate, kept) else tuple(i.name for i in leaving),
    )


_Check = Callable[[Iterable[InstanceView]], bool]


def _fewest(ordered: list[InstanceView], fits_without: _Check) -> list[InstanceView]:
    """The smallest set that makes room, preferring fewer busy ones, then fewer in all, then the
    least recently used (``ordered`` is in eviction order and ``combinations`` keeps it)."""
    idle = [i for i in ordered if not i.busy]
    busy = [i for i in ordered if i.busy]
    for n_busy in range(len(busy) + 1):
        for n_idle in range(len(idle) + 1):
            for drained in itertools.combinations(busy, n_busy):
                for unloaded in itertools.combinations(idle, n_idle):
                    if fits_without(unloaded + drained):
                        return [*unloaded, *drained]
    raise AssertionError("plan_room checked that evicting them all makes room")


def _greedy(ordered: list[InstanceView], fits_without: _Check) -> list[InstanceView]:
    """Take instances in eviction order until the candidate fits, then give back (most recently
    used first) every one it fits without."""
    chosen: list[InstanceView] = []
    for instance in ordered:
        if fits_without(chosen):
            break
        chosen.append(instance)
    for instance in reversed(list(chosen)):
        rest = [i for i in chosen if i is not instance]
        if fits_without(rest):
            chosen = rest
    return chosen


def _in_the_way(candidate: Placed, blocker: InstanceView, blockers: list[InstanceView]) -> bool:
    """True when ``blocker`` is on a GPU of the candidate where the blockers alone leave too
    little room (with no GPU set, every blocker is)."""
    if not candidate.gpus or not blocker.gpus:
        return True
    for gpu in set(candidate.gpus) & set(blocker.gpus):
        used = sum(b.utilization for b in blockers if not b.gpus or gpu in b.gpus)
        if used + candidate.utilization > 1.0 + EPSILON:
            return True
    return False


def _blocker(instance: InstanceView, now: float, min_residency: float) -> Blocker:
    age = None if instance.loaded_at is None else max(0.0, now - instance.loaded_at)
    return Blocker(instance.name, instance.pinned, age, _protected_for(instance, now, min_residency))


def expires_at(instance: InstanceView, ttl: float) -> float | None:
    """When an idle, ready instance is unloaded for idling (monotonic), or None: a ttl of 0,
    pinned, busy, or not ready (loading or already leaving)."""
    if ttl <= 0 or instance.pinned or instance.busy or instance.state is not S.READY:
        return None
    return instance.last_used + ttl


def expired(instance: InstanceView, ttl: float, now: float) -> bool:
    """True when the instance has been idle for its ``ttl``: the fleet unloads it."""
    when = expires_at(instance, ttl)
    return when is not None and now >= when


__all__ = [
    "EPSILON",
    "Blocker",
    "Candidate",
    "InstanceView",
    "NoRoom",
    "Placed",
    "Plan",
    "expired",
    "expires_at",
    "fits",
    "plan_room",
    "shares_gpu",
]
