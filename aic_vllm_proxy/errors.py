"""Errors the proxy reports, always as an OpenAI-style JSON body with a message that says
what went wrong and what to do about it."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

from aic_vllm_proxy.models import ErrorBody, ErrorDetail, ProcessState

_STATUSES = {status.value for status in HTTPStatus}


def sentences(*parts: str | None) -> str:
    """Join message parts as sentences: each ends with one full stop (none added after ``.``,
    ``!`` or ``?``), empty parts are left out. ``sentences("X failed.", "Retry")`` is
    ``"X failed. Retry."``, never ``"X failed.. Retry."``."""
    done = []
    for part in parts:
        text = (part or "").strip()
        if text:
            done.append(text if text.endswith((".", "!", "?")) else text + ".")
    return " ".join(done)


class ProxyError(Exception):
    """An error with an HTTP status and an OpenAI error ``type``; raise it from any handler."""

    status = 500
    type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers or {}
        self.extra = extra

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, code=self.status, **self.extra)

    def response(self) -> web.Response:
        return error_response(self.status, self.detail(), headers=self.headers)

    def raw(self, *, close: bool) -> bytes:
        """The whole HTTP/1.1 response as bytes, for the front door (``front.py``), which writes
        to the client's transport itself; the same status, headers and body as :meth:`response`."""
        data = _error_json(self.detail()).encode()
        reason = HTTPStatus(self.status).phrase if self.status in _STATUSES else "Error"
        lines = [f"HTTP/1.1 {self.status} {reason}", "Content-Type: application/json; charset=utf-8"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        lines.append(f"Content-Length: {len(data)}")
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class ModelUnavailable(ProxyError):
    """No model can serve the request (none loaded, failed, or a switch took too long)."""

    status = 503
    type = "model_unavailable"


class UpstreamError(ProxyError):
    """vLLM could not be reached or broke off."""

    status = 502
    type = "upstream_error"


class SwitchFailed(ProxyError):
    """vLLM failed to start; carries the exit code and the last lines of its log."""

    status = 500
    type = "switch_failed"

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        log_tail: list[str] | None = None,
        status: int | None = None,
        state: ProcessState | None = ProcessState.FAILED,
    ) -> None:
        super().__init__(message, status=status, exit_code=exit_code, log_tail=log_tail, state=state)
        self.exit_code = exit_code
        self.log_tail = log_tail or []


def body_too_large(limit: int, size: int | None = None) -> ProxyError:
    """413 for a request body over ``--max-body-size`` (``size`` when the client announced it)."""
    said = f"has {size} bytes" if size is not None else f"is larger than {limit} bytes"
    return ProxyError(
        f"the request body {said}; this proxy accepts at most {limit} (--max-body-size)",
        status=413,
        type="invalid_request_error",
    )


def body_stalled(timeout: float) -> ProxyError:
    """408 for a request body that stopped arriving for ``--client-timeout`` seconds."""
    return ProxyError(
        f"the request body stopped arriving for {timeout:g} s (--client-timeout)",
        status=408,
        type="invalid_request_error",
    )


def _error_json(detail: ErrorDetail) -> str:
    return json.dumps(ErrorBody(error=detail).model_dump(mode="json", exclude_none=True))


def error_response(
    status: int, detail: ErrorDetail, *, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=_error_json(detail),
        content_type="application/json",
        headers=headers,
    )


def simple_error(status: int, message: str, type: str, **extra: Any) -> web.Response:
    return error_response(status, ErrorDetail(message=message, type=type, code=status, **extra))


def http_exception_response(exc: web.HTTPException) -> web.StreamResponse | None:
    """aiohttp's own HTTP error (e.g. 413 from ``request.read()``) as an OpenAI-style body;
    None for what should pass as it is (redirects, bodies that are JSON already)."""
    if exc.status < 400 or exc.content_type == "application/json":
        return None
    kind = "invalid_request_error" if exc.status < 500 else "internal_error"
    return simple_error(exc.status, exc.text or exc.reason, kind)
