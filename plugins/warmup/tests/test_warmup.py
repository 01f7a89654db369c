"""warmup against the bundled vLLM simulator (a real subprocess) and against small fake servers
for what the simulator does not do (no chat template, errors, slowness)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aic_vllm_proxy_warmup.plugin import WarmupConfig, WarmupFailed, post_switch
from aiohttp import web
from aiohttp.test_utils import TestServer

from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.hooks import HookContext

MODEL = "org/tiny-model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The simulator serving MODEL: (base URL, its log file)."""
    port = free_port()
    log = tmp_path_factory.mktemp("sim") / "vllm.log"
    command = [
        sys.executable, "-m", "aic_vllm_proxy.simulator", "serve", MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--sim-import-delay", "0", "--sim-load-delay", "0.05",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its engine child goes with it
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"simulator did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # Like the proxy's own session: bytes as vLLM sent them, no cookies.
    session = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
    yield session
    await session.close()


def make_ctx(
    session: aiohttp.ClientSession, base: str, spec: str = MODEL, model: str | None = MODEL, **config: Any
) -> HookContext:
    return HookContext(
        event="post_switch",
        old_spec=None,
        new_spec=spec,
        settings=Settings(),
        vllm_base=base,
        log_path=None,
        session=session,
        model=model,
        pid=1234,
        plugin_config=config,
    )


def request_lines(log: Path, path: str) -> int:
    return sum(f'"POST {path} HTTP/1.1" 200 OK' in line for line in log.read_text().splitlines())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def fake_vllm() -> AsyncIterator[Callable[..., Awaitable[tuple[str, list[web.Request]]]]]:
    """A fake vLLM with the given handlers: returns (base URL, the requests it saw)."""
    servers: list[TestServer] = []

    async def start(chat: Handler | None = None, completions: Handler | None = None) -> tuple[str, list[Any]]:
        seen: list[Any] = []

        def record(handler: Handler | None) -> Handler:
            async def wrapped(request: web.Request) -> web.StreamResponse:
                seen.append((request.path, dict(request.headers), await request.json()))
                if handler is None:
                    return web.json_response({"choices": []})
                return await handler(request)

            return wrapped

        app = web.Application()
        app.router.add_post("/v1/chat/completions", record(chat))
        app.router.add_post("/v1/completions", record(completions))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/"), seen

    yield start
    for server in servers:
        await server.close()


async def no_chat_template(request: web.Request) -> web.Response:
    message = (
        "As of transformers v4.44, default chat template is no longer allowed, so you must provide "
        "a chat template if the tokenizer does not define one."
    )
    return web.json_response(
        {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}, status=400
    )


# ------------------------------------------------------------------- simulator


async def test_default_is_one_short_chat_completion(
    simulator: tuple[str, Path], session: aiohttp.ClientSession
) -> None:
    base, log = simulator
    before = request_lines(log, "/v1/chat/completions")
    message = await post_switch(make_ctx(session, base))
    assert message is not None
    assert message.startswith("warm-up: 1 request, ") and message.endswith(" ms")
    await asyncio.sleep(0.1)  # the access log line follows the answer
    assert request_lines(log, "/v1/chat/completions") == before + 1


async def test_several_requests_through_completions(
    simulator: tuple[str, Path], session: aiohttp.ClientSession
) -> None:
    base, log = simulator
    before = request_lines(log, "/v1/completions")
    ctx = make_ctx(session, base, requests="3", endpoint="completions", max_tokens="2", prompt="Hi")
    message = await post_switch(ctx)
    assert message is not None
    assert message.startswith("warm-up: 3 requests, first ")
    assert message.endswith("ms on average (via /v1/completions)")
    await asyncio.sleep(0.1)
    assert request_lines(log, "/v1/completions") == before + 3


async def test_unknown_model_is_reported(simulator: tuple[str, Path], session: aiohttp.ClientSession) -> None:
    base, _ = simulator
    with pytest.raises(WarmupFailed, match=r"to /v1/chat/completions for nope answered 404: .*nope"):
        await post_switch(make_ctx(session, base, model="nope"))


# ----------------------------------------------------------------- fake vLLMs


async def test_no_chat_template_falls_back_to_completions(
    fake_vllm: Callable[..., Awaitable[tuple[str, list[Any]]]], session: aiohttp.ClientSession
) -> None:
    base, seen = await fake_vllm(chat=no_chat_template)
    message = await post_switch(make_ctx(session, base, requests=2))
    assert message is not None
    assert message.endswith("(via /v1/completions: the model has no chat template)")
    assert [path for path, _, _ in seen] == ["/v1/chat/completions", "/v1/completions", "/v1/completions"]
    body = seen[1][2]
    assert body == {"model": MODEL, "max_tokens": 8, "temperature": 0, "prompt": "Hello"}


async def test_no_chat_template_without_fallback_says_what_to_do(
    fake_vllm: Callable[..., Awaitable[tuple[str, list[Any]]]], session: aiohttp.ClientSession
) -> None:
    base, _ = await fake_vllm(chat=no_chat_template)
    with pytest.raises(WarmupFailed) as failed:
        await post_switch(make_ctx(session, base, fallback="false"))
    message = str(failed.value)
    assert "answered 400: As of transformers v4.44" in message
    assert 'endpoint = "completions"' in message


async def test_slow_model_times_out(
    fake_vllm: Callable[..., Awaitable[tuple[str, list[Any]]]], session: aiohttp.ClientSession
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.json_response({})

    base, _ = await fake_vllm(chat=slow)
    started = time.monotonic()
    with pytest.raises(WarmupFailed, match=r"within 0.2 s"):
        await post_switch(make_ctx(session, base, timeout=0.2))
    assert time.monotonic() - started < 2


async def test_api_key_and_served_name_are_used(
    fake_vllm: Callable[..., Awaitable[tuple[str, list[Any]]]], session: aiohttp.ClientSession
) -> None:
    base, seen = await fake_vllm()
    spec = "/models/llama --served-model-name llama --api-key s3cret"
    await post_switch(make_ctx(session, base, spec=spec, model=None))
    _, headers, body = seen[0]
    assert headers["Authorization"] == "Bearer s3cret"
    assert body["model"] == "llama"
    assert body["messages"] == [{"role": "user", "content": "Hello"}]


async def test_an_instance_is_warmed_on_its_own_port(
    fake_vllm: Callable[..., Awaitable[tuple[str, list[Any]]]], session: aiohttp.ClientSession
) -> None:
    """Several models side by side: the one that became ready is warmed at its own base URL
    (ctx.vllm_base) under its served name, never at --vllm-port, where another instance runs."""
    other, seen_other = await fake_vllm()
    base, seen = await fake_vllm()
    ctx = HookContext(
        event="post_switch",
        old_spec=None,
        new_spec="org/big --served-model-name big",
        settings=Settings(vllm_port=int(other.rsplit(":", 1)[1])),
        vllm_base=base,
        log_path=None,
        session=session,
        model="big",
        instance="big",
        gpus=("1",),
        port=int(base.rsplit(":", 1)[1]),
    )
    assert await post_switch(ctx) is not None
    assert [body["model"] for _, _, body in seen] == ["big"]
    assert not seen_other


async def test_unreachable_vllm_is_reported(session: aiohttp.ClientSession) -> None:
    base = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(WarmupFailed, match="cannot reach"):
        await post_switch(make_ctx(session, base))


async def test_zero_requests_turns_it_off(session: aiohttp.ClientSession) -> None:
    assert await post_switch(make_ctx(session, "http://127.0.0.1:9", requests=0)) is None


def test_settings() -> None:
    config = WarmupConfig.parse({"requests": "2", "fallback": "no", "endpoint": "/v1/completions"})
    assert (config.requests, config.fallback, config.endpoint) == (2, False, "/v1/completions")
    with pytest.raises(ValueError, match="endpoint"):
        WarmupConfig.parse({"endpoint": "embeddings"})
    with pytest.raises(ValueError, match="requests must be an integer"):
        WarmupConfig.parse({"requests": "many"})
    with pytest.raises(ValueError, match="timeout > 0"):
        WarmupConfig.parse({"timeout": 0})
