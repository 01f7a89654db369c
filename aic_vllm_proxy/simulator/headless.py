"""``vllm serve MODEL --headless``: a rank of a multi-node launch that serves no HTTP
(vLLM 0.32's ``run_headless`` in entrypoints/cli/serve.py).

With ``--node-rank i > 0`` (of ``--nnodes N``) it starts one worker child (the
simulator's engine module in its worker role) that joins rank 0 on the master port and
loads; the process then waits until that worker dies (logged as vLLM's worker monitor
does, exit 0) or a signal stops it (exit 0). It never notices rank 0 going away.

With ``--node-rank 0`` (or one node) vLLM starts a data-parallel engine that waits for a
front-end on the DP RPC port; the simulator logs the same line and waits for a signal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from . import VLLM_VERSION
from .engine_client import EngineProcess
from .logfmt import ProcessLog
from .multinode import (
    DP_RPC_PORT,
    headless_count_error,
    headless_count_traceback,
    headless_launch_traceback,
    inferred_rank_line,
    launch_error,
    world_size,
)
from .runner import ModelNotFound, _model_error, resolve_model


async def run_headless(args: argparse.Namespace) -> int:
    log = ProcessLog("MainProcess")
    refused = headless_count_error(args)
    if refused is not None:
        log.raw(headless_count_traceback(refused))
        return 1
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, on_signal)
    try:
        arch, max_model_len = resolve_model(args.model, args.max_model_len)
    except ModelNotFound:
        log.raw(_model_error(args.model))
        return 1
    log.info("model.py:733", f"Resolved architecture: {arch}")
    log.info("model.py:2152", f"Using max model len {max_model_len}")
    if args.nnodes > 1:
        error = launch_error(args)
        if error is not None:
            log.raw(headless_launch_traceback(*error))
            return 1
        log.info("arg_utils.py:2472", inferred_rank_line(args))
    if args.nnodes <= 1 or args.node_rank == 0:
        port = args.data_parallel_rpc_port or DP_RPC_PORT
        log.info(
            "serve.py:239",
            f"Launching 1 data parallel engine(s) in headless mode, with head node address "
            f"tcp://{args.master_addr}:{port}.",
        )
        await stop
        return 0
    log.info(
        "serve.py:224",
        f"Launching vLLM (v{VLLM_VERSION}) headless multiproc executor, with head node address "
        f"{args.master_addr}:{args.master_port} for torch.distributed process group.",
    )
    worker = EngineProcess(
        {
            "role": "worker",
            "model": args.model,
            "tp": args.tensor_parallel_size,
            "nnodes": args.nnodes,
            "node_rank": args.node_rank,
            "master_addr": args.master_addr,
            "master_port": args.master_port,
            "world_size": world_size(args),
            "load_delay": args.sim_load_delay,
            "weights_gib": args.sim_weights_gib,
        }
    )
    worker.start()
    died = asyncio.ensure_future(worker.dead.wait())
    either: set[asyncio.Future[Any]] = {died, stop}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        died.cancel()
    if worker.dead.is_set():
        await worker.terminate(0.0)  # reap it
        log.error(
            "multiproc_executor.py:315",
            f"Worker proc VllmWorker-0 died unexpectedly (exit code: {worker.returncode()}), "
            "shutting down executor.",
        )
        return 0
    await _stop_worker(worker, log)
    return 0


async def _stop_worker(worker: EngineProcess, log: ProcessLog) -> None:
    """vLLM's ``MultiprocExecutor.shutdown`` (multiproc_executor.py:458-507): close the
    death pipe, give the worker 5 s (``VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS``), SIGTERM,
    4 s more, SIGKILL. vLLM's headless worker was seen to need the SIGKILL."""
    log.info("multiproc_executor.py:479", "[shutdown] Executor: waiting for worker exit count=1")
    worker.close_stdin()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(worker.dead.wait(), 5.0)
    if worker.dead.is_set():
        await worker.terminate(0.0)  # reap it
        log.info("multiproc_executor.py:486", "[shutdown] Executor: all workers exited gracefully")
        return
    log.warning(
        "multiproc_executor.py:491",
        "[shutdown] Executor: workers still running after grace period; sending SIGTERM count=1",
    )
    await worker.terminate(4.0)  # SIGTERM, then SIGKILL after 4 s
    if worker.returncode() == -signal.SIGKILL:
        log.warning(
            "multiproc_executor.py:501",
            "[shutdown] Executor: workers still running after SIGTERM; sending SIGKILL count=1",
        )
