"""The head's routes for agents (docs/cluster.md, "A model across nodes"): ``GET /nodes`` lists
them, ``GET /nodes/connect`` is the WebSocket each agent keeps open (``node_protocol.py``).
What the messages mean is the engine's (``engine/nodes.py``); this module only carries them.

At shutdown (:func:`release_agents`, called by ``server.py`` before aiohttp's cleanup, which
stops reading from every connection), models across nodes are stopped first, while their agents
can still be told to stop their ranks; then the agents' sockets close with "going away", which
tells them the head is gone on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ValidationError

from aic_vllm_proxy.engine.nodes import Node, NodeRefused
from aic_vllm_proxy.node_protocol import AGENT_MESSAGE, HEARTBEAT, Hello, Refused, Welcome
from aic_vllm_proxy.schemas import to_json
from aic_vllm_proxy.web.appkeys import AGENTS, SUPERVISOR

log = logging.getLogger(__name__)
#: Seconds an agent has to say hello once connected.
HELLO_TIMEOUT = 30.0
#: The largest message an agent may send (log chunks are far smaller).
MAX_MESSAGE = 4 * 1024 * 1024


class _Socket:
    """A :class:`~aic_vllm_proxy.engine.nodes.Channel` over one agent's WebSocket."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws

    async def send(self, message: BaseModel) -> None:
        await self.ws.send_str(message.model_dump_json())


async def list_nodes(request: web.Request) -> web.Response:
    """``GET /nodes``: the agents this head knows and the ranks each runs."""
    return web.json_response(to_json(request.app[SUPERVISOR].nodes.statuses()))


async def connect(request: web.Request) -> web.StreamResponse:
    """``GET /nodes/connect``: an agent's WebSocket, for as long as it is connected."""
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    registry = request.app[SUPERVISOR].nodes
    sockets = request.app[AGENTS]
    sockets.add(ws)
    try:
        hello = await _hello(ws)
        if hello is None:
            return ws
        channel = _Socket(ws)
        try:
            node = await registry.joined(hello, channel)
        except NodeRefused as exc:
            await channel.send(Refused(error=str(exc)))
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=b"refused")
            return ws
        try:
            await channel.send(Welcome(node=node.name))
            await _follow(ws, node, request)
        finally:
            registry.disconnected(node, channel)
    finally:
        sockets.discard(ws)
    return ws


async def _hello(ws: web.WebSocketResponse) -> Hello | None:
    try:
        first = await ws.receive(timeout=HELLO_TIMEOUT)
    except asyncio.TimeoutError:
        await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=b"no hello")
        return None
    if first.type is not aiohttp.WSMsgType.TEXT:
        return None
    try:
        message = AGENT_MESSAGE.validate_json(first.data)
    except ValidationError:
        message = None
    if not isinstance(message, Hello):
        await ws.send_str(Refused(error="the first message must be a hello").model_dump_json())
        await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=b"no hello")
        return None
    return message


async def _follow(ws: web.WebSocketResponse, node: Node, request: web.Request) -> None:
    registry = request.app[SUPERVISOR].nodes
    async for frame in ws:
        if frame.type is not aiohttp.WSMsgType.TEXT:
            continue
        try:
            message = AGENT_MESSAGE.validate_json(frame.data)
        except ValidationError as exc:
            log.warning("node %s sent a message that is not one: %s", node.name, exc.errors()[:1])
            continue
        if isinstance(message, Hello):
            continue
        await registry.heard(node, message)


async def release_agents(app: web.Application) -> None:
    """On shutdown: stop the models across nodes (their agents are still connected to be told),
    then close every agent's socket with "going away"."""
    supervisor = app.get(SUPERVISOR)
    if supervisor is not None:
        await supervisor.stop_across_nodes()
    sockets: set[web.WebSocketResponse] = app[AGENTS]
    for ws in list(sockets):
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"the head is stopping")
