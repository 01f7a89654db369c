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
import logging
from collections.abc import AsyncIterator, Collection, Iterable
from functools import partial

from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDictProxy

from aic_vllm_proxy.engine.instance import Instance
from aic_vllm_proxy.engine.supervisor import Supervisor
from aic_vllm_proxy.events import CURRENT_REQUEST
from aic_vllm_proxy.relay.dev_routes import dev_route, not_forwarded
from aic_vllm_proxy.relay.errors import BadRequest, ProxyError, body_stalled, body_too_large
from aic_vllm_proxy.relay.flow import over_high_water
from aic_vllm_proxy.relay.headers import connection_tokens, response_headers
from aic_vllm_proxy.relay.pipeline import RETRYABLE_BODY, Pipeline
from aic_vllm_proxy.relay.pipeline import closes_connection as closes_connection  # re-exported
from aic_vllm_proxy.relay.request import REQUEST_ID, RelayRequest, request_id
from aic_vllm_proxy.relay.upstream import (
    ResponseHead,
    UpstreamConnection,
    UpstreamPool,
)

log = logging.getLogger(__name__)


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


def header_fields(
    raw_headers: Iterable[tuple[bytes, bytes]], headers: CIMultiDictProxy[str]
) -> tuple[list[bytes], list[bytes], Collection[bytes]]:
    """aiohttp's reading of a request head as a ``RelayRequest``'s header lines, their names
    (lower case) and the names its ``Connection`` lists."""
    raw = list(raw_headers)
    lines = [name + b": " + value + b"\r\n" for name, value in raw]
    names = [name.lower() for name, _ in raw]
    connection = {token.encode() for token in connection_tokens(headers)} if "Connection" in headers else ()
    return lines, names, connection


def request_id_of(request: web.Request) -> str:
    """The id of an aiohttp request (:func:`~aic_vllm_proxy.relay.request.request_id`)."""
    sent = request.headers.getall(REQUEST_ID, ())
    return request_id(sent[0].encode("utf-8", "surrogateescape") if len(sent) == 1 else None)


class Passthrough:
    """The aiohttp adapter of the :class:`~aic_vllm_proxy.relay.pipeline.Pipeline`: the
    catch-all handler; one instance per application."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def bind(self, supervisor: Supervisor, pool: UpstreamPool) -> None:
        """Attach the supervisor and pool, which exist only once the application has started."""
        self.pipeline.bind(supervisor, pool)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rid = CURRENT_REQUEST.get() or request_id_of(request)  # made by the web layer's guard
        try:
            return await self._handle(request, rid)
        except ProxyError as exc:  # the proxy's own answer carries the id too
            exc.headers[REQUEST_ID] = rid
            raise

    async def _handle(self, request: web.Request, rid: str) -> web.StreamResponse:
        pipeline = self.pipeline
        if not request.raw_path.startswith("/"):
            raise BadRequest(f"cannot forward request target {request.raw_path!r}: expected a path")
        path = request.raw_path.partition("?")[0].encode("utf-8", "surrogateescape")
        if dev_route(path):
            raise not_forwarded(path)  # on both HTTP paths: the front door hands these off
        pipeline.check_length(request.content_length)
        relayed = await self._relay_request(request, rid)
        async with pipeline.admitted(relayed) as instance:
            conn, head = await pipeline.send(relayed, instance)
            return await self._relay(request, relayed, conn, head, instance)

    # ----------------------------------------------------------------- request

    async def _relay_request(self, request: web.Request, rid: str) -> RelayRequest:
        """The pipeline's request object for ``request``: its raw head, and its body whole when
        small (so it can be re-sent on a stale connection), else as it arrives (large, or of
        unknown length), within the size limit."""
        pipeline = self.pipeline
        length = request.content_length
        body = stream = None
        # A JSON body is read whole when requests are routed by its "model" (which the openai
        # client writes last): a large one then waits in memory, up to --max-body-size.
        routed = pipeline.fleet.routing and request.content_type == "application/json"
        if request.body_exists:
            if (length is None or length > RETRYABLE_BODY) and not routed:
                stream = body_pieces(request, pipeline.client_timeout, pipeline.max_body_size)
            else:
                body = await read_body(request, pipeline.client_timeout, pipeline.max_body_size)
                length = len(body)
        else:
            length = None
        lines, names, connection = header_fields(request.raw_headers, request.headers)
        return RelayRequest(
            request.method.encode(),
            request.raw_path.encode("utf-8", "surrogateescape"),
            lines,
            names,
            connection,
            length,
            body,
            stream,
            rid,
        )

    # ---------------------------------------------------------------- response

    async def _relay(
        self,
        request: web.Request,
        relayed: RelayRequest,
        conn: UpstreamConnection,
        head: ResponseHead,
        instance: Instance,
    ) -> web.StreamResponse:
        pipeline = self.pipeline
        client = AiohttpClient(request, head, relayed.request_id)
        with pipeline.lease(conn, instance) as lease:
            complete = await pipeline.relay(lease, head, client, relayed)
        if complete:
            # As on the front door: no next request until the client has taken this answer
            # (down to the low water mark).
            await client.relay_drain()
        return client.response


class AiohttpClient:
    """The client side of a relay (``pipeline.RelayClient``) through aiohttp's public API: a
    ``StreamResponse`` whose framing is decided here (``content_length``, or
    ``enable_chunked_encoding()`` for an HTTP/1.1 client when vLLM gave no length), and the
    body written to ``request.transport`` from the upstream connection's ``data_received``."""

    def __init__(self, request: web.Request, answer: ResponseHead, request_id: str = "") -> None:
        self.request = request
        self.response = web.StreamResponse(
            status=answer.status, reason=answer.reason, headers=response_headers(answer, request_id)
        )
        has_body = request.method != "HEAD" and answer.status not in (204, 304)
        # HTTP/1.0 without a length: until the connection closes, which aiohttp then does.
        self.chunked = has_body and answer.length is None and request.version == HttpVersion11
        if answer.length is not None:
            self.response.content_length = answer.length
        elif self.chunked:
            self.response.enable_chunked_encoding()
        self.writer: AbstractStreamWriter | None = None

    async def relay_start(self, conn: UpstreamConnection, answer: ResponseHead) -> None:
        response = self.response
        self.writer = await response.prepare(self.request)
        await response.write(b"")  # sends the headers now
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        chunked = self.chunked

        def sink(piece: bytes) -> None:
            if transport.is_closing():
                raise ConnectionResetError("the client went away")
            if chunked:
                transport.writelines((b"%x\r\n" % len(piece), piece, b"\r\n"))
            else:
                transport.write(piece)

        conn.attach(sink, partial(over_high_water, transport))  # = the transport paused writing

    async def relay_drain(self) -> None:
        if self.writer is not None:
            await self.writer.drain()

    def relay_gone(self, exc: BaseException) -> BaseException | None:
        transport = self.request.transport
        if transport is None or transport.is_closing() or isinstance(exc, ConnectionResetError):
            return ConnectionResetError("the client went away")
        return None

    async def relay_end(self, conn: UpstreamConnection) -> None:
        await self.response.write_eof()

    async def relay_break_off(self, event: bytes | None) -> None:
        """Tell an SSE client, then cut the connection so the response can never look
        complete."""
        if event is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.response.write(event)
        transport = self.request.transport
        if transport is not None:
            transport.close()  # flushes what was written, then closes: no terminating chunk
