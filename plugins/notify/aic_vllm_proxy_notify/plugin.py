"""The hooks: tell a webhook when a switch is done, a start failed or a model crashed.

The POST runs as a background task with its own timeout, so a slow or dead receiver never
delays a switch; the hooks return at once. Delivery problems are logged (the switch is long
over by then). Tasks are kept in :attr:`Notifier.tasks` until they end, so none is lost to
the garbage collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp

from aic_vllm_proxy import __version__ as proxy_version
from aic_vllm_proxy.hooks import HookContext, hookimpl
from aic_vllm_proxy.spec import ModelSpec

log = logging.getLogger("aic_vllm_proxy_notify")

SECTION = "[plugins.notify]"
ENV = "AIC_VLLM_PROXY_PLUGIN_NOTIFY_"
SWITCH_DONE, START_FAILED, CRASHED = "switch_done", "start_failed", "crashed"
EVENTS = (SWITCH_DONE, START_FAILED, CRASHED)
FORMATS = ("json", "slack", "matrix")
#: Log lines sent with a failure.
TAIL_LINES = 20


@dataclass(frozen=True)
class NotifyConfig:
    """``[plugins.notify]`` / ``AIC_VLLM_PROXY_PLUGIN_NOTIFY_*``."""

    #: Where to POST; nothing is sent without it.
    url: str | None = None
    #: "json" (the whole event), "slack" ({"text"}) or "matrix" ({"text", "html"}, hookshot).
    format: str = "json"
    #: Which events to send.
    events: tuple[str, ...] = EVENTS
    #: Seconds one POST may take.
    timeout: float = 10.0
    #: Extra request headers, e.g. {"Authorization": "Bearer ..."} (a JSON object in the env).
    headers: Mapping[str, str] = field(default_factory=dict)
    #: How the node is called in messages; default: the host name.
    node: str = ""

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> NotifyConfig:
        fmt = str(raw.get("format") or "json").strip().lower()
        if fmt not in FORMATS:
            raise ValueError(f"{SECTION} format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        events_raw = raw.get("events") or EVENTS
        events = tuple(
            e.strip() for e in (events_raw.split(",") if isinstance(events_raw, str) else events_raw)
        )
        unknown = [e for e in events if e not in EVENTS]
        if unknown:
            raise ValueError(f"{SECTION} events: unknown {', '.join(unknown)} (known: {', '.join(EVENTS)})")
        headers = raw.get("headers") or {}
        if isinstance(headers, str):
            try:
                headers = json.loads(headers)
            except ValueError:
                raise ValueError(f"{SECTION} headers must be a JSON object, not {headers!r}") from None
        if not isinstance(headers, Mapping):
            raise ValueError(f"{SECTION} headers must be a table of strings")
        try:
            timeout = float(raw.get("timeout") or cls.timeout)
        except (TypeError, ValueError):
            raise ValueError(f"{SECTION} timeout must be a number, not {raw.get('timeout')!r}") from None
        url = str(raw.get("url") or "").strip()
        return cls(
            url=url or None,
            format=fmt,
            events=events,
            timeout=timeout,
            headers={str(k): str(v) for k, v in headers.items()},
            node=str(raw.get("node") or ""),
        )


def failure_kind(ctx: HookContext) -> str:
    """on_failure is called for a start that failed or timed out, and for a model that died
    after it was ready; the proxy's message tells which (or a ``failure`` field, if the proxy's
    context has one: "crashed"/"unhealthy" or a start failure)."""
    told = getattr(ctx, "failure", None)
    if told:
        return CRASHED if told in ("crashed", "unhealthy", CRASHED) else START_FAILED
    error = (ctx.error or "").lower()
    if "after it was ready" in error or "engine has died" in error:
        return CRASHED
    return START_FAILED


def instance_note(ctx: HookContext) -> str:
    """`` (instance NAME)`` when the event's instance is called otherwise than its model (several
    models side by side: a catalogue entry serving ``org/model``); empty when the model's name
    already says which instance it is."""
    if not ctx.instance:
        return ""
    names = {ctx.model}
    if ctx.new_spec:
        with contextlib.suppress(ValueError):  # a spec the proxy could not parse: no name
            names.add(ModelSpec.parse(ctx.new_spec).served_name)
    return "" if ctx.instance in names else f" (instance {ctx.instance})"


def event_for(ctx: HookContext, kind: str, node: str) -> dict[str, Any]:
    """The JSON event (the ``json`` format sends it as it is)."""
    model = ctx.model or ctx.new_spec or "?"
    note = instance_note(ctx)
    if kind == SWITCH_DONE:
        text = f"[{node}] {model}{note} is ready" + (f" (replacing {ctx.old_spec})" if ctx.old_spec else "")
    elif kind == CRASHED:
        text = f"[{node}] {model}{note} crashed: {ctx.error or 'vLLM died'}"
    else:
        text = f"[{node}] {ctx.new_spec or model}{note} failed to start: {ctx.error or 'vLLM failed'}"
    return {
        "event": kind,
        "text": text,
        "node": node,
        "instance": ctx.instance,
        "gpus": list(ctx.gpus),
        "model": ctx.model,
        "model_spec": ctx.new_spec,
        "previous_model_spec": ctx.old_spec,
        "vllm_base": ctx.vllm_base,
        "pid": ctx.pid,
        "error": ctx.error,
        "exit_code": ctx.exit_code,
        "log_path": ctx.log_path,
        "log_tail": list(ctx.log_tail[-TAIL_LINES:]),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "proxy_version": proxy_version,
    }


def payload_for(event: dict[str, Any], fmt: str) -> dict[str, Any]:
    """What is POSTed in each format."""
    if fmt == "slack":
        return {"text": event["text"]}
    if fmt == "matrix":
        body = html.escape(event["text"])
        tail = event["log_tail"][-5:]
        if tail:
            body += "<pre>" + html.escape("\n".join(tail)) + "</pre>"
        return {"text": event["text"], "html": body}
    return event


class Notifier:
    """The plugin object: one per process, holding the webhook tasks still running."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self._warned_no_url = False

    @hookimpl
    async def post_switch(self, ctx: HookContext) -> None:
        self.send(ctx, SWITCH_DONE)

    @hookimpl
    async def on_failure(self, ctx: HookContext) -> None:
        self.send(ctx, failure_kind(ctx))

    def send(self, ctx: HookContext, kind: str) -> asyncio.Task[None] | None:
        """Start posting the event in the background; None when nothing is to be sent."""
        config = NotifyConfig.parse(ctx.plugin_config)
        if config.url is None:
            if not self._warned_no_url:
                self._warned_no_url = True
                log.warning(
                    "notify: no webhook url configured (url in %s or %sURL); not sending events",
                    SECTION,
                    ENV,
                )
            return None
        if kind not in config.events:
            return None
        event = event_for(ctx, kind, config.node or socket.gethostname())
        task = asyncio.get_running_loop().create_task(
            self._post(ctx.session, config, payload_for(event, config.format), kind)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @staticmethod
    async def _post(
        session: aiohttp.ClientSession, config: NotifyConfig, payload: dict[str, Any], kind: str
    ) -> None:
        assert config.url is not None
        try:
            async with session.post(
                config.url,
                json=payload,
                headers=dict(config.headers),
                timeout=aiohttp.ClientTimeout(total=config.timeout),
            ) as response:
                body = await response.read()
                if response.status >= 300:
                    log.warning(
                        "notify: %s event to %s answered %d: %s",
                        kind,
                        config.url,
                        response.status,
                        body.decode(errors="replace")[:300],
                    )
                else:
                    log.info("notify: %s event sent to %s", kind, config.url)
        except asyncio.TimeoutError:
            log.warning("notify: %s event to %s timed out after %g s", kind, config.url, config.timeout)
        except (aiohttp.ClientError, ValueError) as exc:
            log.warning("notify: %s event to %s failed: %s", kind, config.url, exc)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait (bounded) for the events still being sent."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)


#: The object the entry point names.
plugin = Notifier()
