"""The agent (docs/cluster.md, "A model across nodes"): it connects to the head's
``/nodes/connect`` WebSocket (``node_protocol.py``), runs the ranks the head asks for and tells
the head what becomes of them.

Each rank is run as the head runs vLLM (``engine/launch.py``): in a process group of its own,
its output in a log file of its own (``--log-dir``), with a watchdog that kills the group if
the agent dies, even by SIGKILL. What the rank writes to its log is streamed to the head, and
the report of its exit is sent only once its whole group is gone and its log has been sent.

The agent stops its ranks when the head asks, when it leaves (SIGTERM, SIGINT: it says bye),
and when the head cannot be reached for ``--head-timeout`` seconds; a head that closes the
connection on purpose (it is stopping: "going away") is not waited for. Without a head it
exits: 0 when the head stopped or the agent was told to, 1 when the head was lost or refused it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from pydantic import BaseModel, ValidationError
from yarl import URL

from aic_vllm_proxy import __version__
from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.connection_file import ConnectionInfo
from aic_vllm_proxy.engine.gpus import child_cuda_env
from aic_vllm_proxy.engine.launch import Launch, child_env, describe_exit, spawn_vllm
from aic_vllm_proxy.engine.logs import CHUNK, link_with_pid, open_launch_log
from aic_vllm_proxy.node_protocol import (
    CONNECT_PATH,
    HEAD_MESSAGE,
    HEARTBEAT,
    Bye,
    Hello,
    RankLog,
    RankReport,
    Refused,
    StartRank,
    StopRank,
    Welcome,
)
from aic_vllm_proxy.spec import ModelSpec

log = logging.getLogger(__name__)
#: Seconds between attempts to reach the head.
RETRY = 1.0
SESSION_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
CONNECT_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0)
#: Seconds a connection to the head may take (TCP and the WebSocket handshake).
CONNECT_LIMIT = 10.0
#: Seconds the rest of a rank's group gets after SIGTERM once its leader has exited: nothing is
#: left to drain, and vLLM's orphaned workers ignore SIGTERM (they would hold their GPUs).
LEFTOVER_GRACE = 1.0
#: Seconds between reads of a rank's log for new lines.
LOG_POLL = 0.2


@dataclass
class AgentOptions:
    """How to find the head: ``head`` (a URL), else ``connection_file`` (read at each attempt:
    a head that restarts may listen elsewhere); the key: ``key``, else the file's."""

    head: str | None
    connection_file: Path | None
    key: str | None
    node_name: str
    head_timeout: float
    settings: Settings  # vllm_command, log_dir, stop_timeout, gpus


@dataclass(eq=False)
class LocalRank:
    id: str
    rank: int
    instance: str
    launch: Launch
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # its group is gone
    logged: asyncio.Event = field(default_factory=asyncio.Event)  # its whole log was sent
    exit_told: bool = False

    def report(self) -> RankReport:
        if self.finished.is_set():
            return RankReport(
                id=self.id, state="exited", pid=self.launch.pgid, exit_code=self.launch.exit_code
            )
        return RankReport(id=self.id, state="running", pid=self.launch.pgid)


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.settings = options.settings
        self.ranks: dict[str, LocalRank] = {}
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._leaving = asyncio.Event()
        self._starting: set[str] = set()  # ranks being started (not yet in ranks)
        self._cancelled: set[str] = set()  # of those, the ones the head asked to stop
        self.last_contact = time.monotonic()

    # ---------------------------------------------------------------- the head

    def _head(self) -> tuple[str | None, str | None, str]:
        """(URL, key, where it came from); URL None while the connection file is missing."""
        options = self.options
        if options.head:
            return options.head, options.key, options.head
        path = options.connection_file
        assert path is not None
        try:
            info = ConnectionInfo.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            return None, options.key, str(path)
        return info.url, options.key or info.key, f"{info.url} (from {path})"

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._leaving.set)
        code = 1
        async with aiohttp.ClientSession(timeout=SESSION_TIMEOUT) as session:
            while not self._leaving.is_set():
                url, key, where = self._head()
                outcome = "unreachable"
                if url is not None:
                    try:
                        outcome = await self._session(session, url, key)
                    except aiohttp.WSServerHandshakeError as exc:
                        if exc.status in (401, 403):
                            log.error(
                                "the head at %s refused this agent's key (HTTP %d): give an admin key "
                                "of the head with --api-key or $AIC_VLLM_PROXY_KEY",
                                where,
                                exc.status,
                            )
                            outcome = "refused"
                        else:  # a proxy or tunnel in between, a head restarting: try again
                            log.warning("the head at %s answered HTTP %d: trying again", where, exc.status)
                    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                        log.debug("cannot reach the head at %s: %s", where, exc)
                else:
                    log.debug("no connection file at %s yet", where)
                if outcome in ("going_away", "refused"):
                    code = 0 if outcome == "going_away" else 1
                    break
                if self._leaving.is_set():
                    code = 0
                    break
                silent = time.monotonic() - self.last_contact
                if silent > self.options.head_timeout:
                    log.error(
                        "the head (%s) could not be reached for %.0f s (--head-timeout): stopping "
                        "this node's ranks and exiting",
                        where,
                        silent,
                    )
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._leaving.wait(), RETRY)
            if self._leaving.is_set():
                code = 0
        await self._stop_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return code

    async def _connect(
        self, session: aiohttp.ClientSession, url: str, key: str | None
    ) -> aiohttp.ClientWebSocketResponse[bool] | None:
        """The WebSocket to the head; None when it does not answer within CONNECT_LIMIT s (a
        head that hangs: the kernel takes the connection, nobody answers) or the agent is told
        to leave meanwhile."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        target = URL(url).with_path(CONNECT_PATH)
        connecting = asyncio.ensure_future(
            session.ws_connect(target, headers=headers, heartbeat=HEARTBEAT, timeout=CONNECT_TIMEOUT)
        )
        leaving = asyncio.ensure_future(self._leaving.wait())
        try:
            await asyncio.wait(
                {connecting, leaving}, timeout=CONNECT_LIMIT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            leaving.cancel()
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            return None
        return connecting.result()

    async def _session(self, session: aiohttp.ClientSession, url: str, key: str | None) -> str:
        connected = await self._connect(session, url, key)
        if connected is None:
            return "unreachable"
        async with connected as ws:
            hello = Hello(
                node=self.options.node_name,
                host=socket.gethostname(),
                pid=os.getpid(),
                version=__version__,
                gpus=self.settings.gpus,
                head_timeout=self.options.head_timeout,
                ranks=tuple(rank.report() for rank in self.ranks.values()),
            )
            await ws.send_str(hello.model_dump_json())
            self._ws = ws
            try:
                outcome = await self._listen(ws)
            finally:
                self._ws = None
                self.last_contact = time.monotonic()
        if outcome is None:
            outcome = "going_away" if ws.close_code == aiohttp.WSCloseCode.GOING_AWAY else "lost"
            log.warning(
                "the head closed the connection (%s, code %s)",
                "it is stopping" if outcome == "going_away" else outcome,
                ws.close_code,
            )
        return outcome

    async def _listen(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> str | None:
        leaving = asyncio.ensure_future(self._leaving.wait())
        try:
            while True:
                receive = asyncio.ensure_future(ws.receive())
                await asyncio.wait({receive, leaving}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    # Bye first: the head then counts the ranks as gone with this node, not as
                    # ranks that died on their own.
                    receive.cancel()
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.send_str(Bye(reason="the agent was stopped").model_dump_json())
                    await self._stop_all()
                    await ws.close()
                    return "left"
                frame = receive.result()
                if frame.type is not aiohttp.WSMsgType.TEXT:
                    return None
                self.last_contact = time.monotonic()
                try:
                    message = HEAD_MESSAGE.validate_json(frame.data)
                except ValidationError:
                    log.warning("the head sent a message this agent does not know: %.200s", frame.data)
                    continue
                if isinstance(message, Refused):
                    log.error("the head refused this agent: %s", message.error)
                    return "refused"
                if isinstance(message, Welcome):
                    log.info("joined the head as node %s", message.node)
                    self._tell_unsaid()
                elif isinstance(message, StartRank):
                    self._spawn(self._start(message))
                elif isinstance(message, StopRank):
                    self._spawn(self._stop(message))
        finally:
            leaving.cancel()

    async def _send(self, message: BaseModel) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        try:
            await ws.send_str(message.model_dump_json())
        except (ConnectionError, RuntimeError):
            return False
        return True

    def _tell_unsaid(self) -> None:
        """Exits the head has not heard of yet (they happened while it was away) are in the
        hello; once welcomed they count as told."""
        for rank_id, rank in list(self.ranks.items()):
            if rank.finished.is_set():
                rank.exit_told = True
                del self.ranks[rank_id]

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- the ranks

    async def _start(self, order: StartRank) -> None:
        if order.id in self.ranks or order.id in self._starting:
            return
        self._starting.add(order.id)  # before any await: a stop meanwhile must find it
        try:
            await self._run_rank(order)
        finally:
            self._starting.discard(order.id)
            self._cancelled.discard(order.id)

    async def _run_rank(self, order: StartRank) -> None:
        settings = self.settings
        argv = [*settings.vllm_argv, *order.args]
        path, handle = await asyncio.to_thread(open_launch_log, settings.log_dir, argv)
        env = child_env(settings)
        if order.gpus is not None:
            env.update(child_cuda_env(order.gpus))
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        env.update(order.env)
        try:
            process = await spawn_vllm(argv, handle, env)
        except OSError as exc:
            error = f"cannot run {argv[0]!r} (the agent's --vllm-command): {exc.strerror or exc}"
            await self._send(RankLog(id=order.id, data=f"# {error}\n"))
            await self._send(RankReport(id=order.id, state="exited", error=error))
            return
        finally:
            handle.close()
        model, *args = order.args
        launch = Launch(
            spec=ModelSpec(raw=" ".join(order.args), model=model, args=tuple(args)),
            process=process,
            log_path=path,
            guard_fd=None,
            guard=None,
            upstream_headers={},
            instance=order.instance,
            gpus=order.gpus or (),
        )
        rank = LocalRank(id=order.id, rank=order.rank, instance=order.instance, launch=launch)
        self.ranks[order.id] = rank
        await launch.start_guard(grace=min(settings.stop_timeout, 5.0))
        # Named after its pid, as the head names its launches' logs.
        with contextlib.suppress(OSError):
            launch.log_path = await asyncio.to_thread(link_with_pid, path, process.pid)
            path.unlink()
        path = launch.log_path
        log.info("rank %d of %s runs as pid %d (log %s)", order.rank, order.instance, process.pid, path)
        await self._send(RankReport(id=order.id, state="running", pid=process.pid))
        self._spawn(self._follow_log(rank))
        self._spawn(self._watch(rank))
        if order.id in self._cancelled:  # the head asked to stop it while it was being started
            log.info("stopping rank %d of %s (the head asked while it started)", order.rank, order.instance)
            self._spawn(rank.launch.terminate(grace=settings.stop_timeout))

    async def _watch(self, rank: LocalRank) -> None:
        """Its exit: the rest of its group is stopped, its log sent, then the head is told."""
        launch = rank.launch
        code = await launch.process.wait()
        launch.exit_code = code
        launch.exited.set()
        # What is left of its group: with its leader gone there is nothing to drain.
        await launch.terminate(grace=min(self.settings.stop_timeout, LEFTOVER_GRACE))
        rank.finished.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(rank.logged.wait(), 10.0)
        log.info("rank %d of %s exited with %s", rank.rank, rank.instance, describe_exit(code))
        if await self._send(rank.report()):
            rank.exit_told = True
            self.ranks.pop(rank.id, None)

    async def _follow_log(self, rank: LocalRank) -> None:
        """Send what the rank writes to its log, until its group is gone and the log is read."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            with open(rank.launch.log_path, "rb") as handle:
                while True:
                    data = await asyncio.to_thread(handle.read, CHUNK)
                    if data:
                        await self._send(RankLog(id=rank.id, data=decoder.decode(data)))
                        continue
                    if rank.finished.is_set():
                        break
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(rank.finished.wait(), LOG_POLL)
        except OSError as exc:
            log.warning("cannot read the log of rank %d: %s", rank.rank, exc)
        finally:
            rank.logged.set()

    async def _stop(self, order: StopRank) -> None:
        rank = self.ranks.get(order.id)
        if rank is None:
            if order.id in self._starting:
                self._cancelled.add(order.id)  # stopped as soon as it runs
            else:  # never started here (or long gone): the head may count it as over
                await self._send(RankReport(id=order.id, state="exited"))
            return
        log.info("stopping rank %d of %s (the head asked)", rank.rank, rank.instance)
        await rank.launch.terminate(grace=order.grace)

    async def _stop_all(self) -> None:
        running = [rank for rank in self.ranks.values() if not rank.finished.is_set()]
        if running:
            log.info("stopping %d rank(s)", len(running))
        await asyncio.gather(*(r.launch.terminate(grace=self.settings.stop_timeout) for r in running))
        await asyncio.gather(*(r.finished.wait() for r in running))


def run(options: AgentOptions) -> int:
    """Run the agent until the head is gone or it is told to leave; the exit status."""
    return asyncio.run(Agent(options).run())
