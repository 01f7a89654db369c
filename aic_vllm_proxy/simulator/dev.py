"""vLLM 0.32's development routes, attached only when ``VLLM_SERVER_DEV_MODE=1``
(``register_vllm_dev_api_routers``): the cache, rpc, server_info and sleep routers.

Answers and errors are vLLM's: query parameters validated as FastAPI does, reported by
vLLM's handler as a 400 ``"type": "Bad Request"`` (not FastAPI's 422); ``HTTPException``s
of ``/collective_rpc`` as 400 with their detail; an engine call that raises as a 500
``InternalServerError`` with ``Call to <method> method failed: ...``. None of these routes
asks for ``--api-key`` (vLLM guards only ``/v1`` and the like).
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from . import VLLM_VERSION
from .protocol import ApiError
from .server import STATE, Handler, engine_dead_response, json_response
from .sleep import UtilityFailed

#: In vLLM's start-up order (after /ping): cache, rpc, server_info, sleep.
DEV_ROUTES: list[tuple[str, str]] = [
    ("/reset_prefix_cache", "POST"),
    ("/reset_mm_cache", "POST"),
    ("/reset_encoder_cache", "POST"),
    ("/collective_rpc", "POST"),
    ("/server_info", "GET"),
    ("/sleep", "POST"),
    ("/release_kv_cache_memory", "POST"),
    ("/wake_up", "POST"),
    ("/is_sleeping", "GET"),
]
SECURITY_WARNING = (
    "SECURITY WARNING: Development endpoints are enabled! This should NOT be used in production!"
)

_INT = re.compile(r"\s*[+-]?\d+(?:_\d+)*(?:\.0+)?\s*")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def dev_mode_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """``VLLM_SERVER_DEV_MODE`` as vLLM reads it: ``bool(int(value))`` (an integer; a value that
    is not one counts as unset here, where vLLM would fail)."""
    try:
        return bool(int(environ.get("VLLM_SERVER_DEV_MODE", "0")))
    except ValueError:
        return False


def _input(value: str) -> str:
    return value if len(value) <= 200 else value[:200] + "...[truncated]"


class _Query:
    """Query parameters validated one by one, errors collected as pydantic reports them."""

    def __init__(self, query: MultiMapping[str]) -> None:
        self.query = query
        self.errors: list[dict[str, Any]] = []

    def _raw(self, name: str) -> str | None:
        values = self.query.getall(name, [])
        return values[-1] if values else None  # FastAPI keeps the last one

    def _error(self, kind: str, name: str, msg: str, raw: str, ctx: dict[str, Any] | None = None) -> None:
        error: dict[str, Any] = {"type": kind, "loc": f"query.{name}", "msg": msg, "input": _input(raw)}
        if ctx is not None:
            error["ctx"] = ctx
        self.errors.append(error)

    def integer(self, name: str, default: int, ge: int, le: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        if not _INT.fullmatch(raw):
            msg = "Input should be a valid integer, unable to parse string as an integer"
            self._error("int_parsing", name, msg, raw)
            return default
        value = int(raw.strip().split(".")[0].replace("_", ""))
        if value < ge:
            self._error(
                "greater_than_equal", name, f"Input should be greater than or equal to {ge}", raw, {"ge": ge}
            )
        elif value > le:
            self._error(
                "less_than_equal", name, f"Input should be less than or equal to {le}", raw, {"le": le}
            )
        return value

    def literal(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw not in choices:
            quoted = [repr(c) for c in choices]
            expected = f"{', '.join(quoted[:-1])} or {quoted[-1]}"
            self._error("literal_error", name, f"Input should be {expected}", raw, {"expected": expected})
        return raw

    def boolean(self, name: str) -> bool:
        raw = self._raw(name)
        if raw is None:
            return False
        if raw.lower() in _TRUE:
            return True
        if raw.lower() not in _FALSE:
            msg = "Input should be a valid boolean, unable to interpret input"
            self._error("bool_parsing", name, msg, raw)
        return False

    def check(self) -> None:
        """vLLM's RequestValidationError handler: 400, every error listed, the first one's
        location as ``param``."""
        errors = self.errors
        if not errors:
            return
        label = "error" if len(errors) == 1 else "errors"
        message = f"{len(errors)} validation {label}:\n" + "\n".join(f"  {e}" for e in errors)
        failure = ApiError(message, err_type="Bad Request")
        failure.param = errors[0]["loc"]
        raise failure


def _http_error(detail: str) -> ApiError:
    """An ``HTTPException(400, detail)`` through vLLM's handler."""
    return ApiError(detail, err_type="Bad Request")


def _failed(exc: UtilityFailed) -> web.Response:
    err = ApiError(str(exc), err_type="InternalServerError", status=500)
    return json_response(err.body(), 500)


def _engine_call(handler: Callable[[web.Request], Any]) -> Handler:
    """The engine is dead: vLLM's EngineDeadError 500; an engine call that raised: its 500."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        if request.app[STATE].engine_dead:
            return engine_dead_response()
        try:
            response: web.StreamResponse = await handler(request)
        except UtilityFailed as exc:
            return _failed(exc)
        return response

    return wrapped


async def sleep(request: web.Request) -> web.Response:
    query = _Query(request.query)
    level = query.integer("level", 1, 0, 2)
    mode = query.literal("mode", "abort", ("abort", "wait", "keep"))
    query.check()
    state = request.app[STATE]
    await state.sleep.sleep(level, mode, state.inflight)
    return json_response({"status": "sleeping", "level": level})


async def wake_up(request: web.Request) -> web.Response:
    tags: list[str] | None = request.query.getall("tags", []) or None
    fully_awake = await request.app[STATE].sleep.wake_up(tags)
    return json_response({"status": "awake" if fully_awake else "sleeping", "tags": tags})


async def is_sleeping(request: web.Request) -> web.Response:
    return json_response({"is_sleeping": await request.app[STATE].sleep.is_sleeping_now()})


async def release_kv_cache_memory(request: web.Request) -> web.Response:
    state = request.app[STATE]
    await state.sleep.release_kv_cache_memory(bool(state.inflight))
    return json_response({"status": "kv_cache_released"})


async def collective_rpc(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _http_error(f"JSON decode error: {exc}") from None
    except ValueError as exc:  # not UTF-8: vLLM's ValueError handler
        raise ApiError(str(exc)) from None
    if not isinstance(body, dict):
        raise _http_error("Request body must be a JSON object")
    method = body.get("method")
    if method is None:
        raise _http_error("Missing 'method' in request body")
    results = await request.app[STATE].sleep.collective_rpc(method)
    return json_response({"results": results})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    query = _Query(request.query)
    reset_running = query.boolean("reset_running_requests")
    query.boolean("reset_external")
    query.check()
    success = await request.app[STATE].sleep.reset_prefix_cache(reset_running)
    return json_response({"success": success})


async def reset_mm_cache(request: web.Request) -> web.Response:
    request.app[STATE].log.info("api_router.py:52", "Resetting multi-modal cache...")
    return web.Response(status=200)


async def reset_encoder_cache(request: web.Request) -> web.Response:
    request.app[STATE].log.info("api_router.py:62", "Resetting encoder cache...")
    return web.Response(status=200)


async def server_info(request: web.Request) -> web.Response:
    """An abbreviated ``/server_info``: the same three keys, far fewer entries."""
    query = _Query(request.query)
    config_format = query.literal("config_format", "text", ("text", "json"))
    query.check()
    cfg = request.app[STATE].config
    config: dict[str, Any] = {
        "model_config": {"model": cfg.model, "max_model_len": cfg.max_model_len},
        "enable_sleep_mode": cfg.sleep.enabled,
    }
    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_") and "KEY" not in k}
    system = {
        "os": platform.platform(),
        "python_version": sys.version.split()[0],
        "vllm_version": VLLM_VERSION,
    }
    return json_response(
        {
            "vllm_config": str(config) if config_format == "text" else config,
            "vllm_env": env,
            "system_env": system,
        }
    )


def add_dev_routes(app: web.Application) -> None:
    """Attach the development routes (the caller checks VLLM_SERVER_DEV_MODE)."""
    handlers: dict[str, Handler] = {
        "/reset_prefix_cache": _engine_call(reset_prefix_cache),
        "/reset_mm_cache": _engine_call(reset_mm_cache),
        "/reset_encoder_cache": _engine_call(reset_encoder_cache),
        "/collective_rpc": _engine_call(collective_rpc),
        "/server_info": server_info,
        "/sleep": _engine_call(sleep),
        "/release_kv_cache_memory": _engine_call(release_kv_cache_memory),
        "/wake_up": _engine_call(wake_up),
        "/is_sleeping": _engine_call(is_sleeping),
    }
    for path, method in DEV_ROUTES:
        if method == "GET":
            app.router.add_get(path, handlers[path], allow_head=False)
        else:
            app.router.add_route(method, path, handlers[path])
