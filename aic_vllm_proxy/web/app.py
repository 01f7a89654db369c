"""Builds the aiohttp application: shared state, routes, start-up and shutdown.

Start-up (``cleanup_ctx``, in order): the one upstream connection pool, then the supervisor.
Shutdown runs them backwards: vLLM is stopped (and its whole tree gone) before the pool closes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web

from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.engine.supervisor import Supervisor
from aic_vllm_proxy.errors import EngineError
from aic_vllm_proxy.events import CURRENT_REQUEST, EventBus
from aic_vllm_proxy.hooks.runner import HookRunner, load_plugins
from aic_vllm_proxy.metrics import Metrics
from aic_vllm_proxy.relay.auth import KeyRing, authorize, check_request, keyring_from
from aic_vllm_proxy.relay.errors import ProxyError
from aic_vllm_proxy.relay.passthrough import Passthrough, request_id_of
from aic_vllm_proxy.relay.pipeline import Pipeline, closes_connection
from aic_vllm_proxy.relay.request import REQUEST_ID
from aic_vllm_proxy.relay.upstream import UpstreamPool
from aic_vllm_proxy.web import control
from aic_vllm_proxy.web.appkeys import (
    AGENTS,
    EVENTS,
    HOOKS,
    KEYS,
    METRICS,
    PASSTHROUGH,
    PLUGINS,
    POOL,
    SETTINGS,
    SUPERVISOR,
    UPSTREAM,
)
from aic_vllm_proxy.web.errors import http_error, http_exception_response

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: vLLM (uvicorn) closes idle keep-alive connections after 5 s; drop ours before that.
UPSTREAM_KEEPALIVE = 4.0

#: How the HTTP server must run this app (``web.run_app``/``AppRunner`` keyword arguments):
#: a client that leaves cancels its handler, so the upstream request is dropped at once; and
#: request bodies are passed on exactly as sent (a gzip body stays gzip, not decompressed).
SERVER_OPTIONS: dict[str, Any] = {"handler_cancellation": True, "auto_decompress": False}


def create_upstream_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,  # no cap: hundreds of concurrent streams must not queue in the proxy
        keepalive_timeout=UPSTREAM_KEEPALIVE,
        ttl_dns_cache=None,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
        auto_decompress=False,  # bytes pass through as vLLM sent them
        cookie_jar=aiohttp.DummyCookieJar(),  # never share cookies between users
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """The connections to vLLM: a lean keep-alive pool for proxied traffic, and an aiohttp
    session for the prober, health checks and hooks."""
    settings = app[SETTINGS]
    session = create_upstream_session()
    pool = UpstreamPool(settings.vllm_host, settings.vllm_port, keepalive=UPSTREAM_KEEPALIVE)
    app[UPSTREAM] = session
    app[POOL] = pool
    yield
    pool.close()
    await session.close()


def _guard(handler: Handler, keys: KeyRing) -> Handler:
    """Every route's handler runs inside this: the requests refused on both HTTP paths (a
    fragment, two Authorization headers), the key check (when keys are configured), and errors
    as OpenAI-style JSON bodies."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        rid = request_id_of(request)
        # The handler reads it there (passthrough), and so do the events it causes (a load...).
        token = CURRENT_REQUEST.set(rid)
        try:
            response = await _answer(request)
        finally:
            CURRENT_REQUEST.reset(token)  # aiohttp serves a connection's requests in one task
        if not response.prepared:  # the proxy's own answers; vLLM's carry it already
            response.headers[REQUEST_ID] = rid
        return response

    async def _answer(request: web.Request) -> web.StreamResponse:
        try:
            check_request(request)
            if keys.enabled:
                authorize(keys, request)
            return await handler(request)
        except EngineError as exc:
            return http_error(exc).response()
        except ProxyError as exc:
            if closes_connection(exc):
                exc.headers[REQUEST_ID] = CURRENT_REQUEST.get() or ""
                return await _last_answer(request, exc.response())
            return exc.response()
        except web.HTTPException as exc:
            response = http_exception_response(exc)
            if response is None:
                raise
            return response

    return guarded


async def _last_answer(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` with ``Connection: close`` and end the connection now, as the front
    door does: left to itself aiohttp would go on reading the rest of an unfinished body for up
    to 10 s (its lingering close) after a 408."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # the answer is in the transport's buffer: it goes out first
    return response


async def _end_event_streams(app: web.Application) -> None:
    """On shutdown: the ``/events`` streams end, so that nothing waits on them."""
    app[EVENTS].close()


def create_app(settings: Settings, *, extra_plugins: Iterable[tuple[str, object]] = ()) -> web.Application:
    """The daemon's application. Plugins are loaded here, explicitly, not at import time."""
    pm, infos = load_plugins(settings, extra_plugins)
    keys = keyring_from(settings)
    # No middlewares: each handler is wrapped once by _guard (aiohttp's middleware chain would
    # cost every proxied request more).
    app = web.Application(client_max_size=settings.max_body_size)
    app[SETTINGS] = settings
    metrics = app[METRICS] = Metrics()  # its own registry: GET /proxy/metrics
    events = app[EVENTS] = EventBus(settings.event_queue_size)  # GET /events
    events.listen(metrics.heard)
    app[HOOKS] = HookRunner(pm, settings, events)
    app[PLUGINS] = infos
    # The one request pipeline; the aiohttp adapter here, the front door's in web/server.py.
    pipeline = Pipeline(
        settings.request_wait_timeout,
        strip_authorization=keys.enabled,
        max_body_size=settings.max_body_size,
        client_timeout=settings.client_timeout,
        http_error=http_error,
        metrics=metrics.requests,
    )
    passthrough = Passthrough(pipeline)
    app[PASSTHROUGH] = passthrough
    app[KEYS] = keys

    async def supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
        supervisor = Supervisor(settings, lambda: app[UPSTREAM], app[HOOKS], events)
        app[SUPERVISOR] = supervisor
        metrics.watch_fleet(supervisor.instance_statuses, lambda: settings.models)
        metrics.watch_nodes(lambda: supervisor.nodes.statuses().nodes)
        passthrough.bind(supervisor, app[POOL])
        supervisor.start()  # TTL checks, and the catalogue entries to preload
        yield
        await supervisor.shutdown()
        pipeline.close()  # the pools of every instance's port (the slot's closes with the session)

    app[AGENTS] = set()
    app.on_shutdown.append(_end_event_streams)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(supervisor_ctx)
    for route in control.routes:
        if isinstance(route, web.RouteDef):
            guarded = web.RouteDef(route.method, route.path, _guard(route.handler, keys), route.kwargs)
            guarded.register(app.router)
    for path, methods in control.methods_by_path().items():
        # A wrong method on one of the proxy's own paths is a 405, not a request for vLLM.
        app.router.add_route("*", path, _guard(control.method_not_allowed(path, methods), keys))
    # Answered by the proxy when requests are routed by model (control.v1_models), else vLLM's.
    app.router.add_route("*", "/v1/models", _guard(control.v1_models, keys))
    app.router.add_route("*", "/{path:.*}", _guard(passthrough.handle, keys))
    return app
