"""A model across nodes (issue 17, docs/cluster.md): a head daemon and agents on loopback, as
real processes, running a 3-node model on the simulator (whose rank 0 is ready only once every
rank has joined its master port). Nothing may fail silently: a dead headless rank fails the
model naming its node, a SIGKILLed head leaves no rank behind on the agents' nodes, a SIGKILLed
agent's rank goes with it (its watchdog) and the head reports the node lost.

The agents are given different node names; each stands for a node of a job.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import FAST, SIM, Daemon, free_port, group_members, start_daemon, wait_until
from plugin_env import REPO

from aic_vllm_proxy.catalog import CatalogEntry
from aic_vllm_proxy.client import VLLMProxyClient
from aic_vllm_proxy.spec import ModelSpec, SpecError

AGENT = [sys.executable, "-m", "aic_vllm_proxy", "agent"]
SBATCH = REPO / "examples" / "slurm" / "aic-vllm-proxy.sbatch"
#: A 3-node model: tensor parallel over three ranks, one per node.
SPEC = f"sim-model {FAST} -tp 3 --nnodes 3"
HEAD_TIMEOUT = 4.0
STOP_TIMEOUT = 3.0
#: Deadlines: generous, for a loaded 2-core machine.
LONG = 60.0


@dataclass
class Agent:
    name: str
    process: subprocess.Popen[bytes]
    output: Path

    def read_output(self) -> str:
        return self.output.read_text(errors="replace")


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """Start agents; at the end each gets SIGTERM (it stops its ranks), then SIGKILL."""
    started: list[Agent] = []

    def start(name: str, *options: str, head: str | None = None) -> Agent:
        output = tmp_path / f"agent-{name}.out"
        argv = [
            *AGENT,
            *(["--head", head] if head else []),
            "--node-name", name,
            "--vllm-command", SIM,
            "--log-dir", str(tmp_path / f"logs-{name}"),
            "--head-timeout", str(HEAD_TIMEOUT),
            "--stop-timeout", str(STOP_TIMEOUT),
            *options,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIC_VLLM_PROXY_")}
        with open(output, "wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        agent = Agent(name, process, output)
        started.append(agent)
        return agent

    start.started = started  # type: ignore[attr-defined]
    yield start
    for agent in started:
        if agent.process.poll() is None:
            agent.process.send_signal(signal.SIGTERM)
    for agent in started:
        try:
            agent.process.wait(LONG)
        except subprocess.TimeoutExpired:
            agent.process.kill()
            agent.process.wait()


@pytest.fixture
def head(tmp_path: Path, vllm_groups: set[int]) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def start(*options: str) -> Daemon:
        daemon = start_daemon(tmp_path, "--advertise-host", "127.0.0.1", "--node-wait", "30", *options)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop(timeout=LONG)
        vllm_groups.update(daemon.groups)


def _nodes(daemon: Daemon) -> dict[str, dict[str, Any]]:
    body = daemon.get("/nodes").json()
    return {node["name"]: node for node in body["nodes"]}


def _connected(daemon: Daemon, *names: str) -> bool:
    nodes = _nodes(daemon)
    return all(nodes.get(name, {}).get("state") == "connected" for name in names)


def _rank_pids(daemon: Daemon) -> dict[str, int]:
    """node name -> the pid (and process group) of the rank it runs."""
    return {name: node["ranks"][0]["pid"] for name, node in _nodes(daemon).items() if node["ranks"]}


def _complete(daemon: Daemon) -> httpx.Response:
    body = {"model": "sim-model", "prompt": "hi", "max_tokens": 3}
    return httpx.post(daemon.url + "/v1/completions", json=body, timeout=LONG)


def _metrics(daemon: Daemon) -> dict[str, float]:
    """``GET /proxy/metrics``'s samples: ``name{labels}`` -> value."""
    text = daemon.get("/proxy/metrics").text
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def _gone(pgid: int) -> bool:
    return not group_members(pgid)


def _three_nodes(
    head: Callable[..., Daemon], agents: Callable[..., Agent], *options: str
) -> tuple[Daemon, dict[str, int]]:
    """A head and agents node-a and node-b, the 3-node model loaded: (head, node -> rank pid)."""
    daemon = head(*options)
    for name in ("node-a", "node-b"):
        agents(name, head=daemon.url)
    assert wait_until(lambda: _connected(daemon, "node-a", "node-b"), LONG), daemon.get("/nodes").text
    code, body = daemon.switch(SPEC, timeout=LONG)
    assert code == 200, body
    pids = _rank_pids(daemon)
    assert set(pids) == {"node-a", "node-b"}
    return daemon, pids


#: A plugin that writes down what its hooks are told of the ranks.
RANK_HOOK = """
import json, os
from aic_vllm_proxy.hooks import hookimpl

def _note(ctx):
    ranks = [{**rank, "gpus": list(rank["gpus"])} for rank in ctx.ranks]
    with open(os.environ["RANK_HOOK_OUT"], "a") as out:
        out.write(json.dumps({"event": ctx.event, "ranks": ranks}) + "\\n")

@hookimpl
def post_switch(ctx):
    _note(ctx)

@hookimpl
def on_failure(ctx):
    _note(ctx)
"""


def _events(daemon: Daemon, wanted: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The events ``GET /events`` replays (all kept), up to the first one ``wanted``."""
    found: list[dict[str, Any]] = []
    with httpx.stream(
        "GET", daemon.url + "/events", headers={"Last-Event-ID": "0"}, timeout=LONG
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                found.append(json.loads(line[5:]))
                if wanted(found[-1]):
                    return found
    raise AssertionError(f"no such event in {found}")


def test_a_model_across_three_nodes_serves_and_a_dead_rank_fails_it_naming_its_node(
    head: Callable[..., Daemon], agents: Callable[..., Agent], tmp_path: Path
) -> None:
    (tmp_path / "rank_hook.py").write_text(RANK_HOOK)
    notes = tmp_path / "hooks.jsonl"
    os.environ["RANK_HOOK_OUT"] = str(notes)  # the daemon inherits it
    try:
        daemon, pids = _three_nodes(head, agents, "--plugin", "rank_hook")
    finally:
        del os.environ["RANK_HOOK_OUT"]
    status = daemon.status()
    assert status["state"] == "ready"
    nodes = _nodes(daemon)
    assert [(r["rank"], r["state"]) for r in nodes["node-a"]["ranks"]] == [(1, "running")]
    assert [(r["rank"], r["state"]) for r in nodes["node-b"]["ranks"]] == [(2, "running")]
    # Rank 0 is the head's: it leads, the others join it headless.
    head_argv = Path(f"/proc/{status['pid']}/cmdline").read_bytes().split(b"\0")
    assert head_argv[head_argv.index(b"--node-rank") :][:2] == [b"--node-rank", b"0"]
    rank_argv = Path(f"/proc/{pids['node-b']}/cmdline").read_bytes().split(b"\0")
    assert b"--headless" in rank_argv and rank_argv[rank_argv.index(b"--node-rank") + 1] == b"2"
    assert _complete(daemon).status_code == 200
    # A rank's log, through the head (its copy, streamed by the agent).
    tail = daemon.get("/logs/tail?lines=200&rank=2")
    assert tail.status_code == 200 and "node_rank 2" in tail.text, tail.text
    assert daemon.get("/logs/tail?rank=7").status_code == 404
    metrics = _metrics(daemon)
    for node in ("node-a", "node-b"):
        assert metrics[f'aic_proxy_node_state{{node="{node}",state="connected"}}'] == 1.0
        assert metrics[f'aic_proxy_node_state{{node="{node}",state="lost"}}'] == 0.0
        assert metrics[f'aic_proxy_node_ranks{{node="{node}"}}'] == 1.0

    os.kill(pids["node-b"], signal.SIGKILL)  # rank 2's leader, on "node-b"

    assert wait_until(lambda: daemon.status()["state"] == "failed", LONG), daemon.status()
    error = daemon.status()["error"]
    assert "rank 2 on node node-b" in error and "SIGKILL" in error and "every rank was stopped" in error, (
        error
    )
    # No rank left anywhere: rank 0 here, rank 1 on node-a (stopped by its agent), rank 2.
    assert wait_until(lambda: all(_gone(pid) for pid in [status["pid"], *pids.values()]), LONG)
    assert not any(node["ranks"] for node in _nodes(daemon).values())
    metrics = _metrics(daemon)
    assert metrics['aic_proxy_rank_failures_total{model="sim-model",node="node-b",reason="died"}'] == 1.0
    assert not any(key.startswith("aic_proxy_rank_failures_total{") and "node-a" in key for key in metrics)
    assert (
        metrics['aic_proxy_node_ranks{node="node-a"}'] == metrics['aic_proxy_node_ranks{node="node-b"}'] == 0
    )
    # What the events say: each rank's course, the one that died.
    events = _events(daemon, lambda e: e["type"] == "rank" and e["phase"] == "died")
    assert (events[-1]["node"], events[-1]["rank"], events[-1]["model"]) == ("node-b", 2, "sim-model")
    assert {(e["node"], e["phase"]) for e in events if e["type"] == "node"} >= {
        ("node-a", "connected"),
        ("node-b", "connected"),
    }
    # The hooks were told the ranks (post_switch, then on_failure).
    told = [json.loads(line) for line in notes.read_text().splitlines()]
    assert [note["event"] for note in told] == ["post_switch", "on_failure"], told
    assert [(r["rank"], r["node"], r["pid"]) for r in told[0]["ranks"]] == [
        (1, "node-a", pids["node-a"]),
        (2, "node-b", pids["node-b"]),
    ]


def test_sigkill_of_the_head_leaves_no_rank_on_the_agents_nodes(
    head: Callable[..., Daemon], agents: Callable[..., Agent], vllm_groups: set[int]
) -> None:
    daemon, pids = _three_nodes(head, agents)
    started = list(agents.started)  # type: ignore[attr-defined]
    rank0 = daemon.status()["pid"]
    vllm_groups.update([rank0, *pids.values()])

    daemon.process.kill()
    daemon.process.wait()

    # Each agent gives the head --head-timeout s, then stops its rank (--stop-timeout, SIGKILL).
    deadline = HEAD_TIMEOUT + STOP_TIMEOUT + 20.0
    assert wait_until(lambda: all(_gone(pid) for pid in pids.values()), deadline)
    assert wait_until(lambda: _gone(rank0), LONG)  # the head's watchdog
    for agent in started:
        assert agent.process.wait(LONG) == 1  # the head was lost
        assert "could not be reached" in agent.read_output()


def test_sigkill_of_an_agent_takes_its_rank_and_the_head_reports_the_node_lost(
    head: Callable[..., Daemon], agents: Callable[..., Agent]
) -> None:
    daemon = head("--gpus", "7")  # rank 0 takes one GPU: so does each other rank
    agent_a = agents("node-a", "--gpus", "0,1", head=daemon.url)
    agent_b = agents("node-b", "--gpus", "2,3", head=daemon.url)
    assert wait_until(lambda: _connected(daemon, "node-a", "node-b"), LONG)
    code, body = daemon.switch(SPEC, timeout=LONG)
    assert code == 200, body
    pids = _rank_pids(daemon)
    # Placement counts each node's GPUs: the first free one of each agent.
    nodes = _nodes(daemon)
    assert (nodes["node-a"]["gpus_in_use"], nodes["node-b"]["gpus_in_use"]) == (["0"], ["2"])
    for node, gpu in (("node-a", "0"), ("node-b", "2")):
        environ = Path(f"/proc/{pids[node]}/environ").read_bytes().split(b"\0")
        assert f"CUDA_VISIBLE_DEVICES={gpu}".encode() in environ

    agent_b.process.kill()
    agent_b.process.wait()

    assert wait_until(lambda: _gone(pids["node-b"]), LONG)  # its watchdog
    assert wait_until(lambda: daemon.status()["state"] == "failed", LONG), daemon.status()
    error = daemon.status()["error"]
    assert "rank 2 on node node-b" in error and "lost" in error and f"{HEAD_TIMEOUT:g} s" in error, error
    assert _nodes(daemon)["node-b"]["state"] == "lost"
    metrics = _metrics(daemon)
    assert metrics['aic_proxy_node_state{node="node-b",state="lost"}'] == 1.0
    assert metrics['aic_proxy_node_state{node="node-b",state="connected"}'] == 0.0
    assert metrics['aic_proxy_rank_failures_total{model="sim-model",node="node-b",reason="lost"}'] == 1.0
    assert wait_until(lambda: _gone(pids["node-a"]), LONG)
    assert agent_a.process.poll() is None  # the other agent stays, for the next model


def test_a_request_after_an_agent_died_fails_the_model_naming_the_root_cause_and_the_silent_node(
    head: Callable[..., Daemon], agents: Callable[..., Agent]
) -> None:
    """vLLM notices a lost rank at its next step, before the head gives up on the node: the
    request fails, and the model's error says why (rank 0's root cause) and which node is silent."""
    daemon = head()
    agents("node-a", head=daemon.url)
    agent_b = agents("node-b", "--head-timeout", "600", head=daemon.url)  # the head waits long
    assert wait_until(lambda: _connected(daemon, "node-a", "node-b"), LONG)
    code, body = daemon.switch(SPEC, timeout=LONG)
    assert code == 200, body
    pids = _rank_pids(daemon)
    rank0 = daemon.status()["pid"]

    killed_at = datetime.now(timezone.utc)
    agent_b.process.kill()
    agent_b.process.wait()
    assert wait_until(lambda: _gone(pids["node-b"]), LONG)  # its watchdog
    assert wait_until(lambda: _nodes(daemon)["node-b"]["state"] == "disconnected", LONG)
    # Last seen when its connection (pinged) closed, not at its last message.
    assert datetime.fromisoformat(_nodes(daemon)["node-b"]["last_seen"]) > killed_at
    assert daemon.status()["state"] == "ready"  # nothing has told the head yet
    # Rank 0 learns of the lost peer on its own; the first request after that fails.
    assert wait_until(lambda: _complete(daemon).status_code != 200, LONG)
    assert wait_until(lambda: daemon.status()["state"] == "failed", LONG), daemon.status()
    error = daemon.status()["error"]
    assert "Connection closed by peer" in error, error
    assert "rank 2 on node node-b: its agent has not been heard from for" in error, error
    assert "node-a" not in error, error
    assert wait_until(lambda: _gone(rank0) and _gone(pids["node-a"]), LONG)


def test_sigterm_of_the_head_stops_every_rank_and_the_agents_leave(
    head: Callable[..., Daemon], agents: Callable[..., Agent], tmp_path: Path
) -> None:
    connection = tmp_path / "job.json"
    # An agent may start before the head: it waits for the head's connection file.
    agent_a = agents("node-a", "--connection-file", str(connection))
    daemon = head("--connection-file", str(connection))
    agent_b = agents("node-b", head=daemon.url)
    assert wait_until(lambda: _connected(daemon, "node-a", "node-b"), LONG), agent_a.read_output()
    code, body = daemon.switch(SPEC, timeout=LONG)
    assert code == 200, body
    pids = _rank_pids(daemon)
    assert daemon.stop(timeout=LONG) == 0
    assert all(_gone(pid) for pid in pids.values())  # stopped before the head exited
    # The head said it was going away: the agents leave at once, not after --head-timeout.
    for agent in (agent_a, agent_b):
        assert agent.process.wait(LONG) == 0, agent.read_output()
        assert "it is stopping" in agent.read_output()


def test_too_few_nodes_is_a_503_naming_them_and_the_owned_flags_are_refused(
    head: Callable[..., Daemon], agents: Callable[..., Agent]
) -> None:
    daemon = head("--node-wait", "1")
    agents("node-a", head=daemon.url)
    assert wait_until(lambda: _connected(daemon, "node-a"), LONG)
    code, body = daemon.switch(SPEC, timeout=LONG)
    assert code == 503, body
    message = body["error"]["message"]
    assert "spans 3 nodes" in message and "2 agent node(s)" in message and "node-a" in message, message
    assert daemon.status()["state"] == "failed"
    for flag in ("--node-rank 1", "--master-addr h", "--master-port 1", "--headless"):
        code, body = daemon.switch(f"sim-model --nnodes 2 {flag}")
        assert code == 400 and "across nodes" in body["error"]["message"], body


def test_an_agent_with_a_wrong_key_exits_saying_so(
    head: Callable[..., Daemon], agents: Callable[..., Agent]
) -> None:
    daemon = head("--admin-key", "right-key")
    agent = agents("node-a", "--api-key", "wrong-key", head=daemon.url)
    assert agent.process.wait(LONG) == 1
    assert "key" in agent.read_output().lower(), agent.read_output()
    assert (
        httpx.get(daemon.url + "/nodes", headers={"Authorization": "Bearer right-key"}).json()["nodes"] == []
    )


def test_the_catalogue_key_nodes_and_the_spec() -> None:
    entry = CatalogEntry(model="big", args="-tp 8", nodes=2)
    spec = ModelSpec.parse(entry.spec_text)
    assert spec.nnodes == 2
    assert ModelSpec.parse("m -n 4").nnodes == 4
    assert spec.rank_args(1, "head", 29501)[-1] == "--headless"
    with pytest.raises(ValueError, match="set it in one place"):
        CatalogEntry(model="big", args="--nnodes 3", nodes=2)
    with pytest.raises(SpecError, match="--master-port"):
        ModelSpec.parse("m --master-p 5")
    assert json.loads(CatalogEntry(model="m").model_dump_json()) == {
        "model": "m",
        "args": "",
        "aliases": [],
        "description": "",
    }


#: Stands in for srun on this one machine: each task is a local process, its "node" named by
#: SLURMD_NODENAME as srun names it; SIGTERM is passed on to the tasks.
FAKE_SRUN = """#!/bin/bash
tasks=1
while [[ $1 == -* ]]; do
    case $1 in --ntasks=*) tasks=${1#*=} ;; esac
    shift
done
for i in $(seq 1 "$tasks"); do
    SLURMD_NODENAME="fake-node-$i" SLURM_PROCID="$i" "$@" &
done
trap 'kill -TERM $(jobs -p) 2> /dev/null' TERM
while [ -n "$(jobs -pr)" ]; do wait; done
"""


def test_the_sbatch_script_of_a_three_node_job_runs_agents_beside_the_daemon(
    tmp_path: Path, vllm_groups: set[int]
) -> None:
    """``bash aic-vllm-proxy.sbatch`` with the variables of a 3-node job and srun standing in:
    the daemon, two agents (started by "srun --relative=1") that find it by the connection file,
    a catalogue model with ``nodes = 3`` preloaded across them and answering; SIGTERM to bash:
    every rank stopped, the agents gone, exit 0."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[proxy]\nstop_timeout = 3\n\n[models.big]\nmodel = "sim-model"\n'
        f'args = "{FAST} -tp 3"\nnodes = 3\npreload = true\n'
    )
    job, logs = "4242", tmp_path / "logs"
    path = home / ".aic-vllm-proxy" / "jobs" / f"{job}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "AIC_VLLM_PROXY_"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        HOME=str(home),
        SLURM_JOB_ID=job,
        SLURM_JOB_NUM_NODES="3",
        SLURM_SUBMIT_DIR=str(tmp_path),
        AIC_VLLM_PROXY_CMD=f"{sys.executable} -m aic_vllm_proxy",
        AIC_VLLM_PROXY_CONFIG=str(config),
        AIC_VLLM_PROXY_ARGS=f"--simulator --host 127.0.0.1 --vllm-port {free_port()} --log-dir {logs}/head",
        AIC_VLLM_PROXY_AGENT_ARGS=f"--simulator --head-timeout 10 --stop-timeout 3 --log-dir {logs}/agents",
    )
    output = tmp_path / f"aic-vllm-proxy-{job}.out"
    with open(output, "wb") as out:
        script = subprocess.Popen(
            ["bash", str(SBATCH)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )
    try:
        assert wait_until(lambda: path.exists() or script.poll() is not None, LONG), output.read_text()
        with VLLMProxyClient.from_connection_file(path, progress=False) as proxy:

            def ready() -> bool:
                return [i["state"] for i in proxy.status()["instances"] if i["name"] == "big"] == ["ready"]

            assert wait_until(ready, LONG), (proxy.status(), output.read_text())
            (big,) = [i for i in proxy.status()["instances"] if i["name"] == "big"]
            assert sorted(r["node"] for r in big["ranks"]) == ["fake-node-1", "fake-node-2"]
            pgids = [big["pid"], *(r["pid"] for r in big["ranks"])]
            vllm_groups.update(pgids)
            answer = proxy.get_openai_client().completions.create(model="big", prompt="Hi", max_tokens=3)
            assert answer.choices[0].text
        script.send_signal(signal.SIGTERM)
        assert script.wait(LONG) == 0, output.read_text()
        assert all(_gone(pgid) for pgid in pgids) and not path.exists()
        assert "the agents exited" in output.read_text()
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()


def test_an_agent_that_leaves_fails_its_model_and_a_restarted_head_stops_what_it_does_not_know(
    head: Callable[..., Daemon], agents: Callable[..., Agent], tmp_path: Path
) -> None:
    """SIGTERM to an agent: it says so and stops its rank; the model fails with that node named.
    Then a head SIGKILLed and started again on its port within the agents' --head-timeout: the
    agent that comes back reports its rank, which the new head never started, and is told to
    stop it (not left running until the agent gives up on the head)."""
    daemon, pids = _three_nodes(head, agents)
    started = list(agents.started)  # type: ignore[attr-defined]
    by_name = {agent.name: agent for agent in started}
    by_name["node-a"].process.send_signal(signal.SIGTERM)
    assert by_name["node-a"].process.wait(LONG) == 0
    assert wait_until(lambda: daemon.status()["state"] == "failed", LONG), (
        daemon.read_output() + by_name["node-a"].read_output()
    )
    error = daemon.status()["error"]
    assert "rank 1 on node node-a" in error and "its agent left" in error, error
    assert wait_until(lambda: all(_gone(pid) for pid in pids.values()), LONG)

    by_name["node-b"].process.send_signal(signal.SIGTERM)
    assert by_name["node-b"].process.wait(LONG) == 0
    # A patient agent, a model on it, then the head SIGKILLed and back on the same port.
    patient = agents("node-c", "--head-timeout", "300", head=daemon.url)
    assert wait_until(lambda: _connected(daemon, "node-c"), LONG)
    code, body = daemon.switch(f"sim-model {FAST} -tp 2 --nnodes 2", timeout=LONG)
    assert code == 200, body
    rank = _rank_pids(daemon)["node-c"]
    rank0 = daemon.status()["pid"]
    daemon.process.kill()
    daemon.process.wait()
    again = start_daemon(tmp_path, "--advertise-host", "127.0.0.1", port=daemon.port)
    try:
        assert wait_until(lambda: _connected(again, "node-c"), LONG), patient.read_output()
        assert wait_until(lambda: _gone(rank), LONG)  # well before the 300 s of --head-timeout
        assert _nodes(again)["node-c"]["ranks"] == []
        assert wait_until(lambda: _gone(rank0), LONG)  # the first head's watchdog
        assert patient.process.poll() is None
    finally:
        again.stop(timeout=LONG)


def test_a_rank_0_that_ignores_sigterm_is_killed_when_another_rank_dies(
    head: Callable[..., Daemon], agents: Callable[..., Agent]
) -> None:
    """vLLM may not act on SIGTERM (it can be lost while vLLM starts): the model must still fail
    and its rank 0 go (SIGKILL after --stop-timeout), not stay "ready" with a dead rank."""
    daemon = head()
    for name in ("node-a", "node-b"):
        agents(name, head=daemon.url)
    assert wait_until(lambda: _connected(daemon, "node-a", "node-b"), LONG)
    code, body = daemon.switch(f"{SPEC} --sim-ignore-sigterm", timeout=LONG)
    assert code == 200, body
    rank0, pids = daemon.status()["pid"], _rank_pids(daemon)

    os.kill(pids["node-a"], signal.SIGKILL)

    assert wait_until(lambda: daemon.status()["state"] == "failed", LONG), daemon.read_output()
    assert "rank 1 on node node-a" in daemon.status()["error"]
    assert wait_until(lambda: all(_gone(pid) for pid in [rank0, *pids.values()]), LONG)
    assert "still runs" in daemon.read_output() and "sending SIGKILL" in daemon.read_output()


def test_an_agent_that_cannot_run_vllm_fails_the_load_saying_where_and_why(
    head: Callable[..., Daemon], agents: Callable[..., Agent]
) -> None:
    daemon = head()
    agents("node-a", "--vllm-command", "/nonexistent/vllm serve", head=daemon.url)
    assert wait_until(lambda: _connected(daemon, "node-a"), LONG)
    code, body = daemon.switch(f"sim-model {FAST} -tp 2 --nnodes 2", timeout=LONG)
    assert code == 500, body
    message = body["error"]["message"]
    assert "rank 1 on node node-a cannot run '/nonexistent/vllm'" in message, message
    assert "No such file" in message and "every rank was stopped" in message, message
    assert not any(node["ranks"] for node in _nodes(daemon).values())


def test_the_same_agent_may_come_back_on_a_new_connection_but_no_other_may_take_its_name(
    head: Callable[..., Daemon],
) -> None:
    """Its old connection broke without this side noticing yet (no FIN): the same agent (host
    and pid) is taken back on a new one; another agent with that name is refused, told why."""
    daemon = head()

    async def talk() -> list[dict[str, Any]]:
        import aiohttp

        answers: list[dict[str, Any]] = []
        hello = {
            "type": "hello",
            "node": "node-x",
            "host": "h1",
            "pid": 1,
            "version": "t",
            "head_timeout": 30,
        }
        async with aiohttp.ClientSession() as session:
            url = daemon.url + "/nodes/connect"
            async with session.ws_connect(url) as first, session.ws_connect(url) as again:
                await first.send_json(hello)
                answers.append(await first.receive_json(timeout=LONG))
                await again.send_json(hello)  # the same agent, a new connection
                answers.append(await again.receive_json(timeout=LONG))
                async with session.ws_connect(url) as other:
                    await other.send_json({**hello, "pid": 2})
                    answers.append(await other.receive_json(timeout=LONG))
        return answers

    welcome, back, refused = asyncio.run(talk())
    assert welcome == {"type": "welcome", "node": "node-x"} and back == welcome
    assert refused["type"] == "refused" and "node name 'node-x' is taken" in refused["error"]


def test_a_head_that_hangs_is_given_up_after_the_head_timeout(
    head: Callable[..., Daemon], agents: Callable[..., Agent]
) -> None:
    """A head that is alive but answers nothing (SIGSTOP: the kernel still takes connections)
    is a head that cannot be reached: the agent stops its rank and exits 1 (it waited for an
    answer for ever before)."""
    daemon = head()
    agent = agents("node-a", head=daemon.url)
    assert wait_until(lambda: _connected(daemon, "node-a"), LONG)
    code, body = daemon.switch(f"sim-model {FAST} -tp 2 --nnodes 2", timeout=LONG)
    assert code == 200, body
    rank = _rank_pids(daemon)["node-a"]
    daemon.process.send_signal(signal.SIGSTOP)
    try:
        # Its heartbeat, --head-timeout, a connection attempt's 10 s, --stop-timeout: well within.
        assert agent.process.wait(LONG) == 1, agent.read_output()
        assert _gone(rank)
        assert "could not be reached" in agent.read_output()
    finally:
        daemon.process.send_signal(signal.SIGCONT)


def test_an_agent_restarted_under_its_name_fails_the_ranks_the_old_one_ran(
    head: Callable[..., Daemon], agents: Callable[..., Agent]
) -> None:
    """A new agent process under the name of one that died (before its --head-timeout): its
    hello lists none of the old ranks, which are lost at once, so the model fails and the node
    can take the next one (the old rank stayed "running" for ever before)."""
    daemon = head()
    old = agents("node-a", "--head-timeout", "300", head=daemon.url)
    assert wait_until(lambda: _connected(daemon, "node-a"), LONG)
    spec = f"sim-model {FAST} -tp 2 --nnodes 2"
    code, body = daemon.switch(spec, timeout=LONG)
    assert code == 200, body
    old.process.kill()
    old.process.wait()
    agents("node-a", "--head-timeout", "300", head=daemon.url)
    assert wait_until(lambda: daemon.status()["state"] == "failed", LONG), daemon.read_output()
    assert "its agent no longer runs it" in daemon.status()["error"]
    code, body = daemon.switch(spec, timeout=LONG)  # placed on the new agent at once
    assert code == 200, body
