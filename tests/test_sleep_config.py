"""Issue 14 groundwork: the sleep states of the state machine and the settings of sleep mode
(``sleep`` per catalogue entry, ``--default-sleep-level``, ``--host-memory-budget``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aic_vllm_proxy.catalog import Footprint
from aic_vllm_proxy.config import ConfigError, build_settings, parse_bytes
from aic_vllm_proxy.engine import gpumem
from aic_vllm_proxy.engine.logs import loaded_weights_gib
from aic_vllm_proxy.engine.placement import HOLDING, LEAVING
from aic_vllm_proxy.engine.sleep import GIB, host_weights
from aic_vllm_proxy.engine.state import TRANSITIONS
from aic_vllm_proxy.schemas import ProcessState as S
from aic_vllm_proxy.spec import ModelSpec

NODE = ("0", "1")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("200GiB", 200 * 1024**3),
        ("1.5 TB", 1_500_000_000_000),
        ("512mib", 512 * 1024**2),
        ("1e9", 10**9),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-1GiB", "GiB", "nan"])
def test_not_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_bytes(text)


def test_the_budget_is_read_as_a_size_from_the_config() -> None:
    assert build_settings(None, {"host_memory_budget": "2GiB"}).host_memory_budget == 2 * 1024**3
    assert build_settings(None, {}).host_memory_budget is None
    with pytest.raises(ConfigError, match="host_memory_budget: 'lots' is not a size"):
        build_settings(None, {"host_memory_budget": "lots"})


def test_an_entry_sleep_level_wins_over_the_default() -> None:
    settings = build_settings(
        None,
        {
            "default_sleep_level": 1,
            "models": {
                "a": {"model": "org/a", "sleep": 2},
                "b": {"model": "org/b"},
                "c": {"model": "org/c", "sleep": 0},
            },
        },
    )
    prints = settings.footprints(NODE)
    assert [prints[n].sleep_level for n in "abc"] == [2, 1, 0]
    free = settings.footprint(ModelSpec.parse("org/x"), None, NODE)
    assert free == Footprint(gpus=NODE, utilization=free.utilization, ttl=0.0, sleep_level=1)
    with pytest.raises(ConfigError, match="sleep"):
        build_settings(None, {"models": {"a": {"model": "org/a", "sleep": 3}}})


def test_the_sleep_states() -> None:
    """READY -> PARKING -> SLEEPING -> WAKING -> READY; each may give up into a stop or die; a
    sleeping instance holds no GPU memory, a parking or waking one does."""
    assert S.PARKING in TRANSITIONS[S.READY]
    assert TRANSITIONS[S.PARKING] == {S.SLEEPING, S.STOPPING, S.FAILED}
    assert TRANSITIONS[S.SLEEPING] == {S.WAKING, S.STOPPING, S.FAILED}
    assert TRANSITIONS[S.WAKING] == {S.READY, S.STOPPING, S.FAILED}
    assert S.SLEEPING not in HOLDING and {S.PARKING, S.WAKING} <= HOLDING
    assert S.PARKING in LEAVING


def test_the_weights_parked_in_host_memory(tmp_path: Path) -> None:
    """vLLM's "Model loading took X GiB memory" lines give what a level-1 sleeper holds in host
    RAM: one line per worker is summed; one line for a sharded model is one shard."""
    log = tmp_path / "vllm.log"
    log.write_text(
        "(EngineCore_DP0 pid=1) INFO 12-03 10:00:00 [gpu_model_runner.py:5150] "
        "Model loading took 14.9637 GiB memory and 3.500000 seconds\n"
    )
    assert loaded_weights_gib(log) == [14.9637]
    assert host_weights([14.9637], ModelSpec.parse("m")) == int(14.9637 * GIB)
    assert host_weights([7.5], ModelSpec.parse("m -tp 4 --pipeline-parallel-size 2")) == int(7.5 * 8 * GIB)
    assert host_weights([7.5, 7.5], ModelSpec.parse("m --tensor-parallel-size 2")) == int(15 * GIB)
    assert host_weights([], ModelSpec.parse("m")) is None
    (tmp_path / "none.log").write_text("INFO nothing here\n")
    assert loaded_weights_gib(tmp_path / "none.log") == []


def test_gpu_memory_held_by_a_group_from_the_simulator_files(tmp_path: Path) -> None:
    """The check after a sleep reads what a vLLM group holds: the simulator's state files when
    AIC_VLLM_SIM_GPU_STATE names their directory (a file of a dead engine does not count)."""
    me = os.getpid()
    (tmp_path / "1.json").write_text(json.dumps({"pid": 1, "engine_pid": me, "gpus": {"0": 5, "1": 7}}))
    (tmp_path / "2.json").write_text(json.dumps({"pid": 2, "engine_pid": 2**22 + 7, "gpus": {"0": 100}}))
    (tmp_path / "3.json").write_text("not json")
    env = {gpumem.SIM_STATE_ENV: str(tmp_path)}
    assert gpumem.held_by({1}, env) == 12
    assert gpumem.held_by({me}, env) == 12  # the engine's pid is in the group too
    assert gpumem.held_by({2}, env) == 0  # its engine is gone: left behind by a SIGKILL
    assert gpumem.held_by({99}, env) == 0


def test_released_after_sleep() -> None:
    assert gpumem.released(60 * GIB, int(0.5 * GIB))  # the CUDA context stays
    assert not gpumem.released(60 * GIB, 60 * GIB)  # nothing released
    assert gpumem.released(None, 60 * GIB) and gpumem.released(60 * GIB, None)  # unknown: no verdict
