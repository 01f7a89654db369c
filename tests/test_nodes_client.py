"""The clients and the command line on a model across nodes (issue 17, docs/client.md):
``nodes()`` (``GET /nodes``), ``logs(rank=N)`` / ``follow_logs(rank=N)`` and
``aic-vllm-proxy nodes`` / ``logs --rank N``, against a head daemon and two agents on loopback
running the simulator (the fixtures and helpers of test_nodes.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from helpers import FAST, Daemon, wait_until
from test_nodes import LONG, Agent, _connected, _rank_pids, _three_nodes, agents, head  # noqa: F401 (fixtures)

from aic_vllm_proxy.cli import cli
from aic_vllm_proxy.client import AsyncVLLMProxyClient, NodesStatus, ProxyError, VLLMProxyClient
from aic_vllm_proxy.client import cli as client_cli

pytestmark = pytest.mark.timeout(4 * LONG)
#: Environment variables of the client set to nothing, so the caller's shell cannot leak in.
CLEAN_ENV: dict[str, str | None] = {
    "AIC_VLLM_PROXY_URL": None,
    "AIC_VLLM_PROXY_KEY": None,
    "AIC_VLLM_PROXY_CONNECTION_FILE": None,
}


def _invoke(*args: str) -> Result:
    client_cli.register(cli)
    return CliRunner().invoke(cli, list(args), env=CLEAN_ENV, catch_exceptions=False)


def test_the_clients_and_the_command_line_list_the_nodes_and_read_a_ranks_log(
    head: Callable[..., Daemon],  # noqa: F811
    agents: Callable[..., Agent],  # noqa: F811
) -> None:
    daemon, pids = _three_nodes(head, agents)
    url = daemon.url

    with VLLMProxyClient(url, progress=False) as proxy:
        found = proxy.nodes()
        assert isinstance(found, NodesStatus) and found.head == "127.0.0.1"
        by_name = {node.name: node for node in found.nodes}
        assert set(by_name) == {"node-a", "node-b"}
        assert all(node.state == "connected" for node in by_name.values())
        for name, rank in (("node-a", 1), ("node-b", 2)):
            assert [(r.rank, r.node, r.pid, r.state) for r in by_name[name].ranks] == [
                (rank, name, pids[name], "running")
            ]
        model = by_name["node-a"].ranks[0].instance

        assert "node_rank 2" in proxy.logs(lines=50, rank=2)
        assert "node_rank 2" not in proxy.logs(lines=50)  # rank 0's, the daemon's own
        with pytest.raises(ProxyError) as missing:
            proxy.logs(rank=9)
        assert missing.value.status_code == 404 and "No log of rank 9" in missing.value.message
        # The stream sends the last lines at once (rank 1's, with this line), then waits for more.
        assert "node_rank 1" in proxy.logs(lines=50, rank=1)
        assert any("node_rank 1" in line for line in proxy.follow_logs(50, rank=1))

    async def from_async() -> tuple[NodesStatus, str]:
        async with AsyncVLLMProxyClient(url, progress=False) as proxy:
            return await proxy.nodes(), await proxy.logs(lines=50, model=model, rank=1)

    async_nodes, async_log = asyncio.run(asyncio.wait_for(from_async(), LONG))
    assert async_nodes.head == found.head
    assert {(node.name, tuple(r.pid for r in node.ranks)) for node in async_nodes.nodes} == {
        (name, (pid,)) for name, pid in pids.items()
    }
    assert "node_rank 1" in async_log

    result = _invoke("nodes", "--url", url)
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NODE", "STATE", "HOST", "GPUS", "RANKS"]
    assert sorted(row.split()[:2] for row in rows) == [["node-a", "connected"], ["node-b", "connected"]]
    for row, (name, rank) in zip(sorted(rows), (("node-a", 1), ("node-b", 2)), strict=True):
        assert row.endswith(f"{model}#{rank} {pids[name]} running"), row
    body = json.loads(_invoke("nodes", "--url", url, "--json").stdout)
    assert body["head"] == "127.0.0.1" and {node["name"] for node in body["nodes"]} == {"node-a", "node-b"}

    result = _invoke("logs", "--url", url, "--rank", "1", "-n", "50")
    assert result.exit_code == 0 and "node_rank 1" in result.stdout, result.output
    result = _invoke("logs", "--url", url, "--rank", "9")
    assert result.exit_code == 1 and "No log of rank 9" in result.stderr, result.output


def test_a_load_and_a_switch_across_nodes_say_where_each_rank_started(
    head: Callable[..., Daemon],  # noqa: F811
    agents: Callable[..., Agent],  # noqa: F811
    tmp_path: Path,
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f'[models.wide]\nmodel = "sim-model"\nargs = "{FAST} -tp 3"\nnodes = 3\n')
    daemon = head("--config", str(config))
    for name in ("node-a", "node-b"):
        agents(name, head=daemon.url)
    assert wait_until(lambda: _connected(daemon, "node-a", "node-b"), LONG)

    def started(lines: list[str]) -> dict[str, str]:
        """node -> the pid its rank's line gives (the lines without their clock)."""
        found = (
            re.fullmatch(r"rank \d started on node (\S+) \(pid (\d+)\)", line.split("] ", 1)[1])
            for line in lines
        )
        return {match[1]: match[2] for match in found if match}

    lines: list[str] = []
    with VLLMProxyClient(daemon.url, progress=lines.append) as proxy:
        proxy.load("wide", timeout=LONG)
        pids = {name: str(pid) for name, pid in _rank_pids(daemon).items()}
        assert started(lines) == pids and len(pids) == 2, lines
        proxy.unload("wide")
        lines.clear()
        proxy.switch("sim-model", f"{FAST} -tp 3 --nnodes 3", timeout=LONG)
        pids = {name: str(pid) for name, pid in _rank_pids(daemon).items()}
        assert started(lines) == pids and len(pids) == 2, lines
