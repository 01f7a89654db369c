"""Placement end to end (issue 13): the daemon (a real process, real sockets) running the
simulator, with a catalogue of models that share GPUs (``--gpus``), shows that

- room is made by unloading the least recently used idle instance, never a pinned one, and a
  busy one only when no idle one does, drained first (its request completes, then it stops);
- when nothing can go (pinned ones, or young busy ones), a load and an on-demand request get
  503 with ``Retry-After`` and a message naming the models in the way;
- an idle instance goes after its ``ttl`` (``/status`` shows ``expires_at``; a request pushes it
  back);
- two clients taking turns between two models that cannot share the GPU do not thrash: each
  load serves the requests queued for it, and every request is answered;
- ``POST /unload`` drains then stops, ``POST /stop {"model"}`` stops one, ``POST /stop`` all.

Which process answered a request is the simulator's ``X-Simulator-Instance`` header; how many
times a model was launched is the number of its launch logs (one per launch, its command line in
the first line).

The tests at the end (found while writing these) fail on the fleet as it is: each docstring says
what it expects; the report of the session that wrote them says where the fleet goes wrong.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import CHAT, FAST, Daemon, chat_request, free_port_run, sse_data, sse_text, start_daemon

from aic_vllm_proxy.simulator.server import INSTANCE_HEADER, parse_instance_header

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: States in which an instance holds its GPUs (or is about to).
HOLDING = ("starting", "ready", "draining", "stopping")
#: Simulator flags of a model whose answers take a while: 0.1 s per generated token.
SLOW_TOKENS = "--sim-token-delay 0.1"
#: Generous deadline for anything the daemon does on its own (a load, a stop, a TTL expiry).
DEADLINE = 60.0


def entry(name: str, *, gpus: str = "[0]", share: float = 0.5, args: str = FAST, **keys: object) -> str:
    """One ``[models.NAME]`` table (model ``org/NAME``) of the catalogue."""
    lines = [
        f"[models.{name}]",
        f'model = "org/{name}"',
        f'args = "{args}"',
        f"gpus = {gpus}",
        f"gpu_memory_utilization = {share}",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Streamed:
    """A streamed chat as the client saw it, and which simulator answered it."""

    status: int
    body: bytes
    pid: str | None

    @property
    def events(self) -> list[str]:
        return sse_data(self.body)

    def complete(self, tokens: int) -> bool:
        """It ended as vLLM ends a generation that ran to ``max_tokens``: every token, the
        ``length`` finish and ``[DONE]`` (a stream cut by a stop ends ``abort``, or short)."""
        events = self.events
        if not events or events[-1] != "[DONE]":
            return False
        finishes = [
            choice.get("finish_reason")
            for event in events[:-1]
            for choice in json.loads(event).get("choices") or []
            if choice.get("finish_reason")
        ]
        return finishes == ["length"] and len(sse_text(events).split()) == tokens


@dataclass
class Fleet:
    """The daemon and an HTTP client for it; every pid it sees is handed to the daemon's
    fixture, which makes sure the process groups are gone at the end."""

    daemon: Daemon
    http: httpx.AsyncClient
    states_seen: dict[str, list[str]] = field(default_factory=dict)

    async def instances(self) -> dict[str, dict[str, Any]]:
        """``/status``'s ``instances`` by name (states seen are recorded per name)."""
        response = await self.http.get("/status")
        assert response.status_code == 200, response.text
        found: dict[str, dict[str, Any]] = {}
        for item in response.json()["instances"]:
            found[item["name"]] = item
            if item["pid"]:
                self.daemon.groups.add(int(item["pid"]))
            seen = self.states_seen.setdefault(item["name"], [])
            if not seen or seen[-1] != item["state"]:
                seen.append(item["state"])
        return found

    async def holding(self) -> dict[str, dict[str, Any]]:
        """The instances that hold their GPUs (loading, ready, draining or stopping)."""
        return {name: item for name, item in (await self.instances()).items() if item["state"] in HOLDING}

    async def wait_for(
        self, what: str, done: Callable[[dict[str, dict[str, Any]]], bool], timeout: float = DEADLINE
    ) -> dict[str, dict[str, Any]]:
        """Poll ``/status`` until ``done(instances)``; fails naming ``what`` at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        instances = await self.instances()
        while not done(instances):
            assert loop.time() < deadline, f"{what}: not within {timeout:g} s: {instances}"
            await asyncio.sleep(0.05)
            instances = await self.instances()
        return instances

    async def load(self, name: str, **extra: Any) -> httpx.Response:
        response = await self.http.post("/load", json={"model": name, **extra})
        if response.status_code == 200:
            pid = response.json()["instance"]["pid"]
            if pid:
                self.daemon.groups.add(int(pid))
        return response

    async def loaded(self, name: str) -> dict[str, Any]:
        """``POST /load`` that must succeed: its LoadResult."""
        response = await self.load(name)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        assert result["instance"]["state"] == "ready", result
        return result

    async def chat(self, model: str, max_tokens: int = 2) -> httpx.Response:
        return await self.http.post(CHAT, json=chat_request(model, stream=False, max_tokens=max_tokens))

    async def stream(self, model: str, tokens: int, started: asyncio.Event) -> Streamed:
        """A streamed chat of ``tokens`` tokens; ``started`` is set once the first bytes of
        the answer came (the request is in flight at the proxy)."""
        body = chat_request(model, stream=True, max_tokens=tokens)
        async with self.http.stream("POST", CHAT, json=body) as response:
            chunks = []
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                started.set()
            started.set()
            return Streamed(response.status_code, b"".join(chunks), pid_of(response))

    def launches(self) -> dict[str, list[str]]:
        """The pids of every launch of each model, from the launch logs (``org/NAME`` -> NAME)."""
        found: dict[str, list[str]] = {}
        for log in sorted(self.daemon.log_dir.glob("*_pid-*.log")):
            with open(log, encoding="utf-8", errors="replace") as handle:
                header = handle.readline()
            words = header.split()
            model = next(word for word in words if word.startswith("org/"))
            found.setdefault(model.removeprefix("org/"), []).append(log.stem.rsplit("-", 1)[1])
        return found


#: The ``fleet`` fixture: ``await fleet(catalogue, *options)``.
StartFleet = Callable[..., Awaitable[Fleet]]


def pid_of(response: httpx.Response) -> str | None:
    header = response.headers.get(INSTANCE_HEADER)
    return parse_instance_header(header)["pid"] if header else None


def drained_then_stopped(states: list[str]) -> bool:
    """The states /status showed of an instance end: ready, draining, (stopping,) stopped."""
    tail = states[states.index("draining") - 1 :] if "draining" in states else []
    return tail in (["ready", "draining", "stopped"], ["ready", "draining", "stopping", "stopped"])


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[StartFleet]:
    """``await fleet(catalogue, *options)``: the daemon with that catalogue (TOML text) and
    options (``--gpus`` and others), on the simulator; stopped at the end (with every vLLM)."""
    started: list[Fleet] = []

    async def start(catalogue: str, *options: str) -> Fleet:
        workdir = tmp_path / f"fleet-{len(started)}"
        workdir.mkdir()
        config = workdir / "proxy.toml"
        config.write_text(catalogue)
        # The slot's port, then one per entry: all free (the last --vllm-port given wins).
        ports = ("--vllm-port", str(free_port_run(catalogue.count("[models.") + 1)))
        argv = ("--config", str(config), *options, *ports)
        daemon = await asyncio.to_thread(start_daemon, workdir, *argv)
        handle = Fleet(daemon, httpx.AsyncClient(base_url=daemon.url, timeout=120))
        started.append(handle)
        return handle

    yield start
    for handle in started:
        await handle.http.aclose()
        await asyncio.to_thread(handle.daemon.stop)


# ------------------------------------------------------------------------------ eviction order


async def test_the_least_recently_used_idle_instance_goes_first(fleet: StartFleet) -> None:
    f = await fleet(entry("a") + entry("b") + entry("c"), "--gpus", "0")
    a = (await f.loaded("a"))["instance"]
    b = (await f.loaded("b"))["instance"]
    assert set(await f.holding()) == {"a", "b"}  # two halves of GPU 0
    used = await f.chat("a")  # a was loaded first, but used last
    assert used.status_code == 200 and pid_of(used) == str(a["pid"])

    result = await f.loaded("c")
    assert result["evicted"] == ["b"], result
    held = await f.holding()
    assert set(held) == {"a", "c"} and held["a"]["pid"] == a["pid"]
    assert all(item["state"] == "ready" for item in held.values())
    assert f.launches().get("b") == [str(b["pid"])]  # b was not loaded again

    # Now c was used last and a before it: loading b again unloads a.
    assert (await f.chat("c")).status_code == 200
    assert (await f.loaded("b"))["evicted"] == ["a"]
    assert set(await f.holding()) == {"b", "c"}


async def test_a_pinned_instance_is_never_evicted(fleet: StartFleet) -> None:
    f = await fleet(entry("a", pinned=True) + entry("b") + entry("c"), "--gpus", "0")
    a = (await f.loaded("a"))["instance"]  # pinned, and the least recently used
    await f.loaded("b")
    result = await f.loaded("c")
    assert result["evicted"] == ["b"], result
    held = await f.holding()
    assert set(held) == {"a", "c"} and held["a"]["pid"] == a["pid"] and held["a"]["pinned"]

    # b named by a request: loaded on demand in place of c, never of a.
    answer = await f.chat("b")
    assert answer.status_code == 200, answer.text
    held = await f.holding()
    assert set(held) == {"a", "b"} and pid_of(answer) == str(held["b"]["pid"])
    assert held["a"]["pid"] == a["pid"]


async def test_a_busy_instance_is_drained_before_it_goes_and_an_idle_one_goes_first(
    fleet: StartFleet,
) -> None:
    """With ``--min-residency 0`` (no anti-thrash protection), a busy instance may be evicted:
    only when no idle one makes room, and after its requests in flight have finished."""
    catalogue = entry("a", args=f"{FAST} {SLOW_TOKENS}") + entry("b") + entry("c") + entry("big", share=0.9)
    f = await fleet(catalogue, "--gpus", "0", "--min-residency", "0", "--drain-timeout", "120")
    a = (await f.loaded("a"))["instance"]
    await f.loaded("b")
    tokens = 60  # 6 s at 0.1 s a token
    started = asyncio.Event()
    streaming = asyncio.ensure_future(f.stream("a", tokens, started))
    await asyncio.wait_for(started.wait(), DEADLINE)
    await f.wait_for("a busy", lambda i: i["a"]["in_flight"] == 1)

    # a is the least recently used, but busy: the idle b goes.
    result = await f.loaded("c")
    assert result["evicted"] == ["b"], result
    assert not streaming.done()
    assert (await f.holding())["a"]["state"] == "ready"

    # big needs all of GPU 0: c (idle) is unloaded, a drained: its stream runs to its end, then
    # it stops, and only then does big start.
    loading = asyncio.ensure_future(f.load("big"))
    await f.wait_for("a draining", lambda i: i["a"]["state"] == "draining")
    assert not streaming.done()
    streamed = await streaming  # whole: a stopped only after it (a stop cuts a stream short)
    assert streamed.status == 200 and streamed.pid == str(a["pid"])
    assert streamed.complete(tokens), streamed.events[-3:]

    response = await loading
    assert response.status_code == 200, response.text
    assert sorted(response.json()["evicted"]) == ["a", "c"]
    held = await f.holding()
    assert set(held) == {"big"} and held["big"]["state"] == "ready"
    assert drained_then_stopped(f.states_seen["a"]), f.states_seen["a"]


# ---------------------------------------------------------------------------------- no room


async def test_no_room_when_pinned_models_fill_the_gpu(fleet: StartFleet) -> None:
    catalogue = entry("a", pinned=True) + entry("b", pinned=True) + entry("c")
    f = await fleet(catalogue, "--gpus", "0")
    await f.loaded("a")
    await f.loaded("b")
    before = await f.holding()

    refused = await f.load("c")
    on_demand = await f.chat("c")
    for response in (refused, on_demand):
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) >= 1
        error = response.json()["error"]
        assert "c" in error["message"] and "pinned" in error["message"], error
        assert "a (pinned)" in error["message"] and "b (pinned)" in error["message"], error
    after = await f.holding()
    assert set(after) == {"a", "b"} and all(after[n]["pid"] == before[n]["pid"] for n in after)
    assert "c" not in f.launches()  # nothing was launched for it
    assert (await f.chat("a")).status_code == 200  # the others kept serving


async def test_a_young_busy_instance_stays_until_it_is_idle(fleet: StartFleet) -> None:
    """Anti-thrash: an instance loaded less than ``--min-residency`` ago with a request in
    flight is not evicted. A request for a model that needs its room waits, and gets 503 with
    ``Retry-After`` (naming it) when its wait ends first; a load waits until it is idle."""
    catalogue = entry("a", share=0.6, args=f"{FAST} {SLOW_TOKENS}") + entry("b", share=0.6)
    options = ("--gpus", "0", "--min-residency", "30", "--request-wait-timeout", "2")
    f = await fleet(catalogue, *options)
    a = (await f.loaded("a"))["instance"]
    tokens = 80  # 8 s
    started = asyncio.Event()
    streaming = asyncio.ensure_future(f.stream("a", tokens, started))
    await asyncio.wait_for(started.wait(), DEADLINE)

    refused = await f.chat("b")  # waits its 2 s for room, then gives up
    assert refused.status_code == 503, refused.text
    assert 1 <= int(refused.headers["Retry-After"]) <= 30
    message = refused.json()["error"]["message"]
    assert "a (busy, loaded" in message, message

    loading = asyncio.ensure_future(f.load("b"))  # no deadline: waits until a is idle
    while not streaming.done():  # a keeps serving its stream; b waits, not even launched
        held = await f.holding()
        if held.get("a", {}).get("state") != "ready" or "b" in held:
            break  # only once a's stream has ended at the proxy (its end may not be read yet)
        assert not loading.done()
        await asyncio.sleep(0.1)
    streamed = await streaming
    assert streamed.complete(tokens) and streamed.pid == str(a["pid"])  # never drained, never cut
    assert "draining" not in f.states_seen["a"]
    response = await loading
    assert response.status_code == 200 and response.json()["evicted"] == ["a"], response.text
    assert set(await f.holding()) == {"b"}


# --------------------------------------------------------------------------------------- TTL


async def test_an_idle_instance_is_unloaded_after_its_ttl(fleet: StartFleet) -> None:
    f = await fleet(entry("t", args=f"{FAST} {SLOW_TOKENS}", ttl=2), "--gpus", "0")
    loaded = (await f.loaded("t"))["instance"]
    assert loaded["ttl"] == 2 and loaded["expires_at"] is not None
    first = when(loaded["expires_at"])

    # A stream longer than the ttl: no expiry while it runs, and it is not cut.
    tokens = 40  # 4 s
    started = asyncio.Event()
    streaming = asyncio.ensure_future(f.stream("t", tokens, started))
    await asyncio.wait_for(started.wait(), DEADLINE)
    busy = (await f.instances())["t"]
    assert busy["in_flight"] == 1 and busy["expires_at"] is None and busy["state"] == "ready"
    streamed = await streaming
    assert streamed.complete(tokens) and streamed.pid == str(loaded["pid"])

    after = (await f.instances())["t"]  # idle again: its 2 s start over
    assert after["state"] == "ready" and after["pid"] == loaded["pid"], after
    assert after["expires_at"] is not None and when(after["expires_at"]) > first
    assert (await f.chat("t")).status_code == 200  # a short request pushes it back again
    again = (await f.instances())["t"]
    assert again["pid"] == loaded["pid"] and when(again["expires_at"]) > when(after["expires_at"])
    last = when(again["expires_at"])

    gone = await f.wait_for("t unloaded by its ttl", lambda i: i["t"]["state"] == "stopped")
    assert datetime.now(timezone.utc) >= last
    assert gone["t"]["pid"] is None and gone["t"]["expires_at"] is None
    assert "unloading t: idle for 2 s (its ttl)" in f.daemon.read_output()
    assert f.launches()["t"] == [str(loaded["pid"])]

    answer = await f.chat("t")  # named again: loaded on demand, a new launch
    assert answer.status_code == 200 and pid_of(answer) != str(loaded["pid"])
    assert len(f.launches()["t"]) == 2


# ------------------------------------------------------------------------------ anti-thrash


async def test_two_clients_taking_turns_between_two_models_do_not_thrash(
    fleet: StartFleet,
) -> None:
    """a and b cannot share GPU 0. Two clients each send ``rounds`` requests for each model,
    alternating, one starting with a and the other with b, at once. Requests queued for the
    same model are served by the same launch; a freshly loaded instance serves its queue
    before it goes, so every launch answers requests, a model is launched at most
    ``rounds + 1`` times (each load serves both clients but the first), and every request is
    answered."""
    catalogue = entry("a", share=0.6) + entry("b", share=0.6)
    options = ("--gpus", "0", "--min-residency", "30", "--request-wait-timeout", "120")
    f = await fleet(catalogue, *options)
    rounds = 3
    answers: list[tuple[str, httpx.Response]] = []

    async def client(order: tuple[str, str]) -> None:
        for _ in range(rounds):
            for model in order:
                response = await f.chat(model)
                answers.append((model, response))
                assert response.status_code in (200, 503), response.text

    await asyncio.gather(client(("a", "b")), client(("b", "a")))

    statuses = Counter(response.status_code for _, response in answers)
    refused = [r for _, r in answers if r.status_code == 503]
    assert all("Retry-After" in r.headers for r in refused), [r.text for r in refused]
    assert statuses == {200: 4 * rounds}, [r.text for r in refused]  # none had to wait 120 s
    answered: dict[str, set[str]] = {}
    for model, response in answers:
        assert response.json()["model"] == f"org/{model}"  # vLLM names its first served name
        answered.setdefault(model, set()).add(str(pid_of(response)))
    launches = f.launches()
    for model in ("a", "b"):
        assert set(launches[model]) == answered[model], (model, launches, answered)  # each served
        assert len(launches[model]) <= rounds + 1, launches
    assert len(await f.holding()) <= 1


# ---------------------------------------------------------------------------- unload and stop


async def test_unload_drains_then_stops_and_stop_takes_one_or_all(
    fleet: StartFleet,
) -> None:
    catalogue = entry("a", args=f"{FAST} {SLOW_TOKENS}") + entry("b", gpus="[1]")
    f = await fleet(catalogue, "--gpus", "0,1", "--drain-timeout", "120")
    a = (await f.loaded("a"))["instance"]
    b = (await f.loaded("b"))["instance"]

    tokens = 40  # 4 s
    started = asyncio.Event()
    streaming = asyncio.ensure_future(f.stream("a", tokens, started))
    await asyncio.wait_for(started.wait(), DEADLINE)
    unloading = asyncio.ensure_future(f.http.post("/unload", json={"model": "a"}))
    await f.wait_for("a draining", lambda i: i["a"]["state"] == "draining")
    streamed = await streaming  # whole: a stopped only after it (a stop cuts a stream short)
    assert streamed.complete(tokens) and streamed.pid == str(a["pid"])
    unloaded = await unloading
    assert unloaded.status_code == 200, unloaded.text
    result = unloaded.json()
    assert result["changed"] is True and result["name"] == "a"
    listed = {item["name"]: item for item in result["status"]["instances"]}
    assert listed["a"]["state"] == "stopped" and listed["b"]["pid"] == b["pid"]
    await f.instances()
    assert drained_then_stopped(f.states_seen["a"]), f.states_seen["a"]

    await f.loaded("a")
    stopped = await f.http.post("/stop", json={"model": "a"})
    assert stopped.status_code == 200, stopped.text
    listed = {item["name"]: item for item in stopped.json()["instances"]}
    assert listed["a"]["state"] == "stopped" and listed["a"]["pid"] is None
    assert listed["b"]["state"] == "ready" and listed["b"]["pid"] == b["pid"]
    answer = await f.chat("b")
    assert answer.status_code == 200 and pid_of(answer) == str(b["pid"])

    await f.loaded("a")
    assert set(await f.holding()) == {"a", "b"}
    everything = await f.http.post("/stop")
    assert everything.status_code == 200, everything.text
    assert all(item["state"] == "stopped" for item in everything.json()["instances"])
    assert await f.holding() == {}


# ------------------------------------------------------------------ found while writing these


async def test_the_least_recently_used_counts_a_request_as_it_arrives(fleet: StartFleet) -> None:
    """``last_used`` is "when a request last arrived or finished" (``placement.InstanceView``,
    ``Instance.last_used``): of two busy instances, the one whose request came last stays."""
    catalogue = (
        entry("a", args=f"{FAST} {SLOW_TOKENS}") + entry("b", args=f"{FAST} {SLOW_TOKENS}") + entry("c")
    )
    f = await fleet(catalogue, "--gpus", "0", "--min-residency", "0", "--drain-timeout", "120")
    await f.loaded("a")
    await f.loaded("b")
    tokens = 60  # 6 s
    b_started, a_started = asyncio.Event(), asyncio.Event()
    b_stream = asyncio.ensure_future(f.stream("b", tokens, b_started))
    await asyncio.wait_for(b_started.wait(), DEADLINE)
    a_stream = asyncio.ensure_future(f.stream("a", tokens, a_started))  # a is used last
    await asyncio.wait_for(a_started.wait(), DEADLINE)

    result = await f.loaded("c")  # one of the two busy ones must go: b, used least recently
    streams = await asyncio.gather(a_stream, b_stream)
    assert all(s.complete(tokens) for s in streams)  # drained, whichever went
    assert result["evicted"] == ["b"], result


@pytest.mark.parametrize(
    ("min_residency", "target", "why"),
    [("0", "big", "a is drained to make room"), ("30", "b", "a is young and busy: the load waits")],
    ids=["drain", "anti-thrash-wait"],
)
async def test_making_room_on_one_gpu_does_not_hold_up_a_load_on_another(
    fleet: StartFleet, min_residency: str, target: str, why: str
) -> None:
    """While a load waits for room on GPU 0 (``why``: a has a long stream in flight), a load
    on GPU 1, where there is room, goes ahead: it is ready before a's stream ends."""
    catalogue = (
        entry("a", share=0.6, args=f"{FAST} {SLOW_TOKENS}")
        + entry("b", share=0.6)
        + entry("big", share=0.9)
        + entry("c", gpus="[1]")
    )
    options = ("--gpus", "0,1", "--min-residency", min_residency, "--drain-timeout", "120")
    f = await fleet(catalogue, *options)
    await f.loaded("a")
    tokens = 80  # 8 s
    started = asyncio.Event()
    streaming = asyncio.ensure_future(f.stream("a", tokens, started))
    await asyncio.wait_for(started.wait(), DEADLINE)
    waiting = asyncio.ensure_future(f.load(target))
    if target == "big":
        await f.wait_for("a draining", lambda i: i["a"]["state"] == "draining")
    else:  # nothing to see in /status: a few round trips let the daemon take the load first
        for _ in range(5):
            await f.instances()
    assert not waiting.done()
    other = asyncio.ensure_future(f.load("c"))
    done, _ = await asyncio.wait({streaming, other}, return_when=asyncio.FIRST_COMPLETED)
    first = "c's load" if other in done else "a's stream"
    streamed, loaded, on_gpu_1 = await asyncio.gather(streaming, waiting, other)
    assert streamed.complete(tokens)
    assert loaded.status_code == 200 and on_gpu_1.status_code == 200, (loaded.text, on_gpu_1.text)
    assert first == "c's load", f"the load of c on GPU 1 waited until a's stream ended ({why})"


async def test_a_request_waits_for_room_no_longer_than_its_wait_timeout(fleet: StartFleet) -> None:
    """A request for b joins a load of b that waits for room (a is young and busy): it still
    gets its 503 with ``Retry-After`` after ``--request-wait-timeout`` (2 s), not when a's
    8 s stream ends."""
    catalogue = entry("a", share=0.6, args=f"{FAST} {SLOW_TOKENS}") + entry("b", share=0.6)
    options = ("--gpus", "0", "--min-residency", "30", "--request-wait-timeout", "2")
    f = await fleet(catalogue, *options)
    await f.loaded("a")
    tokens = 80  # 8 s
    started = asyncio.Event()
    streaming = asyncio.ensure_future(f.stream("a", tokens, started))
    await asyncio.wait_for(started.wait(), DEADLINE)
    loading = asyncio.ensure_future(f.load("b"))  # waits for a (no deadline)
    for _ in range(5):  # a few round trips let the daemon take the load first
        await f.instances()
    request = asyncio.ensure_future(f.chat("b"))
    done, _ = await asyncio.wait({streaming, request}, return_when=asyncio.FIRST_COMPLETED)
    first = "the request" if request in done else "a's stream"
    streamed, loaded, answer = await asyncio.gather(streaming, loading, request)
    assert streamed.complete(tokens) and loaded.status_code == 200, loaded.text
    assert first == "the request", f"the request waited past its 2 s (answered {answer.status_code})"
    assert answer.status_code == 503 and "Retry-After" in answer.headers, answer.text


async def test_a_load_that_joins_a_request_waiting_for_room_is_not_cut_short(fleet: StartFleet) -> None:
    """``POST /load`` waits for room as long as it takes (a is young and busy: until it is
    idle). One that comes while a request for the same model waits for room (its
    ``--request-wait-timeout`` is 2 s) still waits: the request's deadline is not the load's."""
    catalogue = entry("a", share=0.6, args=f"{FAST} {SLOW_TOKENS}") + entry("b", share=0.6)
    options = ("--gpus", "0", "--min-residency", "30", "--request-wait-timeout", "2")
    f = await fleet(catalogue, *options)
    await f.loaded("a")
    tokens = 80  # 8 s
    started = asyncio.Event()
    streaming = asyncio.ensure_future(f.stream("a", tokens, started))
    await asyncio.wait_for(started.wait(), DEADLINE)
    request = asyncio.ensure_future(f.chat("b"))  # begins b's placement, with its 2 s
    for _ in range(5):  # a few round trips let the daemon take the request first
        await f.instances()
    loading = asyncio.ensure_future(f.load("b"))
    streamed, answer, response = await asyncio.gather(streaming, request, loading)
    assert streamed.complete(tokens)
    assert answer.status_code == 503 and "Retry-After" in answer.headers, answer.text
    assert response.status_code == 200, response.text
    assert response.json()["evicted"] == ["a"]
