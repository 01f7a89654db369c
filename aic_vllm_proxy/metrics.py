"""The daemon's own Prometheus metrics, served at ``GET /proxy/metrics`` (docs/metrics.md).

One :class:`Metrics` per application, with a registry of its own (never prometheus-client's
global one: a process may run several applications, as the tests do). The planes above feed
it with plain values (names, states, numbers): the relay counts each proxied request
(:meth:`RequestStats.record`); the life of the instances (loads, unloads, failures, evictions,
TTL expiries, restarts, drains) and the hook calls are counted from the daemon's event bus
(:meth:`Metrics.heard`, a listener of ``aic_vllm_proxy.events.EventBus``), where the engine and
the hooks report each of them once; what the instances hold now (requests in flight and
waiting, their state) and the agents of models across nodes are read at scrape time
(:meth:`Metrics.watch_fleet`, :meth:`Metrics.watch_nodes`).

Cost: a proxied request costs one :meth:`RequestStats.record`, a dict update and two bucket
look-ups (``bisect``) on plain Python objects, well under prometheus-client's own
``labels().inc()`` and ``observe()``, which take locks; the counts become metric families at
scrape time. Nothing is counted per token.

Label values are bounded: models are instance names (catalogue entries, or the specs an admin
loaded) or :data:`UNKNOWN`; routes come from a fixed table (``relay/routes.py``) or are
:data:`OTHER_ROUTE`; statuses are classes (``2xx``...) or ``cancelled``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from aic_vllm_proxy.schemas import NodeState, NodeStatus, ProcessState

S = ProcessState
#: Histogram buckets (seconds) for request durations, time to first byte and load times:
#: from 1 ms to 10 min.
BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
#: The ``le`` labels, as prometheus-client writes them (``0.001``, ``600.0``, ``+Inf``).
_BOUNDS = (*(repr(bound) for bound in BUCKETS), "+Inf")
#: The model label of a request that named a model nobody serves or knows.
UNKNOWN = "unknown"
#: The route label of a path outside the fixed route table.
OTHER_ROUTE = "other"
#: The status label of a request whose client went away before any answer.
CANCELLED = "cancelled"
#: ``status`` label by HTTP status // 100.
STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "aic_proxy_"


def status_class(status: int | None) -> str:
    """``200`` -> ``2xx``; None (no answer: the client left) -> ``cancelled``."""
    if status is None:
        return CANCELLED
    return STATUS_CLASS.get(status // 100, "5xx")


class _Histogram:
    """One label set's buckets (not cumulative), count and sum."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(BUCKETS, value)] += 1
        self.total += value

    def exposed(self) -> list[tuple[str, float]]:
        cumulative, running = [], 0
        for bound, count in zip(_BOUNDS, self.buckets, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        return cumulative


class RequestStats(Collector):
    """The proxied requests: counted on the event loop in plain dicts (the scrape runs on the
    same loop, so no lock is needed), exposed as metric families at scrape time."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.durations: dict[tuple[str, str], _Histogram] = {}
        self.first_bytes: dict[tuple[str, str], _Histogram] = {}

    def record(self, model: str, route: str, status: str, duration: float, first_byte: float | None) -> None:
        """One proxied request ended: its labels, its duration and its time to first byte (the
        time until vLLM's answer head came; None: no answer came)."""
        key = (model, route, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        pair = (model, route)
        hist = self.durations.get(pair)
        if hist is None:
            hist = self.durations[pair] = _Histogram()
            self.first_bytes[pair] = _Histogram()
        hist.observe(duration)
        if first_byte is not None:
            self.first_bytes[pair].observe(first_byte)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            PREFIX + "requests",
            "Proxied requests, by model, route and status class (cancelled: the client left "
            "before an answer).",
            labels=("model", "route", "status"),
        )
        for labels, count in self.counts.items():
            requests.add_metric(labels, count)
        yield requests
        for name, text, table in (
            (
                "request_duration_seconds",
                "Proxied requests' time from admission (body read) to the end of the answer.",
                self.durations,
            ),
            (
                "time_to_first_byte_seconds",
                "Proxied requests' time from admission to vLLM's answer head (waiting for a model included).",
                self.first_bytes,
            ),
        ):
            family = HistogramMetricFamily(PREFIX + name, text, labels=("model", "route"))
            for pair, hist in table.items():
                family.add_metric(pair, hist.exposed(), hist.total)
            yield family


class InstanceRow(Protocol):
    """What the scrape reads of each instance (``schemas.InstanceStatus`` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def state(self) -> ProcessState: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def waiting(self) -> int: ...


class FleetCollector(Collector):
    """Requests in flight and waiting, and each state (0/1), per model, read from the
    instances at scrape time: the request path pays nothing for them. Catalogue entries not
    loaded are ``stopped``."""

    def __init__(
        self, instances: Callable[[], Iterable[InstanceRow]], catalogue: Callable[[], Iterable[str]]
    ) -> None:
        self.instances = instances
        self.catalogue = catalogue

    def collect(self) -> Iterator[Metric]:
        in_flight: dict[str, int] = {}
        waiting: dict[str, int] = {}
        states: dict[str, ProcessState] = {}
        for row in self.instances():
            in_flight[row.name] = in_flight.get(row.name, 0) + row.in_flight
            waiting[row.name] = waiting.get(row.name, 0) + row.waiting
            if states.get(row.name, S.STOPPED) is S.STOPPED:  # a running one wins a shared name
                states[row.name] = row.state
        for name in self.catalogue():
            states.setdefault(name, S.STOPPED)
            in_flight.setdefault(name, 0)
            waiting.setdefault(name, 0)
        flight = GaugeMetricFamily(
            PREFIX + "requests_in_flight", "Requests being served, per model.", labels=("model",)
        )
        queued = GaugeMetricFamily(
            PREFIX + "requests_waiting",
            "Requests waiting for their model (loading, waking, switching), per model.",
            labels=("model",),
        )
        for name in sorted(states):
            flight.add_metric((name,), in_flight[name])
            queued.add_metric((name,), waiting[name])
        state = GaugeMetricFamily(
            PREFIX + "instance_state",
            "Each model's state: 1 for the state it is in, 0 for the others.",
            labels=("model", "state"),
        )
        for name in sorted(states):
            for each in ProcessState:
                state.add_metric((name, each.value), 1.0 if states[name] is each else 0.0)
        yield flight
        yield queued
        yield state


class NodesCollector(Collector):
    """The agents of models across nodes (``GET /nodes``), read at scrape time: each one's
    state (0/1) and the ranks it runs now."""

    def __init__(self, nodes: Callable[[], Iterable[NodeStatus]]) -> None:
        self.nodes = nodes

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            PREFIX + "node_state",
            "Each agent's state: 1 for the state it is in (connected, disconnected, lost, left), "
            "0 for the others.",
            labels=("node", "state"),
        )
        ranks = GaugeMetricFamily(
            PREFIX + "node_ranks", "Ranks of models across nodes that each agent runs now.", labels=("node",)
        )
        for node in self.nodes():
            for each in NodeState:
                state.add_metric((node.name, each.value), 1.0 if node.state == each.value else 0.0)
            ranks.add_metric((node.name,), len(node.ranks))
        yield state
        yield ranks


class Metrics:
    """One application's metrics and their registry."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = RequestStats()
        registry.register(self.requests)

        def counter(name: str, text: str, *labels: str) -> Counter:
            return Counter(PREFIX + name, text, labels, registry=registry)

        self.loads = counter(
            "loads",
            "Loads begun: reason start (vLLM launched) or wake (woken from sleep).",
            "model",
            "reason",
        )
        self.load_seconds = Histogram(
            PREFIX + "load_duration_seconds",
            "Loads that became ready: seconds from launch (or wake) to ready, by reason.",
            ("model", "reason"),
            buckets=BUCKETS,
            registry=registry,
        )
        self.failures = counter(
            "failures",
            "Instances failed: reason load (did not become ready) or died (after it was ready).",
            "model",
            "reason",
        )
        self.unloads = counter(
            "unloads",
            "Models that left their GPUs: reason stopped or parked (sleep mode).",
            "model",
            "reason",
        )
        self.evictions = counter(
            "evictions",
            "Models unloaded to make room: reason room (a load), switch (a /switch took their "
            "GPUs) or host_memory (a sleeper stopped for host RAM).",
            "model",
            "reason",
        )
        self.ttl_expiries = counter(
            "ttl_expiries", "Models unloaded by their TTL: reason stopped or parked.", "model", "reason"
        )
        self.restarts = counter(
            "restarts", "Automatic restarts (--restart on-failure): reason died.", "model", "reason"
        )
        self.drains = counter(
            "drain_requests",
            "Requests in flight when their model was stopped or parked: outcome drained "
            "(finished) or cut (still running at --drain-timeout, or a forced stop).",
            "model",
            "outcome",
        )
        self.rank_failures = counter(
            "rank_failures",
            "Ranks of models across nodes that failed on an agent's node: reason died (ended "
            "unasked) or lost (with its node).",
            "model",
            "node",
            "reason",
        )
        self.hook_calls = counter(
            "hook_calls",
            "Plugin hook calls: outcome ok, veto, error or timeout.",
            "hook",
            "plugin",
            "outcome",
        )

    def watch_fleet(
        self, instances: Callable[[], Iterable[InstanceRow]], catalogue: Callable[[], Iterable[str]]
    ) -> None:
        """Read the instances at every scrape (:class:`FleetCollector`)."""
        self.registry.register(FleetCollector(instances, catalogue))

    def watch_nodes(self, nodes: Callable[[], Iterable[NodeStatus]]) -> None:
        """Read the agents at every scrape (:class:`NodesCollector`)."""
        self.registry.register(NodesCollector(nodes))

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ events

    def heard(self, event: Mapping[str, Any]) -> None:
        """One event of the daemon's event bus (``aic_vllm_proxy.events``; a listener): the
        engine and the hooks report each occurrence there once, and it is counted here."""
        kind = event["type"]
        name = event.get("model") or UNKNOWN
        if kind == "state":
            old, new = event["old"], event["new"]
            if new == S.STARTING.value:
                self.loads.labels(name, "start").inc()
            elif new == S.WAKING.value:
                self.loads.labels(name, "wake").inc()
            elif new == S.FAILED.value:
                self.failures.labels(name, "load" if old == S.STARTING.value else "died").inc()
        elif kind == "load":
            if event.get("seconds") is not None:
                self.load_seconds.labels(name, event["reason"]).observe(event["seconds"])
        elif kind == "unload":
            self.unloads.labels(name, event["reason"]).inc()
        elif kind == "eviction":
            self.evictions.labels(name, event["reason"]).inc()
        elif kind == "ttl":
            self.ttl_expiries.labels(name, event["outcome"]).inc()
        elif kind == "restart":
            self.restarts.labels(name, event["reason"]).inc()
        elif kind == "drain":
            if event["drained"]:
                self.drains.labels(name, "drained").inc(event["drained"])
            if event["cut"]:
                self.drains.labels(name, "cut").inc(event["cut"])
        elif kind == "rank":
            if event["phase"] in ("died", "lost"):
                self.rank_failures.labels(name, event["node"], event["phase"]).inc()
        elif kind == "hook":
            self.hook_calls.labels(event["hook"], event["plugin"], event["outcome"]).inc()
