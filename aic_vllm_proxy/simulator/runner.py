"""The API server process: start-up, engine supervision, signals and shutdown, with
the log lines of vLLM 0.32.

Start-up: logo and non-default args; bind the port (not listening: connections are
refused); resolve the model (a missing one fails here, exit 1); start the
EngineCore child and wait for it to load; list the routes; listen; uvicorn's
start-up lines.

SIGTERM/SIGINT: ``[shutdown]`` lines; with ``--shutdown-timeout 0`` in-flight
requests are aborted at once, otherwise they get that many seconds to finish; the
engine is terminated; exit 0.

Engine death: ``/health`` answers 503, in-flight requests are ended (see
``server._on_cut``) and the server exits with ``--sim-exit-code`` after
``--sim-dead-exit-delay`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from . import VLLM_VERSION
from .cli import non_default_args
from .dev import DEV_ROUTES, SECURITY_WARNING, add_dev_routes, dev_mode_enabled
from .engine_client import EngineProcess
from .logfmt import OTEL, PY_SITE, STDLIB, GiB, ProcessLog, traceback_text, uvicorn_level_number
from .multinode import inferred_rank_line, launch_error, server_launch_frames, world_size
from .server import build_app, instance_header, routes_of
from .sleep import GRAPHS_GIB, SleepConfig, visible_devices
from .state import ENGINE_DEAD_MESSAGE, SimConfig, SimState

DEFAULT_MAX_MODEL_LEN = 32768
DEFAULT_MAX_NUM_SEQS = 256
LOGO = (
    "\n"
    "       █     █     █▄   ▄█\n"
    " ▄▄ ▄█ █     █     █ ▀▄▀ █  version {version}\n"
    "  █▄█▀ █     █     █     █  model   {model}\n"
    "   ▀▀  ▀▀▀▀▀ ▀▀▀▀▀ ▀     ▀\n"
)

_ENTRY = f"{PY_SITE}/vllm/entrypoints/launchers/api_server/entry.py"
_ENTRY_FRAMES = [
    ("/usr/local/bin/vllm", 8, "<module>", "sys.exit(main())"),
    (f"{PY_SITE}/vllm/entrypoints/cli/main.py", 120, "main", "args.dispatch_function(args)"),
    (f"{PY_SITE}/vllm/entrypoints/cli/serve.py", 156, "cmd", "uvloop.run(run_server(args))"),
    (_ENTRY, 177, "run_server", "await run_server_worker(listen_address, sock, args, **uvicorn_kwargs)"),
]


def run(args: argparse.Namespace) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_main(args))
    if hasattr(uvloop, "run"):
        return uvloop.run(_main(args))
    uvloop.install()
    return asyncio.run(_main(args))


# -- start-up helpers ---------------------------------------------------------------


class ModelNotFound(Exception):
    pass


#: Architectures that vLLM runs as pooling (embedding) models when ``--runner auto``.
POOLING_ARCHITECTURES = frozenset(
    {"BertModel", "RobertaModel", "XLMRobertaModel", "NomicBertModel", "ModernBertModel", "GteModel"}
)
SUPPORTED_TASKS = {"generate": "['generate']", "pooling": "['token_embed', 'embed']"}


def runner_of(args: argparse.Namespace, arch: str) -> str:
    """``generate`` or ``pooling``, as vLLM picks it from ``--runner``, ``--convert`` and the
    architecture (the pooling runner serves /v1/embeddings and no completions)."""
    if args.runner in ("generate", "draft"):
        return "generate"
    if args.runner == "pooling" or args.convert in ("embed", "classify"):
        return "pooling"
    return "pooling" if arch in POOLING_ARCHITECTURES else "generate"


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~"))


def resolve_model(model: str, max_model_len: int | None) -> tuple[str, int]:
    """(architecture, max_model_len); raises ModelNotFound like a missing repo/dir.

    A path that does not exist (``~`` is not expanded, as in vLLM) or any name
    containing ``nonexistent`` is missing; an existing directory's ``config.json``
    gives the architecture and context length.
    """
    if "nonexistent" in model.lower():
        raise ModelNotFound(model)
    arch: str | None = None
    context: int | None = None
    if _looks_like_path(model):
        path = Path(model)
        if not path.exists():
            raise ModelNotFound(model)
        with contextlib.suppress(OSError, ValueError, TypeError, IndexError, KeyError):
            data = json.loads((path / "config.json").read_text())
            arch = str(data["architectures"][0])
            if isinstance(data.get("max_position_embeddings"), int):
                context = data["max_position_embeddings"]
        # A sentence-transformers model caps the context at its max_seq_length, as vLLM does
        # (all-MiniLM-L6-v2: 512 positions, served with max_model_len 256).
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            limit = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
            if isinstance(limit, int) and limit > 0:
                context = min(context, limit) if context else limit
    if arch is None:
        lowered = model.lower()
        families = [
            ("qwen3", "Qwen3ForCausalLM"),
            ("qwen", "Qwen2ForCausalLM"),
            ("llama", "LlamaForCausalLM"),
            ("mistral", "MistralForCausalLM"),
            ("gemma", "Gemma3ForCausalLM"),
            ("phi", "Phi3ForCausalLM"),
            ("opt", "OPTForCausalLM"),
            ("gpt2", "GPT2LMHeadModel"),
        ]
        arch = next((a for key, a in families if key in lowered), "LlamaForCausalLM")
    return arch, max_model_len or context or DEFAULT_MAX_MODEL_LEN


def _model_error(model: str) -> str:
    """The traceback of vLLM 0.32 for a model it cannot find."""
    hub = f"{PY_SITE}/huggingface_hub"
    frames = [
        *_ENTRY_FRAMES,
        (_ENTRY, 53, "build_async_engine_client", "engine_args = AsyncEngineArgs.from_cli_args(args)"),
        (
            f"{PY_SITE}/vllm/engine/arg_utils.py",
            914,
            "__post_init__",
            "self.model = get_model_path(self.model, self.revision)",
        ),
        (
            f"{PY_SITE}/vllm/transformers_utils/repo_utils.py",
            301,
            "get_model_path",
            "return hf_api().snapshot_download(",
        ),
    ]
    if model.count("/") > 1:
        frames.append((f"{hub}/utils/_validators.py", 133, "validate_repo_id", "raise HFValidationError("))
        final = (
            "huggingface_hub.errors.HFValidationError: Repo id must be in the form "
            f"'repo_name' or 'namespace/repo_name': '{model}'. Use `repo_type` argument if needed."
        )
    elif _looks_like_path(model):
        frames.append((f"{hub}/utils/_validators.py", 139, "validate_repo_id", "raise HFValidationError("))
        final = (
            "huggingface_hub.errors.HFValidationError: Repo id must use alphanumeric chars, "
            "'-', '_' or '.'. The name cannot start or end with '-' or '.' and the maximum "
            f"length is 96: '{model}'."
        )
    elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        frames.append(
            (f"{hub}/_snapshot_download.py", 382, "snapshot_download", "raise LocalEntryNotFoundError(")
        )
        final = (
            "huggingface_hub.errors.LocalEntryNotFoundError: Cannot find an appropriate cached "
            "snapshot folder for the specified revision on the local disk and outgoing "
            "traffic has been disabled. To enable repo look-ups and downloads online, pass "
            "'local_files_only=False' as input."
        )
    else:
        frames.append(
            (
                f"{hub}/utils/_http.py",
                657,
                "hf_raise_for_status",
                "raise _format(RepositoryNotFoundError, message, response) from e",
            )
        )
        final = (
            "huggingface_hub.errors.RepositoryNotFoundError: 401 Client Error. "
            f"(Request ID: Root=1-{hashlib.sha1(model.encode()).hexdigest()[:24]})\n\n"
            f"Repository Not Found for url: https://huggingface.co/api/models/{model}/revision/main.\n"
            "Please make sure you specified the correct `repo_id` and `repo_type`.\n"
            "If you are trying to access a private or gated repo, make sure you are "
            "authenticated. For more details, see "
            "https://huggingface.co/docs/huggingface_hub/authentication\n"
            "Invalid username or password."
        )
    return traceback_text(frames, final)


def _bind(args: argparse.Namespace) -> tuple[socket.socket, str]:
    """Bind without listening, like vLLM's ``create_server_socket``: until the server
    starts, connections are refused."""
    if args.uds:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.uds)
        return sock, f"unix:{args.uds}"
    host = args.host or ""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, args.port))
    except OSError:
        sock.close()
        raise
    shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
    return sock, f"http://{shown}:{args.port}"


def _bind_error(exc: OSError) -> str:
    launcher = f"{PY_SITE}/vllm/entrypoints/launchers/launcher.py"
    return traceback_text(
        [
            *_ENTRY_FRAMES,
            (launcher, 376, "setup_server", "sock = create_server_socket(sock_addr, reuse_port=reuse_port)"),
            (launcher, 335, "create_server_socket", "sock.bind(addr)"),
        ],
        f"OSError: [Errno {exc.errno}] {exc.strerror}",
    )


def _engine_init_error(exit_code: int | None) -> str:
    """What the API server prints when its EngineCore died while starting (vLLM 0.32), then
    Python's resource tracker's warning at exit."""
    client = f"{PY_SITE}/vllm/v1/engine/core_client.py"
    async_llm = f"{PY_SITE}/vllm/v1/engine/async_llm.py"
    frames = [
        *_ENTRY_FRAMES[:3],
        (f"{PY_SITE}/uvloop/__init__.py", 92, "run", "return runner.run(wrapper())"),
        (f"{STDLIB}/asyncio/runners.py", 118, "run", "return self._loop.run_until_complete(task)"),
        (f"{PY_SITE}/uvloop/__init__.py", 48, "wrapper", "return await main"),
        _ENTRY_FRAMES[3],
        (_ENTRY, 195, "run_server_worker", "async with build_async_engine_client("),
        (f"{STDLIB}/contextlib.py", 210, "__aenter__", "return await anext(self.gen)"),
        (_ENTRY, 61, "build_async_engine_client", "async with build_async_engine_client_from_engine_args("),
        (f"{STDLIB}/contextlib.py", 210, "__aenter__", "return await anext(self.gen)"),
        (_ENTRY, 95, "build_async_engine_client_from_engine_args", "async_llm = AsyncLLM.from_vllm_config("),
        (async_llm, 255, "from_vllm_config", "return cls("),
        (async_llm, 184, "__init__", "self.engine_core = EngineCoreClient.make_async_mp_client("),
        (OTEL, 175, "sync_wrapper", "return func(*args, **kwargs)"),
        (client, 167, "make_async_mp_client", "return AsyncMPClient("),
        (OTEL, 175, "sync_wrapper", "return func(*args, **kwargs)"),
        (client, 1120, "__init__", "super().__init__("),
        (client, 682, "__init__", "with launch_core_engines("),
        (f"{STDLIB}/contextlib.py", 144, "__exit__", "next(self.gen)"),
        (f"{PY_SITE}/vllm/v1/engine/utils.py", 1351, "launch_core_engines", "wait_for_engine_startup("),
        (f"{PY_SITE}/vllm/v1/engine/utils.py", 1431, "wait_for_engine_startup", "raise RuntimeError("),
    ]
    tracker = f"{STDLIB}/multiprocessing/resource_tracker.py"
    return (
        traceback_text(
            frames,
            "RuntimeError: Engine core initialization failed. See root cause above. "
            f"Failed core proc(s): {{'EngineCore': {exit_code}}}",
        )
        + f"\n{tracker}:254: UserWarning: resource_tracker: There appear to be 1 leaked "
        "shared_memory objects to clean up at shutdown\n"
        "  warnings.warn('resource_tracker: There appear to be %d '"
    )


def _engine_dead_error() -> str:
    return "AsyncLLM output_handler failed.\n" + traceback_text(
        [
            (
                f"{PY_SITE}/vllm/v1/engine/async_llm.py",
                849,
                "output_handler",
                "outputs = await engine_core.get_output_async()",
            ),
            (
                f"{PY_SITE}/vllm/v1/engine/core_client.py",
                1235,
                "get_output_async",
                "raise self._format_exception(outputs) from None",
            ),
        ],
        f"vllm.v1.engine.exceptions.EngineDeadError: {ENGINE_DEAD_MESSAGE}",
    )


def _fingerprint(args: argparse.Namespace, max_model_len: int) -> str:
    digest = hashlib.sha256(f"{args.model}|{args.dtype}|{max_model_len}".encode()).hexdigest()
    parts = [f"vllm-{VLLM_VERSION}"]
    if args.tensor_parallel_size > 1:
        parts.append(f"tp{args.tensor_parallel_size}")
    if args.pipeline_parallel_size > 1:
        parts.append(f"pp{args.pipeline_parallel_size}")
    return "-".join([*parts, digest[:8]])


def _sim_config(
    args: argparse.Namespace, max_model_len: int, runner: str = "generate", instance: str = ""
) -> SimConfig:
    keys = args.api_key or [os.environ.get("VLLM_API_KEY", "")]
    return SimConfig(
        model=args.model,
        runner=runner,
        served_names=list(args.served_model_name or [args.model]),
        max_model_len=max_model_len,
        api_keys=[k for k in keys if k],
        token_delay=args.sim_token_delay,
        ttft=args.sim_ttft,
        crash_on_request=args.sim_crash_on_request,
        abort_stream=args.sim_abort_stream,
        default_max_tokens=max(1, args.sim_default_max_tokens),
        embedding_dim=max(1, args.sim_embedding_dim),
        max_num_seqs=args.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
        request_id_headers=args.enable_request_id_headers,
        log_requests=args.enable_log_requests,
        fingerprint=_fingerprint(args, max_model_len),
        instance=instance,
        sleep=_sleep_config(args),
    )


def _sleep_config(args: argparse.Namespace) -> SleepConfig:
    return SleepConfig(
        dev_mode=dev_mode_enabled(),
        enabled=args.enable_sleep_mode,
        sleep_delay=args.sim_sleep_delay,
        wake_delay=args.sim_wake_delay,
        reload_delay=args.sim_reload_delay,
        keeps_memory=args.sim_sleep_keeps_memory,
        wake_fails=args.sim_wake_fails,
        wake_hangs=args.sim_wake_hangs,
        weights_bytes=int(args.sim_weights_gib * GiB),
        kv_bytes=int(args.sim_kv_cache_gib * GiB),
        graphs_bytes=0 if args.enforce_eager else int(GRAPHS_GIB * GiB),
        devices=visible_devices(args.tensor_parallel_size * args.pipeline_parallel_size),
    )


def routes_listed(runner: str, dev_mode: bool) -> list[tuple[str, str]]:
    """The routes of the start-up log, in vLLM's order: the dev routes come after /ping."""
    routes = routes_of(runner)
    if not dev_mode:
        return routes
    cut = routes.index(("/ping", "POST")) + 1
    return [*routes[:cut], *DEV_ROUTES, *routes[cut:]]


def _engine_config(args: argparse.Namespace, max_model_len: int) -> dict[str, Any]:
    names = args.served_model_name or [args.model]
    dtype = "torch.bfloat16" if args.dtype in ("auto", "bfloat16") else f"torch.{args.dtype}"
    return {
        "model": args.model,
        "tokenizer": args.tokenizer or args.model,
        "served_name": names[0],
        "revision": args.revision,
        "trust_remote_code": args.trust_remote_code,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "download_dir": args.download_dir,
        "tp": args.tensor_parallel_size,
        "pp": args.pipeline_parallel_size,
        "quantization": args.quantization,
        "enforce_eager": args.enforce_eager,
        "kv_cache_dtype": args.kv_cache_dtype,
        "seed": args.seed,
        "prefix_caching": args.enable_prefix_caching is not False,
        "load_delay": args.sim_load_delay,
        "fail_during_load": args.sim_fail_during_load,
        "never_ready": args.sim_never_ready,
        "die_after": args.sim_engine_die_after,
        "ignore_sigterm": args.sim_ignore_sigterm,
        "weights_gib": args.sim_weights_gib,
        "kv_cache_gib": args.sim_kv_cache_gib,
        "nnodes": args.nnodes,
        "node_rank": args.node_rank,
        "master_addr": args.master_addr,
        "master_port": args.master_port,
        "world_size": world_size(args),
    }


# -- the server's life ----------------------------------------------------------------


class _Server:
    def __init__(self, args: argparse.Namespace, log: ProcessLog) -> None:
        self.args = args
        self.log = log
        self.stop: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.signals = 0
        self.state: SimState | None = None
        self.tasks: set[asyncio.Future[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_signal(self) -> None:
        self.signals += 1
        if self.state is not None:
            self.state.shutting_down = True
            if self.signals > 1:  # a second signal: stop waiting for in-flight requests
                self.state.cut_all("shutdown")
        if not self.stop.done():
            self.stop.set_result("signal")

    def on_engine_death(self) -> None:
        self.spawn(self._engine_died())

    async def _engine_died(self) -> None:
        # A SIGTERM sent to the whole process group reaches the engine too: give our
        # own signal handler a moment to run so that this is not taken for a crash.
        await asyncio.sleep(0.05)
        state = self.state
        if state is None or state.shutting_down or self.stop.done():
            return
        state.engine_dead = True
        state.sleep.detach()
        log = self.log
        log.warning(
            "core_client.py:817",
            "[shutdown] MPClient: engine core exited unexpectedly; starting cleanup",
        )
        self._mpclient_lines("default")
        log.error("async_llm.py:906", _engine_dead_error())
        state.cut_all("engine_dead")
        await asyncio.sleep(self.args.sim_dead_exit_delay)
        if not self.stop.done():
            self.stop.set_result("engine_dead")

    def _mpclient_lines(self, timeout: str) -> None:
        log = self.log
        log.info("core_client.py:770", f"[shutdown] MPClient: start timeout={timeout}")
        log.info("core_client.py:772", "[shutdown] MPClient: stopping engine manager")

    def _mpclient_done(self) -> None:
        log = self.log
        log.info("core_client.py:774", "[shutdown] MPClient: engine manager stopped")
        log.info("core_client.py:775", "[shutdown] MPClient: cleaning up background resources")
        log.info("core_client.py:777", "[shutdown] MPClient: complete")

    async def log_stats(self, state: SimState) -> None:
        while True:
            await asyncio.sleep(10.0)
            line = state.metrics.stats_line()
            if line is not None:
                self.log.info("loggers.py:335", line)

    async def _log_waiting(self) -> None:
        # vLLM logs this at DEBUG level every 10 s; --sim-never-ready shows it (every
        # 2 s) so that a stuck start-up keeps producing output.
        if not self.args.sim_never_ready:
            return
        while True:
            await asyncio.sleep(2.0)
            self.log.log(
                "DEBUG",
                "utils.py:1406",
                "Waiting for 1 local, 0 remote core engine proc(s) to start.",
            )

    async def wait_engine(self, engine: EngineProcess) -> str:
        """'ready', 'dead' or 'signal'."""
        waiter = asyncio.ensure_future(engine.wait_ready())
        waiting_log = asyncio.ensure_future(self._log_waiting())
        either: set[asyncio.Future[Any]] = {waiter, self.stop}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting_log.cancel()
        if self.stop.done():
            waiter.cancel()
            return "signal"
        return "ready" if waiter.result() else "dead"

    async def shutdown(self, reason: str, state: SimState, runner: web.AppRunner, site: web.BaseSite) -> None:
        log = self.log
        state.shutting_down = True
        engine = state.engine
        if reason == "signal":
            timeout = int(self.args.shutdown_timeout)
            mode = "abort" if timeout == 0 else "drain"
            log.info("launcher.py:254", "[shutdown] API server: shutdown triggered")
            log.info(
                "launcher.py:270",
                f"[shutdown] API server: stopping engine client mode={mode} timeout={timeout}s",
            )
            if timeout and state.inflight and self.signals < 2:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(state.idle.wait(), timeout)
            self._mpclient_lines(f"{timeout}s")
            if engine is not None:
                await engine.terminate(timeout, log)
            self._mpclient_done()
            if state.inflight:  # the engine aborted them: streams end with finish_reason "abort"
                state.cut_all("shutdown")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(state.idle.wait(), 1.0)
            log.info("launcher.py:279", "[shutdown] API server: engine client stopped")
            log.info("launcher.py:282", "[shutdown] API server: signalling HTTP server shutdown")
            log.info("launcher.py:304", "[shutdown] API server: shutting down FastAPI HTTP server")
        elif engine is not None:
            self._mpclient_done()
            await engine.terminate(0.0)  # reap it
        log.uvicorn("Shutting down")
        await site.stop()
        log.uvicorn("Waiting for application shutdown.")
        await runner.cleanup()
        log.uvicorn("Application shutdown complete.")
        if reason != "signal":
            log.uvicorn(f"Finished server process [{os.getpid()}]")


def launch_refused(line: int, message: str) -> str:
    """The traceback of rank 0 for a multi-node launch that vLLM refuses."""
    frames = [
        *_ENTRY_FRAMES,
        (_ENTRY, 195, "run_server_worker", "async with build_async_engine_client("),
        (f"{STDLIB}/contextlib.py", 210, "__aenter__", "return await anext(self.gen)"),
        *server_launch_frames(line),
    ]
    return traceback_text(frames, f"ValueError: {message}")


async def _main(args: argparse.Namespace) -> int:
    if args.headless:
        from .headless import run_headless

        return await run_headless(args)
    log = ProcessLog("APIServer")
    log.uvicorn_level = uvicorn_level_number(args.uvicorn_log_level)
    log.access_log = not args.disable_uvicorn_access_log
    loop = asyncio.get_running_loop()
    server = _Server(args, log)
    if args.sim_ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, server.on_signal)
    loop.add_signal_handler(signal.SIGINT, server.on_signal)

    if os.environ.get("VLLM_DISABLE_LOG_LOGO", "0") not in ("", "0"):
        log.info("api_utils.py:347", f"vLLM server version {VLLM_VERSION}, serving model {args.model}")
    else:
        log.info("api_utils.py:347", LOGO.format(version=VLLM_VERSION, model=args.model))
    log.info("api_utils.py:286", f"non-default args: {non_default_args(args)}")
    try:
        if args.sim_startup_bind_fail:
            raise OSError(98, "Address already in use")
        sock, listen_address = _bind(args)
    except OSError as exc:
        log.raw(_bind_error(exc))
        return 1
    try:
        arch, max_model_len = resolve_model(args.model, args.max_model_len)
    except ModelNotFound:
        sock.close()
        log.raw(_model_error(args.model))
        return 1
    log.info("model.py:733", f"Resolved architecture: {arch}")
    if args.enable_sleep_mode:
        log.info("model.py:659", "Enabling cumem allocator because sleep mode requires it.")
    log.info("model.py:2152", f"Using max model len {max_model_len}")
    if args.nnodes > 1:
        refused = launch_error(args)
        if refused is not None:
            sock.close()
            log.raw(launch_refused(*refused))
            return 1
        log.info("arg_utils.py:2472", inferred_rank_line(args))

    model_runner = runner_of(args, arch)
    state = SimState(_sim_config(args, max_model_len, model_runner, instance_header(sock)), log)
    server.state = state
    engine = EngineProcess(_engine_config(args, max_model_len))
    state.engine = engine
    engine.start()
    outcome = await server.wait_engine(engine)
    if outcome != "ready":
        sock.close()
        if outcome == "dead":
            await engine.terminate(0.0)  # reap it (it is exiting): its exit code is reported
            log.raw(_engine_init_error(engine.returncode()))
            return 1
        await engine.terminate(float(args.shutdown_timeout), log)
        return 0
    engine.on_death = server.on_engine_death
    if engine.dead.is_set():
        server.on_engine_death()

    log.info("entry.py:136", f"Supported tasks: {SUPPORTED_TASKS[model_runner]}")
    log.info("entry.py:140", f"Starting vLLM server on {listen_address}")
    app = build_app(state)
    dev_mode = state.config.sleep.dev_mode
    if dev_mode:
        log.warning("__init__.py:44", SECURITY_WARNING)
        add_dev_routes(app)
    log.info("launcher.py:186", "Available routes are:")
    for path, methods in routes_listed(model_runner, dev_mode):
        log.info("launcher.py:195", f"Route: {path}, Methods: {methods}")
    state.sleep.attach(engine.pid)

    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=0.5,
        keepalive_timeout=5.0,  # uvicorn's timeout_keep_alive, as vLLM runs it
    )
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=2048)
    log.uvicorn(f"Started server process [{os.getpid()}]")
    log.uvicorn("Waiting for application startup.")
    await site.start()
    log.uvicorn("Application startup complete.")
    if not args.disable_log_stats:
        server.spawn(server.log_stats(state))

    reason = await server.stop
    await server.shutdown(reason, state, runner, site)
    state.sleep.detach()
    for task in list(server.tasks):
        task.cancel()
    return 0 if reason == "signal" else int(args.sim_exit_code)
