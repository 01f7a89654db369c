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
    _event_stream_request,
    _health_call,
    _instances_call,
    _log_stream_request,
    _logs_call,
    _model_name_call,
    _nodes_call,
    _OpenEvents,
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
from aic_vllm_proxy.client.sse import EVENT_STREAM, EventParser
from aic_vllm_proxy.client.views import LoadResultDict, StatusDict, SwitchResultDict, UnloadResultDict
from aic_vllm_proxy.schemas import InstanceStatus, NodesStatus, PluginInfo, ProxyEvent


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


class _EventTask:
    """Follows ``GET /events`` in a task; the events wait in a queue for the plan."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._queue: asyncio.Queue[ProxyEvent | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._read(http))
        self.ended = False

    async def _read(self, http: httpx.AsyncClient) -> None:
        try:
            async with http.stream(**_event_stream_request(10.0)) as response:
                kind = response.headers.get("content-type", "").split(";")[0].strip()
                if response.status_code != 200 or kind != EVENT_STREAM:
                    return  # an older daemon: 404
                parser = EventParser()
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        self._queue.put_nowait(event)
        except (httpx.HTTPError, OSError, ValueError):
            pass  # the proxy went away: /status tells the rest
        finally:
            self._queue.put_nowait(None)

    async def opened(self, timeout: float) -> bool:
        """True once the stream's first message came (it is not kept)."""
        return bool(await self.wait(timeout))

    async def wait(self, seconds: float) -> list[ProxyEvent] | None:
        """The events that come within ``seconds`` (once one came: all those there are); None
        once the stream has ended."""
        if self.ended:
            return None
        received: list[ProxyEvent | None] = []
        if self._queue.empty() and seconds > 0:
            try:
                received.append(await asyncio.wait_for(self._queue.get(), seconds))
            except asyncio.TimeoutError:
                return []
        while not self._queue.empty():
            received.append(self._queue.get_nowait())
        events = [event for event in received if event is not None]
        if len(events) < len(received):
            self.ended = True
            return events or None
        return events

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
        """Carry out a plan's steps (see ``calls.py``); the streams are read by tasks."""
        steps = _Steps(plan)
        log: _LogTask | None = None
        events: _EventTask | None = None
        try:
            while (step := steps.next()) is not None:
                try:
                    if isinstance(step, _Call):
                        steps.done(await self._send(step))
                    elif isinstance(step, _OpenEvents):
                        events = _EventTask(self._http)
                        opened = await events.opened(step.timeout)
                        if not opened:  # an older daemon (404), or silent: poll
                            await events.stop()
                            events = None
                        steps.done(opened)
                    elif isinstance(step, _OpenLog):
                        log = _LogTask(self.follow_logs(step.lines, model=step.model), step.show)
                    elif isinstance(step, _Wait) and step.events:
                        steps.done(await events.wait(step.seconds) if events is not None else None)
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
            if events is not None:
                await events.stop()
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

    async def logs(
        self, lines: int | None = None, *, model: str | None = None, rank: int | None = None
    ) -> str:
        """See :meth:`VLLMProxyClient.logs`."""
        return await self._send(_logs_call(lines, model, rank))

    async def follow_logs(
        self, lines: int = 50, *, model: str | None = None, rank: int | None = None
    ) -> AsyncIterator[str]:
        """See :meth:`VLLMProxyClient.follow_logs`."""
        request = _log_stream_request(lines, self.timeout, model, rank)
        try:
            async with self._http.stream(**request) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._check(response)
                async for line in response.aiter_lines():
                    yield line
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    async def plugins(self) -> list[PluginInfo]:
        return await self._send(_plugins_call())

    async def nodes(self) -> NodesStatus:
        """See :meth:`VLLMProxyClient.nodes`."""
        return await self._send(_nodes_call())
