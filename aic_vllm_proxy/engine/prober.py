"""Readiness and health checks against vLLM.

vLLM binds its port only after the weights are loaded, so "connection refused" is the normal
answer for minutes. Ready means: the process listening on vLLM's port is one the proxy started
(its process group holds the listening socket: see ``procgroup.port_listener``), ``GET /health``
answered 200, and ``GET /v1/models`` lists the model that was launched. No HTTP request is sent
before the listener is known to be ours: another process on the port (another daemon's vLLM) is
:class:`PortTaken`, never a ready model. Probing stops at once when the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from yarl import URL

from aic_vllm_proxy.engine import procgroup

log = logging.getLogger(__name__)

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5.0, sock_connect=1.0)
CONNECT_TIMEOUT = 1.0


@dataclass(frozen=True)
class Ready:
    """vLLM answered; ``models`` are the ids from ``/v1/models``."""

    models: list[str]


@dataclass(frozen=True)
class Target:
    """What a launch must look like to be ready: its group listening on ``port`` (at
    ``addresses``), serving ``served_names`` (``--served-model-name``) or else ``model``."""

    pgid: int
    port: int
    addresses: tuple[str, ...]
    model: str
    served_names: tuple[str, ...] = ()


class ProcessExited(Exception):
    """The process ended while we waited for it to become ready."""


class PortTaken(Exception):
    """Another process listens on vLLM's port: nothing may be sent to it."""


def names_model(model_id: str, model: str) -> bool:
    """True if ``model_id`` (an id in ``/v1/models``) is how vLLM names ``model`` when no
    ``--served-model-name`` is given: the model as given, or (with ``HF_HUB_OFFLINE``, where vLLM
    replaces a repo id by its local snapshot) a path in that repo's cache folder."""
    if model_id.rstrip("/") == model.rstrip("/"):
        return True
    return "/" in model and f"models--{model.replace('/', '--')}/" in model_id


def serves(models: Sequence[str], target: Target, *, ours: bool) -> bool:
    """Whether ``models`` (the ids vLLM lists) show the launched model. Served names are listed
    as given; without them a name vLLM chose is taken only from a listener known to be ours."""
    if target.served_names:
        return all(name in models for name in target.served_names)
    return any(names_model(m, target.model) for m in models) or ours


async def _accepts(base: URL) -> bool:
    """True if something accepts a TCP connection at ``base`` (nothing is sent)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(base.host, base.port), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def listener(base: URL, target: Target) -> str:
    """Who listens at ``base``: ``procgroup.OURS``, ``FOREIGN``, ``NOBODY`` or ``UNKNOWN``."""
    if not await _accepts(base):
        return procgroup.NOBODY
    return await asyncio.to_thread(procgroup.port_listener, target.pgid, target.port, target.addresses)


async def probe_once(session: aiohttp.ClientSession, base: URL, headers: dict[str, str]) -> Ready | None:
    """One readiness check over HTTP: a :class:`Ready` or ``None`` (not yet)."""
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


class _Check:
    """One launch's readiness: the listener first (once it is ours it stays so), then HTTP."""

    def __init__(self, session: aiohttp.ClientSession, base: URL, headers: dict[str, str], target: Target):
        self.session, self.base, self.headers, self.target = session, base, headers, target
        self.ours = False
        self.told: list[str] | None = None

    async def __call__(self) -> Ready | None:
        if not self.ours:
            who = await listener(self.base, self.target)
            if who == procgroup.FOREIGN:
                raise PortTaken()
            if who == procgroup.NOBODY:
                return None
            self.ours = who == procgroup.OURS
        ready = await probe_once(self.session, self.base, self.headers)
        if ready is None or serves(ready.models, self.target, ours=self.ours):
            return ready
        if self.told != ready.models:
            self.told = ready.models
            wanted = self.target.served_names or (self.target.model,)
            log.info("vLLM lists %s, not %s yet: still waiting", ready.models, list(wanted))
        return None


async def wait_until_ready(
    session: aiohttp.ClientSession,
    base: URL,
    exited: asyncio.Event,
    *,
    interval: float,
    target: Target,
    headers: dict[str, str] | None = None,
) -> Ready:
    """Probe every ``interval`` seconds until vLLM is ready.

    Raises :class:`ProcessExited` as soon as ``exited`` is set, :class:`PortTaken` when another
    process listens on the port. The caller bounds the total time (``asyncio.wait_for``) with
    the ready timeout.
    """
    check = _Check(session, base, headers or {}, target)
    while True:
        if exited.is_set():
            raise ProcessExited()
        probe = asyncio.ensure_future(check())
        ended = asyncio.ensure_future(exited.wait())
        try:
            done, _ = await asyncio.wait({probe, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (probe, ended):
                if not task.done():
                    task.cancel()
            await asyncio.gather(probe, ended, return_exceptions=True)
        if probe in done and not probe.cancelled():
            error = probe.exception()
            if isinstance(error, PortTaken):
                raise error
            result = probe.result() if error is None else None
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
