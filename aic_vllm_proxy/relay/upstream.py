"""A lean HTTP/1.1 client for the one upstream (vLLM), built for relaying.

aiohttp's general-purpose ``ClientSession`` resumes a coroutine for every chunk it reads and
costs tens of microseconds per streamed token. Here the response body is pushed from
``data_received`` straight into a *sink* (normally the client's transport), so a token costs
one callback and one write. The module has three parts:

- :class:`ResponseHead`: the parsed status line and headers.
- :class:`UpstreamConnection`: an ``asyncio.Protocol`` for one keep-alive connection; it sends
  a request, parses the response head, then de-frames the body (Content-Length, chunked, or
  until close) and hands each piece of payload to the sink, with back-pressure.
- :class:`UpstreamPool`: idle keep-alive connections, dropped after ``keepalive`` seconds
  (vLLM's uvicorn closes idle connections after 5 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from multidict import CIMultiDict

MAX_HEAD = 64 * 1024
LAST_CHUNK = b"0\r\n\r\n"

Sink = Callable[[bytes], None]
OnHead = Callable[["UpstreamConnection", "ResponseHead"], None]


def _never_full() -> bool:
    return False


class UpstreamClosed(ConnectionError):
    """The connection closed before the response was complete."""

    def __init__(self, message: str, *, nothing_received: bool) -> None:
        super().__init__(message)
        #: True when not one byte of the response arrived (a stale keep-alive connection).
        self.nothing_received = nothing_received


class UpstreamProtocolError(ConnectionError):
    """vLLM sent something that is not valid HTTP/1.1."""


@dataclass
class ResponseHead:
    status: int
    reason: str
    version: str
    headers: CIMultiDict[str]
    #: Content-Length, or None for chunked / read-until-close bodies.
    length: int | None
    chunked: bool
    keep_alive: bool
    #: The header lines as received (latin-1 text, no CRLF), for relaying them byte for byte.
    lines: list[str]


def _parse_head(block: bytes) -> ResponseHead:
    lines = block.decode("latin-1").split("\r\n")
    try:
        version, code, *reason = lines[0].split(" ", 2)
        status = int(code)
    except ValueError:
        raise UpstreamProtocolError(f"bad status line from vLLM: {lines[0][:80]!r}") from None
    if not version.startswith("HTTP/1."):
        raise UpstreamProtocolError(f"unsupported HTTP version from vLLM: {version!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    del lines[0]
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise UpstreamProtocolError(f"bad header line from vLLM: {line[:80]!r}")
        headers.add(name, value.strip())
    chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
    length: int | None = None
    if not chunked and "Content-Length" in headers:
        try:
            length = int(headers["Content-Length"])
        except ValueError:
            raise UpstreamProtocolError("bad Content-Length from vLLM") from None
    connection = headers.get("Connection", "").lower()
    keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    reason_text = reason[0] if reason else ""
    return ResponseHead(status, reason_text, version, headers, length, chunked, keep_alive, lines)


def frame_chunk(piece: bytes) -> bytes:
    """``piece`` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(piece), piece)


def _plain_chunk_end(data: bytes, pos: int) -> int:
    """Where the chunk starting at ``pos`` ends, if it is whole, non-empty and plainly framed
    (a lowercase hex size, CRLF, the data, CRLF), so that it can be passed on as it is; else -1
    (the last chunk, a partial one, or framing worth a closer look: the state machine's)."""
    newline = data.find(b"\r\n", pos, pos + 18)
    if newline < 0:
        return -1
    size_text = data[pos:newline]
    try:
        size = int(size_text, 16)
    except ValueError:
        return -1
    stop = newline + 2 + size
    if size == 0 or b"%x" % size != size_text or data[stop : stop + 2] != b"\r\n":
        return -1
    return stop + 2


def _whole_chunks(data: bytes) -> int:
    """How many bytes at the start of ``data`` are whole, plainly framed, non-empty chunks:
    those can be passed on as they are."""
    pos, end = 0, len(data)
    while pos < end:
        stop = _plain_chunk_end(data, pos)
        if stop < 0:
            break
        pos = stop
    return pos


class UpstreamConnection(asyncio.Protocol):
    """One connection to vLLM; one request at a time."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.used = 0  # requests sent on this connection
        self.idle_since = time.monotonic()
        self._closed = False
        self._closed_after = False  # do not reuse after this request
        self._writable: asyncio.Future[None] | None = None
        self._reset()

    # ---------------------------------------------------------------- per request

    def _reset(self) -> None:
        self._head_buf = b""
        self._received_any = False
        self._head: asyncio.Future[ResponseHead] = self._loop.create_future()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._wakeup: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        self._early: list[bytes] = []  # payload that arrived before a sink was attached
        self._no_body = False
        self._framed = False
        self._mode = "head"  # head | length | chunked | close | done
        self._remaining = 0  # length mode: bytes left; chunked: bytes left in this chunk
        self._chunk_state = "size"  # size | data | crlf | trailer
        self._line = b""
        self._paused = False
        self._sink_broken = False
        self._sink_full: Callable[[], bool] = _never_full
        self._client: asyncio.WriteTransport | None = None  # see attach(client=...)
        #: Framed relaying: vLLM's own last chunk went to the sink (no trailers came with it).
        self.sent_last_chunk = False
        #: Called with vLLM's final head from data_received, after what came with the head was
        #: read (so :attr:`complete` says whether that was the whole answer), before the
        #: coroutine waiting in :meth:`head` resumes; it may :meth:`attach` a sink at once.
        self.on_head: OnHead | None = None
        self._out: asyncio.WriteTransport | None = None  # _client while the fast path applies

    def start(self, head: bytes, body: bytes | None, *, no_body_expected: bool, framed: bool = False) -> None:
        """Send a request whose body is in memory (or absent). With ``framed``, a body without a
        Content-Length reaches the sink as chunked framing, ready to pass on (vLLM's own chunks
        are passed as they are when their framing is plain)."""
        assert self.transport is not None
        self.used += 1
        self._no_body = no_body_expected
        self._framed = framed
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)

    async def start_streaming(
        self, head: bytes, body: AsyncIterator[bytes], *, chunked: bool, no_body_expected: bool
    ) -> None:
        """Send a request whose body arrives piece by piece from the client."""
        assert self.transport is not None
        self.used += 1
        self._no_body = no_body_expected
        self.transport.write(head)
        async for piece in body:
            if self._closed:
                raise UpstreamClosed("vLLM closed the connection while the request was being sent",
                                     nothing_received=False)  # fmt: skip
            if chunked:
                self.transport.writelines((b"%x\r\n" % len(piece), piece, b"\r\n"))
            else:
                self.transport.write(piece)
            await self._drain_upstream()
        if chunked:
            self.transport.write(b"0\r\n\r\n")

    async def _drain_upstream(self) -> None:
        """Wait while vLLM is not reading what we send (its transport paused us)."""
        if self._writable is not None and not self._closed:
            await self._writable

    async def head(self) -> ResponseHead:
        return await self._head

    def keep_alive_off(self) -> None:
        """Do not reuse this connection (the request on it was not sent completely)."""
        self._closed_after = True

    def attach(
        self,
        sink: Sink,
        is_full: Callable[[], bool] = _never_full,
        *,
        client: asyncio.WriteTransport | None = None,
    ) -> None:
        """Send the payload to ``sink`` from now on (what came early is passed at once).
        ``is_full()`` says when the sink has too much waiting: reading from vLLM then pauses
        until :meth:`resume`.

        ``client`` (framed relaying only) is the transport that ``sink`` writes to. A read that
        holds exactly one whole, plainly framed chunk then goes to it straight from
        :meth:`data_received` (the common case: one token per read), and anything else through
        ``sink``. The owner of ``client`` calls :meth:`hold` when its transport pauses writing."""
        self._sink = sink
        self._sink_full = is_full
        self._client = client if self._framed else None
        early, self._early = self._early, []
        for piece in early:
            self._emit(piece)
        self._update_fast_path()

    def hold(self) -> None:
        """The sink cannot take more now: stop reading from vLLM until :meth:`resume`."""
        transport = self.transport
        if not self._paused and transport is not None and self._mode != "done":
            self._paused = True
            transport.pause_reading()
            self._wake()

    def _update_fast_path(self) -> None:
        """Whole chunks may go straight to the client only between chunks of a chunked body."""
        fast = self._mode == "chunked" and self._chunk_state == "size" and not self._line
        self._out = self._client if fast and not self._sink_broken else None

    @property
    def complete(self) -> bool:
        return self._mode == "done"

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and not self._closed
            and self._head.done()
            and not self._head.cancelled()
            and self._head.exception() is None
            and self._head.result().keep_alive
            and not self._closed_after
            and self.transport is not None
            and not self.transport.is_closing()
        )

    async def wait(self) -> None:
        """Until the body is complete (returns), broken (raises), or the sink needs draining
        (returns with reading paused: see :meth:`relay_rest`)."""
        if not self._done.done() and not self._paused:
            self._wakeup = wakeup = self._loop.create_future()  # set by _finish, _fail and hold
            try:
                await wakeup
            finally:
                self._wakeup = None
        if self._done.done():
            self._done.result()  # raises if the body broke off

    async def relay_rest(self, drain: Callable[[], Awaitable[object]]) -> None:
        """Until the body is complete (returns) or broken (raises), with a sink attached:
        whenever the sink has too much waiting, ``drain()``, then read from vLLM again."""
        while True:
            await self.wait()
            if self.complete:
                return
            if self._paused:
                await drain()
                self.resume()

    def resume(self) -> None:
        """The sink has room again: read from vLLM again."""
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    async def read_all(self) -> bytes:
        """The whole body, for small responses."""
        parts: list[bytes] = []
        self.attach(parts.append)
        await self._done
        return b"".join(parts)

    def abort(self) -> None:
        """Drop the connection now (vLLM then aborts the request)."""
        self._closed = True
        if self.transport is not None:
            self.transport.abort()

    # ----------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        out = self._out
        # The fast path: exactly one whole, plainly framed chunk (a token) goes to the client.
        if out is not None and _plain_chunk_end(data, 0) == len(data) and not out.is_closing():
            out.write(data)
            return
        self._received_any = True
        if self._mode == "head":
            self._head_buf += data
            end = self._head_buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head_buf) > MAX_HEAD:
                    self._fail(UpstreamProtocolError("response head from vLLM is too large"))
                return
            block, rest = self._head_buf[:end], self._head_buf[end + 4 :]
            self._head_buf = b""
            try:
                head = _parse_head(block)
            except UpstreamProtocolError as exc:
                self._fail(exc)
                return
            if 100 <= head.status < 200:  # interim response: the real one follows
                if rest:
                    self.data_received(rest)
                return
            self._begin_body(head)
            if not self._head.done():
                self._head.set_result(head)
            if rest and self._mode != "done":
                self._feed(rest)
            on_head, self.on_head = self.on_head, None
            if on_head is not None:
                try:
                    on_head(self, head)
                except Exception as exc:  # the waiting coroutine gets it
                    self._fail(exc)
            return
        if self._mode == "done":
            return  # bytes after a complete response: ignore (the connection is not reused)
        self._feed(data)
        if self._client is not None:
            self._update_fast_path()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.resume_writing()
        if self._mode == "close":
            self._finish()
            return
        if self._mode != "done":
            what = "before answering" if not self._received_any else "in the middle of the response"
            self._fail(
                UpstreamClosed(f"vLLM closed the connection {what}", nothing_received=not self._received_any)
            )

    def pause_writing(self) -> None:
        """vLLM is not keeping up with the request body we send."""
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # ------------------------------------------------------------------- body

    def _begin_body(self, head: ResponseHead) -> None:
        if self._no_body or head.status in (204, 304):
            self._mode = "done"
            self._finish()
        elif head.chunked:
            self._mode = "chunked"
            self._chunk_state = "size"
        elif head.length is not None:
            self._mode = "length"
            self._remaining = head.length
            if head.length == 0:
                self._finish()
        else:
            self._mode = "close"  # read until vLLM closes
            head.keep_alive = False

    def _feed(self, data: bytes) -> None:
        if self._mode == "length":
            if len(data) >= self._remaining:
                piece, self._remaining = data[: self._remaining], 0
                if piece:
                    self._emit(piece)
                self._finish()
            else:
                self._remaining -= len(data)
                self._emit(data)
        elif self._mode == "chunked":
            if self._framed and self._chunk_state == "size" and not self._line:
                whole = _whole_chunks(data)  # the common case: one or more whole chunks
                if whole == len(data):
                    self._emit(data)
                    return
                if data[whole:] == LAST_CHUNK:  # the end (no trailers), maybe with the last token
                    self._emit(data)  # in one write
                    self.sent_last_chunk = True
                    self._finish()
                    return
                if whole:
                    self._emit(data[:whole])
                    data = data[whole:]
            self._feed_chunked(data)
        elif self._mode == "close":
            self._emit(frame_chunk(data) if self._framed else data)

    def _feed_chunked(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end and self._mode == "chunked":
            state = self._chunk_state
            if state == "data":
                take = min(self._remaining, end - pos)
                piece = data[pos : pos + take] if (pos or take != end) else data
                self._emit(frame_chunk(piece) if self._framed else piece)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = "crlf"
                    self._line = b""
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                if len(self._line) > 4096:
                    self._fail(UpstreamProtocolError("chunk header from vLLM is too long"))
                return
            line = self._line + data[pos:newline]
            self._line = b""
            pos = newline + 1
            if state == "crlf":
                if line.strip():
                    self._fail(UpstreamProtocolError("missing CRLF after a chunk from vLLM"))
                    return
                self._chunk_state = "size"
            elif state == "size":
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self._fail(UpstreamProtocolError("bad chunk size from vLLM"))
                    return
                if size == 0:
                    self._chunk_state = "trailer"
                else:
                    self._remaining = size
                    self._chunk_state = "data"
            elif state == "trailer" and not line.strip():
                self._finish()

    def _emit(self, piece: bytes) -> None:
        sink = self._sink
        if sink is None:
            self._early.append(piece)
            return
        if self._sink_broken:
            return
        try:
            sink(piece)
        except Exception as exc:  # the client went away
            self._sink_broken = True
            self._fail(exc)
            return
        if not self._paused and self._sink_full():
            self.hold()

    def _finish(self) -> None:
        self._mode = "done"
        self._out = None
        self.idle_since = time.monotonic()
        if not self._done.done():
            self._done.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._mode = "done"
        self._out = None
        self._closed = True
        if not self._head.done():
            self._head.set_exception(exc)
        if not self._done.done():
            self._done.set_exception(exc)
        # Mark both as retrieved: an unobserved failure must not log "never retrieved".
        for future in (self._head, self._done):
            if future.done() and not future.cancelled():
                future.exception()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._wake()
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Keep-alive connections to one host:port."""

    def __init__(
        self, host: str, port: int, *, keepalive: float = 4.0, connect_timeout: float = 10.0
    ) -> None:
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self._idle: list[UpstreamConnection] = []
        self.host_header = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"

    async def acquire(self) -> UpstreamConnection:
        """A pooled connection that is still fresh, or a new one."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            transport = conn.transport
            if transport is None or transport.is_closing() or now - conn.idle_since > self.keepalive:
                conn.abort()
                continue
            conn._reset()
            return conn
        return await self.connect()

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        transport, conn = await asyncio.wait_for(
            loop.create_connection(UpstreamConnection, self.host, self.port), self.connect_timeout
        )
        conn.transport = transport  # uvloop may call connection_made only after this returns
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection after a complete response; anything else is closed."""
        if conn.reusable:
            conn.resume()  # the last piece may have paused reading (back-pressure): read again
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.abort()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()
