"""The front door (front.py): which requests it serves itself, which it hands to aiohttp on the
same connection, and that both give the same answers. Real proxy, real simulator, raw sockets
where the exact bytes matter."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest
from aiohttp import web
from helpers import ECHO, FAST, sse_data

from aic_vllm_proxy.relay.front import parse_request_head
from aic_vllm_proxy.relay.headers import request_head
from aic_vllm_proxy.relay.request import RelayRequest
from aic_vllm_proxy.web import control

CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}'
STREAM = b'{"model": "m", "prompt": "hi", "max_tokens": 5, "stream": true}'


async def loaded(make_proxy: Any, **settings: Any) -> Any:
    proxy = await make_proxy(**settings)
    status, body = await proxy.switch(f"m {FAST}")
    assert status == 200, body
    assert proxy.front is not None
    return proxy


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        "Host: x",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join([*head, *extra]) + "\r\n\r\n").encode() + body


def get(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *extra]) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked), de-framed."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        body = b"".join(parts)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def connect(proxy: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.settings.port)


async def test_api_requests_take_the_front_door_on_one_connection(make_proxy: Any) -> None:
    proxy = await loaded(make_proxy)
    front = proxy.front
    reader, writer = await connect(proxy)
    before = (front.served, front.handed_off)
    for _ in range(3):
        writer.write(post("/v1/chat/completions", CHAT))
        status, headers, body = await read_response(reader)
        assert status == 200 and json.loads(body)["choices"], body
        assert headers["content-type"].startswith("application/json")
        assert "connection" not in headers and "keep-alive" not in headers
    writer.write(post("/v1/completions", STREAM))
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_data(body)
    assert events[-1] == "[DONE]" and len(events) == 6, events
    writer.write(get("/v1/models"))
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["data"][0]["id"] == "m"
    assert (front.served - before[0], front.handed_off - before[1]) == (5, 0)
    writer.close()


async def test_a_control_path_hands_the_connection_to_aiohttp(make_proxy: Any) -> None:
    """After a proxied request, /status on the same connection is aiohttp's; so is the rest of
    that connection, which still proxies correctly."""
    proxy = await loaded(make_proxy)
    front = proxy.front
    reader, writer = await connect(proxy)
    writer.write(post("/v1/chat/completions", CHAT))
    assert (await read_response(reader))[0] == 200
    handed = front.handed_off
    writer.write(get("/status"))
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["state"] == "ready"
    assert front.handed_off == handed + 1
    served = front.served
    writer.write(post("/v1/chat/completions", CHAT))
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["choices"]
    assert front.served == served  # aiohttp's now
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (get("/st%61tus"), 200),  # percent-encoded: aiohttp decodes paths, so the proxy's /status
        (get("/v1/../status"), 404),  # dot segments: not the proxy's /status; vLLM has no such route
        (get("/logs/whatever"), 404),  # the admin prefix, no route of the proxy's: vLLM's 404
        (b"GET /v1/models HTTP/1.0\r\nHost: x\r\n\r\n", 200),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(CHAT) + CHAT + b"\r\n0\r\n\r\n",
            200,
        ),
        (post("/v1/chat/completions", CHAT, "Expect: 100-continue"), 200),
        (post("/v1/chat/completions", CHAT, "Content-Length: 5"), 400),  # two lengths: aiohttp says 400
    ],
    ids=["percent", "dots", "logs", "http10", "chunked-upload", "expect", "two-lengths"],
)
async def test_what_the_front_door_does_not_take_goes_to_aiohttp(
    make_proxy: Any, request_bytes: bytes, expected: int
) -> None:
    proxy = await loaded(make_proxy)
    front = proxy.front
    handed, served = front.handed_off, front.served
    reader, writer = await connect(proxy)
    writer.write(request_bytes)
    if b"Expect" in request_bytes:
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100"), interim
    status, _, body = await read_response(reader)
    writer.close()
    assert (front.handed_off, front.served) == (handed + 1, served)
    assert status == expected, body
    if expected == 200 and b"/v1/" in request_bytes:  # vLLM answered
        assert json.loads(body)["object"] == ("list" if b"/v1/models" in request_bytes else "chat.completion")
    elif expected == 200:
        assert json.loads(body)["state"] == "ready", body  # the proxy's /status
    elif expected == 404:
        assert json.loads(body) == {"detail": "Not Found"}, body  # vLLM's own 404


async def test_a_control_route_with_a_variable_is_aiohttps(
    make_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which paths are the proxy's own is decided once, from the route table: a control route
    with a variable (a test-only ``/test-only/{name}``) is handed to aiohttp, which serves it,
    not passed to vLLM by the front door (which would answer vLLM's 404)."""
    table = web.RouteTableDef()
    for route in control.routes:
        if isinstance(route, web.RouteDef):
            table.route(route.method, route.path, **route.kwargs)(route.handler)

    @table.get("/test-only/{name}")
    async def test_only(request: web.Request) -> web.Response:
        return web.json_response({"name": request.match_info["name"]})

    monkeypatch.setattr(control, "routes", table)
    proxy = await loaded(make_proxy)
    front = proxy.front
    reader, writer = await connect(proxy)
    handed, served = front.handed_off, front.served
    writer.write(get("/test-only/abc"))
    status, _, body = await read_response(reader)
    assert (status, json.loads(body)) == (200, {"name": "abc"}), body
    assert (front.handed_off, front.served) == (handed + 1, served)
    writer.close()
    # And a path the route's pattern does not match is still vLLM's, through the front door.
    reader, writer = await connect(proxy)
    writer.write(get("/test-only/abc/def"))
    status, _, body = await read_response(reader)
    assert status == 404 and json.loads(body) == {"detail": "Not Found"}, body
    assert (front.handed_off, front.served) == (handed + 1, served + 1)
    writer.close()


async def test_pipelined_requests_are_answered_in_order(make_proxy: Any) -> None:
    proxy = await loaded(make_proxy)
    reader, writer = await connect(proxy)
    writer.write(post("/v1/completions", STREAM) + get("/v1/models") + post("/v1/chat/completions", CHAT))
    first = await read_response(reader)
    second = await read_response(reader)
    third = await read_response(reader)
    assert sse_data(first[2])[-1] == "[DONE]"
    assert json.loads(second[2])["object"] == "list"
    assert json.loads(third[2])["object"] == "chat.completion"
    writer.close()


async def test_a_body_in_pieces_and_a_stalled_body(make_proxy: Any) -> None:
    proxy = await loaded(make_proxy, client_timeout=1.0)
    reader, writer = await connect(proxy)
    data = post("/v1/chat/completions", CHAT)
    writer.write(data[:-20])
    await asyncio.sleep(0.3)
    writer.write(data[-20:])
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["choices"]
    # The same connection, a body that stops arriving: 408 in the OpenAI shape, then closed.
    writer.write(data[:-20])
    start = time.monotonic()
    status, headers, body = await read_response(reader)
    assert status == 408 and 0.9 < time.monotonic() - start < 5
    error = json.loads(body)["error"]
    assert error["code"] == 408 and "client-timeout" in error["message"]
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert (await proxy.status())["in_flight"] == 0


async def test_connection_close_and_idle_keep_alive(make_proxy: Any) -> None:
    proxy = await loaded(make_proxy, client_timeout=1.0)  # keep-alive timeout min(75, 1) s
    reader, writer = await connect(proxy)
    writer.write(post("/v1/chat/completions", CHAT, "Connection: close"))
    assert (await read_response(reader))[0] == 200
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the answer
    writer.close()
    reader, writer = await connect(proxy)
    writer.write(get("/v1/models"))
    assert (await read_response(reader))[0] == 200
    start = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # idle: closed by the proxy
    assert 0.9 < time.monotonic() - start < 4
    writer.close()


async def test_keys_valid_ones_take_the_front_door(make_proxy: Any) -> None:
    proxy = await make_proxy(api_keys=("user-key",), admin_keys=("admin-key",))
    proxy.session.headers["Authorization"] = "Bearer admin-key"
    status, body = await proxy.switch(f"m {FAST}")
    assert status == 200, body
    front = proxy.front
    reader, writer = await connect(proxy)
    served = front.served
    writer.write(post("/v1/chat/completions", CHAT, "Authorization: Bearer user-key"))
    assert (await read_response(reader))[0] == 200
    assert front.served == served + 1
    writer.close()
    for auth in ("Authorization: Bearer wrong", "X-Nothing: 1"):
        reader, writer = await connect(proxy)
        writer.write(post("/v1/chat/completions", CHAT, auth))
        status, headers, body = await read_response(reader)
        assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
        assert headers["www-authenticate"].startswith("Bearer")
        writer.close()
    assert front.served == served + 1


async def test_with_no_model_requests_go_to_aiohttp_and_get_503(make_proxy: Any) -> None:
    proxy = await make_proxy(request_wait_timeout=0.2)
    reader, writer = await connect(proxy)
    writer.write(post("/v1/chat/completions", CHAT))
    status, _, body = await read_response(reader)
    assert status == 503 and json.loads(body)["error"]["type"] == "model_unavailable"
    assert proxy.front.handed_off == 1 and proxy.front.served == 0
    writer.close()


def test_parse_request_head() -> None:
    head = parse_request_head(
        b"POST /v1/x?y=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nX-Keep: 1\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: 5\r\n"
        b"Authorization: Bearer k1\r\n"
    )
    assert head is not None
    assert (head.method, head.target, head.length, head.keep_alive, head.token) == (
        b"POST",
        b"/v1/x?y=1",
        12,
        True,
        b"k1",
    )
    assert head.connection == {b"keep-alive", b"x-hop"}
    # What of it goes to vLLM is the one head builder's to say (the same on the aiohttp path).
    request = RelayRequest(head.method, head.target, head.lines, head.names, head.connection, 12, b"x" * 12)
    assert request_head(request, "vllm", {}, drop_authorization=False) == (
        b"POST /v1/x?y=1 HTTP/1.1\r\nHost: vllm\r\nX-Keep: 1\r\nAuthorization: Bearer k1\r\n"
        b"Content-Length: 12\r\n\r\n"
    )
    closing = parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n")
    assert closing is not None and not closing.keep_alive and closing.length == 0
    for refused in (
        b"GET / HTTP/1.0\r\n",
        b"GET http://a/ HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n",
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n",
        b"GET / HTTP/1.1\r\n folded\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n",
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n",
        b"GET / HTTP/1.1\nX: y\r\n",
        b"GET / HTTP/1.1\r\nX: " + b"y" * 8200 + b"\r\n",  # over aiohttp's line limit
        b"GET /" + b"y" * 8200 + b" HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 129,  # over aiohttp's field count
    ):
        assert parse_request_head(refused) is None, refused


class _Transport:
    def __init__(self) -> None:
        self.closing = False
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        self.closing = True


def _dechunk(data: bytes) -> bytes:
    out, pos = b"", 0
    while True:
        newline = data.index(b"\r\n", pos)
        size = int(data[pos:newline], 16)
        assert data[pos:newline] == b"%x" % size  # plain framing for the client
        if size == 0:
            assert data[newline:] == b"\r\n\r\n", data[newline:]
            return out
        out += data[newline + 2 : newline + 2 + size]
        assert data[newline + 2 + size : newline + 4 + size] == b"\r\n"
        pos = newline + 4 + size


@pytest.mark.parametrize("step", [1, 7, 64, 10_000])
async def test_upstream_chunks_reach_the_client_as_plain_chunks(step: int) -> None:
    """Framed relaying (front door): vLLM's plain chunks pass as they are; odd framing
    (uppercase sizes, leading zeros, extensions, trailers) is re-framed; pieces split anywhere."""
    from aic_vllm_proxy.relay.upstream import UpstreamConnection

    payloads = [b"data: one\n\n", b"x" * 300, b"data: two\n\n", b"tail", b"data: [DONE]\n\n"]
    wire = (
        b"%x\r\n%s\r\n" % (len(payloads[0]), payloads[0])
        + b"%X\r\n%s\r\n" % (len(payloads[1]), payloads[1])
        + b"0%x;ext=1\r\n%s\r\n" % (len(payloads[2]), payloads[2])
        + b"%x\r\n%s\r\n" % (len(payloads[3]), payloads[3])
        + b"%x\r\n%s\r\n" % (len(payloads[4]), payloads[4])
        + b"0\r\nX-Trailer: 1\r\n\r\n"
    )
    conn = UpstreamConnection()
    conn.transport = _Transport()  # type: ignore[assignment]
    conn.start(b"", None, no_body_expected=False, framed=True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    out: list[bytes] = []
    conn.attach(out.append)
    for pos in range(0, len(wire), step):
        conn.data_received(wire[pos : pos + step])
    assert conn.complete
    assert _dechunk(b"".join(out) + b"0\r\n\r\n") == b"".join(payloads)
    if step == 10_000:  # the plain chunks went out as they came, in one piece
        assert out[0] == wire[: wire.index(b"%X" % len(payloads[1]))]


async def test_whole_chunks_go_straight_to_the_client_transport() -> None:
    """The fast path: a read that is exactly one plain chunk is written to the client's transport
    from data_received; anything else goes through the sink, in order; nothing after the end."""
    from aic_vllm_proxy.relay.upstream import UpstreamConnection

    plain = [b"%x\r\n%s\r\n" % (len(p), p) for p in (b"data: 1\n\n", b"data: 2\n\n", b"y" * 4000)]
    odd = [b"%X\r\n%s\r\n" % (12, b"data: ODD!\n\n"), b"0b;e=1\r\ndata: ext\n\n\r\n"]
    reads = [plain[0], odd[0], plain[1], plain[1][:5], plain[1][5:], odd[1], plain[2], plain[0] + plain[1]]
    conn = UpstreamConnection()
    conn.transport = _Transport()  # type: ignore[assignment]
    conn.start(b"", None, no_body_expected=False, framed=True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    client = _Transport()
    both: list[bytes] = []  # everything, in the order the client would get it
    sunk: list[bytes] = []

    def sink(piece: bytes) -> None:
        sunk.append(piece)
        both.append(piece)

    client.write = both.append  # type: ignore[method-assign]
    conn.attach(sink, client=client)  # type: ignore[arg-type]
    for read in reads:
        conn.data_received(read)
    conn.data_received(plain[2] + b"0\r\n\r\n")  # the last token and the end in one read
    assert conn.complete and conn.sent_last_chunk
    conn.data_received(plain[0])  # after the end: ignored, not written
    expected = b"data: 1\n\ndata: ODD!\n\ndata: 2\n\ndata: 2\n\ndata: ext\n\n" + b"y" * 4000
    assert _dechunk(b"".join(both)) == expected + b"data: 1\n\ndata: 2\n\n" + b"y" * 4000
    fast = [piece for piece in both if piece not in sunk]
    assert fast == [plain[0], plain[1], plain[2]]  # whole plain chunks, one read each
    assert both[-1] == plain[2] + b"0\r\n\r\n"  # passed on in one write

    closing = UpstreamConnection()  # a client that went away: the sink path reports it
    closing.transport = _Transport()  # type: ignore[assignment]
    closing.start(b"", None, no_body_expected=False, framed=True)
    closing.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    gone = _Transport()
    gone.closing = True

    def refuse(piece: bytes) -> None:
        raise ConnectionResetError("the client went away")

    closing.attach(refuse, client=gone)  # type: ignore[arg-type]
    closing.data_received(plain[0])
    assert closing.complete and not gone.written
    with pytest.raises(ConnectionResetError):
        await closing.wait()


@pytest.mark.parametrize("gap", [0, pytest.param(0.0002, marks=pytest.mark.slow)])
async def test_a_stalled_stream_reader_pauses_vllm(make_proxy: Any, gap: float) -> None:
    """Back-pressure: a client that stops reading a stream of many chunks makes the proxy stop
    reading from vLLM (vLLM's writes then wait), so the proxy holds only socket buffers; when the
    client reads again, every event arrives, in order. With a gap between vLLM's writes each
    chunk comes in a read of its own (the fast path), without one several per read."""
    proxy = await make_proxy(vllm_command=ECHO)
    status, body = await proxy.switch("echo-model")
    assert status == 200, body
    events, size = 10_000, 4000  # 40 MB in 4 kB chunks, one write each
    reader, writer = await connect(proxy)
    writer.transport.set_write_buffer_limits(0)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    writer.write(get(f"/stream?events={events}&size={size}&gap={gap}"))

    async def progress() -> int:
        async with proxy.session.get(proxy.url + "/stream/progress") as resp:
            return int((await resp.json())["events"])

    # The client reads nothing meanwhile: vLLM's writes fill the buffers, then stop. (A pause has
    # no event of its own: wait until vLLM made no progress for half a second, within a deadline.)
    stalled, deadline = -1, time.monotonic() + 60
    while time.monotonic() < deadline:
        before = await progress()
        await asyncio.sleep(0.5)
        stalled = await progress()
        if stalled == before:
            break
    assert stalled == before < events // 2, (before, stalled)  # vLLM is held back, not drained
    status, headers, body = await asyncio.wait_for(read_response(reader), 60)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    data = sse_data(body)
    assert len(data) == events and all(d.startswith(f"{n} ") for n, d in enumerate(data))
    writer.close()
    assert await progress() == events
