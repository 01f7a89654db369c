"""The asyncio client, with the same methods as the synchronous one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import httpx

from aic_vllm_proxy.client.calls import (
    FINAL_LINES_WAIT,
    FOLLOW_FROM_LINES,
    READY_LINES_WAIT,
    T,
    _Call,
    _catalog_call,
    _ClientBase,
    _failure_tail_call,
    _health_call,
    _logs_call,
    _plugins_call,
    _start_switch_call,
    _status_call,
    _stop_call,
    catalog_spec,
)
from aic_vllm_proxy.client.errors import ProxyError, ProxyUnreachable
from aic_vllm_proxy.client.views import StatusDict, SwitchResultDict
from aic_vllm_proxy.models import PluginInfo, ProcessState
from aic_vllm_proxy.progress import Outcome, ProgressArg, SwitchWatch

# ------------------------------------------------------------------- async client


class AsyncVLLMProxyClient(_ClientBase):
    """The same client for ``await``: every method of :class:`VLLMProxyClient` is a coroutine
    here (``follow_logs`` is an async iterator); ``get_*openai_client`` are the same."""

    _http: httpx.AsyncClient

    def _open(self) -> None:
        self._http = httpx.AsyncClient(**self._http_options())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncVLLMProxyClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _send(self, call: _Call[T]) -> T:
        try:
            response = await self._http.request(
                call.method, call.path, json=call.json, params=call.params, timeout=self._call_timeout(call)
            )
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        self._check(response)
        return call.parse(response)

    async def status(self) -> StatusDict:
        """See :meth:`VLLMProxyClient.status`."""
        return await self._send(_status_call())

    async def health(self) -> dict[str, Any]:
        return await self._send(_health_call())

    async def model_name(self) -> str | None:
        status = (await self.status()).as_model()
        return status.model if status.state is ProcessState.READY else None

    async def switch(
        self,
        model: str,
        args: str | Sequence[str] | None = None,
        *,
        force: bool = False,
        timeout: float | None = None,
        progress: ProgressArg | None = None,
        verbose: bool | None = None,
    ) -> SwitchResultDict:
        """See :meth:`VLLMProxyClient.switch`."""
        spec = self.spec_for(model, args)
        before = (await self.status()).as_model()
        loads = await self._catalog_lookup(spec)
        watch = self._watch(spec, before, progress, timeout, loads=loads, verbose=verbose)
        watch.begin()
        try:
            await self._send(_start_switch_call(spec, force))
        except ProxyError as exc:
            watch.show(f"FAILED: {exc.message}")
            raise
        return SwitchResultDict(watch.result(await self._follow(watch)))

    async def start_switch(
        self, model: str, args: str | Sequence[str] | None = None, *, force: bool = False
    ) -> StatusDict:
        return await self._send(_start_switch_call(self.spec_for(model, args), force))

    async def wait_until_ready(
        self,
        timeout: float | None = 600.0,
        *,
        progress: ProgressArg | None = False,
        verbose: bool | None = None,
    ) -> StatusDict:
        watch = self._watch(None, (await self.status()).as_model(), progress, timeout, verbose=verbose)
        return StatusDict((await self._follow(watch)).status)

    async def stop(self, *, force: bool = False) -> StatusDict:
        return await self._send(_stop_call(force))

    async def catalog(self) -> dict[str, Any]:
        return await self._send(_catalog_call())

    async def _catalog_lookup(self, spec: str) -> str | None:
        if len(spec.split()) != 1:
            return None
        try:
            return catalog_spec(spec, await self.catalog())
        except ProxyUnreachable:
            raise
        except ProxyError:
            return None

    async def logs(self, lines: int | None = None) -> str:
        return await self._send(_logs_call(lines))

    async def follow_logs(self, lines: int = 50) -> AsyncIterator[str]:
        """See :meth:`VLLMProxyClient.follow_logs`."""
        try:
            async with self._http.stream(
                "GET", "/logs/stream", params={"lines": lines}, timeout=httpx.Timeout(self.timeout, read=None)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._check(response)
                async for line in response.aiter_lines():
                    yield line
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    async def plugins(self) -> list[PluginInfo]:
        return await self._send(_plugins_call())

    async def _pipe_log(self, watch: SwitchWatch, ready_line: asyncio.Event) -> None:
        with contextlib.suppress(ProxyError):
            async for line in self.follow_logs(FOLLOW_FROM_LINES):
                watch.log(line)
                if watch.ready_line_seen:
                    ready_line.set()

    async def _follow(self, watch: SwitchWatch) -> Outcome:
        reader: asyncio.Task[None] | None = None
        ready_line = asyncio.Event()
        try:
            while True:
                outcome = watch.observe((await self.status()).as_model())
                if outcome is not None:
                    break
                if watch.timed_out():
                    raise self._timeout_error(watch)
                if reader is None and watch.sink is not None and watch.wants_log(watch.last):
                    reader = asyncio.create_task(self._pipe_log(watch, ready_line))
                await asyncio.sleep(self.poll_interval)
                watch.tick()
            if reader is not None and not outcome.ok:
                # A failed vLLM has exited: its stream ends once its last lines are sent.
                await asyncio.wait({reader}, timeout=FINAL_LINES_WAIT)
            elif reader is not None:  # ready: its last start-up lines may still be on their way
                waiting = asyncio.ensure_future(ready_line.wait())
                await asyncio.wait({reader, waiting}, timeout=READY_LINES_WAIT)
                waiting.cancel()
        except (KeyboardInterrupt, asyncio.CancelledError):
            watch.interrupted()
            raise
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        tail: list[str] = []
        if not outcome.ok and outcome.has_log:
            with contextlib.suppress(ProxyError):
                tail = await self._send(_failure_tail_call())
        return self._conclude(watch, outcome, tail)
