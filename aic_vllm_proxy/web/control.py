"""The proxy's own HTTP routes. Everything else goes to vLLM (``proxy.py``).

None of these paths is used by vLLM (whose routes include /health, /metrics, /version, /ping,
/tokenize, /detokenize, /v1/..., /pooling, /score, /rerank, /invocations), so the proxy never
shadows vLLM, with two exceptions: ``POST /load`` is the proxy's (vLLM's ``GET /load``, its
server load, still goes to vLLM: :data:`SHARED_WITH_VLLM`), and ``GET /v1/models`` is answered
by the proxy when requests are routed by model (:func:`v1_models`). The proxy's own liveness
check is ``GET /proxy/health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timezone
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from aic_vllm_proxy import __version__
from aic_vllm_proxy.catalog import CatalogInfo, PolicyError, resolve
from aic_vllm_proxy.engine.logs import follow, iter_file, parse_lines_param, tail_lines_async, tail_with_cause
from aic_vllm_proxy.events import CURRENT_REQUEST, encode
from aic_vllm_proxy.metrics import CONTENT_TYPE
from aic_vllm_proxy.node_protocol import CONNECT_PATH
from aic_vllm_proxy.relay.auth import authorize_metrics
from aic_vllm_proxy.relay.errors import BadRequest, ProxyError, body_too_large
from aic_vllm_proxy.relay.passthrough import read_body
from aic_vllm_proxy.relay.request import REQUEST_ID
from aic_vllm_proxy.relay.routes import OwnRoutes
from aic_vllm_proxy.schemas import (
    LoadRequest,
    PluginList,
    ProcessState,
    SwitchRequest,
    UnloadRequest,
    UnloadResult,
    to_json,
)
from aic_vllm_proxy.spec import ModelSpec, SpecError
from aic_vllm_proxy.web import nodes, ui
from aic_vllm_proxy.web.appkeys import EVENTS, KEYS, METRICS, PASSTHROUGH, PLUGINS, SETTINGS, SUPERVISOR

routes = web.RouteTableDef()
Body = TypeVar("Body", bound=BaseModel)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


@routes.get("/proxy/health")
async def proxy_health(request: web.Request) -> web.Response:
    """The proxy process is up (says nothing about vLLM: see /status)."""
    return _json({"status": "ok", "version": __version__})


@routes.get("/proxy/metrics")
async def proxy_metrics(request: web.Request) -> web.Response:
    """The proxy's own metrics in the Prometheus text format (docs/metrics.md): open when no
    key is configured, else for an admin key or a metrics key. vLLM's own are at /metrics
    (``?model=NAME`` for one instance's)."""
    authorize_metrics(request.app[KEYS], request)
    response = web.Response(body=request.app[METRICS].exposition())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


@routes.get("/status")
async def status(request: web.Request) -> web.Response:
    return _json(to_json(request.app[SUPERVISOR].status()))


async def _read_json(request: web.Request, usage: str) -> object:
    """A control route's JSON body, within the proxy's limits for client bodies: too long a
    Content-Length is a 413 at once, a body that pauses for --client-timeout a 408."""
    settings = request.app[SETTINGS]
    length = request.content_length
    if length is not None and length > settings.max_body_size:
        raise body_too_large(settings.max_body_size, length)
    data = await read_body(request, settings.client_timeout, settings.max_body_size)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # also too deep, or a number too long for Python
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise BadRequest(f"the body is not valid JSON ({reason}); send {usage}") from None


def _validated(model: type[Body], raw: object, what: str, usage: str) -> Body:
    """``raw`` (a request's JSON) as ``model``, or a 400/422 that says what is wrong."""
    if not isinstance(raw, dict):
        raise BadRequest(f"the body must be a JSON object: {usage}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
        )
        raise ProxyError(
            f"invalid {what} request ({problems}); send {usage}",
            status=422,
            type="invalid_request_error",
        ) from None


async def _switch_request(request: web.Request) -> SwitchRequest:
    usage = '{"model_spec": "MODEL [ARGS]"}'
    return _validated(SwitchRequest, await _read_json(request, usage), "switch", usage)


def _resolved(request: web.Request, text: str, param: str) -> tuple[ModelSpec, str | None]:
    """A spec or catalogue name resolved under the proxy's policy (400 or 403 if refused)."""
    settings = request.app[SETTINGS]
    try:
        return resolve(
            text,
            settings.models,
            policy=settings.model_policy,
            denied_flags=settings.effective_denied_flags,
        )
    except SpecError as exc:
        raise BadRequest(str(exc), param=param) from None
    except PolicyError as exc:
        raise ProxyError(str(exc), status=403, type="permission_error", param=param) from None


@routes.post("/switch")
async def switch(request: web.Request) -> web.Response:
    """Load a model (stopping the current one); 200 when ready, 202 with ``"wait": false``."""
    body = await _switch_request(request)
    spec, entry = _resolved(request, body.model_spec, "model_spec")
    supervisor = request.app[SUPERVISOR]
    if not body.wait:
        launched = supervisor.switch_in_background(spec, force=body.force, entry=entry)
        accepted = supervisor.status()
        accepted.accepted_model_spec = launched.raw
        return _json(to_json(accepted), status=202)
    return _json(to_json(await supervisor.switch(spec, force=body.force, entry=entry)))


@routes.post("/load")
async def load(request: web.Request) -> web.Response:
    """Load a model beside the others (a catalogue entry, or a free-form spec where the policy
    allows it); 200 when ready, 202 with ``"wait": false``. Models in its way are unloaded."""
    usage = '{"model": "NAME", "wait": true}'
    body = _validated(LoadRequest, await _read_json(request, usage), "load", usage)
    supervisor = request.app[SUPERVISOR]
    # A catalogue entry's name, alias or model id loads that entry; anything else is a spec.
    spec, entry = _resolved(request, supervisor.entry_named(body.model) or body.model, "model")
    try:
        footprint = request.app[SETTINGS].footprint(spec, entry, supervisor.node)
    except SpecError as exc:
        raise BadRequest(str(exc), param="model") from None
    name = entry or supervisor.names_for(spec, None)[0].served_name
    result = await asyncio.shield(supervisor.load(name, spec, footprint, wait=body.wait))
    return _json(to_json(result), status=200 if body.wait else 202)


@routes.post("/unload")
async def unload(request: web.Request) -> web.Response:
    """Drain, then stop one instance (``"force": true`` cuts its requests instead)."""
    usage = '{"model": "NAME"}'
    body = _validated(UnloadRequest, await _read_json(request, usage), "unload", usage)
    return _json(to_json(await asyncio.shield(_unload(request, body))))


async def _unload(request: web.Request, body: UnloadRequest) -> UnloadResult:
    supervisor = request.app[SUPERVISOR]
    name, ran, outcome = await supervisor.unload(body.model, drain=not body.force)
    return UnloadResult(
        changed=ran,
        name=name,
        drained=outcome.drained,
        cut=outcome.cut,
        message=f"{name} is unloaded" if ran else f"{name} was not loaded",
        status=supervisor.status(),
    )


@routes.post("/stop")
async def stop(request: web.Request) -> web.Response:
    """Stop every vLLM instance, or ``{"model": NAME}`` one (after draining in-flight requests;
    ``{"force": true}`` or ``?force=1`` cuts them)."""
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    model = None
    if request.can_read_body:
        body = await _read_json(request, 'an empty body or JSON like {"force": true} or {"model": "NAME"}')
        force = force or (isinstance(body, dict) and bool(body.get("force")))
        if isinstance(body, dict) and body.get("model") is not None:
            if not isinstance(body["model"], str):
                raise BadRequest("model must be the name of a model (a string)", param="model")
            model = body["model"]
    supervisor = request.app[SUPERVISOR]
    if model is not None:
        await asyncio.shield(supervisor.unload(model, drain=not force))
        return _json(to_json(supervisor.status()))
    return _json(to_json(await asyncio.shield(supervisor.stop(drain=not force))))


#: A model's ``status`` in ``GET /v1/models``, by its instance's state.
MODEL_STATUS = {
    ProcessState.READY: "ready",
    ProcessState.STARTING: "loading",
    ProcessState.DRAINING: "stopping",
    ProcessState.STOPPING: "stopping",
    ProcessState.STOPPED: "stopped",
    ProcessState.FAILED: "failed",
    ProcessState.PARKING: "stopping",
    ProcessState.SLEEPING: "sleeping",
    ProcessState.WAKING: "loading",
}


def _card(
    name: str, root: str | None, status: str, created: datetime | None, **extra: object
) -> dict[str, object]:
    """One model as OpenAI's ``GET /v1/models`` lists it (vLLM's fields), with its ``status``."""
    stamp = int((created or datetime.now(timezone.utc)).timestamp())
    card: dict[str, object] = {"id": name, "object": "model", "created": stamp, "owned_by": "vllm"}
    return {**card, "root": root, "parent": None, "status": status, **extra}


def model_cards(request: web.Request) -> list[dict[str, object]]:
    """Every name a request may use: the names each instance answers to, then the catalogue
    entries not listed yet, each with its ``status`` (``ready``, ``loading``, ``stopping``,
    ``stopped``, ``failed``)."""
    supervisor = request.app[SUPERVISOR]
    cards: dict[str, dict[str, object]] = {}
    for item in supervisor.instance_statuses():
        loading = item.switching and item.state is not ProcessState.READY
        status = "loading" if loading else MODEL_STATUS[item.state]
        root = ModelSpec.parse(item.model_spec).model if item.model_spec else None
        for name in item.served_names:
            if name not in cards or status == "ready":
                cards[name] = _card(name, root, status, item.started_at, instance=item.name)
    for key, entry in request.app[SETTINGS].models.items():
        if key not in cards:
            cards[key] = _card(key, entry.model, "stopped", None)
    return list(cards.values())


async def v1_models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: answered by the proxy when requests are routed by model (several
    models, or a catalogue); otherwise vLLM answers, as always."""
    if request.method not in ("GET", "HEAD") or not request.app[SUPERVISOR].routing:
        return await request.app[PASSTHROUGH].handle(request)
    return _json({"object": "list", "data": model_cards(request)})


@routes.get("/models/catalog")
async def catalog(request: web.Request) -> web.Response:
    """What may be loaded: the policy, the denied flags and the catalogue entries."""
    settings = request.app[SETTINGS]
    info = CatalogInfo(
        policy=settings.model_policy,
        denied_flags=list(settings.effective_denied_flags),
        models=settings.models,
    )
    return _json(info.model_dump(mode="json"))


@contextlib.contextmanager
def _open_log(request: web.Request) -> Iterator[int]:
    """The current launch's log file, opened (a descriptor), or a 404 that says there is none
    yet. Its name is read and opened in one step of the event loop, so a log that gets its
    final name meanwhile (``Supervisor._start``) is still the one read."""
    model = request.query.get("model")
    rank = _rank_param(request)
    path = request.app[SUPERVISOR].current_log(model, rank)
    try:
        fd = os.open(path, os.O_RDONLY) if path is not None else -1
    except FileNotFoundError:
        fd = -1
    if fd < 0 and rank:
        raise ProxyError(
            f"No log of rank {rank}: {model or 'the model'} has had no rank {rank} on another node "
            "(only a model across nodes, --nnodes, has ranks beyond 0)",
            status=404,
            type="not_found_error",
        )
    if fd < 0:
        raise ProxyError(
            f"No vLLM log yet: {model} has not been loaded. Load it with POST /load."
            if model
            else "No vLLM log yet: no model has been started. Load one with POST /switch.",
            status=404,
            type="not_found_error",
        )
    try:
        yield fd
    finally:
        os.close(fd)


def _rank_param(request: web.Request) -> int:
    """``?rank=N``: the log of rank N of a model across nodes (the head's copy); 0: rank 0's."""
    raw = request.query.get("rank", "0")
    if not raw.isdigit() or len(raw) > 6:
        raise BadRequest(f"rank must be a whole number (0 for the head's rank), got {raw!r}", param="rank")
    return int(raw)


@routes.get("/logs/current")
async def logs_current(request: web.Request) -> web.StreamResponse:
    """The whole current log, streamed from the file (never read into memory whole)."""
    with _open_log(request) as fd:
        response = _streamed({"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        async for chunk in iter_file(fd):
            await response.write(chunk)
        await response.write_eof()
    return response


@routes.get("/logs/tail")
async def logs_tail(request: web.Request) -> web.Response:
    """Exactly the last ``lines`` lines (default 200), read from the end of the file. With
    ``cause=1``, a failure's root cause comes first when it is further up (a marker line says
    how many lines are left out), as in a failed switch's ``log_tail``."""
    try:
        lines = parse_lines_param(request.query.get("lines"))
    except ValueError as exc:
        raise BadRequest(str(exc), param="lines") from None
    cause = request.query.get("cause", "0")
    if cause not in ("0", "1"):
        raise BadRequest("cause must be 0 or 1", param="cause")
    with _open_log(request) as fd:
        tail = (await tail_with_cause(fd, lines))[0] if cause == "1" else await tail_lines_async(fd, lines)
    text = "\n".join(tail)
    return web.Response(text=text + "\n" if text else "", content_type="text/plain")


@routes.get("/logs/stream")
async def logs_stream(request: web.Request) -> web.StreamResponse:
    """Follow the current log live (``tail -n LINES -f``); ends when the process ends."""
    try:
        lines = parse_lines_param(request.query.get("lines"), default=50)
    except ValueError as exc:
        raise BadRequest(str(exc), param="lines") from None
    supervisor = request.app[SUPERVISOR]
    with _open_log(request) as fd:
        response = _streamed({"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache"})
        await response.prepare(request)
        model, rank = request.query.get("model"), _rank_param(request)
        async for chunk in follow(fd, lines, lambda: supervisor.log_is_live(fd, model, rank)):
            await response.write(chunk)
        await response.write_eof()
    return response


@routes.get("/events")
async def events(request: web.Request) -> web.StreamResponse:
    """What happens to the models, live, as Server-Sent Events (docs/events.md): a ``hello``
    first, then every event as it is published, a keep-alive comment when there is none for
    ``--events-keepalive`` seconds. ``Last-Event-ID``: the events after it still kept come
    first. A reader that falls behind loses the oldest and is told (``dropped``); it never
    slows the daemon. Ends when the daemon stops."""
    bus = request.app[EVENTS]
    keepalive = request.app[SETTINGS].events_keepalive
    after = _last_event_id(request.headers.get("Last-Event-ID"))
    response = _streamed(
        {
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # a proxy in front (nginx) must not buffer it
        }
    )
    if request.method == "HEAD":  # the head only: nothing to follow
        await response.prepare(request)
        return response
    with bus.subscribe(after) as subscription:
        await response.prepare(request)
        await response.write(encode(bus.make("hello", None, last_id=bus.last_id)))
        while True:
            try:
                event = await subscription.get(keepalive)
            except asyncio.TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if event is None:  # the daemon is stopping
                break
            await response.write(encode(event))
    await response.write_eof()
    return response


def _streamed(headers: dict[str, str]) -> web.StreamResponse:
    """An answer written as it goes, with the request's id (the guard adds it to the others)."""
    return web.StreamResponse(headers={**headers, REQUEST_ID: CURRENT_REQUEST.get() or ""})


def _last_event_id(value: str | None) -> int | None:
    """``Last-Event-ID`` as an event id (None: absent or not one of ours)."""
    digits = (value or "").strip()
    return int(digits) if digits.isdigit() and len(digits) <= 18 else None


@routes.get("/plugins")
async def plugins(request: web.Request) -> web.Response:
    return _json(to_json(PluginList(plugins=request.app[PLUGINS])))


# The agents of a model across nodes (web/nodes.py): admin only.
routes.get("/nodes")(nodes.list_nodes)
routes.get(CONNECT_PATH)(nodes.connect)

# The status page (web/ui.py): open, like /proxy/health; the front door leaves it to aiohttp.
routes.get("/ui")(ui.page)
routes.get("/ui/{name:.*}")(ui.asset)


def methods_by_path() -> dict[str, list[str]]:
    """The proxy's own paths and the methods each accepts (GET implies HEAD)."""
    found: dict[str, set[str]] = {}
    for route in routes:
        if isinstance(route, web.RouteDef):
            found.setdefault(route.path, set()).update(
                {route.method, "HEAD"} if route.method == "GET" else {route.method}
            )
    return {path: sorted(methods) for path, methods in found.items()}


def own_routes() -> OwnRoutes:
    """The matcher for the proxy's own paths (any method: a wrong one is the 405 of
    :func:`method_not_allowed`), handed to the front door, which leaves them to aiohttp."""
    return OwnRoutes(methods_by_path())


#: The proxy's paths that vLLM has too, with other methods: those methods go to vLLM
#: (vLLM's ``GET /load`` is its server load; the proxy's ``POST /load`` loads a model).
SHARED_WITH_VLLM = {"/load": ("GET", "HEAD")}


def method_not_allowed(
    path: str, methods: list[str]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    allowed = ", ".join(methods)
    vllms = SHARED_WITH_VLLM.get(path, ())

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method in vllms:
            return await request.app[PASSTHROUGH].handle(request)
        raise ProxyError(
            f"{request.method} is not allowed on {path}, which is the proxy's own route: use {allowed}",
            status=405,
            type="invalid_request_error",
            headers={"Allow": allowed},
        )

    return handler
