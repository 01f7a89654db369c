"""Every proxied request has an id (issue 15): ``X-Request-Id``, kept when the client sent a sane
one (1 to 128 characters of visible ASCII, sent once), else made by the proxy. vLLM gets it in
its request head, the client in the answer's head (vLLM's own ``X-Request-Id`` is replaced), the
same bytes on both HTTP paths (the front door, and aiohttp alone with ``--access-log``); the
proxy's own error answers carry it too; the daemon's log lines about the request name it, and
``--log-format json`` writes them as JSON objects (``request_id``, ``model``).

Real proxies over real sockets: in this process in front of an upstream that echoes the head it
got (``helpers.ECHO``) or the simulator, and the daemon as a child process for the JSON lines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
from typing import Any

import httpx
import pytest
from helpers import CHAT, ECHO, FAST, chat_request, sse_data, wait_until
from test_faults import read_stream
from test_parity import exchange, head

from aic_vllm_proxy.web.logs_format import JsonFormatter

PATHS = ("front", "aiohttp")
MADE = re.compile(r"[0-9a-f]{32}")  # an id the proxy made
ECHO_GET = b"GET /v1/echo HTTP/1.1"


async def echo_proxy(make_proxy: Any, path: str, **settings: Any) -> Any:
    """A proxy on one path in front of the echo upstream, ready."""
    proxy = await make_proxy(access_log=path == "aiohttp", vllm_command=ECHO, **settings)
    status, body = await proxy.switch("echo")
    assert status == 200, body
    assert (proxy.front is None) == (path == "aiohttp")
    return proxy


def served_by_front(proxy: Any) -> int:
    return proxy.front.served if proxy.front is not None else 0


def ids_vllm_got(echoed: dict[str, Any]) -> list[str]:
    return [value for name, value in echoed["headers"] if name.lower() == "x-request-id"]


@pytest.mark.parametrize("path", PATHS)
async def test_a_request_without_an_id_gets_a_new_one_which_vllm_gets_too(make_proxy: Any, path: str) -> None:
    proxy = await echo_proxy(make_proxy, path)
    served = served_by_front(proxy)
    made = set()
    for _ in range(3):
        line, headers, echoed = await exchange(proxy.settings.port, [head(ECHO_GET, key=None)])
        assert line.split()[1] == b"200", (line, echoed)
        rid = headers.get("x-request-id", "")
        assert MADE.fullmatch(rid), headers
        assert ids_vllm_got(echoed) == [rid]
        made.add(rid)
    assert len(made) == 3  # one per request
    if proxy.front is not None:
        assert proxy.front.served == served + 3  # the front door served them itself


#: Ids a client may send, kept as they are: visible ASCII, up to 128 characters.
KEPT = [b"req-42", b"A1.b2_c3:d4/e5~f6!", b"x" * 128, b"  padded\t"]


async def test_the_clients_id_is_kept_and_passed_to_vllm_the_same_on_both_paths(make_proxy: Any) -> None:
    answers: dict[str, list[Any]] = {}
    for path in PATHS:
        proxy = await echo_proxy(make_proxy, path)
        served = served_by_front(proxy)
        answers[path] = []
        for sent in KEPT:
            data = head(ECHO_GET, b"X-Request-Id: " + sent, key=None)
            line, headers, echoed = await exchange(proxy.settings.port, [data])
            assert line.split()[1] == b"200", (path, line, echoed)
            kept = sent.strip().decode()
            assert headers["x-request-id"] == kept, (path, sent, headers)
            assert ids_vllm_got(echoed) == [kept], (path, echoed["headers"])
            answers[path].append(headers["x-request-id"])
        if proxy.front is not None:
            assert proxy.front.served == served + len(KEPT)
        # vLLM's own X-Request-Id (--enable-request-id-headers) is replaced: the client gets one.
        async with proxy.session.get(
            proxy.url + "/v1/echo?request_id=vllm-made", headers={"X-Request-Id": "mine"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers.getall("X-Request-Id") == ["mine"], (path, resp.headers)
    assert answers["front"] == answers["aiohttp"]


#: Ids never kept (nor logged, nor sent on): each request gets a new one.
HOSTILE: list[tuple[str, list[bytes]]] = [
    ("too long", [b"X-Request-Id: " + b"x" * 129]),
    ("a tab inside", [b"X-Request-Id: a\tb"]),
    ("a space inside", [b"X-Request-Id: a b"]),
    ("not ASCII", [b"X-Request-Id: caf\xe9"]),
    ("empty", [b"X-Request-Id:"]),
    ("two of them", [b"X-Request-Id: one", b"x-request-id: two"]),
]


@pytest.mark.parametrize("path", PATHS)
async def test_a_hostile_id_is_replaced(make_proxy: Any, path: str) -> None:
    proxy = await echo_proxy(make_proxy, path)
    served = served_by_front(proxy)
    for name, lines in HOSTILE:
        line, headers, echoed = await exchange(proxy.settings.port, [head(ECHO_GET, *lines, key=None)])
        assert line.split()[1] == b"200", (name, line, echoed)
        rid = headers.get("x-request-id", "")
        assert MADE.fullmatch(rid), (name, headers)
        assert ids_vllm_got(echoed) == [rid], (name, echoed["headers"])  # the client's did not pass
    if proxy.front is not None:
        assert proxy.front.served == served + len(HOSTILE)
    # A control character: aiohttp refuses the head (the front door hands it off); never echoed.
    line, headers, _ = await exchange(
        proxy.settings.port, [head(ECHO_GET, b"X-Request-Id: a\x01b", key=None)]
    )
    assert "a\x01b" not in headers.get("x-request-id", ""), (line, headers)


# ------------------------------------------------------------------ the proxy's own answers


@pytest.mark.parametrize("path", PATHS)
async def test_the_proxys_own_error_answers_carry_the_id(make_proxy: Any, path: str) -> None:
    """503 (nothing loaded), 413 (a body over --max-body-size), 404 (a model nobody knows),
    408 (a body that stopped coming): the client's id, or a new one."""
    proxy = await make_proxy(
        access_log=path == "aiohttp",
        max_body_size=300,
        client_timeout=1.0,
        request_wait_timeout=0.5,
        models={"a": {"model": "m", "args": FAST}},
    )
    port = proxy.settings.port
    models = head(b"GET /v1/models/x HTTP/1.1", key=None)
    line, headers, body = await exchange(port, [models])
    assert line.split()[1] == b"503", (line, body)
    assert MADE.fullmatch(headers.get("x-request-id", "")), headers
    line, headers, body = await exchange(
        port, [head(b"GET /v1/models/x HTTP/1.1", b"X-Request-Id: r-503", key=None)]
    )
    assert line.split()[1] == b"503" and headers["x-request-id"] == "r-503", (line, headers, body)

    too_big = head(b"POST /v1/completions HTTP/1.1", b"X-Request-Id: r-413", key=None, body=b"x" * 301)
    line, headers, body = await exchange(port, [too_big])
    assert line.split()[1] == b"413" and headers["x-request-id"] == "r-413", (line, headers, body)

    # "a" loaded: from now on the front door serves requests (some model is ready).
    async with proxy.session.post(proxy.url + "/load", json={"model": "a"}) as resp:
        assert resp.status == 200, await resp.text()
    served = served_by_front(proxy)
    unknown = json.dumps(chat_request("nobody-knows-me", stream=False)).encode()
    request = head(b"POST /v1/chat/completions HTTP/1.1", b"X-Request-Id: r-404", key=None, body=unknown)
    line, headers, body = await exchange(port, [request])
    assert line.split()[1] == b"404" and body["error"]["code"] == "model_not_found", (line, body)
    assert headers["x-request-id"] == "r-404", headers

    # A body that stops coming: 408 after --client-timeout, on the front door too.
    stalled = head(b"POST /v1/completions HTTP/1.1", b"X-Request-Id: r-408", key=None, body=b"x" * 10)
    line, headers, body = await exchange(port, [stalled[:-8]])
    assert line.split()[1] == b"408" and headers["x-request-id"] == "r-408", (line, headers, body)
    if proxy.front is not None:
        assert proxy.front.served == served + 2  # the 404 and the 408 were the front door's


@pytest.mark.parametrize("path", PATHS)
async def test_401_403_and_the_proxys_own_routes_carry_the_id(make_proxy: Any, path: str) -> None:
    """A missing key (401), a user key on an admin route (403), and the proxy's own routes
    (/status, /load): the client's id, or a new one; the same on both paths."""
    proxy = await make_proxy(
        access_log=path == "aiohttp",
        admin_keys=("adm",),
        api_keys=("usr",),
        models={"a": {"model": "m", "args": FAST}},
    )
    port = proxy.settings.port
    line, headers, body = await exchange(
        port, [head(b"GET /v1/models HTTP/1.1", b"X-Request-Id: r-401", key=None)]
    )
    assert line.split()[1] == b"401" and headers["x-request-id"] == "r-401", (line, headers, body)
    line, headers, body = await exchange(port, [head(b"GET /status HTTP/1.1", key=b"wrong")])
    assert line.split()[1] == b"401" and MADE.fullmatch(headers.get("x-request-id", "")), (line, headers)
    line, headers, body = await exchange(
        port, [head(b"GET /plugins HTTP/1.1", b"X-Request-Id: r-403", key=b"usr")]
    )
    assert line.split()[1] == b"403" and headers["x-request-id"] == "r-403", (line, headers, body)
    line, headers, body = await exchange(
        port, [head(b"GET /status HTTP/1.1", b"X-Request-Id: r-200", key=b"usr")]
    )
    assert line.split()[1] == b"200" and headers["x-request-id"] == "r-200", (line, headers)
    load = json.dumps({"model": "a"}).encode()
    request = head(
        b"POST /load HTTP/1.1",
        b"X-Request-Id: r-load",
        b"Content-Type: application/json",
        key=b"adm",
        body=load,
    )
    line, headers, body = await exchange(port, [request])
    assert line.split()[1] == b"200" and headers["x-request-id"] == "r-load", (line, body)
    proxy.groups.add(body["instance"]["pid"])


# ------------------------------------------------------------------------------------ logs


@pytest.mark.parametrize("path", PATHS)
async def test_the_relays_log_line_names_the_request(
    make_proxy: Any, vllm_groups: set[int], path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """vLLM breaking off mid-answer is logged with the request's id (and model), on both paths."""
    proxy = await make_proxy(access_log=path == "aiohttp")
    status, body = await proxy.switch(f"m --sim-token-delay 0.05 {FAST}")
    assert status == 200, body
    caplog.set_level(logging.WARNING, logger="aic_vllm_proxy.relay")
    resp = await proxy.session.post(
        proxy.url + CHAT,
        json=chat_request("m", stream=True, max_tokens=200),
        headers={"X-Request-Id": "broken-1"},
    )
    assert resp.status == 200 and resp.headers["X-Request-Id"] == "broken-1"
    assert (await asyncio.wait_for(resp.content.readany(), 10)).startswith(b"data:")
    os.killpg(body["status"]["pid"], signal.SIGKILL)
    raw, _ = await asyncio.wait_for(read_stream(resp), 15)
    resp.release()
    assert any("vLLM stopped in the middle" in event for event in sse_data(raw))
    records = [r for r in caplog.records if "vLLM stopped in the middle" in r.getMessage()]
    assert records, caplog.text
    record = records[-1]
    assert getattr(record, "request_id", None) == "broken-1" and "broken-1" in record.getMessage()
    assert getattr(record, "model", None) == "m"
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "broken-1" and line["model"] == "m" and line["level"] == "WARNING"


def test_json_log_lines(spawn_proxy: Any, vllm_groups: set[int]) -> None:
    """``--log-format json``: every line the daemon writes is one JSON object with time (UTC),
    level, logger and event; the access log's line (``--access-log``) carries the request's id."""
    proxy = spawn_proxy("--log-format", "json", "--access-log")
    response = httpx.post(proxy.url + "/switch", json={"model_spec": f"m {FAST}"}, timeout=60)
    assert response.status_code == 200, response.text
    vllm_groups.add(response.json()["status"]["pid"])
    sent = httpx.post(
        proxy.url + CHAT, json=chat_request("m", stream=False), headers={"X-Request-Id": "json-1"}, timeout=30
    )
    made = httpx.post(proxy.url + CHAT, json=chat_request("m", stream=False), timeout=30)
    assert sent.status_code == made.status_code == 200
    assert sent.headers["X-Request-Id"] == "json-1" and MADE.fullmatch(made.headers["X-Request-Id"])

    def lines() -> list[dict[str, Any]]:
        return [json.loads(text) for text in proxy.read_output().splitlines() if text.strip()]

    def access(rid: str) -> dict[str, Any] | None:
        found = [line for line in lines() if line.get("request_id") == rid]
        return found[0] if found else None

    assert wait_until(lambda: access("json-1") and access(made.headers["X-Request-Id"]), 20), (
        proxy.read_output()
    )
    line = access("json-1")
    assert line is not None
    assert line["logger"] == "aiohttp.access" and line["level"] == "INFO", line
    assert f"POST {CHAT} HTTP/1.1" in line["event"] and " 200 " in line["event"], line
    assert line["event"].endswith(" json-1"), line  # the text line has it too
    assert line["time"].endswith("+00:00"), line
    for every in lines():
        assert {"time", "level", "logger", "event"} <= set(every), every
