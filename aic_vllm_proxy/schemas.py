"""Request and response bodies of the proxy's own API, shared by the server and the client.

Everything here is plain pydantic so that the client can validate what the server sends
without importing any server code.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The longest model spec accepted: a command line longer than this is not a model spec (and one
#: word over 128 KiB could not even be run: the kernel refuses it, E2BIG).
MAX_SPEC_LENGTH = 64 * 1024


class ProcessState(str, Enum):
    """Where the one managed vLLM process is in its life (see ``state.TRANSITIONS``)."""

    STOPPED = "stopped"  #: no vLLM process
    STARTING = "starting"  #: launched, weights loading, not answering yet
    READY = "ready"  #: `/health` and `/v1/models` answered: requests are forwarded
    DRAINING = "draining"  #: a stop or switch lets the requests in flight finish; new ones wait
    STOPPING = "stopping"  #: being stopped (SIGTERM sent, waiting for the process tree)
    FAILED = "failed"  #: failed to start, or died after it was ready
    PARKING = "parking"  #: requests in flight finish, then vLLM is put to sleep (sleep mode)
    SLEEPING = "sleeping"  #: parked: the process runs, its GPU memory is released
    WAKING = "waking"  #: being woken (weights back on the GPU); requests wait for it


class NodeState(str, Enum):
    """Where an agent of a model across nodes is, as the head sees it (``engine/nodes.py``)."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  #: its connection closed; it has head_timeout s to come back
    LOST = "lost"  #: it did not come back: its ranks are lost
    LEFT = "left"  #: it said bye (its ranks were stopped)


class SwitchRequest(BaseModel):
    """Body of ``POST /switch``."""

    model_config = ConfigDict(extra="forbid")

    model_spec: str = Field(
        max_length=MAX_SPEC_LENGTH,
        description="The model and its vLLM arguments, as on the `vllm serve` command line: "
        "'MODEL --arg value ...'. Whitespace (newlines included) separates words; quote as in a shell.",
    )
    wait: bool = Field(
        default=True,
        description="True: answer once the model is ready (200). False: answer at once (202) and "
        "let the switch go on in the background; poll GET /status.",
    )
    force: bool = Field(
        default=False,
        description="Restart even when the same spec is already loaded, and skip the drain of "
        "in-flight requests.",
    )

    @field_validator("model_spec")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model_spec is empty: give the model, e.g. 'meta-llama/Llama-2-7b-hf'")
        return value


class HookReport(BaseModel):
    """What one hook call did, when it failed or said something worth showing."""

    hook: str
    plugin: str
    ok: bool
    message: str = ""
    seconds: float = 0.0


class RankStatus(BaseModel):
    """One rank of a model that spans several nodes (``--nnodes``): rank 0 runs on the head,
    each other rank on an agent's node (docs/cluster.md)."""

    id: str
    instance: str
    rank: int
    node: str = Field(description="The node it runs on: the head's name for rank 0, else the agent's.")
    state: str = Field(description="starting, running, stopping, exited or lost.")
    pid: int | None = None
    exit_code: int | None = None
    gpus: list[str] = Field(default_factory=list)
    log_path: str | None = Field(default=None, description="The head's copy of its log.")
    error: str | None = None


class NodeStatus(BaseModel):
    """An agent known to the head (``GET /nodes``)."""

    name: str
    host: str
    pid: int
    version: str
    state: str = Field(description="connected, disconnected (waiting for it to come back), lost or left.")
    gpus: list[str] = Field(
        default_factory=list, description="Its GPUs; empty: none known (one rank at a time)."
    )
    gpus_in_use: list[str] = Field(default_factory=list)
    head_timeout: float
    connected_at: datetime
    last_seen: datetime = Field(
        description="Now while it is connected (its connection is pinged every 5 s), "
        "else when its connection closed."
    )
    ranks: list[RankStatus] = Field(default_factory=list)


class NodesStatus(BaseModel):
    """Body of ``GET /nodes``."""

    head: str = Field(description="The name the ranks use for the head (--master-addr).")
    nodes: list[NodeStatus] = Field(default_factory=list)


class InstanceStatus(BaseModel):
    """One vLLM instance of the fleet, as listed in ``GET /status``'s ``instances``."""

    name: str = Field(description="The catalogue entry, or the served name of a free-form spec.")
    model: str | None = Field(default=None, description="The served model name vLLM reports.")
    model_spec: str | None = None
    state: ProcessState = ProcessState.STOPPED
    switching: bool = Field(default=False, description="A load (switch) is queued or under way.")
    pid: int | None = None
    vllm_base: str
    gpus: list[str] = Field(
        default_factory=list, description="Its GPUs (CUDA_VISIBLE_DEVICES); empty: all the daemon sees."
    )
    gpu_memory_utilization: float = 0.0
    served_names: list[str] = Field(
        default_factory=list, description="Every name a request may use for it (`model`)."
    )
    in_flight: int = 0
    waiting: int = Field(default=0, description="Requests waiting for it to be ready.")
    last_used: datetime | None = None
    expires_at: datetime | None = Field(
        default=None, description="When it will be unloaded for idling (its ttl), if it stays idle."
    )
    ttl: float = 0.0
    pinned: bool = False
    sleep_level: int = Field(default=0, description="Parked at this sleep level when evicted (0: stopped).")
    slept_at: datetime | None = Field(default=None, description="Since when it sleeps (state sleeping).")
    primary: bool = Field(
        default=False, description="Requests that name no model go here (the last switched to or loaded)."
    )
    log_path: str | None = None
    started_at: datetime | None = None
    ready_at: datetime | None = None
    error: str | None = None
    ranks: list[RankStatus] = Field(
        default_factory=list, description="Its ranks on other nodes, when it spans several (--nnodes)."
    )


class Status(BaseModel):
    """Body of ``GET /status`` (the seed's fields first)."""

    running: bool = Field(description="True only while a vLLM process is alive.")
    pid: int | None = None
    model_spec: str | None = None
    vllm_base: str
    log_path: str | None = None
    state: ProcessState = ProcessState.STOPPED
    model: str | None = Field(default=None, description="The model name requests should use.")
    started_at: datetime | None = None
    ready_at: datetime | None = None
    exit_code: int | None = None
    error: str | None = None
    switching: bool = Field(default=False, description="A switch is queued or in progress.")
    target_model_spec: str | None = Field(
        default=None, description="The spec a queued or running switch is loading."
    )
    pending_model_specs: list[str] = Field(
        default_factory=list,
        description="The specs of the switches queued or in progress, in order: the first is "
        "target_model_spec (being loaded), the others wait for it.",
    )
    accepted_model_spec: str | None = Field(
        default=None,
        description="Only in the 202 answer of POST /switch: the spec the proxy launches for the "
        "switch it accepted (a catalogue entry's, with the flags the proxy adds).",
    )
    in_flight: int = Field(default=0, description="Proxied requests being served right now.")
    hook_reports: list[HookReport] = Field(default_factory=list)
    restarts: int = Field(default=0, description="Automatic restarts in a row (restart policy).")
    last_switch_error: str | None = Field(
        default=None, description="Why the last switch failed (also for switches run in the background)."
    )
    version: str = ""
    instances: list[InstanceStatus] = Field(
        default_factory=list,
        description="Every vLLM instance of the fleet (the fields above are the primary's).",
    )


class LoadRequest(BaseModel):
    """Body of ``POST /load``: load a model beside the others (on its own GPUs)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        max_length=MAX_SPEC_LENGTH,
        description="A catalogue entry or alias (or, where the policy allows, a free-form spec).",
    )
    wait: bool = Field(default=True, description="True: answer once it is ready (200); False: at once (202).")

    @field_validator("model")
    @classmethod
    def _model_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model is empty: give a catalogue entry, e.g. 'llama-8b'")
        return value


class UnloadRequest(BaseModel):
    """Body of ``POST /unload`` (and of ``POST /stop`` for one model)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=MAX_SPEC_LENGTH, description="The instance's name or a name it serves.")
    force: bool = Field(default=False, description="Cut the requests in flight instead of draining them.")


class LoadResult(BaseModel):
    """Body of ``POST /load`` (200 when ready, 202 when it goes on in the background)."""

    changed: bool = Field(description="False when it was already loaded (or loading).")
    woke: bool = Field(default=False, description="It was asleep (sleep mode) and was woken.")
    name: str
    load_seconds: float | None = Field(default=None, description="From launch to ready, for a cold start.")
    wake_seconds: float | None = Field(
        default=None, description="How long vLLM took to wake, for a model that was asleep."
    )
    total_seconds: float = 0.0
    evicted: list[str] = Field(default_factory=list, description="Instances unloaded to make room.")
    message: str = ""
    instance: InstanceStatus
    hook_reports: list[HookReport] = Field(default_factory=list)


class UnloadResult(BaseModel):
    """Body of ``POST /unload``."""

    changed: bool = Field(description="False when it was not loaded.")
    name: str
    drained: int = 0
    cut: int = 0
    message: str = ""
    status: Status


class SwitchResult(BaseModel):
    """Body of a successful ``POST /switch`` (200, or 202 when it goes on in the background)."""

    changed: bool = Field(description="False when the same spec was already loaded (no restart).")
    woke: bool = Field(default=False, description="It was asleep (sleep mode) and was woken.")
    load_seconds: float | None = Field(
        default=None, description="From launch to ready, for a switch that started vLLM."
    )
    wake_seconds: float | None = Field(
        default=None, description="How long vLLM took to wake, for a model that was asleep."
    )
    total_seconds: float = 0.0
    drained: int = 0
    cut: int = 0
    message: str = ""
    status: Status
    hook_reports: list[HookReport] = Field(default_factory=list)


class ErrorDetail(BaseModel):
    """The ``error`` object of an OpenAI-style error body, with the proxy's extra fields."""

    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    code: int | str | None = None
    param: str | None = None
    exit_code: int | None = None
    log_tail: list[str] | None = None
    state: ProcessState | None = None


class ErrorBody(BaseModel):
    """``{"error": {"message": ..., "type": ..., "code": ...}}`` as OpenAI and vLLM send it."""

    error: ErrorDetail


#: The types of ``GET /events`` (docs/events.md has their fields).
EVENT_TYPES = frozenset(
    {
        "hello",
        "state",
        "launched",
        "switch",
        "load",
        "unload",
        "eviction",
        "ttl",
        "restart",
        "drain",
        "hook",
        "failure",
        "dropped",
        "node",
        "rank",
    }
)


class ProxyEvent(BaseModel):
    """One event of ``GET /events`` (docs/events.md). Each type has fields of its own beyond
    these (``state``: old, new, pid...; ``switch``: phase, model_spec...), kept as extra fields."""

    model_config = ConfigDict(extra="allow")

    id: int = Field(description="Increases by one per event the daemon publishes (0: for this reader only).")
    type: str = Field(
        description="state, switch, load, unload, eviction, ttl, restart, drain, hook, failure..."
    )
    time: datetime
    model: str | None = Field(
        default=None, description="The instance's name (a catalogue entry or served name)."
    )
    request_id: str | None = Field(
        default=None, description="The X-Request-Id of the request that caused it."
    )


class PluginInfo(BaseModel):
    """One loaded plugin, as listed by ``GET /plugins``."""

    name: str
    version: str | None = None
    hooks: list[str] = Field(default_factory=list)
    enabled: bool = True
    source: str = ""


class PluginList(BaseModel):
    plugins: list[PluginInfo]


def to_json(model: BaseModel) -> dict[str, Any]:
    """A JSON-ready dict (datetimes as ISO strings, enums as values)."""
    return model.model_dump(mode="json")
