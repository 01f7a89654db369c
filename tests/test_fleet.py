"""The fleet against the simulator (issue 13's proof): the real daemon (``serve``) as a child
process with a catalogue on ``--gpus 0,1``, its vLLM instances real simulator processes, every
request over a real socket. The simulator's ``X-Simulator-Instance`` header (its pid, port and
``CUDA_VISIBLE_DEVICES``) tells which instance answered.

- two models side by side on disjoint GPUs, both loaded, both streaming at once, each request
  at its own instance; ``/status``'s ``instances`` and ``GET /v1/models``;
- on-demand loading by the ``openai`` client naming an entry or an alias, concurrent requests
  served by the one load;
- a model nobody knows: 404 ``model_not_found`` on both HTTP paths, the same answer;
- a foreign listener on the port the next instance would take: it takes the next free one;
  one that appears during a load: a clear 409; nothing is ever forwarded to either;
- one instance crashing leaves the other serving; the proxy SIGKILLed leaves no instance;
- ``/logs/tail?model=``; ``/switch`` beside loaded instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import (
    CHAT,
    FAST,
    chat_request,
    free_port_run,
    group_members,
    process_exists,
    sse_data,
    sse_text,
    wait_until,
)
from test_engine_defects import Impostor

from aic_vllm_proxy.simulator.server import INSTANCE_HEADER, parse_instance_header

#: The states in which an instance holds a process (or is about to).
HOLDING = ("starting", "ready", "draining", "stopping")
#: The fields issue 13 lists for each of ``/status``'s ``instances``.
INSTANCE_FIELDS = {
    "name", "model", "model_spec", "state", "pid", "vllm_base", "gpus", "gpu_memory_utilization",
    "in_flight", "waiting", "last_used", "expires_at", "pinned", "log_path", "started_at", "ready_at",
}  # fmt: skip
#: Streams slow enough to be open at the same time (0.2 s a token).
SLOW_TOKENS = "--sim-token-delay 0.2"


def catalogue(a_args: str = FAST, b_args: str = FAST) -> str:
    """``a`` (alias ``alpha``) on GPU 0, ``b`` on GPU 1, ``c`` (never loaded here) on GPU 0."""
    return f"""
[models.a]
model = "org/a"
args = "{a_args}"
aliases = ["alpha"]
gpus = [0]

[models.b]
model = "org/b"
args = "{b_args}"
gpus = [1]

[models.c]
model = "org/c"
args = "{FAST}"
gpus = [0]
"""


class Fleet:
    """A daemon started with a catalogue on ``--gpus 0,1``; the vLLM groups of the instances it
    reports are handed to the fixtures' check."""

    def __init__(self, proxy: Any, vllm_port: int, groups: set[int]) -> None:
        self.proxy = proxy
        self.url: str = proxy.url
        self.vllm_port = vllm_port
        self.groups = groups
        self.log_dir = Path(proxy.output).parent / "logs"  # spawn_proxy's --log-dir

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(self.url + "/status", timeout=30).json()
        self.groups.update(item["pid"] for item in body["instances"] if item["pid"])
        return body

    def instances(self) -> dict[str, dict[str, Any]]:
        return {item["name"]: item for item in self.status()["instances"]}

    def running(self) -> dict[str, dict[str, Any]]:
        return {name: item for name, item in self.instances().items() if item["state"] in HOLDING}

    def load(self, name: str) -> dict[str, Any]:
        response = httpx.post(self.url + "/load", json={"model": name, "wait": True}, timeout=120)
        assert response.status_code == 200, (response.text, self.proxy.read_output()[-4000:])
        body: dict[str, Any] = response.json()
        assert body["instance"]["state"] == "ready", body
        self.groups.add(body["instance"]["pid"])
        return body

    def switch(self, spec: str) -> dict[str, Any]:
        response = httpx.post(self.url + "/switch", json={"model_spec": spec}, timeout=120)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        self.groups.add(body["status"]["pid"])
        return body

    def wait_for(self, name: str, state: str, timeout: float = 30) -> dict[str, Any]:
        """``/status``'s entry for ``name`` once it is in ``state`` (asserting it gets there)."""
        found: dict[str, Any] = {}

        def there() -> bool:
            nonlocal found
            found = self.instances().get(name, {})
            return found.get("state") == state

        assert wait_until(there, timeout, interval=0.1), found
        return found


#: ``fleet(config, *args, vllm_port=None)``.
StartFleet = Callable[..., Fleet]


@pytest.fixture
def fleet(spawn_proxy: Any, vllm_groups: set[int], tmp_path: Path) -> Iterator[StartFleet]:
    """``fleet(config, *args, vllm_port=None)`` -> :class:`Fleet`: a daemon with the catalogue
    ``config``; on ``vllm_port`` if given, else on a port with the three after it free (the
    slot's and the loaded instances')."""
    count = 0

    def start(config: str, *args: str, vllm_port: int | None = None) -> Fleet:
        nonlocal count
        count += 1
        path = tmp_path / f"fleet-{count}.toml"
        path.write_text(config)
        # The last --vllm-port given wins over spawn_proxy's.
        vllm_port = vllm_port or free_port_run(4)
        proxy = spawn_proxy("--config", str(path), "--gpus", "0,1", *args, "--vllm-port", str(vllm_port))
        return Fleet(proxy, vllm_port, vllm_groups)

    yield start


def answered_by(response: httpx.Response) -> dict[str, str]:
    """Which simulator answered (its pid, port and ``CUDA_VISIBLE_DEVICES``)."""
    return parse_instance_header(response.headers[INSTANCE_HEADER])


def port_of(item: dict[str, Any]) -> str:
    """The port of an instance's ``vllm_base`` (``http://127.0.0.1:PORT``)."""
    return str(item["vllm_base"]).rstrip("/").rsplit(":", 1)[1]


def chat(url: str, model: str) -> httpx.Response:
    return httpx.post(url + CHAT, json=chat_request(model, stream=False), timeout=60)


# ------------------------------------------------------------------ 1: side by side


#: Both HTTP paths: the front door (the default), and aiohttp's alone (``--access-log``).
PATHS = pytest.mark.parametrize("path_args", [(), ("--access-log",)], ids=["front-door", "aiohttp"])


@PATHS
async def test_two_models_side_by_side_on_their_own_gpus(
    fleet: StartFleet, path_args: tuple[str, ...]
) -> None:
    daemon = fleet(catalogue(f"{FAST} {SLOW_TOKENS}", f"{FAST} {SLOW_TOKENS}"), *path_args)
    loaded = {name: daemon.load(name)["instance"] for name in ("a", "b")}
    assert loaded["a"]["gpus"] == ["0"] and loaded["b"]["gpus"] == ["1"]
    assert loaded["a"]["pid"] != loaded["b"]["pid"] and port_of(loaded["a"]) != port_of(loaded["b"])

    # /status lists both, with every documented field.
    instances = daemon.instances()
    assert set(daemon.running()) == {"a", "b"}
    for name, gpu in (("a", "0"), ("b", "1")):
        item = instances[name]
        assert set(item) >= INSTANCE_FIELDS, INSTANCE_FIELDS - set(item)
        assert (item["state"], item["gpus"], item["pid"]) == ("ready", [gpu], loaded[name]["pid"])
        assert item["model_spec"].startswith(f"org/{name} ") and item["model"] == f"org/{name}"
        assert name in item["served_names"]
        assert item["log_path"] and Path(item["log_path"]).is_file()
        assert item["started_at"] and item["ready_at"] and item["last_used"]
        assert (item["in_flight"], item["waiting"], item["pinned"], item["expires_at"]) == (0, 0, False, None)
        assert 0 < item["gpu_memory_utilization"] <= 1
    assert instances["b"]["primary"] and not instances["a"]["primary"]  # the last one loaded

    # Both stream at once, each request at its own instance.
    async with httpx.AsyncClient(timeout=120) as client:
        streams = {}
        heads = {}
        for name in ("a", "b"):
            request = client.build_request(
                "POST", daemon.url + CHAT, json=chat_request(name, stream=True, max_tokens=40)
            )
            streams[name] = await client.send(request, stream=True)
            assert streams[name].status_code == 200
            heads[name] = answered_by(streams[name])
        chunks = {name: stream.aiter_raw() for name, stream in streams.items()}
        bodies = {name: await chunks[name].__anext__() for name in streams}  # both have begun
        both_open = daemon.instances()  # neither stream has ended: 40 tokens take 8 s
        for name, stream in streams.items():
            bodies[name] += b"".join([chunk async for chunk in chunks[name]])
            await stream.aclose()
    for name, gpu in (("a", "0"), ("b", "1")):
        assert heads[name] == {
            "pid": str(loaded[name]["pid"]),
            "port": port_of(loaded[name]),
            "cuda_visible_devices": gpu,
        }
        assert both_open[name]["in_flight"] == 1, both_open
        events = sse_data(bodies[name])
        assert events[-1] == "[DONE]" and sse_text(events)
    assert wait_until(lambda: all(i["in_flight"] == 0 for i in daemon.running().values()), 15)

    # Requests for both, mixed on the same few keep-alive connections: each one goes by its own
    # model, not by the connection it came on.
    limits = httpx.Limits(max_connections=3, max_keepalive_connections=3)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        names = ["a", "b", "alpha", "b"] * 6
        requests = [chat_request(name, stream=False, max_tokens=2) for name in names]
        answers = await asyncio.gather(*(client.post(daemon.url + CHAT, json=body) for body in requests))
    for name, answer in zip(names, answers, strict=True):
        assert answer.status_code == 200, answer.text
        owner = "a" if name == "alpha" else name
        assert answered_by(answer)["pid"] == str(loaded[owner]["pid"]), (name, answer.headers)
        assert answer.json()["model"] == f"org/{owner}"

    # GET /v1/models: both ready (a under its alias too), the entry never loaded stopped.
    listed = httpx.get(daemon.url + "/v1/models", timeout=30).json()
    cards = {card["id"]: card for card in listed["data"]}
    assert listed["object"] == "list"
    assert {name: cards[name]["status"] for name in ("a", "alpha", "b", "c")} == {
        "a": "ready",
        "alpha": "ready",
        "b": "ready",
        "c": "stopped",
    }
    assert cards["a"]["root"] == "org/a" and cards["c"]["object"] == "model"


# -------------------------------------------------------------------- 2: on demand


async def test_on_demand_load_by_the_openai_client(fleet: StartFleet) -> None:
    """A request naming an entry (or its alias) loads it; the requests that come while it loads
    wait for that one load (``/status`` counts them waiting, ``GET /v1/models`` says loading)
    and are served by it. First with nothing loaded (aiohttp's path takes the requests), then
    beside a loaded model (the front door takes them), with a ``POST /load`` of it meanwhile."""
    slow = "--sim-import-delay 0.05 --sim-load-delay 3"
    daemon = fleet(catalogue(a_args=slow, b_args=slow))
    assert daemon.running() == {}
    client = openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def ask(model: str) -> Any:
        return await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8
        )

    def queued(name: str) -> bool:
        """All four requests wait for ``name``, which is loading."""
        item = daemon.instances().get(name, {})
        if item.get("waiting") != 4 or item.get("state") != "starting":
            return False
        cards = {card["id"]: card for card in httpx.get(daemon.url + "/v1/models", timeout=30).json()["data"]}
        return bool(cards[name]["status"] == "loading")

    launches: list[str] = []
    try:
        for name, names, gpu in (("a", ("a", "alpha", "a", "alpha"), "0"), ("b", ("b",) * 4, "1")):
            asked = asyncio.gather(*(ask(model) for model in names))
            assert await asyncio.to_thread(wait_until, lambda: queued(name), 60, 0.1)  # noqa: B023
            loaded = await asyncio.to_thread(daemon.load, name)  # the load under way, not another
            answers = await asked
            item = daemon.running()[name]
            assert item["state"] == "ready" and item["gpus"] == [gpu], item
            assert (loaded["changed"], loaded["instance"]["pid"]) == (False, item["pid"]), loaded
            for raw in answers:
                completion = raw.parse()
                assert completion.choices[0].message.content
                served = parse_instance_header(raw.headers[INSTANCE_HEADER])
                assert served == {"pid": str(item["pid"]), "port": port_of(item), "cuda_visible_devices": gpu}
            launches.append(Path(item["log_path"]).name)
    finally:
        await client.close()
    assert set(daemon.running()) == {"a", "b"}
    logs = Path(daemon.running()["a"]["log_path"]).parent
    assert sorted(path.name for path in logs.glob("*_pid-*.log")) == sorted(launches)  # one load each


# ------------------------------------------------------------------ 3: unknown model


def test_unknown_model_is_404_on_both_http_paths(fleet: StartFleet) -> None:
    """The front door and aiohttp's path (``--access-log``) give the same 404, in the OpenAI
    shape, listing the names that work. ``b`` is loaded so that the front door serves requests."""
    answers = []
    for args in ((), ("--access-log",)):
        daemon = fleet(catalogue(), *args)
        b = daemon.load("b")["instance"]
        response = chat(daemon.url, "nobody-knows-me")
        answers.append((response.status_code, response.json()))
        served = chat(daemon.url, "b")  # the daemon serves known models, at their instance
        assert served.status_code == 200 and answered_by(served)["port"] == port_of(b), served.text
        client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="-", max_retries=0)
        with client, pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(
                model="nobody-knows-me", messages=[{"role": "user", "content": "x"}]
            )
        assert info.value.code == "model_not_found", info.value
    assert answers[0] == answers[1], answers
    status, body = answers[0]
    error = body["error"]
    assert status == 404 and error["code"] == "model_not_found", body
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    assert "'nobody-knows-me' does not exist" in error["message"]
    listed = error["message"].split("Models that can be used: ", 1)[1]
    assert all(name in listed for name in ("a", "alpha", "b", "c")), listed


# --------------------------------------------------------------------- 4: port taken


def closed(impostor: Impostor) -> None:
    """Close ``impostor``'s listener for good: a thread blocked in ``accept`` keeps a socket
    that is only closed listening, so it is shut down first (that wakes the thread)."""
    with contextlib.suppress(OSError):
        impostor.sock.shutdown(socket.SHUT_RDWR)
    impostor.close()


def test_a_taken_port_is_passed_over_and_gets_nothing(fleet: StartFleet) -> None:
    """Something else listens (and would answer like vLLM, with the model asked for) on the port
    the next instance would take: the instance takes the next free port instead, and nothing is
    ever forwarded to the other process. Once that port is free again, the entry keeps its own
    port from load to load."""
    daemon = fleet(catalogue())
    taken = daemon.vllm_port + 1  # the port the first loaded instance would take
    impostor = Impostor(taken, "a")
    impostor.listen()
    try:
        item = daemon.load("a")["instance"]
        assert port_of(item) == str(daemon.vllm_port + 2), item
        for model in ("a", "alpha", "a"):
            answer = chat(daemon.url, model)
            assert answer.status_code == 200, answer.text
            assert answered_by(answer) == {
                "pid": str(item["pid"]),
                "port": port_of(item),
                "cuda_visible_devices": "0",
            }
        assert impostor.received == b""  # nothing was forwarded to it
    finally:
        closed(impostor)
    unloaded = httpx.post(daemon.url + "/unload", json={"model": "a"}, timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    again = daemon.load("a")["instance"]
    assert port_of(again) == port_of(item) and again["pid"] != item["pid"]


def test_a_listener_that_appears_during_a_load_is_never_used(fleet: StartFleet) -> None:
    """The port was free at launch; another process listens on it (answering like vLLM, with the
    model asked for) before the instance's vLLM does: the load fails, its launch is stopped, and
    the other process is sent nothing. ``b``, loaded beside it, goes on serving."""
    daemon = fleet(catalogue(a_args="--sim-import-delay 30 --sim-load-delay 0.2"))
    b = daemon.load("b")["instance"]
    port = daemon.vllm_port + 2  # a's, after b's
    impostor = Impostor(port, "a")
    try:
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(httpx.post, daemon.url + "/load", json={"model": "a"}, timeout=120)
            launching = daemon.wait_for("a", "starting")
            assert wait_until(lambda: bool(daemon.instances()["a"]["pid"]), 30)
            pgid = daemon.instances()["a"]["pid"]
            assert launching["vllm_base"].endswith(f":{port}")
            impostor.listen()
            response = load.result(120)
        assert response.status_code == 409, response.text
        assert f"vLLM port {port} is in use by another process" in response.json()["error"]["message"]
        assert wait_until(lambda: not group_members(pgid), 15), group_members(pgid)
        item = daemon.instances()["a"]
        assert item["state"] == "failed" and f"vLLM port {port}" in item["error"], item
        assert impostor.connections >= 1 and impostor.received == b""  # seen, never spoken to
    finally:
        closed(impostor)
    served = chat(daemon.url, "b")
    assert served.status_code == 200 and answered_by(served)["pid"] == str(b["pid"])


def test_two_daemons_on_the_same_vllm_port(fleet: StartFleet) -> None:
    """Two daemons with the same ``--vllm-port`` on one node (both default to 8225): each one's
    instances take ports the other's do not listen on, and each daemon's requests reach only
    its own instances."""
    first = fleet(catalogue())
    second = fleet(catalogue(), vllm_port=first.vllm_port)
    mine = first.load("a")["instance"]
    theirs = second.load("a")["instance"]
    assert port_of(mine) == str(first.vllm_port + 1) and port_of(theirs) == str(first.vllm_port + 2)
    mine_b = first.load("b")["instance"]  # the port after second's a
    assert port_of(mine_b) == str(first.vllm_port + 3)
    for daemon, instances in ((first, {"a": mine, "b": mine_b}), (second, {"a": theirs})):
        for model, item in instances.items():
            answer = chat(daemon.url, model)
            assert answer.status_code == 200, answer.text
            assert answered_by(answer)["pid"] == str(item["pid"])
    assert set(second.running()) == {"a"}


# -------------------------------------------------------------------------- 5: crash


async def test_a_crashed_instance_leaves_the_other_serving(fleet: StartFleet) -> None:
    """a's vLLM is killed while b streams: b's stream ends whole, b goes on serving, /status
    shows a failed (its engine child is gone too), and a request naming a loads it again."""
    daemon = fleet(catalogue(b_args=f"{FAST} {SLOW_TOKENS}"))
    pids = {name: daemon.load(name)["instance"]["pid"] for name in ("a", "b")}
    tree = group_members(pids["a"])
    async with httpx.AsyncClient(timeout=120) as client:
        body = chat_request("b", stream=True, max_tokens=20)
        async with client.stream("POST", daemon.url + CHAT, json=body) as stream:
            chunks = stream.aiter_raw()
            received = await chunks.__anext__()  # b's stream has begun
            os.kill(pids["a"], signal.SIGKILL)  # a's vLLM API server
            failed = daemon.wait_for("a", "failed")
            received += b"".join([chunk async for chunk in chunks])
    events = sse_data(received)
    assert events[-1] == "[DONE]" and len(sse_text(events).split()) == 20, events
    assert failed["pid"] is None and failed["error"], failed
    assert wait_until(lambda: not group_members(pids["a"]), 15), group_members(pids["a"])
    assert not any(process_exists(pid) for pid in tree)  # its engine child too
    item = daemon.instances()["b"]
    assert (item["state"], item["pid"]) == ("ready", pids["b"])
    for _ in range(3):
        response = chat(daemon.url, "b")
        assert response.status_code == 200, response.text
        assert answered_by(response)["pid"] == str(pids["b"])
    cards = {card["id"]: card for card in httpx.get(daemon.url + "/v1/models", timeout=30).json()["data"]}
    assert (cards["a"]["status"], cards["b"]["status"]) == ("failed", "ready")

    again = chat(daemon.url, "a")  # on demand: a is loaded again
    assert again.status_code == 200, again.text
    item = daemon.running()["a"]
    assert item["state"] == "ready" and item["pid"] not in (None, pids["a"])
    assert answered_by(again) == {"pid": str(item["pid"]), "port": port_of(item), "cuda_visible_devices": "0"}


# -------------------------------------------------------------------- 6: proxy SIGKILL


def test_proxy_sigkill_leaves_no_instance(fleet: StartFleet) -> None:
    daemon = fleet(catalogue())
    pids = [daemon.load(name)["instance"]["pid"] for name in ("a", "b")]
    trees = {pgid: group_members(pgid) for pgid in pids}
    assert all(len(tree) >= 2 for tree in trees.values()), trees  # API server and EngineCore each
    daemon.proxy.process.kill()
    daemon.proxy.process.wait(10)
    assert wait_until(lambda: not any(group_members(pgid) for pgid in pids), 20), {
        pgid: group_members(pgid) for pgid in pids
    }
    assert not any(process_exists(pid) for tree in trees.values() for pid in tree)


def test_proxy_sigkill_while_one_instance_loads(fleet: StartFleet) -> None:
    """One instance ready, another still loading: neither outlives the proxy."""
    daemon = fleet(catalogue(b_args="--sim-import-delay 0.05 --sim-load-delay 30"))
    a = daemon.load("a")["instance"]["pid"]
    response = httpx.post(daemon.url + "/load", json={"model": "b", "wait": False}, timeout=60)
    assert response.status_code == 202, response.text
    assert wait_until(lambda: bool(daemon.instances()["b"]["pid"]), 30)
    b = daemon.instances()["b"]["pid"]
    assert wait_until(lambda: len(group_members(b)) >= 2, 30)  # its EngineCore runs, loading
    assert daemon.instances()["b"]["state"] == "starting"
    trees = {pgid: group_members(pgid) for pgid in (a, b)}
    daemon.proxy.process.kill()
    daemon.proxy.process.wait(10)
    assert wait_until(lambda: not any(group_members(pgid) for pgid in trees), 20), {
        pgid: group_members(pgid) for pgid in trees
    }
    assert not any(process_exists(pid) for tree in trees.values() for pid in tree)


def test_proxy_sigterm_stops_every_instance(fleet: StartFleet) -> None:
    daemon = fleet(catalogue())
    pids = [daemon.load(name)["instance"]["pid"] for name in ("a", "b")]
    trees = {pgid: group_members(pgid) for pgid in pids}
    daemon.proxy.process.send_signal(signal.SIGTERM)
    assert daemon.proxy.process.wait(30) == 0, daemon.proxy.read_output()
    assert not any(group_members(pgid) for pgid in pids)  # stopped before the proxy exited
    assert not any(process_exists(pid) for tree in trees.values() for pid in tree)


# --------------------------------------------------------------------------- 7: logs


def test_logs_tail_of_one_instance(fleet: StartFleet) -> None:
    daemon = fleet(catalogue())
    ports = {name: port_of(daemon.load(name)["instance"]) for name in ("a", "b")}
    for name, other in (("a", "b"), ("b", "a")):
        response = httpx.get(daemon.url + "/logs/tail", params={"model": name}, timeout=30)
        assert response.status_code == 200, response.text
        text = response.text
        assert f"org/{name}" in text and f"--port {ports[name]}" in text, text
        assert f"org/{other}" not in text
    alias = httpx.get(daemon.url + "/logs/tail", params={"model": "alpha", "lines": "500"}, timeout=30)
    assert alias.status_code == 200 and "org/a" in alias.text
    unknown = httpx.get(daemon.url + "/logs/tail", params={"model": "nope"}, timeout=30)
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"]["code"] == "model_not_found"


# ------------------------------------------------------------------------- 8: /switch


def test_switch_beside_loaded_instances(fleet: StartFleet) -> None:
    """``/switch b`` makes b the only model on its GPU (a on the other GPU keeps running); a
    free-form spec without GPUs takes the whole node: both others are stopped, a's stream in
    flight drained first."""
    daemon = fleet(catalogue(a_args=f"{FAST} {SLOW_TOKENS}"))
    a = daemon.load("a")["instance"]
    switched = daemon.switch("b")
    assert switched["status"]["state"] == "ready" and switched["status"]["model"] == "org/b"
    running = daemon.running()
    assert set(running) == {"a", "b"} and running["a"]["pid"] == a["pid"], running
    assert running["b"]["gpus"] == ["1"] and port_of(running["b"]) == str(daemon.vllm_port)
    assert answered_by(chat(daemon.url, "b")) == {
        "pid": str(running["b"]["pid"]),
        "port": str(daemon.vllm_port),
        "cuda_visible_devices": "1",
    }
    assert answered_by(chat(daemon.url, "a"))["pid"] == str(a["pid"])

    begun = threading.Event()

    def stream_a() -> bytes:
        body = chat_request("a", stream=True, max_tokens=15)
        with httpx.stream("POST", daemon.url + CHAT, json=body, timeout=120) as response:
            chunks = response.iter_raw()
            received = next(chunks)
            begun.set()
            return received + b"".join(chunks)

    with ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(stream_a)
        assert begun.wait(60)
        free = daemon.switch(f"sim/free {FAST}")
        events = sse_data(streamed.result(60))
    assert events[-1] == "[DONE]" and len(sse_text(events).split()) == 15, events  # drained, whole
    assert free["status"]["state"] == "ready" and free["status"]["model"] == "sim/free"
    pgids = [a["pid"], running["b"]["pid"]]
    assert wait_until(lambda: not any(group_members(pgid) for pgid in pgids), 15)
    running = daemon.running()
    assert [item["model_spec"] for item in running.values()] == [f"sim/free {FAST}"], running
    assert answered_by(chat(daemon.url, "sim/free"))["pid"] == str(free["status"]["pid"])


# ------------------------------------------------------- an entry that was never loaded


def test_unload_and_stop_of_an_entry_never_loaded(fleet: StartFleet) -> None:
    """``c`` is in the catalogue (``GET /v1/models`` lists it, stopped) but was never loaded:
    unloading or stopping it does nothing and says so, as for an entry loaded and unloaded
    before (``changed: false``), rather than a 404 saying it does not exist."""
    daemon = fleet(catalogue())
    daemon.load("b")
    unloaded = httpx.post(daemon.url + "/unload", json={"model": "b"}, timeout=60)
    assert unloaded.status_code == 200 and unloaded.json()["changed"] is True, unloaded.text
    again = httpx.post(daemon.url + "/unload", json={"model": "b"}, timeout=60)
    assert again.status_code == 200 and again.json()["changed"] is False, again.text  # as it is today
    cards = {card["id"]: card for card in httpx.get(daemon.url + "/v1/models", timeout=30).json()["data"]}
    assert cards["c"]["status"] == "stopped"
    never = httpx.post(daemon.url + "/unload", json={"model": "c"}, timeout=60)
    assert never.status_code == 200, never.text
    assert never.json()["changed"] is False and never.json()["name"] == "c"
    stopped = httpx.post(daemon.url + "/stop", json={"model": "c"}, timeout=60)
    assert stopped.status_code == 200, stopped.text


# ------------------------------------------------------------------ preload


def test_entries_preloaded_side_by_side_each_get_a_port(fleet: StartFleet) -> None:
    """Two entries preloaded at start-up on disjoint GPUs are placed at the same time (one
    placement lock per GPU): each must get a port of its own. Both picked the first free one
    after --vllm-port, and one failed with 'port in use' (found by hand with the README's
    4-GPU example)."""
    config = catalogue().replace("gpus = [0]\n\n[models.b]", "gpus = [0]\npreload = true\n\n[models.b]")
    config = config.replace("gpus = [1]\n", "gpus = [1]\npreload = true\n")
    daemon = fleet(config)
    a = daemon.wait_for("a", "ready", timeout=60)
    b = daemon.wait_for("b", "ready", timeout=60)
    assert port_of(a) != port_of(b)
    assert answered_by(chat(daemon.url, "a"))["port"] == port_of(a)
    assert answered_by(chat(daemon.url, "b"))["port"] == port_of(b)
