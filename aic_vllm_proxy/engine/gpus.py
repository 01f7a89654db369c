"""The node's GPUs: which there are, and the environment that gives an instance its own.

A GPU is named by the string ``CUDA_VISIBLE_DEVICES`` takes for it: an index (``"0"``), a UUID
(``"GPU-8f3c..."``) or a MIG id (``"MIG-..."``). The names are opaque here: they are compared as
strings and handed to the instance as they came (:func:`child_cuda_env`), so a UUID stays a UUID.
They are the daemon's own view: with ``CUDA_VISIBLE_DEVICES=2,3`` the node's GPUs are ``2`` and
``3``, and an instance on ``3`` gets ``CUDA_VISIBLE_DEVICES=3``.

The node's set (:func:`node_gpus`) is ``--gpus`` when given, else ``CUDA_VISIBLE_DEVICES`` when
set, else ``0 .. n-1`` for the ``n`` GPUs NVML counts when ``nvidia-ml-py`` (module ``pynvml``)
is installed and finds a driver, else empty: no GPU set is known and the daemon runs one
instance at a time, as it always did.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)

#: A negative index: CUDA stops reading ``CUDA_VISIBLE_DEVICES`` there (``-1`` hides every GPU).
_NEGATIVE = re.compile(r"^-\d+$")


def visible_devices(value: str) -> tuple[str, ...]:
    """The GPUs a ``CUDA_VISIBLE_DEVICES`` value names, in order: ``"0, 2"`` -> ``("0", "2")``.

    Like CUDA, the list ends at a negative index (``"-1"``: none, ``"0,-1,2"``: only ``0``); a
    name given twice counts once; empty names are skipped; UUIDs and MIG ids are kept as written.
    """
    names: list[str] = []
    for word in value.split(","):
        name = word.strip()
        if _NEGATIVE.match(name):
            break
        if name and name not in names:
            names.append(name)
    return tuple(names)


def nvml_gpu_count() -> int | None:
    """How many GPUs NVML sees, or None when ``pynvml`` is not installed or finds no driver."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError (no driver, no library) or an OSError loading it
        log.debug("NVML is installed but cannot start (%s): no GPU count", exc)
        return None
    try:
        return int(nvml.nvmlDeviceGetCount())
    except Exception as exc:
        log.debug("NVML cannot count the GPUs (%s)", exc)
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("NVML shutdown failed (%s)", exc)


def discover_gpus(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when it is set (even empty: then
    none), else the indices NVML counts, else none."""
    env = os.environ if environ is None else environ
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        return visible_devices(value)
    count = nvml_gpu_count()
    return tuple(str(index) for index in range(count or 0))


def node_gpus(given: Iterable[str], environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The node's GPUs: ``given`` (``--gpus``) when it names any, else :func:`discover_gpus`."""
    names = tuple(dict.fromkeys(name.strip() for name in given if name.strip()))
    return names or discover_gpus(environ)


def child_cuda_env(gpus: Iterable[str]) -> dict[str, str]:
    """The environment an instance on ``gpus`` gets on top of the daemon's:
    ``("0", "1")`` -> ``{"CUDA_VISIBLE_DEVICES": "0,1"}``. No GPUs (no GPU set known): nothing,
    the instance inherits the daemon's environment as before."""
    names = ",".join(gpus)
    return {"CUDA_VISIBLE_DEVICES": names} if names else {}


__all__ = ["child_cuda_env", "discover_gpus", "node_gpus", "nvml_gpu_count", "visible_devices"]
