"""gpu-guard against a fake NVML: no GPU needed. Real process groups stand in for vLLM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from aic_vllm_proxy_gpu_guard.guard import (
    ConfigProblem,
    GuardConfig,
    gpus_needed,
    in_group,
    utilization,
    visible_gpus,
)
from aic_vllm_proxy_gpu_guard.nvml import FakeNvml, FileNvml, NvmlUnavailable, PynvmlSource, open_source
from aic_vllm_proxy_gpu_guard.plugin import GpuGuard, MemoryNotReleased

from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.hooks import HookContext, Veto
from aic_vllm_proxy.spec import ModelSpec

BASE = "http://127.0.0.1:8225"


def make_ctx(event: str, new_spec: str | None = None, **fields: Any) -> HookContext:
    values: dict[str, Any] = {
        "old_spec": None,
        "log_path": None,
        "plugin_config": {"free_wait": 0, "poll_interval": 0.02, "devices": None},
    }
    config = fields.pop("config", {})
    values.update(fields)
    values["plugin_config"] = {**values["plugin_config"], **config}
    if values["plugin_config"]["devices"] is None:
        del values["plugin_config"]["devices"]
    return HookContext(
        event=event,
        new_spec=new_spec,
        settings=Settings(),
        vllm_base=BASE,
        session=cast(Any, None),  # gpu-guard makes no HTTP calls
        **values,
    )


@pytest.fixture(autouse=True)
def _all_gpus_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def vllm_group() -> Iterator[tuple[int, int]]:
    """A process group like vLLM's: (leader pid = group id, a child's pid)."""
    process = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True
    )
    assert process.stdout is not None
    child = int(process.stdout.readline())
    yield process.pid, child
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# ----------------------------------------------------------------- pure parts


def test_settings_from_environment_strings() -> None:
    config = GuardConfig.parse({"min_free_mib": "2048", "release_timeout": "3.5", "on_missing_nvml": "SKIP"})
    assert config.min_free_mib == 2048
    assert config.release_timeout == 3.5
    assert config.on_missing_nvml == "skip"
    with pytest.raises(ConfigProblem, match="on_missing_nvml"):
        GuardConfig.parse({"on_missing_nvml": "maybe"})
    with pytest.raises(ConfigProblem, match="min_free_mib must be a number"):
        GuardConfig.parse({"min_free_mib": "lots"})
    with pytest.raises(ConfigProblem, match="min_free_fraction"):
        GuardConfig.parse({"min_free_fraction": 1.5})


def test_unknown_setting_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        GuardConfig.parse({"min_fre_mib": 1})
    assert "min_fre_mib" in caplog.text


def test_gpus_needed_and_utilization_from_the_spec() -> None:
    assert gpus_needed(ModelSpec.parse("m")) == 1
    assert gpus_needed(ModelSpec.parse("m -tp 2 --pipeline_parallel_size=2")) == 4
    assert gpus_needed(ModelSpec.parse("m --tensor-parallel-size 2 --data-parallel-size 2")) == 4
    assert utilization(ModelSpec.parse("m")) == 0.9
    assert utilization(ModelSpec.parse("m --gpu-memory-utilization=0.5")) == 0.5
    # Every spelling vLLM reads (one flag scanner, aic_vllm_proxy.spec): prefixes and aliases too.
    assert gpus_needed(ModelSpec.parse("m --tensor-parallel 2 -pp=2 --data_parallel_size 2")) == 8
    assert utilization(ModelSpec.parse("m --device-memory-utilization 0.5")) == 0.5


def test_visible_gpus_follow_cuda_rules() -> None:
    gpus = FakeNvml.gpus(3).snapshot()
    assert visible_gpus(gpus, None) == (gpus, "")
    assert visible_gpus(gpus, "2,0")[0] == [gpus[2], gpus[0]]
    assert visible_gpus(gpus, "GPU-fake-0001")[0] == [gpus[1]]
    assert visible_gpus(gpus, "")[0] == []
    chosen, note = visible_gpus(gpus, "1,7,0")  # CUDA stops at the first bad entry
    assert chosen == [gpus[1]]
    assert "'7' names no GPU" in note


def test_in_group_knows_members(vllm_group: tuple[int, int]) -> None:
    leader, child = vllm_group
    assert in_group(leader, leader)
    assert in_group(child, leader)
    assert not in_group(os.getpid(), leader)
    assert not in_group(2**22 + 12345, leader)  # no such process


# ------------------------------------------------------------------ pre_switch


async def test_enough_free_memory_passes() -> None:
    guard = GpuGuard(FakeNvml.gpus(1, total_mib=81920))
    message = await guard.pre_switch(make_ctx("pre_switch", "org/model"))
    assert message == "GPU 0: 80.0 GiB free, 72.0 GiB needed"


async def test_not_enough_free_memory_is_refused_with_the_holders() -> None:
    fake = FakeNvml.gpus(1, total_mib=81920)
    fake.set_processes(0, {4242: 20480})
    guard = GpuGuard(fake)
    with pytest.raises(Veto) as refused:
        await guard.pre_switch(make_ctx("pre_switch", "org/model"))
    message = str(refused.value)
    assert "not enough free GPU memory for org/model" in message
    assert "GPU 0 (NVIDIA Fake GPU, GPU-fake-0000) has 60.0 GiB available, needs 72.0 GiB" in message
    assert "--gpu-memory-utilization 0.9" in message
    assert "pid 4242 (20.0 GiB)" in message
    # A lower utilization in the spec, or an absolute minimum, fits.
    assert await guard.pre_switch(make_ctx("pre_switch", "org/model --gpu-memory-utilization 0.7"))
    assert await guard.pre_switch(make_ctx("pre_switch", "org/model", config={"min_free_mib": 40000}))


async def test_only_the_gpus_the_model_uses_are_checked() -> None:
    fake = FakeNvml.gpus(3)
    fake.set_processes(0, {4242: 81920})  # GPU 0 is full
    guard = GpuGuard(fake)
    ctx = make_ctx("pre_switch", "org/model -tp 2", config={"devices": "2,1,0"})
    assert (await guard.pre_switch(ctx)).startswith("GPU 2: 80.0 GiB free")
    with pytest.raises(Veto, match="GPU 0"):
        await guard.pre_switch(make_ctx("pre_switch", "org/model -tp 2", config={"devices": "0,1"}))
    with pytest.raises(Veto, match=r"needs 4 GPU\(s\) .* only 3 are visible"):
        await guard.pre_switch(make_ctx("pre_switch", "org/model -tp 2 -pp 2"))


async def test_cuda_visible_devices_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml.gpus(2)
    fake.set_processes(0, {4242: 81920})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-fake-0001")
    assert (await GpuGuard(fake).pre_switch(make_ctx("pre_switch", "m"))).startswith("GPU 1:")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "nothing to check" in await GpuGuard(fake).pre_switch(make_ctx("pre_switch", "m"))


async def test_an_instance_is_checked_on_its_own_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml.gpus(3)
    fake.set_processes(0, {4242: 81920})  # GPU 0 is full: another instance's
    guard = GpuGuard(fake)
    # ctx.gpus is the instance's CUDA_VISIBLE_DEVICES: it wins over the proxy's own variable
    # and the devices setting, which describe every instance's view but not this one's.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    ctx = make_ctx("pre_switch", "m", instance="small", gpus=("1",), config={"devices": "0"})
    assert await guard.pre_switch(ctx) == "GPU 1: 80.0 GiB free, 72.0 GiB needed"
    # UUIDs as well as indices, in the instance's order.
    ctx = make_ctx("pre_switch", "m -tp 2", instance="big", gpus=("GPU-fake-0002", "1"))
    assert (await guard.pre_switch(ctx)).startswith("GPU 2: 80.0 GiB free, 72.0 GiB needed; GPU 1:")
    with pytest.raises(Veto, match="GPU 0"):
        await guard.pre_switch(make_ctx("pre_switch", "m", instance="small", gpus=("0", "1")))
    shown = r"only 1 is visible \(instance 'small' runs with CUDA_VISIBLE_DEVICES='1'\)"
    with pytest.raises(Veto, match=r"needs 2 GPU\(s\) .* " + shown):
        await guard.pre_switch(make_ctx("pre_switch", "m -tp 2", instance="small", gpus=("1",)))


async def test_an_instance_reclaims_only_its_own_memory(vllm_group: tuple[int, int]) -> None:
    leader, child = vllm_group
    fake = FakeNvml.gpus(2)
    fake.set_processes(0, {4242: 81920})
    fake.set_processes(1, {child: 30000, 4343: 40000})  # its own model and another instance's
    guard = GpuGuard(fake)
    fields: dict[str, Any] = {"old_spec": "old/model", "pid": leader, "instance": "b", "gpus": ("1",)}
    # 11.6 GiB free + 29.3 GiB it holds itself: room for 45 % of the GPU (36 GiB), not for 60 %.
    message = await guard.pre_switch(make_ctx("pre_switch", "m --gpu-memory-utilization 0.45", **fields))
    assert message == "GPU 1: 11.6 GiB free + 29.3 GiB held by the running model, 36.0 GiB needed"
    with pytest.raises(Veto, match=r"has 40\.9 GiB available, needs 48\.0 GiB .* used by pid 4343"):
        await guard.pre_switch(make_ctx("pre_switch", "m --gpu-memory-utilization 0.6", **fields))


async def test_memory_of_the_running_model_counts_as_free(vllm_group: tuple[int, int]) -> None:
    leader, child = vllm_group
    fake = FakeNvml.gpus(1)
    fake.set_processes(0, {leader: 1024, child: 70000})
    guard = GpuGuard(fake)
    # The proxy tells post_switch the pid of the model it started.
    await guard.post_switch(make_ctx("post_switch", "old/model", pid=leader))
    message = await guard.pre_switch(make_ctx("pre_switch", "new/model", old_spec="old/model"))
    assert "held by the running model" in message
    # Had nothing been loaded, the same memory would belong to someone else.
    with pytest.raises(Veto):
        await guard.pre_switch(make_ctx("pre_switch", "new/model"))


async def test_running_model_of_unknown_pid_is_not_judged() -> None:
    fake = FakeNvml.gpus(1)
    fake.set_processes(0, {4242: 81920})
    message = await GpuGuard(fake).pre_switch(make_ctx("pre_switch", "new/model", old_spec="old/model"))
    assert "not checked (the running model's process is unknown)" in message


async def test_refusal_waits_for_memory_being_released() -> None:
    fake = FakeNvml.gpus(1)
    fake.set_processes(0, {4242: 81920})
    guard = GpuGuard(fake)
    asyncio.get_running_loop().call_later(0.3, fake.release, 0)
    started = time.monotonic()
    message = await guard.pre_switch(make_ctx("pre_switch", "m", config={"free_wait": 5}))
    assert message.startswith("GPU 0: 80.0 GiB free")
    assert 0.25 < time.monotonic() - started < 3


# ----------------------------------------------------------------- no NVML


async def test_missing_nvml_fails_by_default_and_says_how_to_skip() -> None:
    fake = FakeNvml(unavailable="NVML Shared Library Not Found")
    guard = GpuGuard(fake)
    with pytest.raises(Veto) as refused:
        await guard.pre_switch(make_ctx("pre_switch", "m"))
    message = str(refused.value)
    assert "cannot check GPU memory: NVML Shared Library Not Found" in message
    assert 'on_missing_nvml = "skip"' in message
    assert "AIC_VLLM_PROXY_PLUGIN_GPU_GUARD_ON_MISSING_NVML=skip" in message
    with pytest.raises(NvmlUnavailable, match="on_missing_nvml"):
        await guard.pre_stop(make_ctx("pre_stop", pid=12345))


async def test_missing_nvml_can_be_skipped(caplog: pytest.LogCaptureFixture) -> None:
    guard = GpuGuard(FakeNvml(unavailable="no driver"))
    skip = {"on_missing_nvml": "skip"}
    with caplog.at_level(logging.WARNING):
        assert await guard.pre_switch(make_ctx("pre_switch", "m", config=skip)) == "skipped: no driver"
        await guard.pre_stop(make_ctx("pre_stop", pid=12345, config=skip))
        assert await guard.post_stop(make_ctx("post_stop", pid=12345, config=skip)) is None
    assert caplog.text.count("not checking GPU memory") == 1  # one warning, not one per hook


async def test_no_gpu_counts_as_missing() -> None:
    with pytest.raises(Veto, match="reports no GPU"):
        await GpuGuard(FakeNvml()).pre_switch(make_ctx("pre_switch", "m"))


def test_real_nvml_without_a_driver_says_so() -> None:
    try:
        gpus = PynvmlSource().snapshot()
    except NvmlUnavailable as exc:
        assert "nvidia-ml-py" in str(exc) or "no NVIDIA GPU or driver" in str(exc)
    else:  # pragma: no cover - only on a GPU node
        assert all(gpu.total > 0 for gpu in gpus)


def test_sources_by_name(tmp_path: Path) -> None:
    assert isinstance(open_source("nvml"), PynvmlSource)
    fake = FakeNvml.gpus(1)
    assert open_source(fake) is fake
    path = tmp_path / "gpus.json"
    path.write_text(
        json.dumps(
            {"gpus": [{"uuid": "GPU-x", "total_mib": 1000, "processes": [{"pid": 7, "used_mib": 400}]}]}
        )
    )
    source = open_source(f"file:{path}")
    assert isinstance(source, FileNvml)
    (gpu,) = source.snapshot()
    assert (gpu.uuid, gpu.total, gpu.used, gpu.processes[0].pid) == ("GPU-x", 1000 * 2**20, 400 * 2**20, 7)
    path.write_text(json.dumps({"unavailable": "pretend there is no driver"}))
    with pytest.raises(NvmlUnavailable, match="pretend"):
        source.snapshot()
    with pytest.raises(ValueError, match="nvml_source"):
        open_source("cuda")


async def test_file_source_by_setting(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"gpus": [{"total_mib": 10000, "used_mib": 5000}]}))
    guard = GpuGuard()  # no source given: the setting decides
    with pytest.raises(Veto, match=r"4\.9 GiB available, needs 8\.8 GiB"):
        await guard.pre_switch(make_ctx("pre_switch", "m", config={"nvml_source": f"file:{path}"}))


# ------------------------------------------------------------------ post_stop


async def test_post_stop_waits_until_the_memory_is_released(vllm_group: tuple[int, int]) -> None:
    leader, child = vllm_group
    fake = FakeNvml.gpus(2)
    fake.set_processes(1, {child: 60000}, other_mib=500)
    guard = GpuGuard(fake)
    await guard.post_switch(make_ctx("post_switch", pid=leader))
    await guard.pre_stop(make_ctx("pre_stop", old_spec="m", pid=leader))
    assert guard.stopping[leader].pids == {child}
    os.killpg(leader, signal.SIGKILL)  # what the proxy does between the two hooks
    # The driver frees the memory a little after the processes are gone.
    asyncio.get_running_loop().call_later(0.3, lambda: fake.set_processes(1, {}, other_mib=500))
    started = time.monotonic()
    message = await guard.post_stop(
        make_ctx("post_stop", old_spec="m", pid=leader, config={"release_timeout": 5})
    )
    assert message is not None and message.startswith("58.6 GiB of GPU memory released after")
    assert time.monotonic() - started >= 0.25
    assert BASE not in guard.running and leader not in guard.stopping


async def test_post_stop_looks_at_the_instance_gpus_only(vllm_group: tuple[int, int]) -> None:
    leader, child = vllm_group
    fake = FakeNvml.gpus(2)
    fake.set_processes(0, {child: 60000})
    # In a container NVML may list the host's pids: on GPU 1, another instance's worker has
    # the number that the stopped instance's leader has here. It is not the instance's.
    fake.set_processes(1, {leader: 20000})
    guard = GpuGuard(fake)
    fields: dict[str, Any] = {"old_spec": "m", "pid": leader, "instance": "a", "gpus": ("0",)}
    await guard.pre_stop(make_ctx("pre_stop", **fields))
    assert guard.stopping[leader].pids == {child}
    assert [d.index for d in guard.stopping[leader].devices] == [0]
    os.killpg(leader, signal.SIGKILL)
    asyncio.get_running_loop().call_later(0.3, fake.release, 0)
    message = await guard.post_stop(make_ctx("post_stop", config={"release_timeout": 5}, **fields))
    assert message is not None and message.startswith("58.6 GiB of GPU memory released after")
    # Without pre_stop's record (vLLM had exited), only the instance's GPUs are searched too.
    assert await guard.post_stop(make_ctx("post_stop", config={"release_timeout": 5}, **fields)) is None


async def test_post_stop_looks_where_the_vllm_was_started(vllm_group: tuple[int, int]) -> None:
    """A /switch gives the slot the incoming model's GPUs before it stops the old one: the old
    vLLM's memory is still looked for on the GPUs it was started on."""
    leader, child = vllm_group
    fake = FakeNvml.gpus(2)
    fake.set_processes(0, {child: 60000})
    guard = GpuGuard(fake)
    await guard.post_switch(make_ctx("post_switch", "old", pid=leader, instance="old", gpus=("0", "1")))
    fields: dict[str, Any] = {"old_spec": "old", "pid": leader, "instance": "new", "gpus": ("1",)}
    await guard.pre_stop(make_ctx("pre_stop", **fields))
    assert guard.stopping[leader].pids == {child}
    os.killpg(leader, signal.SIGKILL)
    asyncio.get_running_loop().call_later(0.3, fake.release, 0)
    started = time.monotonic()
    message = await guard.post_stop(make_ctx("post_stop", config={"release_timeout": 5}, **fields))
    assert message is not None and message.startswith("58.6 GiB of GPU memory released after")
    assert time.monotonic() - started >= 0.25
    assert leader not in guard.launched_on


async def test_post_stop_waits_for_used_memory_to_drop(vllm_group: tuple[int, int]) -> None:
    leader, child = vllm_group
    fake = FakeNvml.gpus(1)
    fake.set_processes(0, {child: 60000})
    guard = GpuGuard(fake)
    await guard.pre_stop(make_ctx("pre_stop", pid=leader))
    fake.set_processes(0, {}, other_mib=60000)  # listed no more, but not yet freed
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, fake.release, 0)
    started = time.monotonic()
    assert await guard.post_stop(make_ctx("post_stop", pid=leader))
    assert time.monotonic() - started >= 0.25


async def test_post_stop_is_bounded(vllm_group: tuple[int, int]) -> None:
    leader, child = vllm_group
    fake = FakeNvml.gpus(1)
    fake.set_processes(0, {child: 60000})
    guard = GpuGuard(fake)
    await guard.pre_stop(make_ctx("pre_stop", pid=leader))
    started = time.monotonic()
    with pytest.raises(MemoryNotReleased) as failed:
        await guard.post_stop(make_ctx("post_stop", pid=leader, config={"release_timeout": 0.3}))
    assert time.monotonic() - started < 2
    message = str(failed.value)
    assert (
        f"not released after 0.3 s: GPU 0 (NVIDIA Fake GPU, GPU-fake-0000) still lists pid {child}" in message
    )
    assert "CUDA out of memory" in message


async def test_post_stop_with_nothing_on_the_gpus_returns_at_once() -> None:
    fake = FakeNvml.gpus(1)
    guard = GpuGuard(fake)
    await guard.pre_stop(make_ctx("pre_stop", pid=2**22 + 1))
    assert await guard.post_stop(make_ctx("post_stop", pid=2**22 + 1)) is None
    assert await guard.post_stop(make_ctx("post_stop", pid=None)) is None
    assert fake.calls == 2
