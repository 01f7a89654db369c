"""The ``switching`` section (issue 14): two models that cannot share their GPU, switched
A -> B -> A, once with both **parked** by vLLM's sleep mode (catalogue entries ``sleep = 1``)
and once **cold** (the same entries without sleep: every switch stops one and starts the other).

Each mode runs its own proxy (``--gpus 0``; the entries on GPU 0 with
``--gpu-memory-utilization 0.6``, so that loading one evicts the other) in front of the
simulator, whose sleep mode is timed like vLLM's published figures: ``/sleep`` takes
:data:`SLEEP_DELAY`, ``/wake_up`` :data:`WAKE_DELAY` (vLLM's blog: waking takes 0.26-5.7 s on an
A100 from Qwen3 0.6B to 235B; 1 s is near the small end), a cold start
``--sim-load-delay`` 20 s in the full run (shorter than vLLM's 47-98 s in the same blog, to keep
the run short) and 1 s in ``--quick``.

A switch is one HTTP call, :data:`CALL` (``POST /switch`` naming the entry; ``POST /load``
is the other choice); parked models are also switched by the other call and by a plain
request naming the parked one (``POST /v1/completions``, ``max_tokens`` 1: what a notebook
user does). For each switch: the client's wall time, and the answer's ``total_seconds``,
``woke``, ``load_seconds`` and ``wake_seconds``. The **proxy's own added time** is the wall
time less what the simulator was told to take: the sleep of the model parked plus the wake of
the one woken, or the configured load of a cold start (which then also holds the stop of the
other and the new process's Python start-up: vLLM's costs, not the proxy's). Issue 14's
target: under :data:`TARGET_MS` on top of vLLM's wake. The simulator's own sleep and wake,
called straight (no proxy), are measured too.

The figures must be what they claim: every parked switch must have woken the same process
(``"woke": true``, the same pid, the other model asleep), every cold one must have started a
new process; otherwise the section raises.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from aic_vllm_proxy.engine.gpumem import SIM_STATE_ENV

from .measure import median
from .sections import Bench
from .targets import Proxy, call

#: The call that switches: "switch" (``POST /switch {"model_spec": NAME}``) or "load"
#: (``POST /load {"model": NAME}``); the parked models are also switched by the other one and by
#: a request (:data:`PARKED_VIAS`), the cold ones by this one alone.
CALL = "switch"
PARKED_VIAS = (CALL, "load" if CALL == "switch" else "switch", "request")
SLEEP_DELAY = 0.1  # --sim-sleep-delay (s)
WAKE_DELAY = 1.0  # --sim-wake-delay (s)
TARGET_MS = 50.0
A, B = "a", "b"
SIM = "--sim-import-delay 0 --disable-log-stats --disable-uvicorn-access-log --gpu-memory-utilization 0.6"


def catalogue(workdir: Path, sleep: int, load_delay: float) -> Path:
    """Entries A and B on GPU 0, each taking 0.6 of it: only one runs at a time."""
    path = workdir / f"switching-{'parked' if sleep else 'cold'}.toml"
    args = f"{SIM} --sim-load-delay {load_delay:g}"
    args += f" --sim-sleep-delay {SLEEP_DELAY:g} --sim-wake-delay {WAKE_DELAY:g}"
    path.write_text(
        "".join(
            f'[models.{n}]\nmodel = "bench/{n}"\nargs = "{args}"\ngpus = ["0"]\nsleep = {sleep}\n\n'
            for n in (A, B)
        )
    )
    return path


def instances(proxy: Proxy) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in proxy.status()["instances"]}


def switch_to(proxy: Proxy, via: str, name: str) -> tuple[float, dict[str, Any]]:
    """Switch to ``name`` by ``via`` ("load", "switch" or "request"): (wall seconds, answer)."""
    if via == "request":
        path, body = "/v1/completions", {"model": name, "prompt": "Hello", "max_tokens": 1}
    elif via == "load":
        path, body = "/load", {"model": name}
    elif via == "switch":
        path, body = "/switch", {"model_spec": name}
    else:
        raise ValueError(f"unknown switch call {via!r}")
    began = time.perf_counter()
    status, answer = call("POST", proxy.port, path, body, timeout=300.0)
    wall = time.perf_counter() - began
    if status != 200 or not isinstance(answer, dict):
        raise RuntimeError(f"switching: POST {path} {body} answered {status}: {answer}")
    return wall, answer


def measure_switch(
    proxy: Proxy, via: str, name: str, other: str, parked: bool, load_delay: float
) -> dict[str, Any]:
    """One switch from ``other`` to ``name``, checked to be what ``parked`` says."""
    before = instances(proxy)
    wall, answer = switch_to(proxy, via, name)
    after = instances(proxy)
    now, gone = after.get(name, {}), after.get(other, {})
    was = before.get(name, {})
    woke = answer.get("woke") if via != "request" else None
    same_process = was.get("pid") is not None and now.get("pid") == was.get("pid")
    problems = []
    if now.get("state") != "ready":
        problems.append(f"{name} is {now.get('state')}, not ready")
    if parked:
        if (via != "request" and woke is not True) or was.get("state") != "sleeping" or not same_process:
            problems.append(
                f"{name} did not wake (was {was.get('state')} pid {was.get('pid')}, now pid {now.get('pid')})"
            )
        if gone.get("state") != "sleeping":
            problems.append(f"{other} is {gone.get('state')}, not parked")
    else:
        if woke or same_process or (via != "request" and answer.get("load_seconds") is None):
            problems.append(
                f"{name} was not started cold (woke {woke}, pid {was.get('pid')} -> {now.get('pid')})"
            )
        if gone.get("state") not in (None, "stopped"):
            problems.append(f"{other} is {gone.get('state')}, not stopped")
    if problems:
        raise RuntimeError(
            f"switching ({'parked' if parked else 'cold'}, {via}): "
            + "; ".join(problems)
            + f"; answer {answer}"
        )
    vllm = SLEEP_DELAY + WAKE_DELAY if parked else load_delay  # what the simulator was told to take
    total = answer.get("total_seconds")
    return {
        "from": other,
        "to": name,
        "wall_ms": wall * 1000,
        "added_ms": (wall - vllm) * 1000,
        "total_seconds": total,
        "answer_added_ms": (total - vllm) * 1000 if isinstance(total, (int, float)) else None,
        "woke": woke,
        "load_seconds": answer.get("load_seconds"),
        "wake_seconds": answer.get("wake_seconds"),
        "pid": now.get("pid"),
    }


def summary(switches: list[dict[str, Any]]) -> dict[str, Any]:
    added = [s["added_ms"] for s in switches]
    answered = [s["answer_added_ms"] for s in switches if s["answer_added_ms"] is not None]
    loads = [s["load_seconds"] for s in switches if s["load_seconds"] is not None]
    wakes = [s["wake_seconds"] for s in switches if s["wake_seconds"] is not None]
    return {
        "switches": switches,
        "wall_median_ms": median([s["wall_ms"] for s in switches]),
        "added_median_ms": median(added),
        "added_max_ms": max(added),
        "answer_added_median_ms": median(answered) if answered else None,
        "load_seconds_median": median(loads) if loads else None,  # cold: launch to ready
        "wake_seconds_median": median(wakes) if wakes else None,  # parked: the wake alone
    }


def direct(proxy: Proxy, name: str, samples: int) -> dict[str, Any]:
    """What the simulator itself takes, without the proxy: ``POST /sleep?level=1&mode=wait``
    then ``POST /wake_up`` straight to the (awake) instance of ``name``, ``samples`` times."""
    base = instances(proxy)[name]["vllm_base"]
    port = int(base.rsplit(":", 1)[1])
    walls = []
    for _ in range(samples):
        began = time.perf_counter()
        for path in ("/sleep?level=1&mode=wait", "/wake_up"):
            status, answer = call("POST", port, path, timeout=60.0)
            if status != 200:
                raise RuntimeError(f"switching: the simulator answered POST {path} with {status}: {answer}")
        walls.append((time.perf_counter() - began) * 1000)
    if instances(proxy)[name]["state"] != "ready":
        raise RuntimeError(f"switching: {name} is not ready after the direct sleep and wake")
    return {
        "sleep_wake_ms": walls,
        "wall_median_ms": median(walls),
        "added_median_ms": median(walls) - 1000 * (SLEEP_DELAY + WAKE_DELAY),
    }


def run_mode(
    bench: Bench, workdir: Path, parked: bool, vias: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One proxy's switches by each of ``vias`` (a summary each), and when ``parked`` the
    simulator's own sleep and wake measured straight (:func:`direct`)."""
    sizes = bench.sizes
    label = "parked" if parked else "cold"
    config = catalogue(workdir, 1 if parked else 0, sizes.switch_load_delay)
    # The simulator's GPU memory, read by the proxy as it reads NVML's: it checks every sleep.
    gpu_state = workdir / f"switching-{label}-gpu"
    gpu_state.mkdir()
    env = {**os.environ, SIM_STATE_ENV: str(gpu_state)}
    proxy = Proxy(workdir, f"proxy-switching-{label}", config=config, args=("--gpus", "0"), env=env)
    out: dict[str, Any] = {}
    straight = None
    try:
        proxy.start()
        # Warm-up (not measured): A running and, when parked, B asleep beside it.
        for name in (B, A) if parked else (A,):
            switch_to(proxy, CALL, name)
        for via in vias:
            switches = []
            for _ in range(sizes.switch_rounds):
                for name, other in ((B, A), (A, B)):
                    one = measure_switch(proxy, via, name, other, parked, sizes.switch_load_delay)
                    switches.append(one)
                    bench.log(
                        f"    {label} {via:7s} {other} -> {name}: {one['wall_ms']:.0f} ms,"
                        f" added {one['added_ms']:.1f} ms"
                    )
            out[via] = summary(switches)
        if parked:
            straight = direct(proxy, A, 2 * sizes.switch_rounds)
    finally:
        proxy.stop()
    return out, straight


def switching(bench: Bench, workdir: Path) -> dict[str, Any]:
    """7. Switching A -> B -> A, parked (sleep mode) and cold."""
    parked, straight = run_mode(bench, workdir, parked=True, vias=PARKED_VIAS)
    cold, _ = run_mode(bench, workdir, parked=False, vias=(CALL,))
    return {
        "call": CALL,
        "rounds": bench.sizes.switch_rounds,
        "sleep_delay_s": SLEEP_DELAY,
        "wake_delay_s": WAKE_DELAY,
        "load_delay_s": bench.sizes.switch_load_delay,
        "target_ms": TARGET_MS,
        "parked": parked,
        "direct": straight,
        "cold": cold,
    }
