"""``GET /events`` (issue 15, docs/events.md): the daemon's events as Server-Sent Events, read
over real sockets while the simulator loads, fails and stops models: every state transition,
loads and unloads, evictions, switch progress, hook reports and failures (with the root cause),
each with the request id of the request that caused it; keep-alive comments; replay after
``Last-Event-ID``; a reader that does not read loses the oldest events and is told how many,
without slowing the daemon; the stream ends when the daemon stops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from typing import Any

import aiohttp
from helpers import FAST

from aic_vllm_proxy.events import EventBus
from aic_vllm_proxy.hooks import HookContext, hookimpl
from aic_vllm_proxy.schemas import ProxyEvent
from aic_vllm_proxy.web.appkeys import EVENTS


class Reader:
    """An ``/events`` reader on a connection of its own: every event parsed, and the comments."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.events: list[ProxyEvent] = []
        self.comments: list[str] = []
        self.status: int | None = None
        self.content_type: str | None = None
        self.ended = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Reader:
        self._task = asyncio.ensure_future(self._read())
        await self.wait_for(lambda e: e.type == "hello")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _read(self) -> None:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session,
                session.get(f"{self.url}/events", headers=self.headers) as resp,
            ):
                self.status, self.content_type = resp.status, resp.headers.get("Content-Type")
                data: list[str] = []
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith(":"):
                        self.comments.append(line)
                    elif line.startswith("data: "):
                        data.append(line[len("data: ") :])
                    elif line == "" and data:
                        self.events.append(ProxyEvent.model_validate_json("\n".join(data)))
                        data = []
                    self._poke()
        finally:
            self.ended.set()
            self._poke()

    def _poke(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def of(self, type_: str, model: str | None = None) -> list[ProxyEvent]:
        return [e for e in self.events if e.type == type_ and (model is None or e.model == model)]

    async def wait_for(self, match: Any, timeout: float = 60) -> ProxyEvent:
        """The first event for which ``match(event)`` is true, waiting for it (with a deadline)."""

        async def found() -> ProxyEvent:
            while True:
                for event in self.events:
                    if match(event):
                        return event
                assert not self.ended.is_set(), f"the stream ended; events: {self.events}"
                await self._changed.wait()

        return await asyncio.wait_for(found(), timeout)


def extra(event: ProxyEvent, name: str) -> Any:
    return (event.model_extra or {})[name]


async def post(proxy: Any, path: str, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any]]:
    async with proxy.session.post(f"{proxy.url}{path}", json=body, headers=headers) as resp:
        answer: dict[str, Any] = await resp.json()
        pid = (answer.get("instance") or {}).get("pid")
        if pid:
            proxy.groups.add(int(pid))
        return resp.status, answer


def load_pid(proxy: Any, name: str) -> int | None:
    return proxy.supervisor.loaded[name].machine.snapshot.pid


class Greeter:
    """A plugin whose post_switch hook reports something (a hook event)."""

    @hookimpl
    async def post_switch(self, ctx: HookContext) -> str:
        return f"warmed {ctx.instance}"


async def test_a_load_and_unload_as_events_with_the_request_id(make_proxy: Any) -> None:
    """POST /load of an entry: the reader sees it start and become ready (state events, a load
    event with its seconds, the hook's report), each carrying the X-Request-Id of the /load
    call; then an unload (stopped) caused by the /unload call's id."""
    models = {"a": {"model": "org/a", "args": FAST}}
    proxy = await make_proxy(models=models, extra_plugins=[("greeter", Greeter())])
    async with Reader(proxy.url) as reader:
        hello = reader.events[0]
        assert hello.type == "hello" and extra(hello, "last_id") == 0
        assert reader.status == 200 and reader.content_type == "text/event-stream; charset=utf-8"
        status, _ = await post(proxy, "/load", {"model": "a"}, **{"X-Request-Id": "load-a-1"})
        assert status == 200
        load = await reader.wait_for(lambda e: e.type == "load" and e.model == "a")
        assert extra(load, "reason") == "start" and extra(load, "seconds") > 0
        assert load.request_id == "load-a-1"
        launched = reader.of("launched", "a")
        assert len(launched) == 1 and extra(launched[0], "pid") == load_pid(proxy, "a")
        assert str(extra(launched[0], "pid")) in extra(launched[0], "log_path")
        transitions = [(extra(e, "old"), extra(e, "new")) for e in reader.of("state", "a")]
        assert transitions == [("stopped", "starting"), ("starting", "ready")]
        assert {e.request_id for e in reader.of("state", "a")} == {"load-a-1"}
        hook = await reader.wait_for(lambda e: e.type == "hook")
        assert (extra(hook, "hook"), extra(hook, "plugin"), extra(hook, "outcome")) == (
            "post_switch",
            "greeter",
            "ok",
        )
        assert extra(hook, "message") == "warmed a" and hook.model == "a"
        status, _ = await post(proxy, "/unload", {"model": "a"}, **{"X-Request-Id": "unload-a-1"})
        assert status == 200
        unload = await reader.wait_for(lambda e: e.type == "unload" and e.model == "a")
        assert extra(unload, "reason") == "stopped" and unload.request_id == "unload-a-1"
        ids = [e.id for e in reader.events[1:]]
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # none missing, in order


async def test_switch_progress_eviction_and_a_failure_with_its_root_cause(make_proxy: Any) -> None:
    """A /switch is queued, started and done (a /load is an instance's switch too); the model it
    replaces on the GPU is an eviction; a switch to a model whose engine fails while loading is
    a failed switch and a failure event naming the root cause, with the log tail."""
    models = {
        "a": {"model": "org/a", "args": FAST, "gpus": [0]},
        "b": {"model": "org/b", "args": FAST, "gpus": [0]},
        "bad": {"model": "org/bad", "args": f"{FAST} --sim-fail-during-load", "gpus": [0]},
    }
    proxy = await make_proxy(models=models, gpus=("0",))
    async with Reader(proxy.url) as reader:
        status, _ = await post(proxy, "/load", {"model": "a"})
        assert status == 200
        status, _ = await proxy.switch("b")
        assert status == 200
        done = await reader.wait_for(
            lambda e: e.type == "switch" and e.model == "b" and extra(e, "phase") == "done"
        )
        phases = [extra(e, "phase") for e in reader.of("switch", "b")]
        assert phases == ["queued", "started", "done"] and done.model == "b"
        assert extra(done, "seconds") > 0
        eviction = await reader.wait_for(lambda e: e.type == "eviction")
        assert eviction.model == "a" and extra(eviction, "reason") == "switch"
        status, answer = await proxy.switch("bad")
        assert status >= 500, answer
        failed = await reader.wait_for(lambda e: e.type == "switch" and extra(e, "phase") == "failed")
        assert failed.model == "bad" and "org/bad" in extra(failed, "error")
        failure = await reader.wait_for(lambda e: e.type == "failure")
        assert failure.model == "bad" and extra(failure, "reason") == "load"
        assert extra(failure, "root_cause") and extra(failure, "root_cause") in "\n".join(
            extra(failure, "log_tail")
        )
        assert extra(failure, "root_cause") in answer["error"]["message"]


async def test_keepalive_comments_and_replay_after_last_event_id(make_proxy: Any) -> None:
    """With nothing happening the stream carries keep-alive comments; a reader that comes back
    with Last-Event-ID gets the events it missed first."""
    models = {"a": {"model": "org/a", "args": FAST}}
    proxy = await make_proxy(models=models, events_keepalive=0.2)
    async with Reader(proxy.url) as first:
        await post(proxy, "/load", {"model": "a"})
        ready = await first.wait_for(lambda e: e.type == "load")
        deadline = asyncio.get_running_loop().time() + 30
        while not first.comments:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert first.comments[0] == ": keep-alive"
    await post(proxy, "/unload", {"model": "a"})
    seen = ready.id - 1  # the reader saw everything up to the state event before the load event
    async with Reader(proxy.url, {"Last-Event-ID": str(seen)}) as again:
        unload = await again.wait_for(lambda e: e.type == "unload")
        replayed = [e.id for e in again.events[1:]]
        assert replayed[0] == seen + 1 and unload.id in replayed
        assert not again.of("dropped")


async def test_a_reader_that_does_not_read_loses_the_oldest_and_is_told(make_proxy: Any) -> None:
    """A client that opens /events and reads nothing while thousands of events are published:
    publishing goes on (the daemon answers /status meanwhile), its queue keeps the newest ones,
    and once it reads it gets a ``dropped`` event whose count covers every event it did not
    get: nothing is lost silently."""
    proxy = await make_proxy(event_queue_size=50)
    bus: EventBus = proxy.app[EVENTS]
    port = int(proxy.url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    deadline = loop.time() + 30
    while bus.subscribers == 0:
        assert loop.time() < deadline
        await asyncio.sleep(0.02)
    first = bus.last_id + 1
    total = 3000
    padding = "x" * 2000  # ~6 MB in all: more than the socket buffers hold
    for n in range(total):
        bus.publish("hook", None, hook="post_switch", plugin="load-test", outcome="ok", message=padding, n=n)
        if n % 500 == 0:
            await asyncio.sleep(0)  # the handler writes what it can
    async with proxy.session.get(f"{proxy.url}/status") as resp:
        assert resp.status == 200  # the daemon is not held up by the reader
    last = bus.last_id
    seen: list[int] = []
    dropped = 0
    buffer = b""
    with sock:
        while not seen or seen[-1] < last:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 30)
            assert chunk, "the stream ended early"
            buffer += chunk
            *messages, buffer = buffer.split(b"\n\n")
            for message in messages:
                for line in message.split(b"\n"):
                    if line.startswith(b"data: "):
                        event = json.loads(line[6:])
                        if event["type"] == "dropped":
                            dropped += event["count"]
                        elif event["type"] != "hello":
                            seen.append(event["id"])
    assert dropped > 0
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert len(seen) + dropped == last - first + 1  # every event: got, or counted as dropped
    assert seen[-50:] == list(range(last - 49, last + 1))  # the newest are kept


async def test_the_stream_ends_when_the_daemon_stops(spawn_proxy: Any) -> None:
    """SIGTERM with a reader connected: the reader's stream ends and the daemon exits at once
    (it does not wait out aiohttp's shutdown timeout for the stream)."""
    daemon = spawn_proxy()
    async with Reader(daemon.url) as reader:
        daemon.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(reader.ended.wait(), 30)
    code = await asyncio.to_thread(daemon.process.wait, 30)
    assert code == 0, daemon.read_output()


async def test_a_model_that_died_is_a_failure_not_an_unload_when_stopped(make_proxy: Any) -> None:
    """A model whose engine died (a failure "died") and is then unloaded left its GPUs when it
    died: its stop is no second departure (no ``unload`` event, and the metrics count none)."""
    models = {"dies": {"model": "org/dies", "args": f"{FAST} --sim-engine-die-after 0.5"}}
    proxy = await make_proxy(models=models)
    async with Reader(proxy.url) as reader:
        status, _ = await post(proxy, "/load", {"model": "dies"})
        assert status == 200
        failure = await reader.wait_for(lambda e: e.type == "failure")
        assert extra(failure, "reason") == "died"
        status, _ = await post(proxy, "/unload", {"model": "dies"})
        assert status == 200
        await reader.wait_for(lambda e: e.type == "state" and extra(e, "new") == "stopped")
        assert not reader.of("unload")
    async with proxy.session.get(f"{proxy.url}/proxy/metrics") as resp:
        text = await resp.text()
    assert 'aic_proxy_unloads_total{model="dies",reason="stopped"}' not in text
    assert 'aic_proxy_failures_total{model="dies",reason="died"} 1.0' in text


async def test_head_gives_the_head_only_and_the_stream_carries_the_request_id(make_proxy: Any) -> None:
    """HEAD /events: the head, at once, and nothing subscribed; GET's head has the request id
    (a streamed answer is written before the guard could add it)."""
    proxy = await make_proxy()
    bus: EventBus = proxy.app[EVENTS]
    async with proxy.session.head(f"{proxy.url}/events", headers={"X-Request-Id": "h-1"}) as resp:
        assert resp.status == 200 and resp.headers["X-Request-Id"] == "h-1"
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert bus.subscribers == 0
    async with proxy.session.get(f"{proxy.url}/events", headers={"X-Request-Id": "g-1"}) as resp:
        assert resp.status == 200 and resp.headers["X-Request-Id"] == "g-1"
        assert bus.subscribers == 1
