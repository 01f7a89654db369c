"""The asyncio client, with the same methods as the synchronous one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any

import httpx

from aic_vllm_proxy.client.calls import (
    T,
    _Call,
    _catalog_call,
    _ClientBase,
    _CloseLog,
    _health_call,
    _instances_call,
    _log_stream_request,
    _logs_call,
    _model_name_call,
    _OpenLog,
    _Plan,
    _plugins_call,
    _start_load_call,
    _start_switch_call,
    _status_call,
    _Steps,
    _stop_call,
    _unload_call,
    _Wait,
)
from aic_vllm_proxy.client.errors import ProxyError
from aic_vllm_proxy.client.progress import ProgressArg
from aic_vllm_proxy.client.views import LoadResultDict, StatusDict, SwitchResultDict, UnloadResultDict
from aic_vllm_proxy.schemas import InstanceStatus, PluginInfo


class _LogTask:
    """Follows the log stream in a task, each line handed to ``show``."""

    def __init__(self, lines: AsyncIterator[str], show: Callable[[str], None]) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._pipe(lines, show))

    async def _pipe(self, lines: AsyncIterator[str], show: Callable[[str], None]) -> None:
        with contextlib.suppress(ProxyError):  # no stream: /status tells the rest
            async for line in lines:
                show(line)
                self._arrived.set()

    async def wait(self, seconds: float, until: Callable[[], bool]) -> None:
        """Until the stream ends, ``until()`` is true after a line, or ``seconds`` have passed."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not until() and not self._task.done():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            self._arrived.clear()
            arrived = asyncio.ensure_future(self._arrived.wait())
            await asyncio.wait({self._task, arrived}, timeout=remaining)
            arrived.cancel()

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


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
            response = await self._http.request(**self._request(call))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        return self._answer(call, response)

    async def _run(self, plan: _Plan[T]) -> T:
        """Carry out a plan's steps (see ``calls.py``); the log stream is read by a task."""
        steps = _Steps(plan)
        log: _LogTask | None = None
        try:
            while (step := steps.next()) is not None:
                try:
                    if isinstance(step, _Call):
                        steps.done(await self._send(step))
                    elif isinstance(step, _OpenLog):
                        log = _LogTask(self.follow_logs(step.lines, model=step.model), step.show)
                    elif isinstance(step, _Wait) and log is not None and step.to_end:
                        await log.wait(step.seconds, step.until)
                    elif isinstance(step, _Wait):
                        await asyncio.sleep(step.seconds)
                    elif isinstance(step, _CloseLog) and log is not None:
                        await log.stop()
                        log = None
                except BaseException as exc:  # thrown into the plan, which handles it or not
                    steps.done(error=exc)
        finally:
            if log is not None:
                await log.stop()
        return steps.result

    async def status(self) -> StatusDict:
        """See :meth:`VLLMProxyClient.status`."""
        return await self._send(_status_call())

    async def health(self) -> dict[str, Any]:
        return await self._send(_health_call())

    async def model_name(self) -> str | None:
        return await self._send(_model_name_call())

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
        return await self._run(self._switch_plan(model, args, force, timeout, progress, verbose))

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
        return await self._run(self._wait_plan(timeout, progress, verbose))

    async def stop(self, model: str | None = None, *, force: bool = False) -> StatusDict:
        """See :meth:`VLLMProxyClient.stop`."""
        return await self._send(_stop_call(force, model))

    async def load(
        self,
        name: str,
        wait: bool = True,
        *,
        timeout: float | None = None,
        progress: ProgressArg | None = None,
        verbose: bool | None = None,
    ) -> LoadResultDict:
        """See :meth:`VLLMProxyClient.load`."""
        if not wait:
            return await self._send(_start_load_call(name))
        return await self._run(self._load_plan(name, timeout, progress, verbose))

    async def unload(self, name: str, *, force: bool = False) -> UnloadResultDict:
        """See :meth:`VLLMProxyClient.unload`."""
        return await self._send(_unload_call(name, force))

    async def instances(self) -> list[InstanceStatus]:
        """See :meth:`VLLMProxyClient.instances`."""
        return await self._send(_instances_call())

    async def catalog(self) -> dict[str, Any]:
        return await self._send(_catalog_call())

    async def logs(self, lines: int | None = None, *, model: str | None = None) -> str:
        return await self._send(_logs_call(lines, model))

    async def follow_logs(self, lines: int = 50, *, model: str | None = None) -> AsyncIterator[str]:
        """See :meth:`VLLMProxyClient.follow_logs`."""
        try:
            async with self._http.stream(**_log_stream_request(lines, self.timeout, model)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._check(response)
                async for line in response.aiter_lines():
                    yield line
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    async def plugins(self) -> list[PluginInfo]:
        return await self._send(_plugins_call())
