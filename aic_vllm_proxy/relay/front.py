"""The front door: one listening socket; the common proxied request takes a lean path, anything
else is handed to aiohttp.

aiohttp's web layer (``Request``, ``Response``, stream reader and writer, router) was about two
thirds of the proxy's CPU per proxied request (docs/performance.md). :class:`FrontProtocol` reads
the request head itself and, for the common case, serves it without that layer: an API path, a
body of at most 1 MiB with a Content-Length, a model ready, a valid key when keys are configured.
The request goes to vLLM through the shared pipeline (``Pipeline.send``) and vLLM's answer is
written straight to the client's transport: for a small answer, head and body in one write; for a
stream, each token as it arrives, with back-pressure.

Everything else is **handed off** before any of it is answered: the connection's protocol becomes
aiohttp's request handler, which gets the bytes received so far and serves this request and the
rest of the connection with the full application. That covers the control routes, waiting for a
switch and its 503s, 401/403, chunked or large uploads, ``Expect``, ``Upgrade``, HTTP/1.0, and any
head that is not plainly valid (aiohttp then answers 400). So the daemon's behaviour stays the
application's; the front door only takes the fast path where it is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp.http_parser import SINGLETON_HEADERS

from aic_vllm_proxy.relay.auth import ADMIN_PREFIXES, API_ROLES, KeyRing, bearer_token, refusal
from aic_vllm_proxy.relay.dev_routes import dev_route
from aic_vllm_proxy.relay.errors import ProxyError, body_stalled
from aic_vllm_proxy.relay.flow import set_water_marks
from aic_vllm_proxy.relay.headers import HOP_BY_HOP, response_head
from aic_vllm_proxy.relay.pipeline import RETRYABLE_BODY, Pipeline, closes_connection
from aic_vllm_proxy.relay.request import REQUEST_ID, RelayRequest, request_id
from aic_vllm_proxy.relay.routes import OwnRoutes
from aic_vllm_proxy.relay.upstream import (
    LAST_CHUNK,
    ResponseHead,
    UpstreamConnection,
    frame_chunk,
)

log = logging.getLogger(__name__)

#: A request head longer than this is aiohttp's to judge (it answers 400 or 431).
MAX_HEAD = 16 * 1024
#: aiohttp's limits for one request line or header field, and for the number of header fields
#: (128 for its C parser; its pure Python one counts the request line and one more).
_MAX_LINE = 8190
_MAX_FIELDS = 126
#: Stop reading a connection when this much of a next (pipelined) request waits.
MAX_BUFFERED = 256 * 1024
#: SO_LINGER on, 0 s: closing the socket resets the connection.
_RESET = struct.pack("ii", 1, 0)

# What the front door takes is a strict subset of what aiohttp (llhttp, strict, and its pure
# Python parser) accepts and reads the same way; anything doubtful goes to aiohttp, which then
# answers it as it would have anyway (tests/test_parity.py checks this against both parsers).
#: Methods llhttp knows, in capitals (it refuses lower case and unknown words; CONNECT and the
#: rest are aiohttp's to handle).
METHODS = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: An origin-form target of visible ASCII, as llhttp accepts it (a '#' is refused later: auth.refusal).
_TARGET = rb"/[\x21-\x7e]*"
#: A plainly valid HTTP/1.1 request head (request line and header lines, each ending in CRLF);
#: anything else (HTTP/1.0, folded lines, bare LF, control characters) goes to aiohttp.
_HEAD = re.compile(
    rb"(" + b"|".join(METHODS) + rb") (" + _TARGET + rb") HTTP/1\.1\r\n"
    rb"((?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*)"
)


def _prefixes(text: bytes) -> bytes:
    """A pattern for every non-empty prefix of ``text``."""
    pattern = b""
    for char in reversed(text):
        pattern = re.escape(bytes([char])) + (b"(?:" + pattern + b")?" if pattern else b"")
    return pattern


#: What the start of a head the front door may take looks like (so far): a request line in the
#: making matches it exactly when it can still become one that ``_HEAD`` matches, so a head
#: split across packets is decided as it would be in one piece.
_START = re.compile(
    rb"(?:" + b"|".join(_prefixes(method) for method in METHODS) + rb"|(?:" + b"|".join(METHODS) + rb")"
    rb" (?:" + _TARGET + rb"(?: (?:" + _prefixes(b"HTTP/1.1\r\n") + rb")?)?)?)\Z"
)
#: Headers aiohttp refuses to see twice (400); one Host is required.
_SINGLETONS = frozenset(name.lower().encode() for name in SINGLETON_HEADERS)
#: Headers whose presence sends the request to aiohttp (Proxy-Connection: llhttp reads it as
#: Connection, its pure Python parser does not).
_HAND_OFF = frozenset(
    {b"transfer-encoding", b"expect", b"upgrade", b"proxy-connection", b"sec-websocket-key1"}
)
#: Request headers the front door reads (what of them goes to vLLM: ``headers.request_head``).
_READ = frozenset(name.encode() for name in HOP_BY_HOP) | {
    b"content-length",
    b"authorization",
    b"x-request-id",
}
#: Headers the loop in :func:`parse_request_head` looks at.
_SPECIAL = _READ | _HAND_OFF | _SINGLETONS


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    lines: list[bytes]  # the header lines as sent, each with its CRLF
    names: list[bytes]  # each line's header name, lower case
    connection: set[bytes]  # the header names its Connection lists (lower case)
    length: int  # Content-Length (0 when absent)
    keep_alive: bool
    token: bytes | None  # the bearer token presented, if any
    sent_id: bytes | None  # the one X-Request-Id sent (None: none, or more than one)


def parse_request_head(block: bytes) -> RequestHead | None:
    """The head (up to and including the last header's CRLF), or None when the front door does
    not take it: then aiohttp reads it, and answers as it would have without the front door."""
    match = _HEAD.fullmatch(block)
    if match is None:
        return None
    method, target, fields = match.groups()
    if match.start(3) > _MAX_LINE + 2 or fields.count(b"\r\n") > _MAX_FIELDS:
        return None  # over aiohttp's limits: it answers 400
    lines: list[bytes] = []
    names: list[bytes] = []
    length = -1
    seen: set[bytes] = set()
    authorizations: list[bytes] = []
    named_tokens: set[bytes] = set()
    sent_id: bytes | None = None
    previous = 0  # the length of the previous header's name
    start = 0
    while start < len(fields):
        end = fields.index(b"\r\n", start) + 2
        line = fields[start:end]
        start = end
        name, _, value = line.partition(b":")  # the value with its CRLF
        # aiohttp's C parser counts the previous header's name with this header's name and value.
        if previous + len(name) + len(value) > _MAX_LINE + 2:
            return None
        previous = len(name)
        lines.append(line)
        lname = name.lower()
        names.append(lname)
        if lname not in _SPECIAL:
            continue
        repeated = lname in seen
        if lname in _HAND_OFF or (repeated and lname in _SINGLETONS):
            return None
        seen.add(lname)
        if lname == b"content-length":
            value = value.strip()
            if not value.isdigit() or len(value) > 18:
                return None  # not a plain number: aiohttp's to judge
            length = int(value)
        elif lname == b"connection":
            if not value.isascii():
                return None  # aiohttp reads these tokens as text: not always the same
            named_tokens.update(t.strip().lower() for t in value.split(b","))
        elif lname == b"authorization":
            authorizations.append(value[:-2])
        elif lname == b"x-request-id":
            sent_id = None if repeated else value.strip()
    if b"host" not in seen or refusal(target, authorizations) is not None:
        return None  # aiohttp answers 400
    keep_alive = True
    if named_tokens:
        keep_alive = b"close" not in named_tokens
        named_tokens.discard(b"")
    token = bearer_token(authorizations[0]) if authorizations else None
    return RequestHead(method, target, lines, names, named_tokens, max(length, 0), keep_alive, token, sent_id)


def routed_as_is(path: bytes) -> bool:
    """Whether aiohttp's router sees ``path`` as it is: no ``%`` it would decode, no ``/.`` or
    leading ``//`` it would normalise (into one of the proxy's own paths, say)."""
    return b"%" not in path and b"/." not in path and not path.startswith(b"//")


class Front:
    """What the connections of one listening socket share."""

    def __init__(
        self,
        pipeline: Pipeline,
        keys: KeyRing,
        fallback: Callable[[], asyncio.Protocol],
        routes: OwnRoutes,
        *,
        keepalive_timeout: float,
    ) -> None:
        self.pipeline = pipeline
        self.keys = keys
        self.fallback = fallback
        self.routes = routes  # the proxy's own paths: aiohttp's (its router serves them)
        self.admin_prefixes = tuple(prefix.encode() for prefix in ADMIN_PREFIXES)
        self.max_body = min(pipeline.max_body_size, RETRYABLE_BODY)
        self.keepalive_timeout = keepalive_timeout
        #: How long a client may leave what was written to it untaken (see :class:`ClientConnection`).
        self.client_timeout = pipeline.client_timeout
        self.connections: set[FrontProtocol] = set()  # served here
        self.aiohttp_connections: set[AiohttpConnection] = set()  # aiohttp's
        self.closing = False
        #: Requests served here and requests handed to aiohttp (for tests and curiosity).
        self.served = 0
        self.handed_off = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._all_gone: asyncio.Future[None] | None = None  # set by gone() during shutdown

    def takes(self, head: RequestHead) -> bool:
        """Whether the front door serves this request itself."""
        path = head.target.partition(b"?")[0]
        if (
            self.routes.owns(path)
            or path.startswith(self.admin_prefixes)
            or not routed_as_is(path)
            or dev_route(path)  # never forwarded: aiohttp's catch-all answers 404 (dev_routes.py)
            or head.length > self.max_body
        ):
            return False
        pipeline = self.pipeline
        if not pipeline.front_open:
            return False  # aiohttp waits for the switch (bounded) or answers 503
        if path == b"/v1/models" and pipeline.fleet.routing:
            return False  # the proxy answers it (control.v1_models)
        # With keys, an unknown or missing one is aiohttp's to answer (401).
        keys = self.keys
        return not keys.enabled or (head.token is not None and keys.role_of(head.token) in API_ROLES)

    # --------------------------------------------------------------- lifetime

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    def aiohttp_connection(self, *, handed_off: bool = False) -> AiohttpConnection:
        """A new connection for aiohttp's request handler (watched like the front door's);
        ``handed_off``: by the front door, whose transport it takes over as it is."""
        return AiohttpConnection(self, self.fallback(), handed_off=handed_off)

    def gone(self, conn: FrontProtocol) -> None:
        """``conn`` is no longer the front door's (closed, or handed to aiohttp)."""
        self.connections.discard(conn)
        if not self.connections and self._all_gone is not None and not self._all_gone.done():
            self._all_gone.set_result(None)

    def _sweep(self) -> None:
        """Once a second, one timer for all connections instead of one per request: abort those
        whose client has not taken what was written to it for the client timeout
        (:class:`ClientConnection`), and close those idle (or bringing a request head) for longer
        than the keep-alive timeout."""
        now = time.monotonic()
        stalled, idle = now - self.client_timeout, now - self.keepalive_timeout
        for conn in list(self.connections):
            if conn.stalled_since(now) < stalled:
                conn.close(abort=True)
            elif conn.task is None and conn.idle_since < idle:
                conn.close()
        for other in list(self.aiohttp_connections):  # aiohttp closes its idle ones itself
            if other.stalled_since(now) < stalled:
                other.close(abort=True)
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections, let requests in flight finish and closed connections take
        their last answers (up to ``timeout``; the sweep goes on meanwhile), then cut the rest.
        aiohttp's connections are aiohttp's to shut down."""
        self.closing = True
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
        if self.connections:
            self._all_gone = asyncio.get_running_loop().create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_gone, timeout)
        for conn in list(self.connections):
            conn.close(abort=True)
        if self._sweeper is not None:
            self._sweeper.cancel()


class ClientConnection(asyncio.Protocol):
    """What the sweep needs of every client connection: its transport, and since when its client
    has left what was written to it untaken (:meth:`stalled_since`).

    A client that does not read makes the transport pause writing (``pause_writing``) until it
    has taken most of it (``resume_writing``); a polite ``close()`` waits for the same. A client
    that takes nothing for the client timeout would otherwise hold its connection, and what is
    buffered for it, for ever: the sweep aborts it."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self._stalled_since = math.inf  # when writes paused (or a close began) without progress since

    def pause_writing(self) -> None:
        self._stalled_since = time.monotonic()

    def resume_writing(self) -> None:
        self._stalled_since = math.inf

    def stalled_since(self, now: float) -> float:
        """Since when the client has taken nothing it was sent (``inf``: it is not behind)."""
        transport = self.transport
        if self._stalled_since == math.inf and transport is not None and transport.is_closing():
            self._stalled_since = now  # a close waiting for the client to take the rest
        return self._stalled_since

    def close(self, *, abort: bool = False) -> None:
        """Close after what was written has gone out, or ``abort``: drop it and reset the
        connection (what the kernel still holds for the client is dropped too)."""
        transport = self.transport
        if transport is None:
            return
        if not abort:
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        transport.abort()


class AiohttpConnection(ClientConnection):
    """A connection served by aiohttp's request handler (``handler``): handed off by the front
    door, or every connection when the front door is left out (``--access-log``). Passes every
    event on to the handler; only watches for a client that does not read (aiohttp's ``drain()``
    waits for such a client for ever)."""

    def __init__(self, front: Front, handler: asyncio.Protocol, *, handed_off: bool = False) -> None:
        super().__init__(front)
        self.handler = handler
        self.handed_off = handed_off

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        if not self.handed_off:  # a handed-off transport has its water marks already
            set_water_marks(transport)
        self.front.aiohttp_connections.add(self)
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.aiohttp_connections.discard(self)
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.handler.resume_writing()

    def paused_since(self, since: float) -> None:
        """The transport paused writing (at ``since``) before this connection was aiohttp's: tell
        the handler, or its ``drain()`` would not wait (the transport does not pause twice)."""
        self.pause_writing()
        self._stalled_since = since


class FrontProtocol(ClientConnection):
    """One client connection, until it is closed or handed to aiohttp.

    Back-pressure: while the transport has paused writing (the client is not taking its
    answers), vLLM's answer being relayed is held (``UpstreamConnection.hold``), the client is
    not read from (its pipelined requests stay in the kernel) and no next request is started."""

    def __init__(self, front: Front) -> None:
        super().__init__(front)
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Task[None] | None = None
        self.idle_since = time.monotonic()
        self._buf = b""
        self._body_wanted = 0
        self._body_ready: asyncio.Future[None] | None = None
        self._body_seen = 0.0  # when the last piece of the body being read came (loop time)
        self._body_timer: asyncio.TimerHandle | None = None
        self._close_after = False  # the current request asked for Connection: close
        self._reading = True
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._answered = False  # some of the current answer was written
        self._relaying: UpstreamConnection | None = None  # whose body is being relayed now
        self._relay_started = False  # vLLM's head went to the client (see _relay_start)
        self._relay_chunked = False  # the client's answer is chunked: it ends with a last chunk
        self._is_head = False  # the request being relayed is a HEAD
        self._request_id = ""  # the id of the request being served (``request.request_id``)

    # --------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        set_water_marks(transport)
        self.front.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        if self.task is None:
            self._next()
        elif self._body_ready is not None:
            self._body_seen = self.loop.time()  # a pause in the body starts again (--client-timeout)
            if len(self._buf) >= self._body_wanted and not self._body_ready.done():
                self._body_ready.set_result(None)
        elif len(self._buf) > MAX_BUFFERED:
            self._pause_reading()  # a pipelined request piles up: wait for this response

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.gone(self)
        if self.task is not None:
            self.task.cancel()  # drops the upstream connection: vLLM aborts the request
        self._wake_writer()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_paused = True
        if self._relaying is not None:
            self._relaying.hold()  # stop reading from vLLM until the client has taken this
        self._pause_reading()  # and from the client: its next requests wait in the kernel

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_paused = False
        self._wake_writer()
        if self.transport is None or self.transport.is_closing():
            return
        if self.task is None:
            self._resume_reading()
            if self._buf:
                self._next()  # the pipelined request that waited for the client
        elif len(self._buf) <= MAX_BUFFERED:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading and self.transport is not None:
            self._reading = True
            self.transport.resume_reading()

    def _wake_writer(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # ------------------------------------------------------------ requests

    def _next(self) -> None:
        """Look at the buffered bytes: serve a complete request head, or hand off."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            # Not a request head in the making (TLS, garbage, a huge head): aiohttp answers it.
            line_end = buf.find(b"\r\n")
            if len(buf) > MAX_HEAD or not _START.match(buf if line_end < 0 else buf[: line_end + 2]):
                self._hand_off()
            return
        if self.front.closing:
            self.close()
            return
        head = parse_request_head(buf[: end + 2])
        if head is None or not self.front.takes(head):
            self._hand_off()
            return
        if self._write_paused:
            return  # the client has not taken the last answer yet: resume_writing comes back here
        self._buf = buf[end + 4 :]
        self.front.served += 1
        self.task = self.loop.create_task(self._serve(head))

    def _hand_off(self) -> None:
        """From now on aiohttp serves this connection, starting with the bytes buffered here."""
        transport = self.transport
        assert transport is not None
        self.front.gone(self)
        self.front.handed_off += 1
        handler = self.front.aiohttp_connection(handed_off=True)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._write_paused:
            handler.paused_since(self._stalled_since)
        if not self._reading:
            transport.resume_reading()  # aiohttp has limits of its own for what it reads
        data, self._buf = self._buf, b""
        if data:
            handler.data_received(data)

    async def _serve(self, head: RequestHead) -> None:
        keep_alive = head.keep_alive
        self._close_after = not keep_alive  # the answer then says Connection: close
        self._answered = self._relay_started = False
        self._request_id = rid = request_id(head.sent_id)
        try:
            body = await self._read_body(head.length) if head.length else None
            keep_alive = await self._forward(head, body) and keep_alive
        except ProxyError as exc:  # raised before any of the answer was written
            keep_alive = keep_alive and not closes_connection(exc)
            exc.headers[REQUEST_ID] = rid
            self._write(exc.raw(close=not keep_alive))
        except asyncio.CancelledError:
            keep_alive = False  # the client went away, or the proxy is shutting down
            raise
        except Exception:
            log.exception(
                "relaying %s %r failed (request %s)",
                head.method.decode(),
                head.target,
                rid,
                extra={"request_id": rid},
            )
            keep_alive = False
            if not self._answered:
                failed = ProxyError("the proxy failed to relay this request; see its log")
                failed.headers[REQUEST_ID] = rid
                self._write(failed.raw(close=True))
        finally:
            self.task = None
            self.idle_since = time.monotonic()
            if not keep_alive or self.front.closing:
                self.close()
            elif not self._write_paused:
                self._resume_reading()
        if self._buf and self.transport is not None and not self.transport.is_closing():
            self._next()  # a pipelined request (not before the client takes this answer)

    async def _read_body(self, length: int) -> bytes:
        """The body (``length`` bytes). ``--client-timeout`` is the longest pause allowed between
        two pieces of it (then 408), as on the aiohttp path (``proxy.body_pieces``)."""
        if len(self._buf) < length:
            self._body_wanted = length
            self._body_ready = self.loop.create_future()
            self._body_seen = self.loop.time()
            self._body_timer = self.loop.call_later(self.front.client_timeout, self._body_paused)
            try:
                await self._body_ready
            finally:
                self._body_ready = None
                self._body_timer.cancel()
        body, self._buf = self._buf[:length], self._buf[length:]
        return body

    def _body_paused(self) -> None:
        """The pause timer of :meth:`_read_body`: a 408 once no piece came for the timeout."""
        ready = self._body_ready
        if ready is None or ready.done():
            return
        timeout = self.front.client_timeout
        due = self._body_seen + timeout
        if self.loop.time() < due:
            self._body_timer = self.loop.call_at(due, self._body_paused)
        else:
            ready.set_exception(body_stalled(timeout))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _forward(self, head: RequestHead, body: bytes | None) -> bool:
        """Send the request to vLLM and relay its answer; False when the connection must close.
        If a stop or switch began since the head was read (the body may have taken a while),
        ``admitted`` waits for the model like the application does, or answers 503."""
        pipeline = self.front.pipeline
        request = RelayRequest(
            head.method,
            head.target,
            head.lines,
            head.names,
            head.connection,
            None if body is None else len(body),
            body,
            None,
            self._request_id,
        )
        async with pipeline.admitted(request) as instance:
            self._is_head = request.is_head
            conn, answer = await pipeline.send(request, instance, framed=True, on_head=self._relay_start)
            with pipeline.lease(conn, instance) as lease:
                try:
                    return await pipeline.relay(lease, answer, self, request)
                finally:
                    self._relaying = None

    def _relay_start(self, conn: UpstreamConnection, answer: ResponseHead) -> None:
        """vLLM's head and what came with it, to the client. Called from the upstream's
        ``data_received`` as soon as the head is read (``on_head``), not a loop iteration
        later: a whole answer goes out in one write; otherwise the head goes now and the rest
        follows straight from ``data_received``."""
        transport = self.transport
        if self._relay_started or transport is None:
            return
        self._relay_started = True
        is_head = self._is_head
        has_body = not is_head and answer.status not in (204, 304)
        self._relay_chunked = chunked = has_body and answer.length is None  # chunks for the client
        pending = [
            response_head(
                answer,
                close=self._close_after,
                chunked=chunked or (is_head and answer.chunked),
                request_id=self._request_id,
            )
        ]
        self._answered = True
        conn.attach(pending.append)  # pieces come framed for the client (``framed=True``)
        if conn.complete:  # the whole answer came with its head: one write
            if chunked and not conn.sent_last_chunk:
                pending.append(LAST_CHUNK)
            transport.writelines(pending)
            return
        transport.writelines(pending)

        def sink(piece: bytes) -> None:
            if transport.is_closing():
                raise ConnectionResetError("the client went away")
            transport.write(piece)

        conn.attach(sink, client=transport)  # back-pressure: pause_writing calls conn.hold()
        self._relaying = conn
        if self._write_paused:
            conn.hold()

    # The client side of the relay (``pipeline.RelayClient``), driven by ``Pipeline.relay``.

    async def relay_start(self, conn: UpstreamConnection, answer: ResponseHead) -> None:
        self._relay_start(conn, answer)  # done already unless on_head was not called

    def relay_gone(self, exc: BaseException) -> BaseException | None:
        transport = self.transport
        if transport is None or transport.is_closing() or isinstance(exc, ConnectionResetError):
            return asyncio.CancelledError()  # the client went away
        return None

    async def relay_end(self, conn: UpstreamConnection) -> None:
        if self._relaying is not None and self._relay_chunked and not conn.sent_last_chunk:
            self._write(LAST_CHUNK)

    async def relay_break_off(self, event: bytes | None) -> None:
        """vLLM broke off mid-response: tell an SSE client, then close (``_serve``) without
        the last chunk, so the response can never look complete."""
        if event is not None:
            self._write(frame_chunk(event) if self._relay_chunked else event)

    async def relay_drain(self) -> None:
        if self._write_paused and self.transport is not None and not self.transport.is_closing():
            self._writable = self.loop.create_future()
            await self._writable
