"""The node's GPUs (engine/gpus.py): CUDA_VISIBLE_DEVICES read as CUDA reads it, names kept
opaque (UUIDs, MIG ids), NVML only when it is there and works, and the child's environment."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import pytest

from aic_vllm_proxy.engine.gpus import (
    child_cuda_env,
    discover_gpus,
    node_gpus,
    nvml_gpu_count,
    visible_devices,
)

UUID_A = "GPU-8f3c1a2b-6d4e-4f00-9a1b-0123456789ab"
UUID_B = "GPU-1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"
MIG = "MIG-0c3e5a9f-8a39-5b2f-8d4c-6e2a1f0b7c11"


@pytest.mark.parametrize(
    ("value", "gpus"),
    [
        ("0,1", ("0", "1")),
        (" 2 , 3 ", ("2", "3")),
        (f"{UUID_A},{UUID_B}", (UUID_A, UUID_B)),
        (f"{MIG}", (MIG,)),
        ("MIG-GPU-8f3c1a2b/1/0", ("MIG-GPU-8f3c1a2b/1/0",)),
        ("", ()),
        ("-1", ()),
        ("0,-1,2", ("0",)),  # CUDA stops at an invalid (negative) index
        ("0,0,1", ("0", "1")),
        ("0,,1,", ("0", "1")),
    ],
)
def test_visible_devices(value: str, gpus: tuple[str, ...]) -> None:
    assert visible_devices(value) == gpus


def fake_nvml(
    count: int = 0, *, fail_init: bool = False, fail_count: bool = False
) -> tuple[types.ModuleType, list[str]]:
    """A stand-in ``pynvml`` module and the calls made to it."""
    calls: list[str] = []

    class NVMLError(Exception):
        pass

    def call(name: str, result: object = None, fail: bool = False) -> Callable[[], object]:
        def function() -> object:
            calls.append(name)
            if fail:
                raise NVMLError(f"{name}: Driver Not Loaded")
            return result

        return function

    module = types.ModuleType("pynvml")
    module.NVMLError = NVMLError  # type: ignore[attr-defined]
    module.nvmlInit = call("init", fail=fail_init)  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = call("count", count, fail=fail_count)  # type: ignore[attr-defined]
    module.nvmlShutdown = call("shutdown")  # type: ignore[attr-defined]
    return module, calls


def test_nvml_counts_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    module, calls = fake_nvml(4)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert nvml_gpu_count() == 4
    assert calls == ["init", "count", "shutdown"]
    assert discover_gpus({}) == ("0", "1", "2", "3")


def test_nvml_absent_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert nvml_gpu_count() is None
    assert discover_gpus({}) == ()
    assert node_gpus((), {}) == ()


def test_nvml_without_a_driver_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    module, calls = fake_nvml(fail_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert nvml_gpu_count() is None
    assert calls == ["init"]  # no shutdown of what did not start
    assert discover_gpus({}) == ()


def test_nvml_that_cannot_count_is_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    module, calls = fake_nvml(fail_count=True)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert nvml_gpu_count() is None
    assert calls == ["init", "count", "shutdown"]


def test_cuda_visible_devices_wins_over_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    module, calls = fake_nvml(8)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": f"{UUID_A},{UUID_B}"}) == (UUID_A, UUID_B)
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": ""}) == ()  # set but empty: none, not NVML's
    assert calls == []


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert discover_gpus() == ("3", "1")
    assert node_gpus(()) == ("3", "1")


def test_given_gpus_win(monkeypatch: pytest.MonkeyPatch) -> None:
    module, _ = fake_nvml(8)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert node_gpus(("2", " 3", "2"), env) == ("2", "3")
    assert node_gpus((), env) == ("0", "1")
    assert node_gpus(("",), env) == ("0", "1")


@pytest.mark.parametrize("gpus", [("0", "1"), (UUID_A,), (UUID_B, UUID_A), (MIG,)])
def test_child_gets_the_same_names_back(gpus: tuple[str, ...]) -> None:
    env = child_cuda_env(gpus)
    assert env == {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    assert visible_devices(env["CUDA_VISIBLE_DEVICES"]) == gpus


def test_child_without_gpus_inherits() -> None:
    assert child_cuda_env(()) == {}
