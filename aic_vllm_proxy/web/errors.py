"""The one table that turns the engine's errors into HTTP answers (status, OpenAI error
``type``, headers and extra fields), and aiohttp's own HTTP errors into the same JSON shape.

The relay gets :func:`http_error` handed to it (it cannot import this plane): both HTTP paths
answer a request that finds no model with the same bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from aic_vllm_proxy.errors import (
    EngineError,
    ModelNotFound,
    ModelUnavailable,
    StartFailure,
    SwitchCancelled,
    SwitchFailed,
    SwitchHookFailed,
    SwitchVetoed,
    Unavailable,
)
from aic_vllm_proxy.relay.errors import ProxyError, simple_error


@dataclass(frozen=True)
class Answer:
    status: int
    type: str
    retry_after: int | None = None
    code: str | None = None  # the error's ``code`` when not the status (OpenAI's own codes)


#: Error (or error and its reason) -> the HTTP answer. Every engine error has a row.
TABLE: dict[object, Answer] = {
    Unavailable.TOO_MANY_WAITING: Answer(503, "model_unavailable", retry_after=5),
    Unavailable.LOAD_TIMEOUT: Answer(503, "model_unavailable", retry_after=10),
    Unavailable.FAILED: Answer(503, "model_unavailable", retry_after=30),
    Unavailable.NOTHING_LOADED: Answer(503, "model_unavailable"),
    Unavailable.NO_ROOM: Answer(503, "model_unavailable", retry_after=10),
    ModelNotFound: Answer(404, "invalid_request_error", code="model_not_found"),
    StartFailure.EXITED: Answer(500, "switch_failed"),
    StartFailure.CANNOT_RUN: Answer(500, "switch_failed"),
    StartFailure.TIMEOUT: Answer(504, "switch_failed"),
    StartFailure.PORT_TAKEN: Answer(409, "switch_failed"),
    StartFailure.NO_NODES: Answer(503, "switch_failed"),
    SwitchCancelled: Answer(409, "switch_cancelled"),
    SwitchVetoed: Answer(409, "switch_vetoed"),
    SwitchHookFailed: Answer(500, "hook_failed"),
}


def _row(exc: EngineError) -> tuple[Answer, dict[str, Any]]:
    if isinstance(exc, ModelUnavailable):
        answer = TABLE[exc.why]
        if exc.retry_after is not None:
            answer = Answer(answer.status, answer.type, retry_after=max(1, math.ceil(exc.retry_after)))
        return answer, {"state": exc.state}
    if isinstance(exc, ModelNotFound):
        return TABLE[ModelNotFound], {"param": "model"}
    if isinstance(exc, SwitchFailed):
        return TABLE[exc.failure], {"exit_code": exc.exit_code, "log_tail": exc.log_tail, "state": exc.state}
    for kind in type(exc).__mro__:
        if kind in TABLE:
            return TABLE[kind], {}
    return Answer(500, "internal_error"), {}


def http_error(exc: EngineError) -> ProxyError:
    """The HTTP answer for an engine error."""
    answer, extra = _row(exc)
    headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after is not None else None
    if answer.code is not None:
        extra["code"] = answer.code
    return ProxyError(exc.message, status=answer.status, type=answer.type, headers=headers, **extra)


def http_exception_response(exc: web.HTTPException) -> web.StreamResponse | None:
    """aiohttp's own HTTP error (e.g. 413 from ``request.read()``) as an OpenAI-style body;
    None for what should pass as it is (redirects, bodies that are JSON already)."""
    if exc.status < 400 or exc.content_type == "application/json":
        return None
    kind = "invalid_request_error" if exc.status < 500 else "internal_error"
    return simple_error(exc.status, exc.text or exc.reason, kind)
