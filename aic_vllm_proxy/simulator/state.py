"""Shared state of the simulated API server: configuration, in-flight requests,
engine health, and the means to cut in-flight requests (engine death, shutdown)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .logfmt import ProcessLog
from .metrics import Metrics
from .sleep import SleepConfig, SleepState

if TYPE_CHECKING:
    from aiohttp import web

    from .engine_client import EngineProcess

ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."


@dataclass
class SimConfig:
    model: str
    served_names: list[str]
    max_model_len: int
    runner: str = "generate"  # or "pooling" (embeddings only)
    api_keys: list[str] = field(default_factory=list)
    token_delay: float = 0.0
    ttft: float = 0.0
    crash_on_request: int | None = None
    abort_stream: str = "cut"  # "cut" or "error"
    default_max_tokens: int = 16
    embedding_dim: int = 384
    max_num_seqs: int = 256
    request_id_headers: bool = False
    log_requests: bool = False
    fingerprint: str = "vllm-0.0.0-nohash"
    instance: str = ""  # X-Simulator-Instance's value (server.instance_header); "" sends none
    sleep: SleepConfig = field(default_factory=SleepConfig)


class Cut(Exception):
    """Raised inside a request handler whose request must end now."""


class RequestCtx:
    """One in-flight generation request."""

    __slots__ = ("chat", "cut_reason", "internal_id", "request", "request_id", "response", "waker")

    def __init__(self, request_id: str, internal_id: str, request: web.Request, chat: bool) -> None:
        self.request_id = request_id  # the response's id: chatcmpl-<hex>
        self.internal_id = internal_id  # the engine's id: chatcmpl-<hex>-<hex>
        self.request = request
        self.chat = chat
        self.response: web.StreamResponse | None = None  # set once headers are sent
        self.cut_reason: str | None = None  # "engine_dead" or "shutdown"
        self.waker: asyncio.Future[None] | None = None

    async def sleep(self, delay: float) -> None:
        """``asyncio.sleep`` that a cut interrupts (then raises ``Cut``)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(delay, _wake, fut)
        self.waker = fut
        try:
            await fut
        finally:
            handle.cancel()
            self.waker = None
        if self.cut_reason is not None:
            raise Cut(self.cut_reason)

    async def wait_for(self, event: asyncio.Event) -> None:
        """Wait until ``event`` is set; a cut interrupts the wait (then raises ``Cut``)."""
        if event.is_set():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = asyncio.ensure_future(event.wait())
        waiter.add_done_callback(lambda _: _wake(fut))
        self.waker = fut
        try:
            await fut
        finally:
            waiter.cancel()
            self.waker = None
        if self.cut_reason is not None:
            raise Cut(self.cut_reason)

    def cut(self, reason: str) -> None:
        if self.cut_reason is not None:
            return
        self.cut_reason = reason
        if self.waker is not None:
            _wake(self.waker)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SimState:
    def __init__(self, config: SimConfig, log: ProcessLog) -> None:
        self.config = config
        self.log = log
        self.metrics = Metrics(config.served_names[0])
        self.engine: EngineProcess | None = None
        self.engine_dead = False
        self.shutting_down = False
        self.inflight: set[RequestCtx] = set()
        self.generation_count = 0
        self.slots = asyncio.Semaphore(max(1, config.max_num_seqs))
        self.idle = asyncio.Event()
        self.idle.set()
        self.sleep = SleepState(config.sleep, log)

    def begin(self, ctx: RequestCtx) -> None:
        self.inflight.add(ctx)
        self.idle.clear()

    def end(self, ctx: RequestCtx) -> None:
        self.inflight.discard(ctx)
        if not self.inflight:
            self.idle.set()

    def cut_all(self, reason: str) -> None:
        for ctx in list(self.inflight):
            ctx.cut(reason)

    def log_abort(self, ctx: RequestCtx) -> None:
        """vLLM's lines for a request whose client went away (vLLM 0.32 prints them
        only with --enable-log-requests; the simulator always does). vLLM does not count
        such a request in vllm:request_success_total."""
        self.log.info("async_llm.py:922", f"Aborted request(s) {ctx.internal_id}.")
        # The engine's id is "<request id>[-<prompt index>]-<random>"; this line names the
        # request as the serving layer passed it: without the random part (cmpl-<hex>-0).
        self.log.info("async_llm.py:783", f"Request {ctx.internal_id.rsplit('-', 1)[0]} aborted.")
