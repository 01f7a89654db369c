"""Fault injection against the simulator: real proxy, real `vllm serve` stand-in processes, real
sockets and real signals. Each test checks that nothing is lost (every request completes or gets a
clear error), that no process is left behind, and that the proxy recovers.

The figures of the switch storm are printed and written to ``<tmp>/switch_storm.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
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
    process_exists,
    sim_groups,
    sse_data,
    wait_until,
)


async def read_stream(resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """The body as far as it came, and whether it ended cleanly (False: the connection broke)."""
    body = b""
    try:
        async for chunk in resp.content.iter_any():
            body += chunk
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        return body, False
    return body, True


def no_orphans(*pgids: int, timeout: float = 15.0) -> bool:
    """For a proxy in another process: blocks (this event loop runs nothing meanwhile)."""
    return wait_until(lambda: not any(group_members(p) for p in pgids), timeout)


async def gone(*pgids: int, timeout: float = 15.0) -> bool:
    """No process of these groups is left; waits without blocking the in-process proxy."""
    return await async_wait_until(lambda: not any(group_members(p) for p in pgids), timeout, 0.1)


async def wait_state(proxy: Any, state: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = await proxy.status()
        if status["state"] == state or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


def assert_openai_error(body: dict[str, Any], status: int) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert error["message"] and error["type"] and error["code"] == status, error
    return error


# ------------------------------------------------------------------------------- switch storm


@pytest.mark.slow
async def test_100_switches_under_concurrent_load(
    make_proxy: Any, vllm_groups: set[int], tmp_path: Path
) -> None:
    """100 switches between two specs while clients keep sending streaming and non-streaming
    requests: every request completes correctly or gets a clear 503, none hangs, and there is
    never more than one vLLM process group."""
    proxy = await make_proxy(
        drain_timeout=10.0, request_wait_timeout=60.0, health_interval=0, probe_interval=0.01
    )
    specs = [
        f"sim-a --served-model-name shared --seed 1 --sim-token-delay 0.005 {QUICK}",
        f"sim-b --served-model-name shared --seed 2 --sim-token-delay 0.005 {QUICK}",
    ]
    counts: Counter[str] = Counter()
    problems: list[str] = []
    stop = asyncio.Event()
    per_request_timeout = 45.0

    async def one(stream: bool) -> str:
        async with proxy.session.post(proxy.url + CHAT, json=chat_request("shared", stream=stream)) as resp:
            if resp.status == 503:
                body = await resp.json()
                assert_openai_error(body, 503)
                return "503"
            if resp.status != 200:
                problems.append(f"HTTP {resp.status}: {(await resp.text())[:300]}")
                return "other"
            if not stream:
                body = await resp.json()
                content = body["choices"][0]["message"]["content"]
                if content and body["usage"]["completion_tokens"] == 8:
                    return "ok"
                problems.append(f"bad completion: {body}")
                return "other"
            raw, clean = await read_stream(resp)
            events = sse_data(raw)
            if clean and events and events[-1] == "[DONE]" and not any('"error"' in e for e in events):
                return "ok"
            problems.append(f"broken stream (clean={clean}): {events[-3:]}")
            return "other"

    async def client(stream: bool) -> None:
        while not stop.is_set():
            kind = "stream" if stream else "plain"
            try:
                outcome = await asyncio.wait_for(one(stream), per_request_timeout)
            except asyncio.TimeoutError:
                outcome = "hang"
            except (aiohttp.ClientError, ConnectionError) as exc:
                problems.append(f"{kind}: {type(exc).__name__}: {exc}")
                outcome = "other"
            counts[outcome] += 1
            counts[f"{kind}_{outcome}"] += 1

    status, body = await proxy.switch(specs[0])
    assert status == 200, body
    started = time.monotonic()
    drained = cut = 0
    switch_seconds: list[float] = []
    with GroupMonitor(proxy.settings.vllm_port, interval=0.05) as monitor:
        clients = [
            asyncio.ensure_future(client(stream)) for stream in (True, True, True, False, False, False)
        ]
        try:
            for i in range(100):
                t0 = time.monotonic()
                status, body = await asyncio.wait_for(proxy.switch(specs[(i + 1) % 2]), 60)
                switch_seconds.append(time.monotonic() - t0)
                assert status == 200, body
                assert body["changed"] is True and body["status"]["state"] == "ready", body
                drained += body["drained"]
                cut += body["cut"]
                vllm_groups.add(body["status"]["pid"])
                await asyncio.sleep(random.uniform(0, 0.05))  # a moment of plain serving
        finally:
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)
        elapsed = time.monotonic() - started
    vllm_groups.update(monitor.seen)

    final = await proxy.status()
    figures = {
        "switches": 100,
        "seconds": round(elapsed, 1),
        "switch_seconds_mean": round(sum(switch_seconds) / len(switch_seconds), 3),
        "switch_seconds_max": round(max(switch_seconds), 3),
        "requests": sum(counts[k] for k in ("ok", "503", "other", "hang")),
        "completed_ok": counts["ok"],
        "streams_ok": counts["stream_ok"],
        "non_streams_ok": counts["plain_ok"],
        "clear_503": counts["503"],
        "other_errors": counts["other"],
        "hangs": counts["hang"],
        "drained_by_switches": drained,
        "cut_by_switches": cut,
        "vllm_groups_seen": len(monitor.seen),
        "max_vllm_groups_at_once": monitor.max_at_once,
        "monitor_samples": monitor.samples,
        "problems": problems[:20],
    }
    (tmp_path / "switch_storm.json").write_text(json.dumps(figures, indent=2))
    print("\nswitch storm:", json.dumps(figures))

    assert counts["hang"] == 0, figures
    assert counts["other"] == 0, figures
    assert counts["ok"] > 100, figures  # the load really ran
    assert monitor.max_at_once == 1, figures
    assert len(monitor.seen) == 101, figures  # every switch started exactly one new vLLM
    assert final["state"] == "ready" and final["in_flight"] == 0 and not final["switching"]
    assert sim_groups(proxy.settings.vllm_port) == {final["pid"]}
    assert await gone(*(monitor.seen - {final["pid"]}), timeout=5)


# ------------------------------------------------------------------------------- vLLM dies


async def _start_stream(proxy: Any, model: str, max_tokens: int) -> aiohttp.ClientResponse:
    resp = await proxy.session.post(
        proxy.url + CHAT, json=chat_request(model, stream=True, max_tokens=max_tokens)
    )
    assert resp.status == 200
    first = await asyncio.wait_for(resp.content.readany(), 10)
    assert first.startswith(b"data:")
    return resp


async def _expect_recovery(proxy: Any, spec: str) -> None:
    status, body = await proxy.switch(spec)
    assert status == 200, body
    async with proxy.session.post(proxy.url + CHAT, json=chat_request("m", stream=False)) as resp:
        assert resp.status == 200, await resp.text()


async def test_vllm_sigkilled_mid_stream(make_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = await make_proxy()
    spec = f"m --sim-token-delay 0.05 {FAST}"
    status, body = await proxy.switch(spec)
    assert status == 200, body
    pgid = body["status"]["pid"]
    resp = await _start_stream(proxy, "m", 200)
    os.killpg(pgid, signal.SIGKILL)
    raw, clean = await asyncio.wait_for(read_stream(resp), 15)
    resp.release()
    events = sse_data(raw)
    # Never a clean end: no [DONE]; the proxy says what happened in an SSE error event.
    assert "[DONE]" not in events
    assert not clean or any('"error"' in e for e in events), events[-3:]
    assert any("vLLM stopped in the middle of the response" in e for e in events), events[-3:]

    after = await wait_state(proxy, "failed")
    assert after["state"] == "failed" and after["exit_code"] == -9, after
    assert "SIGKILL" in after["error"] and after["running"] is False and after["pid"] is None
    assert await gone(pgid)
    async with proxy.session.post(proxy.url + CHAT, json=chat_request("m", stream=False)) as resp:
        assert resp.status == 503
        error = assert_openai_error(await resp.json(), 503)
        assert "POST /switch" in error["message"]
    await _expect_recovery(proxy, spec)


async def test_vllm_main_process_killed_leaving_its_child(make_proxy: Any, vllm_groups: set[int]) -> None:
    """SIGKILL to vLLM's API server only: its EngineCore child lives on until the proxy kills the
    group."""
    proxy = await make_proxy()
    spec = f"m --sim-token-delay 0.05 {FAST}"
    status, body = await proxy.switch(spec)
    assert status == 200, body
    pgid = body["status"]["pid"]
    children = [pid for pid in group_members(pgid) if pid != pgid]
    assert children, "the simulator should have an EngineCore child"
    resp = await _start_stream(proxy, "m", 200)
    os.kill(pgid, signal.SIGKILL)
    raw, _ = await asyncio.wait_for(read_stream(resp), 15)
    resp.release()
    assert "[DONE]" not in sse_data(raw)

    after = await wait_state(proxy, "failed")
    assert after["state"] == "failed" and after["exit_code"] == -9, after
    assert await gone(pgid)
    assert not any(process_exists(pid) for pid in children)
    await _expect_recovery(proxy, spec)


async def test_vllm_ignoring_sigterm_is_killed(make_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = await make_proxy(stop_timeout=0.5)
    status, body = await proxy.switch(f"m --sim-ignore-sigterm {FAST}")
    assert status == 200, body
    pgid = body["status"]["pid"]
    started = time.monotonic()
    async with proxy.session.post(proxy.url + "/stop") as resp:
        assert resp.status == 200
        stopped = await resp.json()
    took = time.monotonic() - started
    assert stopped["state"] == "stopped" and stopped["running"] is False, stopped
    assert 0.45 <= took < 15, took  # it waited stop_timeout for SIGTERM, then SIGKILLed
    assert not group_members(pgid)
    # ... and a switch away from such a vLLM works the same way.
    status, body = await proxy.switch(f"m --sim-ignore-sigterm {FAST}")
    assert status == 200, body
    first = body["status"]["pid"]
    status, body = await proxy.switch(f"m2 {FAST}")
    assert status == 200 and body["status"]["model"] == "m2", body
    assert not group_members(first)


async def test_vllm_never_ready(make_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = await make_proxy(ready_timeout=2.0, stop_timeout=2.0)
    started = time.monotonic()
    with GroupMonitor(proxy.settings.vllm_port) as monitor:
        status, body = await proxy.switch(f"m --sim-never-ready {FAST}")
    vllm_groups.update(monitor.seen)
    took = time.monotonic() - started
    assert status == 504, body
    error = assert_openai_error(body, 504)
    assert "not ready after 2 s" in error["message"] and error["log_tail"], error
    assert took < 20, took
    assert len(monitor.seen) == 1
    assert await gone(*monitor.seen)
    after = await proxy.status()
    assert after["state"] == "failed" and after["running"] is False and "ready-timeout" in after["error"]
    async with proxy.session.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 503
        assert_openai_error(await resp.json(), 503)
    await _expect_recovery(proxy, f"m {FAST}")


async def test_vllm_exits_0_after_ready(make_proxy: Any, vllm_groups: set[int]) -> None:
    """vLLM's engine dies and the server exits with status 0 (what vLLM does): that is a failure,
    not a clean stop."""
    proxy = await make_proxy()
    spec = f"m --sim-engine-die-after 0.5 --sim-exit-code 0 --sim-dead-exit-delay 0.2 {FAST}"
    status, body = await proxy.switch(spec)
    assert status == 200, body
    pgid = body["status"]["pid"]
    after = await wait_state(proxy, "failed")
    assert after["state"] == "failed", after
    assert await async_wait_until(lambda: not group_members(pgid), 15)
    after = await proxy.status()
    assert after["exit_code"] == 0 and after["running"] is False, after
    assert "exited with status 0" in after["error"] or "engine has died" in after["error"], after
    # The root cause the EngineCore logged, not a guess.
    assert "illegal memory access" in after["error"] and "may have died" not in after["error"], after
    async with proxy.session.post(proxy.url + CHAT, json=chat_request("m", stream=False)) as resp:
        assert resp.status == 503
        error = assert_openai_error(await resp.json(), 503)
        assert "POST /switch" in error["message"]
    await _expect_recovery(proxy, f"m {FAST}")


# ------------------------------------------------------------------------------- proxy dies


def _watchdogs(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    words = handle.read().split(b"\x00")
            except OSError:
                continue
            if b"aic_vllm_proxy.engine.watchdog" in words and str(pgid).encode() in words:
                found.append(int(entry))
    return found


def _kill_proxy(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(10)


async def _pid_when_loading(proxy_url: str, session: aiohttp.ClientSession) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        async with session.get(proxy_url + "/status") as resp:
            status = await resp.json()
        pid = status.get("pid")
        if pid and len(group_members(pid)) >= 2:  # the API server and its EngineCore
            return int(pid)
        await asyncio.sleep(0.05)
    raise AssertionError(f"vLLM did not start: {status}")


async def test_proxy_sigkilled_during_start(spawn_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = spawn_proxy()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        spec = "m --sim-import-delay 0 --sim-load-delay 60"
        async with session.post(proxy.url + "/switch", json={"model_spec": spec, "wait": False}) as resp:
            assert resp.status == 202
        pgid = await _pid_when_loading(proxy.url, session)
    vllm_groups.add(pgid)
    assert _watchdogs(pgid)
    _kill_proxy(proxy.process)
    assert no_orphans(pgid), f"vLLM group {pgid} outlived the proxy: {group_members(pgid)}"
    assert wait_until(lambda: not _watchdogs(pgid), 10)


async def test_proxy_sigkilled_during_streaming(spawn_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = spawn_proxy()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        spec = f"m --sim-token-delay 0.05 {FAST}"
        async with session.post(proxy.url + "/switch", json={"model_spec": spec}) as resp:
            assert resp.status == 200
            pgid = (await resp.json())["status"]["pid"]
        vllm_groups.add(pgid)
        async with session.post(
            proxy.url + CHAT, json=chat_request("m", stream=True, max_tokens=500)
        ) as resp:
            assert resp.status == 200
            assert (await asyncio.wait_for(resp.content.readany(), 10)).startswith(b"data:")
            _kill_proxy(proxy.process)
            raw, clean = await asyncio.wait_for(read_stream(resp), 15)
    assert not clean and "[DONE]" not in sse_data(raw)
    assert no_orphans(pgid), f"vLLM group {pgid} outlived the proxy: {group_members(pgid)}"
    assert wait_until(lambda: not _watchdogs(pgid), 10)


# ------------------------------------------------------------------------------- concurrency


@pytest.mark.slow
async def test_simultaneous_switches_end_with_one_vllm(make_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = await make_proxy()
    specs = [f"model-{name} {QUICK}" for name in "abc"]
    calls = [specs[i % 3] for i in range(6)]

    async def switch(spec: str) -> tuple[float, int, dict[str, Any]]:
        status, body = await proxy.switch(spec)
        return time.monotonic(), status, body

    with GroupMonitor(proxy.settings.vllm_port) as monitor:
        results = await asyncio.wait_for(asyncio.gather(*(switch(spec) for spec in calls)), 120)
        # A few more concurrently with a status poll and wait=false switches.
        async with proxy.session.post(
            proxy.url + "/switch", json={"model_spec": specs[0], "wait": False}
        ) as resp:
            assert resp.status == 202
        results += await asyncio.gather(*(switch(spec) for spec in specs[1:]))
    vllm_groups.update(monitor.seen)

    assert all(status == 200 for _, status, _ in results), results
    assert monitor.max_at_once == 1, monitor.seen
    final = await proxy.status()
    last = max(results, key=lambda r: r[0])[2]["status"]
    assert final["state"] == "ready" and final["running"] and not final["switching"], final
    assert final["model_spec"] == last["model_spec"] and final["pid"] == last["pid"], (final, last)
    assert final["model"] == final["model_spec"].split()[0]
    assert sim_groups(proxy.settings.vllm_port) == {final["pid"]}
    assert await gone(*(monitor.seen - {final["pid"]}), timeout=5)
    async with proxy.session.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 200
        assert [m["id"] for m in (await resp.json())["data"]] == [final["model"]]
