"""The hooks: refuse a switch when the GPUs lack room, wait for memory after a stop.

- ``pre_switch``: the GPUs the new model will use (the instance's GPUs, ``ctx.gpus``; without
  them ``CUDA_VISIBLE_DEVICES``; the first tensor x pipeline x data parallel size of them) must
  each have the required memory free, counting what the instance's running model (stopped
  first) holds. Re-checked for ``free_wait`` seconds, then the load is refused with what is
  short and who holds the memory.
- ``post_switch``: remembers the new vLLM's pid (to tell its memory apart at the next switch)
  and the GPUs it was started on.
- ``pre_stop``: notes which GPU processes belong to the vLLM being stopped and what they hold,
  on the GPUs it was started on (all GPUs when its instance has no GPU set).
- ``post_stop``: waits (``release_timeout``) until those processes are gone from NVML and the
  used memory dropped accordingly; a timeout is reported, the switch goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from aic_vllm_proxy.hooks import HookContext, Veto, hookimpl
from aic_vllm_proxy.spec import ModelSpec

from .guard import (
    ENV,
    RELEASED_SHARE,
    SECTION,
    GuardConfig,
    check_device,
    gib,
    gpus_needed,
    holders,
    in_group,
    visible_gpus,
)
from .nvml import Gpu, NvmlSource, NvmlUnavailable, open_source

log = logging.getLogger("aic_vllm_proxy_gpu_guard")


class MemoryNotReleased(RuntimeError):
    """The stopped vLLM's GPU memory was still held when ``release_timeout`` ran out."""


@dataclass
class HeldMemory:
    """What the vLLM being stopped held on one GPU, seen in pre_stop."""

    index: int
    held: int
    used_before: int


@dataclass
class StopRecord:
    group: int
    pids: set[int] = field(default_factory=set)
    devices: list[HeldMemory] = field(default_factory=list)


def _missing_message(reason: str) -> str:
    return (
        f"cannot check GPU memory: {reason}. On a node without NVIDIA GPUs, set "
        f'on_missing_nvml = "skip" in {SECTION} of the --config file '
        f"(or {ENV}ON_MISSING_NVML=skip) to switch without this check, "
        "or leave the plugin out with --disable-plugin gpu-guard"
    )


class GpuGuard:
    """The plugin object (one per process; it keeps what it learnt per vLLM)."""

    def __init__(self, source: NvmlSource | None = None) -> None:
        #: A source that wins over the ``nvml_source`` setting (tests, embedding).
        self.source = source
        #: vLLM base URL -> process group of the model running there (from post_switch).
        self.running: dict[str, int] = {}
        #: process group being stopped -> what it held (from pre_stop).
        self.stopping: dict[int, StopRecord] = {}
        #: process group -> the GPUs its instance started it on (from post_switch): where its
        #: memory is when it stops, even if the instance was given other GPUs meanwhile.
        self.launched_on: dict[int, tuple[str, ...]] = {}
        self._warned_skip = False

    # --------------------------------------------------------------- helpers

    def _source(self, config: GuardConfig) -> NvmlSource:
        return self.source if self.source is not None else open_source(config.nvml_source)

    async def _snapshot(self, config: GuardConfig) -> list[Gpu]:
        gpus = await asyncio.to_thread(self._source(config).snapshot)
        if not gpus:
            raise NvmlUnavailable("NVML works but reports no GPU on this node")
        return gpus

    def _skip(self, reason: str) -> str:
        if not self._warned_skip:
            self._warned_skip = True
            log.warning('gpu-guard: %s; not checking GPU memory (on_missing_nvml = "skip")', reason)
        return f"skipped: {reason}"

    @staticmethod
    def _devices(config: GuardConfig, ctx: HookContext) -> str | None:
        """The GPUs the instance's vLLM sees, as ``CUDA_VISIBLE_DEVICES`` says them: the
        instance's own (the proxy starts it with exactly these), else the ``devices`` setting,
        else the proxy's environment, which vLLM then inherits (None: every GPU)."""
        if ctx.gpus:
            return ",".join(ctx.gpus)
        return config.devices if config.devices is not None else os.environ.get("CUDA_VISIBLE_DEVICES")

    @staticmethod
    def _on(names: tuple[str, ...], gpus: list[Gpu]) -> list[Gpu]:
        """The GPUs a stopped vLLM ran on (``names``, as in CUDA_VISIBLE_DEVICES), where its
        memory is looked for; every GPU when there are none (the instance has no GPU set), or
        when one of them names no GPU that NVML lists (e.g. a MIG id)."""
        if not names:
            return gpus
        chosen, note = visible_gpus(gpus, ",".join(names))
        return gpus if note else chosen

    # ----------------------------------------------------------------- hooks

    @hookimpl
    async def pre_switch(self, ctx: HookContext) -> str:
        config = GuardConfig.parse(ctx.plugin_config)
        spec = ModelSpec.parse(ctx.new_spec or "")
        count = gpus_needed(spec)
        running = ctx.pid if ctx.pid is not None else self.running.get(ctx.vllm_base)
        deadline = time.monotonic() + config.free_wait
        while True:
            try:
                gpus = await self._snapshot(config)
            except NvmlUnavailable as exc:
                if config.on_missing_nvml == "skip":
                    return self._skip(str(exc))
                raise Veto(_missing_message(str(exc))) from None
            devices = self._devices(config, ctx)
            chosen, note = visible_gpus(gpus, devices)
            if devices is not None and not chosen and not note:
                return "no GPU is visible to vLLM (CUDA_VISIBLE_DEVICES is empty): nothing to check"
            if len(chosen) < count:
                if note or not devices:
                    why = f": {note}" if note else ""
                else:
                    owner = f"instance {ctx.instance!r} runs with " if ctx.gpus and ctx.instance else ""
                    why = f" ({owner}CUDA_VISIBLE_DEVICES={devices!r})"
                raise Veto(
                    f"{spec.model} needs {count} GPU(s) (tensor x pipeline x data parallel size) but "
                    f"only {len(chosen)} {'is' if len(chosen) == 1 else 'are'} visible{why}"
                )
            checks = [
                check_device(config, spec, gpu, model_loaded=ctx.old_spec is not None, running=running)
                for gpu in chosen[:count]
            ]
            short = [c for c in checks if not c.ok]
            if not short:
                return "; ".join(c.describe() for c in checks)
            left = deadline - time.monotonic()
            if left <= 0:
                details = "; ".join(
                    f"{c.gpu.label} has {gib(c.available)} available, needs {gib(c.needed)} ({c.why})"
                    + (f", used by {holders(c.gpu)}" if c.gpu.processes else "")
                    for c in short
                )
                raise Veto(
                    f"not enough free GPU memory for {spec.model}: {details}. Free the GPU(s), lower "
                    f"--gpu-memory-utilization in the spec, or set min_free_mib in {SECTION}"
                )
            await asyncio.sleep(min(config.poll_interval, left))

    @hookimpl
    async def post_switch(self, ctx: HookContext) -> None:
        if ctx.pid is not None:
            self.running[ctx.vllm_base] = ctx.pid
            self.launched_on[ctx.pid] = ctx.gpus

    @hookimpl
    async def pre_stop(self, ctx: HookContext) -> None:
        if ctx.pid is None:
            return
        config = GuardConfig.parse(ctx.plugin_config)
        try:
            gpus = await self._snapshot(config)
        except NvmlUnavailable as exc:
            if config.on_missing_nvml == "skip":
                self._skip(str(exc))
                return
            raise NvmlUnavailable(_missing_message(str(exc))) from None
        group = ctx.pid
        record = StopRecord(group)
        for gpu in self._on(self.launched_on.get(group, ctx.gpus), gpus):
            own = [p for p in gpu.processes if in_group(p.pid, group)]
            if own:
                record.pids.update(p.pid for p in own)
                record.devices.append(HeldMemory(gpu.index, sum(p.used or 0 for p in own), gpu.used))
        self.stopping[group] = record

    @hookimpl
    async def post_stop(self, ctx: HookContext) -> str | None:
        if ctx.pid is None:
            return None
        self.running.pop(ctx.vllm_base, None)
        record = self.stopping.pop(ctx.pid, None)
        launched_on = self.launched_on.pop(ctx.pid, ctx.gpus)
        config = GuardConfig.parse(ctx.plugin_config)
        if record is None or not record.pids:
            # Nothing seen on a GPU (or pre_stop not called: vLLM had already exited): only
            # the main process itself can be looked for.
            record = StopRecord(ctx.pid, {ctx.pid})
        started = time.monotonic()
        deadline = started + config.release_timeout
        while True:
            try:
                gpus = self._on(launched_on, await self._snapshot(config))
            except NvmlUnavailable as exc:
                if config.on_missing_nvml == "skip":
                    self._skip(str(exc))
                    return None
                raise NvmlUnavailable(_missing_message(str(exc))) from None
            waiting = self._still_held(record, gpus)
            if not waiting:
                held = sum(d.held for d in record.devices)
                if not held:
                    return None
                return f"{gib(held)} of GPU memory released after {time.monotonic() - started:.1f} s"
            left = deadline - time.monotonic()
            if left <= 0:
                raise MemoryNotReleased(
                    f"GPU memory of the stopped vLLM (pid {record.group}) not released after "
                    f"{config.release_timeout:g} s: {'; '.join(waiting)}. The next model may fail with "
                    f"CUDA out of memory; check nvidia-smi (release_timeout in {SECTION})"
                )
            await asyncio.sleep(min(config.poll_interval, left))

    @staticmethod
    def _still_held(record: StopRecord, gpus: list[Gpu]) -> list[str]:
        waiting: list[str] = []
        by_index = {gpu.index: gpu for gpu in gpus}
        for gpu in gpus:
            left = [p for p in gpu.processes if p.pid in record.pids]
            if left:
                waiting.append(f"{gpu.label} still lists {', '.join(f'pid {p.pid}' for p in left)}")
        for device in record.devices:
            now = by_index.get(device.index)
            if now is None or any(p.pid in record.pids for p in now.processes):
                continue
            target = device.used_before - RELEASED_SHARE * device.held
            if now.used > target:
                waiting.append(
                    f"{now.label} uses {gib(now.used)}, was {gib(device.used_before)} with "
                    f"{gib(device.held)} held by vLLM"
                )
        return waiting


#: The object the entry point names.
plugin = GpuGuard()
