"""vLLM 0.32's sleep mode, as the simulated engine keeps it: the scheduler's pause, the
executor's sleeping tags, level 2's discarded weights, and the simulated GPU memory.

What vLLM 0.32 does (``EngineCore.sleep``/``wake_up``, the executor, the CuMem allocator):

* ``sleep(level, mode)`` first pauses the scheduler. ``abort`` ends every request at once
  (``finish_reason: "abort"``); ``wait`` lets running requests finish and the call returns
  after them; ``keep`` freezes them until the engine is fully awake again. Requests that
  arrive while paused are accepted and wait (they are not refused). Level 0 stops there;
  levels 1 and 2 then release the GPU memory of the allocator's pool (level 1 keeps a copy
  of the weights in host RAM, level 2 discards them) and mark the tags ``weights`` and
  ``kv_cache`` asleep. A second sleep logs ``Executor is already sleeping.``
* ``wake_up(tags)`` maps the tags given (all when none) back; any other allocation (CUDA
  graphs, runtime) comes back on any wake. Once no tag sleeps, the scheduler resumes and
  the answer says ``awake``, else ``sleeping``. After level 2 the weights come back
  uninitialised: the model generates garbage until ``collective_rpc("reload_weights")``.
* Without ``--enable-sleep-mode`` (on CUDA) nothing refuses the calls: the pool is empty,
  so sleep pauses and answers as usual but frees nothing, and level 2 loses nothing.

The engine core runs one utility call at a time (``lock``). With ``AIC_VLLM_SIM_GPU_STATE``
set to a directory, the simulated memory is written to ``<dir>/<pid>.json`` on every change
(see :class:`GpuStateFile` and docs/simulator.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .logfmt import PY_SITE, GiB, ProcessLog, format_gib, traceback_text

if TYPE_CHECKING:
    from .state import RequestCtx

#: What a process keeps on a GPU after a sleep: its CUDA context, NCCL and torch's own buffers.
CONTEXT_GIB = 0.5
#: CUDA graphs ("Graph capturing finished ... took 0.42 GiB"), none with --enforce-eager.
GRAPHS_GIB = 0.42
STATE_ENV = "AIC_VLLM_SIM_GPU_STATE"
SLEEP_TAGS = ("weights", "kv_cache")
_OTHER = "other"  # every allocation that is not a deferrable tag (CUDA graphs, runtime)
WAKE_ERROR = "CUDA Error: out of memory at /workspace/csrc/cumem_allocator.cpp:124"


def visible_devices(count: int) -> list[str]:
    """The GPUs the engine uses: the first ``count`` ids of ``CUDA_VISIBLE_DEVICES`` (as
    written: indices or UUIDs), ``0 .. count-1`` when the variable is not set."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in value.split(",") if d.strip()][:count]


@dataclass
class SleepConfig:
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE=1: the dev routes exist
    enabled: bool = False  # --enable-sleep-mode
    sleep_delay: float = 0.1
    wake_delay: float = 0.05
    reload_delay: float = 0.2
    keeps_memory: bool = False
    wake_fails: bool = False
    wake_hangs: bool = False
    weights_bytes: int = int(1.12 * GiB)
    kv_bytes: int = int(61.37 * GiB)
    graphs_bytes: int = int(GRAPHS_GIB * GiB)
    devices: list[str] = field(default_factory=lambda: ["0"])
    state_dir: str | None = None


class UtilityFailed(Exception):
    """An engine utility call raised: vLLM answers 500 with this message."""


class GpuStateFile:
    """``<dir>/<pid>.json``, replaced atomically on every change::

        {"pid": 4242, "engine_pid": 4243, "gpus": {"0": 69357142835},
         "sleeping": false, "sleep_level": 0}

    ``gpus``: bytes the engine holds on each GPU id of CUDA_VISIBLE_DEVICES. Removed when the
    server exits; a SIGKILL leaves it behind (readers check that ``engine_pid`` lives)."""

    def __init__(self, directory: str, pid: int) -> None:
        self.path = Path(directory) / f"{pid}.json"

    def write(self, record: dict[str, object]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


class SleepState:
    def __init__(self, config: SleepConfig, log: ProcessLog) -> None:
        self.config = config
        self.log = log  # the API server's
        self.engine_log = log  # the EngineCore's, once attached
        self.engine_pid: int | None = None
        self.paused: str | None = None  # None, "new" (abort, wait) or "all" (keep)
        self.tags: set[str] = set()  # the executor's sleeping tags
        self.released: set[str] = set()  # tags (and _OTHER) whose GPU memory is released
        self.level = 0
        self.discarded = False  # level 2 dropped the weights: garbage once woken
        self.garbage = False  # weights resident but uninitialised until reload_weights
        self.scheduling = asyncio.Event()  # set while new requests are scheduled
        self.stepping = asyncio.Event()  # cleared by mode=keep: running requests freeze
        self.scheduling.set()
        self.stepping.set()
        self.running: set[RequestCtx] = set()
        self.drained = asyncio.Event()
        self.drained.set()
        self.lock = asyncio.Lock()
        self.hung = False
        self.file: GpuStateFile | None = None
        self._logged_once: set[str] = set()

    # -- state --------------------------------------------------------------------

    @property
    def is_sleeping(self) -> bool:
        """vLLM's ``is_sleeping``: the scheduler is paused or a tag sleeps."""
        return self.paused is not None or bool(self.tags)

    def used_bytes(self) -> int:
        """Simulated bytes held on each GPU."""
        c = self.config
        used = int(CONTEXT_GIB * GiB)
        if "weights" not in self.released:
            used += c.weights_bytes
        if "kv_cache" not in self.released:
            used += c.kv_bytes
        if _OTHER not in self.released:
            used += c.graphs_bytes
        return used

    def attach(self, engine_pid: int | None) -> None:
        """The engine is loaded: its log prefix, and the state file's first version."""
        self.engine_pid = engine_pid
        if engine_pid is not None:
            self.engine_log = ProcessLog("EngineCore", pid=engine_pid)
        directory = os.environ.get(STATE_ENV)
        if directory:
            self.file = GpuStateFile(directory, os.getpid())
        self._publish()

    def detach(self) -> None:
        """The engine is gone: so is its GPU memory."""
        if self.file is not None:
            self.file.remove()
            self.file = None

    def _publish(self) -> None:
        if self.file is None:
            return
        used = self.used_bytes()
        self.file.write(
            {
                "pid": os.getpid(),
                "engine_pid": self.engine_pid,
                "gpus": {device: used for device in self.config.devices},
                "sleeping": self.is_sleeping,
                "sleep_level": self.level if self.is_sleeping else 0,
            }
        )

    # -- requests -----------------------------------------------------------------

    async def admit(self, ctx: RequestCtx) -> None:
        """A new request waits while the scheduler is paused (vLLM queues it)."""
        while not self.scheduling.is_set():
            await ctx.wait_for(self.scheduling)

    def started(self, ctx: RequestCtx) -> None:
        self.running.add(ctx)
        self.drained.clear()

    def ended(self, ctx: RequestCtx) -> None:
        self.running.discard(ctx)
        if not self.running:
            self.drained.set()

    async def step(self, ctx: RequestCtx) -> None:
        """Before each token: a running request freezes while paused with mode=keep."""
        while not self.stepping.is_set():
            await ctx.wait_for(self.stepping)

    # -- engine calls -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def utility(self) -> AsyncIterator[None]:
        """One engine utility call at a time; after a hung wake, none ever returns."""
        async with self.lock:
            if self.hung:
                await asyncio.Event().wait()
            yield

    def _once(self, where: str, message: str) -> None:
        if message not in self._logged_once:
            self._logged_once.add(message)
            self.engine_log.info(where, message)

    def _set_pause(self, paused: str | None) -> None:
        name = {None: "UNPAUSED", "new": "PAUSED_NEW", "all": "PAUSED_ALL"}[paused]
        self.engine_log.info("scheduler.py:2756", f"setting pause state to {name}")
        self.paused = paused
        if paused is None:
            self.scheduling.set()
            self.stepping.set()
            return
        self.scheduling.clear()
        if paused == "all":
            self.stepping.clear()
        else:
            self.stepping.set()

    async def sleep(self, level: int, mode: str, inflight: set[RequestCtx]) -> None:
        async with self.utility():  # the pause; a drain (mode=wait) holds up no other call
            if mode == "abort":
                for ctx in list(inflight):
                    ctx.cut("sleep_abort")
            self._set_pause("all" if mode == "keep" else "new")
        if mode == "wait" and not self.drained.is_set():
            self.engine_log.info(
                "core.py:993", "Waiting for in-flight requests to complete before sleeping..."
            )
            await self.drained.wait()
        if level >= 1:
            async with self.utility():
                await self._sleep_executor(level)
        self.level = level
        self._publish()

    async def _sleep_executor(self, level: int) -> None:
        log = self.engine_log
        if "weights" in self.tags:
            log.warning("abstract.py:384", "Executor is already sleeping.")
            return
        started = time.perf_counter()
        await asyncio.sleep(self.config.sleep_delay)
        c = self.config
        before = self.used_bytes()
        backed_up = discarded = 0
        if c.enabled and not c.keeps_memory:
            backed_up = c.graphs_bytes + (c.weights_bytes if level == 1 else 0)
            discarded = c.kv_bytes + (c.weights_bytes if level == 2 else 0)
            self.released = {*SLEEP_TAGS, _OTHER}
            self.discarded = self.discarded or level == 2
        log.info(
            "cumem.py:282",
            f"CuMemAllocator: sleep freed {(backed_up + discarded) / GiB:.2f} GiB memory in total, of "
            f"which {backed_up / GiB:.2f} GiB is backed up in CPU and the rest {discarded / GiB:.2f} GiB "
            "is discarded directly.",
        )
        after = self.used_bytes()
        log.info(
            "gpu_worker.py:326",
            f"Sleep mode freed {format_gib(before - after)} GiB memory, {format_gib(after)} GiB memory "
            "is still in use.",
        )
        self.tags = set(SLEEP_TAGS)
        log.info("abstract.py:390", f"It took {time.perf_counter() - started:.6f} seconds to fall asleep.")

    async def wake_up(self, tags: list[str] | None) -> bool:
        """True when fully awake (no tag sleeps any more)."""
        self.log.info("api_router.py:50", f"wake up the engine with tags: {tags}")
        async with self.utility():
            if self.config.wake_hangs:
                self.hung = True
                await asyncio.Event().wait()
            if tags is not None and "scheduling" in tags:
                tags = [t for t in tags if t != "scheduling"]
            if tags is None or tags:
                await self._wake_executor(tags)
            fully_awake = not self.tags
            if fully_awake and self.paused is not None:
                self._set_pause(None)
            self._publish()
            return fully_awake

    async def _wake_executor(self, tags: list[str] | None) -> None:
        log = self.engine_log
        if not self.tags:
            log.warning("abstract.py:396", "Executor is not sleeping.")
            return
        for tag in tags or ():
            if tag not in self.tags:
                log.warning("abstract.py:401", f"Tag {tag} is not in sleeping tags {self.tags}")
                return
        started = time.perf_counter()
        await asyncio.sleep(self.config.wake_delay)
        if self.config.wake_fails:
            self._utility_failed("wake_up", _WAKE_FRAMES, f"RuntimeError: {WAKE_ERROR}")
        woken = set(self.tags) if tags is None else set(tags)
        if tags is None:
            self.released.clear()
        else:
            self.released -= {*tags, _OTHER}
        if self.discarded and "weights" in woken:
            self.discarded = False
            self.garbage = True
        shown = tags if tags is not None else self.tags
        log.info(
            "abstract.py:408", f"It took {time.perf_counter() - started:.6f} seconds to wake up tags {shown}."
        )
        self.tags -= woken

    def _utility_failed(self, method: str, frames: list[tuple[str, int, str, str]], final: str) -> NoReturn:
        """Log as the EngineCore does and raise what the API server answers with a 500."""
        tb = traceback_text([_INVOKE_FRAME, *frames], final)
        self.engine_log.error("core.py:1750", f"Invocation of {method} method failed\n{tb}")
        raise UtilityFailed(f"Call to {method} method failed: {final.split(': ', 1)[1]}")

    async def collective_rpc(self, method: object) -> list[None]:
        async with self.utility():
            if method != "reload_weights":
                frames = [
                    (f"{PY_SITE}/vllm/v1/serial_utils.py", 503, "run_method", "raise NotImplementedError(")
                ]
                self._utility_failed(
                    "collective_rpc", frames, f"NotImplementedError: Method {method!r} is not implemented."
                )
            started = time.perf_counter()
            self._once("inplace.py:91", "Reloading weights inplace...")
            await asyncio.sleep(self.config.reload_delay)
            if "weights" not in self.tags:
                self.garbage = False
            self._once(
                "inplace.py:113",
                f"Reloading and processing weights took {time.perf_counter() - started:.2f} seconds",
            )
            return [None]

    async def reset_prefix_cache(self, reset_running_requests: bool) -> bool:
        """vLLM fails (False) while running requests hold cache blocks, unless told to reset them."""
        self.log.info("api_router.py:39", "Resetting prefix cache...")
        async with self.utility():
            return reset_running_requests or not self.running

    async def release_kv_cache_memory(self, has_requests: bool) -> None:
        async with self.utility():
            if self.paused is None or has_requests:
                frames = [
                    (
                        f"{PY_SITE}/vllm/v1/engine/core.py",
                        1030,
                        "release_kv_cache_memory",
                        "raise RuntimeError(",
                    )
                ]
                message = "release_kv_cache_memory() requires a completed pause first"
                self._utility_failed("release_kv_cache_memory", frames, f"RuntimeError: {message}")
            if self.tags:
                frames = [
                    (
                        f"{PY_SITE}/vllm/v1/engine/core.py",
                        1034,
                        "release_kv_cache_memory",
                        "raise RuntimeError(",
                    )
                ]
                message = "release_kv_cache_memory() requires all executor memory to be resident"
                self._utility_failed("release_kv_cache_memory", frames, f"RuntimeError: {message}")
            c = self.config
            freed = 0
            if c.enabled and not c.keeps_memory:
                self.released.add("kv_cache")
                freed = c.kv_bytes
            self.tags.add("kv_cache")
            self.engine_log.info(
                "cumem.py:319", f"CuMemAllocator: discarded {freed / GiB:.2f} GiB for tags ('kv_cache',)."
            )
            self._publish()

    async def is_sleeping_now(self) -> bool:
        async with self.utility():
            return self.is_sleeping


_CORE = f"{PY_SITE}/vllm/v1/engine/core.py"
_INVOKE_FRAME = (_CORE, 1740, "_invoke_utility_method", "result = get_result()")
_WAKE_FRAMES = [
    (_CORE, 1012, "wake_up", "self.model_executor.wake_up(tags)"),
    (
        f"{PY_SITE}/vllm/v1/executor/abstract.py",
        406,
        "wake_up",
        'self.collective_rpc("wake_up", kwargs=dict(tags=tags))',
    ),
    (f"{PY_SITE}/vllm/v1/worker/gpu_worker.py", 333, "wake_up", "self.sleep_mode_backend.resume(tags)"),
    (f"{PY_SITE}/vllm/device_allocator/sleep_mode_backend.py", 144, "resume", "allocator.wake_up(tags)"),
    (f"{PY_SITE}/vllm/device_allocator/cumem.py", 350, "wake_up", "create_and_map(handle)"),
]
