"""The simulator's multi-node launch, as vLLM 0.32 does it from outside (docs/simulator.md,
"Multi-node launch"): rank 0 serves HTTP only once every rank joined its master port and
loaded; a ``--headless`` rank serves no HTTP; a rank that goes away fails rank 0's next
step (idle, rank 0 does not notice); a headless rank does not notice rank 0 going away.

Every rank runs in its own process group, SIGKILLed at teardown (``start``).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import test_simulator
from test_simulator import FAST, Sim, alive, free_port

#: test_simulator.py's fixture: simulators started by a test, killed (group and all) after it.
start = test_simulator.start
Start = Callable[..., Sim]


def _ranks(master_port: int, nnodes: int) -> list[str]:
    return [
        *FAST,
        "-tp",
        str(nnodes),
        "--nnodes",
        str(nnodes),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(master_port),
    ]


def _sockets(pids: list[int]) -> list[tuple[str, int]]:
    """(state, local port) of the TCP sockets of ``pids`` (from /proc): state ``0A`` is
    LISTEN, ``08`` CLOSE_WAIT (the peer has closed its end)."""
    inodes = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir() if fd_dir.exists() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                found.append((fields[3], int(fields[1].rsplit(":", 1)[1], 16)))
    return found


def _listening(pids: list[int]) -> set[int]:
    return {port for state, port in _sockets(pids) if state == "0A"}


def _complete(sim: Sim) -> tuple[int, dict[str, object]]:
    body = json.dumps({"model": "sim-model", "prompt": "hi", "max_tokens": 3}).encode()
    request = urllib.request.Request(sim.url + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_rank_0_serves_once_every_rank_joined_and_dies_at_the_step_after_one_left(start: Start) -> None:
    master = free_port()
    ranks = _ranks(master, 3)
    rank0 = start(*ranks, "--node-rank", "0")
    rank0.wait_for_line("world_size=3 rank=0 local_rank=0 distributed_init_method=tcp://127.0.0.1:")
    rank1 = start(*ranks, "--node-rank", "1", "--headless")
    rank1.wait_for_line("Model loading took", timeout=30)  # joined and loaded
    assert master in _listening(rank0.group())  # the master port: rank 0's EngineCore
    assert rank0.health() is None, "rank 0 listens before rank 2 joined"
    assert "Starting vLLM server" not in rank0.output()
    rank2 = start(*ranks, "--node-rank", "2", "--headless")
    rank0.wait_healthy(timeout=30)
    assert _complete(rank0)[0] == 200

    out = rank1.output()
    assert "Launching vLLM (v0.32.0) headless multiproc executor, with head node address " in out
    assert f"127.0.0.1:{master} for torch.distributed process group." in out
    assert "Inferred data_parallel_rank 0 from node_rank 1" in out
    assert "(MainProcess pid=" in out and "non-default args" not in out and "█" not in out
    for headless in (rank1, rank2):  # no HTTP at all: nothing listens in its process group
        assert headless.health() is None and _listening(headless.group()) == set()

    os.killpg(rank2.pid, signal.SIGKILL)
    rank2.wait_exit()
    # Idle, vLLM notices nothing: /health stays 200 until a step needs rank 2.
    assert rank0.health() == 200
    status, body = _complete(rank0)
    assert status == 500
    assert body["error"] == {
        "message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
    assert rank0.health() in (503, None)  # 503 until it exits
    assert rank0.wait_exit(timeout=30) == 0
    out = rank0.output()
    assert "Connection closed by peer [127.0.0.1]:" in out
    assert "RuntimeError: Worker failed with error '" in out
    assert "EngineDeadError" in out


def test_headless_rank_outlives_rank_0_and_stops_on_sigterm(start: Start) -> None:
    master = free_port()
    ranks = _ranks(master, 2)
    rank0 = start(*ranks, "--node-rank", "0")
    rank1 = start(*ranks, "--node-rank", "1", "--headless")
    rank0.wait_healthy(timeout=30)
    worker = next(pid for pid in rank1.group() if pid != rank1.pid)
    assert Path(f"/proc/{worker}/comm").read_text().strip() == "VLLM::Worker_TP"
    rank1.wait_for_line("Model loading took")
    lines = len(rank1.output().splitlines())
    rank0.kill_group()
    # The worker's connection to the master port sees rank 0's end (CLOSE_WAIT) and, like
    # vLLM's headless worker (it waits on a message queue that never times out), logs
    # nothing and keeps running.
    deadline = time.monotonic() + 30
    while "08" not in {state for state, _ in _sockets([worker])}:
        assert time.monotonic() < deadline, _sockets([worker])
        time.sleep(0.05)
    assert alive(rank1.pid) and alive(worker)
    assert len(rank1.output().splitlines()) == lines
    # SIGTERM: vLLM's executor closes the worker's death pipe, waits 5 s, SIGTERMs it
    # (which does not stop it), waits 4 s and SIGKILLs it; the rank then exits 0.
    os.kill(rank1.pid, signal.SIGTERM)
    assert rank1.wait_exit(timeout=60) == 0
    new = [line.split("] ", 1)[1] for line in rank1.output().splitlines()[lines:]]
    assert new == [
        "[shutdown] Executor: waiting for worker exit count=1",
        "Parent process exited, terminating worker queues",
        "[shutdown] Executor: workers still running after grace period; sending SIGTERM count=1",
        "[shutdown] Executor: workers still running after SIGTERM; sending SIGKILL count=1",
    ], rank1.output()
    assert not alive(worker)


NODE_RANK = (
    ["--nnodes", "2", "-tp", "2", "--node-rank", "2"],
    "ValueError: Invalid data-parallel launch options: `--node-rank` must be between 0 and 1; "
    "got `--node-rank 2`. Set it to this node's zero-based index.",
)
WORLD_SIZE = (
    ["--nnodes", "2", "-tp", "3"],
    "ValueError: Invalid data-parallel launch options: `--nnodes 2` must evenly divide the total "
    "world size (3). Adjust `--nnodes`, `--data-parallel-size`, `--pipeline-parallel-size`, "
    "`--tensor-parallel-size`, or `--prefill-context-parallel-size`.",
)
BACKEND = (
    ["--nnodes", "2", "-tp", "2", "--data-parallel-backend", "ray"],
    "ValueError: Invalid data-parallel launch options: `--nnodes 2` requires "
    "`--data-parallel-backend mp`; got `--data-parallel-backend ray`. Use the MP backend or "
    "set `--nnodes 1`.",
)
COUNT = (
    ["--headless", "--api-server-count", "1"],
    "ValueError: --api-server-count=1 cannot be used with --headless (no API servers are "
    "started in headless mode).",
)
REFUSED = {
    "rank0-node-rank": NODE_RANK,
    "rank0-world-size": WORLD_SIZE,
    "rank0-backend": BACKEND,
    "headless-node-rank": (NODE_RANK[0] + ["--headless"], NODE_RANK[1]),
    "headless-world-size": (WORLD_SIZE[0] + ["--headless"], WORLD_SIZE[1]),
    "headless-count": COUNT,
}


@pytest.mark.parametrize(("flags", "error"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_multinode_flags_exit_1_with_vllms_error(start: Start, flags: list[str], error: str) -> None:
    sim = start(*flags, "--sim-import-delay", "0", model="m")
    assert sim.wait_exit(timeout=30) == 1, sim.output()
    out = sim.output()
    assert out.rstrip().endswith(error), out  # the traceback's last line, on stderr
    assert "Traceback (most recent call last):" in out
    assert "Starting to load model" not in out  # refused before any engine started
    assert ("█" in out) is ("--headless" not in flags)  # no banner on a headless rank


def test_master_port_in_use_fails_rank_0s_engine(start: Start) -> None:
    busy = start(*FAST)  # anything listening: a simulator's own port
    busy.wait_healthy()
    rank0 = start(*_ranks(busy.port, 2), "--node-rank", "0")
    assert rank0.wait_exit(timeout=30) == 1
    out = rank0.output()
    assert f"port: {busy.port}, useIpv6: false, code: -98, name: EADDRINUSE" in out
    assert "Engine core initialization failed. See root cause above." in out


def test_headless_rank_0_waits_for_a_front_end(start: Start) -> None:
    """``--headless`` on node rank 0 is not refused: vLLM takes its data-parallel headless
    path, whose engine waits for a front-end on the DP RPC port (serve.py:235-244)."""
    sim = start(*FAST, "--headless")
    sim.wait_for_line(
        "Launching 1 data parallel engine(s) in headless mode, with head node address tcp://127.0.0.1:29550."
    )
    assert sim.health() is None and _listening(sim.group()) == set()
    os.kill(sim.pid, signal.SIGTERM)
    assert sim.wait_exit(timeout=30) == 0
