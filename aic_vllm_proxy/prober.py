"""Readiness and health checks against vLLM.

vLLM binds its port only after the weights are loaded, so "connection refused" is the normal
answer for minutes. Ready means: ``GET /health`` answered 200, then ``GET /v1/models``
answered a model list. Probing stops at once when the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import aiohttp
from yarl import URL

log = logging.getLogger(__name__)

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5.0, sock_connect=1.0)


@dataclass(frozen=True)
class Ready:
    """vLLM answered; ``models`` are the ids from ``/v1/models``."""

    models: list[str]


class ProcessExited(Exception):
    """The process ended while we waited for it to become ready."""


async def probe_once(session: aiohttp.ClientSession, base: URL, headers: dict[str, str]) -> Ready | None:
    """One readiness check: a :class:`Ready` or ``None`` (not yet)."""
    try:
        async with session.get(base / "health", timeout=PROBE_TIMEOUT, headers=headers) as resp:
            if resp.status != 200:
                return None
            await resp.read()
        async with session.get(base / "v1" / "models", timeout=PROBE_TIMEOUT, headers=headers) as resp:
            if resp.status != 200:
                return None
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not data:
        return None
    return Ready(models=[str(item.get("id")) for item in data if isinstance(item, dict)])


async def wait_until_ready(
    session: aiohttp.ClientSession,
    base: URL,
    exited: asyncio.Event,
    *,
    interval: float,
    headers: dict[str, str] | None = None,
) -> Ready:
    """Probe every ``interval`` seconds until vLLM is ready.

    Raises :class:`ProcessExited` as soon as ``exited`` is set. The caller bounds the total
    time (``asyncio.wait_for``) with the ready timeout.
    """
    headers = headers or {}
    while True:
        if exited.is_set():
            raise ProcessExited()
        probe = asyncio.ensure_future(probe_once(session, base, headers))
        ended = asyncio.ensure_future(exited.wait())
        try:
            done, _ = await asyncio.wait({probe, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (probe, ended):
                if not task.done():
                    task.cancel()
            await asyncio.gather(probe, ended, return_exceptions=True)
        if probe in done and not probe.cancelled() and probe.exception() is None:
            result = probe.result()
            if result is not None:
                return result
        if exited.is_set():
            raise ProcessExited()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(exited.wait(), interval)


async def healthy(session: aiohttp.ClientSession, base: URL, headers: dict[str, str]) -> bool | None:
    """``GET /health``: True on 200, False on another status, None when it cannot be reached."""
    try:
        async with session.get(base / "health", timeout=PROBE_TIMEOUT, headers=headers) as resp:
            await resp.read()
            return resp.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
