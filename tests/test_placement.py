"""Placement and eviction policy (engine/placement.py), as pure functions over snapshots."""

from __future__ import annotations

from typing import Any

import pytest

from aic_vllm_proxy.engine.placement import (
    Candidate,
    InstanceView,
    NoRoom,
    Plan,
    expired,
    expires_at,
    fits,
    plan_room,
)
from aic_vllm_proxy.schemas import ProcessState

S = ProcessState
NOW = 1000.0


def inst(name: str, gpus: str, share: float, **fields: Any) -> InstanceView:
    """An instance on ``gpus`` ("0,1"; "" for none), loaded long ago and idle unless told."""
    fields.setdefault("loaded_at", 0.0)
    return InstanceView(name, tuple(g for g in gpus.split(",") if g), share, **fields)


def cand(name: str, gpus: str, share: float) -> Candidate:
    return Candidate(name, tuple(g for g in gpus.split(",") if g), share)


def plan(candidate: Candidate, *instances: InstanceView, min_residency: float = 30.0) -> Plan | NoRoom:
    return plan_room(candidate, list(instances), NOW, min_residency)


# ----------------------------------------------------------------------------------------- fits


def test_disjoint_gpu_sets_always_fit() -> None:
    assert fits(cand("b", "2,3", 1.0), [inst("a", "0,1", 1.0)])


def test_shared_gpu_sums_the_shares() -> None:
    running = [inst("a", "0", 0.5), inst("b", "1", 0.7)]
    assert fits(cand("c", "0", 0.5), running)
    assert not fits(cand("c", "0", 0.51), running)
    assert not fits(cand("c", "0,1", 0.4), running)  # every GPU of it must have room
    assert fits(cand("c", "0,1", 0.3), running)


def test_float_sums_have_slack() -> None:
    assert 0.56 + 0.34 + 0.1 > 1.0  # the reason for the slack
    assert fits(cand("c", "0", 0.1), [inst("a", "0", 0.56), inst("b", "0", 0.34)])
    assert fits(cand("c", "0", 0.4), [inst("a", "0", 0.3), inst("b", "0", 0.3)])
    assert fits(cand("d", "0", 0.1), [inst(n, "0", 0.1) for n in "abcdefghi"])
    assert not fits(cand("c", "0", 0.41), [inst("a", "0", 0.3), inst("b", "0", 0.3)])


def test_only_instances_holding_memory_count() -> None:
    for state in (S.STARTING, S.READY, S.DRAINING, S.STOPPING):
        assert not fits(cand("c", "0", 0.5), [inst("a", "0", 0.6, state=state)]), state
    for state in (S.STOPPED, S.FAILED):
        assert fits(cand("c", "0", 0.5), [inst("a", "0", 0.6, state=state)]), state


def test_the_candidate_is_not_its_own_neighbour() -> None:
    assert fits(cand("a", "0", 0.9), [inst("a", "0", 0.9, state=S.STOPPING)])


def test_without_a_gpu_set_one_model_at_a_time() -> None:
    assert fits(cand("b", "", 0.1), [])
    assert not fits(cand("b", "", 0.1), [inst("a", "", 0.1)])
    assert fits(cand("b", "", 0.1), [inst("a", "", 0.1, state=S.STOPPED)])
    assert not fits(cand("b", "0", 0.1), [inst("a", "", 0.1)])  # a whole-node instance is everywhere


# ------------------------------------------------------------------------------------ plan_room


def test_nothing_to_do_when_it_fits() -> None:
    assert plan(cand("c", "1", 0.9), inst("a", "0", 0.9)) == Plan()


def test_least_recently_used_goes_first() -> None:
    a = inst("a", "0", 0.5, last_used=200)
    b = inst("b", "0", 0.5, last_used=100)
    assert plan(cand("c", "0", 0.5), a, b) == Plan(unload=("b",))
    assert plan(cand("c", "0", 1.0), a, b) == Plan(unload=("b", "a"))


def test_only_instances_on_the_candidates_gpus_go() -> None:
    elsewhere = inst("old", "1", 0.9, last_used=1)
    here = inst("new", "0", 0.9, last_used=900)
    assert plan(cand("c", "0", 0.5), elsewhere, here) == Plan(unload=("new",))


def test_fewest_evictions_beat_lru_order() -> None:
    """Unloading the two oldest would do, but one newer one is enough."""
    a = inst("a", "0", 0.3, last_used=100)
    b = inst("b", "0", 0.3, last_used=200)
    c = inst("c", "0", 0.4, last_used=300)
    assert plan(cand("x", "0", 0.4), a, b, c) == Plan(unload=("c",))


def test_fewest_evictions_across_gpus() -> None:
    x = inst("x", "0", 0.5, last_used=100)
    y = inst("y", "1", 0.5, last_used=200)
    z = inst("z", "0,1", 0.5, last_used=300)
    assert plan(cand("c", "0,1", 0.5), x, y, z) == Plan(unload=("z",))
    assert plan(cand("c", "0,1", 1.0), x, y, z) == Plan(unload=("x", "y", "z"))


def test_pinned_never_goes() -> None:
    pinned = inst("pinned", "0", 0.5, pinned=True, last_used=1)
    other = inst("other", "0", 0.5, last_used=900)
    assert plan(cand("c", "0", 0.5), pinned, other) == Plan(unload=("other",))
    result = plan(cand("c", "0", 0.6), pinned, other)
    assert isinstance(result, NoRoom)
    assert result.message == "cannot place c on GPUs 0: pinned (pinned) is in the way"
    assert result.retry_after is None


def test_busy_is_drained_after_idle() -> None:
    busy = inst("busy", "0", 0.5, in_flight=2, last_used=100)
    idle = inst("idle", "0", 0.5, last_used=900)
    assert plan(cand("c", "0", 0.5), busy, idle) == Plan(unload=("idle",))
    assert plan(cand("c", "0", 1.0), busy, idle) == Plan(unload=("idle",), drain=("busy",))
    queued = inst("queued", "0", 0.5, waiting=1, last_used=100)  # waiting counts as busy
    assert plan(cand("c", "0", 0.5), queued, idle) == Plan(unload=("idle",))


def test_idle_ones_go_rather_than_draining_a_busy_one() -> None:
    busy = inst("busy", "0", 0.6, in_flight=1, last_used=100)
    a = inst("a", "0", 0.2, last_used=500)
    b = inst("b", "0", 0.2, last_used=600)
    assert plan(cand("c", "0", 0.4), busy, a, b) == Plan(unload=("a", "b"))


def test_a_busy_lru_one_is_drained_before_a_busier_recent_one() -> None:
    old = inst("old", "0", 0.5, in_flight=1, last_used=100)
    new = inst("new", "0", 0.5, in_flight=5, last_used=900)
    assert plan(cand("c", "0", 0.5), new, old) == Plan(drain=("old",))


def test_min_residency_protects_a_fresh_busy_instance() -> None:
    fresh = inst("fresh", "0", 0.9, loaded_at=NOW - 3, waiting=4, last_used=NOW - 3)
    result = plan(cand("c", "0", 0.5), fresh)
    assert isinstance(result, NoRoom)
    assert result.message == "cannot place c on GPUs 0: fresh (busy, loaded 3 s ago) is in the way"
    assert result.retry_after == pytest.approx(27)
    # Older than min_residency: it may be drained; idle: it may go at once; no residency: either.
    older = inst("fresh", "0", 0.9, loaded_at=NOW - 31, waiting=4)
    assert plan(cand("c", "0", 0.5), older) == Plan(drain=("fresh",))
    idle = inst("fresh", "0", 0.9, loaded_at=NOW - 3)
    assert plan(cand("c", "0", 0.5), idle) == Plan(unload=("fresh",))
    assert plan(cand("c", "0", 0.5), fresh, min_residency=0) == Plan(drain=("fresh",))


def test_a_loading_instance_with_requests_waiting_stays() -> None:
    loading = inst("loading", "0", 0.9, state=S.STARTING, loaded_at=None, waiting=1)
    result = plan(cand("c", "0", 0.5), loading)
    assert isinstance(result, NoRoom)
    assert result.message == "cannot place c on GPUs 0: loading (busy, still loading) is in the way"
    assert result.retry_after is None
    preloading = inst("loading", "0", 0.9, state=S.STARTING, loaded_at=None)
    assert plan(cand("c", "0", 0.5), preloading) == Plan(unload=("loading",))


def test_no_room_names_every_blocker_in_the_way() -> None:
    llama = inst("llama-8b", "0", 0.3, pinned=True)
    qwen = inst("qwen", "0", 0.3, in_flight=1, loaded_at=NOW - 3)
    harmless = inst("small", "1", 0.1, pinned=True)  # GPU 1 has room for X beside it
    idle = inst("idle", "0,1", 0.3)
    result = plan(cand("X", "0,1", 0.6), llama, qwen, harmless, idle)
    assert isinstance(result, NoRoom)
    assert result.message == (
        "cannot place X on GPUs 0,1: llama-8b (pinned), qwen (busy, loaded 3 s ago) are in the way"
    )
    assert [b.name for b in result.blockers] == ["llama-8b", "qwen"]
    assert result.retry_after is None  # a pinned one never moves


def test_retry_after_is_when_every_blocker_may_go() -> None:
    a = inst("a", "0", 0.5, in_flight=1, loaded_at=NOW - 20)
    b = inst("b", "0", 0.5, in_flight=1, loaded_at=NOW - 5)
    result = plan(cand("c", "0", 1.0), a, b)
    assert isinstance(result, NoRoom)
    assert result.retry_after == pytest.approx(25)


def test_leaving_instances_are_waited_for_not_evicted() -> None:
    draining = inst("draining", "0", 0.6, state=S.DRAINING, in_flight=1)
    stopping = inst("stopping", "1", 0.6, state=S.STOPPING)
    assert plan(cand("c", "0,1", 0.5), draining, stopping) == Plan(wait_for=("draining", "stopping"))
    assert plan(cand("c", "0,1", 0.3), draining, stopping) == Plan()  # room without their leaving
    idle = inst("idle", "0", 0.3, last_used=5)
    assert plan(cand("c", "0", 0.7), draining, idle) == Plan(wait_for=("draining",))
    assert plan(cand("c", "0", 0.8), draining, idle) == Plan(unload=("idle",), wait_for=("draining",))


def test_without_a_gpu_set_the_one_instance_makes_room() -> None:
    assert plan(cand("new", "", 0.92), inst("old", "", 0.92)) == Plan(unload=("old",))
    busy = inst("old", "", 0.92, in_flight=1, loaded_at=NOW - 3)
    result = plan(cand("new", "", 0.92), busy)
    assert isinstance(result, NoRoom)
    assert result.message == (
        "cannot place new (no GPU set: one model at a time): old (busy, loaded 3 s ago) is in the way"
    )


def test_many_small_instances_lru_first() -> None:
    """More evictable instances than the exhaustive search takes: the LRU ones go, no more."""
    small = [inst(f"m{i:02}", "0", 0.05, last_used=i) for i in range(20)]
    result = plan(cand("c", "0", 0.5), *reversed(small))
    assert result == Plan(unload=tuple(f"m{i:02}" for i in range(10)))


def test_many_small_instances_idle_before_busy() -> None:
    busy = [inst(f"b{i}", "0", 0.1, in_flight=1, last_used=i) for i in range(4)]
    idle = [inst(f"s{i:02}", "0", 0.05, last_used=10 + i) for i in range(12)]
    result = plan(cand("c", "0", 0.25), *busy, *idle)
    assert result == Plan(unload=("s00", "s01", "s02", "s03", "s04"))


def test_many_small_instances_those_not_needed_are_kept() -> None:
    small = [inst(f"m{i:02}", "0", 0.04, last_used=i) for i in range(12)]
    big = inst("big", "0", 0.52, last_used=100)
    assert plan(cand("c", "0", 0.5), *small, big) == Plan(unload=("big",))


# ------------------------------------------------------------------------------------------ TTL


def test_an_idle_instance_expires_after_its_ttl() -> None:
    idle = inst("a", "0", 0.5, last_used=100)
    assert expires_at(idle, 60) == 160
    assert not expired(idle, 60, 159.9)
    assert expired(idle, 60, 160)


@pytest.mark.parametrize(
    ("fields", "ttl"),
    [
        ({}, 0),
        ({"in_flight": 1}, 60),
        ({"waiting": 1}, 60),
        ({"pinned": True}, 60),
        ({"state": S.STARTING}, 60),
        ({"state": S.DRAINING}, 60),
        ({"state": S.STOPPED}, 60),
    ],
)
def test_what_never_expires(fields: dict[str, Any], ttl: float) -> None:
    instance = inst("a", "0", 0.5, last_used=100, **fields)
    assert expires_at(instance, ttl) is None
    assert not expired(instance, ttl, 1e9)
