"""The ``post_switch`` hook: warm a model that just became ready, report what it cost.

The requests go straight to vLLM (``ctx.vllm_base``) on the proxy's shared session, for the
served model name (``ctx.model``), one after the other. A model without a chat template (vLLM
answers 400) is warmed through ``/v1/completions`` instead. The hook returns a line such as
``"warm-up: 1 request, 23 ms"``, which the proxy shows in the switch response and ``/status``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from aic_vllm_proxy.hooks import HookContext, hookimpl
from aic_vllm_proxy.spec import ModelSpec

log = logging.getLogger("aic_vllm_proxy_warmup")

SECTION = "[plugins.warmup]"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
_ENDPOINTS = {
    "chat": CHAT,
    "chat/completions": CHAT,
    CHAT: CHAT,
    "completions": COMPLETIONS,
    COMPLETIONS: COMPLETIONS,
}
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class WarmupFailed(RuntimeError):
    """A warm-up request failed; the message says which and what vLLM answered."""


def _setting(raw: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = raw.get(key)
    if value is None or value == "":
        return default
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{SECTION} {key} must be {_KINDS[kind]}, not {value!r}") from None


@dataclass(frozen=True)
class WarmupConfig:
    """``[plugins.warmup]`` / ``AIC_VLLM_PROXY_PLUGIN_WARMUP_*``."""

    #: How many warm-up requests (0 turns the plugin off).
    requests: int = 1
    #: What they ask.
    prompt: str = "Hello"
    #: How many tokens each may generate.
    max_tokens: int = 8
    #: "chat" (/v1/chat/completions) or "completions" (/v1/completions).
    endpoint: str = CHAT
    #: Seconds each request may take.
    timeout: float = 30.0
    #: Fall back to /v1/completions when the model has no chat template.
    fallback: bool = True

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> WarmupConfig:
        endpoint = str(raw.get("endpoint") or "chat").strip()
        if endpoint not in _ENDPOINTS:
            raise ValueError(f'{SECTION} endpoint must be "chat" or "completions", not {endpoint!r}')
        config = cls(
            requests=_setting(raw, "requests", int, cls.requests),
            prompt=_setting(raw, "prompt", str, cls.prompt),
            max_tokens=_setting(raw, "max_tokens", int, cls.max_tokens),
            endpoint=_ENDPOINTS[endpoint],
            timeout=_setting(raw, "timeout", float, cls.timeout),
            fallback=_setting(raw, "fallback", bool, cls.fallback),
        )
        if config.requests < 0 or config.max_tokens < 1 or config.timeout <= 0:
            raise ValueError(f"{SECTION}: requests must be >= 0, max_tokens >= 1 and timeout > 0")
        return config


def _body(path: str, model: str, config: WarmupConfig) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": config.max_tokens, "temperature": 0}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": config.prompt}]
    else:
        body["prompt"] = config.prompt
    return body


def _headers(spec: str | None) -> dict[str, str]:
    """vLLM started with ``--api-key`` (or VLLM_API_KEY) wants it on every request."""
    key = None
    if spec:
        try:
            key = ModelSpec.parse(spec).flag_value("--api-key")
        except ValueError:
            key = None
    key = key or os.environ.get("VLLM_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("message")
        if message:
            return str(message)
    except (ValueError, AttributeError, KeyError, TypeError):
        pass
    return raw.decode(errors="replace").strip()[:500]


def _no_chat_template(status: int, message: str) -> bool:
    low = message.lower()
    return status == 400 and ("chat template" in low or "chat_template" in low)


async def _send(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str], timeout: float
) -> tuple[int, bytes, float]:
    started = time.monotonic()
    try:
        async with session.post(
            url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            raw = await response.read()
            return response.status, raw, time.monotonic() - started
    except asyncio.TimeoutError:
        raise WarmupFailed(f"no answer from {url} within {timeout:g} s (timeout in {SECTION})") from None
    except aiohttp.ClientError as exc:
        raise WarmupFailed(f"cannot reach {url}: {exc}") from None


def _summary(latencies: list[float], path: str, fell_back: bool) -> str:
    ms = [round(s * 1000) for s in latencies]
    if len(ms) == 1:
        text = f"warm-up: 1 request, {ms[0]} ms"
    else:
        rest = sum(ms[1:]) / (len(ms) - 1)
        text = f"warm-up: {len(ms)} requests, first {ms[0]} ms, then {rest:.0f} ms on average"
    if fell_back:
        text += f" (via {path}: the model has no chat template)"
    elif path != CHAT:
        text += f" (via {path})"
    return text


async def warm_up(ctx: HookContext, config: WarmupConfig) -> str:
    """Send the warm-up requests; return the summary line or raise :class:`WarmupFailed`."""
    model = ctx.model or (ModelSpec.parse(ctx.new_spec).served_name if ctx.new_spec else None)
    if not model:
        raise WarmupFailed("no model name to warm up (ctx.model is empty)")
    headers = _headers(ctx.new_spec)
    base = ctx.vllm_base.rstrip("/")
    path = config.endpoint
    fell_back = False
    latencies: list[float] = []
    while len(latencies) < config.requests:
        status, raw, seconds = await _send(
            ctx.session, base + path, _body(path, model, config), headers, config.timeout
        )
        if status == 200:
            latencies.append(seconds)
            continue
        message = _error_message(raw)
        if path == CHAT and config.fallback and _no_chat_template(status, message):
            log.info("warm-up: %s has no chat template; using %s", model, COMPLETIONS)
            path, fell_back = COMPLETIONS, True
            continue
        hint = (
            f'; the model has no chat template: set fallback = true or endpoint = "completions" in {SECTION}'
            if _no_chat_template(status, message)
            else ""
        )
        raise WarmupFailed(
            f"warm-up request {len(latencies) + 1} of {config.requests} to {path} for {model} "
            f"answered {status}: {message}{hint}"
        )
    return _summary(latencies, path, fell_back)


@hookimpl
async def post_switch(ctx: HookContext) -> str | None:
    config = WarmupConfig.parse(ctx.plugin_config)
    if config.requests == 0:
        return None
    return await warm_up(ctx, config)
