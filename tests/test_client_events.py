"""The client follows a switch or a load through ``GET /events`` (issue 15): ``GET /status`` is
read when an event says something changed (and once in a while), not polled; a daemon without
``/events`` (404: an older one) is polled as before.

Against a real proxy in this process (``make_proxy``, with its access log: the ``GET /status``
requests are counted on the daemon's side) and real simulator processes. An older daemon is
:class:`OlderDaemon`: a small aiohttp server in front of the real proxy that forwards every
request to it and answers ``/events`` with 404, as a daemon before issue 15 did. The sync client
runs in a worker thread (``asyncio.to_thread``), as in test_client.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import ClientSession, web
from helpers import FAST

from aic_vllm_proxy.client import AsyncVLLMProxyClient, SwitchError, VLLMProxyClient
from aic_vllm_proxy.client.progress import SwitchWatch, changes_status
from aic_vllm_proxy.client.sse import EventParser
from aic_vllm_proxy.hooks import HookContext, Veto, hookimpl
from aic_vllm_proxy.schemas import ProcessState, ProxyEvent, Status

S = ProcessState
pytestmark = pytest.mark.timeout(180)
#: A load slow enough for polling to ask ``/status`` many times (about every 0.3 s: some 25).
SLOW = "--sim-import-delay 0.05 --sim-load-delay 7"


# ------------------------------------------------------------------ helpers


class AccessLog(logging.Handler):
    """The daemon's access log lines (``make_proxy(access_log=True)``), as they are written."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def count(self, method_path: str) -> int:
        """How many requests ``"GET /status"`` (the path without its query) were answered."""
        return sum(f'"{method_path} ' in line or f'"{method_path}?' in line for line in self.lines)


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    logger = logging.getLogger("aiohttp.access")
    handler, level = AccessLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


class OlderDaemon:
    """A daemon before ``GET /events``, as its clients see it: every request is forwarded to the
    real proxy at ``upstream`` (answers streamed back as they come), but ``/events`` is
    answered 404 as vLLM answers a path it does not know. ``hello_then_end``: ``/events`` sends
    its ``hello`` and ends at once instead (a stream lost on the way)."""

    def __init__(self, upstream: str, *, hello_then_end: bool = False) -> None:
        self.upstream = upstream
        self.hello_then_end = hello_then_end
        self.requests: list[tuple[str, str, int]] = []  # method, path, status
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._session = ClientSession()

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/events" and self.hello_then_end:
            self.requests.append((request.method, request.path, 200))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            hello = '{"id":0,"type":"hello","time":"2026-12-04T02:10:00+00:00","last_id":0}'
            await response.write(f"id: 0\ndata: {hello}\n\n".encode())
            await response.write_eof()
            return response
        if request.path == "/events":
            self.requests.append((request.method, request.path, 404))
            return web.json_response({"detail": "Not Found"}, status=404)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
        ) as upstream:
            self.requests.append((request.method, request.path, upstream.status))
            response = web.StreamResponse(status=upstream.status)
            response.content_type = upstream.content_type
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


@pytest.fixture
async def older_daemon() -> AsyncIterator[list[OlderDaemon]]:
    started: list[OlderDaemon] = []
    yield started
    for daemon in started:
        await daemon.stop()


async def in_front_of(started: list[OlderDaemon], url: str, *, hello_then_end: bool = False) -> OlderDaemon:
    daemon = OlderDaemon(url, hello_then_end=hello_then_end)
    await daemon.start()
    started.append(daemon)
    return daemon


NUMBER = re.compile(r"\d+(?:\.\d+)?")


def shape(lines: list[str]) -> list[str]:
    """Progress lines without the elapsed time, numbers (pids, seconds, dates) made ``#``."""
    return [NUMBER.sub("#", line.split("] ", 1)[1]) for line in lines]


# ------------------------------------------------------------------ the event stream parser


CANNED = (
    b": keep-alive\n\n"
    b'id: 0\ndata: {"id":0,"type":"hello","time":"2026-12-04T02:10:00+00:00","model":null,'
    b'"request_id":null,"last_id":7}\n\n'
    b"id: 8\r\n"
    b'data: {"id":8,"type":"state","time":"2026-12-04T02:10:01.5+00:00",\r\n'
    b'data: "model":"m","request_id":"r-1","old":"stopped","new":"starting","pid":null}\r\n\r\n'
    b"retry: 1000\nevent: ignored-name\n"
    b'data:{"id":9,"type":"hook","time":"2026-12-04T02:10:02+00:00","model":"m",'
    b'"request_id":"r-1","hook":"post_switch","plugin":"x","outcome":"veto","message":"no"}\n\n'
    b"data: not json\n\n"
    b'data: {"no": "event"}\n\n'
    b'data: {"id":10,"type":"a-later-type","time":"2026-12-04T02:10:03+00:00","new_field":[1]}\n\n'
    b'data: {"id":11,"type":"load","time":"2026-12-04T02:10:04+00:00","model":"m"}'  # no blank line: cut
)


async def test_the_event_parser_reads_a_stream_over_a_real_socket() -> None:
    """Any valid Server-Sent Events framing (CRLF, data over several lines, comments, other
    fields, no space after the colon); data that is not an event is passed over; an event cut
    off by the end of the stream is not one."""

    async def canned(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for start in range(0, len(CANNED), 37):  # in pieces that cut lines in two
            await response.write(CANNED[start : start + 37])
            await asyncio.sleep(0.001)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/events", canned)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/events"
    try:
        parser = EventParser()
        events = []
        async with httpx.AsyncClient() as http, http.stream("GET", url) as response:
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    events.append(event)
    finally:
        await runner.cleanup()
    assert [(e.id, e.type) for e in events] == [(0, "hello"), (8, "state"), (9, "hook"), (10, "a-later-type")]
    hello, state, hook, later = events
    assert hello.model_extra == {"last_id": 7} and hello.model is None
    assert (state.model, state.request_id, state.time.microsecond) == ("m", "r-1", 500000)
    assert state.model_extra == {"old": "stopped", "new": "starting", "pid": None}
    assert hook.model_extra is not None and hook.model_extra["outcome"] == "veto"
    assert later.model_extra == {"new_field": [1]} and later.model is None
    assert parser.last_id == "8"  # the last id: line seen (the messages after had none)


def event(type_: str, request_id: str | None = None, **extra: Any) -> ProxyEvent:
    return ProxyEvent.model_validate(
        {"id": 1, "type": type_, "time": "2026-12-04T02:10:00+00:00", "request_id": request_id, **extra}
    )


def test_which_events_are_worth_a_status_read_and_which_hooks_are_shown() -> None:
    for kind in (
        "state",
        "switch",
        "load",
        "unload",
        "eviction",
        "ttl",
        "restart",
        "drain",
        "failure",
        "dropped",
    ):
        assert changes_status(event(kind)), kind
    for kind in ("hello", "hook", "a-later-type"):
        assert not changes_status(event(kind)), kind

    before = Status(vllm_base="v", running=False, state=S.STOPPED)
    lines: list[str] = []
    watch = SwitchWatch("m", before, sink=lines.append)
    watch.request_id = "mine"
    report = {"hook": "post_stop", "plugin": "x", "seconds": 0.1}
    watch.event(event("hook", "mine", outcome="ok", message="fine", **report))  # ok: not shown
    watch.event(event("hook", "mine", outcome="error", message="RuntimeError: down", **report))
    watch.event(event("hook", "another", outcome="veto", message="not mine", **report))  # another request's
    watch.event(
        event("hook", None, outcome="timeout", message="timed out after 5 s", **report)
    )  # no request's
    watch.event(event("hook", "mine", outcome="veto", **report))  # no message
    watch.event(event("state", "mine", outcome="error"))  # not a hook
    assert shape(lines) == [
        "hook post_stop (plugin x): error: RuntimeError: down",
        "hook post_stop (plugin x): timeout: timed out after # s",
        "hook post_stop (plugin x): veto",
    ]
    verbose: list[str] = []
    every = SwitchWatch(None, before, sink=verbose.append, verbose=True)  # a wait: no request of its own
    every.event(event("hook", "another", outcome="ok", message="fine", **report))
    assert shape(verbose) == ["hook post_stop (plugin x): ok: fine"]


# ------------------------------------------------------------------ a switch through /events


async def test_a_switch_through_events_shows_the_same_as_polling_with_few_status_reads(
    make_proxy: Any, access_log: AccessLog, older_daemon: list[OlderDaemon]
) -> None:
    """The same slow switch followed twice with progress: through ``/events`` (the daemon
    offers it) and by polling (the same daemon behind :class:`OlderDaemon`). Both end the same
    way with the same lines; through events, ``GET /status`` is read a few times, not every
    0.3 s of the load."""
    proxy = await make_proxy(access_log=True)
    older = await in_front_of(older_daemon, proxy.url)
    client = VLLMProxyClient(proxy.url, progress=False)
    await asyncio.to_thread(client.switch, "model-a", FAST)

    seen: dict[str, list[str]] = {}
    reads: dict[str, int] = {}
    for how, url, to in (("events", proxy.url, "model-b"), ("polling", older.url, "model-a")):
        lines: list[str] = []
        before = access_log.count("GET /status")
        with VLLMProxyClient(url, progress=lines.append) as follower:
            result = await asyncio.to_thread(follower.switch, to, SLOW)
        reads[how] = access_log.count("GET /status") - before
        assert result.changed and result.status.state is S.READY and result.status.model == to, result
        seen[how] = lines
    print(f"GET /status during a {SLOW} switch: {reads}")

    through_events, polled = shape(seen["events"]), shape(seen["polling"])
    swap = {"model-a": "model-b", "model-b": "model-a"}
    renamed = [re.sub(r"model-[ab]", lambda m: swap[m.group()], line) for line in polled]
    assert through_events == renamed, (seen["events"], seen["polling"])
    assert through_events[0].startswith("switching to model-b") and "replacing model-a" in through_events[0]
    assert any(line.startswith("vLLM started (pid #), log ") for line in through_events)
    assert any("Loading weights took" in line for line in through_events)
    assert through_events[-1].startswith("model-b is ready after # s (loading took # s)")

    # A handful: before and after POST /switch, one per burst of events, and while the pid is due.
    assert reads["events"] <= 12, reads
    assert reads["polling"] >= 2 * reads["events"], reads
    assert ("GET", "/events", 404) in older.requests
    await asyncio.to_thread(client.stop)
    client.close()


async def test_an_older_daemon_without_events_is_polled_as_before(
    make_proxy: Any, older_daemon: list[OlderDaemon]
) -> None:
    """``/events`` answers 404: the sync and the async client poll ``/status``, and a switch, a
    background switch waited for and a failure end as they did."""
    proxy = await make_proxy()
    older = await in_front_of(older_daemon, proxy.url)
    lines: list[str] = []
    async with AsyncVLLMProxyClient(older.url, progress=lines.append) as client:
        result = await client.switch("m", FAST)
        assert result.changed and result.status.state is S.READY, result
        assert shape(lines)[-1].startswith("m is ready after # s (loading took # s)"), lines
        await client.start_switch("other", FAST)
        ready = await client.wait_until_ready(60)
        assert ready.model == "other" and ready.state is S.READY
    with VLLMProxyClient(older.url, progress=False) as sync_client:
        with pytest.raises(SwitchError) as info:
            await asyncio.to_thread(sync_client.switch, "broken", f"{FAST} --sim-fail-during-load")
        assert info.value.exit_code == 1 and any("CUDA out of memory" in line for line in info.value.log_tail)
        await asyncio.to_thread(sync_client.stop)
    asked = [request for request in older.requests if request[1] == "/events"]
    assert asked == [("GET", "/events", 404)] * 3, older.requests  # once per switch or wait
    polls = sum(request[:2] == ("GET", "/status") for request in older.requests)
    assert polls >= 6, older.requests  # each wait read /status more than once (0.3 s apart)


@pytest.mark.parametrize("client_kind", ["sync", "async"])
async def test_an_event_stream_that_ends_is_replaced_by_polling(
    make_proxy: Any, older_daemon: list[OlderDaemon], client_kind: str
) -> None:
    """``/events`` opens (its ``hello`` comes) and then ends: the client polls from then on, and
    the switch is followed to its end as usual (not one read every 10 s)."""
    proxy = await make_proxy()
    lost = await in_front_of(older_daemon, proxy.url, hello_then_end=True)
    lines: list[str] = []
    if client_kind == "sync":
        with VLLMProxyClient(lost.url, progress=lines.append) as client:
            result = await asyncio.to_thread(client.switch, "m", SLOW)
    else:
        async with AsyncVLLMProxyClient(lost.url, progress=lines.append) as aclient:
            result = await aclient.switch("m", SLOW)
    assert result.changed and result.status.state is S.READY, result
    assert shape(lines)[-1].startswith("m is ready after # s (loading took # s)"), lines
    assert [r for r in lost.requests if r[1] == "/events"] == [("GET", "/events", 200)]
    polls = sum(request[:2] == ("GET", "/status") for request in lost.requests)
    assert polls >= 12, lost.requests  # 7 s of loading: polled (through a lost stream: 2 or 3)
    await proxy.supervisor.stop()


@pytest.mark.parametrize("client_kind", ["sync", "async"])
async def test_a_failed_start_through_events_has_its_root_cause(
    make_proxy: Any, access_log: AccessLog, client_kind: str
) -> None:
    """A switch whose vLLM dies while loading, followed through ``/events``: the same
    :class:`SwitchError` with the root cause in its log tail and the lines shown live."""
    proxy = await make_proxy(access_log=True)
    lines: list[str] = []
    args = "--sim-import-delay 0.05 --sim-load-delay 7 --sim-fail-during-load"  # fails after 4.2 s
    before = access_log.count("GET /status")
    with pytest.raises(SwitchError) as info:
        if client_kind == "sync":
            with VLLMProxyClient(proxy.url, progress=lines.append) as client:
                await asyncio.to_thread(client.switch, "broken", args)
        else:
            async with AsyncVLLMProxyClient(proxy.url, progress=lines.append) as aclient:
                await aclient.switch("broken", args)
    reads = access_log.count("GET /status") - before
    error = info.value
    assert error.exit_code == 1 and error.state == "failed"
    assert "vLLM exited with status 1 while starting broken" in error.message
    assert any("CUDA out of memory" in line for line in error.log_tail)
    assert any("CUDA out of memory" in line for line in lines)  # shown live too
    assert lines[-1].split("] ", 1)[1].startswith("FAILED: vLLM exited with status 1")
    print(f"GET /status during a switch that fails after 4.2 s: {reads}")
    assert reads <= 10, reads  # through events: not one every 0.3 s of the load
    status = await proxy.status()
    assert status["state"] == "failed"


class Reports:
    """A pre_switch that is fine (its report shown only when verbose) but refuses the instance
    ``b``; a post_stop that fails (the switch goes on)."""

    @hookimpl
    async def pre_switch(self, ctx: HookContext) -> str:
        if ctx.instance == "b":
            raise Veto("b is not allowed during the maintenance window")
        return "checked"

    @hookimpl
    def post_stop(self, ctx: HookContext) -> None:
        raise RuntimeError("the dashboard is down")


async def test_hook_reports_are_progress_lines(make_proxy: Any) -> None:
    """The plugins' reports come as ``hook`` events while the client waits: shown when not ok,
    every one when verbose; a load refused by a plugin says why (``/status`` alone does not)."""
    models = {
        "a": {"model": "org/a", "args": FAST, "gpus": [0]},
        "b": {"model": "org/b", "args": FAST, "gpus": [1]},
    }
    proxy = await make_proxy(models=models, gpus=("0", "1"), extra_plugins=[("plugin-x", Reports())])
    failed = "hook post_stop (plugin plugin-x): error: RuntimeError: the dashboard is down"
    async with AsyncVLLMProxyClient(proxy.url, progress=False) as client:
        await client.switch("m", FAST)
        lines: list[str] = []
        await client.switch("n", FAST, progress=lines.append)  # m is stopped: its post_stop fails
        shown = shape(lines)
        assert failed in shown, lines
        assert not [line for line in shown if "hook pre_switch" in line], lines
        assert shown[-1].startswith("n is ready after")

        verbose: list[str] = []
        await client.switch("m", FAST, progress=verbose.append, verbose=True)
        shown = shape(verbose)
        assert "hook pre_switch (plugin plugin-x): ok: checked" in shown, verbose
        assert failed in shown, verbose
        await client.stop()

        refused: list[str] = []
        with pytest.raises(SwitchError) as info:
            await client.load("b", progress=refused.append)
        assert info.value.message.startswith("the load of b did not start")
        veto = "hook pre_switch (plugin plugin-x): veto: b is not allowed during the maintenance window"
        assert shape(refused)[-2:] == [veto, f"FAILED: {info.value.message}"], refused
