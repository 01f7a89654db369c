"""The daemon's own log lines (``--log-format``): text, or one JSON object a line for a site's
log shipper (Loki, ELK). See docs/logging.md.

A JSON line has ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``event`` (the message), and
``model`` and ``request_id`` when the record has them (``extra={"model": ..., "request_id":
...}``; aiohttp's access log line gets its ``request_id`` from the answer's ``X-Request-Id``),
and ``exception`` (the traceback, as text) when it has one."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any, Literal

from aiohttp.web_log import AccessLogger

from aic_vllm_proxy.relay.request import REQUEST_ID

#: The text lines' layout.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: aiohttp's access log line (``--access-log``), with the request's id at its end.
ACCESS_LOG_FORMAT = AccessLogger.LOG_FORMAT + " %{" + REQUEST_ID + "}o"


class JsonFormatter(logging.Formatter):
    """One JSON object (ASCII, on one line) for each record."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        model = getattr(record, "model", None)
        if model:
            entry["model"] = model
        request_id = getattr(record, "request_id", None) or _access_log_id(record)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def _access_log_id(record: logging.LogRecord) -> str | None:
    """The request id of aiohttp's access log line: the answer's ``X-Request-Id`` (aiohttp puts
    the ``%{...}o`` fields of :data:`ACCESS_LOG_FORMAT` in ``response_header``; "-": none)."""
    headers = getattr(record, "response_header", None)
    if not isinstance(headers, dict):
        return None
    value = headers.get(REQUEST_ID)
    return value if isinstance(value, str) and value != "-" else None


def setup_logging(level: str, log_format: Literal["text", "json"]) -> None:
    """The root logger's level and one handler on stderr, writing ``log_format`` lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
