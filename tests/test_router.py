"""Several nodes' daemons behind one URL with an existing router (issue 17; docs/router.md):
LiteLLM's proxy, installed by ``scripts/install-router.sh`` into ``.venv-router``, in front of
two real daemons on loopback (the simulator), configured by
``examples/router/make_litellm_config.py`` from the daemons' connection files.

Daemon A serves ``alpha`` and ``shared``, daemon B ``beta`` and ``shared`` (catalogue entries on
two GPUs each, so that both stay loaded; none preloaded: the first request for each loads it on
demand, through the router). Requests go through the router with the openai client; each
daemon's ``aic_proxy_requests_total`` says which daemon served them.

Without ``.venv-router`` the test skips, unless ``CI`` is set: then it fails (CI installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import yaml
from helpers import FAST, free_port, wait_until
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from plugin_env import REPO

if TYPE_CHECKING:  # annotations only: "conftest" is ambiguous at run time (tests/realvllm has one)
    from conftest import ProxyProcess

ROUTER_VENV = REPO / ".venv-router"
LITELLM = ROUTER_VENV / "bin" / "litellm"
MAKE_CONFIG = REPO / "examples" / "router" / "make_litellm_config.py"
#: Deadlines: generous, for a loaded 2-core machine (LiteLLM imports for about 6 s on an idle one).
ROUTER_START = 120.0
FILE_WAIT = 30.0
STOP = 30.0
#: The simulator's answer to max_tokens=4 (generation.py): tokens named by their position.
ANSWER = " tok0 tok1 tok2 tok3"
#: Seconds between beta's tokens: its 4 tokens come over 3 gaps, at least 0.9 s.
TOKEN_DELAY = 0.3


def _catalogue(own: str) -> str:
    """A daemon's TOML: its own model on GPU 0 and ``shared`` on GPU 1 (both can stay loaded).
    ``beta`` generates a token every TOKEN_DELAY seconds (streaming must pass through as it comes)."""
    delay = f" --sim-token-delay {TOKEN_DELAY}" if own == "beta" else ""
    return "".join(
        f'[models.{name}]\nmodel = "org/{name}"\ngpus = ["{gpu}"]\n'
        f'args = "--served-model-name {name} {FAST}{extra}"\n\n'
        for name, gpu, extra in ((own, "0", delay), ("shared", "1", ""))
    )


@pytest.fixture
def litellm() -> Path:
    if not LITELLM.exists():
        reason = (
            f"{LITELLM} is missing (bash scripts/install-router.sh .venv-router): the router test cannot run"
        )
        if os.environ.get("CI"):
            pytest.fail(reason + ", and CI must run it")
        pytest.skip(reason)
    return LITELLM


@pytest.fixture
def run_router(tmp_path: Path, litellm: Path) -> Iterator[Callable[[Path, dict[str, str]], str]]:
    """``run_router(config, env)``: ``litellm --config CONFIG`` on a free loopback port, in a
    session of its own; returns its URL once it answers. SIGTERM at the end (then SIGKILL of its
    whole group)."""
    started: list[subprocess.Popen[bytes]] = []
    output = tmp_path / "router.out"

    def start(config: Path, env: dict[str, str]) -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        environment = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
        # LiteLLM's bundled price list, not a fetch from GitHub; loopback never through a proxy.
        environment.update(env, LITELLM_LOCAL_MODEL_COST_MAP="True", NO_PROXY="127.0.0.1,localhost")
        command = [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        with open(output, "wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=environment, cwd=config.parent,
                start_new_session=True,
            )  # fmt: skip
        started.append(process)

        def alive() -> bool:
            try:
                return httpx.get(url + "/health/liveliness", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(lambda: process.poll() is not None or alive(), ROUTER_START, interval=0.2):
            raise AssertionError(f"router not answering after {ROUTER_START} s:\n{output.read_text()}")
        assert process.poll() is None, f"router exited {process.returncode}:\n{output.read_text()}"
        return url

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # anything it started that outlived it
        process.wait()


def _connection(path: Path, daemon: ProxyProcess) -> dict[str, object]:
    """The daemon's connection file once it is written (just after it listens)."""
    if not wait_until(lambda: path.exists() or daemon.process.poll() is not None, FILE_WAIT):
        raise AssertionError(f"no connection file after {FILE_WAIT} s:\n{daemon.read_output()}")
    assert path.exists(), daemon.read_output()
    info: dict[str, object] = json.loads(path.read_text())
    return info


def _served(daemon: ProxyProcess, key: str) -> dict[str, float]:
    """Requests the daemon served, by model (its aic_proxy_requests_total, status 2xx)."""
    response = httpx.get(
        daemon.url + "/proxy/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    counts: dict[str, float] = {}
    for line in response.text.splitlines():
        if line.startswith("aic_proxy_requests_total{") and 'status="2xx"' in line:
            model = line.split('model="', 1)[1].split('"', 1)[0]
            counts[model] = counts.get(model, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _chat(client: OpenAI, model: str, *, stream: bool) -> tuple[str, float]:
    """One chat completion through the router: its text (the simulator's answer) and, streaming,
    the seconds from the first piece of text to the last."""
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]
    if not stream:
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=4)
        assert response.model == model
        return response.choices[0].message.content or "", 0.0
    parts: list[str] = []
    arrivals: list[float] = []
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=4, stream=True):
        assert chunk.model == model
        text = "".join(choice.delta.content or "" for choice in chunk.choices)
        if text:
            parts.append(text)
            arrivals.append(time.monotonic())
    return "".join(parts), arrivals[-1] - arrivals[0] if arrivals else 0.0


def test_two_daemons_behind_litellm_routed_by_model_and_balanced(
    tmp_path: Path,
    spawn_proxy: Callable[..., ProxyProcess],
    run_router: Callable[[Path, dict[str, str]], str],
) -> None:
    """The config made from two connection files: ``alpha`` reaches only daemon A and ``beta``
    only daemon B (non-streaming and streaming, each loaded on demand behind the router);
    ``shared``, on both, is spread over both; a client without the router's key is refused."""
    daemons: list[tuple[ProxyProcess, str, Path]] = []
    for name, own in (("a", "alpha"), ("b", "beta")):
        config, file, key = tmp_path / f"{name}.toml", tmp_path / "jobs" / f"{name}.json", f"admin-{name}"
        config.write_text(_catalogue(own))
        daemon = spawn_proxy(
            "--config", str(config), "--gpus", "0,1", "--admin-key", key, "--connection-file", str(file)
        )  # fmt: skip
        info = _connection(file, daemon)
        assert info["url"] == daemon.url and info["key"] == key
        daemons.append((daemon, key, file))
    (a, key_a, file_a), (b, key_b, file_b) = daemons

    out, env_file = tmp_path / "router" / "litellm.yaml", tmp_path / "router" / "router.env"
    subprocess.run(
        [sys.executable, str(MAKE_CONFIG), "--out", str(out), "--env-file", str(env_file),
         f"{file_a}=alpha,shared", f"{file_b}=beta,shared"],
        check=True, timeout=60,
    )  # fmt: skip
    config_text = out.read_text()
    assert key_a not in config_text and key_b not in config_text  # keys only in the env file
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert env["AIC_VLLM_PROXY_KEY_1"] == key_a and env["AIC_VLLM_PROXY_KEY_2"] == key_b
    master = env["LITELLM_MASTER_KEY"]

    router = run_router(out, env)
    client = OpenAI(base_url=router + "/v1", api_key=master, timeout=120, max_retries=0)
    assert {model.id for model in client.models.list()} == {"alpha", "beta", "shared"}

    # Routed by model name: each model reaches its own daemon only.
    for model in ("alpha", "beta"):
        assert _chat(client, model, stream=False)[0] == ANSWER
        text, spread = _chat(client, model, stream=True)
        assert text == ANSWER
        if model == "beta":  # the tokens came as beta made them, not all at once at the end
            assert spread >= 1.5 * TOKEN_DELAY, spread
    assert _served(a, key_a) == {"alpha": 2.0}
    assert _served(b, key_b) == {"beta": 2.0}

    # The same model on both daemons: load-balanced (LiteLLM's simple-shuffle picks at random;
    # all 16 on one daemon has odds of 2 in 65536).
    for n in range(16):
        assert _chat(client, "shared", stream=n % 2 == 1)[0] == ANSWER
    shared_a, shared_b = _served(a, key_a).get("shared", 0.0), _served(b, key_b).get("shared", 0.0)
    assert shared_a > 0 and shared_b > 0 and shared_a + shared_b == 16, (shared_a, shared_b)

    # The router's key guards it: none, or a daemon's key, is refused before any daemon is asked.
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for headers in ({}, {"Authorization": f"Bearer {key_a}"}):
        response = httpx.post(router + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert response.status_code in (400, 401), response.text
    assert _served(a, key_a)["alpha"] == 2.0


def test_config_script_keeps_the_master_key_and_refuses_a_file_without_models(tmp_path: Path) -> None:
    """make_litellm_config.py run again (a daemon restarted with a new port and key): the new
    URL and key are written, the router's master key stays the same; ``FILE`` without
    ``=MODEL`` is refused."""
    file = tmp_path / "1.json"
    out, env_file = tmp_path / "litellm.yaml", tmp_path / "router.env"

    def make(*daemons: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(MAKE_CONFIG), "--out", str(out), "--env-file", str(env_file), *daemons]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    def environment() -> dict[str, str]:
        return dict(line.split("=", 1) for line in env_file.read_text().splitlines())

    file.write_text(json.dumps({"url": "http://gpu1:4000", "key": "k1"}))
    assert make(f"{file}=m").returncode == 0
    first = environment()
    file.write_text(json.dumps({"url": "http://gpu2:4001", "key": "k2"}))
    assert make(f"{file}=m").returncode == 0
    assert environment() == {"LITELLM_MASTER_KEY": first["LITELLM_MASTER_KEY"], "AIC_VLLM_PROXY_KEY_1": "k2"}
    assert first["LITELLM_MASTER_KEY"].startswith("sk-")
    assert '"http://gpu2:4001/v1"' in out.read_text()
    refused = make(str(file))
    assert refused.returncode == 2 and "FILE=MODEL" in refused.stderr


def test_the_example_config_is_what_the_script_writes(tmp_path: Path) -> None:
    """examples/router/litellm.yaml (the one the README explains) holds the same settings as the
    script writes for the same two daemons, so that the example is the tested config."""
    files = []
    for number, url in enumerate(("http://gpu042:40117", "http://gpu043:35521"), start=1):
        files.append(tmp_path / f"{number}.json")
        files[-1].write_text(json.dumps({"url": url, "key": f"key-{number}"}))
    out = tmp_path / "litellm.yaml"
    command = [sys.executable, str(MAKE_CONFIG), "--out", str(out), "--env-file", str(tmp_path / "env")]
    command += [f"{files[0]}=qwen-7b", f"{files[1]}=qwen-7b,llama-8b"]
    subprocess.run(command, check=True, timeout=60)
    example = yaml.safe_load((REPO / "examples" / "router" / "litellm.yaml").read_text())
    assert example == yaml.safe_load(out.read_text())
