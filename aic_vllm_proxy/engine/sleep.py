"""vLLM's sleep mode, as the daemon drives it (never a client: the proxy refuses these routes).

vLLM started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1`` in its environment
serves (vLLM 0.32, ``vllm/entrypoints/serve/dev/``):

- ``POST /sleep?level=1|2&mode=wait``: level 1 moves the weights to host RAM and drops the KV
  cache, level 2 drops both; ``mode=wait`` lets requests still running finish (the instance has
  drained them already).
- ``POST /wake_up``: the weights (and KV cache) back on the GPU. From level 2 the weights were
  dropped: ``POST /collective_rpc {"method": "reload_weights"}`` reads them again, then
  ``POST /reset_prefix_cache`` forgets the cache computed with the old ones.
- ``GET /is_sleeping``: ``{"is_sleeping": bool}``.

Each call here raises :class:`SleepCallFailed` saying which call failed and how.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from yarl import URL

from aic_vllm_proxy.spec import ModelSpec

#: What an instance started with sleep mode gets on top of its arguments and environment.
SLEEP_FLAG = "--enable-sleep-mode"
DEV_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}


GIB = 1024**3


def host_weights(loaded_gib: list[float], spec: ModelSpec) -> int | None:
    """The host RAM a model's weights take once parked at level 1, in bytes, from vLLM's "Model
    loading took X GiB memory" lines (``logs.loaded_weights_gib``): their sum when several
    workers logged one, else the one value times the model's tensor and pipeline parallel sizes
    (each GPU's worker offloads its own share). None when vLLM logged none."""
    if not loaded_gib:
        return None
    if len(loaded_gib) > 1:
        return int(sum(loaded_gib) * GIB)
    shards = 1
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size"):
        value = spec.flag_value(flag)
        if value is not None and value.isdigit():
            shards *= max(int(value), 1)
    return int(loaded_gib[0] * shards * GIB)


def host_memory_available() -> int | None:
    """MemAvailable of ``/proc/meminfo`` in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class SleepCallFailed(Exception):
    """A sleep-mode call to vLLM failed: the message names the call and what vLLM answered."""


async def _call(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    headers: dict[str, str],
    timeout: float,
    json: Any = None,
) -> Any:
    what = f"{method} {url.path}{'?' + url.query_string if url.query_string else ''}"
    try:
        async with session.request(
            method, url, headers=headers, json=json, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                text = body.decode(errors="replace").strip()[:300]
                raise SleepCallFailed(f"vLLM answered {what} with {resp.status}: {text}")
            try:
                return await resp.json(content_type=None)
            except ValueError:
                return None
    except asyncio.TimeoutError:
        raise SleepCallFailed(f"vLLM did not answer {what} within {timeout:g} s") from None
    except aiohttp.ClientError as exc:
        raise SleepCallFailed(f"{what} failed: {type(exc).__name__}: {exc}") from None


async def put_to_sleep(
    session: aiohttp.ClientSession, base: URL, level: int, headers: dict[str, str], timeout: float
) -> None:
    """``POST /sleep?level=LEVEL&mode=wait``."""
    url = (base / "sleep").with_query(level=str(level), mode="wait")
    await _call(session, "POST", url, headers, timeout)


async def wake_up(
    session: aiohttp.ClientSession, base: URL, level: int, headers: dict[str, str], timeout: float
) -> None:
    """Wake vLLM from ``level``: ``/wake_up``, and from level 2 ``reload_weights`` and a reset
    of the prefix cache; ``timeout`` bounds each call."""
    answer = await _call(session, "POST", base / "wake_up", headers, timeout)
    if isinstance(answer, dict) and answer.get("status") not in (None, "awake"):
        raise SleepCallFailed(f"vLLM is not fully awake after POST /wake_up: {answer}")
    if level >= 2:
        rpc = {"method": "reload_weights"}
        await _call(session, "POST", base / "collective_rpc", headers, timeout, json=rpc)
        await _call(session, "POST", base / "reset_prefix_cache", headers, timeout)


async def is_sleeping(
    session: aiohttp.ClientSession, base: URL, headers: dict[str, str], timeout: float
) -> bool:
    """``GET /is_sleeping``."""
    answer = await _call(session, "GET", base / "is_sleeping", headers, timeout)
    return bool(isinstance(answer, dict) and answer.get("is_sleeping"))


__all__ = [
    "DEV_MODE_ENV",
    "SLEEP_FLAG",
    "SleepCallFailed",
    "host_memory_available",
    "host_weights",
    "is_sleeping",
    "put_to_sleep",
    "wake_up",
]
