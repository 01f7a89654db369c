"""The head's view of its agents and of the ranks they run (docs/cluster.md, "A model across
nodes").

A model given ``--nnodes N`` is one instance made of N ranks: rank 0 is an ordinary launch on
the head (``instance.py``); ranks 1..N-1 run on agents, one per node, each placed here by the
GPUs its node has free. The web layer (``web/nodes.py``) carries the agents' WebSockets and
hands each message to :class:`NodeRegistry`; the registry sends commands through a
:class:`Channel`. What it knows:

- :class:`Node`: one agent, in the states of :data:`NODE_MOVES` (connected, disconnected while
  it may come back within its ``head_timeout``, lost when it did not, left when it said bye).
- :class:`RemoteRank`: one rank on an agent, in the states of :data:`RANK_MOVES`. A rank that
  ends without having been asked to stop has *died* (or is *lost* with its node): the
  :class:`RankGroup` of its launch then resolves its ``failure``, and the instance stops every
  rank and reports that node and rank, with its root cause, from the head's copy of its log.

Every state change goes through :meth:`NodeRegistry._move_node` or
:meth:`NodeRegistry._move_rank`: checked against the table, published as a ``node`` or
``rank`` event. They run without awaiting anything, so no other task sees a half-made change.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Protocol

from pydantic import BaseModel

from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.engine.launch import describe_exit
from aic_vllm_proxy.engine.logs import tail_with_cause
from aic_vllm_proxy.events import UNHEARD, EventBus
from aic_vllm_proxy.node_protocol import Bye, Hello, RankLog, RankReport, StartRank, StopRank
from aic_vllm_proxy.schemas import NodesStatus, NodeState, NodeStatus, RankStatus

log = logging.getLogger(__name__)


class RankState(str, enum.Enum):
    RESERVED = "reserved"  # placed on a node, not started yet
    STARTING = "starting"  # asked to start
    RUNNING = "running"  # its process runs
    STOPPING = "stopping"  # asked to stop
    EXITED = "exited"  # ended after it was asked to stop (or was never started)
    DIED = "died"  # ended without being asked: the instance fails
    LOST = "lost"  # its node was lost: the instance fails


N, R = NodeState, RankState
NODE_MOVES: dict[NodeState, frozenset[NodeState]] = {
    N.CONNECTED: frozenset({N.DISCONNECTED, N.LEFT}),
    N.DISCONNECTED: frozenset({N.CONNECTED, N.LOST, N.LEFT}),
    N.LOST: frozenset({N.CONNECTED}),
    N.LEFT: frozenset({N.CONNECTED}),
}
RANK_MOVES: dict[RankState, frozenset[RankState]] = {
    R.RESERVED: frozenset({R.STARTING, R.EXITED}),
    R.STARTING: frozenset({R.RUNNING, R.STOPPING, R.DIED, R.LOST}),
    R.RUNNING: frozenset({R.STOPPING, R.DIED, R.LOST}),
    R.STOPPING: frozenset({R.EXITED, R.LOST}),
    R.EXITED: frozenset(),
    R.DIED: frozenset(),
    R.LOST: frozenset(),
}
ENDED = frozenset({R.EXITED, R.DIED, R.LOST})
FAILED = frozenset({R.DIED, R.LOST})
#: Seconds a stop waits, beyond the grace given to the agent, for the agent to report the end.
STOP_MARGIN = 15.0
TAIL_LINES = 40


class Channel(Protocol):
    """How the head talks to one agent (a WebSocket in ``web/nodes.py``)."""

    async def send(self, message: BaseModel) -> None: ...


class NodeRefused(Exception):
    """An agent that cannot join (its name is taken by a connected agent)."""


class NotEnoughNodes(Exception):
    """A model across nodes found too few agents with room within ``--node-wait``."""


@dataclass(eq=False)
class Node:
    name: str
    host: str
    pid: int
    version: str
    gpus: tuple[str, ...]
    head_timeout: float
    channel: Channel | None
    connected_at: datetime
    state: NodeState = NodeState.CONNECTED
    last_seen: float = field(default_factory=time.monotonic)
    ranks: dict[str, RemoteRank] = field(default_factory=dict)
    #: Ranks its agent still runs that the head is done with (ended while the agent was away,
    #: or from before the head restarted), asked to stop: their GPUs (None: unknown, so all of
    #: them) stay taken until the agent reports their exit.
    stale: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    #: Bumped on each connection: a timer of an older one does not declare a newer one lost.
    generation: int = 0

    @property
    def live_ranks(self) -> list[RemoteRank]:
        return [rank for rank in self.ranks.values() if rank.state not in ENDED]

    @property
    def busy(self) -> bool:
        """It runs a rank (of the head's or a stale one)."""
        return bool(self.live_ranks or self.stale)

    @property
    def gpus_in_use(self) -> set[str]:
        used = {gpu for rank in self.live_ranks for gpu in rank.gpus}
        for gpus in self.stale.values():
            used |= set(self.gpus if gpus is None else gpus)
        return used

    def free_gpus(self) -> list[str]:
        used = self.gpus_in_use
        return [gpu for gpu in self.gpus if gpu not in used]


@dataclass(eq=False)
class RemoteRank:
    id: str
    instance: str
    rank: int
    node: Node
    gpus: tuple[str, ...]
    args: tuple[str, ...]
    log_path: Path
    state: RankState = RankState.RESERVED
    pid: int | None = None
    exit_code: int | None = None
    error: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    log_file: BinaryIO | None = None
    group: RankGroup | None = None

    def status(self) -> RankStatus:
        return RankStatus(
            id=self.id,
            instance=self.instance,
            rank=self.rank,
            node=self.node.name,
            state=self.state.value,
            pid=self.pid,
            exit_code=self.exit_code,
            gpus=list(self.gpus),
            log_path=str(self.log_path),
            error=self.error,
        )

    def describe(self) -> str:
        return f"rank {self.rank} on node {self.node.name}"


@dataclass(eq=False)
class RankGroup:
    """The remote ranks of one launch of a model across nodes."""

    registry: NodeRegistry
    ranks: list[RemoteRank]
    #: The first rank that died or was lost; None once the group was stopped without one.
    failure: asyncio.Future[RemoteRank | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def find(self, rank: int) -> RemoteRank | None:
        return next((r for r in self.ranks if r.rank == rank), None)

    async def start(self) -> None:
        """Ask each agent to start its rank."""
        for rank in self.ranks:
            if rank.state is RankState.RESERVED:
                await self.registry.start_rank(rank)

    async def stop(self, grace: float) -> None:
        """Ask each agent to stop its rank; wait until each one ended (or ``grace`` plus a
        margin: an agent that does not answer stops its ranks itself once it loses the head)."""
        await asyncio.gather(*(self.registry.stop_rank(rank, grace) for rank in self.ranks))
        waits = [rank.ended.wait() for rank in self.ranks if not rank.ended.is_set()]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), grace + STOP_MARGIN)
            except asyncio.TimeoutError:
                left = [r for r in self.ranks if not r.ended.is_set()]
                log.warning(
                    "no word that %s ended within %.0f s of the stop: counted as lost",
                    ", ".join(r.describe() for r in left),
                    grace + STOP_MARGIN,
                )
                for rank in left:
                    self.registry.unanswered(rank)
        for rank in self.ranks:
            self.registry.close_log(rank)
        if not self.failure.done():
            self.failure.set_result(None)

    def ranked(self, rank: RemoteRank) -> None:
        if rank.state in FAILED and not self.failure.done():
            self.failure.set_result(rank)

    def unheard(self) -> list[str]:
        """The live ranks whose agent is out of touch (its node disconnected, not yet lost: a
        lost node's ranks have ended), for the message of a death that vLLM noticed first (a
        rank 0 whose collective failed)."""
        now = time.monotonic()
        return [
            f"{rank.describe()}: its agent has not been heard from for {now - rank.node.last_seen:.0f} s"
            for rank in self.ranks
            if rank.node.state is NodeState.DISCONNECTED and rank.state not in ENDED
        ]

    def statuses(self) -> list[RankStatus]:
        return [rank.status() for rank in self.ranks]

    def context(self) -> tuple[dict[str, object], ...]:
        """What hooks are told of the ranks (``HookContext.ranks``)."""
        return tuple(
            {"rank": r.rank, "node": r.node.name, "host": r.node.host, "pid": r.pid, "gpus": r.gpus}
            for r in self.ranks
        )

    async def cause(self, rank: RemoteRank) -> tuple[str, list[str]]:
        """Why ``rank`` failed (one line naming its node, with its root cause) and its log tail."""
        try:
            tail, found = await tail_with_cause(rank.log_path, TAIL_LINES, last_line=False)
        except OSError:
            tail, found = [], None
        if rank.state is RankState.LOST:
            return f"{rank.describe()} was lost: {rank.error or 'its node was lost'}", tail
        how = rank.error or f"exited with {describe_exit(rank.exit_code)}"
        line = f"{rank.describe()} {how}"
        if found is not None:
            line += f": {found.text}"
        return line, tail


class NodeRegistry:
    """The agents of this head and the ranks placed on them."""

    def __init__(self, settings: Settings, events: EventBus = UNHEARD) -> None:
        self.settings = settings
        self.events = events
        #: What ranks are told rank 0 is (``--master-addr``).
        self.head = settings.advertised_host(socket.gethostname())
        self.nodes: dict[str, Node] = {}
        self._changed = asyncio.Condition()
        self._ids = itertools.count(1)
        self._timers: dict[str, asyncio.TimerHandle] = {}  # each disconnected node's expiry
        self._notices: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ states

    def _move_node(self, node: Node, state: NodeState, **fields: object) -> None:
        if state not in NODE_MOVES[node.state]:
            raise RuntimeError(f"node {node.name}: {node.state.value} -> {state.value} is not a move")
        node.state = state
        self.events.publish("node", None, node=node.name, host=node.host, phase=state.value, **fields)
        log.info("node %s (%s) is %s", node.name, node.host, state.value)
        self._wake()

    def _move_rank(self, rank: RemoteRank, state: RankState, **fields: object) -> bool:
        """Move ``rank`` to ``state`` if the table allows it (False: ignored, e.g. a report
        about a rank the head already ended)."""
        if rank.state is state:
            return False
        if state not in RANK_MOVES[rank.state]:
            log.debug("%s: %s -> %s ignored", rank.describe(), rank.state.value, state.value)
            return False
        rank.state = state
        for name, value in fields.items():
            setattr(rank, name, value)
        self.events.publish(
            "rank",
            rank.instance,
            rank=rank.rank,
            node=rank.node.name,
            phase=state.value,
            pid=rank.pid,
            exit_code=rank.exit_code,
            error=rank.error,
        )
        if state in ENDED:
            rank.ended.set()
            self._wake()
        if rank.group is not None:
            rank.group.ranked(rank)
        return True

    def _wake(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop (interpreter exit)
            task = asyncio.get_running_loop().create_task(notify())
            self._notices.add(task)
            task.add_done_callback(self._notices.discard)

    # ----------------------------------------------------------- agents talking

    async def joined(self, hello: Hello, channel: Channel) -> Node:
        """An agent connected (or came back): its node, ready for commands. Ranks it reports
        that the head no longer counts on are stopped."""
        node = self.nodes.get(hello.node)
        if node is not None and node.state is NodeState.CONNECTED:
            if (hello.host, hello.pid) != (node.host, node.pid):
                raise NodeRefused(
                    f"node name {hello.node!r} is taken by the agent connected from {node.host} "
                    f"(pid {node.pid}); give each agent its own --node-name"
                )
            # The same agent again: its old connection broke before this side noticed.
            node.channel = None
            self._move_node(node, NodeState.DISCONNECTED, waiting=node.head_timeout)
        now = datetime.now(timezone.utc)
        if node is None:
            node = Node(
                name=hello.node,
                host=hello.host,
                pid=hello.pid,
                version=hello.version,
                gpus=hello.gpus,
                head_timeout=hello.head_timeout,
                channel=channel,
                connected_at=now,
            )
            node.state = NodeState.LEFT  # so that joining is a move like coming back
            self.nodes[node.name] = node
        else:
            node.host, node.pid, node.version, node.gpus = hello.host, hello.pid, hello.version, hello.gpus
            node.head_timeout, node.channel, node.connected_at = hello.head_timeout, channel, now
        node.generation += 1
        node.last_seen = time.monotonic()
        self._move_node(node, NodeState.CONNECTED, gpus=list(node.gpus), pid=node.pid)
        reported = {report.id for report in hello.ranks}
        for mine in node.live_ranks:
            if mine.id not in reported and mine.state is not RankState.RESERVED:
                # A new agent under this name (the old one died), or one that never got it.
                self._move_rank(mine, RankState.LOST, error="its agent no longer runs it")
                self.close_log(mine)
        stops: list[str] = []
        for report in hello.ranks:
            rank = node.ranks.get(report.id)
            running = report.state not in ("exited", "lost")
            if rank is None or rank.state in ENDED:
                if running:
                    log.info(
                        "node %s still runs rank %s, which is over here: stopping it", node.name, report.id
                    )
                    node.stale[report.id] = rank.gpus if rank is not None else None
                    stops.append(report.id)
                continue
            await self._reported(node, report)
            if rank.state is RankState.STOPPING:  # asked while it was away
                stops.append(rank.id)
        self._wake()
        for rank_id in stops:
            await channel.send(StopRank(id=rank_id, grace=self.settings.stop_timeout))
        return node

    async def heard(self, node: Node, message: RankReport | RankLog | Bye) -> None:
        """A message from a connected agent."""
        node.last_seen = time.monotonic()
        if isinstance(message, RankLog):
            rank = node.ranks.get(message.id)
            if rank is not None and rank.log_file is not None:
                with contextlib.suppress(ValueError, OSError):  # closed meanwhile (a stop, a loss)
                    await asyncio.to_thread(rank.log_file.write, message.data.encode())
        elif isinstance(message, RankReport):
            await self._reported(node, message)
        elif node.state is NodeState.CONNECTED:
            node.channel = None
            self._move_node(node, NodeState.LEFT, reason=message.reason)
            # Its ranks' last lines and exits still come: their logs stay open for them.
            self._end_ranks(node, f"its agent left ({message.reason or 'it was stopped'})", close=False)

    async def _reported(self, node: Node, report: RankReport) -> None:
        if report.state in ("exited", "lost") and report.id in node.stale:
            del node.stale[report.id]
            log.info("node %s stopped rank %s, which was over here", node.name, report.id)
            self._wake()
        rank = node.ranks.get(report.id)
        if report.state == "running" and (rank is None or rank.state in ENDED):
            # Running, but over here (it was ended, or never known): it must not run on.
            node.stale[report.id] = rank.gpus if rank is not None else None
            if node.channel is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await node.channel.send(StopRank(id=report.id, grace=self.settings.stop_timeout))
            return
        if rank is None:
            return
        if report.state == "running":
            self._move_rank(rank, RankState.RUNNING, pid=report.pid)
            log.info("%s of %s runs (pid %s)", rank.describe(), rank.instance, report.pid)
        elif report.state in ("exited", "lost"):
            ended = RankState.EXITED if rank.state is RankState.STOPPING else RankState.DIED
            moved = self._move_rank(
                rank, ended, pid=report.pid or rank.pid, exit_code=report.exit_code, error=report.error
            )
            if moved and ended is RankState.DIED:
                log.error(
                    "%s of %s ended unasked (exit code %s)", rank.describe(), rank.instance, report.exit_code
                )
            self.close_log(rank)

    def disconnected(self, node: Node, channel: Channel) -> None:
        """The agent's connection closed: it has ``head_timeout`` seconds to come back."""
        if node.channel is not channel or node.state is not NodeState.CONNECTED:
            return
        node.channel = None
        node.last_seen = time.monotonic()  # its connection, pinged every HEARTBEAT s, was alive
        self._move_node(node, NodeState.DISCONNECTED, waiting=node.head_timeout)
        generation = node.generation
        old = self._timers.pop(node.name, None)
        if old is not None:
            old.cancel()
        self._timers[node.name] = asyncio.get_running_loop().call_later(
            node.head_timeout, self._expire, node, generation
        )

    def _expire(self, node: Node, generation: int) -> None:
        if node.generation != generation or node.state is not NodeState.DISCONNECTED:
            return
        self._move_node(node, NodeState.LOST)
        self._end_ranks(node, f"its agent has not been heard from for {node.head_timeout:g} s")

    def _end_ranks(self, node: Node, why: str, *, close: bool = True) -> None:
        for rank in node.live_ranks:
            if rank.state is RankState.RESERVED:
                self._move_rank(rank, RankState.EXITED)
            else:
                self._move_rank(rank, RankState.LOST, error=why)
            if close:
                self.close_log(rank)
        node.stale.clear()

    # ------------------------------------------------------------- the ranks

    async def place(
        self,
        instance: str,
        count: int,
        per_rank: int | None,
        args_for: Callable[[int], list[str]],
        log_dir: Path,
    ) -> RankGroup:
        """Place ranks 1..count on ``count`` agents with room (``per_rank`` free GPUs each, or,
        None, a node with no rank of another model), waiting up to ``--node-wait`` for agents
        to join or make room; they are reserved at once (another load cannot take them).
        Raises :class:`NotEnoughNodes`."""
        deadline = time.monotonic() + self.settings.node_wait
        async with self._changed:
            while True:
                chosen = self._choose(count, per_rank)
                if chosen is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NotEnoughNodes(self._shortage(count, per_rank))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
        self._forget_ended(instance)
        stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        launch = next(self._ids)
        group = RankGroup(self, [])
        for index, (node, gpus) in enumerate(chosen, start=1):
            rank = RemoteRank(
                id=f"{instance}-{launch}-r{index}",
                instance=instance,
                rank=index,
                node=node,
                gpus=gpus,
                args=tuple(args_for(index)),
                log_path=log_dir / f"{stamp}_{_safe(instance)}-{launch}-rank{index}-{_safe(node.name)}.log",
                group=group,
            )
            node.ranks[rank.id] = rank
            group.ranks.append(rank)
        return group

    def _forget_ended(self, instance: str) -> None:
        """A new launch of ``instance``: its earlier ranks that ended are forgotten (each node
        keeps only what runs and the last launch's ranks, whose logs /logs/*?rank= reads)."""
        for node in self.nodes.values():
            for rank_id, rank in list(node.ranks.items()):
                if rank.instance == instance and rank.state in ENDED:
                    del node.ranks[rank_id]

    def _choose(self, count: int, per_rank: int | None) -> list[tuple[Node, tuple[str, ...]]] | None:
        chosen: list[tuple[Node, tuple[str, ...]]] = []
        for node in sorted(self.nodes.values(), key=lambda n: n.name):
            if node.state is not NodeState.CONNECTED:
                continue
            free = node.free_gpus()
            if per_rank is None or not node.gpus:
                if node.busy:
                    continue  # a node of unknown GPUs, or a rank that wants them all: alone
                chosen.append((node, tuple(node.gpus)))
            elif len(free) >= per_rank:
                chosen.append((node, tuple(free[:per_rank])))
            if len(chosen) == count:
                return chosen
        return None

    def _shortage(self, count: int, per_rank: int | None) -> str:
        need = f"{per_rank} free GPU(s)" if per_rank else "no other rank running"
        nodes = [
            f"{n.name} ({n.state.value}, {len(n.gpus) or 'unknown'} GPU(s), "
            f"{len(n.live_ranks)} rank(s) running)"
            for n in sorted(self.nodes.values(), key=lambda n: n.name)
        ]
        known = "; ".join(nodes) if nodes else "no agent has connected"
        return (
            f"it needs {count} agent node(s) with {need} each, and found too few within "
            f"{self.settings.node_wait:g} s (--node-wait): {known}"
        )

    async def start_rank(self, rank: RemoteRank) -> None:
        node = rank.node
        rank.log_path.parent.mkdir(parents=True, exist_ok=True)
        rank.log_file = await asyncio.to_thread(open, rank.log_path, "ab", buffering=0)
        header = f"# aic-vllm-proxy: rank {rank.rank} of {rank.instance} on node {node.name} ({node.host})\n"
        await asyncio.to_thread(rank.log_file.write, header.encode())
        self._move_rank(rank, RankState.STARTING)
        message = StartRank(
            id=rank.id,
            instance=rank.instance,
            rank=rank.rank,
            args=rank.args,
            gpus=rank.gpus or None,
        )
        if node.channel is None:
            self._move_rank(rank, RankState.DIED, error=f"node {node.name} is not connected")
            return
        try:
            await node.channel.send(message)
        except (ConnectionError, RuntimeError) as exc:
            self._move_rank(rank, RankState.DIED, error=f"cannot reach node {node.name}: {exc}")

    async def stop_rank(self, rank: RemoteRank, grace: float) -> None:
        if rank.state is RankState.RESERVED:
            self._move_rank(rank, RankState.EXITED)
            return
        if rank.state in ENDED:
            return
        self._move_rank(rank, RankState.STOPPING)
        channel = rank.node.channel
        if channel is None:
            return  # told when its agent comes back (joined), or lost with its node
        with contextlib.suppress(ConnectionError, RuntimeError):
            await channel.send(StopRank(id=rank.id, grace=grace))

    def unanswered(self, rank: RemoteRank) -> None:
        """A stop its agent did not answer: the rank is lost, and kept as stale on its node
        (its GPUs taken) until the agent reports it gone or the node is lost."""
        self._move_rank(rank, RankState.LOST, error="its agent did not answer the stop")
        if rank.node.state in (NodeState.CONNECTED, NodeState.DISCONNECTED):
            rank.node.stale[rank.id] = rank.gpus

    def close_log(self, rank: RemoteRank) -> None:
        if rank.log_file is not None:
            rank.log_file.close()
            rank.log_file = None

    # ------------------------------------------------------------------ views

    def statuses(self) -> NodesStatus:
        now = time.monotonic()
        wall = datetime.now(timezone.utc)
        return NodesStatus(
            head=self.head,
            nodes=[
                NodeStatus(
                    name=n.name,
                    host=n.host,
                    pid=n.pid,
                    version=n.version,
                    state=n.state.value,
                    gpus=list(n.gpus),
                    gpus_in_use=sorted(n.gpus_in_use),
                    head_timeout=n.head_timeout,
                    connected_at=n.connected_at,
                    last_seen=wall
                    if n.state is NodeState.CONNECTED  # its open connection is pinged
                    else datetime.fromtimestamp(wall.timestamp() - (now - n.last_seen), timezone.utc),
                    ranks=[r.status() for r in n.ranks.values() if r.state not in ENDED],
                )
                for n in sorted(self.nodes.values(), key=lambda n: n.name)
            ],
        )

    def ranks(self) -> Iterator[RemoteRank]:
        for node in self.nodes.values():
            yield from node.ranks.values()

    def find_rank(self, instance: str, rank: int) -> RemoteRank | None:
        """The newest rank ``rank`` of ``instance`` (its log: ``/logs/*?model=&rank=``)."""
        found = [r for r in self.ranks() if r.instance == instance and r.rank == rank]
        return max(found, key=lambda r: int(r.id.rsplit("-", 2)[-2]), default=None)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for rank in self.ranks():
            self.close_log(rank)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def per_rank_gpus(head_gpus: Sequence[str] | None) -> int | None:
    """GPUs each remote rank takes: as many as rank 0 has on the head (None: all of a node's)."""
    return len(head_gpus) if head_gpus else None
