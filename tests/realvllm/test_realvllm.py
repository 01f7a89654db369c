"""The proxy in front of the real ``vllm serve`` (issue #5), and the same tests against the
simulator: the fidelity check.

Every test runs twice, once per backend (a module-scoped parameter, so all the ``sim`` tests run,
then all the ``real`` ones):

- ``sim``: the bundled simulator (a few seconds; part of the normal suite, needs no vLLM);
- ``real``: vLLM 0.32 (CPU build) with a tiny random Llama, then all-MiniLM-L6-v2 (marker
  ``realvllm``; skipped when vLLM is not installed).

The assertions are what real vLLM does (observed with 0.32.0), so a difference between the
simulator and vLLM fails the ``sim`` half; a vLLM upgrade that changes behaviour the proxy relies
on fails the ``real`` half.

Starting real vLLM takes 20-30 s on two cores, so one daemon serves the whole module and the
tests run in order, each building on the state the previous one left (each first makes sure the
model it needs is loaded, so a failure does not cascade). Launches of real vLLM: an unknown flag
and a missing path (each fails after vLLM's ~9 s of imports), a context too long for the KV cache
(fails in the EngineCore after ~60-90 s), the tiny model (stopped with ``/stop``), MiniLM (its
engine killed), the tiny model again (killed with the proxy). The real half takes about 200 s; see
docs/real-vllm.md.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import group_members, wait_until
from realvllm_support import (
    FIGURES,
    INSTALL_HINT,
    TINY_DTYPE,
    VLLM,
    Backend,
    ProxyRun,
    finish,
    real_backend,
    sim_backend,
    start_proxy,
)

from aic_vllm_proxy.simulator import VLLM_VERSION

BACKENDS = [
    pytest.param("sim", id="sim"),
    pytest.param(
        "real", id="real", marks=[pytest.mark.realvllm, pytest.mark.skipif(VLLM is None, reason=INSTALL_HINT)]
    ),
]
TINY_ARGS = ("--served-model-name", "tiny", "--enforce-eager", "--enable-log-requests", *TINY_DTYPE)
MINILM_ARGS = ("--runner", "pooling", "--served-model-name", "minilm", "--enforce-eager")
SSE_TYPE = "text/event-stream; charset=utf-8"

# The routes vLLM 0.32.0 logs at start-up (``Route: PATH, Methods: ...``), in its order. The
# simulator serves a subset; it must log only routes real vLLM has, in the same order.
GENERATE_ROUTES = [
    ("/openapi.json", "GET, HEAD"), ("/docs", "GET, HEAD"), ("/docs/oauth2-redirect", "GET, HEAD"),
    ("/redoc", "GET, HEAD"), ("/load", "GET"), ("/version", "GET"), ("/kv_event_sources", "GET"),
    ("/health", "GET"), ("/metrics", "GET"), ("/tokenize", "POST"), ("/detokenize", "POST"),
    ("/v1/models", "GET"), ("/v1/systemone", "POST"), ("/ping", "GET"), ("/ping", "POST"),
    ("/invocations", "POST"), ("/v1/chat/completions", "POST"), ("/v1/chat/completions/batch", "POST"),
    ("/v1/responses", "POST"), ("/v1/responses/{response_id}", "GET"),
    ("/v1/responses/{response_id}/cancel", "POST"), ("/v1/completions", "POST"), ("/v1/messages", "POST"),
    ("/v1/messages/count_tokens", "POST"), ("/generative_scoring", "POST"), ("/scale_elastic_ep", "POST"),
    ("/is_scaling_elastic_ep", "POST"), ("/v1/chat/completions/render", "POST"),
    ("/v1/messages/render", "POST"), ("/v1/completions/render", "POST"), ("/v1/responses/render", "POST"),
    ("/v1/chat/completions/derender", "POST"), ("/v1/completions/derender", "POST"),
    ("/inference/v1/generate", "POST"), ("/inference/v1/abort_requests", "POST"),
]  # fmt: skip
POOLING_ROUTES = [
    *GENERATE_ROUTES[: GENERATE_ROUTES.index(("/invocations", "POST")) + 1],
    ("/pooling", "POST"), ("/v1/embeddings", "POST"), ("/v2/embed", "POST"), ("/score", "POST"),
    ("/v1/score", "POST"), ("/rerank", "POST"), ("/v1/rerank", "POST"), ("/v2/rerank", "POST"),
]  # fmt: skip
# What the proxy, its docs and its users rely on: both backends must have these.
CORE_ROUTES = {
    ("/health", "GET"), ("/version", "GET"), ("/metrics", "GET"), ("/v1/models", "GET"),
    ("/tokenize", "POST"), ("/detokenize", "POST"), ("/ping", "GET"), ("/load", "GET"),
}  # fmt: skip
CORE_GENERATE = CORE_ROUTES | {("/v1/chat/completions", "POST"), ("/v1/completions", "POST")}
CORE_POOLING = CORE_ROUTES | {("/v1/embeddings", "POST")}

# The keys of vLLM 0.32's answers, in its order (FastAPI/pydantic keep the field order).
MODEL_KEYS = ["id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"]
CHUNK_KEYS = ["id", "object", "created", "model", "choices"]
ROLE_CHUNK_KEYS = [*CHUNK_KEYS, "prompt_token_ids", "prompt_text"]
USAGE_CHUNK_KEYS = [*CHUNK_KEYS, "usage", "system_fingerprint"]
FINAL_CHUNK_KEYS = [*CHUNK_KEYS, "system_fingerprint"]  # the last token's chunk, without include_usage
CHAT_TOKEN_CHOICE = ["index", "delta", "logprobs", "finish_reason", "token_ids"]
CHAT_FINAL_CHOICE = ["index", "delta", "logprobs", "finish_reason", "stop_reason", "token_ids"]
TEXT_TOKEN_CHOICE = [
    "index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids", "token_ids",
]  # fmt: skip
USAGE_KEYS = ["prompt_tokens", "total_tokens", "completion_tokens"]


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    tmp = tmp_path_factory.mktemp(f"backend-{request.param}")
    if request.param == "sim":
        return sim_backend(tmp)
    assert VLLM is not None
    tiny, minilm = request.getfixturevalue("tiny_model"), request.getfixturevalue("minilm_model")
    return real_backend(VLLM, tmp, tiny, minilm)


@pytest.fixture(scope="module")
def proxy(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyRun]:
    daemon = start_proxy(tmp_path_factory.mktemp(f"proxy-{backend.name}"), backend)
    try:
        yield daemon
    finally:
        left = finish(daemon)
        assert not left, f"processes of the run were still alive after the daemon stopped: {left}"


def tiny_spec(backend: Backend) -> str:
    return backend.spec(backend.tiny, *TINY_ARGS)


def minilm_spec(backend: Backend) -> str:
    return backend.spec(backend.minilm, *MINILM_ARGS)


def loaded(proxy: ProxyRun, spec: str) -> dict[str, Any]:
    """Make sure ``spec`` is the ready model (a no-op when it already is); its /status."""
    assert proxy.backend is not None
    code, body = proxy.switch(spec, timeout=proxy.backend.ready_timeout + 60)
    assert code == 200, body
    status: dict[str, Any] = body["status"]
    assert status["state"] == "ready", status
    return status


def launch_logs(proxy: ProxyRun) -> list[Path]:
    return sorted(proxy.log_dir.glob("*_pid-*.log"), key=lambda p: p.stat().st_mtime)


def nothing_left(proxy: ProxyRun) -> bool:
    return not proxy.leftovers()


def logged_routes(log: str) -> list[tuple[str, str]]:
    routes = []
    for match in re.finditer(r"\[launcher\.py:\d+\] Route: (\S+), Methods: (.+)$", log, re.M):
        methods = ", ".join(sorted(m.strip() for m in match.group(2).split(",")))
        routes.append((match.group(1), methods))
    return routes


def is_subsequence(part: list[Any], whole: list[Any]) -> bool:
    items = iter(whole)
    return all(any(x == y for y in items) for x in part)


def in_order(text: str, *needles: str) -> bool:
    at = 0
    for needle in needles:
        found = text.find(needle, at)
        if found < 0:
            return False
        at = found + len(needle)
    return True


def sse_events(raw: bytes) -> list[str]:
    """The events of an SSE body; each must be exactly one ``data: ...`` line."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = text[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [event[len("data: ") :] for event in events]


def client(proxy: ProxyRun) -> openai.OpenAI:
    """The official client, on the run's HTTP client (closing it leaves that one open)."""
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, http_client=proxy.http)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of one Prometheus metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class StreamReader(threading.Thread):
    """Reads an SSE stream in the background: its ``data:`` lines, and how it ended."""

    def __init__(self, proxy: ProxyRun, url: str, body: dict[str, Any], started_after: int = 3) -> None:
        super().__init__(daemon=True)
        self.proxy, self.url, self.body = proxy, url, body
        self.events: list[str] = []
        self.outcome: str | BaseException | None = None
        self.started = threading.Event()
        self.started_after = started_after

    def run(self) -> None:
        try:
            with self.proxy.http.stream("POST", self.url, json=self.body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: ") :])
                        if len(self.events) >= self.started_after:
                            self.started.set()
            self.outcome = "ended"
        except httpx.HTTPError as exc:
            self.outcome = exc
        finally:
            self.started.set()


def wait_for_log(path: Path, pattern: str, timeout: float) -> re.Match[str] | None:
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, path.read_text(errors="replace"), re.M)
        if match or time.monotonic() > deadline:
            return match
        time.sleep(0.1)


# ----------------------------------------------------------------------------- start failures


def test_unknown_flag_fails_fast_with_argparse_message(proxy: ProxyRun, backend: Backend) -> None:
    started = time.monotonic()
    code, body = proxy.switch(backend.spec(backend.tiny, "--bogus-flag", "1"), timeout=180)
    elapsed = time.monotonic() - started
    FIGURES[f"{backend.name}: unknown flag reported after (s)"] = elapsed
    assert code == 500, body
    assert elapsed < 60, elapsed  # vLLM's imports (~10 s), then argparse; not --ready-timeout
    error = body["error"]
    assert error["exit_code"] == 2, error
    tail = "\n".join(error["log_tail"])
    assert "usage: vllm" in tail
    assert "vllm: error: unrecognized arguments: --bogus-flag 1" in tail
    assert "status 2" in error["message"]
    status = proxy.status()
    assert (status["state"], status["running"], status["exit_code"]) == ("failed", False, 2)
    assert wait_until(lambda: nothing_left(proxy), 10), proxy.leftovers()


def test_missing_model_path_fails_with_exit_1(proxy: ProxyRun, backend: Backend) -> None:
    missing = backend.tiny.parent / "no" / "such" / "model"
    started = time.monotonic()
    code, body = proxy.switch(backend.spec(missing), timeout=180)
    elapsed = time.monotonic() - started
    FIGURES[f"{backend.name}: missing model path reported after (s)"] = elapsed
    assert code == 500, body
    assert elapsed < 60, elapsed
    error = body["error"]
    assert error["exit_code"] == 1, error
    last = (
        "huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or "
        f"'namespace/repo_name': '{missing}'. Use `repo_type` argument if needed."
    )
    assert error["log_tail"][-1] == last, error["log_tail"]
    log = launch_logs(proxy)[-1].read_text()
    assert in_order(
        log, f"model   {missing}", "non-default args: {", "Traceback (most recent call last):", last
    )
    assert proxy.status()["state"] == "failed"
    assert wait_until(lambda: nothing_left(proxy), 10), proxy.leftovers()


def test_engine_failure_names_its_root_cause(proxy: ProxyRun, backend: Backend) -> None:
    """A start that fails in the EngineCore for lack of memory: vLLM's last line is the API
    server's "Engine core initialization failed. See root cause above"; the switch error names the
    cause instead (real vLLM: a 10M-token context needs ~4.8 GiB of KV cache, 1 GiB is there;
    the simulator: CUDA out of memory), and its log tail starts with that line."""
    if backend.real:
        overrides = json.dumps({"max_position_embeddings": 10_000_000})
        args = ("--enforce-eager", "--hf-overrides", shlex.quote(overrides), "--max-model-len", "10000000")
        cause = "ValueError: To serve at least one request with the model's max seq len (10000000)"
    else:
        args, cause = ("--sim-fail-during-load",), "torch.OutOfMemoryError: CUDA out of memory."
    started = time.monotonic()
    code, body = proxy.switch(backend.spec(backend.tiny, *args), timeout=backend.ready_timeout + 60)
    FIGURES[f"{backend.name}: engine failure reported after (s)"] = time.monotonic() - started
    assert code == 500, body
    error = body["error"]
    assert error["exit_code"] == 1, error
    assert f"vLLM exited with status 1 while starting {backend.tiny}: {cause}" in error["message"], error
    assert "Engine core initialization failed" not in error["message"]
    tail = error["log_tail"]
    assert cause in tail[0] and tail[1].startswith("[... ") and tail[1].endswith(" more lines ...]"), tail[:2]
    log = launch_logs(proxy)[-1].read_text()
    assert in_order(log, cause, "RuntimeError: Engine core initialization failed. See root cause above.")
    assert cause in proxy.status()["error"]
    assert wait_until(lambda: nothing_left(proxy), 10), proxy.leftovers()


# ------------------------------------------------------------------------------ the tiny model


def test_switch_to_the_tiny_model(proxy: ProxyRun, backend: Backend) -> None:
    spec = tiny_spec(backend)
    code, body = proxy.switch(spec, timeout=backend.ready_timeout + 60)
    assert code == 200, body
    assert body["changed"] is True
    FIGURES[f"{backend.name}: tiny model ready after (s)"] = body["load_seconds"]
    status = body["status"]
    assert (status["state"], status["model"], status["model_spec"]) == ("ready", "tiny", spec)
    pgid = status["pid"]
    members = group_members(pgid)
    assert len(members) >= 2, members  # the API server and its EngineCore
    assert any(p.is_vllm_child and p.pgid == pgid for p in proxy.vllm_processes())

    log = Path(status["log_path"]).read_text()
    assert in_order(
        log,
        "# aic-vllm-proxy ",  # the proxy's header line
        f"version {VLLM_VERSION}",  # the banner
        "non-default args: {",
        "Resolved architecture: LlamaForCausalLM",
        "Using max model len 2048",
        "Loading weights took",
        "Supported tasks: ['generate']",
        f"Starting vLLM server on {proxy.direct}",
        "Available routes are:",
        f"Started server process [{pgid}]",
        "Application startup complete.",
    ), log[-3000:]
    routes = logged_routes(log)
    assert set(routes) >= CORE_GENERATE, routes
    assert is_subsequence(routes, GENERATE_ROUTES), routes
    if backend.real:
        assert routes == GENERATE_ROUTES

    models = proxy.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_same_spec_twice_is_a_no_op(proxy: ProxyRun, backend: Backend) -> None:
    first = loaded(proxy, tiny_spec(backend))
    logs = launch_logs(proxy)
    started = time.monotonic()
    code, body = proxy.switch(tiny_spec(backend))
    assert code == 200, body
    assert time.monotonic() - started < 5
    assert (body["changed"], body["load_seconds"]) == (False, None)
    assert body["status"]["pid"] == first["pid"] and body["status"]["started_at"] == first["started_at"]
    assert launch_logs(proxy) == logs  # nothing was launched


def test_vllm_own_routes(proxy: ProxyRun, backend: Backend) -> None:
    loaded(proxy, tiny_spec(backend))
    http = proxy.http
    for base in (proxy.url, proxy.direct):
        health = http.get(base + "/health")
        assert (health.status_code, health.content) == (200, b"")
        assert http.get(base + "/ping").status_code == 200
        assert http.get(base + "/version").json() == {"version": VLLM_VERSION}
        assert http.get(base + "/load").json() == {"server_load": 0}
        models = http.get(base + "/v1/models").json()
        assert list(models) == ["object", "data"] and models["object"] == "list"
        (model,) = models["data"]
        assert list(model) == MODEL_KEYS
        assert (model["id"], model["object"], model["owned_by"]) == ("tiny", "model", "vllm")
        assert (model["root"], model["parent"], model["max_model_len"]) == (str(backend.tiny), None, 2048)
        metrics = http.get(base + "/metrics")
        assert metrics.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
        assert 'vllm:num_requests_running{engine="0",model_name="tiny"}' in metrics.text
        tokens = http.post(base + "/tokenize", json={"model": "tiny", "prompt": "one two three"})
        assert tokens.status_code == 200
        assert list(tokens.json()) == ["count", "max_model_len", "tokens", "token_strs"]
        assert tokens.json()["count"] == len(tokens.json()["tokens"]) > 0
    own = http.get(proxy.direct + "/health")
    assert own.headers["server"] == "uvicorn"


def test_error_bodies(proxy: ProxyRun, backend: Backend) -> None:
    loaded(proxy, tiny_spec(backend))
    http = proxy.http
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    json_type = {"Content-Type": "application/json"}
    for base in (proxy.url, proxy.direct):
        resp = http.post(base + "/v1/chat/completions", json={**chat, "model": "nope"})
        assert resp.status_code == 404
        assert resp.json() == {
            "error": {
                "message": "The model `nope` does not exist. Valid aliases: tiny.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
        resp = http.post(base + "/v1/completions", content=b"{not json", headers=json_type)
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("Bad Request", "body.1", 400)
        assert error["message"].startswith("1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.1'")
        resp = http.post(base + "/v1/completions", content=b"{}")  # no JSON content type
        assert resp.status_code == 400
        assert "Unsupported Media Type: Only 'application/json' is allowed" in resp.json()["error"]["message"]
        resp = http.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
        assert resp.status_code == 400
        assert resp.json() == {
            "error": {
                "message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
                "type": "BadRequestError",
                "param": "max_tokens",
                "code": 400,
            }
        }
        resp = http.request("DELETE", base + "/v1/models")
        assert (resp.status_code, resp.json(), resp.headers.get("allow")) == (
            405,
            {"detail": "Method Not Allowed"},
            "GET",
        )
        resp = http.get(base + "/no/such/path?x=1")
        assert (resp.status_code, resp.json()) == (404, {"detail": "Not Found"})
        # A generative model has no embeddings route at all.
        resp = http.post(base + "/v1/embeddings", json={"model": "tiny", "input": "x"})
        assert (resp.status_code, resp.json()) == (404, {"detail": "Not Found"})


def test_chat_and_completions_through_the_openai_client(proxy: ProxyRun, backend: Backend) -> None:
    loaded(proxy, tiny_spec(backend))
    api = client(proxy)
    chat = api.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=8,
        extra_body={"ignore_eos": True},  # random weights: the end token may come at any time
    )
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion" and chat.model == "tiny"
    (choice,) = chat.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 8
    assert chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 8

    done = api.completions.create(
        model="tiny", prompt="Once upon", max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert done.id.startswith("cmpl-") and done.object == "text_completion" and done.model == "tiny"
    (text,) = done.choices
    assert isinstance(text.text, str) and text.finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 6


def test_streaming_through_the_openai_client(proxy: ProxyRun, backend: Backend) -> None:
    loaded(proxy, tiny_spec(backend))
    api = client(proxy)
    stream = api.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    first, last = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 8
    assert all(chunk.usage is None for chunk in chunks[:-1])
    tokens = chunks[1:-1]
    assert 1 <= len(tokens) <= 8  # one event per token (vLLM may skip empty text deltas)
    assert [c.choices[0].finish_reason for c in tokens][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in tokens[:-1])
    assert len({c.id for c in chunks}) == 1

    texts = api.completions.create(
        model="tiny", prompt="Once upon", max_tokens=6, stream=True, extra_body={"ignore_eos": True}
    )
    parts = list(texts)
    assert 1 <= len(parts) <= 6
    assert parts[-1].choices[0].finish_reason == "length"
    assert all(isinstance(p.choices[0].text, str) for p in parts)


def test_sse_framing(proxy: ProxyRun, backend: Backend) -> None:
    """Byte-level framing: one ``data: {json}`` line per event, a blank line after each, the
    role event first (chat), the usage event with no choices, ``data: [DONE]`` last. Through
    the proxy exactly as from vLLM itself."""
    loaded(proxy, tiny_spec(backend))
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text = {"model": "tiny", "prompt": "Hi", "max_tokens": 5, "ignore_eos": True, "stream": True}
    for base in (proxy.url, proxy.direct):
        resp = proxy.http.post(base + "/v1/chat/completions", json=chat)
        assert resp.status_code == 200 and resp.headers["content-type"] == SSE_TYPE
        events = sse_events(resp.content)
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        data = [json.loads(e) for e in events[:-1]]
        role, *tokens, usage = data
        assert list(role) == ROLE_CHUNK_KEYS
        role_delta = {"role": "assistant", "content": ""}
        assert role["choices"] == [{"index": 0, "delta": role_delta, "logprobs": None, "finish_reason": None}]
        assert 1 <= len(tokens) <= 5
        for chunk in tokens:  # with include_usage, no chunk but the usage one has a fingerprint
            assert list(chunk) == CHUNK_KEYS and chunk["object"] == "chat.completion.chunk"
            keys = CHAT_FINAL_CHOICE if chunk is tokens[-1] else CHAT_TOKEN_CHOICE
            assert list(chunk["choices"][0]) == keys
        assert tokens[-1]["choices"][0]["finish_reason"] == "length"
        assert list(usage) == USAGE_CHUNK_KEYS and usage["choices"] == []
        assert list(usage["usage"]) == USAGE_KEYS and usage["usage"]["completion_tokens"] == 5
        assert usage["system_fingerprint"].startswith(f"vllm-{VLLM_VERSION}-")

        resp = proxy.http.post(base + "/v1/completions", json=text)
        assert resp.status_code == 200 and resp.headers["content-type"] == SSE_TYPE
        events = sse_events(resp.content)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert 1 <= len(chunks) <= 5
        for chunk in chunks:
            assert list(chunk) == (FINAL_CHUNK_KEYS if chunk is chunks[-1] else CHUNK_KEYS)
            assert chunk["object"] == "text_completion"
            assert list(chunk["choices"][0]) == TEXT_TOKEN_CHOICE
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["system_fingerprint"] == usage["system_fingerprint"]


def test_status_and_logs(proxy: ProxyRun, backend: Backend) -> None:
    spec = tiny_spec(backend)
    loaded(proxy, spec)
    status = proxy.status()
    assert (status["state"], status["running"], status["model"], status["model_spec"]) == (
        "ready", True, "tiny", spec,
    )  # fmt: skip
    assert status["vllm_base"] == proxy.direct
    assert (status["exit_code"], status["error"], status["in_flight"]) == (None, None, 0)
    assert status["ready_at"] >= status["started_at"]
    path = Path(status["log_path"])
    assert path.parent == proxy.log_dir and path.name.endswith(f"_pid-{status['pid']}.log")

    tail = proxy.get("/logs/tail?lines=5")
    assert tail.status_code == 200
    lines = tail.content.splitlines(keepends=True)
    assert len(lines) == 5
    assert b"".join(lines) in path.read_bytes()  # the file's last lines (it may have grown since)

    current = proxy.get("/logs/current")
    assert current.status_code == 200
    assert current.content.startswith(b"# aic-vllm-proxy ")
    assert b"Application startup complete." in current.content
    assert path.read_bytes().startswith(current.content)  # the whole file, as it was


def test_client_disconnect_mid_stream_aborts_in_vllm(proxy: ProxyRun, backend: Backend) -> None:
    status = loaded(proxy, tiny_spec(backend))
    log = Path(status["log_path"])
    aborted_before = metric(proxy.get("/metrics").text, "vllm:request_success_total", finished_reason="abort")
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1800, "ignore_eos": True, "stream": True}
    aborted = None
    # Two tries: once, in a CI run with both cores saturated, real vLLM generated all 1800 tokens
    # without logging an abort (the simulator never misses it; the cause is not known yet).
    for _ in range(2):
        tokens_before = metric(proxy.get("/metrics").text, "vllm:generation_tokens_total")
        with proxy.http.stream("POST", proxy.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # kept: dropping the iterator would close the connection
            seen = 0
            for line in lines:
                seen += line.startswith("data: {")
                if seen >= 5:
                    break
            assert proxy.status()["in_flight"] == 1
            lines.close()  # now it does: the client goes away mid-stream
        # vLLM (--enable-log-requests) logs the abort of that request.
        aborted = wait_for_log(log, r"Aborted request\(s\) (cmpl-\S+)\.$", 20)
        if aborted:
            break
        assert wait_until(lambda: proxy.status()["in_flight"] == 0, 30)
    assert aborted, log.read_text()[-3000:]
    internal = aborted.group(1)
    request = wait_for_log(log, r"Request (cmpl-\S+) aborted\.$", 5)
    assert request and internal.startswith(request.group(1) + "-"), (internal, request)
    assert request.group(1).endswith("-0")  # a completion's request id: <response id>-<prompt index>
    assert re.search(rf"Added request {re.escape(internal)}\.$", log.read_text(), re.M)
    assert wait_until(lambda: proxy.status()["in_flight"] == 0, 10)
    assert wait_until(lambda: metric(proxy.get("/metrics").text, "vllm:num_requests_running") == 0, 10)
    metrics = proxy.get("/metrics").text
    assert metric(metrics, "vllm:generation_tokens_total") - tokens_before < 1800  # not run to the end
    # vLLM does not count an aborted request in request_success_total.
    assert metric(metrics, "vllm:request_success_total", finished_reason="abort") == aborted_before
    assert proxy.status()["state"] == "ready"


# ---------------------------------------------------------------------------------- stopping


def test_forced_stop_mid_stream_leaves_no_vllm_process(proxy: ProxyRun, backend: Backend) -> None:
    """POST /stop {"force": true} with a stream open through the proxy: the proxy drops its
    connection to vLLM (vLLM aborts the request), SIGTERMs vLLM's group, vLLM exits 0, and
    nothing of it is left, watchdog included. The client's stream never ends cleanly."""
    status = loaded(proxy, tiny_spec(backend))
    pgid = status["pid"]
    assert any(p.is_vllm_child for p in proxy.vllm_processes())
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1800,
        "ignore_eos": True,
        "stream": True,
    }
    reader = StreamReader(proxy, proxy.url + "/v1/chat/completions", body, started_after=1)
    reader.start()
    assert reader.started.wait(60) and reader.outcome is None, reader.outcome
    resp = proxy.post("/stop", timeout=120, json={"force": True})
    assert resp.status_code == 200
    stopped = resp.json()
    assert (stopped["state"], stopped["running"], stopped["pid"]) == ("stopped", False, None)
    assert stopped["exit_code"] == 0  # vLLM exits 0 on SIGTERM
    assert group_members(pgid) == []
    assert nothing_left(proxy), proxy.leftovers()
    # The watchdog of that launch has gone too: nothing of the run but the daemon.
    assert wait_until(lambda: not proxy.vllm_processes(), 10), proxy.vllm_processes()
    reader.join(30)
    assert not reader.is_alive()
    assert "[DONE]" not in reader.events and len(reader.events) < 1800
    if reader.outcome == "ended":  # the proxy's error event, then the connection closed
        assert "vLLM stopped in the middle" in json.loads(reader.events[-1])["error"]["message"]
    log = Path(status["log_path"]).read_text()
    # vLLM may see the dropped connection (and log the abort) before or after the SIGTERM.
    assert in_order(
        log,
        "[shutdown] API server: shutdown triggered",
        "[shutdown] API server: stopping engine client mode=abort timeout=0s",
        "[shutdown] API server: engine client stopped",
        "INFO:     Shutting down",
        "INFO:     Application shutdown complete.",
    ), log[-3000:]


# ---------------------------------------------------------------------------------- embeddings


def test_switch_to_minilm_and_embed(proxy: ProxyRun, backend: Backend) -> None:
    spec = minilm_spec(backend)
    code, body = proxy.switch(spec, timeout=backend.ready_timeout + 60)
    assert code == 200, body
    if body["changed"]:
        FIGURES[f"{backend.name}: MiniLM ready after (s)"] = body["load_seconds"]
    status = body["status"]
    assert (status["state"], status["model"]) == ("ready", "minilm")
    log = Path(status["log_path"]).read_text()
    assert in_order(
        log,
        "Resolved architecture: BertModel",
        "Using max model len 256",
        "Supported tasks: [",
        "Starting vLLM server on",
        "Application startup complete.",
    ), log[-3000:]
    tasks = re.search(r"Supported tasks: \[(.*)\]$", log, re.M)
    assert tasks and sorted(tasks.group(1).split(", ")) == ["'embed'", "'token_embed'"]  # in any order
    routes = logged_routes(log)
    assert set(routes) >= CORE_POOLING, routes
    assert is_subsequence(routes, POOLING_ROUTES), routes
    if backend.real:
        assert routes == POOLING_ROUTES

    (model,) = proxy.get("/v1/models").json()["data"]
    assert (model["id"], model["max_model_len"]) == ("minilm", 256)  # sentence-transformers' limit

    api = client(proxy)
    result = api.embeddings.create(model="minilm", input=["hello world", "a second text"])
    assert result.object == "list" and result.model == "minilm"
    assert [item.index for item in result.data] == [0, 1]
    for item in result.data:
        assert item.object == "embedding" and len(item.embedding) == 384
        assert abs(sum(v * v for v in item.embedding) - 1.0) < 1e-3  # normalised
    assert result.usage.prompt_tokens > 0 and result.usage.total_tokens == result.usage.prompt_tokens
    raw = proxy.post(
        "/v1/embeddings", json={"model": "minilm", "input": "hello", "encoding_format": "base64"}
    )
    data = raw.json()
    assert data["id"].startswith("embd-") and list(data["data"][0]) == ["index", "object", "embedding"]
    assert len(base64.b64decode(data["data"][0]["embedding"])) == 384 * 4
    resp = proxy.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert resp.status_code == 404
    error = {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    assert resp.json() == {"error": error}
    resp = proxy.post(
        "/v1/chat/completions", json={"model": "minilm", "messages": [{"role": "user", "content": "x"}]}
    )
    assert (resp.status_code, resp.json()) == (404, {"detail": "Not Found"})  # a pooling model


# ----------------------------------------------------------------------------- engine death


def test_engine_death_is_noticed_and_cleaned_up(proxy: ProxyRun, backend: Backend) -> None:
    """SIGKILL of vLLM's EngineCore (what an engine crash looks like from outside): vLLM's API
    server exits with status 0 by itself; the proxy marks the model failed, kills what is left
    of the group and answers requests with 503."""
    status = loaded(proxy, minilm_spec(backend))
    pgid = status["pid"]
    engines = [p for p in proxy.vllm_processes() if p.pgid == pgid and p.comm.startswith("VLLM::EngineCor")]
    assert len(engines) == 1, proxy.vllm_processes()
    os.kill(engines[0].pid, signal.SIGKILL)
    assert wait_until(lambda: proxy.status()["state"] == "failed", 30), proxy.status()
    assert wait_until(lambda: proxy.status()["exit_code"] is not None, 30), proxy.status()
    failed = proxy.status()
    assert (failed["running"], failed["pid"], failed["exit_code"]) == (False, None, 0), failed
    # Whichever the proxy saw first: the exit, or /health answering 503 just before it.
    assert "exited with status 0" in failed["error"] or "answers 503 on /health" in failed["error"], failed
    assert wait_until(lambda: group_members(pgid) == [], 15), group_members(pgid)
    assert wait_until(lambda: nothing_left(proxy), 15), proxy.leftovers()
    resp = proxy.post("/v1/embeddings", json={"model": "minilm", "input": "x"})
    assert resp.status_code == 503 and "/switch" in resp.json()["error"]["message"]
    log = Path(status["log_path"]).read_text()
    assert in_order(
        log,
        "[shutdown] MPClient: engine core exited unexpectedly; starting cleanup",
        "AsyncLLM output_handler failed.",
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
        "INFO:     Application shutdown complete.",
        f"INFO:     Finished server process [{pgid}]",
    ), log[-3000:]


# ------------------------------------------------------------------------ the proxy is killed


def test_proxy_sigkill_mid_stream_leaves_no_vllm_process(proxy: ProxyRun, backend: Backend) -> None:
    """The tiny model again (its second start), a stream through the proxy, then SIGKILL of the
    proxy: its watchdog kills vLLM's whole group."""
    code, switched = proxy.switch(tiny_spec(backend), timeout=backend.ready_timeout + 60)
    assert code == 200, switched
    if switched["changed"]:
        FIGURES[f"{backend.name}: tiny model ready again after (s)"] = switched["load_seconds"]
    pgid = switched["status"]["pid"]
    assert len(group_members(pgid)) >= 2
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1800, "ignore_eos": True, "stream": True}
    reader = StreamReader(proxy, proxy.url + "/v1/completions", body)
    reader.start()
    assert reader.started.wait(60) and reader.outcome is None, reader.outcome
    proxy.process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    proxy.process.wait(10)
    assert wait_until(lambda: nothing_left(proxy), 15), proxy.leftovers()
    FIGURES[f"{backend.name}: vLLM gone after proxy SIGKILL (s)"] = time.monotonic() - killed
    assert group_members(pgid) == []
    assert wait_until(lambda: not proxy.vllm_processes(), 15), proxy.vllm_processes()
    reader.join(30)
    assert isinstance(reader.outcome, httpx.HTTPError), reader.outcome  # the stream broke off
    assert "[DONE]" not in reader.events and len(reader.events) < 1800
