"""Where GPU facts come from: an :class:`NvmlSource`.

The real one (:class:`PynvmlSource`) asks NVML through ``nvidia-ml-py``, imported only when
it is first used, so the plugin loads on a machine without a GPU, a driver or the package.
:class:`FakeNvml` (in memory) and :class:`FileNvml` (a JSON file, re-read on every call) stand
in for it in tests and dry runs.

Every call is blocking (NVML is a C library): the plugin runs them in a worker thread.
"""

from __future__ import annotations

import importlib
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

MiB = 1024 * 1024


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here (package missing, no driver, no GPU); the message says which."""


@dataclass(frozen=True)
class GpuProcess:
    """A process with a CUDA context on a GPU."""

    pid: int
    #: Bytes it holds on this GPU; None when NVML cannot tell (e.g. some MIG or WDDM setups).
    used: int | None


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML sees it at one moment."""

    index: int
    uuid: str
    name: str
    total: int
    free: int
    used: int
    processes: tuple[GpuProcess, ...] = ()

    @property
    def label(self) -> str:
        return f"GPU {self.index} ({self.name}, {self.uuid})"


@runtime_checkable
class NvmlSource(Protocol):
    """Something that can tell what every GPU of this node holds right now."""

    def snapshot(self) -> list[Gpu]:
        """All GPUs in NVML's index order, with their memory and compute processes.
        Raises :class:`NvmlUnavailable` when there is no NVML to ask."""
        ...


class PynvmlSource:
    """The real thing: NVML through ``nvidia-ml-py`` (``import pynvml``), initialised once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None

    def _lib(self) -> Any:
        with self._lock:
            if self._nvml is not None:
                return self._nvml
            try:
                pynvml = importlib.import_module("pynvml")  # nvidia-ml-py
            except ImportError as exc:
                raise NvmlUnavailable(
                    f"the NVML bindings are not installed ({exc}); install them with "
                    "`pip install nvidia-ml-py`"
                ) from exc
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                raise NvmlUnavailable(
                    f"NVML cannot be initialised ({exc}): no NVIDIA GPU or driver is usable on this node"
                ) from exc
            self._nvml = pynvml
            return pynvml

    def snapshot(self) -> list[Gpu]:
        nvml = self._lib()
        gpus: list[Gpu] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            processes = tuple(
                GpuProcess(pid=int(p.pid), used=None if p.usedGpuMemory is None else int(p.usedGpuMemory))
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            )
            gpus.append(
                Gpu(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    total=int(memory.total),
                    free=int(memory.free),
                    used=int(memory.used),
                    processes=processes,
                )
            )
        return gpus


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class FakeNvml:
    """A test double: GPUs in memory that a test changes while the plugin polls.

    ``FakeNvml.gpus(2, total_mib=81920)`` makes idle GPUs; :meth:`set_processes` and
    :meth:`release` change what they hold. ``unavailable`` makes every call fail as on a
    machine without a driver.
    """

    devices: list[Gpu] = field(default_factory=list)
    unavailable: str | None = None
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def gpus(cls, count: int, *, total_mib: int = 81920, name: str = "NVIDIA Fake GPU") -> FakeNvml:
        total = total_mib * MiB
        return cls(
            [
                Gpu(index=i, uuid=f"GPU-fake-{i:04d}", name=name, total=total, free=total, used=0)
                for i in range(count)
            ]
        )

    def snapshot(self) -> list[Gpu]:
        with self._lock:
            self.calls += 1
            if self.unavailable is not None:
                raise NvmlUnavailable(self.unavailable)
            return list(self.devices)

    def set_processes(self, index: int, processes: dict[int, int], *, other_mib: int = 0) -> None:
        """GPU ``index`` now holds ``processes`` ({pid: MiB}) plus ``other_mib`` not owned by a
        listed process (e.g. the driver's reservation)."""
        with self._lock:
            gpu = self.devices[index]
            used = (sum(processes.values()) + other_mib) * MiB
            self.devices[index] = replace(
                gpu,
                used=used,
                free=gpu.total - used,
                processes=tuple(GpuProcess(pid, mib * MiB) for pid, mib in processes.items()),
            )

    def release(self, index: int) -> None:
        """Every process of GPU ``index`` has gone and its memory is free again."""
        self.set_processes(index, {})


class FileNvml:
    """GPUs described by a JSON file, read on every call (edit it to change what they hold)::

        {"gpus": [{"uuid": "GPU-0", "name": "A100", "total_mib": 81920, "used_mib": 1024,
                   "processes": [{"pid": 4242, "used_mib": 1000}]}]}

    ``{"unavailable": "reason"}`` behaves like a node without NVML. For dry runs and tests.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def snapshot(self) -> list[Gpu]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise NvmlUnavailable(f"cannot read the fake NVML file {self.path}: {exc}") from exc
        if data.get("unavailable"):
            raise NvmlUnavailable(str(data["unavailable"]))
        gpus: list[Gpu] = []
        for index, raw in enumerate(data.get("gpus", [])):
            total = int(raw.get("total_mib", 81920) * MiB)
            processes = tuple(
                GpuProcess(int(p["pid"]), None if p.get("used_mib") is None else int(p["used_mib"] * MiB))
                for p in raw.get("processes", [])
            )
            used = int(raw.get("used_mib", sum((p.used or 0) for p in processes) / MiB) * MiB)
            gpus.append(
                Gpu(
                    index=index,
                    uuid=str(raw.get("uuid", f"GPU-file-{index:04d}")),
                    name=str(raw.get("name", "NVIDIA Fake GPU")),
                    total=total,
                    free=total - used,
                    used=used,
                    processes=processes,
                )
            )
        return gpus


def open_source(value: object) -> NvmlSource:
    """The source named by the ``nvml_source`` setting: ``"nvml"`` (the default: the real NVML),
    ``"file:PATH"`` (a :class:`FileNvml`), or an object with a ``snapshot()`` method."""
    if isinstance(value, NvmlSource):
        return value
    if not isinstance(value, str):
        raise ValueError(f"nvml_source must be 'nvml' or 'file:PATH', not {value!r}")
    if value == "nvml":
        return _real_source()
    if value.startswith("file:"):
        return FileNvml(Path(value[len("file:") :]).expanduser())
    raise ValueError(f"nvml_source must be 'nvml' or 'file:PATH', not {value!r}")


_REAL: list[PynvmlSource] = []


def _real_source() -> PynvmlSource:
    """One real source per process (NVML is initialised once, on first use)."""
    if not _REAL:
        _REAL.append(PynvmlSource())
    return _REAL[0]
