"""What the head (the daemon) and its agents say to each other (docs/cluster.md, "A model
across nodes"), shared by both ends.

An agent (``aic-vllm-proxy agent --head URL``) runs on every other node of a job. It opens a
WebSocket to the head's :data:`CONNECT_PATH` with an admin key and sends :class:`Hello`; the
head answers :class:`Welcome` (or :class:`Refused` and closes). Then:

- the head sends :class:`StartRank` and :class:`StopRank`;
- the agent sends :class:`RankReport` whenever one of its ranks changes state, and
  :class:`RankLog` with what the rank wrote to its log (in order, before the report of its
  exit: the head's copy of a rank's log is whole when it learns the rank is gone);
- :class:`Bye` from an agent that is leaving (SIGTERM), before it stops its ranks: the head
  counts them as gone with the node, and still takes their last log lines and exits.

Every message is one JSON text frame with a ``type``. Both ends ping (WebSocket heartbeat):
a connection that goes silent is closed. A connection that closes is not the end: the agent
reconnects and says which ranks it still runs (``Hello.ranks``); each side gives the other
``head_timeout`` seconds before it stops the ranks (the agent) or declares the node lost (the
head).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

#: The head's WebSocket route for agents (admin key).
CONNECT_PATH = "/nodes/connect"
#: Seconds between WebSocket pings on both ends.
HEARTBEAT = 5.0

RankStateName = Literal["starting", "running", "stopping", "exited", "lost"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class RankReport(_Message):
    """A rank on an agent: its state, pid, exit status, and why it could not start."""

    type: Literal["rank"] = "rank"
    id: str
    state: RankStateName
    pid: int | None = None
    exit_code: int | None = None
    error: str | None = None


class Hello(_Message):
    type: Literal["hello"] = "hello"
    node: str
    host: str
    pid: int
    version: str
    gpus: tuple[str, ...] = ()
    head_timeout: float = Field(gt=0, le=7 * 24 * 3600, allow_inf_nan=False)
    #: Ranks this agent still has from before a reconnect (their last state).
    ranks: tuple[RankReport, ...] = ()


class RankLog(_Message):
    type: Literal["log"] = "log"
    id: str
    data: str


class Bye(_Message):
    type: Literal["bye"] = "bye"
    reason: str = ""


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    node: str


class Refused(_Message):
    type: Literal["refused"] = "refused"
    error: str


class StartRank(_Message):
    """Run ``vllm serve ARGS`` (the agent's own ``--vllm-command``) as rank ``rank``."""

    type: Literal["start"] = "start"
    id: str
    instance: str
    rank: int
    args: tuple[str, ...]
    #: ``CUDA_VISIBLE_DEVICES`` for it (None: the node's GPUs as the agent sees them).
    gpus: tuple[str, ...] | None = None
    env: dict[str, str] = Field(default_factory=dict)


class StopRank(_Message):
    type: Literal["stop"] = "stop"
    id: str
    grace: float


AgentMessage = Annotated[Hello | RankReport | RankLog | Bye, Field(discriminator="type")]
HeadMessage = Annotated[Welcome | Refused | StartRank | StopRank, Field(discriminator="type")]
AGENT_MESSAGE: TypeAdapter[AgentMessage] = TypeAdapter(AgentMessage)
HEAD_MESSAGE: TypeAdapter[HeadMessage] = TypeAdapter(HeadMessage)
