"""The checks themselves, free of hooks and I/O: settings, which GPUs a model uses, how much
memory it needs, and whose processes hold what."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aic_vllm_proxy.spec import ModelSpec

from .nvml import Gpu, MiB

log = logging.getLogger(__name__)

#: vLLM's default ``--gpu-memory-utilization``.
DEFAULT_UTILIZATION = 0.9
#: post_stop is done once used memory dropped by this share of what vLLM's processes held.
RELEASED_SHARE = 0.9
SECTION = "[plugins.gpu-guard]"
ENV = "AIC_VLLM_PROXY_PLUGIN_GPU_GUARD_"


class ConfigProblem(ValueError):
    """A setting of the plugin cannot be used; the message names it."""


def _number(raw: Mapping[str, Any], key: str, default: float | None, *, minimum: float = 0.0) -> float | None:
    value = raw.get(key)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigProblem(f"{SECTION} {key} must be a number, not {value!r}") from None
    if number < minimum:
        raise ConfigProblem(f"{SECTION} {key} must be >= {minimum:g}, not {value!r}")
    return number


@dataclass(frozen=True)
class GuardConfig:
    """The plugin's settings (``[plugins.gpu-guard]`` / ``AIC_VLLM_PROXY_PLUGIN_GPU_GUARD_*``)."""

    #: Free MiB each GPU of the model needs; overrides the fraction when set.
    min_free_mib: float | None = None
    #: Share of each GPU's total memory that must be free; default: the spec's
    #: ``--gpu-memory-utilization`` (vLLM refuses to start with less), else 0.9.
    min_free_fraction: float | None = None
    #: Seconds pre_switch keeps re-checking (memory still being released) before it refuses.
    free_wait: float = 5.0
    #: Seconds post_stop waits at most for the stopped vLLM's memory to be released.
    release_timeout: float = 30.0
    #: Seconds between two looks at NVML while waiting.
    poll_interval: float = 0.5
    #: No NVML, driver or GPU: "fail" (refuse switches) or "skip" (switch without checking).
    on_missing_nvml: str = "fail"
    #: "nvml" (real), "file:PATH" (a JSON fake, see nvml.FileNvml) or a source object.
    nvml_source: object = "nvml"
    #: The GPUs vLLM sees, as in CUDA_VISIBLE_DEVICES; default: the proxy's own variable.
    devices: str | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> GuardConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            log.warning(
                "%s: unknown setting(s) %s ignored (known: %s)",
                SECTION,
                ", ".join(unknown),
                ", ".join(sorted(known)),
            )
        on_missing = str(raw.get("on_missing_nvml") or "fail").strip().lower()
        if on_missing not in ("fail", "skip"):
            raise ConfigProblem(f'{SECTION} on_missing_nvml must be "fail" or "skip", not {on_missing!r}')
        fraction = _number(raw, "min_free_fraction", None)
        if fraction is not None and not 0 < fraction <= 1:
            raise ConfigProblem(f"{SECTION} min_free_fraction must be in (0, 1], not {fraction:g}")
        devices = raw.get("devices")
        return cls(
            min_free_mib=_number(raw, "min_free_mib", None),
            min_free_fraction=fraction,
            free_wait=_number(raw, "free_wait", cls.free_wait) or 0.0,
            release_timeout=_number(raw, "release_timeout", cls.release_timeout) or 0.0,
            poll_interval=_number(raw, "poll_interval", cls.poll_interval, minimum=0.01) or cls.poll_interval,
            on_missing_nvml=on_missing,
            nvml_source=raw.get("nvml_source") or "nvml",
            devices=None if devices is None else str(devices),
        )


def _int_flag(spec: ModelSpec, flag: str) -> int:
    value = spec.flag_value(flag)  # in any spelling vLLM reads (-tp 2, --tensor_parallel_size=2, ...)
    if value is None:
        return 1
    try:
        return max(1, int(value))
    except ValueError:
        raise ConfigProblem(f"{flag} in the model spec must be an integer, not {value!r}") from None


def gpus_needed(spec: ModelSpec) -> int:
    """How many GPUs vLLM takes: tensor x pipeline x data parallel size."""
    return (
        _int_flag(spec, "--tensor-parallel-size")
        * _int_flag(spec, "--pipeline-parallel-size")
        * _int_flag(spec, "--data-parallel-size")
    )


def utilization(spec: ModelSpec) -> float:
    value = spec.flag_value("--gpu-memory-utilization")
    if value is None:
        return DEFAULT_UTILIZATION
    try:
        return float(value)
    except ValueError:
        raise ConfigProblem(f"--gpu-memory-utilization must be a number, not {value!r}") from None


def visible_gpus(gpus: list[Gpu], cuda_visible_devices: str | None) -> tuple[list[Gpu], str]:
    """The GPUs CUDA shows vLLM, in CUDA's order, and a note when an entry was not understood.

    Like CUDA, entries are indices or (prefixes of) UUIDs, and the list ends at the first entry
    that names no GPU. Indices are NVML's (PCI bus order): set ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
    so that CUDA counts the same way.
    """
    if cuda_visible_devices is None:
        return list(gpus), ""
    chosen: list[Gpu] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        gpu: Gpu | None = None
        if entry.lstrip("-").isdigit():
            index = int(entry)
            gpu = gpus[index] if 0 <= index < len(gpus) else None
        elif entry:
            matches = [g for g in gpus if g.uuid.startswith(entry) or g.uuid.startswith(f"GPU-{entry}")]
            gpu = matches[0] if len(matches) == 1 else None
        if gpu is None:
            if entry or chosen:
                return chosen, (
                    f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}: {entry!r} names no GPU "
                    "(MIG devices are not supported), so CUDA ignores it and every entry after it"
                )
            break
        if gpu not in chosen:
            chosen.append(gpu)
    return chosen, ""


def required(config: GuardConfig, spec: ModelSpec, gpu: Gpu) -> tuple[int, str]:
    """Bytes that must be free on ``gpu``, and where the number comes from."""
    if config.min_free_mib is not None:
        return int(config.min_free_mib * MiB), f"min_free_mib {config.min_free_mib:g}"
    if config.min_free_fraction is not None:
        fraction, why = config.min_free_fraction, f"min_free_fraction {config.min_free_fraction:g}"
    else:
        fraction = utilization(spec)
        why = f"--gpu-memory-utilization {fraction:g}"
    return int(fraction * gpu.total), f"{why} of {gib(gpu.total)} total"


def gib(value: float) -> str:
    return f"{value / 1024**3:.1f} GiB"


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, process group, session) of ``pid`` from /proc; None if it is not visible."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[1]), int(fields[2]), int(fields[3])
    except (IndexError, ValueError):
        return None


def visible(pid: int) -> bool:
    """Whether ``pid`` is a process of this PID namespace (NVML may list the host's pids)."""
    return _stat(pid) is not None


def in_group(pid: int, group: int) -> bool:
    """True if ``pid`` is vLLM's main process ``group``, in its process group or session, or
    one of its descendants (workers that started a session of their own)."""
    current = pid
    for _ in range(64):
        if current == group:
            return True
        stat = _stat(current)
        if stat is None:
            return False
        parent, pgrp, session = stat
        if group in (pgrp, session):
            return True
        if parent <= 1:
            return False
        current = parent
    return False


@dataclass(frozen=True)
class DeviceCheck:
    """The verdict for one GPU before a switch."""

    gpu: Gpu
    needed: int
    why: str
    #: Bytes the running model (stopped before the new one starts) holds on this GPU.
    reclaimable: int = 0
    #: Why the GPU was not judged (the running model's share is unknown), if so.
    unknown: str = ""

    @property
    def available(self) -> int:
        return self.gpu.free + self.reclaimable

    @property
    def ok(self) -> bool:
        return bool(self.unknown) or self.available >= self.needed

    def describe(self) -> str:
        if self.unknown:
            return f"GPU {self.gpu.index}: not checked ({self.unknown})"
        held = f" + {gib(self.reclaimable)} held by the running model" if self.reclaimable else ""
        return f"GPU {self.gpu.index}: {gib(self.gpu.free)} free{held}, {gib(self.needed)} needed"


def check_device(
    config: GuardConfig, spec: ModelSpec, gpu: Gpu, *, model_loaded: bool, running: int | None
) -> DeviceCheck:
    needed, why = required(config, spec, gpu)
    if not model_loaded:
        return DeviceCheck(gpu, needed, why)
    if running is None:
        return DeviceCheck(gpu, needed, why, unknown="the running model's process is unknown")
    own = [p for p in gpu.processes if in_group(p.pid, running)]
    if any(p.used is None for p in own):
        return DeviceCheck(gpu, needed, why, unknown="NVML does not tell the running model's usage")
    if not own and any(not visible(p.pid) for p in gpu.processes):
        return DeviceCheck(
            gpu, needed, why, unknown="its processes are not visible here (another PID namespace?)"
        )
    return DeviceCheck(gpu, needed, why, reclaimable=sum(p.used or 0 for p in own))


def holders(gpu: Gpu, limit: int = 4) -> str:
    """The biggest users of ``gpu``: ``pid 12 (3.0 GiB), pid 34 (1.0 GiB)``."""
    biggest = sorted(gpu.processes, key=lambda p: p.used or 0, reverse=True)[:limit]
    return ", ".join(f"pid {p.pid} ({gib(p.used) if p.used is not None else '? GiB'})" for p in biggest)
