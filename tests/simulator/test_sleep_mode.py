"""The simulator's development routes and sleep mode, against vLLM 0.32's behaviour.

The expected bodies of the validation and engine errors were taken from vLLM 0.32's own
routers and exception handlers (FastAPI, a stub engine); see docs/simulator.md.
Every simulator runs in its own process group, SIGKILLed at teardown (``start``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import test_simulator
from test_simulator import FAST, Sim, alive

from aic_vllm_proxy.simulator.dev import DEV_ROUTES, _Query
from aic_vllm_proxy.simulator.generation import GARBAGE
from aic_vllm_proxy.simulator.logfmt import GiB
from aic_vllm_proxy.simulator.sleep import CONTEXT_GIB, GRAPHS_GIB, STATE_ENV

#: test_simulator.py's fixture: simulators started by a test, killed (group and all) after it.
start = test_simulator.start
DEV = {"VLLM_SERVER_DEV_MODE": "1"}
SLEEPY = [*FAST, "--enable-sleep-mode"]
Start = Callable[..., Sim]


async def call(sim: Sim, method: str, path: str, *, timeout: float = 15.0, **kwargs: Any) -> tuple[int, Any]:
    """(status, JSON body or text) of one request."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.request(method, sim.url + path, **kwargs) as resp,
    ):
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def complete(sim: Sim, max_tokens: int = 3) -> str:
    status, body = await call(sim, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": max_tokens})
    assert status == 200, body
    text: str = body["choices"][0]["text"]
    return text


async def stream(sim: Sim, max_tokens: int) -> list[dict[str, Any]]:
    """The JSON events of a completion stream, ``[DONE]`` as ``{}``."""
    events: list[dict[str, Any]] = []
    body = {"prompt": "hi", "max_tokens": max_tokens, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(sim.url + "/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: "):
                data = line.decode().strip()[len("data: ") :]
                events.append({} if data == "[DONE]" else json.loads(data))
    return events


async def started(sim: Sim) -> None:
    await asyncio.to_thread(sim.wait_healthy)


async def wait_load(sim: Sim, count: int, timeout: float = 10.0) -> None:
    """Until ``/load`` counts ``count`` requests in flight."""
    deadline = time.monotonic() + timeout
    while (await call(sim, "GET", "/load"))[1]["server_load"] != count:
        assert time.monotonic() < deadline, f"server_load never became {count}"
        await asyncio.sleep(0.02)


def gpu_state(directory: Path, sim: Sim) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / f"{sim.pid}.json").read_text())
    return data


def gib(*sizes: float) -> int:
    return sum(int(size * GiB) for size in sizes)


# -- without dev mode, the routes do not exist ---------------------------------------------


@pytest.mark.parametrize("env", [{}, {"VLLM_SERVER_DEV_MODE": "0"}])
async def test_no_dev_routes_without_dev_mode(start: Start, env: dict[str, str]) -> None:
    sim = start(*SLEEPY, env=env)
    await started(sim)
    for path, method in DEV_ROUTES:
        assert await call(sim, method, path) == (404, {"detail": "Not Found"}), path
    out = sim.output()
    assert "SECURITY WARNING" not in out and "Route: /sleep," not in out
    assert "Enabling cumem allocator because sleep mode requires it." in out


async def test_dev_routes_listed_warned_and_not_behind_the_api_key(start: Start) -> None:
    sim = start(*FAST, "--api-key", "k", env=DEV)
    await started(sim)
    out = sim.output()
    assert "WARNING" in sim.wait_for_line("SECURITY WARNING: Development endpoints are enabled!")
    listed = [line.split("Route: ", 1)[1].strip() for line in out.splitlines() if "Route: " in line]
    ping = listed.index("/ping, Methods: POST")
    assert listed[ping + 1 : ping + 1 + len(DEV_ROUTES)] == [f"{p}, Methods: {m}" for p, m in DEV_ROUTES]
    assert listed[-1] == "/v1/completions, Methods: POST"
    # vLLM guards /v1 and the like only: the dev routes answer without a key.
    assert await call(sim, "GET", "/is_sleeping") == (200, {"is_sleeping": False})
    assert (await call(sim, "GET", "/v1/models"))[0] == 401


# -- sleep, wake, memory -------------------------------------------------------------------


async def test_level_1_sleep_and_wake_release_and_restore_memory(start: Start, tmp_path: Path) -> None:
    env = {**DEV, STATE_ENV: str(tmp_path), "CUDA_VISIBLE_DEVICES": "1,3"}
    sizes = ["--sim-weights-gib", "2.5", "--sim-kv-cache-gib", "10"]
    sim = start(*SLEEPY, *sizes, "-tp", "2", env=env)
    await started(sim)
    assert "Model loading took 2.5 GiB memory and " in sim.wait_for_line("Model loading took")
    assert "Available KV cache memory: 10.0 GiB" in sim.output()
    engine = sim.engine_pid()
    full = gib(CONTEXT_GIB, 2.5, 10, GRAPHS_GIB)
    awake = {
        "pid": sim.pid,
        "engine_pid": engine,
        "gpus": {"1": full, "3": full},
        "sleeping": False,
        "sleep_level": 0,
    }
    assert gpu_state(tmp_path, sim) == awake

    assert await call(sim, "POST", "/sleep") == (200, {"status": "sleeping", "level": 1})
    assert await call(sim, "GET", "/is_sleeping") == (200, {"is_sleeping": True})
    context = gib(CONTEXT_GIB)
    asleep = {**awake, "gpus": {"1": context, "3": context}, "sleeping": True, "sleep_level": 1}
    assert gpu_state(tmp_path, sim) == asleep
    assert "Sleep mode freed 12.92 GiB memory, 0.5 GiB memory is still in use." in sim.output()

    answer = await call(sim, "POST", "/wake_up?tags=weights")
    assert answer == (200, {"status": "sleeping", "tags": ["weights"]})
    partly = gib(CONTEXT_GIB, 2.5, GRAPHS_GIB)
    assert gpu_state(tmp_path, sim)["gpus"] == {"1": partly, "3": partly}
    assert await call(sim, "GET", "/is_sleeping") == (200, {"is_sleeping": True})
    answer = await call(sim, "POST", "/wake_up?tags=kv_cache")
    assert answer == (200, {"status": "awake", "tags": ["kv_cache"]})
    assert gpu_state(tmp_path, sim) == awake
    assert await complete(sim) == " tok0 tok1 tok2"  # level 1 kept the weights

    # Awake already: vLLM warns and answers awake.
    assert await call(sim, "POST", "/wake_up") == (200, {"status": "awake", "tags": None})
    sim.wait_for_line("Executor is not sleeping.")
    sim.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(sim.wait_exit) == 0
    assert not (tmp_path / f"{sim.pid}.json").exists()  # its memory is gone with it


async def test_requests_sent_while_asleep_wait_for_the_wake(start: Start) -> None:
    sim = start(*SLEEPY, env=DEV)
    await started(sim)
    assert await call(sim, "POST", "/sleep?level=1") == (200, {"status": "sleeping", "level": 1})
    queued = asyncio.ensure_future(complete(sim))
    await wait_load(sim, 1)  # accepted...
    done, _ = await asyncio.wait({queued}, timeout=1.0)
    assert not done  # ...and held, not refused
    assert await call(sim, "POST", "/wake_up") == (200, {"status": "awake", "tags": None})
    assert await asyncio.wait_for(queued, 15) == " tok0 tok1 tok2"


async def test_level_2_generates_garbage_until_reload_weights(start: Start, tmp_path: Path) -> None:
    sim = start(*SLEEPY, env={**DEV, STATE_ENV: str(tmp_path)})
    await started(sim)
    assert await call(sim, "POST", "/sleep?level=2") == (200, {"status": "sleeping", "level": 2})
    assert gpu_state(tmp_path, sim)["gpus"] == {"0": gib(CONTEXT_GIB)}
    assert gpu_state(tmp_path, sim)["sleep_level"] == 2
    assert await call(sim, "POST", "/wake_up") == (200, {"status": "awake", "tags": None})
    assert await complete(sim) == GARBAGE * 3
    assert await call(sim, "POST", "/collective_rpc", json={"method": "reload_weights"}) == (
        200,
        {"results": [None]},
    )
    assert await call(sim, "POST", "/reset_prefix_cache") == (200, {"success": True})
    assert await complete(sim) == " tok0 tok1 tok2"
    out = sim.output()
    assert "Reloading weights inplace..." in out and "Reloading and processing weights took" in out
    assert "Resetting prefix cache..." in out


async def test_without_enable_sleep_mode_sleep_frees_nothing(start: Start, tmp_path: Path) -> None:
    """vLLM 0.32 on CUDA does not refuse: the allocator's pool is empty, nothing is released
    and level 2 loses nothing."""
    sim = start(*FAST, env={**DEV, STATE_ENV: str(tmp_path)})
    await started(sim)
    full = gpu_state(tmp_path, sim)["gpus"]
    assert await call(sim, "POST", "/sleep?level=2") == (200, {"status": "sleeping", "level": 2})
    assert gpu_state(tmp_path, sim)["gpus"] == full
    assert gpu_state(tmp_path, sim)["sleeping"] is True
    sim.wait_for_line("Sleep mode freed 0.0 GiB memory")  # the log line may follow the answer
    assert await call(sim, "POST", "/wake_up") == (200, {"status": "awake", "tags": None})
    assert await complete(sim) == " tok0 tok1 tok2"
    assert "Enabling cumem allocator" not in sim.output()


async def test_sleep_keeps_memory(start: Start, tmp_path: Path) -> None:
    sim = start(*SLEEPY, "--sim-sleep-keeps-memory", env={**DEV, STATE_ENV: str(tmp_path)})
    await started(sim)
    full = gpu_state(tmp_path, sim)["gpus"]
    assert await call(sim, "POST", "/sleep?level=1") == (200, {"status": "sleeping", "level": 1})
    assert gpu_state(tmp_path, sim)["gpus"] == full and gpu_state(tmp_path, sim)["sleeping"] is True
    sim.wait_for_line("Sleep mode freed 0.0 GiB memory")  # the log line may follow the answer


# -- in-flight requests and the sleep's mode -----------------------------------------------


async def test_mode_abort_ends_running_streams_with_abort(start: Start) -> None:
    sim = start(*SLEEPY, "--sim-token-delay", "0.05", env=DEV)
    await started(sim)
    running = asyncio.ensure_future(stream(sim, 200))
    await wait_load(sim, 1)
    assert await call(sim, "POST", "/sleep") == (200, {"status": "sleeping", "level": 1})
    events = await asyncio.wait_for(running, 15)
    assert events[-1] == {} and events[-2]["choices"][0]["finish_reason"] == "abort"
    assert len(events) < 200


async def test_mode_wait_answers_after_running_requests_finish(start: Start) -> None:
    sim = start(*SLEEPY, "--sim-token-delay", "0.05", "--sim-sleep-delay", "1", env=DEV)
    await started(sim)
    running = asyncio.ensure_future(stream(sim, 10))
    await wait_load(sim, 1)
    asleep = asyncio.ensure_future(call(sim, "POST", "/sleep?level=1&mode=wait"))
    events = await asyncio.wait_for(running, 15)
    assert not asleep.done()  # the sleep waits for the stream (and then takes 1 s)
    assert events[-2]["choices"][0]["finish_reason"] == "length" and len(events) == 11
    assert await asyncio.wait_for(asleep, 15) == (200, {"status": "sleeping", "level": 1})
    sim.wait_for_line("Waiting for in-flight requests to complete before sleeping...")


async def test_mode_keep_freezes_running_requests_until_the_wake(start: Start) -> None:
    sim = start(*SLEEPY, "--sim-token-delay", "0.05", env=DEV)
    await started(sim)
    running = asyncio.ensure_future(stream(sim, 10))
    await wait_load(sim, 1)
    assert await call(sim, "POST", "/sleep?mode=keep") == (200, {"status": "sleeping", "level": 1})
    done, _ = await asyncio.wait({running}, timeout=1.5)  # 10 tokens take 0.5 s when not frozen
    assert not done
    assert await call(sim, "POST", "/wake_up") == (200, {"status": "awake", "tags": None})
    events = await asyncio.wait_for(running, 15)
    assert events[-2]["choices"][0]["finish_reason"] == "length" and len(events) == 11
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "".join(f" tok{i}" for i in range(10))


# -- level 0, kv cache release, other routes ----------------------------------------------------


async def test_level_0_and_release_kv_cache_memory(start: Start, tmp_path: Path) -> None:
    sim = start(*SLEEPY, env={**DEV, STATE_ENV: str(tmp_path)})
    await started(sim)
    full = gpu_state(tmp_path, sim)["gpus"]["0"]
    not_paused = {
        "error": {
            "message": "Call to release_kv_cache_memory method failed: release_kv_cache_memory() requires "
            "a completed pause first",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
    assert await call(sim, "POST", "/release_kv_cache_memory") == (500, not_paused)
    assert await call(sim, "POST", "/sleep?level=0") == (200, {"status": "sleeping", "level": 0})
    assert gpu_state(tmp_path, sim)["gpus"]["0"] == full  # level 0 pauses only
    assert await call(sim, "POST", "/release_kv_cache_memory") == (200, {"status": "kv_cache_released"})
    assert gpu_state(tmp_path, sim)["gpus"]["0"] == full - gib(61.37)
    answer = await call(sim, "POST", "/wake_up?tags=kv_cache")
    assert answer == (200, {"status": "awake", "tags": ["kv_cache"]})
    state = gpu_state(tmp_path, sim)
    assert (state["gpus"], state["sleeping"], state["sleep_level"]) == ({"0": full}, False, 0)
    assert await call(sim, "POST", "/reset_mm_cache") == (200, "")
    assert await call(sim, "POST", "/reset_encoder_cache") == (200, "")
    status, info = await call(sim, "GET", "/server_info?config_format=json")
    assert status == 200 and set(info) == {"vllm_config", "vllm_env", "system_env"}
    assert info["vllm_env"]["VLLM_SERVER_DEV_MODE"] == "1"


async def test_reset_prefix_cache_fails_while_requests_run(start: Start) -> None:
    sim = start(*FAST, "--sim-token-delay", "0.05", env=DEV)
    await started(sim)
    running = asyncio.ensure_future(stream(sim, 100))
    await wait_load(sim, 1)
    assert await call(sim, "POST", "/reset_prefix_cache") == (200, {"success": False})
    answer = await call(sim, "POST", "/reset_prefix_cache?reset_running_requests=true")
    assert answer == (200, {"success": True})
    await asyncio.wait_for(running, 15)


# -- errors, as vLLM 0.32 answers them -------------------------------------------------------


def _bad_request(message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "Bad Request", "param": param, "code": 400}}


LEVEL_LE = "{'type': 'less_than_equal', 'loc': 'query.level', 'msg': 'Input should be less than or equal to 2', 'input': '%s', 'ctx': {'le': 2}}"  # noqa: E501
MODE_LITERAL = (
    "{'type': 'literal_error', 'loc': 'query.mode', 'msg': \"Input should be 'abort', 'wait' or 'keep'\", "
    "'input': 'bogus', 'ctx': {'expected': \"'abort', 'wait' or 'keep'\"}}"
)
ERRORS: list[tuple[str, str, bytes | None, int, Any]] = [
    (
        "POST",
        "/sleep?level=3",
        None,
        400,
        _bad_request("1 validation error:\n  " + LEVEL_LE % "3", "query.level"),
    ),
    (
        "POST",
        "/sleep?level=-1",
        None,
        400,
        _bad_request(
            "1 validation error:\n  {'type': 'greater_than_equal', 'loc': 'query.level', 'msg': "
            "'Input should be greater than or equal to 0', 'input': '-1', 'ctx': {'ge': 0}}",
            "query.level",
        ),
    ),
    (
        "POST",
        "/sleep?level=x",
        None,
        400,
        _bad_request(
            "1 validation error:\n  {'type': 'int_parsing', 'loc': 'query.level', 'msg': 'Input should be "
            "a valid integer, unable to parse string as an integer', 'input': 'x'}",
            "query.level",
        ),
    ),
    (
        "POST",
        "/sleep?mode=bogus",
        None,
        400,
        _bad_request("1 validation error:\n  " + MODE_LITERAL, "query.mode"),
    ),
    (
        "POST",
        "/sleep?level=9&mode=bogus",
        None,
        400,
        _bad_request(f"2 validation errors:\n  {LEVEL_LE % '9'}\n  {MODE_LITERAL}", "query.level"),
    ),
    (
        "POST",
        "/reset_prefix_cache?reset_running_requests=maybe",
        None,
        400,
        _bad_request(
            "1 validation error:\n  {'type': 'bool_parsing', 'loc': 'query.reset_running_requests', 'msg': "
            "'Input should be a valid boolean, unable to interpret input', 'input': 'maybe'}",
            "query.reset_running_requests",
        ),
    ),
    (
        "GET",
        "/server_info?config_format=yaml",
        None,
        400,
        _bad_request(
            "1 validation error:\n  {'type': 'literal_error', 'loc': 'query.config_format', 'msg': "
            "\"Input should be 'text' or 'json'\", 'input': 'yaml', "
            "'ctx': {'expected': \"'text' or 'json'\"}}",
            "query.config_format",
        ),
    ),
    (
        "POST",
        "/collective_rpc",
        b"{bad",
        400,
        _bad_request(
            "JSON decode error: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
            None,
        ),
    ),
    ("POST", "/collective_rpc", b"[1]", 400, _bad_request("Request body must be a JSON object", None)),
    ("POST", "/collective_rpc", b"{}", 400, _bad_request("Missing 'method' in request body", None)),
    (
        "POST",
        "/collective_rpc",
        b'{"method": "nope"}',
        500,
        {
            "error": {
                "message": "Call to collective_rpc method failed: Method 'nope' is not implemented.",
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            }
        },
    ),
    ("GET", "/sleep", None, 405, {"detail": "Method Not Allowed"}),
    ("POST", "/is_sleeping", None, 405, {"detail": "Method Not Allowed"}),
]


async def test_errors_as_vllm_answers_them(start: Start) -> None:
    sim = start(*SLEEPY, env=DEV)
    await started(sim)
    for method, path, body, status, expected in ERRORS:
        assert await call(sim, method, path, data=body) == (status, expected), path
    # Accepted as pydantic does: the last of repeated values, "1.0", spaces; wake tags as given.
    assert await call(sim, "POST", "/sleep?level=1&level=0") == (200, {"status": "sleeping", "level": 0})
    assert await call(sim, "POST", "/sleep?level=%201.0") == (200, {"status": "sleeping", "level": 1})
    answer = await call(sim, "POST", "/wake_up?tags=weights&tags=kv_cache")
    assert answer == (200, {"status": "awake", "tags": ["weights", "kv_cache"]})


def test_query_parsing_follows_pydantic() -> None:
    """Checked against pydantic 2 (vLLM 0.32's): int and bool of a query string."""
    from multidict import MultiDict

    def integer(raw: str) -> int | None:
        query = _Query(MultiDict({"level": raw}))
        value = query.integer("level", 1, -100, 100)
        return None if query.errors else value

    accepted = {"+1": 1, "01": 1, "1_0": 10, " 2 ": 2, "2.00": 2, "-0": 0, "\t1\n": 1}
    assert {raw: integer(raw) for raw in accepted} == accepted
    assert [integer(raw) for raw in ("1e0", "2.", "true", "0x1", "1 0", "1__0", "_1", "2.5")] == [None] * 8

    def boolean(raw: str) -> bool | None:
        query = _Query(MultiDict({"flag": raw}))
        value = query.boolean("flag")
        return None if query.errors else value

    assert [boolean(raw) for raw in ("1", "on", "T", "true", "y", "YES")] == [True] * 6
    assert [boolean(raw) for raw in ("0", "off", "f", "False", "n", "no")] == [False] * 6
    assert [boolean(raw) for raw in (" true", "2", "")] == [None] * 3


# -- failure modes ------------------------------------------------------------------------


async def test_wake_fails(start: Start, tmp_path: Path) -> None:
    sim = start(*SLEEPY, "--sim-wake-fails", env={**DEV, STATE_ENV: str(tmp_path)})
    await started(sim)
    assert await call(sim, "POST", "/sleep") == (200, {"status": "sleeping", "level": 1})
    failed = {
        "error": {
            "message": "Call to wake_up method failed: CUDA Error: out of memory at <path>:124",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
    assert await call(sim, "POST", "/wake_up") == (500, failed)
    assert await call(sim, "GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert gpu_state(tmp_path, sim)["sleeping"] is True
    assert "ERROR" in sim.wait_for_line("Invocation of wake_up method failed")
    assert (
        "RuntimeError: CUDA Error: out of memory at /workspace/csrc/cumem_allocator.cpp:124" in sim.output()
    )


async def test_wake_hangs(start: Start) -> None:
    sim = start(*SLEEPY, "--sim-wake-hangs", env=DEV)
    await started(sim)
    assert await call(sim, "POST", "/sleep") == (200, {"status": "sleeping", "level": 1})
    with pytest.raises(asyncio.TimeoutError):
        await call(sim, "POST", "/wake_up", timeout=1.0)
    for method, path in (("GET", "/is_sleeping"), ("POST", "/sleep?level=0")):
        with pytest.raises(asyncio.TimeoutError):  # the engine is stuck: no utility call answers
            await call(sim, method, path, timeout=1.0)
    assert sim.health() == 200  # vLLM's /health does not ask the engine
    engine = sim.engine_pid()
    sim.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(sim.wait_exit) == 0
    deadline = time.monotonic() + 10
    while alive(engine) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not alive(engine)


async def test_engine_death_answers_dev_calls_with_its_500(start: Start) -> None:
    sim = start(*SLEEPY, "--sim-engine-die-after", "0.2", "--sim-dead-exit-delay", "5", env=DEV)
    await started(sim)
    deadline = time.monotonic() + 10
    while sim.health() != 503:
        assert time.monotonic() < deadline, sim.output()
        await asyncio.sleep(0.02)
    status, body = await call(sim, "POST", "/sleep")
    assert status == 500 and body["error"]["type"] == "InternalServerError"
    assert "EngineCore encountered an issue" in body["error"]["message"]
