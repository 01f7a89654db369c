"""Graceful switching and shutdown: the drain before a stop, ``force``, bounded waiting, vLLM's
own ``--shutdown-timeout``, the restart policy and the proxy's SIGTERM. Real processes, real
sockets."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import (
    CHAT,
    FAST,
    QUICK,
    GroupMonitor,
    async_wait_until,
    chat_request,
    group_members,
    port_open,
    sim_groups,
    sse_data,
    wait_until,
)

from aic_vllm_proxy.engine.state import EventKind, StateEvent
from aic_vllm_proxy.hooks import HookContext, hookimpl


async def open_stream(session: aiohttp.ClientSession, url: str, model: str, tokens: int) -> Any:
    """A streaming chat request whose first event has arrived (so it is in flight)."""
    resp = await session.post(url + CHAT, json=chat_request(model, stream=True, max_tokens=tokens))
    assert resp.status == 200, await resp.text()
    first = await asyncio.wait_for(resp.content.readany(), 15)
    assert first.startswith(b"data:")
    resp.first_bytes = first  # type: ignore[attr-defined]
    return resp


async def finish_stream(resp: Any) -> tuple[list[str], bool]:
    """The SSE events of the whole stream and whether it ended cleanly."""
    body = resp.first_bytes
    clean = True
    try:
        async for chunk in resp.content.iter_any():
            body += chunk
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        clean = False
    finally:
        resp.release()
    return sse_data(body), clean


def completed(events: list[str], tokens: int) -> bool:
    """The stream ran to its end: every token, the finish reason, then [DONE]."""
    if not events or events[-1] != "[DONE]":
        return False
    chunks = [json.loads(e) for e in events[:-1]]
    finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    deltas = [c for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content")]
    return finish[-1] == "length" and len(deltas) == tokens


# ------------------------------------------------------------------------------- switch drain


async def test_switch_drains_in_flight_requests(make_proxy: Any) -> None:
    """In-flight requests finish on the old model; requests that arrive meanwhile wait and are
    served by the new one; the switch says how many were drained."""
    proxy = await make_proxy(drain_timeout=30.0)
    status, body = await proxy.switch(f"model-a --sim-token-delay 0.05 {FAST}")
    assert status == 200, body
    old_pid = body["status"]["pid"]
    streams = [await open_stream(proxy.session, proxy.url, "model-a", 40) for _ in range(2)]
    changes: list[StateEvent] = []
    proxy.supervisor.machine.subscribe(changes.append)
    started = time.monotonic()
    switch = asyncio.ensure_future(proxy.switch(f"model-b {FAST}"))
    # The drain has begun when the proxy stops admitting requests to model-a.
    assert await async_wait_until(lambda: not proxy.supervisor.serving, 10)
    during = await proxy.status()
    assert during["in_flight"] == 2
    assert during["state"] == "draining" and during["switching"] is True, during  # issue 12
    # model-b does not exist on model-a's vLLM (404): a 200 proves this request waited for model-b.
    late = asyncio.ensure_future(
        proxy.session.post(proxy.url + CHAT, json=chat_request("model-b", stream=False))
    )
    for resp in streams:
        events, clean = await finish_stream(resp)
        assert clean and completed(events, 40), events[-3:]
    status, body = await asyncio.wait_for(switch, 60)
    assert status == 200, body
    assert body["drained"] == 2 and body["cut"] == 0, body
    assert body["total_seconds"] >= 1.0  # it did wait for the streams (40 x 0.05 s)
    async with await late as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["model"] == "model-b"
    assert not group_members(old_pid)
    assert time.monotonic() - started < 60
    # One event per transition, in the order of the switch (issue 12).
    moves = [(e.old.value, e.new.value) for e in changes if e.kind is EventKind.TRANSITION]
    assert moves == [
        ("ready", "draining"), ("draining", "stopping"), ("stopping", "stopped"),
        ("stopped", "starting"), ("starting", "ready"),
    ], moves  # fmt: skip


async def test_drain_deadline_cuts_what_is_left(make_proxy: Any) -> None:
    proxy = await make_proxy(drain_timeout=1.0)
    status, body = await proxy.switch(f"model-a --sim-token-delay 0.05 {FAST}")
    assert status == 200, body
    resp = await open_stream(proxy.session, proxy.url, "model-a", 1000)  # ~50 s
    status, body = await proxy.switch(f"model-b {FAST}")
    assert status == 200, body
    assert body["drained"] == 0 and body["cut"] == 1, body
    assert body["total_seconds"] < 20, body  # the drain deadline, not the 50 s stream
    events, clean = await asyncio.wait_for(finish_stream(resp), 15)
    assert "[DONE]" not in events  # cut, never a clean end
    assert not clean or any('"error"' in e for e in events)


async def test_force_skips_the_drain(make_proxy: Any) -> None:
    proxy = await make_proxy(drain_timeout=60.0)
    status, body = await proxy.switch(f"model-a --sim-token-delay 0.05 {FAST}")
    assert status == 200, body
    resp = await open_stream(proxy.session, proxy.url, "model-a", 1000)
    started = time.monotonic()
    status, body = await proxy.switch(f"model-b {FAST}", force=True)
    assert status == 200, body
    assert body["cut"] == 1 and body["drained"] == 0, body
    assert time.monotonic() - started < 20
    events, _ = await asyncio.wait_for(finish_stream(resp), 15)
    assert "[DONE]" not in events


async def test_stop_drains_and_force_stop_does_not(make_proxy: Any) -> None:
    proxy = await make_proxy(drain_timeout=60.0)
    spec = f"model-a --sim-token-delay 0.05 {FAST}"
    status, body = await proxy.switch(spec)
    assert status == 200, body
    resp = await open_stream(proxy.session, proxy.url, "model-a", 30)
    async with proxy.session.post(proxy.url + "/stop") as stop:
        assert stop.status == 200
        assert (await stop.json())["state"] == "stopped"
    events, clean = await finish_stream(resp)
    assert clean and completed(events, 30), events[-3:]

    status, body = await proxy.switch(spec)
    assert status == 200, body
    resp = await open_stream(proxy.session, proxy.url, "model-a", 1000)
    started = time.monotonic()
    async with proxy.session.post(proxy.url + "/stop", json={"force": True}) as stop:
        assert stop.status == 200
        assert (await stop.json())["state"] == "stopped"
    assert time.monotonic() - started < 20
    events, _ = await asyncio.wait_for(finish_stream(resp), 15)
    assert "[DONE]" not in events
    async with proxy.session.post(proxy.url + CHAT, json=chat_request("model-a", stream=False)) as after:
        assert after.status == 503  # stopped: nothing to wait for


async def test_vllm_shutdown_timeout_is_passed_to_vllm(make_proxy: Any) -> None:
    proxy = await make_proxy(vllm_shutdown_timeout=3)
    status, body = await proxy.switch(f"m {FAST}")
    assert status == 200, body
    header = Path(body["status"]["log_path"]).read_text().splitlines()[0]
    assert header.endswith("--shutdown-timeout 3"), header
    # A spec that sets it itself keeps its own value (and it is not given twice).
    status, body = await proxy.switch(f"m --shutdown-timeout 1 {FAST}")
    assert status == 200, body
    header = Path(body["status"]["log_path"]).read_text().splitlines()[0]
    assert header.count("--shutdown-timeout") == 1 and "--shutdown-timeout 1" in header, header


# ------------------------------------------------------------------------------- waiting


@pytest.mark.slow
async def test_waiting_is_bounded_in_number_and_time(make_proxy: Any) -> None:
    proxy = await make_proxy(max_waiting=2, request_wait_timeout=2.5)
    spec = "m --sim-import-delay 0 --sim-load-delay 4"
    async with proxy.session.post(proxy.url + "/switch", json={"model_spec": spec, "wait": False}) as resp:
        assert resp.status == 202

    async def request() -> tuple[int, dict[str, Any], dict[str, str], float]:
        started = time.monotonic()
        async with proxy.session.post(proxy.url + CHAT, json=chat_request("m", stream=False)) as resp:
            return resp.status, await resp.json(), dict(resp.headers), time.monotonic() - started

    waiting = [asyncio.ensure_future(request()) for _ in range(2)]
    assert await async_wait_until(lambda: proxy.supervisor.waiting == 2, 10)
    # Past the number bound: 503 at once.
    for status, body, headers, took in await asyncio.gather(*(request() for _ in range(3))):
        assert status == 503 and "Retry-After" in headers, (status, body)
        assert "Too many requests are already waiting" in body["error"]["message"], body
        assert took < 2.0, took
    # Past the time bound: 503 after request_wait_timeout.
    for status, body, headers, took in await asyncio.gather(*waiting):
        assert status == 503 and "Retry-After" in headers, (status, body)
        assert "Timed out after 2.5 s" in body["error"]["message"], body
        assert 2.3 < took < 15, took
    assert proxy.supervisor.waiting == 0
    # The switch itself went on; once ready, requests are served.
    assert await async_wait_until(lambda: proxy.supervisor.machine.state.value == "ready", 30)
    status, body, _, _ = await request()
    assert status == 200, body


# ------------------------------------------------------------------------------- restarts


@pytest.mark.slow
async def test_restart_on_failure_with_backoff_and_limit(
    make_proxy: Any, vllm_groups: set[int], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(restart="on-failure", max_restarts=2, restart_backoff=0.3, health_interval=0)
    spec = f"m --sim-engine-die-after 0.5 --sim-dead-exit-delay 0.1 {QUICK}"
    port = proxy.settings.vllm_port
    restarts_seen: list[int] = []

    def gave_up() -> bool:  # the restart policy's decision after the third death: no restart
        return any(r.getMessage().startswith("not restarting m: ") for r in caplog.records)

    with GroupMonitor(port) as monitor:
        status, body = await proxy.switch(spec)
        assert status == 200, body
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status_now = await proxy.status()
            restarts_seen.append(status_now["restarts"])
            # The count goes up when a restart is scheduled; done = the third launch died too
            # and the policy decided not to restart it (so no third restart can come).
            if gave_up() and status_now["state"] == "failed" and not sim_groups(port):
                break
            await asyncio.sleep(0.05)
        final = await proxy.status()
    assert gave_up(), [r.getMessage() for r in caplog.records]
    vllm_groups.update(monitor.seen)
    assert final["state"] == "failed" and final["restarts"] == 2, final
    assert 1 in restarts_seen and 2 in restarts_seen
    assert len(monitor.seen) == 3 and monitor.max_at_once == 1, monitor.seen  # first + 2 restarts
    assert not any(group_members(p) for p in monitor.seen)
    assert "exited" in final["error"] or "died" in final["error"], final
    # Loading a model by hand resets the count.
    status, body = await proxy.switch(f"m2 {QUICK}")
    assert status == 200 and body["status"]["restarts"] == 0, body


class OnFailure:
    """An ``on_failure`` hook that does nothing. Its report in ``/status`` says the supervisor has
    handled a death: it stores the reports and applies the restart policy in one step, and a
    restart it schedules counts in ``restarts`` at once."""

    @hookimpl
    def on_failure(self, ctx: HookContext) -> None:
        pass


async def test_no_restart_by_default(make_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = await make_proxy(health_interval=0, extra_plugins=[("on-failure", OnFailure())])
    status, body = await proxy.switch(f"m --sim-engine-die-after 0.5 --sim-dead-exit-delay 0.1 {QUICK}")
    assert status == 200, body
    after: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = await proxy.status()
        if [r["hook"] for r in after["hook_reports"]] == ["on_failure"]:
            break  # the death is handled: a restart would have been scheduled by now
        await asyncio.sleep(0.05)
    assert [r["hook"] for r in after["hook_reports"]] == ["on_failure"], after
    assert after["state"] == "failed" and after["restarts"] == 0 and after["pid"] is None, after
    assert not sim_groups(proxy.settings.vllm_port)


# ------------------------------------------------------------------------------- proxy SIGTERM


@pytest.mark.slow
async def test_proxy_sigterm_stops_accepting_drains_stops_vllm_and_exits_0(
    spawn_proxy: Any, vllm_groups: set[int], tmp_path: Path
) -> None:
    proxy = spawn_proxy("--drain-timeout", "30", "--vllm-shutdown-timeout", "2")
    port = int(proxy.url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        spec = f"m --sim-token-delay 0.05 {FAST}"
        async with session.post(proxy.url + "/switch", json={"model_spec": spec}) as resp:
            assert resp.status == 200
            pgid = (await resp.json())["status"]["pid"]
        vllm_groups.add(pgid)
        stream = await open_stream(session, proxy.url, "m", 60)  # ~3 s
        proxy.process.send_signal(signal.SIGTERM)
        # It stops accepting new connections at once...
        assert await async_wait_until(lambda: not port_open(port), 5)
        # ... while the request in flight runs to its end ...
        events, clean = await finish_stream(stream)
        assert clean and completed(events, 60), events[-3:]
    # ... then vLLM is stopped and the proxy exits 0.
    assert proxy.process.wait(30) == 0, proxy.read_output()[-2000:]
    assert wait_until(lambda: not group_members(pgid), 5)
    headers = [log.read_text().splitlines()[0] for log in (tmp_path / "logs").glob("*.log")]
    assert len(headers) == 1 and headers[0].endswith("--shutdown-timeout 2"), headers


async def test_proxy_sigterm_during_a_long_load_exits_promptly(
    spawn_proxy: Any, vllm_groups: set[int]
) -> None:
    """A SIGTERM while a model is still loading does not wait for the load: the start is
    abandoned, its process group killed, and the proxy exits 0."""
    proxy = spawn_proxy("--drain-timeout", "30")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        spec = "m --sim-import-delay 0 --sim-load-delay 120"
        async with session.post(proxy.url + "/switch", json={"model_spec": spec, "wait": False}) as resp:
            assert resp.status == 202
        pgid = None
        for _ in range(400):
            async with session.get(proxy.url + "/status") as resp:
                pgid = (await resp.json()).get("pid")
            if pgid and len(group_members(pgid)) >= 2:
                break
            await asyncio.sleep(0.05)
    assert pgid, "vLLM did not start"
    vllm_groups.add(pgid)
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(30) == 0, proxy.read_output()[-2000:]
    assert time.monotonic() - started < 20
    assert wait_until(lambda: not group_members(pgid), 5)
