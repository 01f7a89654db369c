"""The simulated vLLM HTTP API (aiohttp) with vLLM 0.32's status codes, headers and bodies.

Generation requests register a ``RequestCtx`` in ``SimState.inflight`` so that an
engine death or a shutdown can end them early (see ``_on_cut``). A client that
disconnects aborts its request at once (aiohttp cancels the handler) and the
``Aborted request(s) <id>.`` line is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import VLLM_VERSION
from .generation import (
    DONE,
    REQUEST_ID_HEX,
    OutputPlan,
    StreamFormatter,
    chat_response,
    completion_response,
    detokenize,
    dumps,
    embedding,
    encode_embedding,
    error_event,
    garbage_plan,
    plan_output,
    tokenize,
    usage_dict,
)
from .protocol import (
    ApiError,
    GenRequest,
    check_content_type,
    detokenize_ids,
    effective_max_tokens,
    parse_chat,
    parse_completion,
    parse_embedding,
    parse_json,
    served_name,
    tokenize_text,
)
from .state import ENGINE_DEAD_MESSAGE, Cut, RequestCtx, SimState

STATE: web.AppKey[SimState] = web.AppKey("sim_state", SimState)
CLIENT_MAX_SIZE = 1024**3  # uvicorn has no body limit; 200 MiB data URLs must pass
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
# prometheus_client's CONTENT_TYPE_LATEST since 0.22 (vLLM 0.32 pulls 0.26).
METRICS_CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"
_GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")
#: A header of the simulator only (real vLLM sends none), on every response: which process
#: answered, where it listens and its CUDA_VISIBLE_DEVICES, for tests of several instances.
INSTANCE_HEADER = "X-Simulator-Instance"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The routes served, in the order vLLM 0.32 logs them at start-up ("Route: PATH, Methods: M").
# vLLM has more (/openapi.json, /docs, /v1/responses, /v1/messages, /pooling, /score, ...); the
# simulator lists only what it serves, so its list is a part of vLLM's, in vLLM's order.
_COMMON_ROUTES: list[tuple[str, str]] = [
    ("/load", "GET"),
    ("/version", "GET"),
    ("/health", "GET"),
    ("/metrics", "GET"),
    ("/tokenize", "POST"),
    ("/detokenize", "POST"),
    ("/v1/models", "GET"),
    ("/ping", "GET"),
    ("/ping", "POST"),
]
GENERATE_ROUTES = [*_COMMON_ROUTES, ("/v1/chat/completions", "POST"), ("/v1/completions", "POST")]
POOLING_ROUTES = [*_COMMON_ROUTES, ("/v1/embeddings", "POST")]


def routes_of(runner: str) -> list[tuple[str, str]]:
    """The routes of a ``generate`` or ``pooling`` model (a generative model has no
    /v1/embeddings; an embedding model has no completions: both 404 like any unknown path)."""
    return POOLING_ROUTES if runner == "pooling" else GENERATE_ROUTES


def instance_header(sock: socket.socket) -> str:
    """The value of ``X-Simulator-Instance`` for the server listening on ``sock``, computed once
    at start-up: ``pid=4242; port=8226; cuda_visible_devices=0,1`` (``uds=PATH`` instead of
    ``port=N`` with ``--uds``; ``cuda_visible_devices=unset`` when the variable is not set,
    empty when it is set to nothing). In the variable's value, characters a header cannot carry,
    and ``;``, become ``?``."""
    address = sock.getsockname()
    where = f"uds={address}" if isinstance(address, str) else f"port={address[1]}"
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    cuda = "unset" if cuda is None else "".join(c if " " <= c <= "~" and c != ";" else "?" for c in cuda)
    return f"pid={os.getpid()}; {where}; cuda_visible_devices={cuda}"


def parse_instance_header(value: str) -> dict[str, str]:
    """``X-Simulator-Instance``'s fields: ``{"pid": "4242", "port": "8226", ...}``."""
    return dict(field.split("=", 1) for field in value.split("; "))


def random_id(hex_digits: int = REQUEST_ID_HEX) -> str:
    return os.urandom(hex_digits // 2).hex()


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json")


def engine_dead_response() -> web.Response:
    """What vLLM's EngineDeadError handler answers."""
    err = ApiError(ENGINE_DEAD_MESSAGE, err_type="InternalServerError", status=500)
    return json_response(err.body(), 500)


def _authorized(header: str | None, keys: list[str]) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and token in keys


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    keys = state.config.api_keys
    if (
        keys
        and request.path.startswith(_GUARDED_PREFIX)
        and request.method != "OPTIONS"
        and not _authorized(request.headers.get("Authorization"), keys)
    ):
        return json_response({"error": "Unauthorized"}, 401)
    if state.shutting_down and request.method == "POST":  # no new work while stopping
        resp = json_response({"detail": "Service Unavailable"}, 503)
        resp.force_close()
        return resp
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(exc.body(), exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = json_response({"detail": exc.reason}, exc.status)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers["Server"] = "uvicorn"
    headers["Vary"] = "Origin"
    config = request.app[STATE].config
    if config.instance:
        headers[INSTANCE_HEADER] = config.instance
    if config.request_id_headers:
        # vLLM's XRequestIdMiddleware: on every answer, the request's own X-Request-Id as sent,
        # else a new uuid4 (hex); added, whatever the handler set.
        headers.add("X-Request-Id", request.headers.get("X-Request-Id", uuid.uuid4().hex))
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    peer = transport.get_extra_info("peername")
    client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "-"
    version = f"{request.version.major}.{request.version.minor}"
    request.app[STATE].log.access(client, request.method, request.path_qs, version, response.status)


async def _json_body(request: web.Request) -> dict[str, Any]:
    check_content_type(request.headers.get("Content-Type"))
    return parse_json(await request.read())


# -- simple endpoints ---------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return web.Response(status=503 if request.app[STATE].engine_dead else 200)


async def version(request: web.Request) -> web.Response:
    return json_response({"version": VLLM_VERSION})


async def load(request: web.Request) -> web.Response:
    return json_response({"server_load": len(request.app[STATE].inflight)})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[STATE].metrics.render().encode(),
        headers={"Content-Type": METRICS_CONTENT_TYPE},
    )


async def models(request: web.Request) -> web.Response:
    """One card per served name, in ``--served-model-name``'s order, each with the model path as
    ``root`` and the time of the request as ``created`` (vLLM 0.32's ``ModelCard`` and
    ``ModelPermission`` take ``int(time.time())`` when built, per request)."""
    cfg = request.app[STATE].config
    now = int(time.time())
    data = [
        {
            "id": name,
            "object": "model",
            "created": now,
            "owned_by": "vllm",
            "root": cfg.model,
            "parent": None,
            "max_model_len": cfg.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{random_id()}",
                    "object": "model_permission",
                    "created": now,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        for name in cfg.served_names
    ]
    return json_response({"object": "list", "data": data})


async def tokenize_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    served_name(body.get("model"), state.config.served_names)
    text = tokenize_text(body)
    ids = tokenize(text)
    return json_response(
        {
            "count": len(ids),
            "max_model_len": state.config.max_model_len,
            "tokens": ids,
            "token_strs": text.split() if body.get("return_token_strs") else None,
        }
    )


async def detokenize_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    served_name(body.get("model"), state.config.served_names)
    return json_response({"prompt": detokenize(detokenize_ids(body))})


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cfg = state.config
    req = parse_embedding(await _json_body(request))
    try:
        model = served_name(req.model, cfg.served_names)
    except ApiError:  # vLLM's pooling endpoints name no aliases and no parameter
        message = f"The model `{req.model}` does not exist."
        raise ApiError(message, err_type="NotFoundError", status=404) from None
    for length in req.prompt_lens:
        if length > cfg.max_model_len:
            raise ApiError(
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, "
                f"your prompt contains {length} input tokens, which exceeds this limit even "
                "without any output tokens. Please reduce the length of the input prompt.",
                param="input_tokens",
                value=length,
            )
    if state.engine_dead:
        return engine_dead_response()
    dim = req.dimensions if req.dimensions and req.dimensions > 0 else cfg.embedding_dim
    data = [
        {
            "index": i,
            "object": "embedding",
            "embedding": encode_embedding(embedding(text, dim), req.encoding_format),
        }
        for i, text in enumerate(req.texts)
    ]
    prompt_tokens = sum(req.prompt_lens)
    state.metrics.prompt_tokens += prompt_tokens
    return json_response(
        {
            "id": f"embd-{random_id()}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": usage_dict(prompt_tokens, 0),
        }
    )


# -- generation ---------------------------------------------------------------------


class _Job:
    """One generation request while it runs."""

    __slots__ = ("choices", "crash_at", "created", "ctx", "model", "plan", "req", "sent", "state")

    def __init__(
        self,
        state: SimState,
        ctx: RequestCtx,
        req: GenRequest,
        plan: OutputPlan,
        model: str,
        crash_at: int | None,
    ) -> None:
        self.state = state
        self.ctx = ctx
        self.req = req
        self.plan = plan
        self.model = model
        self.created = int(time.time())
        self.choices = len(req.prompt_lens) * req.n
        self.crash_at = crash_at
        self.sent = 0  # tokens streamed so far (per choice)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    cfg = state.config
    body = await _json_body(request)
    req = parse_chat(body) if chat else parse_completion(body)
    try:
        model = served_name(req.model, cfg.served_names)
    except ApiError as exc:
        if chat:
            state.log.error(
                "serving.py:274",
                f"Error with model error=ErrorInfo(message={exc.message!r}, "
                f"type={exc.err_type!r}, param={exc.param!r}, code={exc.status})",
            )
        raise
    max_tokens = effective_max_tokens(req, cfg.max_model_len, cfg.default_max_tokens)
    if state.engine_dead:
        return engine_dead_response()

    base = request.headers.get("X-Request-Id") or (req.request_id if chat else None)
    request_id = ("chatcmpl-" if chat else "cmpl-") + (base or random_id())
    internal_id = f"{request_id}{'' if chat else '-0'}-{random_id(8)}"
    state.generation_count += 1
    crash_at = max_tokens // 2 if cfg.crash_on_request == state.generation_count else None
    plan = plan_output(max_tokens, req.stop, req.include_stop_str)
    ctx = RequestCtx(request_id, internal_id, request, chat)
    job = _Job(state, ctx, req, plan, model, crash_at)
    metrics = state.metrics
    if cfg.log_requests:
        state.log.info("async_llm.py:578", f"Added request {internal_id}.")

    state.begin(ctx)
    acquired = False
    sleep = state.sleep
    try:
        await sleep.admit(ctx)  # queued while the engine sleeps (vLLM accepts and holds it)
        if sleep.garbage:
            job.plan = garbage_plan(max_tokens)
        if state.slots.locked():
            metrics.waiting += 1
            try:
                await state.slots.acquire()
            finally:
                metrics.waiting -= 1
        else:
            await state.slots.acquire()
        acquired = True
        if state.engine is not None and state.engine.peer_lost:
            await _crash_engine(job)  # a rank is gone: this step's collective fails
        sleep.started(ctx)
        metrics.running += 1
        metrics.prompt_tokens += req.prompt_tokens
        if req.stream:
            return await _stream(job)
        return await _complete(job)
    except Cut:
        return await _on_cut(job)
    except ConnectionError:
        # A write failed: the client went away, or a cut closed the connection.
        if ctx.cut_reason is None:
            state.log_abort(ctx)
        return ctx.response or web.Response(status=500)
    except asyncio.CancelledError:
        # aiohttp cancels the handler as soon as the client disconnects.
        if ctx.cut_reason is None:
            state.log_abort(ctx)
        raise
    finally:
        if acquired:
            sleep.ended(ctx)
            metrics.running -= 1
            state.slots.release()
        state.end(ctx)


async def _crash_engine(job: _Job) -> None:
    """--sim-crash-on-request: make the engine die now; the engine-death handler
    then cuts every in-flight request, this one included."""
    if job.state.engine is not None:
        job.state.engine.crash()
    await job.ctx.sleep(10.0)


async def _stream(job: _Job) -> web.StreamResponse:
    cfg = job.state.config
    ctx = job.ctx
    req = job.req
    plan = job.plan
    chat = req.chat
    fmt = StreamFormatter(chat, ctx.request_id, job.created, job.model, cfg.fingerprint)
    resp = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
    await resp.prepare(ctx.request)
    ctx.response = resp
    write = resp.write
    choices = range(job.choices)
    prompt = req.prompt_tokens
    continuous = req.continuous_usage
    if chat:
        for i in choices:
            await write(fmt.role(i, (prompt, 0) if continuous else None))
    if cfg.ttft:
        await ctx.sleep(cfg.ttft)
    delay = cfg.token_delay
    deltas = plan.deltas
    last = len(deltas) - 1
    metrics = job.state.metrics
    fingerprint = not req.include_usage
    stepping = job.state.sleep.stepping
    for t, delta in enumerate(deltas):
        if delay:
            await ctx.sleep(delay)
        if not stepping.is_set():  # paused by a sleep with mode=keep
            await job.state.sleep.step(ctx)
        if t == job.crash_at:
            await _crash_engine(job)
        if ctx.cut_reason is not None:
            raise Cut(ctx.cut_reason)
        usage = (prompt, t + 1) if continuous else None
        if t < last:
            for i in choices:
                await write(fmt.token(i, delta, usage))
        else:
            for i in choices:
                await write(
                    fmt.final(
                        i,
                        delta,
                        plan.finish_reason,
                        plan.stop_reason,
                        usage=usage,
                        fingerprint=fingerprint,
                    )
                )
        metrics.generation_tokens += job.choices
        job.sent = t + 1
    if req.include_usage:
        await write(fmt.usage(prompt, plan.completion_tokens * job.choices))
    await write(DONE)
    metrics.finished(plan.finish_reason)
    return resp


async def _complete(job: _Job) -> web.StreamResponse:
    state = job.state
    cfg = state.config
    ctx = job.ctx
    plan = job.plan
    if cfg.ttft:
        await ctx.sleep(cfg.ttft)
    if cfg.token_delay or job.crash_at is not None:
        for t in range(len(plan.deltas)):
            if cfg.token_delay:
                await ctx.sleep(cfg.token_delay)
            await state.sleep.step(ctx)
            if t == job.crash_at:
                await _crash_engine(job)
            job.sent = t + 1
    await state.sleep.step(ctx)
    if ctx.cut_reason is not None:
        raise Cut(ctx.cut_reason)
    state.metrics.generation_tokens += plan.completion_tokens * job.choices
    state.metrics.finished(plan.finish_reason)
    build = chat_response if job.req.chat else completion_response
    plans = [plan] * job.choices
    body = build(ctx.request_id, job.created, job.model, plans, job.req.prompt_tokens, cfg.fingerprint)
    resp = json_response(body)
    return resp


async def _on_cut(job: _Job) -> web.StreamResponse:
    """End a request cut by an engine death or an abort-mode shutdown.

    Engine death: vLLM 0.32 ends a stream with an error event and ``data: [DONE]``
    (``--sim-abort-stream error``, the default); ``cut`` drops the connection instead,
    without the final chunk, as a killed server would. Shutdown (SIGTERM to the process
    group, whose EngineCore aborts its requests): the stream ends like a finished one,
    with ``"finish_reason": "abort"`` and ``data: [DONE]``.
    """
    state = job.state
    ctx = job.ctx
    state.metrics.finished("abort")
    resp = ctx.response
    if ctx.cut_reason == "sleep_abort":
        return await _end_sleep_aborted(job)
    cut = state.config.abort_stream == "cut"
    if resp is not None and ctx.cut_reason == "shutdown" and not cut:
        await _end_aborted(job, resp)
        return resp
    if resp is not None:
        kind = "chat completion" if job.req.chat else "completion"
        where = "serving.py:929" if job.req.chat else "serving.py:500"
        state.log.error(
            where,
            f"Error in {kind} stream generator.\n"
            f"vllm.v1.engine.exceptions.EngineDeadError: {ENGINE_DEAD_MESSAGE}",
        )
    if resp is None:  # not streamed: vLLM answers its EngineDeadError with a 500
        if cut and ctx.cut_reason == "shutdown":
            _close(ctx)
        return engine_dead_response()
    if cut:
        _close(ctx)  # no terminating chunk: the client sees a cut stream
        return resp
    with contextlib.suppress(ConnectionError):
        await resp.write(error_event(ENGINE_DEAD_MESSAGE) + DONE)
    return resp


async def _end_aborted(job: _Job, resp: web.StreamResponse) -> None:
    """The end of a stream whose request the engine aborted (vLLM 0.32, group SIGTERM):
    an empty delta with ``"finish_reason": "abort"``, then ``data: [DONE]``."""
    cfg = job.state.config
    req = job.req
    fmt = StreamFormatter(req.chat, job.ctx.request_id, job.created, job.model, cfg.fingerprint)
    events = [fmt.final(i, "", "abort", None, fingerprint=not req.include_usage) for i in range(job.choices)]
    if req.include_usage:
        events.append(fmt.usage(req.prompt_tokens, job.sent * job.choices))
    with contextlib.suppress(ConnectionError):
        await resp.write(b"".join(events) + DONE)


async def _end_sleep_aborted(job: _Job) -> web.StreamResponse:
    """A request aborted by ``/sleep`` (mode=abort): the engine finishes it with
    ``finish_reason: "abort"``; a stream ends like a finished one, a plain request gets its
    200 with the text generated so far."""
    ctx = job.ctx
    cfg = job.state.config
    if not job.req.stream:
        plan = OutputPlan(job.plan.deltas[: job.sent], "abort")
        build = chat_response if job.req.chat else completion_response
        body = build(
            ctx.request_id,
            job.created,
            job.model,
            [plan] * job.choices,
            job.req.prompt_tokens,
            cfg.fingerprint,
        )
        return json_response(body)
    resp = ctx.response
    if resp is None:  # still queued: vLLM had sent the headers already
        resp = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
        with contextlib.suppress(ConnectionError):
            await resp.prepare(ctx.request)
        ctx.response = resp
    await _end_aborted(job, resp)
    return resp


def _close(ctx: RequestCtx) -> None:
    transport = ctx.request.transport
    if transport is not None:
        transport.close()


def build_app(state: SimState) -> web.Application:
    app = web.Application(client_max_size=CLIENT_MAX_SIZE, middlewares=[_middleware])
    app[STATE] = state
    app.on_response_prepare.append(_on_prepare)
    handlers: dict[str, Handler] = {
        "/health": health,
        "/ping": health,
        "/version": version,
        "/load": load,
        "/metrics": metrics,
        "/v1/models": models,
        "/v1/completions": completions,
        "/v1/chat/completions": chat_completions,
        "/v1/embeddings": embeddings,
        "/tokenize": tokenize_handler,
        "/detokenize": detokenize_handler,
    }
    for path, method in routes_of(state.config.runner):
        if method == "GET":
            app.router.add_get(path, handlers[path], allow_head=False)
        else:
            app.router.add_route(method, path, handlers[path])
    return app
