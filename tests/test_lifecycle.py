"""Process lifecycle: vLLM dying after it was ready, POST /stop, and the proxy itself being
stopped or killed (SIGTERM, SIGINT, SIGKILL) with vLLM running or starting.

No orphan may survive: after each of these, vLLM's whole process group (the API server and
its engine child, which outlives a SIGKILL of its parent like real vLLM) must be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time
from typing import Any

import httpx
from helpers import FAST, group_members, port_open, process_exists, wait_state, wait_until

# ------------------------------------------------------------------- death after ready


async def test_engine_death_after_ready(make_proxy: Any) -> None:
    proxy = await make_proxy(health_interval=0.5)
    code, body = await proxy.switch(f"sim/dies --served-model-name dies --sim-engine-die-after 1 {FAST}")
    assert code == 200, body
    pgid = body["status"]["pid"]
    tree = group_members(pgid)
    assert len(tree) >= 2

    status = await wait_state(proxy, "failed", timeout=15)
    assert status["running"] is False and status["pid"] is None
    assert status["error"]
    # The simulator exits 0 after its engine died, as vLLM does: exit_code 0 is a valid answer.
    deadline = time.monotonic() + 10
    while status["exit_code"] is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        status = await proxy.status()
    assert isinstance(status["exit_code"], int), status

    # No orphan: the engine child is gone with its parent.
    assert wait_until(lambda: not group_members(pgid), 10)
    assert not any(process_exists(pid) for pid in tree)

    # Requests now get a clear answer at once, not a hang and not a connection error.
    started = time.monotonic()
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "dies", "messages": [{"role": "user", "content": "x"}], "stream": True},
    ) as resp:
        assert resp.status == 503
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert time.monotonic() - started < 5
    assert error["code"] == 503 and error["type"]
    assert "/switch" in error["message"]
    # And a new model can be loaded.
    code, body = await proxy.switch(f"sim/again {FAST}")
    assert code == 200, body


async def test_health_checks_notice_a_dead_engine_that_does_not_exit(make_proxy: Any) -> None:
    """The API server stays up answering 503 on /health (a long --sim-dead-exit-delay): the
    proxy marks the model failed and stops forwarding to it."""
    proxy = await make_proxy(health_interval=0.2)
    spec = f"sim/zombie --sim-engine-die-after 0.5 --sim-dead-exit-delay 30 {FAST}"
    code, body = await proxy.switch(spec)
    assert code == 200, body
    pgid = body["status"]["pid"]
    status = await wait_state(proxy, "failed", timeout=15)
    assert "503" in status["error"] or "died" in status["error"]
    # Failed, but its process is still alive: `running` says so.
    assert status["running"] is True and status["pid"] == pgid and process_exists(pgid)
    async with proxy.session.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 503
    # /stop cleans it up.
    async with proxy.session.post(proxy.url + "/stop") as resp:
        assert resp.status == 200
        assert (await resp.json())["state"] == "stopped"
    assert group_members(pgid) == []


# ------------------------------------------------------------------------------- /stop


async def test_stop_ends_the_whole_tree_and_is_idempotent(make_proxy: Any) -> None:
    proxy = await make_proxy()
    async with proxy.session.post(proxy.url + "/stop") as resp:  # nothing runs: fine
        assert resp.status == 200
        assert (await resp.json())["state"] == "stopped"
    code, body = await proxy.switch(f"sim/stopme {FAST}")
    assert code == 200, body
    pgid = body["status"]["pid"]
    tree = group_members(pgid)
    assert len(tree) >= 2
    async with proxy.session.post(proxy.url + "/stop") as resp:
        assert resp.status == 200
        status = await resp.json()
    assert (status["state"], status["running"], status["pid"]) == ("stopped", False, None)
    assert group_members(pgid) == []  # gone by the time /stop answered
    assert not any(process_exists(pid) for pid in tree)
    async with proxy.session.post(proxy.url + "/stop") as resp:  # again: still fine
        assert resp.status == 200
        assert (await resp.json())["state"] == "stopped"
    async with proxy.session.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 503
        assert "/switch" in (await resp.json())["error"]["message"]


async def test_stop_kills_a_process_that_ignores_sigterm(make_proxy: Any) -> None:
    proxy = await make_proxy(stop_timeout=1)
    code, body = await proxy.switch(f"sim/stubborn --sim-ignore-sigterm {FAST}")
    assert code == 200, body
    pgid = body["status"]["pid"]
    tree = group_members(pgid)
    started = time.monotonic()
    stop = asyncio.ensure_future(proxy.session.post(proxy.url + "/stop"))
    status = await wait_state(proxy, "stopping", timeout=5)
    assert status["running"] is True  # still alive while it is being stopped
    resp = await stop
    elapsed = time.monotonic() - started
    assert resp.status == 200
    assert (await resp.json())["state"] == "stopped"
    resp.release()
    assert 0.9 <= elapsed < 6, elapsed  # SIGKILL after stop_timeout (1 s), not much later
    assert group_members(pgid) == []
    assert not any(process_exists(pid) for pid in tree)


async def test_stop_during_a_start(make_proxy: Any) -> None:
    """A stop must not wait for a model to finish loading (that can take many minutes)."""
    proxy = await make_proxy()
    switch = asyncio.ensure_future(proxy.switch("sim/slowload --sim-import-delay 0.05 --sim-load-delay 6"))
    deadline = time.monotonic() + 10
    pgid = None
    while time.monotonic() < deadline and not pgid:
        pgid = (await proxy.status())["pid"]
        await asyncio.sleep(0.05)
    assert pgid
    proxy.groups.add(pgid)
    started = time.monotonic()
    async with proxy.session.post(proxy.url + "/stop") as resp:
        assert resp.status == 200
        status = await resp.json()
    assert time.monotonic() - started < 4.5  # did not wait for the 6 s load to finish
    assert status["running"] is False
    assert status["state"] == "stopped"
    assert group_members(pgid) == []
    code, body = await switch  # the switch that was loading says it did not happen
    assert code == 409 and body["error"]["type"] == "switch_cancelled", body
    assert "stop" in body["error"]["message"].lower()


async def test_stop_right_after_a_background_switch(make_proxy: Any) -> None:
    """A script that loads without waiting and stops at once ends with nothing running."""
    proxy = await make_proxy()
    code, body = await proxy.switch("sim/quick --sim-import-delay 0.05 --sim-load-delay 3", wait=False)
    assert code == 202, body
    async with proxy.session.post(proxy.url + "/stop") as resp:
        assert resp.status == 200
    status = await proxy.status()
    # Nothing is left that could launch: no switch is running or queued (a stop cancels them).
    assert status["switching"] is False and status["target_model_spec"] is None, status
    assert (status["state"], status["running"], status["pid"]) == ("stopped", False, None), status
    assert proxy.supervisor.launch is None


# ------------------------------------------------------------------------ the proxy process


def _switch(url: str, spec: str, **extra: Any) -> dict[str, Any]:
    response = httpx.post(url + "/switch", json={"model_spec": spec, **extra}, timeout=60)
    # 202: accepted, loading in the background (wait=false); 200: loaded.
    assert response.status_code == (202 if extra.get("wait") is False else 200), response.text
    body: dict[str, Any] = response.json()
    return body


def _wait_pid(url: str, members: int = 2, timeout: float = 20) -> int:
    """The pid of the vLLM launch, once its group has ``members`` processes (engine started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = httpx.get(url + "/status", timeout=10).json()["pid"]
        if pid and len(group_members(pid)) >= members:
            return int(pid)
        time.sleep(0.05)
    raise AssertionError("vLLM did not start")


def _exit_code(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the proxy did not exit within {timeout} s") from None


def test_proxy_sigterm_stops_vllm_and_exits_0(spawn_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = spawn_proxy()
    body = _switch(proxy.url, f"sim/term {FAST}")
    pgid = body["status"]["pid"]
    vllm_groups.add(pgid)
    tree = group_members(pgid)
    assert len(tree) >= 2
    proxy.process.send_signal(signal.SIGTERM)
    assert _exit_code(proxy.process, 20) == 0, proxy.read_output()
    assert group_members(pgid) == []  # stopped before the proxy exited
    assert not any(process_exists(pid) for pid in tree)


def test_proxy_sigint_stops_vllm_and_exits_0(spawn_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = spawn_proxy()
    body = _switch(proxy.url, f"sim/int {FAST}")
    pgid = body["status"]["pid"]
    vllm_groups.add(pgid)
    tree = group_members(pgid)
    proxy.process.send_signal(signal.SIGINT)
    assert _exit_code(proxy.process, 20) == 0, proxy.read_output()
    assert group_members(pgid) == []
    assert not any(process_exists(pid) for pid in tree)


def test_proxy_sigkill_watchdog_kills_vllm(spawn_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = spawn_proxy()
    body = _switch(proxy.url, f"sim/orphan {FAST}")
    pgid = body["status"]["pid"]
    vllm_groups.add(pgid)
    tree = group_members(pgid)
    assert len(tree) >= 2
    proxy.process.kill()
    proxy.process.wait(10)
    assert wait_until(lambda: not group_members(pgid), 10), group_members(pgid)
    assert not any(process_exists(pid) for pid in tree)  # the engine child too


def test_proxy_sigkill_during_a_start(spawn_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = spawn_proxy()
    _switch(proxy.url, "sim/loading --sim-import-delay 0.05 --sim-load-delay 5", wait=False)
    pgid = _wait_pid(proxy.url, members=2)  # the API server and its engine, still loading
    vllm_groups.add(pgid)
    tree = group_members(pgid)
    assert httpx.get(proxy.url + "/status", timeout=10).json()["state"] == "starting"
    proxy.process.kill()
    proxy.process.wait(10)
    assert wait_until(lambda: not group_members(pgid), 10), group_members(pgid)
    assert not any(process_exists(pid) for pid in tree)


def test_proxy_sigterm_during_a_start(spawn_proxy: Any, vllm_groups: set[int]) -> None:
    proxy = spawn_proxy()
    _switch(proxy.url, "sim/loading2 --sim-import-delay 0.05 --sim-load-delay 10", wait=False)
    pgid = _wait_pid(proxy.url, members=2)
    vllm_groups.add(pgid)
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    assert _exit_code(proxy.process, 20) == 0, proxy.read_output()
    assert time.monotonic() - started < 9  # did not wait for the load to finish
    assert group_members(pgid) == []


def test_proxy_sigkill_with_a_vllm_that_ignores_sigterm(spawn_proxy: Any, vllm_groups: set[int]) -> None:
    """The watchdog escalates to SIGKILL after the grace period, as the proxy would."""
    proxy = spawn_proxy("--stop-timeout", "1")
    body = _switch(proxy.url, f"sim/deaf --sim-ignore-sigterm {FAST}")
    pgid = body["status"]["pid"]
    vllm_groups.add(pgid)
    tree = group_members(pgid)
    assert len(tree) >= 2
    proxy.process.kill()
    proxy.process.wait(10)
    started = time.monotonic()
    assert wait_until(lambda: not group_members(pgid), 10), group_members(pgid)
    assert time.monotonic() - started >= 0.5  # SIGTERM was ignored: it took the SIGKILL
    assert not any(process_exists(pid) for pid in tree)


def test_a_second_signal_does_not_cut_the_stop_short(spawn_proxy: Any, vllm_groups: set[int]) -> None:
    """SIGTERM while a stream is in flight, then SIGTERM and SIGINT again while the daemon
    drains it (a batch job's shell may pass the signal on too): the later ones are logged, the
    stream still ends whole, vLLM is stopped by the daemon and it exits 0."""
    proxy = spawn_proxy()
    body = _switch(proxy.url, f"sim/twice --sim-token-delay 0.1 {FAST}")
    pgid = body["status"]["pid"]
    vllm_groups.add(pgid)
    got: list[str] = []

    def stream() -> None:
        with contextlib.suppress(httpx.HTTPError):  # cut: what came is in got
            read()

    def read() -> None:
        request = {"model": "sim/twice", "prompt": "hi", "max_tokens": 40, "stream": True}
        with httpx.stream("POST", f"{proxy.url}/v1/completions", json=request, timeout=60) as resp:
            got.extend(line for line in resp.iter_lines() if line)

    reader = threading.Thread(target=stream)
    reader.start()
    assert wait_until(lambda: bool(got), 20), "no token came"
    proxy.process.send_signal(signal.SIGTERM)
    port = int(proxy.url.rsplit(":", 1)[1])
    assert wait_until(lambda: not port_open(port), 20), proxy.read_output()  # it is stopping
    proxy.process.send_signal(signal.SIGTERM)
    proxy.process.send_signal(signal.SIGINT)
    reader.join(60)
    assert got and got[-1] == "data: [DONE]", got[-3:]  # drained, not cut
    assert _exit_code(proxy.process, 30) == 0, proxy.read_output()
    assert group_members(pgid) == []  # the daemon stopped vLLM before it exited
    assert proxy.read_output().count("already stopping") == 2, proxy.read_output()
