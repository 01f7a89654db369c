"""``scripts/gpu-check.sh`` (issue 14's check of sleep mode on a real NVIDIA GPU), run end to end
with bash against the simulator: the script's test-only settings give it model names instead of
the tiny model it builds, the simulator as ``--vllm-command``, and GPU memory from the
simulator's state files (``AIC_VLLM_SIM_GPU_STATE``) or from a stand-in ``nvidia-smi`` that reads
them and lists, as NVML does, each simulated EngineCore with its memory.

- against the simulator the check passes: the timings table, then one summary line, last;
- a sleep that keeps the GPU memory (``--sim-sleep-keeps-memory``) fails the check, naming it:
  caught by the proxy's own check (A is stopped, not parked), or, when the proxy cannot see
  the memory, by the script's own ``nvidia-smi`` comparison;
- the global deadline ends a check that overruns it, and stops what it started;
- SIGTERM in the middle stops the proxy and every simulator it started.

After every run no process of the check is left (and ``no_process_group_left`` checks groups).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SESSION_MARKER, SIM, processes, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"
SESSION = os.environ[SESSION_MARKER]
#: Quick simulated starts; a wake (0.2 s) much faster than a cold start (1 s).
FAST_SIM = "--sim-import-delay 0.05 --sim-load-delay 1 --sim-wake-delay 0.2"
KEEPS_MEMORY = "--sim-sleep-keeps-memory"

#: A stand-in ``nvidia-smi`` (format csv,noheader,nounits) over the simulator's state files in
#: the folder ``STATE``: the compute apps are the live EngineCores, their pids plus ``OFFSET``
#: (not 0: as seen from a container, whose pid namespace hides them from the host's driver).
FAKE_NVIDIA_SMI = """\
import json, os, sys
from pathlib import Path

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

held = {}
for path in Path(STATE).glob("*.json"):
    try:
        data = json.loads(path.read_text())
    except ValueError:
        continue
    if alive(data["engine_pid"]):
        held[data["engine_pid"]] = sum(data["gpus"].values()) // 2**20
query = next(arg for arg in sys.argv[1:] if arg.startswith("--query-"))
if query.startswith("--query-compute-apps="):
    for pid, mib in held.items():
        print(f"{pid + OFFSET}, {mib}")
else:
    gpu = {"index": "0", "uuid": "GPU-fake", "name": "Fake GPU", "memory.total": "81920",
           "memory.used": str(sum(held.values()))}
    print(", ".join(gpu[name] for name in query.split("=", 1)[1].split(",")))
"""


def check_processes() -> set[int]:
    """This session's live processes of a check: its proxies and simulators."""
    return {
        proc.pid
        for proc in processes(SESSION_MARKER)
        if proc.mark == SESSION
        and ("aic_vllm_proxy.simulator" in proc.cmdline or "aic_vllm_proxy serve" in proc.cmdline)
    }


def simulators() -> list[str]:
    """The models of this session's live simulators (API servers; not the script's processes,
    whose command lines name the simulator's command)."""
    prefix = "-m aic_vllm_proxy.simulator serve "
    return [
        proc.cmdline.split(prefix, 1)[1].split()[0]
        for proc in processes(SESSION_MARKER)
        if proc.mark == SESSION and prefix in proc.cmdline and "gpu_check.py" not in proc.cmdline
    ]


def script_env(
    tmp_path: Path, sim_args: str = "", *, fake_smi: bool = False, pid_offset: int = 0
) -> dict[str, str]:
    """The script's environment: the simulator, two model names, a work folder; GPU memory from
    the simulator's state files (read by the script and by the proxy), or with ``fake_smi``
    from a stand-in nvidia-smi on PATH (the proxy then sees no GPU memory: its check is off)."""
    state = tmp_path / "gpu-state"
    state.mkdir()
    env = {
        **os.environ,
        "AIC_GPU_CHECK_PYTHON": sys.executable,
        "AIC_GPU_CHECK_VLLM_COMMAND": SIM,
        "AIC_GPU_CHECK_VLLM_ARGS": f"{FAST_SIM} {sim_args}".strip(),
        "AIC_GPU_CHECK_MODEL_A": "org/tiny-a",
        "AIC_GPU_CHECK_MODEL_B": "org/tiny-b",
        "AIC_GPU_CHECK_WORKDIR": str(tmp_path / "work"),
        "AIC_GPU_CHECK_DEADLINE": "200",
        "AIC_VLLM_SIM_GPU_STATE": str(state),
    }
    if fake_smi:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        smi = bin_dir / "nvidia-smi"
        smi.write_text(
            f"#!{sys.executable}\nSTATE = {str(state)!r}\nOFFSET = {pid_offset}\n{FAKE_NVIDIA_SMI}"
        )
        smi.chmod(0o755)
        del env["AIC_VLLM_SIM_GPU_STATE"]  # the proxy must not see it: only the simulators
        env["AIC_GPU_CHECK_VLLM_COMMAND"] = f"env AIC_VLLM_SIM_GPU_STATE={shlex.quote(str(state))} {SIM}"
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def run_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    before = check_processes()
    result = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=220, check=False
    )
    left = check_processes() - before
    assert not left, (left, result.stdout[-3000:])  # the script stopped them itself, before exiting
    return result


def summary(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stdout.rstrip("\n").splitlines()
    assert lines, (result.stdout, result.stderr)
    return lines[-1]


@pytest.mark.parametrize(
    ("fake_smi", "pid_offset"),
    [(False, 0), (True, 0), (True, 10**7)],
    ids=["sim-state-files", "nvidia-smi", "nvidia-smi-pids-hidden"],
)
def test_the_check_passes_against_the_simulator(tmp_path: Path, fake_smi: bool, pid_offset: int) -> None:
    """The pids hidden (a container): tiny-a's memory is estimated from the GPU's totals and
    tiny-b's is not measured, as the notes say."""
    result = run_script(script_env(tmp_path, fake_smi=fake_smi, pid_offset=pid_offset))
    last = summary(result)
    assert result.returncode == 0 and last.startswith("gpu-check: PASS ("), (
        last,
        result.stdout,
        result.stderr,
    )
    assert "memory released 63.4 -> 0.5 GiB" in last, last  # 0.5 GiB: the CUDA context left
    table = result.stdout[result.stdout.index("\nTimings\n") :]
    assert "\nstep " in table and "  load_seconds  wake_seconds  total_seconds  woke  note\n" in table, table
    for step in (
        "cold load tiny-a",
        "cold load tiny-b (parks tiny-a)",
        "wake tiny-a by a request",
        "wake tiny-b by /load",
        "wake tiny-a by /switch",
        "wake tiny-b by /switch",
    ):
        assert f"\n{step} " in table, (step, table)
    source = "nvidia-smi" if fake_smi else "simulator state files"
    assert f"memory tiny-a: 63.4 -> 0.5 GiB ({source})" in table, table
    if pid_offset:
        assert "memory of tiny-a estimated from the GPU's totals (processes not visible)" in table, table
        assert "memory tiny-b: not measured (nvidia-smi shows no memory for its processes)" in table, table
    else:
        assert f"memory tiny-b: 63.4 -> 0.5 GiB ({source})" in table, table


@pytest.mark.parametrize("fake_smi", [False, True], ids=["the-proxy-check", "the-script-check"])
def test_memory_kept_after_the_sleep_fails_the_check(tmp_path: Path, fake_smi: bool) -> None:
    """With the state files the proxy's own check stops tiny-a instead of parking it and says
    why in /status; with only nvidia-smi (the proxy sees nothing) the script's comparison does."""
    result = run_script(script_env(tmp_path, KEEPS_MEMORY, fake_smi=fake_smi))
    last = summary(result)
    assert result.returncode == 1 and last.startswith("gpu-check: FAIL "), (last, result.stdout)
    if fake_smi:
        assert "GPU memory not released by the sleep of tiny-a: 63.4 GiB awake, 63.4 GiB asleep" in last, last
    else:
        assert "tiny-a is stopped, not sleeping: vLLM did not release its GPU memory" in last, last
    assert "\nTimings\n" in result.stdout


def test_sigterm_stops_the_proxy_and_its_simulators(tmp_path: Path) -> None:
    """SIGTERM while tiny-a's simulator is (slowly) loading: the summary line says so, and the
    proxy and the simulator it started are gone when the script exits."""
    env = script_env(tmp_path, "--sim-load-delay 60")
    before = check_processes()
    output = tmp_path / "script.out"
    with open(output, "wb") as out:
        script = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        started = wait_until(lambda: "org/tiny-a" in simulators(), timeout=60)
        assert started, output.read_text()
        script.send_signal(signal.SIGTERM)
        assert script.wait(120) == 1, output.read_text()
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
    assert not check_processes() - before, output.read_text()
    last = output.read_text().rstrip("\n").splitlines()[-1]
    assert last == "gpu-check: FAIL interrupted (SIGTERM)", output.read_text()


def test_the_global_deadline_ends_the_check_and_what_it_started(tmp_path: Path) -> None:
    """A cold start longer than the whole deadline: the load's wait ends at the deadline (the
    script keeps 45 s of it for the cleanup), the check fails saying so, nothing is left."""
    env = script_env(tmp_path, "--sim-load-delay 300")
    env["AIC_GPU_CHECK_DEADLINE"] = "60"
    started = time.monotonic()
    result = run_script(env)
    last = summary(result)
    assert result.returncode == 1, (last, result.stdout)
    assert last.startswith(
        'gpu-check: FAIL POST /load {"model": "tiny-a"}: no answer before the global deadline'
    ), last
    assert time.monotonic() - started < 120, result.stdout  # well before the 300 s load
