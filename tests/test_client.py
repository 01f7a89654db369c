"""The notebook client (sync and async) against a real proxy and real simulator processes.

Most tests run the proxy in this process (``make_proxy``) and call the synchronous client from a
worker thread (``asyncio.to_thread``) so that the event loop serving the proxy keeps running.
Tests that must block the test's own thread (the seed snippet, use inside a running event loop)
run the proxy as a subprocess (``spawn_proxy``).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from helpers import FAST, SIM, async_wait_until, free_port

from aic_vllm_proxy.client import (
    API_KEY_ENV,
    URL_ENV,
    AsyncVLLMProxyClient,
    AuthenticationError,
    PermissionDeniedError,
    ProxyError,
    ProxyUnreachable,
    SwitchError,
    UnknownModelError,
    VLLMProxyClient,
    WaitTimeout,
    build_spec,
    catalog_spec,
)
from aic_vllm_proxy.client.progress import (
    HEARTBEAT_SECONDS,
    WARNINGS_PER_SITE,
    LogFilter,
    SwitchWatch,
    make_sink,
)
from aic_vllm_proxy.client.views import status_lines
from aic_vllm_proxy.schemas import ProcessState, Status

S = ProcessState
pytestmark = pytest.mark.timeout(120)
ELAPSED = re.compile(r"^\[\s*\d+\.\d+s\] ")
CHAT = [{"role": "user", "content": "Say hello"}]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def spec(model: str, extra: str = "") -> str:
    return f"{model} {FAST} {extra}".strip()


# ------------------------------------------------------------------------ no server


class TestSpecs:
    MODELS = {"a/m1": "--tensor-parallel-size 1", "m2": ["--max-model-len", "4096", "--chat-template", "x y"]}

    def test_from_model2spec(self) -> None:
        assert build_spec("a/m1", None, self.MODELS) == "a/m1 --tensor-parallel-size 1"
        assert shlex.split(build_spec("m2", None, self.MODELS)) == [
            "m2", "--max-model-len", "4096", "--chat-template", "x y",
        ]  # fmt: skip

    def test_explicit_args_win_and_any_model_is_allowed(self) -> None:
        assert build_spec("a/m1", "--max-model-len 8k", self.MODELS) == "a/m1 --max-model-len 8k"
        assert build_spec("other", "", self.MODELS) == "other"
        assert build_spec("/models/my model", ["--x", "1"], {}) == "'/models/my model' --x 1"

    def test_without_model2spec_any_model_goes(self) -> None:
        assert build_spec("Qwen/Qwen3-0.6B", None, {}) == "Qwen/Qwen3-0.6B"

    def test_unknown_model_lists_the_known_ones(self) -> None:
        proxy = VLLMProxyClient("http://127.0.0.1:1", self.MODELS)
        with pytest.raises(UnknownModelError) as info:
            proxy.switch("nope")  # raised before any request: the proxy is not even there
        message = str(info.value)
        assert "'nope'" in message and "'a/m1'" in message and "'m2'" in message
        assert "args=" in message
        assert isinstance(info.value, ValueError)
        proxy.close()

    def test_catalog_names(self) -> None:
        catalog: dict[str, Any] = {
            "models": {"small": {"model": "org/small", "args": "--max-model-len 4k", "aliases": ["s"]}}
        }
        assert catalog_spec("small", catalog) == "org/small --max-model-len 4k"
        assert catalog_spec("s", catalog) == "org/small --max-model-len 4k"
        assert catalog_spec("big", catalog) is None
        assert catalog_spec("small --x", catalog) is None

    def test_url_and_key_defaults(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AIC_VLLM_PROXY_URL", "gpu-node:8224/")
        monkeypatch.setenv(API_KEY_ENV, "from-env")
        proxy = VLLMProxyClient()
        assert proxy.proxy_url == "http://gpu-node:8224"
        assert proxy.api_key == "from-env"
        client = proxy.get_openai_client(max_retries=0)
        assert str(client.base_url).rstrip("/") == "http://gpu-node:8224/v1"
        assert client.api_key == "from-env" and client.max_retries == 0
        assert client.timeout.read >= 600
        assert VLLMProxyClient(api_key="explicit").get_async_openai_client().api_key == "explicit"
        monkeypatch.delenv(API_KEY_ENV)
        assert VLLMProxyClient("http://x:1").get_openai_client().api_key == "EMPTY"


T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
T1 = T0 + timedelta(minutes=5)


def st(state: ProcessState, spec: str | None = None, started: datetime | None = None, **kw: Any) -> Status:
    running = state in (S.STARTING, S.READY, S.STOPPING)
    return Status(vllm_base="v", running=running, state=state, model_spec=spec, started_at=started, **kw)


class TestSwitchWatch:
    """The switch-following logic alone, fed with made-up statuses (no process, no socket)."""

    def watch(self, spec: str | None, before: Status, **kw: Any) -> tuple[SwitchWatch, list[str]]:
        lines: list[str] = []
        return SwitchWatch(spec, before, sink=lines.append, **kw), lines

    def test_the_previous_ready_model_is_not_the_new_one(self) -> None:
        watch, lines = self.watch("b --x 1", st(S.READY, "a", T0, model="a"))
        watch.begin()
        assert watch.observe(st(S.READY, "a", T0, switching=True, in_flight=2)) is None
        assert watch.observe(st(S.STOPPING, "a", T0, switching=True)) is None
        starting = st(S.STARTING, "b --x 1", T1, switching=True, pid=7, log_path="/l")
        assert watch.observe(starting) is None and watch.wants_log(starting)
        outcome = watch.observe(st(S.READY, "b  --x '1'", T1, ready_at=T1 + timedelta(seconds=42), model="b"))
        assert outcome is not None and outcome.ok and outcome.changed
        result = watch.result(outcome)
        assert result.load_seconds == 42.0 and result.changed
        assert [line.split("] ", 1)[1] for line in lines] == [
            "switching to b --x 1 (replacing a)",
            "waiting for 2 in-flight request(s) of a to finish",
            "stopping a",
            "vLLM started (pid 7), log /l",
        ]

    def test_same_spec_already_loaded(self) -> None:
        watch, _ = self.watch("a", st(S.READY, "a", T0, model="a"))
        assert watch.observe(st(S.READY, "a", T0, switching=True)) is None  # not decided yet
        outcome = watch.observe(st(S.READY, "a", T0, model="a"))
        assert outcome is not None and outcome.ok and not outcome.changed
        assert watch.result(outcome).load_seconds is None

    def test_new_launch_ready_while_another_switch_is_queued(self) -> None:
        watch, _ = self.watch("b", st(S.READY, "a", T0))
        outcome = watch.observe(st(S.READY, "b", T1, switching=True, target_model_spec="c"))
        assert outcome is not None and outcome.ok and outcome.changed

    def test_failures(self) -> None:
        watch, _ = self.watch("b", st(S.READY, "a", T0))
        failed = watch.observe(st(S.FAILED, "b", T1, error="vLLM exited with status 1", exit_code=1))
        assert failed is not None and not failed.ok and failed.has_log
        assert failed.message == "vLLM exited with status 1"
        refused = self.watch("b", st(S.READY, "a", T0))[0].observe(st(S.READY, "a", T0))
        assert refused is not None and not refused.ok and not refused.has_log
        assert "did not happen: a is loaded" in refused.message and "plugin" in refused.message
        vetoed = self.watch("b", st(S.READY, "a", T0))[0].observe(
            st(S.READY, "a", T0, last_switch_error="Switch to b refused by plugin guard: no")
        )
        assert vetoed is not None and not vetoed.ok and not vetoed.has_log
        assert vetoed.message == "the switch to b failed: Switch to b refused by plugin guard: no"
        stopped = self.watch("b", st(S.STOPPED))[0].observe(st(S.STOPPED, "b", T1, exit_code=-15))
        assert stopped is not None and "stopped before it was ready" in stopped.message

    def test_waiting_for_whatever_goes_on(self) -> None:
        watch, _ = self.watch(None, st(S.STARTING, "a", T0, switching=True))
        assert watch.observe(st(S.STARTING, "a", T0, switching=True)) is None
        assert watch.observe(st(S.READY, "a", T0, switching=True)) is None  # another switch queued
        done = watch.observe(st(S.READY, "a", T0, model="a"))
        assert done is not None and done.ok
        nothing = watch.observe(st(S.STOPPED))
        assert nothing is not None and not nothing.ok and "No model is loaded" in nothing.message

    def test_draining(self) -> None:
        """The state "draining" (issue 12): a switch draining the old model is under way (the drain
        is announced); a stop draining is not a ready model for a wait."""
        watch, lines = self.watch("b", st(S.READY, "a", T0, model="a"))
        assert watch.observe(st(S.DRAINING, "a", T0, switching=True, in_flight=3)) is None
        assert [line.split("] ", 1)[1] for line in lines] == [
            "waiting for 3 in-flight request(s) of a to finish"
        ]
        waiting, _ = self.watch(None, st(S.READY, "a", T0, model="a"))
        assert waiting.observe(st(S.DRAINING, "a", T0, model="a", in_flight=1)) is None
        gone = waiting.observe(st(S.STOPPED, "a"))
        assert gone is not None and not gone.ok and "No model is loaded" in gone.message
        shown = "\n".join(status_lines(st(S.DRAINING, "a", T0, model="a", ready_at=T1, in_flight=1)))
        assert "state:" in shown and "draining" in shown and "ready after 300.0 s" in shown

    def test_heartbeat_and_timeout(self) -> None:
        now = [0.0]
        watch, lines = self.watch("b", st(S.STOPPED), timeout=100.0, clock=lambda: now[0])
        watch.observe(st(S.STARTING, "b", T1, switching=True, target_model_spec="b"))
        now[0] = HEARTBEAT_SECONDS - 1
        watch.tick()
        assert lines == [] and not watch.timed_out()
        now[0] = HEARTBEAT_SECONDS + 1
        watch.tick()
        assert lines == [f"[{now[0]:7.1f}s] still waiting: b is starting"]
        now[0] = 101.0
        assert watch.timed_out()

    def test_progress_arguments(self) -> None:
        buffer = io.StringIO()
        sink = make_sink(buffer)
        assert sink is not None
        sink("line")
        assert buffer.getvalue() == "line\n"
        assert make_sink(False) is None and make_sink(None) is None
        assert make_sink(print) is print
        with pytest.raises(TypeError):
            make_sink(42)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the progress display's log filter

#: Lines of a real ``vllm serve`` start (vLLM 0.32 CPU build, tiny Llama; docs/vllm-real-notes.md),
#: some cut short.
REAL_START = (
    "W1127 09:10:33.233000 7530 torch/_library/triton.py:53] Triton not available, find_triton_kernels = []",
    "(APIServer pid=7530) INFO 11-27 09:10:33 [api_utils.py:347] ",
    "(APIServer pid=7530) INFO 11-27 09:10:33 [api_utils.py:347]        █     █     █▄   ▄█",
    "(APIServer pid=7530) INFO 11-27 09:10:33 [api_utils.py:347]  ▄▄ ▄█ █     █     █ ▀▄▀ █  version 0.32.0",
    "(APIServer pid=7530) INFO 11-27 09:10:33 [api_utils.py:347]   █▄█▀ █     █     █     █  model   "
    "/tmp/vw/tiny",
    "(APIServer pid=7530) INFO 11-27 09:10:33 [api_utils.py:347]    ▀▀  ▀▀▀▀▀ ▀▀▀▀▀ ▀     ▀",
    "(APIServer pid=7530) INFO 11-27 09:10:33 [api_utils.py:347] ",
    "(APIServer pid=7530) INFO 11-27 09:10:33 [api_utils.py:286] non-default args: {'model_tag': '/tm"
    "p/vw/tiny', 'host': '127.0.0.1', 'port': 49455, 'model': '/tmp/vw/tiny', 'enforce_ea",
    "(APIServer pid=7530) WARNING 11-27 09:10:33 [system_utils.py:255] Found ulimit of 20000 and fail"
    "ed to automatically increase with error current limit exceeds maximum limit. This ca",
    "(APIServer pid=7530) WARNING 11-27 09:10:41 [vllm.py:1703] Enforce eager set, disabling torch.co"
    "mpile, CUDAGraphs, and JIT kernel warmup. This is equivalent to setting -cc.mode=none",
    "(APIServer pid=7530) WARNING 11-27 09:10:41 [vllm.py:725] Model Runner V2 requires Triton; using"
    " the V1 model runner instead.",
    "(EngineCore pid=7695) INFO 11-27 09:10:47 [core.py:133] Initializing a V1 LLM engine (v0.32.0) w"
    "ith config: model='/tmp/vw/tiny', speculative_config=None, tokenizer='/tmp/vw/tiny', skip_tokeni"
    "zer_init=False, tokenizer_mode=auto, revision=None, tokenizer_revision=None, trust_remote_code=F"
    "alse, dtype=torch.bfloat16, max_seq_len=2048, ... kv_cache_dtype=auto, device_config=cpu, compil"
    "ation_config={'mode': <CompilationMode.NONE: 0>, 'compile_sizes': None, 'cudagraph_capture_sizes"
    "': []}",
    "/work/main/.venv-vllm/lib/python3.11/site-packages/vllm/triton_utils/dispatcher.py:138: FutureWa"
    "rning: `torch.distributed.reduce_op` is deprecated, please use `torch.distributed.Re",
    '  if hasattr(value, "__dict__"):',
    "/work/main/.venv-vllm/lib/python3.11/site-packages/vllm/triton_utils/dispatcher.py:139: FutureWa"
    "rning: `torch.distributed.reduce_op` is deprecated, please use `torch.distributed.Re",
    '  wrapper = lookup(vars(value).get("kernel"))',
    "W1127 09:10:53.715000 7737 torch/_library/triton.py:53] Triton not available, find_triton_kernels = []",
    "[W1127 09:10:54.266339192 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory a"
    "llocation on the NUMA nodes (0). Memory allocations will be strictly bound to these ",
    "(VllmWorker-0 pid=7737) WARNING 11-27 09:10:54 [vllm.py:725] Model Runner V2 requires Triton; us"
    "ing the V1 model runner instead.",
    "(Worker pid=7737) WARNING 11-27 09:10:54 [cpu_worker.py:114] libtcmalloc is not found in LD_PREL"
    "OAD. For best performance, please follow the section `set LD_PRELOAD` in https://doc",
    "(Worker pid=7737) WARNING 11-27 09:10:54 [cpu_worker.py:114] libiomp is not found in LD_PRELOAD."
    " For best performance, please follow the section `set LD_PRELOAD` in https://docs.vl",
    "(Worker pid=7737) INFO 11-27 09:10:54 [cpu_model_runner.py:68] Starting to load model /tmp/vw/tiny...",
    "Loading safetensors checkpoint shards:   0% Completed | 0/1 [00:00<?, ?it/s]",
    "",
    "(Worker pid=7737) WARNING 11-27 09:10:54 [utils.py:333] Attempted to load weight lm_head.weight "
    "with dtype torch.float32 into parameter with dtype torch.bfloat16",
    "(Worker pid=7737) WARNING 11-27 09:10:54 [utils.py:333] Attempted to load weight embed_tokens.we"
    "ight with dtype torch.float32 into parameter with dtype torch.bfloat16",
    "(Worker pid=7737) WARNING 11-27 09:10:54 [utils.py:333] Attempted to load weight layers.0.input_"
    "layernorm.weight with dtype torch.float32 into parameter with dtype torch.bfloat16",
    "(Worker pid=7737) WARNING 11-27 09:10:54 [utils.py:333] Attempted to load weight layers.0.mlp.do"
    "wn_proj.weight with dtype torch.float32 into parameter with dtype torch.bfloat16",
    "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 119.74it/s]",
    "(Worker pid=7737) INFO 11-27 09:10:54 [default_loader.py:501] Loading weights took 0.01 seconds",
    "(EngineCore pid=7695) INFO 11-27 09:10:55 [utils.py:347] Using LBHNC KV cache layout.",
    "(Worker pid=7737) INFO 11-27 09:10:55 [cpu_worker.py:260] Explicitly set (1.0/9.34) GiB for KV c"
    "ache on node 0.",
    "(EngineCore pid=7695) INFO 11-27 09:10:55 [kv_cache_utils.py:2327] CPU KV cache size: 2,097,152 "
    "tokens, Maximum concurrency for 2,048 tokens per request: 1024.00x",
    "(EngineCore pid=7695) INFO 11-27 09:10:59 [core.py:402] init engine (profile, create kv cache, w"
    "armup model) took 3.94 s",
    "(EngineCore pid=7695) WARNING 11-27 09:10:59 [vllm.py:725] Model Runner V2 requires Triton; usin"
    "g the V1 model runner instead.",
    "(EngineCore pid=7695) WARNING 11-27 09:10:59 [vllm.py:1703] Enforce eager set, disabling torch.c"
    "ompile, CUDAGraphs, and JIT kernel warmup. This is equivalent to setting -cc.mode=none",
    "(EngineCore pid=7695) WARNING 11-27 09:10:59 [vllm.py:1727] Inductor compilation was disabled by"
    " user settings, optimizations settings that are only active during inductor compilat",
    "(APIServer pid=7530) INFO 11-27 09:10:59 [entry.py:140] Starting vLLM server on http://127.0.0.1:49455",
    "(APIServer pid=7530) INFO 11-27 09:10:59 [launcher.py:186] Available routes are:",
    "(APIServer pid=7530) INFO 11-27 09:10:59 [launcher.py:195] Route: /openapi.json, Methods: HEAD, GET",
    "(APIServer pid=7530) INFO 11-27 09:10:59 [launcher.py:195] Route: /docs, Methods: HEAD, GET",
    "(APIServer pid=7530) INFO 11-27 09:10:59 [launcher.py:195] Route: /docs/oauth2-redirect, Methods"
    ": HEAD, GET",
    "INFO:     Started server process [7530]",
    "INFO:     Waiting for application startup.",
    "INFO:     Application startup complete.",
    'INFO:     127.0.0.1:57518 - "GET /health HTTP/1.1" 200 OK',
)

#: Lines that vLLM on a GPU writes while it compiles and captures CUDA graphs (as the simulator
#: writes them), and a Python warning.
GPU_PROGRESS = (
    "(EngineCore_DP0 pid=9) INFO 06-02 10:14:40 [backends.py:548] Dynamo bytecode transform time: 9.80 s",
    "(EngineCore_DP0 pid=9) INFO 06-02 10:14:52 [backends.py:215] Compiling a graph for dynamic shape "
    "takes 11.31 s",
    "(EngineCore_DP0 pid=9) INFO 06-02 10:14:58 [monitor.py:34] torch.compile takes 21.11 s in total",
    "(EngineCore_DP0 pid=9) INFO 06-02 10:14:59 [gpu_worker.py:759] Available KV cache memory: 61.37 GiB",
    "(EngineCore_DP0 pid=9) INFO 06-02 10:15:10 [gpu_model_runner.py:6581] Graph capturing finished in "
    "9 secs, took 0.42 GiB",
)
#: A failed start: an error logged by the engine, a traceback on stderr whose exception message
#: goes on over several lines, the API server's own traceback, then an argparse refusal.
FAILED_START = (
    "(EngineCore pid=11) INFO 12-03 13:36:10 [gpu_model_runner.py:5039] Starting to load model broken...",
    "(EngineCore pid=11) ERROR 12-03 13:36:10 [core.py:1510] EngineCore failed to start.",
    "(EngineCore pid=11) ERROR 12-03 13:36:10 [core.py:1510] Traceback (most recent call last):",
    "(EngineCore pid=11) ERROR 12-03 13:36:10 [core.py:1510] torch.OutOfMemoryError: CUDA out of memory.",
    "Process EngineCore:",
    "Traceback (most recent call last):",
    '  File "/usr/local/lib/python3.11/dist-packages/huggingface_hub/utils/_http.py", line 657, in x',
    "    raise _format(RepositoryNotFoundError, message, response) from e",
    "huggingface_hub.errors.RepositoryNotFoundError: 401 Client Error.",
    "",
    "Repository Not Found for url: https://huggingface.co/api/models/broken/revision/main.",
    "Invalid username or password.",
    "(APIServer pid=10) INFO 12-03 13:36:11 [launcher.py:195] Route: /health, Methods: GET",
    "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 1.67it/s]",
    "usage: vllm serve [model_tag] [options]",
    "vllm serve: error: argument --max-model-len: invalid human_readable_int_or_auto value: 'abc'",
    "WARNING:  Invalid HTTP request received.",
)


class TestLogFilter:
    """Which lines of the vLLM log ``switch()`` shows (no process, no socket)."""

    def shown(self, lines: tuple[str, ...], verbose: bool = False) -> list[str]:
        keep = LogFilter(verbose=verbose)
        return [text for text in map(keep, lines) if text is not None]

    def test_a_real_start_shows_progress_and_warnings_only(self) -> None:
        shown = self.shown(REAL_START)
        hidden = ("█", "non-default args", "Initializing a V1 LLM engine", "Route:", "Available routes",
                  "Loading safetensors", "if hasattr", "Started server", '"GET /health', "LBHNC")  # fmt: skip
        assert not [line for line in shown if any(word in line for word in hidden)]
        once = ("Starting to load model", "Loading weights took", "GiB for KV cache", "CPU KV cache size",
                "init engine", "Application startup complete", "Found ulimit", "NUMA binding", "libtcmalloc",
                "libiomp", "dispatcher.py:138: FutureWarning", "dispatcher.py:139: FutureWarning",
                # repeated by every vLLM process: shown once
                "Triton not available", "Model Runner V2 requires Triton", "Enforce eager set")  # fmt: skip
        assert {word: sum(word in line for line in shown) for word in once} == dict.fromkeys(once, 1)
        # many different warnings from one place: two, then a note
        assert sum("Attempted to load weight" in line for line in shown) == WARNINGS_PER_SITE
        assert "(more warnings from [utils.py:333] hidden: verbose=True or --verbose shows them)" in shown
        assert len(shown) <= len(REAL_START) // 2
        assert self.shown(REAL_START, verbose=True) == list(REAL_START)

    def test_compile_memory_and_graph_capture_are_progress(self) -> None:
        assert self.shown(GPU_PROGRESS) == list(GPU_PROGRESS)

    def test_errors_and_tracebacks_are_shown(self) -> None:
        shown = self.shown(FAILED_START)
        assert shown == [
            line for line in FAILED_START
            if line and "Route:" not in line and "Loading safetensors" not in line
            and line not in ("Process EngineCore:", "usage: vllm serve [model_tag] [options]")
        ]  # fmt: skip
        assert "Invalid username or password." in shown  # the exception's message, to its end
        assert self.shown(FAILED_START, verbose=True) == list(FAILED_START)


def test_the_client_imports_no_server_code() -> None:
    code = (
        "import sys, aic_vllm_proxy.client.cli; "
        "from aic_vllm_proxy.client import VLLMProxyClient, AsyncVLLMProxyClient; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'aic_vllm_proxy')))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = {name.strip("[]',") for name in run.stdout.split()}
    client_modules = {name for name in loaded if name.startswith("aic_vllm_proxy.client.")}
    # The pure modules the proxy shares with it (spec.py reads vLLM's flag table, vllm_flags.py;
    # the connection file's format).
    assert loaded - client_modules == {
        "aic_vllm_proxy", "aic_vllm_proxy.client", "aic_vllm_proxy.schemas", "aic_vllm_proxy.spec",
        "aic_vllm_proxy.catalog", "aic_vllm_proxy.vllm_flags", "aic_vllm_proxy.connection_file",
    }  # fmt: skip
    assert client_modules == {
        f"aic_vllm_proxy.client.{m}"
        for m in ("aio", "calls", "cli", "connection", "errors", "progress", "sse", "sync", "views")
    }


async def test_unreachable_proxy_says_so_with_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    sync = VLLMProxyClient(url)
    with pytest.raises(ProxyUnreachable) as info:
        await asyncio.to_thread(sync.status)
    assert url in str(info.value) and "cannot reach" in str(info.value)
    assert "proxy_url=" in str(info.value) and URL_ENV in str(info.value)  # how to set it, in Python
    async with AsyncVLLMProxyClient(url) as client:
        with pytest.raises(ProxyUnreachable, match=re.escape(url)):
            await client.switch("m", "")


async def test_a_url_ending_in_v1_is_the_proxy_with_a_warning(
    make_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The openai habit (``http://host:8224/v1``) would call ``/v1/status`` (vLLM's 404, or "No
    model is loaded"): the client drops the ``/v1`` and says so."""
    proxy = await make_proxy()
    with pytest.warns(UserWarning, match=r"drop /v1 from the proxy URL") as caught:
        client = VLLMProxyClient(f"{proxy.url}/v1/", progress=False)
    assert caught[0].filename == __file__  # points at the caller's line
    assert client.proxy_url == proxy.url
    assert (await asyncio.to_thread(client.status))["state"] == "stopped"
    result = await asyncio.to_thread(client.switch, "m", FAST)
    assert result.changed and result.status.state is S.READY
    assert str(client.get_openai_client().base_url).rstrip("/") == f"{proxy.url}/v1"
    client.close()

    monkeypatch.setenv(URL_ENV, f"{proxy.url}/v1")
    with pytest.warns(UserWarning, match="drop /v1"):
        from_env = AsyncVLLMProxyClient()
    async with from_env:
        assert from_env.proxy_url == proxy.url and (await from_env.status()).state is S.READY
        await from_env.stop()


# ------------------------------------------------------------------ in-process proxy


async def test_async_client_every_method(make_proxy: Any) -> None:
    proxy = await make_proxy()
    lines: list[str] = []
    async with AsyncVLLMProxyClient(proxy.url, {"tiny": f"{FAST} --served-model-name tiny-chat"}) as client:
        assert (await client.health())["status"] == "ok"
        assert (await client.status()).state is S.STOPPED
        assert await client.model_name() is None
        with pytest.raises(ProxyError) as no_log:
            await client.logs()
        assert no_log.value.status_code == 404 and "No vLLM log yet" in str(no_log.value)

        result = await client.switch("tiny", progress=lines.append)
        assert result.changed and result.load_seconds is not None and result.load_seconds > 0
        assert result.status.state is S.READY and result.status.model == "tiny-chat"
        assert await client.model_name() == "tiny-chat"
        assert lines[-1].endswith(f"(loading took {result.load_seconds:.1f} s)")
        assert all(ELAPSED.match(line) for line in lines)

        whole = await client.logs()
        assert whole.startswith("# aic-vllm-proxy") and "tiny" in whole
        assert (await client.logs(lines=3)).splitlines() == whole.splitlines()[-3:]
        assert (await client.wait_until_ready(timeout=10)).state is S.READY
        assert await client.plugins() == []
        assert "policy" in await client.catalog()

        openai_client = client.get_async_openai_client()
        reply = await openai_client.chat.completions.create(model="tiny-chat", messages=CHAT)
        assert reply.choices[0].message.content
        stream = await openai_client.chat.completions.create(
            model="tiny-chat",
            messages=CHAT,
            stream=True,
        )
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
        assert "".join(p or "" for p in pieces)
        await openai_client.close()

        stopped = await client.stop()
        assert stopped.state is S.STOPPED and not stopped.running
        assert await client.model_name() is None
        with pytest.raises(ProxyError, match="No model is loaded"):
            await client.wait_until_ready(timeout=5)


@pytest.mark.slow
async def test_sync_client_switch_again_force_and_background(make_proxy: Any) -> None:
    proxy = await make_proxy()
    out = io.StringIO()
    client = VLLMProxyClient(proxy.url, {"m": FAST}, progress=out)
    first = await asyncio.to_thread(client.switch, "m")
    assert first.changed and first.status.model_spec == f"m {FAST}"
    text = out.getvalue()
    assert f"switching to m {FAST}" in text and "vLLM started (pid" in text and "m is ready after" in text
    assert "Application startup complete" in text  # the last start-up line, written just before ready

    again = await asyncio.to_thread(client.switch, "m", progress=False)  # the same spec: no restart
    assert not again.changed and again.load_seconds is None
    assert again.status.started_at == first.status.started_at and "already loaded" in again.message

    forced = await asyncio.to_thread(lambda: client.switch("m", force=True, progress=False))
    assert forced.changed and forced.status.started_at != first.status.started_at

    started = await asyncio.to_thread(client.start_switch, "other", FAST)
    assert started.switching and started.target_model_spec == f"other {FAST}"
    ready = await asyncio.to_thread(client.wait_until_ready, 30)
    assert ready.model == "other" and ready.state is S.READY
    assert await asyncio.to_thread(client.model_name) == "other"
    assert (await asyncio.to_thread(client.stop, force=True)).state is S.STOPPED
    client.close()


async def test_progress_follows_the_new_launch_only(make_proxy: Any) -> None:
    proxy = await make_proxy()
    lines: list[str] = []
    async with AsyncVLLMProxyClient(proxy.url, progress=lines.append) as client:
        await client.switch("model-a", FAST, progress=False)
        result = await client.switch("model-b", f"{FAST} --sim-load-delay 0.8")
    assert result.changed and result.status.model_spec == f"model-b {FAST} --sim-load-delay 0.8"
    assert lines[0].endswith(f"switching to model-b {FAST} --sim-load-delay 0.8 (replacing model-a {FAST})")
    assert any(line.endswith(f"stopping model-a {FAST}") for line in lines)
    started = next(i for i, line in enumerate(lines) if "vLLM started (pid" in line)
    log_lines = lines[started + 1 : -1]
    assert "launching:" in log_lines[0] and "serve model-b" in log_lines[0]  # its log from the top
    assert any("Loading weights took" in line for line in log_lines)
    assert not any("model-a" in line for line in log_lines)  # never the previous model's log
    assert "model-b is ready after" in lines[-1]


async def test_switches_queued_in_order_and_a_wait_for_the_last(make_proxy: Any) -> None:
    """Two background switches: both are listed at once, in order (issue 12), and a wait goes on
    past the first model's ready while the second is still pending, then switch() to a model
    queued behind a load is followed to its own end."""
    proxy = await make_proxy()
    slow, quick = f"model-a {FAST} --sim-load-delay 1", f"model-b {FAST}"
    async with AsyncVLLMProxyClient(proxy.url, progress=False) as client:
        await client.start_switch("model-a", f"{FAST} --sim-load-delay 1")
        second = await client.start_switch("model-b", FAST)
        assert second.switching and second.target_model_spec == slow
        assert second.pending_model_specs == [slow, quick], second
        ready = await client.wait_until_ready(timeout=60)
        assert ready.state is S.READY and ready.model == "model-b" and not ready.pending_model_specs
        await client.start_switch("model-a", f"{FAST} --sim-load-delay 1")
        result = await client.switch("model-c", FAST)  # queued behind model-a's load
        assert result.changed and result.status.model == "model-c", result
        assert result.status.state is S.READY and result.status.pending_model_specs == []


def launched_log(lines: list[str]) -> Path:
    """The log file named by the progress line "vLLM started (pid N), log PATH", checked to be the
    final name (with the pid)."""
    found = [re.search(r"vLLM started \(pid (\d+)\), log (.+)$", line) for line in lines]
    started = [match for match in found if match]
    assert len(started) == 1, lines
    pid, path = started[0].groups()
    assert path.endswith(f"_pid-{pid}.log")
    return Path(path)


@pytest.mark.slow
async def test_progress_shows_what_tells_progress_not_the_whole_log(make_proxy: Any) -> None:
    proxy = await make_proxy()
    lines: list[str] = []
    async with AsyncVLLMProxyClient(proxy.url, progress=lines.append) as client:
        await client.switch("m", FAST)
        shown = [line.split("] ", 1)[1] for line in lines]  # without the elapsed time
        assert not [line for line in shown if "Route:" in line or "█" in line or "non-default args" in line]
        for progress in ("launching:", "Starting to load model", "Loading weights took", "Model loading took",
                         "KV cache memory", "KV cache size", "Graph capturing finished", "init engine",
                         "Application startup complete"):  # fmt: skip
            assert sum(progress in line for line in shown) == 1, (progress, shown)
        assert len(lines) <= 14  # the whole log is about 35 lines more
        assert launched_log(lines).exists()  # the name printed is the file's final name

        everything: list[str] = []
        await client.switch("m", FAST, force=True, progress=everything.append, verbose=True)
        assert sum("Route:" in line for line in everything) >= 5 and any(
            "█" in line for line in everything
        ), everything
        assert len(everything) >= len(lines) + 20
        assert launched_log(everything).exists()

        failed: list[str] = []
        with pytest.raises(SwitchError):
            await client.switch("broken", f"{FAST} --sim-fail-during-load", progress=failed.append)
        assert launched_log(failed).exists()
        assert any("Traceback (most recent call last):" in line for line in failed)
        assert not any("Route:" in line for line in failed)
    async with AsyncVLLMProxyClient(proxy.url, progress=False, verbose=True) as verbose_client:
        every_line: list[str] = []
        await verbose_client.switch("m", FAST, progress=every_line.append)  # the client's default
        assert sum("Route:" in line for line in every_line) >= 5
        await verbose_client.stop()


async def test_a_pid_in_status_comes_with_the_logs_final_name(make_proxy: Any, monkeypatch: Any) -> None:
    """``/status`` shows a pid only with the log's final name (``..._pid-N.log``): the client
    prints both as soon as it sees the pid. The rename runs in a thread; slowed down here (as on
    a busy machine), a pid read from the launch itself came with the log's first name."""
    import aic_vllm_proxy.engine.instance as instance_module

    renamed = instance_module.link_with_pid

    def slow_rename(path: Path, pid: int) -> Path:
        time.sleep(0.5)
        return renamed(path, pid)

    monkeypatch.setattr(instance_module, "link_with_pid", slow_rename)
    proxy = await make_proxy()
    seen: list[tuple[int, str]] = []
    async with AsyncVLLMProxyClient(proxy.url, progress=False) as client:
        # Loading takes 2 s after the rename's 0.5 s: the pid is there to be seen (with FAST,
        # vLLM was often ready as the rename ended, and no status with a pid came before).
        switching = asyncio.ensure_future(client.switch("m", "--sim-import-delay 0.05 --sim-load-delay 2.5"))
        while not switching.done():
            status = await client.status()
            if status.pid is not None:
                seen.append((status.pid, str(status.log_path)))
            await asyncio.sleep(0.02)
        await switching
        await client.stop()
    assert seen, "no status with a pid was seen"
    assert all(path.endswith(f"_pid-{pid}.log") for pid, path in seen), seen


async def test_start_failure_raises_with_the_log_tail(make_proxy: Any) -> None:
    proxy = await make_proxy()
    lines: list[str] = []
    async with AsyncVLLMProxyClient(proxy.url, progress=lines.append) as client:
        with pytest.raises(SwitchError) as info:
            await client.switch("broken", f"{FAST} --sim-fail-during-load")
        error = info.value
        assert error.exit_code == 1 and error.state == "failed"
        assert "vLLM exited with status 1 while starting broken" in error.message
        assert any("CUDA out of memory" in line for line in error.log_tail)
        assert "Last lines of the vLLM log" in str(error) and "CUDA out of memory" in str(error)
        assert any("CUDA out of memory" in line for line in lines)  # shown live too
        assert lines[-1].split("] ", 1)[1].startswith("FAILED: vLLM exited with status 1")
        status = await client.status()
        assert status.state is S.FAILED and status.exit_code == 1
        with pytest.raises(SwitchError, match="status 1"):
            await client.wait_until_ready(timeout=5)


async def test_bad_argument_fails_fast_with_the_tail_shown(make_proxy: Any) -> None:
    proxy = await make_proxy()
    out = io.StringIO()
    client = VLLMProxyClient(proxy.url, progress=out)
    with pytest.raises(SwitchError) as info:
        await asyncio.to_thread(client.switch, "m", f"{FAST} --no-such-flag")
    assert info.value.exit_code == 2
    assert any("unrecognized arguments: --no-such-flag" in line for line in info.value.log_tail)
    assert "unrecognized arguments: --no-such-flag" in out.getvalue()
    client.close()


@pytest.mark.slow
async def test_wait_timeout_leaves_the_switch_going(make_proxy: Any) -> None:
    proxy = await make_proxy()
    client = VLLMProxyClient(proxy.url, progress=False)
    slow = f"{FAST} --sim-load-delay 2.5"
    with pytest.raises(WaitTimeout) as info:
        await asyncio.to_thread(client.switch, "slow", slow, timeout=0.3)
    assert "goes on" in str(info.value) and isinstance(info.value, TimeoutError)
    status = await asyncio.to_thread(client.status)
    assert status.switching and status.target_model_spec == f"slow {slow}"
    with pytest.raises(WaitTimeout):
        await asyncio.to_thread(client.wait_until_ready, 0.2)
    ready = await asyncio.to_thread(client.wait_until_ready, 60)
    assert ready.state is S.READY and ready.model == "slow"
    await asyncio.to_thread(client.stop)
    client.close()


async def test_log_stream_follows_and_ends_with_the_process(make_proxy: Any) -> None:
    proxy = await make_proxy()
    async with AsyncVLLMProxyClient(proxy.url, progress=False) as client:
        await client.switch("m", FAST)
        tail = (await client.logs(lines=4)).splitlines()
        received: list[str] = []

        async def follow() -> None:
            async for line in client.follow_logs(lines=4):
                received.append(line)

        task = asyncio.create_task(follow())
        assert await async_wait_until(lambda: len(received) >= 4, 30), received
        assert received[:4] == tail  # starts with the last N lines, then follows
        assert not task.done()  # still following: vLLM runs
        await client.stop()
        await asyncio.wait_for(task, 10)  # ends cleanly once vLLM has exited
        assert len(received) > 4, received  # it followed: vLLM's shutdown lines came after the tail

        with pytest.raises(ProxyError) as info:
            async for _ in client.follow_logs(lines=0):
                pass
        assert info.value.status_code == 400 and "lines" in str(info.value)


async def test_auth_errors_and_key_passing(make_proxy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = await make_proxy(admin_keys=("admin-secret",), api_keys=("user-secret",))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    async with AsyncVLLMProxyClient(proxy.url) as anonymous:
        with pytest.raises(AuthenticationError) as info:
            await anonymous.status()
    assert info.value.status_code == 401
    assert "No API key was sent" in str(info.value) and API_KEY_ENV in str(info.value)

    wrong = VLLMProxyClient(proxy.url, api_key="wrong")
    with pytest.raises(AuthenticationError, match="API key that was sent was refused"):
        await asyncio.to_thread(wrong.status)

    async with AsyncVLLMProxyClient(proxy.url, api_key="user-secret") as user:
        assert (await user.status()).state is S.STOPPED
        with pytest.raises(PermissionDeniedError, match="admin key"):
            await user.switch("m", FAST)

    monkeypatch.setenv(API_KEY_ENV, "admin-secret")
    async with AsyncVLLMProxyClient(proxy.url, progress=False) as admin:
        result = await admin.switch("m", FAST)
        assert result.status.state is S.READY
        openai_client = admin.get_async_openai_client()
        assert openai_client.api_key == "admin-secret"
        reply = await openai_client.chat.completions.create(model="m", messages=CHAT)
        assert reply.choices[0].message.content
        await openai_client.close()
        await admin.stop()


async def test_catalog_names_and_policy(make_proxy: Any) -> None:
    proxy = await make_proxy(
        models={"small": {"model": "org/small", "args": f"{FAST} --served-model-name small"}},
        model_policy="catalog",
    )
    lines: list[str] = []
    async with AsyncVLLMProxyClient(proxy.url, progress=lines.append) as client:
        result = await client.switch("small", "")  # a catalogue name: the proxy fills in the spec
        assert result.changed and result.status.model == "small"
        assert lines[0].endswith(f"switching to small (org/small {FAST} --served-model-name small)")
        with pytest.raises(PermissionDeniedError, match="catalogue"):
            await client.switch("org/other", FAST)
        await client.stop()


# ------------------------------------------------------------------ proxy subprocess


def test_seed_snippet_verbatim(spawn_proxy: Any, capsys: pytest.CaptureFixture[str]) -> None:
    daemon = spawn_proxy("--vllm-command", f"{SIM} {FAST}")
    gpu_node = daemon.url

    # --- the seed's usage, as written (only the URL and the messages filled in)
    from aic_vllm_proxy.client import VLLMProxyClient

    model2spec = {
        "meta-llama/Llama-2-7b-hf": "--tensor-parallel-size 1 --gpu-memory-utilization 0.9",
        "mistralai/Mistral-7B-Instruct-v0.2": "--tensor-parallel-size 1",
    }
    proxy = VLLMProxyClient(proxy_url=gpu_node, model2spec=model2spec)
    print(proxy.status())
    proxy.switch("meta-llama/Llama-2-7b-hf")
    client = proxy.get_openai_client()
    resp = client.chat.completions.create(model="meta-llama/Llama-2-7b-hf", messages=CHAT)
    # ---

    assert resp.choices[0].message.content
    printed = capsys.readouterr().out
    assert printed.startswith("state: stopped\n")  # print(proxy.status()): readable lines
    assert (
        "switching to meta-llama/Llama-2-7b-hf --tensor-parallel-size 1 --gpu-memory-utilization 0.9"
        in printed
    )
    assert "Loading weights took" in printed and "Route:" not in printed  # progress, not the whole log
    assert "meta-llama/Llama-2-7b-hf is ready after" in printed

    result = proxy.switch("mistralai/Mistral-7B-Instruct-v0.2", progress=False)
    assert result.changed and proxy.model_name() == "mistralai/Mistral-7B-Instruct-v0.2"
    stream = client.chat.completions.create(
        model="mistralai/Mistral-7B-Instruct-v0.2",
        messages=CHAT,
        stream=True,
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert capsys.readouterr().out == ""  # progress=False is silent
    proxy.stop()
    proxy.close()


async def test_sync_client_inside_a_running_event_loop(spawn_proxy: Any) -> None:
    """What Jupyter does: the sync client called straight from a thread whose loop is running."""
    daemon = spawn_proxy()
    asyncio.get_running_loop()  # there is one, as in a notebook cell
    out = io.StringIO()
    with VLLMProxyClient(daemon.url, {"m": FAST}, progress=out) as proxy:
        result = proxy.switch("m")
        assert result.changed and proxy.model_name() == "m"
        assert "m is ready after" in out.getvalue()
        assert "launching:" in proxy.logs()
        lines = proxy.follow_logs(lines=2)
        assert len([next(lines), next(lines)]) == 2
        lines.close()
        assert proxy.stop().state is S.STOPPED


@pytest.mark.slow
def test_examples_run_against_the_simulator(spawn_proxy: Any) -> None:
    daemon = spawn_proxy("--vllm-command", f"{SIM} {FAST}")
    env = {**os.environ, "AIC_VLLM_PROXY_URL": daemon.url}
    env.pop(API_KEY_ENV, None)
    notebook = subprocess.run(
        [sys.executable, str(EXAMPLES / "notebook_switch_and_chat.py")],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert notebook.returncode == 0, notebook.stderr
    out = notebook.stdout
    assert "meta-llama/Llama-2-7b-hf is ready after" in out and "Loading weights took" in out
    assert "mistralai/Mistral-7B-Instruct-v0.2 is ready after" in out
    assert "False - mistralai/Mistral-7B-Instruct-v0.2 is already loaded" in out
    assert "switch failed, exit code 2" in out and out.rstrip().endswith("stopped")

    cells = json.loads((EXAMPLES / "notebook_switch_and_chat.ipynb").read_text())["cells"]
    code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    script = (EXAMPLES / "notebook_switch_and_chat.py").read_text()
    assert [line for line in code.splitlines() if line] == [
        line for line in script.splitlines() if line and not line.startswith("#")
    ]  # the notebook has the script's cells

    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "async_client.py"), "small-model", "--max-model-len", "2048"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "small-model ready (changed=True" in run.stdout and run.stdout.count("Q: ") == 3


def test_the_daemon_starts_without_the_client_extra(tmp_path: Path) -> None:
    """A node may install the daemon without the ``client`` extra: with httpx missing, the
    command line still lists its options and runs the daemon, and the daemon's process holds
    none of the client (its commands are registered without importing it)."""
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "httpx.py").write_text("raise ImportError('httpx is not installed (test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    shown = subprocess.run(
        [sys.executable, "-m", "aic_vllm_proxy", "serve", "--help"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "--vllm-port" in shown.stdout
    code = (
        "import sys; from aic_vllm_proxy import cli; cli.cli.main = lambda **kw: None; cli.main(); "
        "print(sorted(m for m in sys.modules if m.startswith(('httpx', 'aic_vllm_proxy.client.'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert loaded.stdout.strip() == "['aic_vllm_proxy.client.cli']", loaded.stdout
