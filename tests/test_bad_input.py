"""Bad input from clients: malformed and huge JSON, shell metacharacters and proxy-owned flags in
model specs, bad query parameters, unknown routes and methods, oversized bodies and headers, slow
clients. Each gets a clear 4xx and changes nothing (the same vLLM keeps running, nothing reaches
it). Real proxy, real simulator processes, raw sockets where the client misbehaves."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import FAST, metric_total, raw_exchange, sse_data, wait_status

CHAT = "/v1/chat/completions"
PART = b'{"model": "m", "messages": [{"role"'


async def loaded(make_proxy: Any, spec: str = f"m {FAST}", **settings: Any) -> tuple[Any, int]:
    proxy = await make_proxy(**settings)
    status, body = await proxy.switch(spec)
    assert status == 200, body
    return proxy, body["status"]["pid"]


async def unchanged(proxy: Any, pid: int) -> None:
    now = await proxy.status()
    assert now["state"] == "ready" and now["pid"] == pid and not now["switching"], now
    assert now["in_flight"] == 0, now


def assert_error(body: Any, status: int) -> str:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"]["code"] == status and body["error"]["type"], body
    message: str = body["error"]["message"]
    assert message
    return message


async def post_raw(
    proxy: Any, path: str, data: bytes, content_type: str = "application/json"
) -> tuple[int, Any]:
    headers = {"Content-Type": content_type}
    async with proxy.session.post(proxy.url + path, data=data, headers=headers) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


class VllmTraffic:
    """What vLLM itself saw, from its own log (its access lines) and its /metrics."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    async def snapshot(self) -> tuple[int, float]:
        status = await self.proxy.status()
        log = Path(status["log_path"]).read_text(errors="replace")
        async with self.proxy.session.get(self.proxy.url + "/metrics") as resp:
            metrics = await resp.text()
        # /metrics itself shows up in the access log; count only generation requests.
        answered = sum(log.count(f'"POST {path} HTTP/1.1"') for path in (CHAT, "/v1/completions"))
        return answered, metric_total(metrics, "vllm:prompt_tokens_total")


# ------------------------------------------------------------------------------- /switch bodies


MALFORMED = [
    (b"", 400),
    (b"not json", 400),
    (b'{"model_spec": "m"', 400),
    (b"[]", 400),
    (b'"m"', 400),
    (b"null", 400),
    (b"\xff\xfe\x00{", 400),
    (b"{}", 422),
    (b'{"model_spec": ""}', 422),
    (b'{"model_spec": " \\n\\t "}', 422),
    (b'{"model_spec": 5}', 422),
    (b'{"model_spec": ["m"]}', 422),
    (b'{"model_spec": null}', 422),
    (b'{"model_spec": "m", "wait": "maybe"}', 422),
    (b'{"model_spec": "m", "force": {}}', 422),
    (b'{"model_spec": "m", "surprise": 1}', 422),
    (b'{"model_spec": "m \'unbalanced"}', 400),
    (b'{"model_spec": "--served-model-name x"}', 400),
]


async def test_malformed_switch_bodies_change_nothing(make_proxy: Any) -> None:
    proxy, pid = await loaded(make_proxy)
    for data, expected in MALFORMED:
        status, body = await post_raw(proxy, "/switch", data)
        assert status == expected, (data, status, body)
        assert_error(body, expected)
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        status, body = await post_raw(proxy, "/switch", b"model_spec=m2", content_type)
        assert status == 400, body
    status, body = await post_raw(proxy, "/stop", b"{not json")
    assert status == 400, body
    assert_error(body, 400)
    await unchanged(proxy, pid)


async def test_json_python_cannot_read_is_a_400(make_proxy: Any) -> None:
    """Valid-looking JSON that Python's json module refuses in other ways than a syntax error: too
    deeply nested (RecursionError) and integers of more than 4300 digits (ValueError)."""
    proxy, pid = await loaded(make_proxy)
    for data in (b"[" * 100_000 + b"]" * 100_000, b'{"model_spec": ' + b"7" * 5000 + b"}"):
        for path in ("/switch", "/stop"):
            status, body = await post_raw(proxy, path, data)
            assert status == 400, (path, data[:20], status, str(body)[:300])
            assert_error(body, 400)
    await unchanged(proxy, pid)


async def test_huge_model_spec_is_refused_and_changes_nothing(make_proxy: Any) -> None:
    """A spec far longer than any command line (one word over the kernel's 128 KiB per-argument
    limit) cannot be run; it must be refused before the running model is stopped."""
    proxy, pid = await loaded(make_proxy)
    for spec in ("m" * 300_000, "m " + "--seed 1 " * 40_000):
        status, body = await proxy.switch(spec)
        assert status == 422, (status, str(body)[:300])  # over the spec's length limit
        assert_error(body, 422)
    await unchanged(proxy, pid)


async def test_body_over_the_limit_on_control_routes(make_proxy: Any) -> None:
    proxy, pid = await loaded(make_proxy, max_body_size=64 * 1024)
    spec = json.dumps({"model_spec": "m2 " + "x" * 100_000}).encode()
    for path in ("/switch", "/stop"):
        status, body = await post_raw(proxy, path, spec)
        assert status == 413, (path, status, body)
        assert_error(body, 413)
    await unchanged(proxy, pid)


# ------------------------------------------------------------------------------- specs


@pytest.mark.slow
async def test_shell_metacharacters_are_never_interpreted(make_proxy: Any, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    proxy, pid = await loaded(make_proxy)
    # Quoted, they are just characters of one argument: vLLM gets them literally.
    literal = f"x; touch {marker} && echo $(id) `id` | cat > {marker}"
    status, body = await proxy.switch(f"m --served-model-name '{literal}' {FAST}")
    assert status == 200, body
    assert body["status"]["model"] == literal
    pid = body["status"]["pid"]
    # Unquoted, they are words vLLM does not understand: a failed start, reported with the log.
    for spec in (
        f"m $(touch {marker}) {FAST}",
        f"m `touch {marker}` {FAST}",
        f"m; touch {marker}",
        f"m && touch {marker}",
        f"m | tee {marker}",
        f"m > {marker}",
        f"m\n$(touch {marker})\n{FAST}",
    ):
        status, body = await proxy.switch(spec)
        assert status == 500, (spec, body)
        error = body["error"]
        assert error["type"] == "switch_failed" and error["exit_code"] == 2 and error["log_tail"], error
        assert not marker.exists(), spec
    assert not marker.exists()
    assert not list(tmp_path.glob("*pwned*"))
    # With the catalogue policy the same specs are refused before anything is touched.
    proxy, pid = await loaded(
        make_proxy, "safe", model_policy="catalog", models={"safe": {"model": "m", "args": FAST}}
    )
    for spec in (f"m $(touch {marker})", f"m; touch {marker}", f"safe; touch {marker}"):
        status, body = await proxy.switch(spec)
        assert status == 403, body
        assert_error(body, 403)
    await unchanged(proxy, pid)
    assert not marker.exists()


OWNED = [
    "--host 0.0.0.0",
    "--host=::",
    "--port 1234",
    "--port=1234",
    "--uds /tmp/aic-test.sock",
    "--uds=/tmp/x",
]


async def test_proxy_owned_flags_are_refused(make_proxy: Any) -> None:
    proxy, pid = await loaded(make_proxy)
    for flags in OWNED:
        for wait in (True, False):
            status, body = await proxy.switch(f"m2 {flags} {FAST}", wait=wait)
            assert status == 400, (flags, body)
            message = assert_error(body, 400)
            assert "owns" in message and body["error"]["param"] == "model_spec"
    await unchanged(proxy, pid)


async def test_proxy_owned_flag_abbreviated_is_refused(make_proxy: Any, tmp_path: Path) -> None:
    """argparse (and so vLLM) takes an unambiguous prefix of a long option: ``--ud PATH`` is
    ``--uds PATH``, which makes vLLM listen on a Unix socket where the proxy never finds it."""
    proxy = await make_proxy(ready_timeout=10.0)
    status, body = await proxy.switch(f"m --ud {tmp_path / 'v.sock'} {FAST}", wait=False)
    assert status == 400, body
    assert (await proxy.status())["state"] == "stopped"


# ------------------------------------------------------------------------------- query, routes


async def test_bad_query_parameters(make_proxy: Any) -> None:
    proxy, pid = await loaded(make_proxy)
    for path in ("/logs/tail", "/logs/stream"):
        for value in ("abc", "0", "-5", "100001", "1.5", "1e3", "%FF", "9" * 50):
            async with proxy.session.get(f"{proxy.url}{path}?lines={value}") as resp:
                assert resp.status == 400, (path, value)
                body = await resp.json()
                assert_error(body, 400)
                assert body["error"]["param"] == "lines"
    async with proxy.session.get(f"{proxy.url}/logs/tail?lines=3") as resp:
        assert resp.status == 200 and len((await resp.text()).splitlines()) == 3
    await unchanged(proxy, pid)


async def test_unknown_routes_and_raw_garbage(make_proxy: Any) -> None:
    proxy, pid = await loaded(make_proxy)
    # Paths the proxy does not own are vLLM's: its 404 (405 for a route of its own) comes back unchanged.
    for method, path, expected in (
        ("GET", "/no/such/route", 404),
        ("POST", "/v1/nothing", 404),
        ("DELETE", "/v1/models", 405),
    ):
        async with proxy.session.request(method, proxy.url + path) as resp:
            assert resp.status == expected, (method, path, resp.status)
    port = proxy.settings.port
    for data in (
        b"GARBAGE\r\n\r\n",
        b"GET /status HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /sta tus HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
    ):
        reply = await raw_exchange(port, data, wait=5)
        assert reply.status == 400, (data[:40], reply)
    # An absolute-form target must not make the proxy a forward proxy to another host.
    reply = await raw_exchange(
        port, b"GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n", wait=5
    )
    assert reply.status == 400, reply
    await unchanged(proxy, pid)


WRONG_METHODS = [
    ("GET", "/switch", "POST"),
    ("PUT", "/switch", "POST"),
    ("GET", "/stop", "POST"),
    ("DELETE", "/stop", "POST"),
    ("POST", "/status", "GET"),
    ("DELETE", "/status", "GET"),
    ("POST", "/logs/tail", "GET"),
    ("PUT", "/models/catalog", "GET"),
    ("POST", "/plugins", "GET"),
    ("POST", "/proxy/health", "GET"),
]


async def test_wrong_method_on_a_proxy_route_is_405(make_proxy: Any) -> None:
    """``GET /switch`` is a mistake on the proxy's own route, not a vLLM request: it must be a 405
    at once, not be forwarded to vLLM (a 404 from vLLM, a 503 when none is loaded, or a wait of
    up to --request-wait-timeout during a switch)."""
    proxy = await make_proxy()
    results = {}
    for method, path, allowed in WRONG_METHODS:
        async with proxy.session.request(method, proxy.url + path) as resp:
            results[(method, path)] = (resp.status, resp.headers.get("Allow", ""), allowed)
    assert all(status == 405 and allowed in allow for status, allow, allowed in results.values()), results


# ------------------------------------------------------------------------------- bodies


async def test_content_length_over_the_limit_is_413_at_once(make_proxy: Any) -> None:
    """Refused on the headers alone, before a byte of the body is sent, on every route."""
    limit = 64 * 1024
    proxy, pid = await loaded(make_proxy, max_body_size=limit)
    replies = {}
    for path in (CHAT, "/v1/completions", "/tokenize", "/switch", "/stop"):
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        reply = await raw_exchange(
            proxy.settings.port, f"{head}Content-Length: {10 * limit}\r\n\r\n".encode(), wait=2
        )
        replies[path] = (reply.status, round(reply.seconds, 2))
    assert all(status == 413 for status, _ in replies.values()), replies
    await unchanged(proxy, pid)


async def test_oversized_bodies_are_refused_and_never_reach_vllm(make_proxy: Any) -> None:
    limit = 64 * 1024
    proxy, pid = await loaded(make_proxy, max_body_size=limit)
    traffic = VllmTraffic(proxy)
    before = await traffic.snapshot()
    # A body that really is over the limit, on the proxy's own routes: 413.
    spec = json.dumps({"model_spec": "m2 " + "x" * 2 * limit}).encode()
    for path in ("/switch", "/stop"):
        status, body = await post_raw(proxy, path, spec)
        assert status == 413, (path, status, body)
        assert_error(body, 413)
    # Chunked, growing past the limit: 413 or the connection cut, and vLLM answers nothing.
    prompt = json.dumps({"model": "m", "prompt": "x" * (3 * limit), "max_tokens": 3}).encode()

    async def chunks() -> Any:
        for i in range(0, len(prompt), 8192):
            yield prompt[i : i + 8192]
            await asyncio.sleep(0)

    try:
        # (With its JSON content type: vLLM answers a request without one at once, before the body.)
        headers = {"Content-Type": "application/json"}
        async with proxy.session.post(proxy.url + "/v1/completions", data=chunks(), headers=headers) as resp:
            assert resp.status == 413, await resp.text()
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
        pass  # cut: as good, the client cannot mistake it for an answer
    # The proxy is done with it: a request it had forwarded would count until vLLM answered.
    await wait_status(proxy, lambda status: status["in_flight"] == 0)
    after = await traffic.snapshot()
    assert after == before, (before, after)
    # Just under the limit is fine.
    ok = json.dumps({"model": "m", "prompt": "x" * (limit - 200), "max_tokens": 3}).encode()
    assert len(ok) <= limit
    status, body = await post_raw(proxy, "/v1/completions", ok)
    assert status == 200, body
    await unchanged(proxy, pid)


async def test_header_limits(make_proxy: Any) -> None:
    proxy, pid = await loaded(make_proxy)
    port = proxy.settings.port
    huge_value = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    many = (
        b"GET /status HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n"
    )
    long_line = b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    for data in (huge_value, many, long_line):
        reply = await raw_exchange(port, data, wait=10)
        assert reply.status == 400, (data[:30], reply)  # aiohttp's limits answer 400, not 431
    await unchanged(proxy, pid)


# ------------------------------------------------------------------------------- slow clients


async def test_slow_bodies_get_408_and_change_nothing(make_proxy: Any) -> None:
    proxy, pid = await loaded(make_proxy, client_timeout=1.0)
    traffic = VllmTraffic(proxy)
    before = await traffic.snapshot()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    framings = {
        "small, read whole": ("Content-Length: 500\r\n\r\n", PART),
        "large, streamed upstream": ("Content-Length: 5000000\r\n\r\n", PART),
        "chunked": ("Transfer-Encoding: chunked\r\n\r\n", b"%x\r\n%s\r\n" % (len(PART), PART)),
    }
    replies = await asyncio.gather(
        *(
            raw_exchange(proxy.settings.port, (head + f).encode() + part, wait=10)
            for f, part in framings.values()
        )
    )
    for name, reply in zip(framings, replies, strict=True):
        assert reply.seconds < 8, (name, reply)
        assert reply.status == 408 or (reply.closed and not reply.data), (name, reply)
        if reply.status == 408:
            assert "client-timeout" in reply.data.decode(errors="replace")
    assert await traffic.snapshot() == before
    await unchanged(proxy, pid)


async def test_slow_bodies_on_control_routes_are_timed_out_too(make_proxy: Any) -> None:
    proxy, pid = await loaded(make_proxy, client_timeout=1.0)
    paths = ("/switch", "/stop")
    head = "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    replies = await asyncio.gather(
        *(raw_exchange(proxy.settings.port, head.format(p).encode() + b'{"model_sp', wait=3) for p in paths)
    )
    for path, reply in zip(paths, replies, strict=True):
        assert reply.status == 408 or reply.closed, (path, reply)
    await unchanged(proxy, pid)


def test_slow_request_headers_are_timed_out(spawn_proxy: Any) -> None:
    """A client that opens a connection and never finishes its headers (slowloris) must not hold
    the connection for longer than about --client-timeout."""
    proxy = spawn_proxy("--client-timeout", "1")
    port = int(proxy.url.rsplit(":", 1)[1])
    reply = asyncio.run(raw_exchange(port, b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: ", wait=4))
    assert reply.closed, reply


async def test_clients_that_keep_going_are_not_cut(make_proxy: Any) -> None:
    """client_timeout bounds pauses while a body is sent, never a long generation."""
    proxy, pid = await loaded(make_proxy, f"m --sim-token-delay 0.1 {FAST}", client_timeout=1.0)
    # A stream and a non-streamed generation of ~2 s each, past the 1 s client timeout, and a
    # body trickling in with pauses shorter than the timeout (~2.4 s in all).
    payload = {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 20}
    body = json.dumps({**payload, "max_tokens": 2}).encode()
    step = len(body) // 8 + 1

    async def trickle() -> Any:
        for i in range(0, len(body), step):
            yield body[i : i + step]
            await asyncio.sleep(0.3)

    async def stream() -> list[str]:
        async with proxy.session.post(proxy.url + CHAT, json={**payload, "stream": True}) as resp:
            assert resp.status == 200
            return sse_data(await resp.read())

    async def plain() -> dict[str, Any]:
        async with proxy.session.post(proxy.url + CHAT, json=payload) as resp:
            assert resp.status == 200
            result: dict[str, Any] = await resp.json()
            return result

    async def trickled() -> int:
        headers = {"Content-Type": "application/json"}
        async with proxy.session.post(proxy.url + CHAT, data=trickle(), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return resp.status

    started = time.monotonic()
    events, completion, _ = await asyncio.gather(stream(), plain(), trickled())
    assert events[-1] == "[DONE]" and len(events) == 22, events[-3:]  # role, 20 tokens, [DONE]
    assert completion["usage"]["completion_tokens"] == 20
    assert time.monotonic() - started > 1.9
    await unchanged(proxy, pid)
