"""A cheap load generator: raw sockets, HTTP/1.1 keep-alive, a minimal response parser.

It shares two cores with the upstream and the proxy under test, so it must cost little:
no HTTP library, one push parser (:class:`Response`) that only frames the body and counts
SSE events (``\\n\\n``), blocking sockets for one request at a time and asyncio protocols
(uvloop when installed) for many streams.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

HOST = "127.0.0.1"
DONE = b"data: [DONE]\n\n"

_HEAD, _LEN, _EOF, _SIZE, _DATA, _CRLF, _TRAILER, _END = range(8)


def chat_request(
    port: int, model: str, max_tokens: int, stream: bool, path: str = "/v1/chat/completions"
) -> bytes:
    """The raw bytes of one OpenAI chat-completion request."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say something about proxies."}],
            "max_tokens": max_tokens,
            "stream": stream,
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: */*\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def get_request(port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: */*\r\n\r\n".encode()


class Response:
    """Push parser for one HTTP/1.1 response. :meth:`feed` returns True once it is complete."""

    __slots__ = (
        "_buf",
        "_crlf",
        "_last_nl",
        "_left",
        "_state",
        "close",
        "done",
        "end_ns",
        "events",
        "first_ns",
        "nbytes",
        "status",
        "tail",
    )

    def __init__(self) -> None:
        self._buf = b""
        self._state = _HEAD
        self._left = 0
        self._crlf = 0
        self._last_nl = False
        self.status = 0
        self.close = False
        self.done = False
        self.first_ns = 0  # when the first body byte arrived
        self.end_ns = 0
        self.events = 0  # SSE events: blank-line terminators seen in the body
        self.nbytes = 0
        self.tail = b""  # the body's last bytes (to check for data: [DONE])

    def feed(self, data: bytes, now: int) -> bool:
        if self._state == _HEAD:
            data = self._buf + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return False
            self._buf = b""
            self._head(data[:end])
            data = data[end + 4 :]
            if self.done:
                self.end_ns = now
                return True
        if data:
            state = self._state
            if state == _LEN:
                piece = data[: self._left]
                self._left -= len(piece)
                self._payload(piece, now)
                if self._left == 0:
                    self.done = True
            elif state == _EOF:
                self._payload(data, now)
            else:
                self._chunked(data, now)
        if self.done:
            self.end_ns = now
        return self.done

    def eof(self, now: int) -> bool:
        """The connection closed: complete only for a body delimited by the close."""
        if self._state == _EOF:
            self.done = True
            self.end_ns = now
        return self.done

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        length = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                self.close = "close" in value.lower()
        if chunked:
            self._state = _SIZE
        elif length is not None:
            self._state = _LEN
            self._left = length
            self.done = length == 0
        elif self.status in (204, 304) or self.status < 200:
            self.done = True
        else:
            self._state = _EOF

    def _payload(self, piece: bytes, now: int) -> None:
        if not piece:
            return
        if not self.first_ns:
            self.first_ns = now
        self.nbytes += len(piece)
        events = piece.count(b"\n\n")
        if self._last_nl and piece[0] == 10:
            events += 1
        self.events += events
        self._last_nl = piece[-1] == 10
        self.tail = piece[-16:] if len(piece) >= 16 else (self.tail + piece)[-16:]

    def _chunked(self, data: bytes, now: int) -> None:
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos, n = 0, len(buf)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._left, n - pos)
                self._payload(buf[pos : pos + take], now)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _CRLF
                    self._crlf = 2
            elif state == _CRLF:
                take = min(self._crlf, n - pos)
                pos += take
                self._crlf -= take
                if self._crlf == 0:
                    self._state = _SIZE
            elif state == _SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    self._buf = buf[pos:]
                    return
                size = int(buf[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if size:
                    self._state = _DATA
                    self._left = size
                else:
                    self._state = _TRAILER
            elif state == _TRAILER:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    self._buf = buf[pos:]
                    return
                if end == pos:
                    self._state = _END
                    self.done = True
                    return
                pos = end + 2  # a trailer field: skipped
            else:
                return

    @property
    def sse_done(self) -> bool:
        return self.status == 200 and self.tail.endswith(DONE)


# ------------------------------------------------------------------ one request at a time


class BlockingClient:
    """One keep-alive connection used with blocking calls (reconnects when closed)."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        return sock

    def request(self, raw: bytes) -> tuple[Response, int]:
        """Send ``raw``, read the whole response; returns it and the send time (ns)."""
        sock = self.sock or self._connect()
        clock = time.perf_counter_ns
        start = clock()
        try:
            sock.sendall(raw)
        except OSError:  # a stale keep-alive connection: once more on a new one
            self.close()
            sock = self._connect()
            start = clock()
            sock.sendall(raw)
        resp = Response()
        recv = sock.recv
        while True:
            data = recv(262144)
            now = clock()
            if not data:
                self.close()
                if resp.eof(now):
                    break
                raise ConnectionError(f"port {self.port} closed the connection mid-response")
            if resp.feed(data, now):
                break
        if resp.close:
            self.close()
        return resp, start

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass
class Sample:
    total_ns: int
    first_ns: int  # to the first body byte (the first SSE chunk for a stream)
    ok: bool


def paired_rounds(
    clients: dict[str, BlockingClient],
    requests: dict[str, bytes],
    rounds: int,
    warmup: int,
    every: dict[str, int],
    on_start: Callable[[], None] = lambda: None,
    seed: int = 7,
    give_up: int = 5,
) -> dict[str, dict[int, Sample]]:
    """Interleaved rounds: each round sends one request to each target, in a shuffled order,
    so that noise hits all targets alike. A target with ``every[name] = k`` joins one round in
    k. Returns ``{target: {round: Sample}}`` for the measured rounds. A request that breaks
    counts as a failed sample; a target with ``give_up`` broken requests leaves the rounds."""
    rng = random.Random(seed)
    names = list(clients)
    out: dict[str, dict[int, Sample]] = {name: {} for name in names}
    broken = dict.fromkeys(names, 0)
    for index in range(-warmup, rounds):
        if index == 0:
            on_start()
        order = names[:]
        rng.shuffle(order)
        for name in order:
            if index % every.get(name, 1) or broken[name] >= give_up:
                continue
            try:
                resp, start = clients[name].request(requests[name])
            except OSError:  # includes timeouts and ConnectionError
                clients[name].close()
                broken[name] += 1
                if index >= 0:
                    out[name][index] = Sample(0, 0, False)
                continue
            if index >= 0:
                ok = resp.status == 200 and (resp.events == 0 or resp.tail.endswith(DONE))
                first = (resp.first_ns or resp.end_ns) - start
                out[name][index] = Sample(resp.end_ns - start, first, ok)
    return out


# ----------------------------------------------------------------------- many at once


class _Conn(asyncio.Protocol):
    """One keep-alive client connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self.pause_at = 0  # bytes: pause reading once this much body has arrived
        self.pause_for = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:
            return
        if resp.feed(data, time.perf_counter_ns()):
            self._finish(resp)
        elif self.pause_at and resp.nbytes >= self.pause_at and self.transport is not None:
            self.pause_at = 0
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(self.pause_for, self._resume)

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _finish(self, resp: Response) -> None:
        self.resp = None
        waiter, self.waiter = self.waiter, None
        if resp.close and self.transport is not None:
            self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(resp)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.resp
        if resp is not None and resp.eof(time.perf_counter_ns()):
            self._finish(resp)
            return
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(f"connection lost mid-response ({exc!r})"))

    def request(self, raw: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.resp = Response()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Conn, HOST, port)
    return conn


@dataclass
class LoopResult:
    """One closed-loop run. TTFTs in ns: ``burst`` for each client's first request (all sent
    at once), ``steady`` for the later ones (by then the clients have drifted apart)."""

    concurrency: int
    duration: float
    burst_ttft_ns: list[int] = field(default_factory=list)
    steady_ttft_ns: list[int] = field(default_factory=list)
    ok: int = 0
    ok_in_window: int = 0  # finished within ``duration`` of the start
    failed: int = 0
    events: int = 0
    nbytes: int = 0
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Streams finished per second within the window (not skewed by the last stragglers)."""
        return self.ok_in_window / self.duration if self.duration else 0.0

    @property
    def ttft_ns(self) -> list[int]:
        return (
            self.steady_ttft_ns if len(self.steady_ttft_ns) >= 3 else self.steady_ttft_ns + self.burst_ttft_ns
        )


async def closed_loop(
    port: int,
    concurrency: int,
    duration: float,
    requests: Sequence[bytes],
    warmup_request: bytes | None,
    hard_limit: float,
    on_start: Callable[[], None] = lambda: None,
    on_stop: Callable[[], None] = lambda: None,
) -> LoopResult:
    """``concurrency`` clients, each sending requests on its keep-alive connection, one after
    the other, until ``duration`` seconds have passed (those in flight then finish), after one
    warm-up request each. Client ``i`` draws its requests from ``requests`` with a generator
    seeded ``i`` (the same sequence for every target): different lengths make the clients drift
    apart after the first, simultaneous, wave. A response counts as ok only with status 200 and,
    for streams, ``data: [DONE]`` at the end. ``hard_limit`` s after the start all is cut."""
    result = LoopResult(concurrency, duration)
    conns: list[_Conn] = []
    ready = asyncio.Event()
    warmed = 0
    loop = asyncio.get_running_loop()
    deadline = 0.0
    window_end = 0

    def fail(reason: str) -> None:
        result.failed += 1
        if len(result.errors) < 5:
            result.errors.append(reason)

    async def worker(index: int) -> None:
        nonlocal warmed
        rng = random.Random(index)
        conn: _Conn | None = None
        try:
            conn = await connect(port)
            conns.append(conn)
            if warmup_request is not None:
                await conn.request(warmup_request)
        except (OSError, ConnectionError) as exc:
            fail(f"warm-up: {exc}")
            conn = None
        warmed += 1
        if warmed == concurrency:
            start_measuring()
        await ready.wait()
        clock = time.perf_counter_ns
        first = True
        while loop.time() < deadline:
            request = rng.choice(requests)
            try:
                if conn is None or conn.closed:
                    conn = await connect(port)
                    conns.append(conn)
                start = clock()
                resp = await conn.request(request)
            except (OSError, ConnectionError) as exc:
                fail(str(exc))
                conn = None
                first = False
                await asyncio.sleep(0.01)
                continue
            result.events += resp.events
            result.nbytes += resp.nbytes
            if resp.status == 200 and (resp.events == 0 or resp.tail.endswith(DONE)):
                result.ok += 1
                result.ok_in_window += resp.end_ns <= window_end
                ttft = (resp.first_ns or resp.end_ns) - start
                (result.burst_ttft_ns if first else result.steady_ttft_ns).append(ttft)
            else:
                fail(f"status {resp.status}, body ends {resp.tail!r}")
            first = False

    began = 0.0

    def start_measuring() -> None:
        nonlocal deadline, began, window_end
        on_start()
        began = time.perf_counter()
        window_end = time.perf_counter_ns() + int(duration * 1e9)
        deadline = loop.time() + duration
        ready.set()

    tasks = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=hard_limit)
    result.wall_s = time.perf_counter() - began if began else 0.0
    on_stop()
    for conn in conns:
        conn.close()
    if pending:
        fail(f"{len(pending)} clients still running after {hard_limit:g} s: cut")
        result.failed += len(pending) - 1
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            fail(repr(task.exception()))
    return result


async def download(port: int, path: str, pause_at: int, pause_for: float, timeout: float) -> Response:
    """One GET whose body is read as fast as possible, pausing once for ``pause_for`` s after
    ``pause_at`` bytes (a slow reader: the proxy must not buffer what it cannot deliver)."""
    conn = await connect(port)
    conn.pause_at = pause_at
    conn.pause_for = pause_for
    try:
        return await asyncio.wait_for(conn.request(get_request(port, path)), timeout)
    finally:
        conn.close()


async def open_idle(port: int, count: int, path: str, batch: int = 100) -> tuple[list[_Conn], int]:
    """``count`` keep-alive connections, each after one GET ``path``; returns them (still open)
    and how many requests failed."""
    conns: list[_Conn] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        try:
            conn = await connect(port)
            conns.append(conn)
            resp = await asyncio.wait_for(conn.request(get_request(port, path)), 30.0)
            failed += resp.status != 200
        except (OSError, ConnectionError, asyncio.TimeoutError):
            failed += 1

    for begin in range(0, count, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, count - begin))))
    return conns, failed


def close_all(conns: Sequence[_Conn]) -> None:
    for conn in conns:
        conn.close()


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
