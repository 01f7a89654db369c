"""The streaming passthrough: every path the proxy does not own goes to vLLM, any method.

- The request body is streamed upstream (no size limit beyond the proxy's own setting);
  small bodies are kept so a request can be re-sent once if a pooled keep-alive connection
  turns out to be stale (vLLM closes idle ones after 5 s).
- The response is relayed chunk by chunk as vLLM writes it: an SSE token reaches the client
  as soon as vLLM sends it. Status, headers and error bodies pass through unchanged.
- A client that goes away cancels the handler (``handler_cancellation``), which closes the
  upstream connection, so vLLM aborts the generation.
- An upstream that breaks off mid-response (vLLM crashed or was stopped) breaks the client's
  response too, with an SSE ``error`` event first for event streams: never a clean end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from aic_vllm_proxy.errors import BadRequest, ProxyError, UpstreamError
from aic_vllm_proxy.models import ProcessState
from aic_vllm_proxy.supervisor import Supervisor

log = logging.getLogger(__name__)

#: Headers that describe one connection, not the message: never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "expect",
    }
)
#: Bodies up to this size are held so that a request can be retried on a stale connection.
RETRYABLE_BODY = 1 << 20
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=None)
STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def _filtered(
    headers: CIMultiDict[str] | object, extra_drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    source: CIMultiDict[str] = headers  # type: ignore[assignment]
    drop = HOP_BY_HOP | extra_drop
    connection = source.get("Connection")
    if connection:
        drop = drop | {token.strip().lower() for token in connection.split(",")}
    return CIMultiDict((k, v) for k, v in source.items() if k.lower() not in drop)


def upstream_request_headers(
    request: web.Request, supplied: dict[str, str], strip_authorization: bool = False
) -> CIMultiDict[str]:
    headers = _filtered(request.headers)
    if strip_authorization:
        headers.popall("Authorization", None)
    if supplied:  # vLLM runs with its own --api-key: the proxy supplies it
        headers.update(supplied)
    return headers


class Passthrough:
    """The catch-all handler; one instance per application."""

    supervisor: Supervisor
    session: aiohttp.ClientSession

    def __init__(
        self,
        wait_timeout: float,
        *,
        strip_authorization: bool = False,
        max_body_size: int = 100 * 1024 * 1024,
        client_timeout: float = 60.0,
    ) -> None:
        self.wait_timeout = wait_timeout
        self.strip_authorization = strip_authorization  # the proxy's own key stays here
        self.max_body_size = max_body_size
        self.client_timeout = client_timeout

    def bind(self, supervisor: Supervisor, session: aiohttp.ClientSession) -> None:
        """Attach the supervisor and pool, which exist only once the application has started."""
        self.supervisor = supervisor
        self.session = session

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        sup = self.supervisor
        raw_path = request.raw_path
        if not raw_path.startswith("/"):
            raise BadRequest(f"cannot forward request target {raw_path!r}: expected a path")
        length = request.content_length
        if length is not None and length > self.max_body_size:
            raise ProxyError(
                f"the request body has {length} bytes; this proxy accepts at most "
                f"{self.max_body_size} (--max-body-size)",
                status=413,
                type="invalid_request_error",
            )
        if sup.machine.state is not ProcessState.READY or not sup.admitting:
            await sup.wait_for_model(self.wait_timeout)
        sup.request_started()
        try:
            url = URL(str(sup.base) + raw_path, encoded=True)
            headers = upstream_request_headers(request, sup.upstream_headers(), self.strip_authorization)
            body: bytes | AsyncIterator[bytes] | None = None
            if request.body_exists:
                if length is not None and length <= RETRYABLE_BODY:
                    body = await self._read_small(request, length)
                else:
                    body = self._stream_body(request)
            upstream = await self._send(request.method, url, headers, body)
            return await self._relay(request, upstream)
        finally:
            sup.request_finished()

    async def _read_small(self, request: web.Request, length: int) -> bytes:
        """A small body, whole (so it can be re-sent on a stale connection)."""
        if request.content.total_bytes >= length:
            return await request.read()  # already received: no timer needed
        try:
            return await asyncio.wait_for(request.read(), self.client_timeout)
        except asyncio.TimeoutError:
            raise self._slow_client() from None

    async def _stream_body(self, request: web.Request) -> AsyncIterator[bytes]:
        """A large or chunked body, passed upstream as it arrives, within the size limit."""
        content = request.content
        seen = 0
        while True:
            try:
                chunk = await asyncio.wait_for(content.readany(), self.client_timeout)
            except asyncio.TimeoutError:
                raise self._slow_client() from None
            if not chunk:
                return
            seen += len(chunk)
            if seen > self.max_body_size:
                raise ProxyError(
                    f"the request body is larger than {self.max_body_size} bytes (--max-body-size)",
                    status=413,
                    type="invalid_request_error",
                )
            yield chunk

    def _slow_client(self) -> ProxyError:
        return ProxyError(
            f"the request body stopped arriving for {self.client_timeout:g} s (--client-timeout)",
            status=408,
            type="invalid_request_error",
        )

    async def _send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:
        attempts = 1 if body is not None and not isinstance(body, bytes) else 2
        for attempt in range(attempts):
            try:
                return await self.session.request(
                    method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=UPSTREAM_TIMEOUT,
                )
            except STALE_CONNECTION as exc:
                if attempt + 1 < attempts and not isinstance(exc, aiohttp.ClientConnectorError):
                    log.debug("retrying %s %s on a fresh connection: %r", method, url.path, exc)
                    continue
                raise self._unreachable(exc) from exc
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise self._unreachable(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _unreachable(self, exc: BaseException) -> UpstreamError:
        sup = self.supervisor
        state = sup.machine.state
        return UpstreamError(
            f"vLLM at {sup.base} did not answer ({type(exc).__name__}: {exc}); the proxy sees it "
            f"as {state.value}. Check GET /status and GET /logs/tail.",
            state=state,
        )

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        sup = self.supervisor
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(_filtered(upstream.headers))
        if upstream.content_length is not None and "Content-Encoding" not in upstream.headers:
            response.content_length = upstream.content_length
        unregister = sup.track_upstream(upstream.close)
        clean = False
        try:
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                if request.transport is None or request.transport.is_closing():
                    raise  # the client went away: nothing to tell it
                await self._break_off(request, response, upstream, exc)
                return response
            await response.write_eof()
            clean = True
            return response
        finally:
            unregister()
            if clean:
                upstream.release()
            else:
                upstream.close()  # drops the connection: vLLM aborts the request

    async def _break_off(
        self,
        request: web.Request,
        response: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        exc: BaseException,
    ) -> None:
        """vLLM broke off mid-response: tell an SSE client, then cut the connection so the
        response can never look complete."""
        message = (
            f"vLLM stopped in the middle of the response ({type(exc).__name__}); "
            f"the proxy sees it as {self.supervisor.machine.state.value}. See GET /status."
        )
        log.warning("%s %s: %s", request.method, request.path, message)
        if upstream.content_type == "text/event-stream":
            event = {"error": {"message": message, "type": "upstream_error", "code": 502}}
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
        transport = request.transport
        if transport is not None:
            transport.close()  # flushes what was written, then closes: no terminating chunk
