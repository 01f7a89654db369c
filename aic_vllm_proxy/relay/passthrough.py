"""The streaming passthrough: every path the proxy does not own goes to vLLM, any method.

- The request body is streamed upstream (up to ``--max-body-size``); bodies up to 1 MiB are
  kept so a request can be re-sent once if a pooled keep-alive connection turns out to be stale
  (vLLM closes idle ones after 5 s).
- The response is relayed as vLLM writes it: each piece of body goes from the upstream
  connection's ``data_received`` straight to the client's transport (``upstream.py``), so an SSE
  token reaches the client at once and costs one callback; an answer with a Content-Length is
  relayed the same way, never read whole first. Status, headers and error bodies pass through
  (``headers.py``: the one header policy). A slow client pauses reading from vLLM at the water
  marks of ``flow.py`` (back-pressure), the same as on the front door: nothing piles up.
- A client that goes away cancels the handler (``handler_cancellation``), which drops the
  upstream connection, so vLLM aborts the generation.
- An upstream that breaks off mid-response (vLLM crashed or was stopped) breaks the client's
  response too, with an SSE ``error`` event first for event streams: never a clean end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial

from aiohttp import web

from aic_vllm_proxy.engine.supervisor import Supervisor
from aic_vllm_proxy.errors import EngineError
from aic_vllm_proxy.relay.errors import BadRequest, ProxyError, UpstreamError, body_stalled, body_too_large
from aic_vllm_proxy.relay.flow import over_high_water
from aic_vllm_proxy.relay.headers import HOP_BY_HOP as HOP_BY_HOP  # re-exported (tests)
from aic_vllm_proxy.relay.headers import connection_tokens, request_head, response_headers
from aic_vllm_proxy.relay.headers import filtered as _filtered  # noqa: F401  (re-exported: tests)
from aic_vllm_proxy.relay.upstream import (
    OnHead,
    ResponseHead,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamPool,
    UpstreamProtocolError,
)

log = logging.getLogger(__name__)

#: Bodies up to this size are held so that a request can be retried on a stale connection.
RETRYABLE_BODY = 1 << 20
UPSTREAM_ERRORS = (OSError, asyncio.TimeoutError, UpstreamClosed, UpstreamProtocolError)


async def body_pieces(request: web.Request, timeout: float, limit: int) -> AsyncIterator[bytes]:
    """A request body as it arrives. ``timeout`` (``--client-timeout``) is the longest pause
    allowed between two pieces (408 after it), not a deadline for the whole body; more than
    ``limit`` bytes in all is a 413."""
    content = request.content
    seen = 0
    while True:
        if content.is_eof():  # all of it has arrived: no pause to time
            piece = await content.readany()
        else:
            try:
                piece = await asyncio.wait_for(content.readany(), timeout)
            except asyncio.TimeoutError:
                raise body_stalled(timeout) from None
        if not piece:
            return
        seen += len(piece)
        if seen > limit:
            raise body_too_large(limit)
        yield piece


async def read_body(request: web.Request, timeout: float, limit: int) -> bytes:
    """A whole request body, read as :func:`body_pieces` says."""
    return b"".join([piece async for piece in body_pieces(request, timeout, limit)])


def closes_connection(exc: ProxyError) -> bool:
    """Whether an error answer ends the client's connection, on both HTTP paths: a 408 does
    (the rest of the body may still come, and must not be read as a next request)."""
    return exc.status == 408


def sse_error_event(message: str) -> bytes:
    """The SSE event that tells a streaming client vLLM broke off (OpenAI's error shape)."""
    event = {"error": {"message": message, "type": "upstream_error", "code": 502}}
    return f"data: {json.dumps(event)}\n\n".encode()


class Passthrough:
    """The catch-all handler; one instance per application."""

    supervisor: Supervisor
    pool: UpstreamPool

    def __init__(
        self,
        wait_timeout: float,
        *,
        strip_authorization: bool = False,
        max_body_size: int = 100 * 1024 * 1024,
        client_timeout: float = 60.0,
        http_error: Callable[[EngineError], ProxyError],
    ) -> None:
        self.wait_timeout = wait_timeout
        self.http_error = http_error  # the web plane's table: an engine error as an HTTP answer
        self.strip_authorization = strip_authorization  # the proxy's own key stays here
        self.max_body_size = max_body_size
        self.client_timeout = client_timeout

    def bind(self, supervisor: Supervisor, pool: UpstreamPool) -> None:
        """Attach the supervisor and pool, which exist only once the application has started."""
        self.supervisor = supervisor
        self.pool = pool

    async def wait_for_model(self) -> None:
        """Wait (bounded) until a model takes requests, or raise the HTTP answer saying why not."""
        try:
            await self.supervisor.wait_for_model(self.wait_timeout)
        except EngineError as exc:
            raise self.http_error(exc) from None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sup = self.supervisor
        if not request.raw_path.startswith("/"):
            raise BadRequest(f"cannot forward request target {request.raw_path!r}: expected a path")
        length = request.content_length
        if length is not None and length > self.max_body_size:
            raise body_too_large(self.max_body_size, length)
        if not sup.serving:
            await self.wait_for_model()
        sup.request_started()
        try:
            conn, head = await self._send(request, length)
            return await self._relay(request, conn, head)
        finally:
            sup.request_finished()

    # ----------------------------------------------------------------- request

    async def _send(
        self, request: web.Request, length: int | None
    ) -> tuple[UpstreamConnection, ResponseHead]:
        """Send the request; return the connection and vLLM's response head."""
        no_body = request.method == "HEAD"
        if request.body_exists and (length is None or length > RETRYABLE_BODY):  # streamed
            conn = await self._acquire()
            try:
                return conn, await self._upload(conn, request, length, no_body)
            except UPSTREAM_ERRORS as exc:
                conn.abort()
                raise self._unreachable(exc) from exc
            except BaseException:
                conn.abort()
                raise
        small = await self._read_small(request) if request.body_exists else None
        head = self._head(request, length=None if small is None else len(small), chunked=False)
        return await self.exchange(head, small, no_body=no_body)

    async def _acquire(self) -> UpstreamConnection:
        try:
            return await self.pool.acquire()
        except (OSError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc) from exc

    async def exchange(
        self,
        head: bytes,
        body: bytes | None,
        *,
        no_body: bool,
        framed: bool = False,
        on_head: OnHead | None = None,
    ) -> tuple[UpstreamConnection, ResponseHead]:
        """Send a request whose body is in memory; return the connection and vLLM's response
        head. A pooled connection that turns out to be stale (closed by vLLM while idle, before
        answering) is replaced once by a fresh one. ``on_head`` is called from the connection's
        ``data_received`` with vLLM's head, before this returns (see ``UpstreamConnection``)."""
        for attempt in (1, 2):
            conn = await self._acquire()
            reused = conn.used > 0
            conn.on_head = on_head
            try:
                conn.start(head, body, no_body_expected=no_body, framed=framed)
                return conn, await conn.head()
            except UpstreamClosed as exc:
                conn.abort()
                if exc.nothing_received and reused and attempt == 1:
                    log.debug("stale keep-alive connection to vLLM; retrying on a fresh one")
                    continue
                raise self._unreachable(exc) from exc
            except UPSTREAM_ERRORS as exc:
                conn.abort()
                raise self._unreachable(exc) from exc
            except BaseException:
                conn.abort()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _upload(
        self, conn: UpstreamConnection, request: web.Request, length: int | None, no_body: bool
    ) -> ResponseHead:
        """Stream a large body to vLLM while watching for its answer: vLLM may answer before the
        body is complete (an error, say), and then that answer is what the client gets."""
        head = self._head(request, length=length, chunked=length is None)
        sending = asyncio.ensure_future(
            conn.start_streaming(
                head, self._stream_body(request), chunked=length is None, no_body_expected=no_body
            )
        )
        answer = asyncio.ensure_future(conn.head())
        try:
            await asyncio.wait((sending, answer), return_when=asyncio.FIRST_COMPLETED)
            answered = answer.done() and not answer.cancelled() and answer.exception() is None
            body_sent = sending.done() and sending.exception() is None
            if answered and not body_sent:  # vLLM answered before taking the whole body
                conn.keep_alive_off()  # the rest of the body was not sent
                return answer.result()
            sending.result()  # the body went out (or raises why not)
            return await answer
        finally:
            for task in (sending, answer):
                if not task.done():
                    task.cancel()

    def _head(self, request: web.Request, *, length: int | None, chunked: bool) -> bytes:
        return request_head(
            request.method.encode(),
            request.raw_path.encode("utf-8", "surrogateescape"),
            request.raw_headers,
            connection_tokens(request.headers) if "Connection" in request.headers else (),
            self.pool.host_header,
            self.supervisor.upstream_headers(),
            strip_authorization=self.strip_authorization,
            length=length,
            chunked=chunked,
        )

    async def _read_small(self, request: web.Request) -> bytes:
        """A small body, whole (so it can be re-sent on a stale connection)."""
        return await read_body(request, self.client_timeout, self.max_body_size)

    def _stream_body(self, request: web.Request) -> AsyncIterator[bytes]:
        """A large or chunked body, passed upstream as it arrives, within the size limit."""
        return body_pieces(request, self.client_timeout, self.max_body_size)

    def _unreachable(self, exc: BaseException) -> UpstreamError:
        sup = self.supervisor
        state = sup.machine.state
        return UpstreamError(
            f"vLLM at {sup.base} did not answer ({type(exc).__name__}: {exc}); the proxy sees it "
            f"as {state.value}. Check GET /status and GET /logs/tail.",
            state=state,
        )

    # ---------------------------------------------------------------- response

    async def _relay(
        self, request: web.Request, conn: UpstreamConnection, head: ResponseHead
    ) -> web.StreamResponse:
        unregister = self.supervisor.track_upstream(conn.abort)
        released = False
        try:
            response = web.StreamResponse(
                status=head.status, reason=head.reason, headers=response_headers(head)
            )
            if head.length is not None:
                response.content_length = head.length
            writer = await response.prepare(request)
            assert writer is not None
            await response.write(b"")  # sends the headers now
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client went away")
            chunked = bool(getattr(writer, "chunked", False))

            def sink(piece: bytes) -> None:
                if transport.is_closing():
                    raise ConnectionResetError("the client went away")
                if chunked:
                    transport.writelines((b"%x\r\n" % len(piece), piece, b"\r\n"))
                else:
                    transport.write(piece)

            conn.attach(sink, partial(over_high_water, transport))  # = the transport paused writing
            try:
                await conn.relay_rest(writer.drain)
            except (UpstreamClosed, UpstreamProtocolError, OSError) as exc:
                if transport.is_closing() or isinstance(exc, ConnectionResetError):
                    raise ConnectionResetError("the client went away") from exc
                await self._break_off(request, response, head, exc)
                return response
            await response.write_eof()
            self.pool.release(conn)
            released = True
            # As on the front door: no next request until the client has taken this answer
            # (down to the low water mark).
            await writer.drain()
            return response
        finally:
            unregister()
            if not released:
                conn.abort()  # drops the connection: vLLM aborts the request

    def broke_off_message(self, exc: BaseException) -> str:
        return (
            f"vLLM stopped in the middle of the response ({type(exc).__name__}: {exc}); "
            f"the proxy sees it as {self.supervisor.machine.state.value}. See GET /status."
        )

    async def _break_off(
        self,
        request: web.Request,
        response: web.StreamResponse,
        head: ResponseHead,
        exc: BaseException,
    ) -> None:
        """vLLM broke off mid-response: tell an SSE client, then cut the connection so the
        response can never look complete."""
        message = self.broke_off_message(exc)
        log.warning("%s %s: %s", request.method, request.path, message)
        if head.headers.get("Content-Type", "").startswith("text/event-stream"):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write(sse_error_event(message))
        transport = request.transport
        if transport is not None:
            transport.close()  # flushes what was written, then closes: no terminating chunk
