"""The passthrough: every path the proxy does not own reaches vLLM unchanged, streaming included.

Real processes over real sockets: the daemon runs as a child process (``python -m
aic_vllm_proxy serve``) in front of the simulator, or of ``helpers.ECHO``, a stand-in upstream
that echoes what it received (method, raw target, headers, body hash) so that what the proxy
forwards can be checked byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from helpers import ECHO, FAST, Daemon, sse_data, sse_text, start_daemon
from multidict import CIMultiDict
from yarl import URL

from aic_vllm_proxy.simulator import VLLM_VERSION

SIM_SPEC = f"sim/model-a --served-model-name sm --enable-request-id-headers --max-model-len 100000000 {FAST}"
SLOW_SPEC = f"sim/slow --served-model-name slow --sim-token-delay 0.3 {FAST}"
TIMEOUT = aiohttp.ClientTimeout(total=60)


def _daemon_with(
    tmp_path_factory: pytest.TempPathFactory, name: str, spec: str, *args: str
) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp(name), "--health-interval", "0", *args)
    try:
        status, body = daemon.switch(spec)
        assert status == 200, body
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The daemon with the simulator loaded (fast tokens)."""
    yield from _daemon_with(tmp_path_factory, "sim", SIM_SPEC)


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The daemon with the simulator loaded, 0.3 s per token."""
    yield from _daemon_with(tmp_path_factory, "slow", SLOW_SPEC)


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The daemon in front of the echo upstream (which closes idle connections after 5 s)."""
    yield from _daemon_with(tmp_path_factory, "echo", "echo-model", "--vllm-command", ECHO)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


def direct(daemon: Daemon) -> str:
    """vLLM's own address, to compare with what the proxy answers."""
    return f"http://127.0.0.1:{daemon.vllm_port}"


async def raw_http(port: int, request: bytes) -> tuple[int, CIMultiDict[str], bytes]:
    """Send hand-written HTTP/1.1 bytes, read one response (Content-Length or chunked)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(":")
                headers.add(key.strip(), value.strip())
        if "Content-Length" in headers:
            body = await reader.readexactly(int(headers["Content-Length"]))
        elif headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await reader.readline()).strip(), 16)
                if size == 0:
                    await reader.readline()
                    break
                body += await reader.readexactly(size)
                await reader.readline()
        else:
            body = await reader.read()
        return status, headers, body
    finally:
        writer.close()


def chat(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "sm", "messages": [{"role": "user", "content": content}], **extra}


# ------------------------------------------------------------------------- vLLM's own paths


async def test_vllm_paths_are_not_shadowed(sim: Daemon, http: aiohttp.ClientSession) -> None:
    for path in ("/health", "/version", "/load", "/ping"):
        async with http.get(sim.url + path) as via, http.get(direct(sim) + path) as own:
            assert via.status == own.status == 200, path
            assert await via.read() == await own.read(), path
            assert via.headers.get("Content-Type") == own.headers.get("Content-Type"), path
    async with http.get(sim.url + "/version") as resp:
        assert (await resp.json())["version"] == VLLM_VERSION
    async with http.get(sim.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=1.0.0; charset=utf-8"
        assert 'vllm:num_requests_running{engine="0",model_name="sm"}' in await resp.text()
    async with http.get(sim.url + "/v1/models") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        assert [m["id"] for m in (await resp.json())["data"]] == ["sm"]
    async with http.post(sim.url + "/tokenize", json={"model": "sm", "prompt": "one two  three\nfour"}) as r:
        assert r.status == 200
        assert (await r.json())["count"] == 4


async def test_proxy_health_is_the_proxys_own(sim: Daemon, http: aiohttp.ClientSession) -> None:
    async with http.get(sim.url + "/proxy/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    # vLLM has no such path: the proxy's route does not hide anything of vLLM's.
    async with http.get(direct(sim) + "/proxy/health") as resp:
        assert resp.status == 404


async def test_errors_of_vllm_pass_unchanged(sim: Daemon, http: aiohttp.ClientSession) -> None:
    cases: list[tuple[str, str, Any]] = [
        ("POST", "/v1/chat/completions", {"json": {**chat("hi"), "model": "no-such-model"}}),
        ("POST", "/v1/completions", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v1/completions", {"json": {"model": "sm", "prompt": "x", "max_tokens": 0}}),
        ("DELETE", "/v1/models", {}),
        ("PUT", "/health", {"data": b"x"}),
        ("GET", "/no/such/path?x=1", {}),
    ]
    for method, path, kwargs in cases:
        async with http.request(method, direct(sim) + path, **kwargs) as own:
            own_body = await own.read()
            own_type = own.headers.get("Content-Type")
            own_allow = own.headers.get("Allow")
        async with http.request(method, sim.url + path, **kwargs) as via:
            assert via.status == own.status, (method, path)
            assert await via.read() == own_body, (method, path)
            assert via.headers.get("Content-Type") == own_type
            assert via.headers.get("Allow") == own_allow
    async with http.post(sim.url + "/v1/chat/completions", json={**chat("hi"), "model": "nope"}) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
        assert error["type"] == "NotFoundError" and "`nope` does not exist" in error["message"]


# ----------------------------------------------------------------------- what is forwarded


async def test_methods_and_query_strings(echo: Daemon, http: aiohttp.ClientSession) -> None:
    target = "/any/where%2Fencoded/x%20y?b=2&a=%2F%20x&a=1&empty=&flag&u=%C3%A9"
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        async with http.request(method, URL(echo.url + target, encoded=True)) as resp:
            assert resp.status == 200, method
            seen = await resp.json()
        assert seen["method"] == method
        assert seen["target"] == target  # byte for byte, order and encoding kept
    for _ in range(3):  # HEAD has no body: the pooled upstream connection stays in step
        async with http.head(echo.url + "/head/path?q=1") as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) > 0
            assert await resp.read() == b""
        async with http.get(echo.url + "/after/head") as resp:
            assert (await resp.json())["target"] == "/after/head"
    assert "echo HEAD /head/path?q=1 200" in echo.get("/logs/tail?lines=50").text


async def test_request_headers_forwarded_minus_hop_by_hop(echo: Daemon) -> None:
    body = b'{"a": 1}'
    request = (
        b"POST /v1/echo HTTP/1.1\r\n"
        b"Host: proxy.example:8224\r\n"
        b"User-Agent: my-agent/1.0\r\n"
        b"Accept: text/event-stream\r\n"
        b"Accept-Encoding: gzip\r\n"
        b"Authorization: Bearer user-key\r\n"
        b"X-Custom: one\r\n"
        b"X-Custom: two\r\n"
        b"OpenAI-Organization: org-1\r\n"
        b"Connection: keep-alive, X-Conn-Private\r\n"
        b"X-Conn-Private: secret\r\n"
        b"Connection: X-Second-Private\r\n"
        b"X-Second-Private: secret too\r\n"
        b"Keep-Alive: timeout=300\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Authorization: Basic eDp5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    status, _, raw = await raw_http(echo.port, request)
    assert status == 200, raw
    seen = json.loads(raw)
    headers: CIMultiDict[str] = CIMultiDict((k, v) for k, v in seen["headers"])
    assert headers.getall("X-Custom") == ["one", "two"]
    assert headers["User-Agent"] == "my-agent/1.0"
    assert headers["Accept"] == "text/event-stream"
    assert headers["Accept-Encoding"] == "gzip"
    assert headers["Authorization"] == "Bearer user-key"  # no proxy keys: the client's key passes
    assert headers["OpenAI-Organization"] == "org-1"
    assert headers["Content-Type"] == "application/json"
    assert headers["Host"] == f"127.0.0.1:{echo.vllm_port}"
    hop_by_hop = ("X-Conn-Private", "X-Second-Private", "Keep-Alive", "TE", "Proxy-Authorization",
                  "Proxy-Connection", "Connection")  # fmt: skip
    for name in hop_by_hop:
        assert name not in headers, name
    for name in ("User-Agent", "Accept", "Host", "Content-Type", "Accept-Encoding"):
        assert len(headers.getall(name)) == 1, name  # nothing added beside the client's own
    assert seen["body_size"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_response_headers_and_status_preserved(echo: Daemon, http: aiohttp.ClientSession) -> None:
    async with http.get(echo.url + "/teapot?status=418&hop=1") as resp:
        assert resp.status == 418
        assert resp.content_type == "application/json"
        assert resp.headers["X-Echo"] == "1"
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert "X-Hop-Secret" not in resp.headers  # named in vLLM's Connection header
        assert "Keep-Alive" not in resp.headers
        assert (await resp.json())["target"] == "/teapot?status=418&hop=1"
    for status in (204, 304, 201, 404, 500):  # bodiless statuses too; the connection stays usable
        async with http.get(echo.url + f"/s?status={status}") as resp:
            assert resp.status == status
            body = await resp.read()
            assert (body == b"") == (status in (204, 304))
    async with http.get(echo.url + "/after") as resp:
        assert resp.status == 200


async def test_compressed_response_passes_byte_for_byte(echo: Daemon) -> None:
    async with (
        aiohttp.ClientSession(auto_decompress=False, timeout=TIMEOUT) as http,
        http.get(echo.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as resp,
    ):
        data = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert int(resp.headers["Content-Length"]) == len(data)
    assert gzip.decompress(data) == b"compressed payload " * 100


async def test_compressed_request_body_passes_byte_for_byte(
    echo: Daemon, http: aiohttp.ClientSession
) -> None:
    # A client may send a gzip-encoded body; the proxy must forward the bytes it was sent, not
    # a decompressed copy still labelled "Content-Encoding: gzip".
    payload = gzip.compress(json.dumps({"prompt": "word " * 20000}).encode())
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with http.post(echo.url + "/v1/gz", data=payload, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        seen = await resp.json()
    assert seen["body_size"] == len(payload)
    assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_early_answer_during_a_large_upload_is_relayed(
    echo: Daemon, http: aiohttp.ClientSession
) -> None:
    # vLLM may answer (and close) before reading a large body, e.g. an authentication failure:
    # the client must get that answer, not a 502.
    async with http.post(echo.url + "/early", data=b"u" * (8 << 20)) as resp:
        body = await resp.read()
        assert resp.status == 401, body[:300]
    assert json.loads(body)["error"]["message"] == "rejected early"


@pytest.mark.slow
async def test_slow_reader_of_a_large_response(sim: Daemon) -> None:
    """A 6 MB answer to a client that stalls before reading: back-pressure pauses reading from
    vLLM, nothing is lost, and the pooled vLLM connection then serves the next request (it must
    not be left paused). Five rounds: the stall ends at a different point of the relay each time."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), read_bufsize=1 << 14) as http:
        for _ in range(5):
            body = {"model": "sm", "prompt": "v " * 1_000_000}
            async with http.post(sim.url + "/tokenize", json=body) as resp:
                assert resp.status == 200
                await asyncio.sleep(0.3)  # not reading: the buffers fill up all the way to vLLM
                raw = await resp.read()
            assert len(raw) == int(resp.headers["Content-Length"])
            assert json.loads(raw)["count"] == 1_000_000
            async with http.get(sim.url + "/v1/models") as resp:
                assert [m["id"] for m in (await resp.json())["data"]] == ["sm"]


async def test_request_id_header_round_trip(sim: Daemon, http: aiohttp.ClientSession) -> None:
    # vLLM uses the client's X-Request-Id, which the proxy passes on, as its request id; the
    # client gets the request's id back from the proxy, once (vLLM's own, with
    # --enable-request-id-headers, is replaced: docs/logging.md).
    async with http.post(
        sim.url + "/v1/chat/completions", json=chat("hi", max_tokens=2), headers={"X-Request-Id": "rid-42"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers.getall("X-Request-Id") == ["rid-42"]
        assert (await resp.json())["id"] == "chatcmpl-rid-42"


# ---------------------------------------------------------------------------- large bodies


async def test_large_body_reaches_vllm_whole(sim: Daemon, http: aiohttp.ClientSession) -> None:
    words = 2_000_000
    text = "lorem " * words  # 12 MB of text
    image = base64.b64encode(b"\x89PNG" + b"\x00\xff" * (9 * 1024 * 1024)).decode()  # ~24 MB
    content = [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
    ]
    body = json.dumps(chat(content, max_tokens=1)).encode()
    assert len(body) > 30 * 1024 * 1024
    async with http.post(
        sim.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 200, (await resp.read())[:500]
        usage = (await resp.json())["usage"]
    assert usage["prompt_tokens"] == words + 1  # every word arrived, plus one for the image
    async with http.post(sim.url + "/tokenize", json={"model": "sm", "prompt": "w\n " * 1_000_000}) as resp:
        assert resp.status == 200  # a 3 MB request, a ~8 MB answer
        assert (await resp.json())["count"] == 1_000_000


async def test_large_and_chunked_bodies_are_byte_exact(echo: Daemon, http: aiohttp.ClientSession) -> None:
    blob = hashlib.sha256(b"seed").digest() * (25 * 1024 * 1024 // 32)  # 25 MiB
    async with http.post(echo.url + "/v1/upload", data=blob) as resp:
        seen = await resp.json()
    assert (seen["body_size"], seen["body_sha256"]) == (len(blob), hashlib.sha256(blob).hexdigest())

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(blob), 1 << 20):
            yield blob[i : i + (1 << 20)]
            await asyncio.sleep(0)

    async with http.post(echo.url + "/v1/chunked", data=chunks()) as resp:  # no Content-Length
        seen = await resp.json()
    assert (seen["body_size"], seen["body_sha256"]) == (len(blob), hashlib.sha256(blob).hexdigest())
    small = b"x" * (1 << 20)  # exactly the size kept for a retry
    async with http.post(echo.url + "/v1/small", data=small) as resp:
        assert (await resp.json())["body_size"] == len(small)


# ------------------------------------------------------------------------------- streaming


async def test_openai_client_streams_chat_and_completions(sim: Daemon) -> None:
    client = openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="sm", messages=[{"role": "user", "content": "a b c"}], max_tokens=12, stream=True
        )
        parts, finish = [], None
        async for chunk in stream:
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(parts) == "".join(f" tok{i}" for i in range(12))
        assert finish == "length"

        stream2 = await client.completions.create(model="sm", prompt="x y", max_tokens=7, stream=True)
        texts = [choice.text async for chunk in stream2 for choice in chunk.choices]
        assert "".join(texts) == "".join(f" tok{i}" for i in range(7))

        stream3 = await client.chat.completions.create(
            model="sm",
            messages=[{"role": "user", "content": "one two three four five"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream3]
        last = chunks[-1]
        assert last.choices == []
        assert last.usage is not None
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 5)
        assert all(c.usage is None for c in chunks[:-1])

        models = await client.models.list()
        assert [m.id for m in models.data] == ["sm"]
    finally:
        await client.close()


async def test_raw_stream_has_every_token_and_done(sim: Daemon, http: aiohttp.ClientSession) -> None:
    for path, body in (
        ("/v1/chat/completions", chat("q", max_tokens=30, stream=True)),
        ("/v1/completions", {"model": "sm", "prompt": "q", "max_tokens": 30, "stream": True}),
    ):
        async with http.post(sim.url + path, json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = await resp.read()
        events = sse_data(raw)
        assert events[-1] == "[DONE]"
        assert events.count("[DONE]") == 1
        assert sse_text(events) == "".join(f" tok{i}" for i in range(30))


async def test_stream_is_not_buffered(slow: Daemon, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    arrivals: list[float] = []
    body = {"model": "slow", "prompt": "p", "max_tokens": 10, "stream": True}
    async with http.post(slow.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        raw = b""
        async for chunk in resp.content.iter_any():
            raw += chunk
            arrivals.append(time.monotonic() - started)
    total = time.monotonic() - started
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    assert sse_text(events) == "".join(f" tok{i}" for i in range(10))
    assert arrivals[0] < 1.5, arrivals  # the first token came as soon as it was generated
    assert total >= 2.5, total  # while the last one was generated ~3 s in
    assert len(arrivals) >= 5  # delivered piece by piece, not in one block at the end


async def test_client_disconnect_aborts_the_request_in_vllm(slow: Daemon) -> None:
    body = {"model": "slow", "prompt": "p", "max_tokens": 50, "stream": True}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        resp = await http.post(slow.url + "/v1/completions", json=body, headers={"X-Request-Id": "gone-1"})
        assert resp.status == 200
        first = await resp.content.readany()
        assert first.startswith(b"data: ")
        assert slow.status()["in_flight"] == 1
        resp.close()  # drops the connection mid-stream
    deadline = time.monotonic() + 10
    tail = ""
    while time.monotonic() < deadline:
        tail = slow.get("/logs/tail?lines=100").text
        if "Aborted request" in tail:
            break
        await asyncio.sleep(0.1)
    assert "Aborted request" in tail, tail
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and slow.status()["in_flight"] != 0:
        await asyncio.sleep(0.05)
    assert slow.status()["in_flight"] == 0
    assert slow.status()["state"] == "ready"

    # Before vLLM has answered anything (a non-streamed request still generating): the same.
    before = slow.get("/logs/tail?lines=100000").text.count("Aborted request")
    body = {"model": "slow", "prompt": "p", "max_tokens": 30}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
        with pytest.raises(asyncio.TimeoutError):
            await http.post(slow.url + "/v1/completions", json=body)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if slow.get("/logs/tail?lines=100000").text.count("Aborted request") > before:
            break
        await asyncio.sleep(0.1)
    assert slow.get("/logs/tail?lines=100000").text.count("Aborted request") > before
    while time.monotonic() < deadline and slow.status()["in_flight"] != 0:
        await asyncio.sleep(0.05)
    assert slow.status()["in_flight"] == 0


# ------------------------------------------------------------------- no model / a switch


async def test_no_model_loaded_is_a_clear_503(make_proxy: Any) -> None:
    proxy = await make_proxy()
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health")):
        started = time.monotonic()
        async with proxy.session.request(method, proxy.url + path, json=chat("x")) as resp:
            assert resp.status == 503
            assert resp.content_type == "application/json"
            error = (await resp.json())["error"]
        assert time.monotonic() - started < 5  # no waiting when no switch is going on
        assert "/switch" in error["message"] and "No model is loaded" in error["message"]
        assert error["code"] == 503 and error["type"]


async def test_request_during_a_switch_waits_then_is_served(make_proxy: Any) -> None:
    proxy = await make_proxy()
    status, _ = await proxy.switch("sim/late --sim-import-delay 0.05 --sim-load-delay 2", wait=False)
    assert status == 202
    started = time.monotonic()
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions", json={**chat("a b"), "model": "sim/late", "max_tokens": 3}
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["usage"]["completion_tokens"] == 3
    assert time.monotonic() - started >= 1.0  # it waited for the load
    assert (await proxy.status())["state"] == "ready"


async def test_request_wait_timeout_during_a_long_load(make_proxy: Any) -> None:
    proxy = await make_proxy(request_wait_timeout=1.0)
    status, _ = await proxy.switch("sim/very-late --sim-import-delay 0.05 --sim-load-delay 4", wait=False)
    assert status == 202
    started = time.monotonic()
    async with proxy.session.post(proxy.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 503
        error = (await resp.json())["error"]
        assert resp.headers.get("Retry-After")
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 5, elapsed
    assert "Timed out after 1 s" in error["message"] and "sim/very-late" in error["message"]
    assert (await proxy.status())["state"] == "starting"


async def test_body_over_the_limit_is_413(make_proxy: Any) -> None:
    proxy = await make_proxy(max_body_size=1000, vllm_command=ECHO)
    status, body = await proxy.switch("echo-model")
    assert status == 200, body
    async with proxy.session.post(proxy.url + "/v1/x", data=b"y" * 2000) as resp:
        assert resp.status == 413
        assert "max-body-size" in (await resp.json())["error"]["message"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"z" * 600

    async with proxy.session.post(proxy.url + "/v1/x", data=chunks()) as resp:  # chunked, no length
        assert resp.status == 413, await resp.text()
        assert "max-body-size" in (await resp.json())["error"]["message"]
    async with proxy.session.post(proxy.url + "/v1/x", data=b"y" * 1000) as resp:
        assert resp.status == 200


async def test_api_key_in_the_spec_is_supplied_by_the_proxy(make_proxy: Any) -> None:
    proxy = await make_proxy()
    code, body = await proxy.switch(f"sim/keyed --served-model-name keyed --api-key sekret {FAST}")
    assert code == 200, body  # the readiness probe used the key too
    base = f"http://127.0.0.1:{proxy.settings.vllm_port}"
    async with proxy.session.get(base + "/v1/models") as resp:
        assert resp.status == 401  # vLLM itself wants the key
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with proxy.session.post(
            proxy.url + "/v1/chat/completions",
            json={**chat("x"), "model": "keyed", "max_tokens": 2},
            headers=headers,
        ) as resp:
            assert resp.status == 200, await resp.text()


async def test_ipv6_loopback_upstream(make_proxy: Any) -> None:
    proxy = await make_proxy(vllm_host="::1")
    code, body = await proxy.switch(f"sim/six --served-model-name six {FAST}")
    assert code == 200, body
    assert body["status"]["vllm_base"] == f"http://[::1]:{proxy.settings.vllm_port}"
    async with proxy.session.post(
        proxy.url + "/v1/completions", json={"model": "six", "prompt": "a", "max_tokens": 3, "stream": True}
    ) as resp:
        assert resp.status == 200
        assert sse_data(await resp.read())[-1] == "[DONE]"


# ------------------------------------------------------------------- vLLM dies mid-stream


async def test_crash_mid_stream_is_never_a_clean_end(make_proxy: Any) -> None:
    # "cut": the connection to vLLM breaks with no end of stream (a killed process does this).
    proxy = await make_proxy()
    spec = f"sim/crashy --sim-crash-on-request 1 --sim-token-delay 0.05 --sim-abort-stream cut {FAST}"
    status, body = await proxy.switch(spec)
    assert status == 200, body
    raw = b""
    broken = False
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions",
        json={**chat("x"), "model": "sim/crashy", "max_tokens": 40, "stream": True},
    ) as resp:
        assert resp.status == 200
        try:
            async for chunk in resp.content.iter_any():
                raw += chunk
        except aiohttp.ClientPayloadError:
            broken = True
    events = sse_data(raw)
    assert "[DONE]" not in events
    assert sse_text([e for e in events if '"choices"' in e]).startswith(" tok0 tok1")
    error_events = [json.loads(e) for e in events if e.startswith('{"error"')]
    assert broken or error_events, raw[-300:]
    if error_events:
        assert "vLLM stopped in the middle" in error_events[-1]["error"]["message"]
    # And the proxy knows the model is gone.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (await proxy.status())["state"] != "failed":
        await asyncio.sleep(0.05)
    assert (await proxy.status())["state"] == "failed"


async def test_vllm_error_event_on_engine_death_passes_through(make_proxy: Any) -> None:
    # What vLLM 0.32 itself does when its engine dies mid-stream: an error event, then [DONE].
    proxy = await make_proxy()
    status, body = await proxy.switch(f"sim/err --sim-crash-on-request 1 --sim-token-delay 0.05 {FAST}")
    assert status == 200, body
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions",
        json={**chat("x"), "model": "sim/err", "max_tokens": 40, "stream": True},
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = sse_data(raw)
    errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
    assert errors and errors[0]["code"] == 500, raw[-300:]
    assert sse_text([e for e in events if '"choices"' in e]).startswith(" tok0")


async def test_crash_mid_stream_through_the_openai_client(make_proxy: Any) -> None:
    proxy = await make_proxy()
    status, body = await proxy.switch(f"sim/crashy2 --sim-crash-on-request 1 --sim-token-delay 0.05 {FAST}")
    assert status == 200, body
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    got: list[str] = []
    try:
        # The SSE error event becomes an APIError; a bare cut would be an httpx transport error.
        with pytest.raises((openai.APIError, httpx.TransportError)):
            stream = await client.chat.completions.create(
                model="sim/crashy2", messages=[{"role": "user", "content": "x"}], max_tokens=40, stream=True
            )
            async for chunk in stream:
                got.extend(c.delta.content or "" for c in chunk.choices)
    finally:
        await client.close()
    assert 0 < len(got) < 40


# ------------------------------------------------------------------------ idle keep-alive


@pytest.mark.slow
async def test_idle_upstream_connections_never_break_requests(
    sim: Daemon, echo: Daemon, make_proxy: Any
) -> None:
    """vLLM (uvicorn) closes idle keep-alive connections after 5 s; the echo upstream does the
    same. Requests after idle pauses around that boundary must all succeed. A second echo
    upstream closes idle connections after 2 s, before the proxy's pool gives them up, so the
    proxy meets connections vLLM has closed (or is closing) and must retry them transparently."""
    short = await make_proxy(vllm_command=ECHO)
    code, body = await short.switch("echo-short --keepalive 2")
    assert code == 200, body

    async def one(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> None:
        async with session.post(url, **kwargs) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()

    async def sequence(url: str, pauses: list[float], **kwargs: Any) -> int:
        done = 0
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await one(session, url, **kwargs)
            for pause in pauses:
                await asyncio.sleep(pause)
                await one(session, url, **kwargs)
                done += 1
        return done

    sim_url = sim.url + "/v1/completions"
    sim_body = {"json": {"model": "sm", "prompt": "x", "max_tokens": 2}}
    echo_url = echo.url + "/v1/echo"
    short_url = short.url + "/v1/echo"
    plan: list[tuple[str, list[float], dict[str, Any]]] = [
        (sim_url, [5.5], sim_body),
        (sim_url, [4.0, 5.0], sim_body),
        (echo_url, [5.5, 3.9], {"data": b"a"}),
        (echo_url, [4.0, 5.05], {"data": b"b"}),
        (echo_url, [4.9, 4.5], {"data": b"c" * 100}),
        (echo_url, [5.2, 4.1], {"json": {"k": 1}}),
        (echo_url, [6.0, 3.0], {"data": b"d"}),
        (short_url, [1.9, 2.0, 2.05, 2.1], {"data": b"e"}),
        (short_url, [2.0, 2.0, 2.0, 2.0], {"data": b"f" * 1000}),
        (short_url, [2.02, 1.98, 2.01, 1.99], {"json": {"k": 2}}),
    ]
    started = time.monotonic()
    results = await asyncio.gather(*(sequence(url, pauses, **kw) for url, pauses, kw in plan))
    assert results == [len(pauses) for _, pauses, _ in plan]
    assert time.monotonic() - started < 30


async def test_many_requests_back_to_back(sim: Daemon, http: aiohttp.ClientSession) -> None:
    async def one(i: int) -> int:
        async with http.post(
            sim.url + "/v1/completions",
            json={"model": "sm", "prompt": f"p {i}", "max_tokens": 3, "stream": i % 2 == 0},
        ) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses == [200] * 200
    assert sim.status()["in_flight"] == 0
