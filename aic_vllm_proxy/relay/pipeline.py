"""The request pipeline both HTTP paths drive: the front door (``front.py``) and the aiohttp
adapter (``passthrough.py``) each read a request their own way, and share here what happens to
it on its way to vLLM and back:

- admission: the body's size limit (413), waiting for a model (bounded; the engine's error as
  the web plane's HTTP answer), and counting the request in flight for the drain before a stop
  (:meth:`Pipeline.admitted`);
- the upstream exchange: vLLM's request head built from the adapter's ``RelayRequest`` (one
  builder, ``headers.request_head``), the pooled connection, the one retry on a stale one, a
  streamed body, vLLM unreachable as a 502 that says what the proxy sees (:meth:`Pipeline.send`);
- the end of the relay: the connection is watched by the supervisor while it is relayed, and
  afterwards released to the pool after a complete answer, or aborted (vLLM then aborts the
  request) after anything else (:meth:`Pipeline.lease`); vLLM breaking off mid-answer is one
  message and, for event streams, one SSE ``error`` event (:meth:`Pipeline.broke_off`).

The per-token path is not here: a token goes from the upstream connection's ``data_received``
straight to the client's transport (``upstream.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Protocol
from urllib.parse import parse_qs

from aic_vllm_proxy.engine.instance import Instance
from aic_vllm_proxy.engine.supervisor import Supervisor
from aic_vllm_proxy.errors import EngineError
from aic_vllm_proxy.events import CURRENT_REQUEST
from aic_vllm_proxy.metrics import UNKNOWN, RequestStats, status_class
from aic_vllm_proxy.relay.errors import ProxyError, UpstreamError, body_too_large
from aic_vllm_proxy.relay.headers import drops_authorization, request_head
from aic_vllm_proxy.relay.model_field import requested_model
from aic_vllm_proxy.relay.request import RelayRequest
from aic_vllm_proxy.relay.routes import api_route
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


def closes_connection(exc: ProxyError) -> bool:
    """Whether an error answer ends the client's connection, on both HTTP paths: a 408 does
    (the rest of the body may still come, and must not be read as a next request)."""
    return exc.status == 408


def sse_error_event(message: str) -> bytes:
    """The SSE event that tells a streaming client vLLM broke off (OpenAI's error shape)."""
    event = {"error": {"message": message, "type": "upstream_error", "code": 502}}
    return f"data: {json.dumps(event)}\n\n".encode()


def scraped_model(target: bytes) -> str | None:
    """The instance ``GET /metrics?model=NAME`` asks for vLLM's metrics of (None: the primary's)."""
    path, _, query = target.partition(b"?")
    if path != b"/metrics" or not query:
        return None
    values = parse_qs(query.decode("latin-1")).get("model")
    return values[0] if values else None


class RelayClient(Protocol):
    """The client side of a relay, as each adapter implements it (the front door's
    ``FrontProtocol``, the aiohttp adapter's ``AiohttpClient``). Between :meth:`relay_start`
    and the end, each piece of vLLM's answer goes from the upstream connection's
    ``data_received`` straight to the client's transport (the sink attached in
    :meth:`relay_start`): the per-token path has no call of this interface."""

    async def relay_start(self, conn: UpstreamConnection, answer: ResponseHead) -> None:
        """vLLM's head (and what came with it) to the client; attach the sink to ``conn``."""

    async def relay_drain(self) -> None:
        """Wait until the client has taken what waits for it (its transport resumed writing)."""

    def relay_gone(self, exc: BaseException) -> BaseException | None:
        """The error to raise if the client went away (``exc`` broke the relay), else None."""

    async def relay_end(self, conn: UpstreamConnection) -> None:
        """vLLM's answer is complete: end the client's (its last chunk)."""

    async def relay_break_off(self, event: bytes | None) -> None:
        """vLLM broke off: send ``event`` (if any), then end the connection without a clean
        end of the answer."""


class Admitted:
    """The request is in flight inside ``async with``, which gives the instance it goes to (see
    :meth:`Pipeline.admitted`); a plain class rather than a generator: it is on every request's
    path. Its end is counted in the metrics (:meth:`Pipeline.counted`)."""

    __slots__ = ("instance", "model", "pipeline", "request", "started")

    def __init__(self, pipeline: Pipeline, request: RelayRequest, model: str | None) -> None:
        self.pipeline = pipeline
        self.request = request
        self.model = model

    async def __aenter__(self) -> Instance:
        pipeline = self.pipeline
        self.started = time.monotonic()
        instance = pipeline.fleet.route(self.model)
        if instance is None or not instance.serving:
            try:
                if self.model is not None and self.request.body is None:
                    raise pipeline.not_scraped(self.model)  # a scrape never loads nor wakes one
                instance = await pipeline.admit(self.model, self.request.request_id)
            except ProxyError as exc:
                pipeline.counted(self, pipeline.model_label(self.model), exc.status)
                raise
        instance.request_started()  # no await since the check: the drain counts this
        self.instance = instance
        return instance

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        instance = self.instance
        instance.request_finished()
        status = self.request.status
        if status is None and exc is not None:
            status = _error_status(exc)
        self.pipeline.counted(self, instance.name, status)


def _error_status(exc: object) -> int | None:
    """The status a request that ended with ``exc`` before vLLM answered gets: a
    :class:`ProxyError`'s (vLLM unreachable: 502), None when the client went away, else the
    proxy's own failure (500)."""
    if isinstance(exc, ProxyError):
        return exc.status
    if isinstance(exc, (asyncio.CancelledError, ConnectionError)):
        return None
    return 500


class Lease:
    """An upstream connection being relayed, inside ``with`` (see :meth:`Pipeline.lease`)."""

    __slots__ = ("_unregister", "conn", "instance", "pool", "released")

    def __init__(self, pool: UpstreamPool, conn: UpstreamConnection, instance: Instance) -> None:
        self.pool = pool
        self.conn = conn
        self.instance = instance
        self.released = False

    def __enter__(self) -> Lease:
        self._unregister = self.instance.track_upstream(self.conn.abort)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._unregister()
        if not self.released:
            self.conn.abort()  # drops the connection: vLLM aborts the request

    def release(self) -> None:
        """The answer is complete: the connection goes back to the pool."""
        self.pool.release(self.conn)
        self.released = True


class Pipeline:
    """What both HTTP paths do with a request for vLLM; one per application."""

    #: The instances, which routes each request by the model it names (``Supervisor.route``).
    fleet: Supervisor

    def __init__(
        self,
        wait_timeout: float,
        *,
        strip_authorization: bool = False,
        max_body_size: int = 100 * 1024 * 1024,
        client_timeout: float = 60.0,
        http_error: Callable[[EngineError], ProxyError],
        metrics: RequestStats | None = None,
    ) -> None:
        self.wait_timeout = wait_timeout
        self.metrics = metrics  # the proxied requests' counts (None: not counted)
        self.http_error = http_error  # the web plane's table: an engine error as an HTTP answer
        self.strip_authorization = strip_authorization  # the proxy's own key stays here
        self.max_body_size = max_body_size
        self.client_timeout = client_timeout

    def bind(self, supervisor: Supervisor, pool: UpstreamPool) -> None:
        """Attach the supervisor and the slot's pool, which exist only once the application has
        started; the pools of the other instances' ports are made as they are first used."""
        self.fleet = supervisor
        self._first = pool
        self.pools: dict[int, UpstreamPool] = {pool.port: pool}

    def pool_for(self, instance: Instance) -> UpstreamPool:
        """The keep-alive connections to ``instance``'s vLLM (one pool per port)."""
        pool = self.pools.get(instance.port)
        if pool is None:
            first = self._first
            pool = UpstreamPool(first.host, instance.port, keepalive=first.keepalive)
            self.pools[instance.port] = pool
        return pool

    def close(self) -> None:
        """Close every pool's idle connections (the application is shutting down)."""
        for pool in self.pools.values():
            pool.close()

    @property
    def front_open(self) -> bool:
        """Whether the front door serves requests now: some instance takes requests (otherwise
        aiohttp's path waits for a switch, bounded, or answers 503)."""
        return self.fleet.serving_any

    def model_of(self, request: RelayRequest) -> str | None:
        """The model ``request`` names (its JSON body's ``model``, or ``?model=`` of vLLM's
        ``GET /metrics``), when requests are routed."""
        if not self.fleet.routing:
            return None
        if request.body is None:
            return scraped_model(request.target)
        return requested_model(request.body)

    # --------------------------------------------------------------- admission

    def check_length(self, length: int | None) -> None:
        """A 413 at once for an announced body over ``--max-body-size``."""
        if length is not None and length > self.max_body_size:
            raise body_too_large(self.max_body_size, length)

    async def admit(self, model: str | None, request_id: str | None = None) -> Instance:
        """The instance for a request naming ``model``, once it takes requests: loaded on demand
        and waited for (bounded), or raise the HTTP answer saying why not."""
        token = CURRENT_REQUEST.set(request_id)  # a load on demand is this request's doing
        try:
            return await self.fleet.admit(model, self.wait_timeout)
        except EngineError as exc:
            raise self.http_error(exc) from None
        finally:
            CURRENT_REQUEST.reset(token)

    def not_scraped(self, model: str) -> ProxyError:
        """The answer to ``GET /metrics?model=NAME`` when ``NAME`` is not serving now."""
        return ProxyError(
            f"{model} is not serving now, so it has no vLLM metrics to scrape; GET /status lists "
            "the instances and their names.",
            status=404,
            type="not_found_error",
        )

    def admitted(self, request: RelayRequest) -> Admitted:
        """``async with`` it: the request is in flight inside (the drain before a stop waits for
        it), and it names the instance ``request`` goes to (by its ``model``). Never sent to a
        vLLM that is not serving (starting, draining for a stop): it waits for the model like
        the application does, or gets the 503."""
        return Admitted(self, request, self.model_of(request))

    def counted(self, admitted: Admitted, model: str, status: int | None) -> None:
        """Count a request that ended (``status``: the answer's; None: the client left first)."""
        metrics = self.metrics
        if metrics is None:
            return
        request = admitted.request
        answered = request.answered_at
        metrics.record(
            model,
            api_route(request.target),
            status_class(status),
            time.monotonic() - admitted.started,
            None if answered is None else answered - admitted.started,
        )

    def model_label(self, model: str | None) -> str:
        """The ``model`` label of a request refused before it reached an instance: the instance
        or catalogue entry it names, else :data:`~aic_vllm_proxy.metrics.UNKNOWN` (never what
        the client wrote: the series count stays bounded)."""
        fleet = self.fleet
        if model is None or not fleet.routing:
            return fleet.primary.name
        instance = fleet.find(model)
        if instance is not None:
            return instance.name
        return fleet.entry_named(model) or UNKNOWN

    # ---------------------------------------------------------------- upstream

    def request_head(self, request: RelayRequest, instance: Instance) -> bytes:
        """vLLM's request head for ``request`` (``headers.request_head``), with vLLM's own
        headers as they are now (its key may have changed since the last request)."""
        supplied = instance.upstream_headers()
        return request_head(
            request,
            self.pool_for(instance).host_header,
            supplied,
            drop_authorization=drops_authorization(self.strip_authorization, supplied),
        )

    async def send(
        self,
        request: RelayRequest,
        instance: Instance,
        *,
        framed: bool = False,
        on_head: OnHead | None = None,
    ) -> tuple[UpstreamConnection, ResponseHead]:
        """Send ``request`` to ``instance``'s vLLM; return the connection and vLLM's response
        head. A body in memory goes through :meth:`exchange` (retried on a stale connection), a
        stream through :meth:`upload`."""
        head = self.request_head(request, instance)
        if request.stream is not None:
            sent = await self.upload(instance, head, request)
        else:
            sent = await self.exchange(
                instance, head, request.body, no_body=request.is_head, framed=framed, on_head=on_head
            )
        request.status = sent[1].status  # for the metrics (Pipeline.counted)
        request.answered_at = time.monotonic()
        return sent

    async def acquire(self, instance: Instance) -> UpstreamConnection:
        try:
            return await self.pool_for(instance).acquire()
        except (OSError, asyncio.TimeoutError) as exc:
            raise self.unreachable(exc, instance) from exc

    async def exchange(
        self,
        instance: Instance,
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
            conn = await self.acquire(instance)
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
                raise self.unreachable(exc, instance) from exc
            except UPSTREAM_ERRORS as exc:
                conn.abort()
                raise self.unreachable(exc, instance) from exc
            except BaseException:
                conn.abort()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def upload(
        self, instance: Instance, head: bytes, request: RelayRequest
    ) -> tuple[UpstreamConnection, ResponseHead]:
        """Send a request whose body is streamed (large, or of unknown length) as it arrives;
        return the connection and vLLM's response head. Not retried: the body is not kept."""
        conn = await self.acquire(instance)
        try:
            return conn, await self._upload(conn, head, request)
        except UPSTREAM_ERRORS as exc:
            conn.abort()
            raise self.unreachable(exc, instance) from exc
        except BaseException:
            conn.abort()
            raise

    async def _upload(self, conn: UpstreamConnection, head: bytes, request: RelayRequest) -> ResponseHead:
        """Stream the body to vLLM while watching for its answer: vLLM may answer before the body
        is complete (an error, say), and then that answer is what the client gets."""
        assert request.stream is not None
        sending = asyncio.ensure_future(
            conn.start_streaming(
                head, request.stream, chunked=request.chunked, no_body_expected=request.is_head
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

    def unreachable(self, exc: BaseException, instance: Instance) -> UpstreamError:
        state = instance.machine.state
        return UpstreamError(
            f"vLLM at {instance.base} did not answer ({type(exc).__name__}: {exc}); the proxy sees it "
            f"as {state.value}. Check GET /status and GET /logs/tail.",
            state=state,
        )

    # ------------------------------------------------------------------- relay

    def lease(self, conn: UpstreamConnection, instance: Instance) -> Lease:
        """``with`` it while ``conn``'s answer is relayed: a stop or switch may abort it meanwhile
        (``track_upstream``); ``lease.release()`` after a complete answer, else it is aborted on
        the way out (vLLM aborts the request)."""
        return Lease(self.pool_for(instance), conn, instance)

    async def relay(
        self, lease: Lease, answer: ResponseHead, client: RelayClient, request: RelayRequest
    ) -> bool:
        """Relay vLLM's answer to ``request`` on ``lease`` to ``client``: start it, wait for its
        end (draining when the client is slow), then end the client's answer and release the
        connection. False when vLLM broke off (the client's connection must end); raises the
        client's error when it went away."""
        conn = lease.conn
        await client.relay_start(conn, answer)
        if not conn.complete:  # the rest comes as it arrives
            try:
                await conn.relay_rest(client.relay_drain)
            except (UpstreamClosed, UpstreamProtocolError, OSError) as exc:
                gone = client.relay_gone(exc)
                if gone is not None:
                    raise gone from exc
                await client.relay_break_off(self.broke_off(answer, exc, request, lease.instance))
                return False
        await client.relay_end(conn)
        lease.release()
        return True

    def broke_off(
        self, answer: ResponseHead, exc: BaseException, request: RelayRequest, instance: Instance
    ) -> bytes | None:
        """vLLM broke off mid-answer (``exc``) to ``request``: log it (with the request's id),
        and return the SSE ``error`` event to send an event-stream client before its connection
        is cut (never a clean end), or None."""
        message = (
            f"vLLM stopped in the middle of the response ({type(exc).__name__}: {exc}); "
            f"the proxy sees it as {instance.machine.state.value}. See GET /status."
        )
        log.warning(
            "%s %s (request %s): %s",
            request.method.decode(),
            request.target.decode("latin-1"),
            request.request_id,
            message,
            extra={"request_id": request.request_id, "model": instance.name},
        )
        if answer.headers.get("Content-Type", "").startswith("text/event-stream"):
            return sse_error_event(message)
        return None
