"""The fleet's settings (issue 13): a catalogue entry's gpus, gpu_memory_utilization, ttl,
pinned and preload (catalog.Footprint), the options --gpus, --on-demand, --default-ttl and
--min-residency, and the start-up check of the catalogue against the node's GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import free_port

from aic_vllm_proxy import cli as cli_module
from aic_vllm_proxy.catalog import VLLM_DEFAULT_UTILIZATION, CatalogEntry, CatalogInfo, Footprint, resolve
from aic_vllm_proxy.client.calls import catalog_spec
from aic_vllm_proxy.config import ConfigError, Settings, build_settings
from aic_vllm_proxy.spec import ModelSpec
from aic_vllm_proxy.vllm_flags import FLAGS

UUID = "GPU-8f3c1a2b-6d4e-4f00-9a1b-0123456789ab"
NODE = ("0", "1", "2", "3")

CONFIG = """
[proxy]
gpus = [0, 1, 2, 3]
default_ttl = 600
min-residency = 45
on_demand = false

[models.llama-8b]
model = "meta-llama/Llama-3.1-8B-Instruct"
args = "--max-model-len 8192"
gpus = [0, 1]
gpu_memory_utilization = 0.45
pinned = true
preload = true

[models.qwen]
model = "Qwen/Qwen2.5-7B-Instruct"
args = "--gpu-memory-utilization 0.5"
gpus = [1]
ttl = 60

[models.mini]
model = "sentence-transformers/all-MiniLM-L6-v2"
"""


def settings_from(tmp_path: Path, text: str, **overrides: Any) -> Settings:
    config = tmp_path / "proxy.toml"
    config.write_text(text)
    return build_settings(config, overrides)


def models(**entries: dict[str, Any]) -> Settings:
    return build_settings(None, {"models": entries})


def config_error(**entries: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        models(**entries)
    message = str(info.value)
    assert "\n" not in message and "pydantic" not in message and "Value error" not in message
    return message


# ------------------------------------------------------------------------------ the catalogue


def test_a_fleet_config(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, CONFIG)
    assert settings.gpus == NODE
    assert (settings.default_ttl, settings.min_residency, settings.on_demand) == (600, 45, False)
    assert settings.footprints(settings.gpus) == {
        "llama-8b": Footprint(gpus=("0", "1"), utilization=0.45, ttl=0, pinned=True, preload=True),
        "qwen": Footprint(gpus=("1",), utilization=0.5, ttl=60),
        "mini": Footprint(gpus=NODE, utilization=VLLM_DEFAULT_UTILIZATION, ttl=600),
    }


def test_the_defaults_change_nothing() -> None:
    settings = build_settings(None, {})
    assert settings.gpus == () and settings.on_demand is None and not settings.on_demand_enabled
    assert (settings.default_ttl, settings.min_residency) == (0, 30)
    entry = CatalogEntry(model="org/m", args="--max-model-len 8")
    assert entry.spec_text == "org/m --max-model-len 8"
    assert entry.footprint((), 0) == Footprint(gpus=(), utilization=VLLM_DEFAULT_UTILIZATION)


def test_vllm_default_utilization_is_the_flag_tables() -> None:
    (row,) = [row for row in FLAGS if row[0].startswith("--gpu-memory-utilization ")]
    assert VLLM_DEFAULT_UTILIZATION == float(row[3]) == 0.92  # vLLM 0.32's --help


@pytest.mark.parametrize(
    ("given", "names"),
    [([0, 1], ("0", "1")), ("0, 2", ("0", "2")), ([UUID], (UUID,)), (["MIG-abc", 3], ("MIG-abc", "3"))],
)
def test_entry_gpus(given: object, names: tuple[str, ...]) -> None:
    assert models(m={"model": "org/m", "gpus": given}).models["m"].gpus == names


@pytest.mark.parametrize(
    ("gpus", "words"),
    [
        ([], "models.m.gpus: is empty; leave it out"),
        ([0, 0], "models.m.gpus: GPU 0 is listed twice"),
        ([-1], "models.m.gpus: -1 is not a GPU id"),
        ([True], "models.m.gpus: True is not a GPU id"),
        ([1.5], "models.m.gpus: 1.5 is not a GPU id"),
        (3, "models.m.gpus: give a list of GPU ids"),
    ],
)
def test_bad_entry_gpus(gpus: object, words: str) -> None:
    assert words in config_error(m={"model": "org/m", "gpus": gpus})


@pytest.mark.parametrize(
    ("args", "share"),
    [
        ("--gpu-memory-utilization 0.5", 0.5),
        ("--gpu_memory_utilization=0.35", 0.35),
        ("--device-memory-utilization 0.4", 0.4),  # vLLM's other name for it
        ("--gpu-memory-utilization 0.9 --gpu-memory-utilization 0.3", 0.3),  # the last one wins
        ("--max-model-len 8", VLLM_DEFAULT_UTILIZATION),
    ],
)
def test_utilization_from_args(args: str, share: float) -> None:
    entry = models(m={"model": "org/m", "args": args}).models["m"]
    assert entry.footprint(NODE, 0).utilization == share
    assert entry.spec_text == f"org/m {args}"  # nothing added


@pytest.mark.parametrize("share", [0, -0.1, 1.01, "abc"])
def test_utilization_key_out_of_range(share: object) -> None:
    message = config_error(m={"model": "org/m", "gpu_memory_utilization": share})
    assert "models.m.gpu_memory_utilization:" in message


@pytest.mark.parametrize("value", ["0", "1.5", "abc", "nan"])
def test_utilization_in_args_out_of_range(value: str) -> None:
    message = config_error(m={"model": "org/m", "args": f"--gpu-memory-utilization {value}"})
    assert f"models.m: args give --gpu-memory-utilization {value!r}" in message
    assert "(0, 1]" in message


def test_utilization_key_is_passed_to_vllm() -> None:
    settings = models(m={"model": "org/m", "args": "--max-model-len 8", "gpu_memory_utilization": 0.45})
    spec, name = resolve("m", settings.models, policy="catalog", denied_flags=())
    assert name == "m"
    assert spec.args == ("--max-model-len", "8", "--gpu-memory-utilization", "0.45")
    # The same value in args and key is fine, and not given twice.
    same = models(
        m={"model": "org/m", "args": "--gpu-memory-utilization 0.45", "gpu_memory_utilization": 0.45}
    )
    assert same.models["m"].spec_text == "org/m --gpu-memory-utilization 0.45"


def test_utilization_in_two_places_must_agree() -> None:
    message = config_error(
        m={"model": "org/m", "args": "--gpu-memory-utilization 0.6", "gpu_memory_utilization": 0.5}
    )
    assert "models.m: gpu_memory_utilization = 0.5 but args give --gpu-memory-utilization 0.6" in message


def test_ttl() -> None:
    settings = build_settings(
        None,
        {
            "default_ttl": 300,
            "models": {
                "default": {"model": "org/a"},
                "own": {"model": "org/b", "ttl": 20},
                "never": {"model": "org/c", "ttl": 0},
                "pinned": {"model": "org/d", "pinned": True},
            },
        },
    )
    ttls = {name: footprint.ttl for name, footprint in settings.footprints(NODE).items()}
    assert ttls == {"default": 300, "own": 20, "never": 0, "pinned": 0}
    assert "models.m.ttl:" in config_error(m={"model": "org/m", "ttl": -1})
    assert "models.m: pinned = true and ttl = 30 contradict" in config_error(
        m={"model": "org/m", "pinned": True, "ttl": 30}
    )


def test_entry_gpus_must_be_the_nodes() -> None:
    settings = models(m={"model": "org/m", "gpus": [1, 4, 5]})
    with pytest.raises(
        ConfigError,
        match=r"models\.m: gpus names GPU 4, 5, which is not one of the node's GPUs \(0, 1, 2, 3\)",
    ):
        settings.footprints(NODE)
    with pytest.raises(ConfigError, match="none known; give the node's GPUs with --gpus"):
        settings.footprints(())
    assert settings.footprints(("1", "4", "5"))["m"].gpus == ("1", "4", "5")


def test_entry_args_vllm_cannot_read_fail_the_start_up_check() -> None:
    settings = models(m={"model": "org/m", "args": "--port 9000"})  # accepted as today ...
    with pytest.raises(ConfigError, match=r"models\.m: model_spec sets --port"):
        settings.footprints(NODE)  # ... and refused by the start-up check


def test_free_form_spec_footprint() -> None:
    settings = build_settings(None, {"default_ttl": 90, "models": {"m": {"model": "org/m", "gpus": [2]}}})
    spec = ModelSpec.parse("org/x --gpu-memory-utilization 0.3")
    assert settings.footprint(spec, None, NODE) == Footprint(gpus=NODE, utilization=0.3, ttl=90)
    assert settings.footprint(spec, "m", NODE) == Footprint(
        gpus=("2",), utilization=VLLM_DEFAULT_UTILIZATION, ttl=90
    )


def test_the_client_reads_the_new_keys(tmp_path: Path) -> None:
    """``GET /models/catalog`` lists the new keys and the client resolves a name as the proxy does."""
    settings = settings_from(tmp_path, CONFIG)
    listed = CatalogInfo(policy="open", denied_flags=[], models=settings.models).model_dump(mode="json")
    assert listed["models"]["llama-8b"]["gpus"] == ["0", "1"]
    spec = catalog_spec("llama-8b", listed)
    assert spec == settings.models["llama-8b"].spec_text
    assert spec.endswith("--gpu-memory-utilization 0.45")


def test_an_entry_without_fleet_keys_is_listed_as_before(tmp_path: Path) -> None:
    """Older clients refuse unknown keys in ``GET /models/catalog``: unused ones are not listed."""
    settings = settings_from(tmp_path, CONFIG)
    listed = CatalogInfo(policy="open", denied_flags=[], models=settings.models).model_dump(mode="json")
    assert set(listed["models"]["mini"]) == {"model", "args", "aliases", "description"}
    assert set(listed["models"]["qwen"]) == {"model", "args", "aliases", "description", "gpus", "ttl"}


# --------------------------------------------------------------------------------- the options


@pytest.mark.parametrize(
    ("given", "names"),
    [("0,1,2,3", NODE), ([0, 1, 2, 3], NODE), (f"{UUID}, 1", (UUID, "1")), ((), ())],
)
def test_node_gpus_setting(given: object, names: tuple[str, ...]) -> None:
    assert build_settings(None, {"gpus": given}).gpus == names


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"gpus": "0,1,0"}, "gpus: GPU 0 is given twice"),
        ({"gpus": [0, -1]}, "gpus: give GPU ids"),
        ({"default_ttl": -1}, "default_ttl:"),
        ({"min_residency": -5}, "min_residency:"),
        ({"on_demand": "maybe"}, "on_demand:"),
    ],
)
def test_bad_fleet_options(values: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_settings(None, values)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("on_demand", "catalogue", "enabled"),
    [(None, False, False), (None, True, True), (True, False, True), (False, True, False)],
)
def test_on_demand_is_on_with_a_catalogue_unless_told(
    on_demand: bool | None, catalogue: bool, enabled: bool
) -> None:
    entries = {"m": {"model": "org/m"}} if catalogue else {}
    settings = build_settings(None, {"on_demand": on_demand, "models": entries})
    assert settings.on_demand == on_demand
    assert settings.on_demand_enabled is enabled


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """The settings ``serve`` would run with (no daemon): no GPU in the environment, no NVML."""
    seen: list[Settings] = []
    monkeypatch.setattr(cli_module, "run_server", lambda settings, extra: seen.append(settings))
    for name in ("GPUS", "ON_DEMAND", "DEFAULT_TTL", "MIN_RESIDENCY", "CONFIG"):
        monkeypatch.delenv(f"AIC_VLLM_PROXY_{name}", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    return seen


def serve(args: list[str], env: dict[str, str] | None = None) -> None:
    result = CliRunner().invoke(cli_module.cli, ["serve", *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_options_on_the_command_line(served: list[Settings]) -> None:
    serve(["--gpus", "0,1", "--gpus", "2", "--no-on-demand", "--default-ttl", "120", "--min-residency", "5"])
    (settings,) = served
    assert settings.gpus == ("0", "1", "2")
    assert (settings.on_demand, settings.default_ttl, settings.min_residency) == (False, 120, 5)


def test_options_in_the_environment(served: list[Settings]) -> None:
    serve([], env={"AIC_VLLM_PROXY_GPUS": f"{UUID},1", "AIC_VLLM_PROXY_ON_DEMAND": "1"})
    (settings,) = served
    assert settings.gpus == (UUID, "1") and settings.on_demand is True


def test_without_gpus_everything_is_as_before(served: list[Settings]) -> None:
    serve([])
    (settings,) = served
    assert settings.gpus == () and settings.on_demand is None and settings.models == {}


def test_the_node_gpus_are_found_at_start_up(served: list[Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{UUID},3")
    serve([])
    serve(["--gpus", "5"])  # given, the option wins
    assert [settings.gpus for settings in served] == [(UUID, "3"), ("5",)]


def test_a_catalogue_gpu_not_on_the_node_stops_the_daemon(tmp_path: Path) -> None:
    """The real command, as a user runs it: one clear line, no traceback, nothing started."""
    config = tmp_path / "proxy.toml"
    config.write_text('[models.big]\nmodel = "org/big"\ngpus = [0, 2]\n')
    env = {**_plain_environment(), "CUDA_VISIBLE_DEVICES": f"{UUID},1"}
    command = [
        sys.executable,
        "-m",
        "aic_vllm_proxy",
        "serve",
        "--config",
        str(config),
        "--port",
        str(free_port()),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"models.big: gpus names GPU 0, 2, which is not one of the node's GPUs ({UUID}, 1)" in output
    assert "Traceback" not in output


def _plain_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("AIC_VLLM_PROXY_")}
