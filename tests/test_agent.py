"""The agent against a head that misbehaves (issue 17, docs/cluster.md "The agent"): a stand-in
head in this process (an aiohttp server on loopback) says exactly what a test needs, and the
agent runs as a real process with the simulator. Found by review: a stop that came while a
rank was starting was lost (the rank ran on, headless, for ever); a head answering anything
but 401/403 to the handshake killed the agent with a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from helpers import FAST, SIM, free_port, group_members

from aic_vllm_proxy.node_protocol import CONNECT_PATH

LONG = 60.0


def _agent(tmp_path: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIC_VLLM_PROXY_")}
    argv = [
        sys.executable, "-m", "aic_vllm_proxy", "agent", "--head", f"http://127.0.0.1:{port}",
        "--node-name", "node-a", "--vllm-command", SIM, "--log-dir", str(tmp_path / "logs"),
        "--stop-timeout", "3", *options,
    ]  # fmt: skip
    out = open(tmp_path / "agent.out", "wb")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)


async def _serve(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get(CONNECT_PATH, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def _reports(
    ws: web.WebSocketResponse, until: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """The agent's rank reports, up to the first that ``until`` accepts (logs skipped)."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + LONG
    while time.monotonic() < deadline:
        message = await ws.receive(timeout=deadline - time.monotonic())
        data = json.loads(message.data)
        if data["type"] == "rank":
            found.append(data)
            if until(data):
                return found
    raise AssertionError(f"no such report: {found}")


def _start(rank_id: str) -> str:
    args = ["sim-model", *FAST.split(), "-tp", "2", "--nnodes", "2", "--node-rank", "1"]
    args += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--headless"]
    return json.dumps({"type": "start", "id": rank_id, "instance": "x", "rank": 1, "args": args})


def test_a_stop_that_comes_while_the_rank_starts_stops_it_and_an_unknown_one_is_answered(
    tmp_path: Path, vllm_groups: set[int]
) -> None:
    reports: list[dict[str, Any]] = []
    unknown: list[dict[str, Any]] = []

    async def head(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # hello
        await ws.send_str(json.dumps({"type": "welcome", "node": "node-a"}))
        await ws.send_str(_start("x-1-r1"))
        await ws.send_str(json.dumps({"type": "stop", "id": "x-1-r1", "grace": 3}))  # at once
        reports.extend(await _reports(ws, lambda r: r["state"] == "exited"))
        await ws.send_str(json.dumps({"type": "stop", "id": "never-ran", "grace": 3}))
        unknown.extend(await _reports(ws, lambda r: r["id"] == "never-ran"))
        await ws.close()
        return ws

    async def main() -> None:
        runner, port = await _serve(head)
        agent = _agent(tmp_path, port, "--head-timeout", "2")
        try:
            deadline = time.monotonic() + LONG
            while not unknown and time.monotonic() < deadline and agent.poll() is None:
                await asyncio.sleep(0.1)
        finally:
            await runner.cleanup()
            agent.terminate()
            agent.wait(LONG)

    asyncio.run(main())
    output = (tmp_path / "agent.out").read_text()
    assert [r["state"] for r in reports] == ["running", "exited"], output
    vllm_groups.add(reports[0]["pid"])
    assert group_members(reports[0]["pid"]) == []  # reported once its whole group was gone
    assert "the head asked while it started" in output
    assert unknown == [
        {"type": "rank", "id": "never-ran", "state": "exited", "pid": None, "exit_code": None, "error": None}
    ]


def test_a_head_that_answers_503_is_tried_again_until_the_head_timeout(tmp_path: Path) -> None:
    """A proxy or tunnel in front of a restarting head answers 502/503: not the end."""
    tries: list[float] = []

    async def head(request: web.Request) -> web.StreamResponse:
        tries.append(time.monotonic())
        return web.Response(status=503, text="restarting")

    async def main() -> int:
        runner, port = await _serve(head)
        agent = _agent(tmp_path, port, "--head-timeout", "3")
        try:
            return await asyncio.to_thread(agent.wait, LONG)
        finally:
            await runner.cleanup()

    code = asyncio.run(main())
    output = (tmp_path / "agent.out").read_text()
    assert code == 1 and "Traceback" not in output, output
    assert "answered HTTP 503: trying again" in output and "could not be reached" in output
    assert len(tries) >= 2 and tries[-1] - tries[0] >= 2.0
