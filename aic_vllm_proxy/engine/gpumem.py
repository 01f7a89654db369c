"""How much GPU memory a vLLM process group holds: checked after a sleep (sleep mode), which
must have released it (vLLM has left it allocated on some versions, and a vLLM started
without ``--enable-sleep-mode`` answers ``/sleep`` without freeing anything).

Where the figures come from, in order:

- the simulator's GPU state files, when ``AIC_VLLM_SIM_GPU_STATE`` names their directory (the
  daemon's environment, inherited by the simulator: docs/simulator.md): one JSON file per
  simulated vLLM, ``{"pid", "engine_pid", "gpus": {id: bytes}}``;
- NVML through ``nvidia-ml-py`` (the ``gpu`` extra), imported when first needed: the memory of
  the compute processes in the group, on every GPU;
- else nothing: the check is skipped (and the log says so once).

Every call is blocking (files, NVML): callers run it in a worker thread.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The simulator's state directory (see docs/simulator.md).
SIM_STATE_ENV = "AIC_VLLM_SIM_GPU_STATE"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _from_sim_files(directory: Path, pids: Collection[int]) -> int:
    held = 0
    for path in directory.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(state, dict):
            continue
        owner, engine = state.get("pid"), state.get("engine_pid")
        if owner not in pids and engine not in pids:
            continue
        if isinstance(engine, int) and not _alive(engine):
            continue  # left behind by a killed simulator
        gpus = state.get("gpus")
        if isinstance(gpus, dict):
            held += sum(int(value) for value in gpus.values() if isinstance(value, (int, float)))
    return held


def _nvml() -> Any | None:
    try:
        pynvml = importlib.import_module("pynvml")
        pynvml.nvmlInit()
    except Exception:  # no package, no driver, no GPU
        return None
    return pynvml


def _from_nvml(pynvml: Any, pids: Collection[int]) -> int:
    held = 0
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid in pids and process.usedGpuMemory:
                held += int(process.usedGpuMemory)
    return held


def held_by(pids: Collection[int], environ: Mapping[str, str] | None = None) -> int | None:
    """Bytes of GPU memory the processes ``pids`` hold on all GPUs, or None when nothing can
    tell. Blocking."""
    env = os.environ if environ is None else environ
    directory = env.get(SIM_STATE_ENV)
    if directory:
        return _from_sim_files(Path(directory), pids)
    pynvml = _nvml()
    if pynvml is None:
        return None
    try:
        return _from_nvml(pynvml, pids)
    except Exception as exc:  # an NVML error: the check cannot be made
        log.warning("cannot read GPU memory through NVML: %s", exc)
        return None


def released(before: int | None, after: int | None) -> bool:
    """Whether a sleep released the GPU memory: what is left is at most a tenth of what was held,
    or 2 GiB (vLLM keeps its CUDA context). True when either figure is unknown."""
    if before is None or after is None:
        return True
    return after <= max(before // 10, 2 * 1024**3)


__all__ = ["SIM_STATE_ENV", "held_by", "released"]
