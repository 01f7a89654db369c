"""Tests of the vLLM simulator: real subprocesses on free ports, real sockets.

Every simulator runs in its own session (``start_new_session=True``) and its whole
process group is SIGKILLed at teardown, engine child included, so nothing leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import free_port

from aic_vllm_proxy.simulator import VLLM_VERSION
from aic_vllm_proxy.simulator.cli import parse_args
from aic_vllm_proxy.simulator.generation import StreamFormatter, plan_output
from aic_vllm_proxy.simulator.protocol import ApiError, parse_chat, parse_json
from aic_vllm_proxy.simulator.server import INSTANCE_HEADER, parse_instance_header
from aic_vllm_proxy.vllm_flags import normalize_argv

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--sim-import-delay", "0.05", "--sim-load-delay", "0.2"]
KEY = "sim-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("VLLM_API_KEY", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra or {})
    return env


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, pgid) of a live process, None if gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2])


def alive(pid: int) -> bool:
    return _stat(pid) is not None


def _status(pid: int) -> dict[str, str]:
    """The fields of ``/proc/<pid>/status`` (none once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _threads(pid: int) -> int:
    return int(_status(pid).get("Threads", "0"))


def _ignores(pid: int, sig: signal.Signals) -> bool:
    """True when the kernel discards ``sig`` for ``pid`` as it is sent (SIG_IGN)."""
    return bool(int(_status(pid)["SigIgn"], 16) >> (sig - 1) & 1)


class Sim:
    """One simulator process started with ``serve MODEL ARGS`` on a free port."""

    def __init__(
        self, *args: str, model: str = "sim-model", port: int | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.port = port or free_port()
        cmd = [sys.executable, "-m", "aic_vllm_proxy.simulator", "serve", model, *args]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=ROOT,
            env=_env(env),
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace"))
                self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no line with {text!r} in:\n{''.join(self.lines)}")
                self._cond.wait(remaining)

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def group(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := _stat(int(entry))) and st[1] == self.pid:
                pids.append(int(entry))
        return pids

    def engine_pid(self) -> int:
        for pid in self.group():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"aic_vllm_proxy.simulator.engine" in cmdline:
                return pid
        raise AssertionError(f"no engine process in group {self.group()}")

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                status: int = resp.status
                return status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def wait_healthy(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health() == 200:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"not healthy:\n{self.output()}")

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def start() -> Iterator[Callable[..., Sim]]:
    sims: list[Sim] = []

    def _start(*args: str, **kwargs: Any) -> Sim:
        sim = Sim(*args, **kwargs)
        sims.append(sim)
        return sim

    yield _start
    for sim in sims:
        sim.kill_group()


@pytest.fixture(scope="module")
def shared() -> Iterator[Sim]:
    """A ready simulator for the API tests: API key, 50 ms between tokens."""
    sim = Sim(
        *FAST,
        "--api-key",
        KEY,
        "--served-model-name",
        "sim-model",
        "alias",
        "--sim-token-delay",
        "0.05",
        "--max-model-len",
        "64",
    )
    try:
        sim.wait_healthy()
        yield sim
    finally:
        sim.kill_group()


async def _sse(resp: aiohttp.ClientResponse) -> list[str]:
    """The ``data:`` payloads of an SSE response (until the end of the body)."""
    events = []
    async for line in resp.content:
        text = line.decode().strip()
        if text.startswith("data: "):
            events.append(text[len("data: ") :])
    return events


# -- unit tests (in-process) -----------------------------------------------------------


def test_plan_output_stop_strings() -> None:
    plain = plan_output(4)
    assert plain.text == " tok0 tok1 tok2 tok3" and plain.finish_reason == "length"
    stopped = plan_output(10, ["tok3"])
    assert stopped.text == " tok0 tok1 tok2 " and stopped.finish_reason == "stop"
    assert stopped.stop_reason == "tok3" and stopped.completion_tokens == 4
    spanning = plan_output(10, ["tok1 tok2"])
    assert spanning.text == " tok0 " and spanning.completion_tokens == 3


def test_stream_events_are_json() -> None:
    fmt = StreamFormatter(True, "chatcmpl-1", 7, 'm"x', "fp")
    events = [
        fmt.role(0),
        fmt.token(0, ' "quoted"'),
        fmt.final(0, " end", "length", None),
        fmt.usage(3, 2),
    ]
    for event in events:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        json.loads(event[6:])
    assert json.loads(events[1][6:])["choices"][0]["delta"]["content"] == ' "quoted"'
    assert json.loads(events[3][6:])["usage"]["total_tokens"] == 5


def test_cli_flexible_arguments() -> None:
    args = parse_args(["serve", "--model", "m", "-tp", "2", "--max_model_len", "4k", "-O3"])
    assert (args.model, args.tensor_parallel_size, args.max_model_len) == ("m", 2, 4000)
    assert args.optimization_level == 3
    assert normalize_argv(["-cc.mode=3", "--compilation-config.x", "1"]) == [
        "-cc",
        '{"mode": 3}',
        "--compilation-config",
        '{"x": 1}',
    ]


def test_cli_several_served_names() -> None:
    """``--served-model-name`` takes several names (vLLM's nargs='+') and keeps their order."""
    args = parse_args(["serve", "m", "--served-model-name", "A", "B", "C", "--port", "1"])
    assert (args.served_model_name, args.port) == (["A", "B", "C"], 1)
    assert parse_args(["serve", "m", "--served-model-name=A"]).served_model_name == ["A"]


def test_validation_errors() -> None:
    with pytest.raises(ApiError) as info:
        parse_json(b"{nope")
    assert info.value.status == 400 and info.value.err_type == "Bad Request"
    assert "json_invalid" in info.value.message
    with pytest.raises(ApiError) as info:
        parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})
    assert info.value.body()["error"]["param"] == "max_tokens"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    req = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a b"}, image]}]})
    assert req.prompt_tokens == 3


# -- command line and start-up ------------------------------------------------------------


def test_bad_flag_exits_2_with_usage() -> None:
    cmd = [sys.executable, "-m", "aic_vllm_proxy.simulator", "serve", "m", "--bogus-flag"]
    res = subprocess.run(
        [*cmd, "--sim-import-delay", "0"], capture_output=True, text=True, cwd=ROOT, env=_env()
    )
    assert res.returncode == 2
    assert res.stderr.startswith("usage: vllm")
    assert "vllm: error: unrecognized arguments: --bogus-flag" in res.stderr
    version = subprocess.run(
        [sys.executable, "-m", "aic_vllm_proxy.simulator", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    assert version.returncode == 0 and version.stdout.strip() == VLLM_VERSION


def test_missing_model_path_exits_1(start: Callable[..., Sim]) -> None:
    sim = start(*FAST, model="/nonexistent/model")
    assert sim.wait_exit() == 1
    out = sim.output()
    assert "huggingface_hub.errors.HFValidationError" in out and "'/nonexistent/model'" in out
    assert "Starting to load model" not in out  # failed before the engine started


@pytest.mark.parametrize("mode", ["conflict", "flag"])
def test_port_in_use_exits_1(start: Callable[..., Sim], mode: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["--sim-startup-bind-fail"] if mode == "flag" else []
        sim = start(*FAST, *args, port=port if mode == "conflict" else None)
        assert sim.wait_exit() == 1
    assert "OSError: [Errno 98] Address already in use" in sim.output()


def test_fail_during_load_exits_1(start: Callable[..., Sim]) -> None:
    sim = start(*FAST, "--sim-fail-during-load")
    assert sim.wait_exit() == 1
    out = sim.output()
    assert "EngineCore failed to start." in out and "CUDA out of memory" in out
    assert "RuntimeError: Engine core initialization failed" in out


def test_never_ready_keeps_port_closed(start: Callable[..., Sim]) -> None:
    sim = start("--sim-import-delay", "0", "--sim-load-delay", "0", "--sim-never-ready")
    sim.wait_for_line("Starting to load model")
    sim.wait_for_line("Waiting for 1 local, 0 remote core engine proc(s) to start.")
    assert sim.proc.poll() is None
    assert sim.health() is None  # connection refused


def test_refused_while_loading_then_ready_then_sigterm(start: Callable[..., Sim]) -> None:
    sim = start("--sim-import-delay", "0.05", "--sim-load-delay", "0.8")
    refused = 0
    while sim.health() is None:
        assert sim.proc.poll() is None, sim.output()
        refused += 1
        time.sleep(0.02)
    assert refused > 5  # the port did not accept connections during the load
    assert sim.health() == 200
    out = sim.output()
    for line in ("version " + VLLM_VERSION, "non-default args:", "Loading weights took"):
        assert line in out
    for line in ("Starting vLLM server on http://127.0.0.1:", "Application startup complete."):
        assert line in out
    assert out.index("Loading weights took") < out.index("Starting vLLM server on")

    engine = sim.engine_pid()
    assert _stat(engine) == (sim.pid, sim.pid)  # child of the API server, same group
    assert Path(f"/proc/{engine}/comm").read_text().strip() == "VLLM::EngineCor"

    sim.proc.send_signal(signal.SIGTERM)
    assert sim.wait_exit() == 0
    deadline = time.monotonic() + 5
    while alive(engine) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(engine)
    out = sim.output()
    assert "[shutdown] API server: shutdown triggered" in out
    assert "INFO:     Application shutdown complete." in out


def test_sigkill_of_api_server_orphans_the_engine(start: Callable[..., Sim]) -> None:
    sim = start(*FAST)
    sim.wait_healthy()
    engine = sim.engine_pid()
    threads = _threads(engine)
    sim.proc.kill()
    sim.wait_exit()
    # The engine has seen its input from the API server end (the thread reading it is over)...
    deadline = time.monotonic() + 10
    while _threads(engine) >= threads and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _threads(engine) < threads or not alive(engine)
    assert alive(engine)  # ...and goes on, like vLLM: the EngineCore outlives a SIGKILLed API server
    stat = _stat(engine)
    assert stat is not None and stat[0] != sim.pid and stat[1] == sim.pid
    sim.kill_group()
    deadline = time.monotonic() + 5
    while alive(engine) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(engine)


def test_ignore_sigterm(start: Callable[..., Sim]) -> None:
    sim = start(*FAST, "--sim-ignore-sigterm")
    sim.wait_healthy()
    engine = sim.engine_pid()
    # Both ignore SIGTERM (SIG_IGN): the kernel discards it as it is sent, nothing runs later.
    assert _ignores(sim.pid, signal.SIGTERM) and _ignores(engine, signal.SIGTERM)
    os.killpg(sim.pid, signal.SIGTERM)
    assert sim.proc.poll() is None and alive(engine)
    assert sim.health() == 200


# -- engine death ----------------------------------------------------------------------


def test_engine_die_after_gives_503_then_exit(start: Callable[..., Sim]) -> None:
    sim = start(*FAST, "--sim-engine-die-after", "0.3", "--sim-exit-code", "3")
    sim.wait_healthy()
    seen = set()
    while sim.proc.poll() is None:
        if (status := sim.health()) is not None:
            seen.add(status)
        time.sleep(0.02)
    assert seen >= {200, 503}
    assert sim.wait_exit() == 3
    out = sim.output()
    assert "EngineCore encountered a fatal error." in out
    assert "vllm.v1.engine.exceptions.EngineDeadError" in out
    assert "INFO:     Finished server process" in out


async def _stream_until_cut(url: str, body: dict[str, Any]) -> tuple[list[str], bool]:
    """The data events of a chat stream, and whether the stream was cut."""
    events: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        try:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(line.decode().strip()[len("data: ") :])
        except aiohttp.ClientPayloadError:
            return events, True
    return events, False


@pytest.mark.parametrize("mode", ["cut", "error"])
async def test_crash_on_request(start: Callable[..., Sim], mode: str) -> None:
    sim = start(*FAST, "--sim-crash-on-request", "2", "--sim-abort-stream", mode)
    await asyncio.to_thread(sim.wait_healthy)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    events, cut = await _stream_until_cut(sim.url, body)
    assert not cut and events[-1] == "[DONE]"
    events, cut = await _stream_until_cut(sim.url, body)
    assert len(events) >= 2  # the role event and some tokens arrived before the crash
    if mode == "cut":
        assert cut and "[DONE]" not in events
    else:
        assert not cut and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "InternalServerError"
    assert await asyncio.to_thread(sim.wait_exit) == 0
    assert "Error in chat completion stream generator." in sim.output()


# -- several served names, the instance header ---------------------------------------------


async def test_several_served_names(start: Callable[..., Sim]) -> None:
    """As vLLM 0.32 (``show_available_models`` lists ``base_model_paths``, one per served name;
    ``model_name()`` is ``base_model_paths[0].name``): one card per name in the command line's
    order, the model path as root, the time of the request as ``created``; a request naming any
    name (or none) is served and answered with the first name; another name gets the 404."""
    sim = start(*FAST, "--served-model-name", "A", "B", "C", model="org/weights")
    await asyncio.to_thread(sim.wait_healthy)
    ready = int(time.time())
    deadline = time.monotonic() + 5
    while int(time.time()) == ready and time.monotonic() < deadline:  # a later second than start-up
        await asyncio.sleep(0.05)
    async with aiohttp.ClientSession(sim.url) as session:
        async with session.get("/v1/models") as resp:
            cards = (await resp.json())["data"]
        assert [(c["id"], c["root"], c["parent"]) for c in cards] == [
            ("A", "org/weights", None),
            ("B", "org/weights", None),
            ("C", "org/weights", None),
        ]
        assert all(c["created"] > ready and c["permission"][0]["created"] > ready for c in cards)
        chat: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for name in ("A", "B", "C", None):
            named = {**chat, "model": name} if name else chat
            async with session.post("/v1/chat/completions", json=named) as resp:
                assert resp.status == 200 and (await resp.json())["model"] == "A"
            stream = {**named, "stream": True}
            async with session.post("/v1/chat/completions", json=stream) as resp:
                events = await _sse(resp)
            assert {json.loads(e)["model"] for e in events[:-1]} == {"A"}
        async with session.post("/v1/completions", json={"model": "C", "prompt": "x"}) as resp:
            assert resp.status == 200 and (await resp.json())["model"] == "A"
        async with session.post("/tokenize", json={"model": "B", "prompt": "a b"}) as resp:
            assert resp.status == 200
        expected = {
            "error": {
                "message": "The model `D` does not exist. Valid aliases: A, B, C.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
        for path, body in (
            ("/v1/chat/completions", {**chat, "model": "D"}),
            ("/v1/completions", {"model": "D", "prompt": "x"}),
            ("/tokenize", {"model": "D", "prompt": "x"}),
        ):
            async with session.post(path, json=body) as resp:
                assert (resp.status, await resp.json()) == (404, expected), path


async def test_instance_header(start: Callable[..., Sim], shared: Sim) -> None:
    """X-Simulator-Instance (the simulator's only, for tests of several instances) names the
    process that answered, its port and its CUDA_VISIBLE_DEVICES, on every response."""
    sim = start(*FAST, "--api-key", KEY, env={"CUDA_VISIBLE_DEVICES": "2,3"})
    await asyncio.to_thread(sim.wait_healthy)
    expected = f"pid={sim.pid}; port={sim.port}; cuda_visible_devices=2,3"
    assert parse_instance_header(expected) == {
        "pid": str(sim.pid),
        "port": str(sim.port),
        "cuda_visible_devices": "2,3",
    }
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    requests: list[tuple[str, str, dict[str, Any] | None, dict[str, str]]] = [
        ("GET", "/health", None, {}),
        ("GET", "/v1/models", None, {}),  # 401: no key
        ("GET", "/v1/models", None, AUTH),
        ("GET", "/no/such/route", None, AUTH),  # 404
        ("GET", "/v1/chat/completions", None, AUTH),  # 405
        ("GET", "/metrics", None, {}),
        ("POST", "/v1/chat/completions", chat, AUTH),
        ("POST", "/v1/chat/completions", {**chat, "stream": True}, AUTH),
        ("POST", "/v1/chat/completions", {**chat, "model": "nope"}, AUTH),  # 404
        ("POST", "/v1/completions", {"prompt": 5}, AUTH),  # 400
    ]
    async with aiohttp.ClientSession(sim.url) as session:
        for method, path, body, headers in requests:
            async with session.request(method, path, json=body, headers=headers) as resp:
                await resp.read()
                assert resp.headers.get(INSTANCE_HEADER) == expected, (method, path, resp.status)
    async with aiohttp.ClientSession(shared.url) as session, session.get("/health") as resp:
        unset = f"pid={shared.pid}; port={shared.port}; cuda_visible_devices=unset"
        assert resp.headers[INSTANCE_HEADER] == unset


async def test_request_id_headers(start: Callable[..., Sim], shared: Sim) -> None:
    """``--enable-request-id-headers``, as vLLM 0.32's XRequestIdMiddleware: every answer (any
    route, any status, streams too) carries the request's X-Request-Id as sent, else a new uuid4
    in hex, once; the completion's own id is made from it. Without the flag, no header."""
    sim = start(*FAST, "--enable-request-id-headers")
    await asyncio.to_thread(sim.wait_healthy)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession(sim.url) as session:
        for method, path, body in (
            ("GET", "/health", None),
            ("GET", "/no/such/route", None),
            ("POST", "/v1/chat/completions", chat),
            ("POST", "/v1/chat/completions", {**chat, "stream": True}),
        ):
            async with session.request(method, path, json=body, headers={"X-Request-Id": "rid 7"}) as resp:
                await resp.read()
                assert resp.headers.getall("X-Request-Id") == ["rid 7"], (method, path)
            async with session.request(method, path, json=body) as resp:
                await resp.read()
                made = resp.headers.getall("X-Request-Id")
                assert len(made) == 1 and re.fullmatch(r"[0-9a-f]{32}", made[0]), (method, path, made)
        async with session.post("/v1/chat/completions", json=chat, headers={"X-Request-Id": "r1"}) as resp:
            assert (await resp.json())["id"] == "chatcmpl-r1"
    async with aiohttp.ClientSession(shared.url) as session, session.get("/health") as resp:
        assert "X-Request-Id" not in resp.headers


async def test_instance_header_on_a_unix_socket(start: Callable[..., Sim]) -> None:
    """With ``--uds`` the header names the socket's path instead of a port."""
    with tempfile.TemporaryDirectory(prefix="sim") as folder:
        path = os.path.join(folder, "v.sock")
        sim = start(*FAST, "--uds", path, env={"CUDA_VISIBLE_DEVICES": ""})
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path)) as session:
            while True:
                try:
                    async with session.get("http://localhost/health") as resp:
                        header = resp.headers.get(INSTANCE_HEADER)
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline and sim.proc.poll() is None, sim.output()
                    await asyncio.sleep(0.02)
        assert header == f"pid={sim.pid}; uds={path}; cuda_visible_devices="


# -- the HTTP API (one shared simulator) ---------------------------------------------------


async def test_models_and_misc_routes(shared: Sim) -> None:
    async with aiohttp.ClientSession(shared.url, headers=AUTH) as session:
        async with session.get("/v1/models") as resp:
            data = await resp.json()
        assert data["object"] == "list"
        assert [m["id"] for m in data["data"]] == ["sim-model", "alias"]
        card = data["data"][0]
        assert card["object"] == "model" and card["owned_by"] == "vllm"
        assert card["root"] == "sim-model" and card["max_model_len"] == 64
        assert card["permission"][0]["object"] == "model_permission"
        async with session.get("/version") as resp:
            assert await resp.json() == {"version": VLLM_VERSION}
        async with session.get("/no/such/route") as resp:
            assert resp.status == 404 and await resp.json() == {"detail": "Not Found"}
        async with session.get("/v1/chat/completions") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
        async with session.post("/tokenize", json={"prompt": "a b c"}) as resp:
            tokens = await resp.json()
        assert tokens["count"] == 3 and tokens["max_model_len"] == 64
        async with session.post("/detokenize", json={"tokens": tokens["tokens"]}) as resp:
            assert (await resp.json())["prompt"] == "a b c"
        async with session.get("/metrics") as resp:
            assert "vllm:num_requests_running" in await resp.text()


async def test_api_key(shared: Sim) -> None:
    async with aiohttp.ClientSession(shared.url) as session:
        async with session.get("/v1/models") as resp:
            assert resp.status == 401 and await resp.json() == {"error": "Unauthorized"}
        async with session.get("/health") as resp:
            assert resp.status == 200 and await resp.read() == b""


async def test_completion_and_chat(shared: Sim) -> None:
    async with aiohttp.ClientSession(shared.url, headers=AUTH) as session:
        body = {"model": "alias", "prompt": "one two three", "max_tokens": 3}
        async with session.post("/v1/completions", json=body) as resp:
            data = await resp.json()
        assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
        assert data["model"] == "sim-model"  # vLLM 0.32 names its first served name
        assert data["choices"][0]["text"] == " tok0 tok1 tok2"
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["usage"] == {
            "prompt_tokens": 3,
            "total_tokens": 6,
            "completion_tokens": 3,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        }
        chat = {"messages": [{"role": "user", "content": "hi there"}], "max_completion_tokens": 2}
        async with session.post("/v1/chat/completions", json=chat) as resp:
            data = await resp.json()
        assert data["id"].startswith("chatcmpl-") and data["model"] == "sim-model"
        assert data["choices"][0]["message"] == {
            "role": "assistant",
            "content": " tok0 tok1",
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "reasoning": None,
        }
        assert data["usage"]["prompt_tokens"] == 2 and data["usage"]["completion_tokens"] == 2


async def test_streams(shared: Sim) -> None:
    async with aiohttp.ClientSession(shared.url, headers=AUTH) as session:
        chat = {
            "messages": [{"role": "user", "content": "a b c"}],
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with session.post("/v1/chat/completions", json=chat) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            events = await _sse(resp)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["choices"][0]["delta"]["content"] for c in chunks[1:3]] == [" tok0", " tok1"]
        assert chunks[2]["choices"][0]["finish_reason"] == "length"
        assert chunks[3]["choices"] == [] and chunks[3]["usage"]["total_tokens"] == 5
        completion = {"prompt": "x", "max_tokens": 3, "stream": True}
        async with session.post("/v1/completions", json=completion) as resp:
            events = await _sse(resp)
        assert events[-1] == "[DONE]" and len(events) == 4
        texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
        assert texts == [" tok0", " tok1", " tok2"]


async def test_tokens_arrive_one_by_one(shared: Sim) -> None:
    """The stream is paced (50 ms between tokens), not sent at the end. A loaded machine may
    hold this reader back now and then, so that a few tokens arrive together: the test asks
    for pacing in most gaps and over the stream as a whole, not in every gap."""
    tokens = 12
    body = {"prompt": "x", "max_tokens": tokens, "stream": True}
    arrivals = []
    async with (
        aiohttp.ClientSession(shared.url, headers=AUTH) as session,
        session.post("/v1/completions", json=body) as resp,
    ):
        async for line in resp.content:
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == tokens
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    paced = [gap for gap in gaps if gap > 0.025]
    assert len(paced) >= len(gaps) // 2, gaps
    assert arrivals[-1] - arrivals[0] > 0.25, gaps


async def test_client_disconnect_aborts(shared: Sim) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 60, "stream": True}
    async with aiohttp.ClientSession(shared.url, headers=AUTH) as session:
        resp = await session.post("/v1/chat/completions", json=body)
        first = json.loads((await resp.content.readline()).decode()[6:])
        await resp.content.readline()
        resp.close()  # drop the connection mid-stream
    line = await asyncio.to_thread(shared.wait_for_line, f"Request {first['id']} aborted.", 5.0)
    assert "async_llm.py" in line
    assert f"Aborted request(s) {first['id']}-" in shared.output()


async def test_errors(shared: Sim) -> None:
    async with aiohttp.ClientSession(shared.url, headers=AUTH) as session:
        body = {"model": "nope", "messages": [{"role": "user", "content": "x"}]}
        async with session.post("/v1/chat/completions", json=body) as resp:
            assert resp.status == 404
            error = (await resp.json())["error"]
        assert error["message"].startswith("The model `nope` does not exist.")
        assert (error["type"], error["param"], error["code"]) == ("NotFoundError", "model", 404)
        headers = {**AUTH, "Content-Type": "application/json"}
        async with session.post("/v1/completions", data=b"{bad", headers=headers) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["type"] == "Bad Request" and "JSON decode error" in error["message"]
        too_long = {"prompt": "w " * 65, "max_tokens": 1}
        async with session.post("/v1/completions", json=too_long) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["param"] == "input_tokens" and "maximum context length is 64" in error["message"]


@pytest.mark.slow
async def test_huge_image_body(shared: Sim) -> None:
    """A 201 MiB request (a base64 image) is accepted; an image counts as one token."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 201 * 2**20}}
    content = [{"type": "text", "text": "what is this"}, image]
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 1})
    headers = {**AUTH, "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession(shared.url, headers=headers) as session,
        session.post("/v1/chat/completions", data=body.encode()) as resp,
    ):
        assert resp.status == 200
        data = await resp.json()
    assert data["usage"]["prompt_tokens"] == 4


async def test_embeddings(shared: Sim, start: Callable[..., Sim]) -> None:
    # Like vLLM, only a pooling model has the route (a generative one answers FastAPI's 404).
    async with (
        aiohttp.ClientSession(shared.url, headers=AUTH) as session,
        session.post("/v1/embeddings", json={"input": "a b"}) as resp,
    ):
        assert (resp.status, await resp.json()) == (404, {"detail": "Not Found"})
    pooling = start(*FAST, "--runner", "pooling", "--served-model-name", "emb", "emb-alias")
    await asyncio.to_thread(pooling.wait_healthy)
    async with aiohttp.ClientSession(pooling.url) as session:
        body = {"model": "emb-alias", "input": ["a b", "c"]}
        async with session.post("/v1/embeddings", json=body) as resp:
            data = await resp.json()
        async with session.post("/v1/embeddings", json={"input": "a b", "encoding_format": "base64"}) as resp:
            encoded = await resp.json()
    assert data["object"] == "list" and data["id"].startswith("embd-")
    assert data["model"] == "emb"  # the first served name, as vLLM 0.32 answers
    assert [len(d["embedding"]) for d in data["data"]] == [384, 384]
    assert data["usage"]["prompt_tokens"] == 3
    assert isinstance(encoded["data"][0]["embedding"], str)
