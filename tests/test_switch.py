"""POST /switch and GET /status against the simulator: real processes, real sockets.

The proxy runs in the test's event loop (``make_proxy``); vLLM is the simulator, a real child
process with an engine child in its process group.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import FAST, SIM, group_members, process_exists, wait_state
from test_front import get, post, read_response

from aic_vllm_proxy.schemas import Status
from aic_vllm_proxy.spec import ModelSpec

STATUS_FIELDS = {
    "running", "pid", "model_spec", "vllm_base", "log_path", "state", "model", "started_at",
    "ready_at", "exit_code", "error",
}  # fmt: skip


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


async def post_raw(proxy: Any, path: str, data: bytes) -> tuple[int, dict[str, Any]]:
    async with proxy.session.post(
        proxy.url + path, data=data, headers={"Content-Type": "application/json"}
    ) as resp:
        return resp.status, await resp.json()


def log_files(proxy: Any) -> list[Path]:
    log_dir = Path(proxy.settings.log_dir)
    return sorted(log_dir.glob("*.log")) if log_dir.exists() else []


# ------------------------------------------------------------------------------ /status


async def test_status_before_any_switch(make_proxy: Any) -> None:
    proxy = await make_proxy()
    status = await proxy.status()
    assert set(status) >= STATUS_FIELDS
    assert status["running"] is False
    assert status["state"] == "stopped"
    assert status["vllm_base"] == proxy.settings.vllm_base == f"http://127.0.0.1:{proxy.settings.vllm_port}"
    for name in ("pid", "model_spec", "log_path", "model", "started_at", "ready_at", "exit_code", "error"):
        assert status[name] is None, name
    async with proxy.session.get(proxy.url + "/proxy/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"


async def test_status_through_starting_ready_and_stopped(make_proxy: Any) -> None:
    proxy = await make_proxy()
    spec = "sim/life --served-model-name life --sim-import-delay 0.05 --sim-load-delay 1.2"
    code, body = await proxy.switch(spec, wait=False)
    assert code == 202, body
    status = await wait_state(proxy, "starting")
    deadline = time.monotonic() + 10
    while status["pid"] is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        status = await proxy.status()
    assert status["state"] == "starting", status
    assert status["running"] is True
    assert isinstance(status["pid"], int) and process_exists(status["pid"])
    assert status["model_spec"] == spec
    assert status["started_at"] and status["ready_at"] is None
    assert status["log_path"] and Path(status["log_path"]).exists()
    assert status["exit_code"] is None and status["error"] is None
    pid = status["pid"]

    status = await wait_state(proxy, "ready")
    assert status["running"] is True and status["pid"] == pid
    assert status["model"] == "life"
    assert status["ready_at"] >= status["started_at"]
    assert status["exit_code"] is None and status["error"] is None
    assert status["switching"] is False

    async with proxy.session.post(proxy.url + "/stop") as resp:
        assert resp.status == 200
        stopped = await resp.json()
    assert stopped["state"] == "stopped" and stopped["running"] is False and stopped["pid"] is None
    status = await proxy.status()
    assert status["state"] == "stopped" and status["running"] is False and status["pid"] is None
    assert not group_members(pid)


# ------------------------------------------------------------------------------ /switch


async def test_switch_starts_the_command_and_answers_when_ready(make_proxy: Any) -> None:
    proxy = await make_proxy()
    spec = f"sim/first --dtype half --served-model-name first {FAST}"
    started = time.monotonic()
    code, body = await proxy.switch(spec)
    assert code == 200, body
    assert body["changed"] is True
    assert 0 < body["load_seconds"] <= time.monotonic() - started
    status = body["status"]
    assert status["state"] == "ready" and status["running"] is True and status["model"] == "first"
    pid = status["pid"]
    expected = [
        *shlex.split(SIM), *shlex.split(spec), "--host", "127.0.0.1", "--port", str(proxy.settings.vllm_port),
    ]  # fmt: skip
    assert cmdline(pid) == expected  # exactly MODEL ARGS --host --port, no shell in between
    header = Path(status["log_path"]).read_text().splitlines()[0]
    assert header.startswith("# aic-vllm-proxy ")
    assert header.endswith("launching: " + shlex.join(expected))
    # Ready means ready: the very next request is served.
    async with proxy.session.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 200
        assert [m["id"] for m in (await resp.json())["data"]] == ["first"]
    assert len(group_members(pid)) >= 2  # the API server and its engine child


async def test_second_model_replaces_the_first(make_proxy: Any) -> None:
    proxy = await make_proxy()
    code, body = await proxy.switch(f"sim/a --served-model-name a {FAST}")
    assert code == 200, body
    first = body["status"]["pid"]
    first_tree = group_members(first)
    assert len(first_tree) >= 2
    code, body = await proxy.switch(f"sim/b --served-model-name b {FAST}")
    assert code == 200, body
    assert body["changed"] is True
    second = body["status"]["pid"]
    assert second != first
    assert group_members(first) == []  # the whole first tree is gone, engine included
    assert not any(process_exists(pid) for pid in first_tree)
    assert len(group_members(second)) >= 2
    status = await proxy.status()
    assert (status["model"], status["pid"], status["state"]) == ("b", second, "ready")
    async with proxy.session.get(proxy.url + "/v1/models") as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == ["b"]
    assert len(log_files(proxy)) == 2  # one log per launch


async def test_same_spec_twice_does_not_restart(make_proxy: Any) -> None:
    proxy = await make_proxy()
    spec = f"sim/same --served-model-name 'same name' {FAST}"
    code, body = await proxy.switch(spec)
    assert code == 200, body
    pid = body["status"]["pid"]
    code, again = await proxy.switch(spec)
    assert code == 200, again
    assert again["changed"] is False
    assert again["status"]["pid"] == pid
    assert again["load_seconds"] is None
    # The same words written differently are the same launch.
    reformatted = f'  sim/same\n\t--served-model-name   "same name"\n {FAST.replace(" ", "  ")}\n'
    code, again = await proxy.switch(reformatted)
    assert code == 200 and again["changed"] is False and again["status"]["pid"] == pid
    assert len(log_files(proxy)) == 1
    # force restarts it.
    code, forced = await proxy.switch(spec, force=True)
    assert code == 200 and forced["changed"] is True
    assert forced["status"]["pid"] != pid
    assert group_members(pid) == []


async def test_spec_with_newlines_quotes_and_shell_characters(make_proxy: Any, tmp_path: Path) -> None:
    proxy = await make_proxy()
    marker = tmp_path / "pwned"
    name = f"my model $(touch {marker}); `touch {marker}` | > x"
    spec = (
        "sim/quoted\n"
        f"  --served-model-name '{name}'\n"
        '  --chat-template "{{ messages }} && echo hi"\n'
        f"  {FAST}\n"
    )
    code, body = await proxy.switch(spec)
    assert code == 200, body
    status = body["status"]
    assert status["model_spec"] == spec  # shown as sent
    assert status["model"] == name
    argv = cmdline(status["pid"])
    assert argv[argv.index("--served-model-name") + 1] == name
    assert argv[argv.index("--chat-template") + 1] == "{{ messages }} && echo hi"
    async with proxy.session.get(proxy.url + "/v1/models") as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == [name]
    assert not marker.exists()  # nothing went through a shell


async def test_proxy_owned_flags_are_refused_before_anything_stops(make_proxy: Any) -> None:
    proxy = await make_proxy()
    code, body = await proxy.switch(f"sim/keep --served-model-name keep {FAST}")
    assert code == 200, body
    pid = body["status"]["pid"]
    before = await proxy.status()
    for bad in (
        "sim/other --host 0.0.0.0",
        "sim/other --port 1",
        "sim/other --port=1",
        "sim/other --host=::",
        "sim/other --uds /tmp/vllm.sock",
        "sim/other --uds=/tmp/vllm.sock",
        "sim/other --dtype half\n--port\n9000",
    ):
        started = time.monotonic()
        code, body = await proxy.switch(bad)
        assert code == 400, (bad, body)
        assert time.monotonic() - started < 5  # refused before any launch (vLLM's start takes longer)
        message = body["error"]["message"]
        flag = next(f for f in ("--host", "--port", "--uds") if f in bad)
        assert "proxy owns" in message and flag in message, message
        assert body["error"]["type"] == "invalid_request_error"
        after = await proxy.status()
        assert (after["state"], after["pid"], after["model_spec"]) == ("ready", pid, before["model_spec"])
        assert after["started_at"] == before["started_at"]
    # A flag on the deny-list is refused the same way (403), before anything stops.
    code, body = await proxy.switch("sim/other --trust-remote-code")
    assert code == 403, body
    assert "--trust-remote-code" in body["error"]["message"]
    assert len(log_files(proxy)) == 1  # nothing was launched
    assert len(group_members(pid)) >= 2
    status = await proxy.status()
    assert (status["state"], status["pid"]) == ("ready", pid)
    async with proxy.session.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 200


async def test_malformed_switch_requests_change_nothing(make_proxy: Any) -> None:
    proxy = await make_proxy()
    code, body = await proxy.switch(f"sim/keep --served-model-name keep {FAST}")
    assert code == 200, body
    before = await proxy.status()
    cases: list[tuple[bytes, int, str]] = [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b'["sim/x"]', 400, "JSON object"),
        (b'"sim/x"', 400, "JSON object"),
        (b"{}", 422, "model_spec"),
        (b'{"model": "sim/x"}', 422, "model_spec"),
        (b'{"model_spec": ""}', 422, "empty"),
        (b'{"model_spec": "  \\n\\t "}', 422, "empty"),
        (b'{"model_spec": 42}', 422, "model_spec"),
        (b'{"model_spec": null}', 422, "model_spec"),
        (b'{"model_spec": "sim/x", "wait": "maybe"}', 422, "wait"),
        (b'{"model_spec": "sim/x \'unclosed"}', 400, "quote"),
        (b'{"model_spec": "--model sim/x"}', 400, "must start with the model"),
    ]
    for data, status, words in cases:
        code, body = await post_raw(proxy, "/switch", data)
        assert code == status, (data, body)
        error = body["error"]
        assert words in error["message"], (data, error)
        assert error["code"] == status and error["type"]
    after = await proxy.status()
    assert (after["state"], after["pid"], after["model_spec"]) == (
        "ready",
        before["pid"],
        before["model_spec"],
    )
    assert len(log_files(proxy)) == 1


@pytest.mark.slow
async def test_switch_without_waiting(make_proxy: Any) -> None:
    proxy = await make_proxy()
    spec = "sim/bg --served-model-name bg --sim-import-delay 0.05 --sim-load-delay 4"
    started = time.monotonic()
    code, body = await proxy.switch(spec, wait=False)
    assert code == 202, body
    assert time.monotonic() - started < 3  # answered at once, not after the 4 s load
    assert body["switching"] is True and body["target_model_spec"] == spec
    status = await wait_state(proxy, "ready")
    assert status["model"] == "bg" and status["running"] is True
    assert status["switching"] is False and status["target_model_spec"] is None


async def test_a_background_switch_is_in_status_at_once(make_proxy: Any) -> None:
    """POST /switch with "wait": false answers 202 once the switch is registered: the very next
    GET /status (pipelined behind it on the same connection) says switching and lists it, and
    what /status answers never says switching: false until the new model is ready. Before issue
    12 the switch left the list for a moment before its task put it back; a client polling then
    read "one is ready, nothing switching" as "the switch to two did not happen"."""
    proxy = await make_proxy()
    code, body = await proxy.switch(f"sim/one --served-model-name one {FAST}")
    assert code == 200, body
    spec = f"sim/two --served-model-name two {FAST}"
    gaps: list[Status] = []
    registered = asyncio.Event()

    async def watch() -> None:
        # At every step of the event loop (the proxy runs in this one): what /status would answer.
        while True:
            status = proxy.supervisor.status()
            if status.switching:
                registered.set()
            elif registered.is_set():
                if status.state.value == "ready" and status.model == "two":
                    return
                gaps.append(status)
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.settings.port)
        request = json.dumps({"model_spec": spec, "wait": False}).encode()
        writer.write(post("/switch", request) + get("/status"))
        accepted, after = await read_response(reader), await read_response(reader)
        writer.close()
        assert accepted[0] == 202, accepted
        status = json.loads(after[2])
        assert status["switching"] is True and status["target_model_spec"] == spec, status
        assert status["pending_model_specs"] == [spec], status
        await asyncio.wait_for(watcher, 60)
    finally:
        watcher.cancel()
    assert gaps == [], gaps[:3]
    final = await proxy.status()
    assert final["model"] == "two" and final["state"] == "ready", final
    assert final["switching"] is False and final["pending_model_specs"] == [], final


async def test_a_stop_cancels_a_background_switch_that_has_not_begun(make_proxy: Any) -> None:
    """A stop in the same step of the event loop as a background switch (nothing awaited in
    between) cancels it although its task never ran: it leaves the pending list, and nothing
    loads after the stop (before issue 12 the stop did not see it; it stayed listed and ran)."""
    proxy = await make_proxy()
    supervisor = proxy.supervisor
    supervisor.switch_in_background(ModelSpec.parse(f"sim/late --served-model-name late {FAST}"))
    status = await supervisor.stop()
    assert status.state.value == "stopped" and status.switching is False, status
    assert status.pending_model_specs == [] and not supervisor.launch, status
    assert "cancelled by a stop" in (status.last_switch_error or ""), status


async def test_failing_switch_without_waiting_shows_in_status(make_proxy: Any) -> None:
    proxy = await make_proxy(ready_timeout=60)
    code, body = await proxy.switch(f"sim/bgbad --bogus {FAST}", wait=False)
    assert code == 202, body
    status = await wait_state(proxy, "failed")
    assert status["exit_code"] == 2 and "--bogus" in status["error"]
    assert status["running"] is False and status["switching"] is False


async def test_identical_concurrent_switches_launch_once(make_proxy: Any) -> None:
    proxy = await make_proxy()
    spec = f"sim/twin --served-model-name twin {FAST}"
    results = await asyncio.gather(*(proxy.switch(spec) for _ in range(3)))
    assert [code for code, _ in results] == [200] * 3, results
    assert sorted(body["changed"] for _, body in results) == [False, False, True]
    assert len({body["status"]["pid"] for _, body in results}) == 1
    assert len(log_files(proxy)) == 1


@pytest.mark.slow
async def test_concurrent_switches_are_serialised(make_proxy: Any) -> None:
    proxy = await make_proxy()
    seen: set[int] = set()
    overlaps: list[list[int]] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            launch = proxy.supervisor.launch
            if launch is not None:
                seen.add(launch.pgid)
                proxy.groups.add(launch.pgid)
            alive = [pgid for pgid in seen if group_members(pgid)]
            if len(alive) > 1:
                overlaps.append(alive)
            await asyncio.sleep(0.01)

    async def one(i: int) -> tuple[int, dict[str, Any], float]:
        code, body = await proxy.switch(f"sim/c{i} --served-model-name n{i} {FAST}")
        return code, body, time.monotonic()

    watcher = asyncio.ensure_future(watch())
    try:
        results = await asyncio.gather(*(one(i) for i in range(5)))
    finally:
        done.set()
        await watcher
    assert [code for code, _, _ in results] == [200] * 5, results
    assert all(body["changed"] for _, body, _ in results)
    assert overlaps == []  # never two vLLM process groups alive at once
    assert len(seen) == 5
    alive = [pgid for pgid in seen if group_members(pgid)]
    assert len(alive) == 1
    _, last_body, _ = max(results, key=lambda r: r[2])
    status = await proxy.status()
    assert status["state"] == "ready" and status["running"] is True
    assert status["pid"] == alive[0]
    assert status["model"] == last_body["status"]["model"]
    assert status["switching"] is False and status["target_model_spec"] is None
    async with proxy.session.get(proxy.url + "/v1/models") as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == [status["model"]]


# ------------------------------------------------------------------------- start failures


async def assert_failed_status(proxy: Any, exit_code: int | None) -> dict[str, Any]:
    status: dict[str, Any] = await proxy.status()
    assert status["state"] == "failed", status
    assert status["running"] is False and status["pid"] is None
    assert status["exit_code"] == exit_code
    assert status["error"]
    return status


async def test_unknown_flag_fails_within_seconds(make_proxy: Any) -> None:
    proxy = await make_proxy(ready_timeout=60)
    started = time.monotonic()
    code, body = await proxy.switch(f"sim/m --bogus {FAST}")
    elapsed = time.monotonic() - started
    assert code == 500, body  # vLLM exited (or could not run): a server-side failure
    assert elapsed < 10, elapsed  # the exit is noticed at once, not after --ready-timeout
    error = body["error"]
    assert error["exit_code"] == 2
    tail = "\n".join(error["log_tail"])
    assert "unrecognized arguments: --bogus" in tail
    assert "status 2" in error["message"] and "--bogus" in error["message"]
    status = await assert_failed_status(proxy, 2)
    assert "--bogus" in status["error"]
    for pgid in proxy.groups:
        assert group_members(pgid) == []
    # A good spec starts again from the failed state.
    code, body = await proxy.switch(f"sim/ok --served-model-name ok {FAST}")
    assert code == 200, body
    status = await proxy.status()
    assert (status["state"], status["exit_code"], status["error"]) == ("ready", None, None)


async def test_missing_model_path_exits_1(make_proxy: Any, tmp_path: Path) -> None:
    proxy = await make_proxy(ready_timeout=60)
    started = time.monotonic()
    code, body = await proxy.switch(f"{tmp_path}/no/such/model {FAST}")
    assert code == 500, body  # vLLM exited (or could not run): a server-side failure
    assert time.monotonic() - started < 10
    assert body["error"]["exit_code"] == 1
    assert any("/no/such/model" in line for line in body["error"]["log_tail"])
    assert "status 1" in body["error"]["message"]
    await assert_failed_status(proxy, 1)


async def test_engine_failure_during_load(make_proxy: Any) -> None:
    proxy = await make_proxy(ready_timeout=60)
    started = time.monotonic()
    code, body = await proxy.switch(f"sim/oom --sim-fail-during-load {FAST}")
    assert code == 500, body  # vLLM exited (or could not run): a server-side failure
    assert time.monotonic() - started < 10
    assert body["error"]["exit_code"] == 1
    assert body["error"]["log_tail"]
    assert "status 1" in body["error"]["message"]
    await assert_failed_status(proxy, 1)
    for pgid in proxy.groups:
        assert group_members(pgid) == []


async def test_ready_timeout_kills_the_group(make_proxy: Any) -> None:
    proxy = await make_proxy(ready_timeout=2, stop_timeout=2)
    pgids: set[int] = set()

    async def watch() -> None:
        while True:
            launch = proxy.supervisor.launch
            if launch is not None:
                pgids.add(launch.pgid)
                proxy.groups.add(launch.pgid)
            await asyncio.sleep(0.02)

    watcher = asyncio.ensure_future(watch())
    started = time.monotonic()
    try:
        code, body = await proxy.switch(f"sim/stuck --sim-never-ready {FAST}")
    finally:
        watcher.cancel()
    elapsed = time.monotonic() - started
    assert code == 504, body  # not ready within --ready-timeout
    assert 2 <= elapsed < 10, elapsed
    message = body["error"]["message"]
    assert "not ready after 2 s" in message and "stopped" in message
    assert pgids
    for pgid in pgids:
        assert group_members(pgid) == []  # API server and engine both gone
    status = await proxy.status()
    assert status["state"] == "failed" and status["running"] is False
    assert "not ready after 2 s" in status["error"]
    assert status["exit_code"] is not None


async def test_missing_vllm_binary(make_proxy: Any) -> None:
    proxy = await make_proxy(vllm_command="/nonexistent/vllm serve")
    started = time.monotonic()
    code, body = await proxy.switch("some/model")
    assert code == 500, body  # vLLM exited (or could not run): a server-side failure
    assert time.monotonic() - started < 5
    message = body["error"]["message"]
    assert "/nonexistent/vllm" in message and "No such file" in message
    assert "--vllm-command" in message
    status = await proxy.status()
    assert status["state"] == "failed" and status["running"] is False
    assert "/nonexistent/vllm" in status["error"]
    # The reason is in the log too.
    async with proxy.session.get(proxy.url + "/logs/tail") as resp:
        assert resp.status == 200
        assert "/nonexistent/vllm" in await resp.text()
