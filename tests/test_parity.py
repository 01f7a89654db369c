"""The same bytes get the same answer on both HTTP paths: the front door (front.py) and aiohttp
alone (``--access-log``). What the front door takes must be a strict subset of what aiohttp reads
the same way (anything else is handed to aiohttp, which answers as it would have anyway), however
the head is split across packets; the rules both paths apply (a fragment, two Authorization
headers, --client-timeout as a pause between two pieces of a body, a 408 ending the connection)
are the same; a malformed head is one log line, not a traceback.

Real proxies (one per path, in this process) in front of the simulator, raw sockets; and, without
sockets, the front door's parser against both of aiohttp's parsers on a corpus of heads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from typing import Any
from unittest import mock

import pytest
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.http_parser import SINGLETON_HEADERS, HttpRequestParserC, HttpRequestParserPy
from helpers import ECHO, FAST, async_wait_until
from test_hostile_clients import never_reading_client

from aic_vllm_proxy.relay.auth import bearer_token
from aic_vllm_proxy.relay.flow import HIGH_WATER
from aic_vllm_proxy.relay.front import (
    _START,
    METHODS,
    AiohttpConnection,
    ClientConnection,
    FrontProtocol,
    parse_request_head,
    routed_as_is,
)
from aic_vllm_proxy.relay.headers import request_head
from aic_vllm_proxy.relay.passthrough import header_fields
from aic_vllm_proxy.relay.request import RelayRequest
from aic_vllm_proxy.relay.upstream import UpstreamConnection
from aic_vllm_proxy.web.appkeys import SUPERVISOR
from aic_vllm_proxy.web.server import MALFORMED_REQUESTS, MalformedRequests

ADMIN, USER = "admin-key", "user-key"
KEYS = {"admin_keys": (ADMIN,), "api_keys": (USER,)}
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
PATHS = ("front", "aiohttp")


def head(
    request_line: bytes = b"GET /v1/models HTTP/1.1",
    *lines: bytes,
    host: bool = True,
    key: bytes | None = USER.encode(),
    body: bytes = b"",
) -> bytes:
    """A raw request: the request line, ``Host`` and the user key unless told otherwise, the
    given header lines, a Content-Length for ``body``."""
    fields = [b"Host: x"] if host else []
    if key is not None:
        fields.append(b"Authorization: Bearer " + key)
    fields.extend(lines)
    if body:
        fields.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join([request_line, *fields]) + b"\r\n\r\n" + body


MODELS = b"GET /v1/models HTTP/1.1"
SWITCH_BODY = json.dumps({"model_spec": f"m {FAST}"}).encode()
JSON = b"Content-Type: application/json"

#: (name, request, the status aiohttp answers or None when only the sameness matters, whether
#: the front door may serve it itself)
CASES: list[tuple[str, bytes, int | None, bool]] = [
    ("plain", head(), 200, True),
    ("chat", head(b"POST /v1/chat/completions HTTP/1.1", JSON, body=CHAT), 200, True),
    ("connection-close", head(MODELS, b"Connection: close"), 200, True),
    ("status", head(b"GET /status HTTP/1.1"), 200, False),
    ("wrong-key", head(key=b"nope"), 401, False),
    ("non-utf8-key", head(key=b"\xff"), 401, False),
    # Item 5: heads aiohttp refuses.
    ("lower-case-method", head(b"get /v1/models HTTP/1.1"), 400, False),
    ("punctuation-method", head(b"!!! /v1/models HTTP/1.1"), 400, False),
    ("38-letter-method", head(b"A" * 38 + b" /v1/models HTTP/1.1"), 400, False),
    ("raw-0xff-in-target", head(b"GET /v1/models\xff HTTP/1.1"), 400, False),
    ("raw-0x80-in-query", head(b"GET /v1/models?q=\x80 HTTP/1.1"), 400, False),
    ("no-host", head(host=False), 400, False),
    ("two-hosts", head(MODELS, b"Host: y"), 400, False),
    ("two-content-types", head(MODELS, b"Content-Type: a", b"Content-Type: b"), 400, False),
    ("connect", head(b"CONNECT /v1/models HTTP/1.1"), None, False),
    ("connect-authority", head(b"CONNECT x:80 HTTP/1.1"), None, False),
    ("long-header-name", head(MODELS, b"X" * 8187 + b": v"), 400, False),
    (
        "content-length-5000-digits",
        head(b"POST /v1/models HTTP/1.1", b"Content-Length: " + b"9" * 5000),
        None,
        False,
    ),
    ("proxy-connection-close", head(MODELS, b"Proxy-Connection: close"), 200, False),
    ("sec-websocket-key1", head(MODELS, b"Sec-WebSocket-Key1: x"), 400, False),
    # Item 6: a fragment is refused on both paths.
    ("fragment-switch", head(b"POST /switch#x HTTP/1.1", key=ADMIN.encode(), body=SWITCH_BODY), 400, False),
    ("fragment-status", head(b"GET /status#x HTTP/1.1"), 400, False),
    ("fragment-api", head(b"GET /v1/models?a=1#x HTTP/1.1"), 400, False),
    # Item 7: two Authorization headers are refused on both paths.
    ("junk-then-key", head(MODELS, b"Authorization: Bearer " + USER.encode(), key=b"junk"), 400, False),
    ("key-then-junk", head(MODELS, b"Authorization: junk"), 400, False),
]


async def loaded(make_proxy: Any, path: str, **settings: Any) -> Any:
    """A proxy on one path (behind the front door, or aiohttp alone) with a model ready."""
    proxy = await make_proxy(access_log=path == "aiohttp", **settings)
    if "admin_keys" in settings:
        proxy.session.headers["Authorization"] = f"Bearer {ADMIN}"
    status, body = await proxy.switch(f"m {FAST}")
    assert status == 200, body
    assert (proxy.front is None) == (path == "aiohttp")
    return proxy


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], Any]:
    """One answer (with a Content-Length, as all of these have): its status line, headers (lower
    case) and body (decoded when it is JSON)."""
    block = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    line, *lines = block[:-4].split(b"\r\n")
    headers = {}
    for field in lines:
        name, _, value = field.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body: Any = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    if headers.get("content-type", "").startswith("application/json"):
        body = json.loads(body)
    return line, headers, body


async def exchange(port: int, pieces: list[bytes], gap: float = 0.05) -> tuple[bytes, dict[str, str], Any]:
    """Send ``pieces`` on a fresh connection, ``gap`` seconds apart (so that the server most
    likely reads them separately; nothing here relies on it), and read one answer. A server
    that answers (and closes) before all the pieces went gets no more of them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.ensure_future(read_answer(reader))
    try:
        for n, piece in enumerate(pieces):
            if n and (await asyncio.wait({answer}, timeout=gap))[0]:
                break  # answered on what came so far
            writer.write(piece)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        return await answer
    finally:
        answer.cancel()
        writer.close()


def splits(data: bytes) -> list[list[bytes]]:
    """The request whole, and split across packets: after 2 bytes (a method in the making), and
    inside the last header line."""
    end = data.index(b"\r\n\r\n")
    return [[data], [data[:2], data[2:end], data[end:]], [data[: end - 3], data[end - 3 :]]]


@pytest.mark.slow
async def test_the_same_bytes_get_the_same_answer_on_both_paths(make_proxy: Any) -> None:
    """Every case of items 5-7, whole and split across packets: the same status line (and the
    same ``Connection: close``) from the front door and from aiohttp alone; what aiohttp
    refuses, the front door never forwards."""
    proxies = {path: await loaded(make_proxy, path, **KEYS) for path in PATHS}
    front = proxies["front"].front
    different: list[Any] = []
    for name, data, expected, served_by_front in CASES:
        for pieces in splits(data):
            served = front.served
            answers = {}
            for path, proxy in proxies.items():
                line, headers, body = await exchange(proxy.settings.port, pieces)
                answers[path] = (line, headers.get("connection"))
                if expected is not None and int(line.split()[1]) != expected:
                    different.append((name, len(pieces), path, "expected", expected, line, body))
            if answers["front"] != answers["aiohttp"]:
                different.append((name, len(pieces), answers))
            if (front.served > served) != served_by_front:
                different.append((name, len(pieces), "served by the front door", front.served - served))
    assert not different, different
    # The 400s of the application (a fragment, two keys) are OpenAI-shaped, the same on both.
    for proxy in proxies.values():
        for name in ("fragment-status", "junk-then-key"):
            data = next(case[1] for case in CASES if case[0] == name)
            _, _, body = await exchange(proxy.settings.port, [data])
            assert body["error"]["code"] == 400 and body["error"]["type"] == "invalid_request_error", body
    # Nothing of it changed the model.
    for proxy in proxies.values():
        assert (await proxy.status())["state"] == "ready"


# ------------------------------------------------------------------------ the parsers, no sockets


def _variants() -> list[bytes]:
    """Request heads (up to the blank line) around every rule of parse_request_head."""
    ok = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
    heads = [ok, b"POST /v1/chat/completions?a=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n"]
    methods = [*METHODS, b"get", b"Get", b"post", b"CONNECT", b"TRACE", b"QUERY", b"PRI", b"SEARCH", b"!!!"]
    heads += [m + b" /v1/x HTTP/1.1\r\nHost: x\r\n" for m in [*methods, b"A" * 38, b"G ET", b""]]
    targets = [b"/", b"/v1/x?y=1", b"/a#b", b"/a?b#c", b"*", b"http://h/x", b"//x", b"/%7e", b"/a b", b"/./x"]
    targets += [b"/v1/a%sb" % bytes([c]) for c in range(256)] + [
        b"/v?q=%s" % bytes([c]) for c in range(128, 256, 9)
    ]
    heads += [b"GET " + t + b" HTTP/1.1\r\nHost: x\r\n" for t in targets]
    heads += [
        b"GET / " + v + b"\r\nHost: x\r\n" for v in (b"HTTP/1.0", b"http/1.1", b"HTTP/2.0", b"HTTP/1.1 ")
    ]
    heads += [
        b"GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nHost: x\r\n",
        b"GET / HTTP/1.1\r\nHost:\r\n",
    ]
    heads += [ok + b"X%sY: v\r\n" % bytes([c]) for c in range(256) if c not in b"\r\n"]
    heads += [ok + b"X: a%sb\r\n" % bytes([c]) for c in range(256) if c not in b"\r\n"]
    for name in sorted(SINGLETON_HEADERS):
        heads += [ok + b"%s: 1\r\n%s: 1\r\n" % (name.encode(), name.upper().encode())]
    for size in range(8180, 8193):  # aiohttp's C parser counts the previous header's name too
        heads += [ok + b"X" * size + b": v\r\n", ok + b"N: " + b"v" * size + b"\r\n"]
        heads += [b"GET / HTTP/1.1\r\n" + b"X" * size + b": v\r\nHost: x\r\n"]
        heads += [b"GET / HTTP/1.1\r\n" + b"X" * (size - 30) + b": v\r\n" + b"Y" * 30 + b": w\r\nHost: x\r\n"]
    heads += [ok + b"".join(b"X-%d: v\r\n" % n for n in range(count)) for count in (124, 125, 126, 127)]
    connection = [
        b"close",
        b"CLOSE",
        b"close\t",
        b",close",
        b"keep-alive close",
        b"x close",
        b"close x",
        b"close,",
    ]
    connection += [
        b" close , x",
        b"closed",
        b"keep-alive",
        b"upgrade",
        b"x,\tclose",
        b"close;x",
        b"X-Hop, close",
    ]
    connection += [b"\xe2\x84\xaa-hop", b"close\x80"]
    heads += [ok + b"Connection: " + c + b"\r\nX-Hop: 1\r\nk: 2\r\n" for c in connection]
    lengths = [b"0", b"007", b"1 2", b"-1", b"+1", b"1e3", b"9" * 19, b" 5 ", b"5\t", b"", b"\xd9\xa1"]
    heads += [ok + b"Content-Length: " + n + b"\r\n" for n in lengths]
    heads += [ok + b"Content-Length: 1\r\nContent-Length: 1\r\n"]
    auth = [b"Bearer k", b"bearer  k ", b"Bearer\tk", b"Basic k", b"Bearer", b"Bearer \xff", b"Bearer k k"]
    heads += [ok + b"Authorization: " + a + b"\r\n" for a in auth]
    heads += [ok + b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n"]
    special = [b"Proxy-Connection: close", b"Upgrade: websocket", b"TE: trailers", b"Expect: 100-continue"]
    special += [
        b"Transfer-Encoding: chunked",
        b"Sec-WebSocket-Key1: x",
        b"Keep-Alive: 5",
        b"Content-Encoding: gzip",
    ]
    heads += [ok + s + b"\r\n" for s in special]
    heads += [
        b"GET / HTTP/1.1\nHost: x\n",
        b"GET / HTTP/1.1\r\nHost: x\n",
        ok + b" folded\r\n",
        ok + b"X : v\r\n",
    ]
    heads += [b"\r\n" + ok, ok + b":v\r\n", ok + b"X:v\r\n", ok + b"X:  v \t\r\n"]
    return heads


def _aiohttp_reads(parser_class: Any, data: list[bytes]) -> Any:
    """What one of aiohttp's request parsers makes of the pieces: the message, or the error."""
    loop = asyncio.new_event_loop()
    try:
        parser = parser_class(
            mock.Mock(), loop, 2**16, max_line_size=8190, max_field_size=8190, max_headers=128
        )
        messages: list[Any] = []
        for piece in data:
            messages += parser.feed_data(piece)[0]
        return messages[0][0] if messages else None
    except HttpProcessingError as exc:
        return exc
    finally:
        loop.close()


def _fields(upstream: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of a head for vLLM (names in lower case, values without the spaces
    around them)."""
    fields = []
    for line in upstream.split(b"\r\n")[1:-2]:
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(b" \t")))
    return fields


def _split_points(data: bytes) -> list[int]:
    if len(data) < 400:
        return list(range(1, len(data)))
    marks = [i for i, c in enumerate(data) if c in b":\r"]
    return sorted(
        {p for m in marks for p in range(m - 3, m + 4) if 0 < p < len(data)} | set(range(1, len(data), 997))
    )


@pytest.mark.slow
def test_the_front_door_takes_only_what_aiohttp_reads_the_same_way() -> None:
    """For every head the front door takes, both of aiohttp's parsers (llhttp in C, and the
    pure Python one) accept it, however it is split, and read the same method, target, routing
    path, keep-alive, key and forwarded headers. And a head split anywhere is handed off early
    (on its first line so far) only when the whole head would be handed off too."""
    taken = 0
    for block in _variants():
        data = block + b"\r\n"
        front = parse_request_head(block)
        first_line = block[: block.find(b"\r\n") + 2] if b"\r\n" in block else block
        for end in range(1, len(first_line) + 1):
            if not _START.match(first_line[:end]):
                assert front is None, (block[:80], first_line[:end])  # split there: handed off
                break
        if front is None:
            continue
        taken += 1
        for parser_class in (HttpRequestParserC, HttpRequestParserPy):
            for pieces in [[data]] + [[data[:p], data[p:]] for p in _split_points(data)]:
                message = _aiohttp_reads(parser_class, pieces)
                assert not isinstance(message, Exception) and message is not None, (block[:80], message)
            assert message.method.encode() == front.method, block[:80]
            assert message.path.encode("utf-8", "surrogateescape") == front.target
            path = front.target.partition(b"?")[0]
            assert message.url.path.encode() == path or not routed_as_is(path), block[:80]
            assert message.should_close == (not front.keep_alive), block[:80]
            values = [v for n, v in message.raw_headers if n.lower() == b"authorization"]
            assert bearer_token(values[0] if values else None) == front.token
            length = front.length or None
            lines, names, connection = header_fields(message.raw_headers, message.headers)
            target = message.path.encode("utf-8", "surrogateescape")
            theirs_request = RelayRequest(message.method.encode(), target, lines, names, connection, length)
            theirs = request_head(theirs_request, "vllm", {}, drop_authorization=False)
            ours_request = RelayRequest(
                front.method, front.target, front.lines, front.names, front.connection, length
            )
            ours = request_head(ours_request, "vllm", {}, drop_authorization=False)
            assert _fields(ours) == _fields(theirs), block[:80]
    assert taken > 100, taken  # the corpus does reach the front door's rules


def test_the_issues_heads_are_not_taken() -> None:
    ok = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
    assert parse_request_head(ok) is not None
    for block in (
        b"post /v1/x HTTP/1.1\r\nHost: x\r\n",
        b"!!! /v1/x HTTP/1.1\r\nHost: x\r\n",
        b"A" * 38 + b" /v1/x HTTP/1.1\r\nHost: x\r\n",
        b"GET /v1/\x80 HTTP/1.1\r\nHost: x\r\n",
        b"GET /v1/x HTTP/1.1\r\n",
        ok + b"Host: y\r\n",
        b"CONNECT /v1/x HTTP/1.1\r\nHost: x\r\n",
        ok + b"X" * 8187 + b": v\r\n",
        b"POST /switch#x HTTP/1.1\r\nHost: x\r\n",
        ok + b"Authorization: junk\r\nAuthorization: Bearer k\r\n",
        ok + b"Content-Length: " + b"9" * 5000 + b"\r\n",
    ):
        assert parse_request_head(block) is None, block[:60]
    assert not _START.match(b"po")  # a lower-case method in the making is handed off at once


# ------------------------------------------------------------------------------ --client-timeout


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
async def test_client_timeout_is_the_pause_between_two_pieces(make_proxy: Any, path: str) -> None:
    """A body trickled at one byte per 0.3 s (3 s in all) with --client-timeout 1 is served; a
    pause of more than 1 s gets 408 with Connection: close, and the connection ends at once (not
    after aiohttp's 10 s of lingering)."""
    proxy = await loaded(make_proxy, path, client_timeout=1.0)
    port = proxy.settings.port
    data = head(b"POST /v1/chat/completions HTTP/1.1", JSON, key=None, body=CHAT)
    served = proxy.front.served if proxy.front else 0
    line, _, body = await exchange(port, [data[:-10], *(bytes([c]) for c in data[-10:])], gap=0.3)
    assert line.split()[1] == b"200", (line, body)
    assert body["choices"], body
    if proxy.front is not None:
        assert proxy.front.served == served + 1  # the front door read that body itself
    switch = head(b"POST /switch HTTP/1.1", key=None, body=SWITCH_BODY)  # a control route too
    line, _, body = await exchange(port, [switch[:-10], *(bytes([c]) for c in switch[-10:])], gap=0.3)
    assert line.split()[1] == b"200" and body["changed"] is False, (line, body)

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data[:-10])
    start = time.monotonic()
    line, headers, body = await read_answer(reader)
    took = time.monotonic() - start
    assert line.split()[1] == b"408" and 0.9 < took < 8, (line, took)
    assert headers["connection"] == "close"
    assert body["error"]["code"] == 408 and "client-timeout" in body["error"]["message"], body
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not lingering for the rest
    writer.close()
    assert (await proxy.status())["in_flight"] == 0


# ------------------------------------------------------------------------------------ the log


@pytest.mark.parametrize("path", PATHS)
async def test_a_malformed_head_is_one_log_line(
    make_proxy: Any, path: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's ERROR with a 12-line traceback per malformed head becomes one WARNING line per
    connection, with what was wrong."""
    monkeypatch.setattr(MALFORMED_REQUESTS, "_window_start", -1e9)  # a fresh window for this test
    proxy = await make_proxy(access_log=path == "aiohttp")
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    bad = [head(b"GET /v1/models HTTP/1.1", b"Host: y", key=None), head(b"GET /\xff HTTP/1.1", key=None)]
    for data in bad:
        line, _, _ = await exchange(proxy.settings.port, [data])
        assert line.split()[1] == b"400", line
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == len(bad), [r.getMessage() for r in records]
    for record in records:
        message = record.getMessage()
        assert record.exc_info is None and record.exc_text is None and "\n" not in message, message
        assert record.levelno == logging.WARNING and "malformed request from 127.0.0.1 (400)" in message
    assert "Duplicate 'Host' header" in records[0].getMessage()


def test_malformed_head_lines_are_rate_limited() -> None:
    now = [100.0]
    limiter = MalformedRequests(burst=3, window=10.0, clock=lambda: now[0])

    def record(exc: BaseException, msg: str = "Error handling request from %s") -> logging.LogRecord:
        return logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, msg, ("10.0.0.1",), (type(exc), exc, None)
        )

    passed = [limiter.filter(record(BadHttpMessage("Duplicate 'Host'\n  header found."))) for _ in range(8)]
    assert passed == [True] * 3 + [False] * 5
    now[0] += 10.0
    first = record(BadHttpMessage("bad\x1b[31m"))
    assert limiter.filter(first)
    message = first.getMessage()
    assert "5 more in the last 10 s not logged" in message and "\\x1b" in message and "\n" not in message
    failure = record(RuntimeError("the proxy's own bug"))  # not a malformed head: kept whole
    assert limiter.filter(failure) and failure.exc_info is not None and failure.levelno == logging.ERROR


# ------------------------------------------------------------------------ one flow control


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "target", ["/stream?events=2048&size=1024&gap=0.002", "/blob?size=1048576"], ids=["stream", "1MiB-answer"]
)
async def test_a_client_that_does_not_read_holds_vllm_at_one_water_mark(
    make_proxy: Any, monkeypatch: pytest.MonkeyPatch, path: str, target: str
) -> None:
    """A client that reads nothing: on both paths the proxy stops reading vLLM's answer once
    about ``flow.HIGH_WATER`` bytes wait for the client (not 64 KiB on one path and 256 KiB on
    the other), for a stream and for an answer of 1 MiB with a Content-Length alike (relayed as
    it comes, never read whole into the proxy's memory first)."""
    conns: list[ClientConnection] = []
    for cls in (FrontProtocol, AiohttpConnection):
        made = cls.connection_made

        def record(self: Any, transport: Any, made: Any = made) -> None:
            # A small kernel buffer: what waits for the client is the proxy's to hold.
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            conns.append(self)
            made(self, transport)

        monkeypatch.setattr(cls, "connection_made", record)
    waiting_at_hold: list[int] = []
    hold = UpstreamConnection.hold

    def recording_hold(self: UpstreamConnection) -> None:
        sizes = [c.transport.get_write_buffer_size() for c in conns if c.transport is not None]
        waiting_at_hold.append(max(sizes, default=0))
        hold(self)

    monkeypatch.setattr(UpstreamConnection, "hold", recording_hold)
    proxy = await make_proxy(access_log=path == "aiohttp", vllm_command=ECHO)
    status, body = await proxy.switch("echo")
    assert status == 200, body
    sock = never_reading_client(proxy.settings.port)
    try:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target.encode())
        assert await async_wait_until(lambda: bool(waiting_at_hold), 20), "vLLM's answer was never held"
        # Held once the transport passed the high water mark, with at most one read from vLLM
        # (up to 256 KiB) on top of it.
        assert HIGH_WATER < waiting_at_hold[0] <= HIGH_WATER + 256 * 1024, waiting_at_hold
        if target.startswith("/stream"):  # 1 KiB events 2 ms apart: a read holds a few of them
            assert waiting_at_hold[0] <= HIGH_WATER + 32 * 1024, waiting_at_hold
    finally:
        sock.close()
    assert await async_wait_until(lambda: proxy.app[SUPERVISOR].status().in_flight == 0, 20)


#: Odd but legal heads (mixed-case and repeated names, obs-text, padding, a Connection that
#: names a header, the user's key, a header named like a connection option) and what of each
#: header vLLM gets, on either path (``headers.request_head``, the one head builder).
ODD_HEADS: list[tuple[bytes, list[list[str]]]] = [
    (
        head(
            b"POST /v1/echo?q=1 HTTP/1.1",
            b"x-MiXeD-CaSe: a",
            b"X-Repeat: 1",
            b"x-repeat: 2",
            b"X-Repeat: 3",
            b"X-Obs: caf\xe9 \xff",
            b"X-Padded:   padded\t",
            b"Connection: keep-alive, X-Foo",
            b"X-Foo: hop-by-hop",
            b"Keep-Alive: timeout=5",
            b"AUTHORIZATION: Bearer " + USER.encode(),
            JSON,
            key=None,
            body=b"{}",
        )
        .replace(b"Host: x", b"hOsT: x")
        .replace(b"Content-Length", b"content-LENGTH"),
        [
            ["x-MiXeD-CaSe", "a"],
            ["X-Repeat", "1"],
            ["x-repeat", "2"],
            ["X-Repeat", "3"],
            ["X-Obs", "caf\xe9 \xff"],
            ["X-Padded", "padded"],
            ["Content-Type", "application/json"],
            ["Content-Length", "2"],
        ],
    ),
    (
        head(
            b"GET /v1/echo HTTP/1.1",
            b"X-Kept: 1",
            b"Connection: X-Bar",
            b"X-Bar: hop-by-hop",
            b"Close: named by Connection",
            b"Connection: close",
            b"authorization: Bearer " + USER.encode(),
            key=None,
        ),
        [["X-Kept", "1"]],
    ),
]


async def test_both_paths_send_vllm_the_same_head(make_proxy: Any) -> None:
    """Odd but legal request heads reach vLLM (an upstream that echoes what it got) the same way
    from the front door and from aiohttp: one head builder for both paths. The user's keys are
    the proxy's own (keys on), so no Authorization passes; a header named by ``Connection``
    (``close`` too) does not either."""
    seen: dict[str, list[Any]] = {}
    for path in PATHS:
        proxy = await make_proxy(access_log=path == "aiohttp", vllm_command=ECHO, **KEYS)
        proxy.session.headers["Authorization"] = f"Bearer {ADMIN}"
        status, body = await proxy.switch("echo")
        assert status == 200, body
        served = proxy.front.served if proxy.front is not None else 0
        seen[path] = []
        for data, expected in ODD_HEADS:
            line, headers, echoed = await exchange(proxy.settings.port, [data])
            assert line.split()[1] == b"200", (path, line, echoed)
            host, *fields = echoed["headers"]
            assert host == ["Host", f"127.0.0.1:{proxy.settings.vllm_port}"], (path, host)
            fields.remove(["X-Request-Id", headers["x-request-id"]])  # made for each request
            assert fields == expected, (path, fields)
            seen[path].append((echoed["method"], echoed["target"], fields))
        if proxy.front is not None:  # the front door served them itself, not aiohttp
            assert proxy.front.served == served + len(ODD_HEADS)
    assert seen["front"] == seen["aiohttp"]
