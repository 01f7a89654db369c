"""Errors as HTTP answers: a status, an OpenAI-style JSON body with a message that says what went
wrong and what to do about it, and headers. Both HTTP paths write them (the front door as raw
bytes, the application as a response); the engine's own errors are mapped to these by
:mod:`aic_vllm_proxy.web.errors`."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

from aic_vllm_proxy.schemas import ErrorBody, ErrorDetail

_STATUSES = {status.value for status in HTTPStatus}


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
        fields: dict[str, Any] = {"code": self.status, **self.extra}  # or a code of OpenAI's own
        return ErrorDetail(message=self.message, type=self.type, **fields)

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


class UpstreamError(ProxyError):
    """vLLM could not be reached or broke off."""

    status = 502
    type = "upstream_error"


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
