"""One instance: a slot (a name, a port, a GPU set) in which one vLLM process at a time is
started, watched, switched and stopped. The supervisor (``supervisor.py``) holds the instances.

- Switches and stops are serialised by one lock; the process state and the switches pending
  live in :class:`~aic_vllm_proxy.engine.state.ProcessStateMachine` and change nowhere else.
- A switch: pre_switch hooks, drain and stop the old model, launch (``launch.py``: its own
  process group, its own log file, a watchdog), probe until ready (``prober.py``), post_switch.
- Proxied requests wait here (bounded) while no model is ready (READY is the only state in
  which requests are taken; DRAINING lets those in flight finish before a stop).
- An exit nobody asked for marks the model failed, cleans up its tree and may restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO, NoReturn

import aiohttp
from yarl import URL

from aic_vllm_proxy import __version__
from aic_vllm_proxy.config import Settings, http_base
from aic_vllm_proxy.engine import gpumem, prober
from aic_vllm_proxy.engine import sleep as sleep_calls
from aic_vllm_proxy.engine.gpus import child_cuda_env
from aic_vllm_proxy.engine.launch import (
    Launch,
    api_key_of,
    child_env,
    describe_exit,
    free_port,
    host_addresses,
    port_is_free,
    port_taken_message,
    spawn_vllm,
)
from aic_vllm_proxy.engine.logs import (
    cause_since,
    link_with_pid,
    loaded_weights_gib,
    log_size,
    open_launch_log,
    tail_lines_async,
    tail_with_cause,
)
from aic_vllm_proxy.engine.nodes import NodeRegistry, NotEnoughNodes, RankGroup, per_rank_gpus
from aic_vllm_proxy.engine.placement import InstanceView, expires_at
from aic_vllm_proxy.engine.procgroup import group_members, signal_group
from aic_vllm_proxy.engine.state import ProcessStateMachine, Snapshot
from aic_vllm_proxy.errors import (
    EngineError,
    ModelUnavailable,
    StartFailure,
    SwitchCancelled,
    SwitchFailed,
    SwitchHookFailed,
    SwitchVetoed,
    Unavailable,
    sentences,
)
from aic_vllm_proxy.events import UNHEARD, EventBus, detached
from aic_vllm_proxy.hooks.runner import HookFailed, HookRunner, HookVeto
from aic_vllm_proxy.hooks.specs import HookContext
from aic_vllm_proxy.schemas import HookReport, InstanceStatus, ProcessState, Status, SwitchResult
from aic_vllm_proxy.spec import ModelSpec

log = logging.getLogger(__name__)
S = ProcessState
LOG_TAIL_LINES = 40
#: What to do after a switch failed because vLLM's port was taken.
PORT_TAKEN_ADVICE = (
    "Stop that process (another aic-vllm-proxy's vLLM?) or give this proxy another --vllm-port"
)


def cancelled_by_stop(spec: ModelSpec) -> str:
    """``last_switch_error`` of a switch that a stop cancelled."""
    return f"the switch to {spec.model} was cancelled by a stop"


async def switch_outcome(task: asyncio.Task[SwitchResult], spec: ModelSpec) -> SwitchResult:
    """The result of the task of a switch to ``spec``. Shielded: a caller that goes away (a
    client hanging up) does not abandon the switch; a switch cancelled (by a stop or the
    shutdown) is :class:`SwitchCancelled`."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.cancelled():
            raise SwitchCancelled(
                f"The switch to {spec.model} was cancelled: a stop was requested while it was in progress."
            ) from None
        raise


#: The wall clock at one monotonic instant: monotonic times shown as dates (the same date for
#: the same instant in every ``/status``, whatever the wall clock does meanwhile).
_MONOTONIC_ZERO = time.monotonic()
_WALL_ZERO = datetime.now(timezone.utc)


def _wall(monotonic: float) -> datetime:
    return _WALL_ZERO + timedelta(seconds=monotonic - _MONOTONIC_ZERO)


def _launched(launch: Launch) -> dict[str, object]:
    """The hook context's instance fields for a stop of ``launch``: as when it was launched."""
    return {"instance": launch.instance, "gpus": launch.gpus, "ranks": _ranks(launch)}


def _ranks(launch: Launch | None) -> tuple[dict[str, object], ...]:
    return launch.remote.context() if launch is not None and launch.remote is not None else ()


@dataclass
class StopOutcome:
    """What stopping a model did: hook reports, requests drained and cut at the deadline."""

    reports: list[HookReport] = field(default_factory=list)
    drained: int = 0
    cut: int = 0


class Instance:
    """Owns one vLLM process at a time, on its own port and GPUs. All public coroutines are safe
    to call concurrently."""

    def __init__(
        self,
        settings: Settings,
        session: Callable[[], aiohttp.ClientSession],
        hooks: HookRunner,
        *,
        name: str,
        port: int,
        gpus: tuple[str, ...] | None = None,
        utilization: float = 0.0,
        ttl: float = 0.0,
        pinned: bool = False,
    ) -> None:
        self.settings = settings
        self.name = name  # the catalogue entry, or the served name of a free-form spec
        self.port = port
        self.gpus = gpus  # None: the GPUs the daemon sees (CUDA_VISIBLE_DEVICES left as it is)
        # Its footprint (catalog.Footprint), which the fleet places it by.
        self.utilization = utilization
        self.ttl = ttl
        self.pinned = pinned
        self.sleep_level = 0  # parked at this level instead of stopped (sleep mode; 0: off)
        #: Host RAM its weights take parked at level 1 (vLLM's log says; None: unknown).
        self.weights_bytes: int | None = None
        #: How long its last wake took (a measurement, for the answers of /load and /switch).
        self.wake_seconds: float | None = None
        #: Every name a request may give for it (``model``): its served names, the catalogue
        #: entry's name and aliases. Set by the fleet with the spec it loads.
        self.names: tuple[str, ...] = ()
        #: The fleet's calls when a switch begins (under the lock: its name and footprint) and
        #: before its launch (after the old model stopped: room on the GPUs).
        self.on_switch: Callable[[ModelSpec], None] | None = None
        self.before_start: Callable[[ModelSpec], Awaitable[None]] | None = None
        #: The name it will have once it loads a spec (the fleet's slot: the spec's entry or
        #: served name; None: it keeps its name).
        self.name_for: Callable[[ModelSpec], str] | None = None
        #: The fleet's call when the last request in flight finished (idle: TTL, placement).
        self.on_idle: Callable[[], None] | None = None
        self.last_used = time.monotonic()  # a request arrived or finished, or it became ready
        self.loaded_at: float | None = None  # monotonic: when it became ready (anti-thrash)
        self.machine = ProcessStateMachine()
        self.base = URL(http_base(settings.vllm_host, port))
        self.hooks = hooks
        self._session = session
        self._lock = asyncio.Lock()  # one switch or stop at a time
        self._launch: Launch | None = None
        self._tasks: set[asyncio.Task[object]] = set()  # background switches, health checks
        self._switches: set[asyncio.Task[SwitchResult]] = set()  # switches under way or queued
        self.last_switch_error: str | None = None
        self._watchers: set[asyncio.Task[object]] = set()  # exit watchers: run until the exit
        self._upstreams: set[Callable[[], None]] = set()
        self.hook_reports: list[HookReport] = []
        self.in_flight = 0  # proxied requests admitted and not finished
        self.waiting = 0  # proxied requests waiting for a model
        self._idle = asyncio.Event()
        self._idle.set()
        self.restarts = 0  # automatic restarts in a row (restart policy)
        self.events: EventBus = UNHEARD  # the fleet's: drains, restarts (and its state events)
        #: The agents that run the other ranks of a model across nodes (the fleet's).
        self.nodes: NodeRegistry | None = None

    # ------------------------------------------------------------------ status

    @property
    def switching(self) -> bool:
        """A switch is queued or in progress (``Snapshot.pending``)."""
        return self.machine.snapshot.switching

    @property
    def launch(self) -> Launch | None:
        return self._launch

    def status(self) -> Status:
        snap = self.machine.snapshot
        launch = self._launch
        running = launch is not None and not launch.exited.is_set()
        return Status(
            running=running,
            pid=snap.pid if running else None,  # set with the log's final name (_start)
            model_spec=snap.model_spec,
            vllm_base=str(self.base),
            log_path=snap.log_path,
            state=snap.state,
            model=snap.model,
            started_at=snap.started_at,
            ready_at=snap.ready_at,
            exit_code=snap.exit_code,
            error=snap.error,
            switching=snap.switching,
            target_model_spec=snap.pending[0].raw if snap.pending else None,
            pending_model_specs=[spec.raw for spec in snap.pending],
            in_flight=self.in_flight,
            hook_reports=self.hook_reports,
            restarts=self.restarts,
            last_switch_error=self.last_switch_error,
            version=__version__,
        )

    def move_to(self, port: int) -> None:
        """Listen on ``port`` from the next launch on (the fleet moves a stopped instance whose
        port another process took meanwhile)."""
        self.port = port
        self.base = URL(http_base(self.settings.vllm_host, port))

    def view(self) -> InstanceView:
        """What placement reads of this instance (``placement.py``). A switch queued or under
        way counts as starting (it holds its room) and busy (it is not evicted while it loads)."""
        snap = self.machine.snapshot
        state = snap.state
        waiting = self.waiting
        gpus, utilization = self.gpus or (), self.utilization
        launch = self._launch
        if (
            launch is not None
            and not launch.exited.is_set()
            and (launch.gpus, launch.utilization) != (gpus, utilization)
        ):
            # A switch gave it the next model's footprint while the old model still runs: it
            # holds both until the old one has stopped.
            gpus = () if not gpus or not launch.gpus else tuple(dict.fromkeys((*launch.gpus, *gpus)))
            utilization = max(utilization, launch.utilization)
        if snap.switching:
            waiting += 1
            if state in (S.STOPPED, S.FAILED):
                state = S.STARTING
        return InstanceView(
            name=self.name,
            gpus=gpus,
            utilization=utilization,
            state=state,
            pinned=self.pinned,
            in_flight=self.in_flight,
            waiting=waiting,
            last_used=self.last_used,
            loaded_at=self.loaded_at,
        )

    def instance_status(self, *, primary: bool) -> InstanceStatus:
        """This instance as ``GET /status`` lists it in ``instances``."""
        snap = self.machine.snapshot
        launch = self._launch
        running = launch is not None and not launch.exited.is_set()
        view = self.view()
        expires = expires_at(view, self.ttl)
        return InstanceStatus(
            name=self.name,
            model=snap.model,
            model_spec=snap.pending[0].raw if snap.pending else snap.model_spec,
            state=snap.state,
            switching=snap.switching,
            pid=snap.pid if running else None,  # set with the log's final name (_start)
            vllm_base=str(self.base),
            gpus=list(self.gpus or ()),
            gpu_memory_utilization=self.utilization,
            served_names=list(self.names),
            in_flight=self.in_flight,
            waiting=self.waiting,
            last_used=_wall(self.last_used),
            expires_at=None if expires is None else _wall(expires),
            ttl=self.ttl,
            pinned=self.pinned,
            sleep_level=self.sleep_level,
            slept_at=snap.slept_at,
            primary=primary,
            log_path=snap.log_path,
            started_at=snap.started_at,
            ready_at=snap.ready_at,
            error=snap.error or self.last_switch_error,
            ranks=launch.remote.statuses() if launch is not None and launch.remote is not None else [],
        )

    def current_log(self, rank: int = 0) -> Path | None:
        """The log of its current (or last) launch; of rank ``rank`` on another node for a
        model across nodes (the head's copy)."""
        if rank:
            found = self.nodes.find_rank(self.name, rank) if self.nodes is not None else None
            return found.log_path if found is not None else None
        path = self.machine.snapshot.log_path
        return Path(path) if path else None

    def log_is_live(self, fd: int, rank: int = 0) -> bool:
        """True while the process writing the log open at ``fd`` may still write to it."""
        launch = self._launch
        if launch is None or launch.exited.is_set():
            return False
        remote = launch.remote.find(rank) if rank and launch.remote is not None else None
        if rank and (remote is None or remote.ended.is_set()):
            return False
        try:
            current = os.stat(remote.log_path if remote is not None else launch.log_path)
            own = os.fstat(fd)
        except OSError:
            return False
        return (current.st_dev, current.st_ino) == (own.st_dev, own.st_ino)

    # --------------------------------------------------------- proxied traffic

    def upstream_headers(self) -> dict[str, str]:
        launch = self._launch
        return launch.upstream_headers if launch else {}

    def track_upstream(self, close: Callable[[], None]) -> Callable[[], None]:
        """Register a way to cut one in-flight upstream request; returns the unregister call."""
        self._upstreams.add(close)
        return lambda: self._upstreams.discard(close)

    def request_started(self) -> None:
        self.in_flight += 1
        self.last_used = time.monotonic()
        self._idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.last_used = time.monotonic()
            self._idle.set()
            if self.on_idle is not None:
                self.on_idle()

    def _cut_upstreams(self) -> int:
        closers, self._upstreams = self._upstreams, set()
        for close in closers:
            close()
        return len(closers)

    @property
    def serving(self) -> bool:
        """A model is ready and taking requests: the state is READY (not DRAINING for a stop)."""
        return self.machine.state is S.READY

    async def wait_for_model(self, timeout: float) -> Snapshot:
        """Wait (bounded) until a model is ready; raise :class:`ModelUnavailable` otherwise."""
        snap = self.machine.snapshot
        if self.serving:
            return snap

        def settled(s: Snapshot) -> bool:
            return s.state is S.READY or (not s.switching and s.state in (S.STOPPED, S.FAILED))

        if not settled(snap):
            if self.waiting >= self.settings.max_waiting:
                raise ModelUnavailable(
                    f"Too many requests are already waiting for a model ({self.waiting}; the limit "
                    "is --max-waiting). Retry in a little while.",
                    why=Unavailable.TOO_MANY_WAITING,
                    state=snap.state,
                )
            self.waiting += 1
            try:
                snap = await self.machine.wait_for(settled, timeout)
            except asyncio.TimeoutError:
                pending = self.machine.snapshot.pending
                target = pending[0].model if pending else "the model"
                raise ModelUnavailable(
                    f"Timed out after {timeout:g} s waiting for {target} to finish loading. "
                    "Retry later, or check GET /status and GET /logs/tail.",
                    why=Unavailable.LOAD_TIMEOUT,
                    state=self.machine.state,
                ) from None
            finally:
                self.waiting -= 1
        if snap.state is S.READY:
            return snap
        if snap.state is S.FAILED:
            raise ModelUnavailable(
                sentences(
                    f"No model is available: {snap.error or 'vLLM failed'}",
                    "Load a model with POST /switch (see GET /logs/tail for vLLM's output)",
                ),
                why=Unavailable.FAILED,
                state=snap.state,
            )
        raise ModelUnavailable(
            'No model is loaded. Load one with POST /switch {"model_spec": "MODEL [ARGS]"} '
            "(or proxy.switch(...) from the Python client).",
            why=Unavailable.NOTHING_LOADED,
            state=snap.state,
        )

    # ------------------------------------------------------------------ switch

    async def switch(self, spec: ModelSpec, *, force: bool = False, restart: bool = False) -> SwitchResult:
        """Stop whatever runs, start ``spec`` and wait until it is ready. Serialised.

        ``force`` restarts even the same spec and skips the drain; ``restart`` marks an automatic
        restart by the restart policy (which does not reset the restart count)."""
        return await self.outcome(self._begin_switch(spec, force=force, restart=restart), spec)

    def switch_in_background(self, spec: ModelSpec, *, force: bool = False) -> asyncio.Task[SwitchResult]:
        """Start a switch and return its task; it is pending in ``/status`` from this call on,
        and its outcome shows there (:meth:`outcome` waits for it)."""
        task = self._begin_switch(spec, force=force, restart=False)

        def logged(done: asyncio.Task[SwitchResult]) -> None:
            if not done.cancelled() and isinstance(exc := done.exception(), EngineError):
                log.warning("background switch to %s failed: %s", spec.model, exc.message)

        task.add_done_callback(logged)
        return task

    def _begin_switch(self, spec: ModelSpec, *, force: bool, restart: bool) -> asyncio.Task[SwitchResult]:
        """Register a switch (pending in the snapshot from this very step: synchronous, so no
        ``/status`` in between can miss it) and start the task that runs it."""
        if not restart:
            self.restarts = 0
        self.last_switch_error = None
        self.machine.queue_switch(spec)
        name = self.name_for(spec) if self.name_for is not None else self.name
        self.events.publish("switch", name, phase="queued", model_spec=spec.raw)
        ran = False

        async def run() -> SwitchResult:
            nonlocal ran
            ran = True
            return await self._run_switch(spec, force=force)

        def never_ran(_: object) -> None:
            if not ran:  # cancelled (by a stop) before it began: _run_switch did not clean up
                self.last_switch_error = cancelled_by_stop(spec)
                self.machine.end_switch(spec)
                self._switch_ended(spec, self.last_switch_error)

        task = asyncio.ensure_future(run())
        self._switches.add(task)
        task.add_done_callback(self._switches.discard)
        task.add_done_callback(never_ran)
        return task

    async def outcome(self, task: asyncio.Task[SwitchResult], spec: ModelSpec) -> SwitchResult:
        """The result of a switch's task (:func:`switch_outcome`)."""
        return await switch_outcome(task, spec)

    async def _run_switch(self, spec: ModelSpec, *, force: bool) -> SwitchResult:
        started = time.monotonic()
        try:
            async with self._lock:
                self.machine.start_switch(spec)  # the spec being loaded comes first in /status
                if self.on_switch is not None:
                    self.on_switch(spec)
                self.events.publish("switch", self.name, phase="started", model_spec=spec.raw)
                result = await self._switch_locked(spec, force=force)
        except EngineError as exc:
            self.last_switch_error = exc.message
            self._switch_ended(spec, exc.message)
            raise
        except asyncio.CancelledError:
            self.last_switch_error = cancelled_by_stop(spec)
            self._switch_ended(spec, self.last_switch_error)
            raise
        finally:
            self.machine.end_switch(spec)
        result.total_seconds = round(time.monotonic() - started, 3)
        result.status = self.status()
        self._switch_ended(spec, None, result.total_seconds)
        return result

    def _switch_ended(self, spec: ModelSpec, error: str | None, seconds: float | None = None) -> None:
        """A ``switch`` event: done (with its seconds) or failed (why; a stop's cancel too)."""
        if error is None:
            self.events.publish("switch", self.name, phase="done", model_spec=spec.raw, seconds=seconds)
        else:
            self.events.publish("switch", self.name, phase="failed", model_spec=spec.raw, error=error)

    def _child_env(self) -> dict[str, str]:
        env = child_env(self.settings)
        if self.port != self.settings.vllm_port and "VLLM_PORT" in env:
            # vLLM's internal port: two instances given the same one would collide.
            del env["VLLM_PORT"]
        if self.gpus is not None:
            env.update(child_cuda_env(self.gpus))
            # CUDA numbers GPUs fastest first by default; the ids given are nvidia-smi's (NVML's).
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        if self.sleep_level:
            env.update(sleep_calls.DEV_MODE_ENV)  # its sleep routes; the proxy refuses them to clients
        return env

    def _spawn(self, coro: Awaitable[object], into: set[asyncio.Task[object]] | None = None) -> None:
        tasks = self._tasks if into is None else into
        # Exit and health watchers, restarts: they outlive the request that started vLLM.
        task: asyncio.Task[object] = asyncio.ensure_future(detached(coro))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _context(self, event: str, **fields: object) -> HookContext:
        snap = self.machine.snapshot
        values: dict[str, object] = {
            "instance": self.name,
            "gpus": self.gpus or (),
            "port": self.port,
            "old_spec": snap.model_spec,
            "new_spec": None,
            "log_path": snap.log_path,
            "model": snap.model,
            "ranks": _ranks(self._launch),
        }
        values.update(fields)
        return HookContext(
            event=event,
            settings=self.settings,
            vllm_base=str(self.base),
            session=self._session(),
            **values,  # type: ignore[arg-type]
        )

    async def _switch_locked(self, spec: ModelSpec, *, force: bool) -> SwitchResult:
        launch = self._launch
        if (
            not force
            and self.machine.state is S.READY
            and launch is not None
            and launch.spec.key == spec.key
            and not launch.exited.is_set()
            and launch.failed_rank is None
        ):
            return SwitchResult(
                changed=False,
                message=f"{spec.model} is already loaded with these arguments; nothing restarted",
                status=self.status(),
            )
        current = self.machine.snapshot.model_spec if launch else None
        try:
            running = launch.pgid if launch is not None and not launch.exited.is_set() else None
            reports = await self.hooks.call(
                self._context("pre_switch", old_spec=current, new_spec=spec.raw, pid=running)
            )
        except HookVeto as veto:
            raise SwitchVetoed(
                sentences(
                    f"Switch to {spec.model} refused by plugin {veto.report.plugin}: {veto.report.message}",
                    f"{current!r} is still loaded" if current else "Nothing was loaded",
                )
            ) from None
        except HookFailed as failed:
            raise SwitchHookFailed(
                f"Switch to {spec.model} not done: the pre_switch hook of plugin "
                f"{failed.report.plugin} failed ({failed.report.message}). Nothing was changed."
            ) from None
        drained = cut = 0
        if self._launch is not None or self.machine.state is S.FAILED:
            stopped = await self._stop_locked(drain=not force)
            reports += stopped.reports
            drained, cut = stopped.drained, stopped.cut
        if self.before_start is not None:
            await self.before_start(spec)  # the fleet makes room on this instance's GPUs
        launch = await self._start(spec)
        try:
            ready = await asyncio.wait_for(
                prober.wait_until_ready(
                    self._session(),
                    self.base,
                    launch.exited,
                    interval=self.settings.probe_interval,
                    target=await self._target(launch),
                    headers=launch.upstream_headers,
                ),
                self.settings.ready_timeout,
            )
        except prober.ProcessExited:
            raise await self._start_failed(launch, reports, failure=StartFailure.EXITED) from None
        except asyncio.TimeoutError:
            raise await self._start_failed(launch, reports, failure=StartFailure.TIMEOUT) from None
        except prober.PortTaken:
            raise await self._start_failed(launch, reports, failure=StartFailure.PORT_TAKEN) from None
        except asyncio.CancelledError:
            await launch.terminate(grace=min(self.settings.stop_timeout, 5.0))
            raise
        load_seconds = time.monotonic() - (self.machine.snapshot.launched_monotonic or 0.0)
        model = ready.models[0] if ready.models else spec.served_name
        self.loaded_at = self.last_used = time.monotonic()
        if self.sleep_level:
            found = await asyncio.to_thread(loaded_weights_gib, launch.log_path)
            self.weights_bytes = sleep_calls.host_weights(found, spec)
        launch.ready_offset = await asyncio.to_thread(log_size, launch.log_path)
        await self.machine.transition(S.READY, model=model)
        log.info("%s is ready after %.1f s (pid %d)", spec.model, load_seconds, launch.process.pid)
        reports += await self.hooks.call(
            self._context("post_switch", old_spec=current, new_spec=spec.raw, pid=launch.pgid)
        )
        self.hook_reports = [r for r in reports if not r.ok or r.message]
        return SwitchResult(
            changed=True,
            load_seconds=round(load_seconds, 3),
            drained=drained,
            cut=cut,
            message=f"{spec.model} is ready",
            status=self.status(),
            hook_reports=reports,
        )

    async def _target(self, launch: Launch) -> prober.Target:
        """What readiness waits for: this launch's group listening on vLLM's port, serving its model."""
        settings = self.settings
        addresses = await asyncio.to_thread(host_addresses, settings.vllm_host, self.port)
        return prober.Target(
            pgid=launch.pgid,
            port=self.port,
            addresses=tuple(addresses),
            model=launch.spec.model,
            served_names=launch.spec.served_names,
        )

    async def _start_failed(
        self, launch: Launch, reports: list[HookReport], *, failure: StartFailure
    ) -> SwitchFailed:
        """Stop what is left of a launch that did not become ready, say why (state FAILED,
        on_failure hooks) and return the error for the switch. ``failure``: "start_failed" (it
        exited), TIMEOUT or PORT_TAKEN (another process listens on vLLM's port)."""
        spec = launch.spec
        await launch.terminate(grace=self.settings.stop_timeout)
        exit_code = launch.exit_code
        if failure is StartFailure.TIMEOUT:
            tail = await self._log_tail(launch.log_path)
            cause = (
                f"{spec.model} was not ready after {self.settings.ready_timeout:g} s "
                "(--ready-timeout), so vLLM was stopped"
            )
            advice = "Raise the timeout if the model needs longer to load; the log tail shows how far it got"
        elif failure is StartFailure.PORT_TAKEN:
            tail = await self._log_tail(launch.log_path)
            cause, advice, exit_code = port_taken_message(self.port), PORT_TAKEN_ADVICE, None
        elif launch.failed_rank is not None and launch.remote is not None:
            why, tail = await launch.remote.cause(launch.failed_rank)
            cause = f"{spec.model} did not start: {why}; every rank was stopped"
            advice = "The log tail is that rank's (GET /logs/tail?model=...&rank=N has all of it)"
            exit_code = launch.failed_rank.exit_code
        else:
            tail, reason = await self._failure_tail(launch.log_path)
            cause = f"vLLM exited with {describe_exit(exit_code)} while starting {spec.model}" + (
                f": {reason}" if reason else ""
            )
            advice = "Check the model name and arguments; the log tail has the details"
        failed_log = str(launch.failed_rank.log_path) if launch.failed_rank is not None else None
        await self.machine.transition(
            S.FAILED, exit_code=exit_code, error=cause, pid=None, failed_log=failed_log
        )
        if self._launch is launch:
            self._launch = None
        reports += await self.hooks.call(
            self._context(
                "on_failure",
                new_spec=spec.raw,
                pid=launch.pgid,
                failure="start_timeout" if failure is StartFailure.TIMEOUT else "start_failed",
                error=cause,
                exit_code=exit_code,
                log_tail=tail,
            )
        )
        self.hook_reports = [r for r in reports if not r.ok or r.message]
        return SwitchFailed(sentences(cause, advice), failure=failure, exit_code=exit_code, log_tail=tail)

    async def _log_tail(self, path: Path) -> list[str]:
        try:
            return await tail_lines_async(path, LOG_TAIL_LINES)
        except OSError:
            return []

    async def _failure_tail(self, path: Path) -> tuple[list[str], str]:
        """The log tail of a failed start, which always shows the root cause, and that cause."""
        try:
            tail, cause = await tail_with_cause(path, LOG_TAIL_LINES)
        except OSError:
            return [], ""
        return tail, cause.text if cause else ""

    async def _start(self, spec: ModelSpec) -> Launch:
        """Launch vLLM for ``spec`` (state STARTING); raise :class:`SwitchFailed` if it cannot run.
        A model across nodes (``--nnodes N``): this is rank 0, and ranks 1..N-1 are placed on
        agents and started once it runs (``nodes.py``)."""
        argv = spec.argv(self.settings.vllm_argv, self.settings.vllm_host, self.port)
        drain = self.settings.vllm_shutdown_timeout
        if drain is not None and not spec.has_flag("--shutdown-timeout"):
            argv += ["--shutdown-timeout", f"{drain:g}"]  # vLLM >= 0.18 drains on SIGTERM itself
        master_port = 0
        if spec.nnodes > 1 and self.nodes is not None:
            master_port = await asyncio.to_thread(free_port)
            argv += spec.rank_args(0, self.nodes.head, master_port)
        path, handle = await asyncio.to_thread(open_launch_log, self.settings.log_dir, argv)
        self.loaded_at = None
        await self.machine.transition(
            S.STARTING, model_spec=spec.raw, model=spec.served_name, log_path=str(path)
        )
        try:
            # Something else on vLLM's port (another daemon's vLLM) would answer for this launch.
            if not await asyncio.to_thread(port_is_free, self.settings.vllm_host, self.port):
                await self._not_started(
                    handle,
                    port_taken_message(self.port),
                    PORT_TAKEN_ADVICE,
                    StartFailure.PORT_TAKEN,
                )
            remote = await self._place_ranks(spec, master_port, handle) if master_port else None
            try:
                process = await spawn_vllm(argv, handle, self._child_env())
            except asyncio.CancelledError:
                if remote is not None:
                    await remote.stop(0.0)  # reserved only: nothing was started
                raise
            except OSError as exc:
                if remote is not None:
                    await remote.stop(0.0)  # reserved only: nothing was started
                cause = f"cannot run {argv[0]!r}: {exc.strerror or exc}"
                advice = (
                    "Install vLLM in this environment "
                    "or point --vllm-command (AIC_VLLM_PROXY_VLLM_COMMAND) at it"
                )
                await self._not_started(handle, cause, advice, StartFailure.CANNOT_RUN)
        finally:
            handle.close()  # the child has its own copy
        # Registered before any other await: a cancelled switch must still find and stop it.
        key = api_key_of(spec)
        launch = Launch(
            spec=spec,
            process=process,
            log_path=path,
            guard_fd=None,
            guard=None,
            upstream_headers={"Authorization": f"Bearer {key}"} if key else {},
            instance=self.name,
            gpus=self.gpus or (),
            utilization=self.utilization,
            remote=remote,
        )
        self._launch = launch
        self._spawn(self._watch_exit(launch), into=self._watchers)
        if remote is not None:
            self._spawn(self._watch_ranks(launch, remote), into=self._watchers)
            await remote.start()
        await launch.start_guard(grace=min(self.settings.stop_timeout, 5.0))
        # The log's final name is published before its first name goes: a reader that opens the
        # published name (control routes) always finds it.
        first, path = path, await asyncio.to_thread(link_with_pid, path, process.pid)
        launch.log_path = path
        await self.machine.update(pid=process.pid, log_path=str(path))
        with contextlib.suppress(OSError):
            first.unlink()
        if self.settings.health_interval > 0:
            self._spawn(self._watch_health(launch))
        log.info("started vLLM pid %d: %s (log %s)", process.pid, spec.raw, path)
        return launch

    async def _place_ranks(self, spec: ModelSpec, master_port: int, log_file: BinaryIO) -> RankGroup:
        """Reserve a node for each rank after 0 (waiting up to ``--node-wait`` for agents)."""
        assert self.nodes is not None
        head = self.nodes.head
        try:
            return await self.nodes.place(
                self.name,
                spec.nnodes - 1,
                per_rank_gpus(self.gpus),
                lambda rank: [spec.model, *spec.args, *spec.rank_args(rank, head, master_port)],
                self.settings.log_dir,
            )
        except NotEnoughNodes as exc:
            cause = f"{spec.model} spans {spec.nnodes} nodes, but {exc}"
            advice = (
                "Start an agent on each other node of the job "
                "(srun aic-vllm-proxy agent --head URL, docs/cluster.md), or wait for a model to unload"
            )
            await self._not_started(log_file, cause, advice, StartFailure.NO_NODES)

    async def _watch_ranks(self, launch: Launch, remote: RankGroup) -> None:
        """A rank on another node that dies (or is lost with its node) ends the whole launch:
        rank 0 is stopped here, and its exit reports that rank (``_watch_exit``,
        ``_start_failed``)."""
        rank = await remote.failure
        if rank is None or launch.exited.is_set() or self._launch is not launch:
            return
        launch.failed_rank = rank
        log.error("%s of %s failed: stopping every rank", rank.describe(), launch.spec.model)
        why, _ = await remote.cause(rank)
        # Failed from now on (a ready model takes no more requests), not once rank 0 has gone.
        serving = frozenset({S.READY, S.DRAINING, S.PARKING, S.SLEEPING, S.WAKING})
        message = f"{launch.spec.model} failed: {why}; every rank was stopped"
        if await self.machine.transition_if(serving, S.FAILED, error=message, failed_log=str(rank.log_path)):
            log.error("%s", message)
            self._cut_upstreams()
        signal_group(launch.pgid, signal.SIGTERM)
        # vLLM may not act on SIGTERM (while it starts, it can be lost): rank 0 must end.
        grace = self._stop_grace()
        try:
            await asyncio.wait_for(launch.exited.wait(), grace)
        except asyncio.TimeoutError:
            log.warning(
                "rank 0 of %s still runs %.0f s after SIGTERM: sending SIGKILL", launch.spec.model, grace
            )
            signal_group(launch.pgid, signal.SIGKILL)

    async def _not_started(
        self, log_file: BinaryIO, cause: str, advice: str, failure: StartFailure
    ) -> NoReturn:
        """vLLM could not even be started: say so in its log, mark the state failed, raise."""
        message = sentences(cause, advice)
        log_file.write(f"# {message}\n".encode())
        await self.machine.transition(S.FAILED, error=cause)
        raise SwitchFailed(message, failure=failure, log_tail=[message])

    async def _watch_exit(self, launch: Launch) -> None:
        """Record the exit; if nobody asked for it, the model has died: say so and clean up."""
        code = await launch.process.wait()
        launch.exit_code = code
        launch.exited.set()
        if self._launch is not launch:
            return
        message = (
            f"vLLM ({launch.spec.model}, pid {launch.pgid}) exited with {describe_exit(code)} "
            "after it was ready"
        ) + await self._why_died(launch, "its engine may have died")
        failed_log = None
        if launch.failed_rank is not None and launch.remote is not None:
            why, _ = await launch.remote.cause(launch.failed_rank)
            message = f"{launch.spec.model} failed: {why}; every rank was stopped"
            failed_log = str(launch.failed_rank.log_path)
        snap = await self.machine.transition_if(
            frozenset({S.READY, S.DRAINING, S.PARKING, S.SLEEPING, S.WAKING}),
            S.FAILED,
            exit_code=code,
            error=message,
            pid=None,
            failed_log=failed_log,
        )
        if snap is None:
            if self.machine.state is S.FAILED:  # already marked by the health check
                await self.machine.update(exit_code=code, pid=None)
            else:
                return  # a switch or stop is handling it
        log.error("%s", message)
        self._cut_upstreams()
        await launch.terminate(grace=self.settings.stop_timeout)
        if self._launch is launch:
            self._launch = None
        tail = await self._log_tail(Path(failed_log) if failed_log else launch.log_path)
        self.hook_reports = await self.hooks.call(
            self._context(
                "on_failure",
                new_spec=launch.spec.raw,
                pid=launch.pgid,
                failure="crashed",
                error=message,
                exit_code=code,
                log_tail=tail,
                **_launched(launch),
            )
        )
        self._maybe_restart(launch.spec)

    def _maybe_restart(self, spec: ModelSpec) -> None:
        """The restart policy: after a death, restart the same spec with a growing back-off."""
        settings = self.settings
        if settings.restart != "on-failure":
            return
        if self.restarts >= settings.max_restarts:
            log.error("not restarting %s: %d restarts in a row already", spec.model, self.restarts)
            return
        delay = settings.restart_backoff * (2**self.restarts)
        self.restarts += 1
        self.events.publish("restart", self.name, reason="died", delay=delay, attempt=self.restarts)
        log.warning(
            "restarting %s in %.1f s (restart %d of %d)",
            spec.model, delay, self.restarts, settings.max_restarts,
        )  # fmt: skip

        async def restart() -> None:
            await asyncio.sleep(delay)
            if self.machine.state is not S.FAILED or self.switching:
                return  # someone loaded or stopped a model meanwhile
            try:
                await self.switch(spec, force=True, restart=True)
            except EngineError as exc:
                log.error("restart of %s failed: %s", spec.model, exc.message)
                self._maybe_restart(spec)

        self._spawn(restart())

    async def _why_died(self, launch: Launch, guess: str = "") -> str:
        """How the message of a death after ready ends: ``: <the root cause>`` vLLM logged since
        it was ready (else ``; <guess>``), and each rank whose agent is out of touch (vLLM
        notices a lost node at its next step, before the head gives up on the node)."""
        try:
            cause = await cause_since(launch.log_path, launch.ready_offset)
        except OSError:
            cause = None
        text = f": {cause.text}" if cause is not None else (f"; {guess}" if guess else "")
        unheard = launch.remote.unheard() if launch.remote is not None else []
        return text + "".join(f"; {line}" for line in unheard)

    async def _watch_health(self, launch: Launch) -> None:
        """While ready, check ``/health``: two 503s in a row mean the engine is dead."""
        bad = 0
        while not launch.exited.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(launch.exited.wait(), self.settings.health_interval)
            if launch.exited.is_set() or self._launch is not launch:
                return
            if self.machine.state is not S.READY:
                continue
            ok = await prober.healthy(self._session(), self.base, launch.upstream_headers)
            bad = bad + 1 if ok is False else 0
            if bad >= 2:
                message = f"vLLM ({launch.spec.model}) answers 503 on /health: its engine has died"
                message += await self._why_died(launch)
                if await self.machine.transition_if(frozenset({S.READY}), S.FAILED, error=message):
                    log.error("%s", message)
                return

    # -------------------------------------------------------------------- stop

    async def stop(self, *, drain: bool = True) -> Status:
        """Stop vLLM and its whole process tree (no-op when nothing runs). Switches under way or
        queued are cancelled first: a stop during a long load does not wait for the load."""
        await self.halt(drain=drain)
        return self.status()

    async def halt(self, *, drain: bool = True) -> StopOutcome:
        """:meth:`stop`, returning what the stop did (requests drained and cut)."""
        switches = [task for task in self._switches if not task.done()]
        for task in switches:
            task.cancel()
        if switches:
            await asyncio.gather(*switches, return_exceptions=True)
        async with self._lock:
            return await self._stop_locked(drain=drain)

    async def _stop_locked(self, *, drain: bool) -> StopOutcome:
        launch = self._launch
        if launch is None:  # nothing runs; settle a state left by a failed or cancelled start
            state = self.machine.state
            if state in (S.STARTING, S.READY, S.DRAINING, S.PARKING, S.SLEEPING, S.WAKING):
                await self.machine.transition(S.STOPPING)
            if state is not S.STOPPED:
                await self.machine.transition(S.STOPPED)
            return StopOutcome()
        outcome = StopOutcome()
        if drain and self.in_flight and not launch.exited.is_set():
            # New requests now wait for the next model; in-flight ones may finish (the drain).
            if self.machine.state is S.READY:
                await self.machine.transition(S.DRAINING)
            outcome.drained, outcome.cut = await self._drain()
        else:
            outcome.cut = self.in_flight
            self._drained(0, outcome.cut)
        if self.machine.state is not S.STOPPING:
            await self.machine.transition(S.STOPPING)
        if not launch.exited.is_set():
            context = self._context("pre_stop", pid=launch.pgid, **_launched(launch))
            outcome.reports += await self.hooks.call(context)
        closed = self._cut_upstreams()
        if closed:
            log.info("closed %d in-flight upstream request(s) of the stopping model", closed)
        await launch.terminate(grace=self._stop_grace())
        if self._launch is launch:
            self._launch = None
        await self.machine.transition(S.STOPPED, exit_code=launch.exit_code)
        context = self._context("post_stop", pid=launch.pgid, **_launched(launch))
        outcome.reports += await self.hooks.call(context)
        return outcome

    def _drained(self, drained: int, cut: int) -> None:
        """A stop or park found requests in flight: how many finished and how many were cut."""
        if drained or cut:
            self.events.publish("drain", self.name, drained=drained, cut=cut)

    async def _drain(self) -> tuple[int, int]:
        """Let the requests in flight finish (up to ``--drain-timeout``): (drained, still running)."""
        before = self.in_flight
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout)
        cut = self.in_flight
        drained = max(before - cut, 0)
        self._drained(drained, cut)
        if before:
            log.info("drained %d request(s); %d still running at the deadline", drained, cut)
        return drained, cut

    # --------------------------------------------------------------- sleep mode

    async def park(self) -> bool:
        """Put vLLM to sleep at this instance's sleep level (sleep mode), after the requests in
        flight finished: its process, port and log stay, its GPU memory goes. False (and
        stopped instead) if vLLM refused or failed; False too when not ready (nothing done)."""
        async with self._lock:
            launch = self._launch
            if self.machine.state is not S.READY or launch is None or not self.sleep_level:
                return False
            await self.machine.transition(S.PARKING)  # new requests wait from here on
            await self._drain()
            self._cut_upstreams()  # what outlived the drain (vLLM's mode=wait would wait for it)
            try:
                await self.hooks.call(self._context("pre_sleep", pid=launch.pgid))
            except HookVeto as veto:
                log.info(
                    "%s is stopped, not parked: plugin %s refused the sleep", self.name, veto.report.plugin
                )
                await self._stop_locked(drain=False)
                return False
            level, timeout = self.sleep_level, self.settings.stop_timeout
            before = await asyncio.to_thread(self._gpu_memory, launch)
            try:
                await sleep_calls.put_to_sleep(
                    self._session(), self.base, level, launch.upstream_headers, timeout
                )
            except sleep_calls.SleepCallFailed as exc:
                log.error("%s could not be put to sleep (%s); stopping it instead", self.name, exc)
                self.last_switch_error = f"sleep failed, stopped instead: {exc}"
                await self._stop_locked(drain=False)
                return False
            after = await asyncio.to_thread(self._gpu_memory, launch)
            if not gpumem.released(before, after):
                gib = f"{(after or 0) / 1024**3:.1f} GiB of {(before or 0) / 1024**3:.1f} GiB"
                cause = f"vLLM did not release its GPU memory when put to sleep (it still holds {gib})"
                log.error("%s: %s; stopping it", self.name, cause)
                self.last_switch_error = f"{cause}; stopped instead"
                await self._stop_locked(drain=False)
                return False
            await self.machine.transition(S.SLEEPING, sleep_level=level, slept_at=datetime.now(timezone.utc))
            log.info("%s is asleep (level %d, pid %d)", self.name, level, launch.pgid)
            await self.hooks.call(self._context("post_sleep", pid=launch.pgid))
            return True

    @staticmethod
    def _gpu_memory(launch: Launch) -> int | None:
        """The GPU memory ``launch``'s process group holds (``gpumem``; None: unknown). Blocking."""
        return gpumem.held_by(set(group_members(launch.pgid)) | {launch.pgid})

    async def wake(self) -> SwitchResult:
        """Wake a sleeping vLLM (weights back on its GPUs). A wake that fails or takes longer
        than ``--ready-timeout`` stops it and starts the model cold instead."""
        async with self._lock:
            launch = self._launch
            if self.machine.state is not S.SLEEPING or launch is None:
                return SwitchResult(changed=False, message=f"{self.name} is not asleep", status=self.status())
            started = time.monotonic()
            level = self.machine.snapshot.sleep_level or self.sleep_level
            await self.machine.transition(S.WAKING)
            await self.hooks.call(self._context("pre_wake", pid=launch.pgid))
            try:
                await asyncio.wait_for(
                    sleep_calls.wake_up(
                        self._session(),
                        self.base,
                        level,
                        launch.upstream_headers,
                        self.settings.ready_timeout,
                    ),
                    self.settings.ready_timeout,
                )
            except (sleep_calls.SleepCallFailed, asyncio.TimeoutError) as exc:
                reason = str(exc) or f"no answer within {self.settings.ready_timeout:g} s"
                log.error("waking %s failed (%s); starting it cold", self.name, reason)
                await self._stop_locked(drain=False)
                result = await self._switch_locked(launch.spec, force=True)
                result.message = f"{self.name} did not wake ({reason}); started cold instead"
                return result
            self.loaded_at = self.last_used = time.monotonic()
            await self.machine.transition(S.READY, sleep_level=None, slept_at=None)
            seconds = self.wake_seconds = round(time.monotonic() - started, 3)
            log.info("%s is awake after %.2f s", self.name, seconds)
            await self.hooks.call(self._context("post_wake", pid=launch.pgid))
            return SwitchResult(
                changed=True,
                woke=True,
                wake_seconds=seconds,
                message=f"{self.name} woke",
                status=self.status(),
            )

    def _stop_grace(self) -> float:
        """vLLM given --shutdown-timeout drains itself first: allow for that before SIGKILL."""
        own = self.settings.vllm_shutdown_timeout
        return self.settings.stop_timeout if own is None else max(self.settings.stop_timeout, own + 5.0)

    async def shutdown(self) -> None:
        """On proxy exit: cancel background work, then stop vLLM and wait for its tree to go."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stop()
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
