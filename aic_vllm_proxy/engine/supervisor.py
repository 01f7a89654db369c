"""The fleet: the daemon's vLLM instances (``instance.py``) on one node, placed, routed and
evicted here; the web and relay planes talk to this class only.

- **The slot** is the instance ``/switch`` drives, on ``--vllm-port``: a switch there makes its
  spec the only model on its GPUs (the other instances there are drained and stopped first).
  With no catalogue and no ``--gpus`` it is the only instance, and everything is as it always
  was: one model at a time.
- **Loaded instances** are catalogue entries (or free-form specs) loaded beside it: by a request
  that names one (on demand), ``POST /load`` or ``preload``; each on its own port (the first free
  one after ``--vllm-port``), GPUs and log, named after its entry.
- **Placement** (``placement.py``): a model starts when its share fits on each of its GPUs;
  otherwise idle, unpinned instances there go, least recently used first (a busy one is drained
  first). A young instance with requests queued serves them before it can go (anti-thrash), so
  a load that finds only such instances in the way waits for them, up to the request's wait;
  what cannot make room is a 503 naming the models in the way.
- **Routing**: a request's ``model`` is looked up among the names each instance answers to
  (served names, entry name, aliases); a request without one goes to the **primary**, the
  instance most recently switched to or loaded.
- **TTL**: an idle instance is unloaded ``ttl`` seconds after its last request.
- **Sleep mode**: an instance with a sleep level is parked (``Instance.park``) where it would be
  stopped, and woken (``Instance.wake``) where it would be loaded; a ``/switch`` to such a spec
  loads it beside the slot, since a parked model keeps its port.

Placement decisions (and the evictions they need) are serialised per GPU: one lock each, so
loads on disjoint GPUs go on side by side; each instance serialises its own switches and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import replace
from pathlib import Path

import aiohttp

from aic_vllm_proxy.catalog import Footprint, lora_names, with_served_names
from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.engine.instance import Instance, StopOutcome, cancelled_by_stop, switch_outcome
from aic_vllm_proxy.engine.launch import Launch, port_is_free
from aic_vllm_proxy.engine.nodes import NodeRegistry
from aic_vllm_proxy.engine.placement import (
    HOLDING,
    Candidate,
    NoRoom,
    expired,
    expires_at,
    plan_room,
    shares_gpu,
)
from aic_vllm_proxy.engine.reports import StateReporter
from aic_vllm_proxy.engine.sleep import SLEEP_FLAG, host_memory_available
from aic_vllm_proxy.engine.state import ProcessStateMachine, StateEvent
from aic_vllm_proxy.errors import (
    EngineError,
    ModelNotFound,
    ModelUnavailable,
    SwitchCancelled,
    Unavailable,
    sentences,
)
from aic_vllm_proxy.events import UNHEARD, EventBus, detached
from aic_vllm_proxy.hooks.runner import HookRunner
from aic_vllm_proxy.schemas import InstanceStatus, LoadResult, ProcessState, Status, SwitchResult
from aic_vllm_proxy.spec import ModelSpec

log = logging.getLogger(__name__)
S = ProcessState
#: States of an instance on its way out: a load of it waits for the stop, then loads again.
GOING = frozenset({S.DRAINING, S.STOPPING})
#: States of an instance whose vLLM runs, holding GPU memory or parked (sleep mode).
PRESENT = HOLDING | {S.SLEEPING}
#: An instance in these states is woken before it takes a request.
ASLEEP = frozenset({S.PARKING, S.SLEEPING})

#: The slot's name until it has loaded something.
PRIMARY = "primary"
#: The longest a TTL check sleeps when no instance expires sooner (a change wakes it earlier).
TTL_CHECK = 30.0
TTL_MIN_CHECK = 0.5
#: A load that finds the instances in its way protected (young and busy) looks again this often
#: at the latest (any change of an instance wakes it earlier).
ROOM_RECHECK = 1.0


class Supervisor:
    """The daemon's instances. All public coroutines are safe to call concurrently."""

    def __init__(
        self,
        settings: Settings,
        session: Callable[[], aiohttp.ClientSession],
        hooks: HookRunner,
        events: EventBus = UNHEARD,
    ) -> None:
        self.settings = settings
        self._session = session
        self._hooks = hooks
        self.events = events  # what happens to the instances (GET /events, the metrics)
        self.node = tuple(settings.gpus)  # the node's GPUs (cli.on_this_node); empty: none known
        budget = settings.host_memory_budget
        if budget is None and (available := host_memory_available()) is not None:
            budget = int(available * 0.8)
        #: Host RAM the weights of level-1 sleepers may take (None: no limit known).
        self.host_budget = budget
        #: The agents on other nodes, for models across nodes (``--nnodes``).
        self.nodes = NodeRegistry(settings, events)
        self.slot = self._new_instance(PRIMARY, settings.vllm_port)
        self.slot.on_switch = self._slot_switching
        self.slot.before_start = self._before_slot_start
        self.slot.name_for = self._slot_name
        self._slot_entries: dict[tuple[str, ...], str | None] = {}  # queued switches' entries
        #: The instances loaded beside the slot, by name.
        self.loaded: dict[str, Instance] = {}
        self._recent: list[Instance] = [self.slot]  # most recently switched to or loaded first
        self._by_name: dict[str, Instance] = {}  # every name a request may give -> its instance
        self._locks: dict[str, asyncio.Lock] = {}  # placement locks by GPU ("": no GPU set)
        self._reserved: set[int] = set()  # ports picked by placements under way
        self._waiting_for: dict[str, int] = {}  # callers waiting for each placement under way
        self._blocked: dict[str, NoRoom] = {}  # what is in the way of each placement waiting
        self._placing: dict[str, asyncio.Task[Instance]] = {}  # loads being placed, by name
        self._placing_key: dict[str, tuple[str, ...]] = {}  # the spec each placement loads
        self._loads: dict[Instance, asyncio.Task[SwitchResult]] = {}  # each one's last load
        #: The /switch calls under way beside the slot (models parked by sleeping), in order,
        #: and why the last one failed (None: it did not, or a switch began since).
        self._beside: list[tuple[ModelSpec, asyncio.Task[SwitchResult]]] = []
        self._beside_error: str | None = None
        self._changed = asyncio.Event()  # set on a change of any instance (then replaced)
        self._listening = 0  # placements waiting for a change (else nothing to wake)
        self._expiring: set[Instance] = set()  # TTL stops under way
        self._tasks: set[asyncio.Task[object]] = set()
        self._ttl_task: asyncio.Task[None] | None = None
        self._ttl_kick = asyncio.Event()  # set when an instance is placed: the TTL checks look again
        self.primary = self.slot
        self.serving_any = False

    # ------------------------------------------------------------------- instances

    def _new_instance(self, name: str, port: int, footprint: Footprint | None = None) -> Instance:
        instance = Instance(
            self.settings,
            self._session,
            self._hooks,
            name=name,
            port=port,
            gpus=(footprint.gpus or None) if footprint else None,
            utilization=footprint.utilization if footprint else 0.0,
            ttl=footprint.ttl if footprint else 0.0,
            pinned=footprint.pinned if footprint else False,
        )
        instance.machine.subscribe(self._instance_changed)
        instance.machine.subscribe(StateReporter(instance, self.events))
        instance.events = self.events
        instance.nodes = self.nodes
        instance.on_idle = self._wake
        return instance

    @property
    def instances(self) -> list[Instance]:
        """The slot and every loaded instance."""
        return [self.slot, *self.loaded.values()]

    @property
    def routing(self) -> bool:
        """Whether requests are routed by their ``model``: there is a catalogue, or more than the
        slot. Otherwise every request goes to the slot as it always did (vLLM answers for names
        it does not know), and the body is not looked at."""
        return bool(self.settings.models) or bool(self.loaded)

    def _instance_changed(self, event: StateEvent) -> None:
        self._reindex()
        self._wake()

    def _wake(self) -> None:
        """Wake the loads waiting for room (:meth:`_make_room`) after any change of an instance:
        a state, or its last request finished. Nothing to do (on every request) when none waits."""
        if self._listening:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    def _reindex(self) -> None:
        """Rebuild the name -> instance table (after any change) and the primary."""
        table: dict[str, Instance] = {}
        for instance in reversed(self._recent):  # the most recent wins a name two instances give
            if _holding(instance):
                for name in instance.names:
                    table[name] = instance
        self._by_name = table
        self.primary = next((i for i in self._recent if _holding(i)), self.slot)
        #: Some instance takes requests (the front door serves requests only then); kept here,
        #: on every change, rather than looked up per request.
        self.serving_any = any(i.serving for i in self.instances)

    def _used(self, instance: Instance) -> None:
        """``instance`` is the most recently switched to or loaded: the primary."""
        if instance in self._recent:
            self._recent.remove(instance)
        self._recent.insert(0, instance)
        self._reindex()

    def find(self, name: str) -> Instance | None:
        """The instance that answers to ``name`` (holding a model or loading one), else one
        named so (stopped or failed), else None."""
        found = self._by_name.get(name)
        if found is not None:
            return found
        for instance in self.instances:
            if instance.name == name or name in instance.names:
                return instance
        return None

    def known_names(self) -> list[str]:
        """What a request's ``model`` may be: the names instances answer to and the catalogue's."""
        names = list(self._by_name)
        for key, entry in self.settings.models.items():
            names += [key, *entry.aliases]
        return sorted(set(names))

    # ------------------------------------------------------------- the primary's

    @property
    def machine(self) -> ProcessStateMachine:
        return self.primary.machine

    @property
    def launch(self) -> Launch | None:
        return self.primary.launch

    @property
    def serving(self) -> bool:
        return self.primary.serving

    @property
    def waiting(self) -> int:
        return self.primary.waiting

    def status(self) -> Status:
        """The primary's status, with every instance in ``instances``; a ``/switch`` under way
        beside the slot (:meth:`_begin_beside`) is pending in it as a switch of the slot is."""
        status = self.primary.status()
        status.instances = self.instance_statuses()
        if self._beside:
            pending = [spec.raw for spec, _ in self._beside]
            status.switching = True
            status.target_model_spec = pending[0]
            status.pending_model_specs = list(dict.fromkeys([*pending, *status.pending_model_specs]))
        if self._beside_error is not None:
            status.last_switch_error = self._beside_error
        return status

    def instance_statuses(self) -> list[InstanceStatus]:
        return [i.instance_status(primary=i is self.primary) for i in self.instances if self._listed(i)]

    def _listed(self, instance: Instance) -> bool:
        """Whether ``/status`` lists ``instance``: the slot once it has loaded something, and
        not while it no longer runs and an instance loaded beside it has its name (switched to
        ``b``, stopped, then ``b`` loaded: that one is ``b`` now)."""
        if instance is not self.slot:
            return True
        if not (instance.machine.snapshot.model_spec or instance.switching):
            return False
        return _holding(instance) or instance.name not in self.loaded

    def current_log(self, name: str | None = None, rank: int = 0) -> Path | None:
        """The log of the instance ``name`` (None: the primary's), of its rank ``rank`` on
        another node for a model across nodes; None for a catalogue entry never loaded (no log
        yet) or a rank it never had."""
        if name is not None and self.find(name) is None and self.entry_named(name) is not None:
            return None
        return self._named(name).current_log(rank)

    def log_is_live(self, fd: int, name: str | None = None, rank: int = 0) -> bool:
        return self._named(name).log_is_live(fd, rank)

    def _named(self, name: str | None) -> Instance:
        """The instance ``name`` (None: the primary); :class:`ModelNotFound` if there is none."""
        if name is None:
            return self.primary
        found = self.find(name)
        if found is None:
            raise ModelNotFound(name, [i.name for i in self.instances if i.names])
        return found

    # ----------------------------------------------------------------- routing

    def route(self, model: str | None) -> Instance | None:
        """The instance a request naming ``model`` goes to, when that is known at once (no load
        needed); None when :meth:`admit` must load it or say why not."""
        if model is None or not self.routing:
            return self.primary
        return self._by_name.get(model)

    async def admit(self, model: str | None, timeout: float) -> Instance:
        """The instance a request naming ``model`` goes to, ready to take it: loaded on demand
        and waited for (bounded by ``timeout``). Returns with no await after the check that it
        serves, so the caller can count the request in flight before anything else runs.
        Raises :class:`ModelNotFound` or :class:`ModelUnavailable`."""
        deadline = time.monotonic() + timeout
        for attempt in (1, 2, 3):
            instance = self.route(model)
            placed = instance is None
            if instance is None:
                assert model is not None
                instance = await self._on_demand(model, deadline)
            if instance.serving:
                return instance
            if instance.machine.state in ASLEEP:
                instance = await self._awaken(instance, self._footprint_of(instance), deadline)
                placed = True
            # What is left of the wait after a placement (its message says the time waited).
            left = max(deadline - time.monotonic(), 0.0) if placed or attempt > 1 else timeout
            try:
                await instance.wait_for_model(left)
            except ModelUnavailable as exc:
                failed = self._load_error(instance)
                if failed is not None:
                    raise failed from None  # its load was refused or failed: say why
                # It went (idle TTL, eviction) while the request waited: load it again once.
                again = exc.why is Unavailable.NOTHING_LOADED and model is not None and self.routing
                if attempt < 3 and again and self.settings.on_demand_enabled:
                    continue
                raise
            if instance.serving:  # still: the wait's last steps may have seen it begin to go
                return instance
            if time.monotonic() >= deadline:
                break
        raise ModelUnavailable(
            f"{model or 'The model'} went away while this request waited. Retry.",
            why=Unavailable.NOTHING_LOADED,
            state=S.STOPPED,
        )

    async def _on_demand(self, model: str, deadline: float) -> Instance:
        """Load the catalogue entry a request names (on-demand loading), or say why not."""
        entry = self.entry_named(model)
        if entry is None or not self.settings.on_demand_enabled:
            instance = self.find(model)
            if instance is not None:
                return instance  # stopped or failed: waiting for it says why
            lora = self._lora_instance()
            if entry is None and lora is not None:
                return lora  # an adapter loaded at run time, maybe: its vLLM answers for the name
            if entry is not None:
                raise ModelUnavailable(
                    f"{model} is not loaded, and this proxy loads no model on demand "
                    f'(--no-on-demand). Load it with POST /load {{"model": "{entry}"}}.',
                    why=Unavailable.NOTHING_LOADED,
                    state=S.STOPPED,
                )
            raise ModelNotFound(model, self.known_names())
        spec, footprint = self._entry_spec(entry)
        return await self.ensure(entry, spec, footprint, deadline=deadline)

    def _load_error(self, instance: Instance) -> EngineError | None:
        """Why the last load of ``instance`` failed (a veto, vLLM's error), if it did."""
        task = self._loads.get(instance)
        if task is None or not task.done() or task.cancelled():
            return None
        exc = task.exception()
        return exc if isinstance(exc, EngineError) else None

    def _lora_instance(self) -> Instance | None:
        """The most recently used instance that serves LoRA adapters (``--enable-lora``), which
        may load adapters at run time under names the proxy cannot know."""
        for instance in self._recent:
            launch = instance.launch
            if _holding(instance) and launch is not None and launch.spec.has_flag("--enable-lora"):
                return instance
        return None

    def entry_named(self, name: str) -> str | None:
        """The catalogue entry ``name`` is the name or an alias of, else the one entry whose
        model it is (a request may name the model as vLLM reports it)."""
        by_model = []
        for key, entry in self.settings.models.items():
            if name == key or name in entry.aliases:
                return key
            if name == entry.model:
                by_model.append(key)
        return by_model[0] if len(by_model) == 1 else None

    def _entry_spec(self, entry: str) -> tuple[ModelSpec, Footprint]:
        item = self.settings.models[entry]
        spec = ModelSpec.parse(item.spec_text)
        return spec, self.settings.footprint(spec, entry, self.node)

    def names_for(
        self, spec: ModelSpec, entry: str | None, sleep_level: int = 0
    ) -> tuple[ModelSpec, tuple[str, ...]]:
        """The spec to launch for ``entry`` (answering to its name and aliases too; with
        ``--enable-sleep-mode`` when it is parked by sleeping) and every name it answers to."""
        if sleep_level and not spec.has_flag(SLEEP_FLAG):
            spec = ModelSpec.parse(f"{spec.text} {SLEEP_FLAG}")
        if entry is None:
            return spec, (*(spec.served_names or (spec.model,)), *lora_names(spec))
        item = self.settings.models[entry]
        launched = with_served_names(spec, (entry, *item.aliases))
        return launched, (*launched.served_names, *lora_names(launched))

    # ------------------------------------------------------------------- loads

    async def ensure(
        self, name: str, spec: ModelSpec, footprint: Footprint, *, deadline: float | None = None
    ) -> Instance:
        """The instance ``name`` running (or loading) ``spec``: an instance already doing so,
        or a new one, placed (evicting what must go) and its load begun. Requests for a model
        being placed wait for the same placement (they are served together), each up to its
        own ``deadline`` (None: as long as it takes); the placement gives up waiting for room
        once nobody waits for it."""
        entry = name if name in self.settings.models else None
        launched, names = self.names_for(spec, entry, footprint.sleep_level)
        current = self._running(name, launched)
        if current is not None:
            if current.machine.state in ASLEEP:
                return await self._awaken(current, footprint, deadline)
            return current
        return await self._join(
            name, launched.key, lambda: self._place(name, launched, names, footprint), deadline
        )

    async def _join(
        self,
        name: str,
        key: tuple[str, ...],
        begin: Callable[[], Awaitable[Instance]],
        deadline: float | None,
    ) -> Instance:
        """Wait for the placement of ``name`` (a load, or a wake: ``key``, what it loads), begun
        by ``begin`` unless one of the same key is under way; one of another key goes first.
        Each caller waits up to its own ``deadline`` (None: as long as it takes); a placement
        cancelled by a stop or unload is :class:`SwitchCancelled` for its waiters."""
        placing = self._placing.get(name)
        while placing is not None and self._placing_key.get(name) != key:
            # Another spec under this name is being placed: it goes first, then this one.
            await asyncio.wait([placing])
            placing = self._placing.get(name)
        if placing is None:
            placing = asyncio.ensure_future(begin())
            self._placing[name] = placing
            self._placing_key[name] = key
            placing.add_done_callback(lambda done: self._placed(name, done))
        self._waiting_for[name] = self._waiting_for.get(name, 0) + 1
        try:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            return await asyncio.wait_for(asyncio.shield(placing), left)
        except asyncio.TimeoutError:
            raise self._no_room(name, self._blocked.get(name)) from None
        except asyncio.CancelledError:
            if placing.cancelled():  # by a stop or unload, not this caller's own cancellation
                raise SwitchCancelled(f"The load of {name} was cancelled: a stop was requested.") from None
            raise
        finally:
            self._waiting_for[name] -= 1
            if not self._waiting_for[name]:
                del self._waiting_for[name]

    def _placed(self, name: str, done: asyncio.Task[Instance]) -> None:
        if self._placing.get(name) is done:
            del self._placing[name]
            self._placing_key.pop(name, None)
        self._blocked.pop(name, None)
        if not done.cancelled():
            done.exception()  # retrieved: the waiters that are left got it

    def _no_room(self, name: str, plan: NoRoom | None) -> ModelUnavailable:
        """The 503 of a load that found no room (``plan``: what is in the way)."""
        if plan is None:
            return ModelUnavailable(
                f"Timed out waiting to load {name}. Retry later, or see GET /status.",
                why=Unavailable.NO_ROOM,
                state=S.STOPPED,
                retry_after=ROOM_RECHECK * 10,
            )
        pinned_only = all(b.pinned for b in plan.blockers)
        advice = (
            "Unpin one, or unload one with POST /unload"
            if pinned_only
            else "Retry when they are idle, or unload one with POST /unload"
        )
        return ModelUnavailable(
            sentences(f"Cannot load {name} now: {plan.message}", advice),
            why=Unavailable.NO_ROOM,
            state=S.STOPPED,
            retry_after=None if pinned_only else (plan.retry_after or ROOM_RECHECK * 10),
        )

    def _running(self, name: str, spec: ModelSpec) -> Instance | None:
        """The instance answering to ``name`` that runs (or loads, or has parked) exactly
        ``spec`` and is not on its way out, if any."""
        current = self._by_name.get(name)
        if current is None or not _same_launch(current, spec) or current.machine.state in GOING:
            return None
        return current

    @contextlib.asynccontextmanager
    async def _gpus_locked(self, gpus: tuple[str, ...]) -> AsyncIterator[None]:
        """Hold the placement locks of ``gpus`` (:meth:`_gpu_locks`) inside ``async with``."""
        async with contextlib.AsyncExitStack() as held:
            for lock in self._gpu_locks(gpus):
                await held.enter_async_context(lock)
            yield

    def _gpu_locks(self, gpus: tuple[str, ...]) -> list[asyncio.Lock]:
        """The placement locks of ``gpus`` (all of them for a model without a GPU set), in one
        order: placements on disjoint GPUs go on side by side, those that share one in turn."""
        keys = sorted(set(gpus)) if gpus else sorted({"", *self.node})
        return [self._locks.setdefault(key, asyncio.Lock()) for key in keys]

    async def _place(
        self, name: str, spec: ModelSpec, names: tuple[str, ...], footprint: Footprint
    ) -> Instance:
        """Make room for ``name`` and begin its load (under the placement locks of its GPUs)."""
        async with self._gpus_locked(footprint.gpus):
            current = self._running(name, spec)  # loaded meanwhile (a /switch to it, say)?
            if current is not None:
                return current
            old = self.loaded.get(name)
            if old is not None and _holding(old):  # another spec under this name: it goes first
                await self._evict_all([old], stop=True)
            await self._make_room(Candidate(name, footprint.gpus, footprint.utilization), old)
            current = self._running(name, spec)  # loaded while this waited for room?
            if current is not None:
                return current
            self._prune()
            port = await self._free_port(keep=old)
            try:
                if old is not None:
                    instance = old
                    instance.move_to(port)
                else:
                    instance = self._new_instance(name, port, footprint)
                _apply(instance, footprint, names)
                self.loaded[name] = instance
            finally:
                self._reserved.discard(port)  # the instance has it now (or the placement failed)
            # Pending (holding its room) from this step on.
            self._loads[instance] = instance.switch_in_background(spec)
            self._used(instance)
            self._ensure_ttl_task()
            log.info("loading %s on %s (port %d)", name, _where(footprint.gpus), instance.port)
            return instance

    async def _make_room(self, candidate: Candidate, own: Instance | None = None) -> None:
        """Unload (or drain and stop) what must go for ``candidate`` to fit (``own``: its own
        instance, if it has one, left out). While only young busy instances are in the way,
        wait for them as long as someone waits for this load; pinned ones in the way are a 503
        at once."""
        while True:
            by_name = self._keyed(candidate.name, own)
            views = [replace(i.view(), name=key) for key, i in by_name.items()]
            plan = plan_room(candidate, views, time.monotonic(), self.settings.min_residency)
            if isinstance(plan, NoRoom):
                self._blocked[candidate.name] = plan
                if all(b.pinned for b in plan.blockers) or not self._waiting_for.get(candidate.name):
                    raise self._no_room(candidate.name, plan)
                changed = self._changed
                self._listening += 1
                try:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(changed.wait(), ROOM_RECHECK)
                finally:
                    self._listening -= 1
                continue
            going = [by_name[n] for n in plan.evictions]
            for each in going:
                self.events.publish("eviction", each.name, reason="room")
            if going:
                log.info("making room for %s: unloading %s", candidate.name, ", ".join(plan.evictions))
            await self._evict_all(going, drain=plan.drain)
            for waited in plan.wait_for:
                await by_name[waited].machine.wait_for(lambda s: s.state not in HOLDING, None)
            if not plan.evictions and not plan.wait_for:
                return

    def _keyed(self, name: str, own: Instance | None) -> dict[str, Instance]:
        """The instances other than ``own`` by a name unique among them for placement, which
        tells instances apart by name: another instance named ``name`` too (the slot switched
        to that entry, say) is keyed ``name@port``, so that it counts against the candidate."""
        keyed: dict[str, Instance] = {}
        for instance in self.instances:
            if instance is not own:
                key = instance.name
                if key == name or key in keyed:
                    key = f"{instance.name}@{instance.port}"
                keyed[key] = instance
        return keyed

    async def _evict_all(
        self, instances: list[Instance], *, drain: Collection[str] | None = None, stop: bool = False
    ) -> None:
        """Evict ``instances`` (:meth:`_evict`; ``drain``: the names drained first, None: all;
        ``stop``: stopped, never parked), each in a task of its own: a caller that goes away (a
        client hanging up, a switch cancelled) never leaves a stop half done."""
        tasks: list[asyncio.Task[object]] = []
        for instance in instances:
            drained = drain is None or instance.name in drain
            work = instance.halt(drain=drained) if stop else self._evict(instance, drain=drained)
            task: asyncio.Task[object] = asyncio.ensure_future(work)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            tasks.append(task)
        if tasks:
            await asyncio.shield(asyncio.gather(*tasks))

    async def _evict(self, instance: Instance, *, drain: bool = True) -> None:
        """Make ``instance`` give its GPUs back: parked with sleep mode when it has a sleep level
        (its requests in flight finish first), else drained (when ``drain``) and stopped."""
        parkable = instance.sleep_level > 0 and instance.serving
        if parkable and await self._host_room(instance) and await instance.park():
            return
        await instance.stop(drain=drain)

    async def _host_room(self, instance: Instance) -> bool:
        """Whether ``instance`` may park: at level 1 its weights go to host RAM, and the weights
        of the level-1 sleepers stay within ``--host-memory-budget``; the least recently used
        sleepers are stopped to make room. False when its weights alone exceed the budget."""
        if instance.sleep_level != 1 or self.host_budget is None:
            return True
        need = instance.weights_bytes or 0
        if need > self.host_budget:
            log.info("%s is stopped, not parked: its weights exceed --host-memory-budget", instance.name)
            return False
        sleepers = sorted(
            (
                i
                for i in self.instances
                if i.machine.state is S.SLEEPING and i.machine.snapshot.sleep_level == 1
            ),
            key=lambda i: i.last_used,
        )
        held = sum(i.weights_bytes or 0 for i in sleepers)
        while sleepers and held + need > self.host_budget:
            oldest = sleepers.pop(0)
            log.info(
                "stopping %s, asleep: host RAM for %s (--host-memory-budget)", oldest.name, instance.name
            )
            held -= oldest.weights_bytes or 0
            self.events.publish("eviction", oldest.name, reason="host_memory")
            await oldest.stop(drain=False)
        return True

    def _footprint_of(self, instance: Instance) -> Footprint:
        """What ``instance`` takes on the node, as placement reads it."""
        return Footprint(
            gpus=instance.gpus or (),
            utilization=instance.utilization,
            ttl=instance.ttl,
            pinned=instance.pinned,
            sleep_level=instance.sleep_level,
        )

    async def _awaken(self, instance: Instance, footprint: Footprint, deadline: float | None) -> Instance:
        """Wake the sleeping (or parking) ``instance``: room is made on its GPUs as for a load,
        then vLLM is woken (a failed wake starts it cold). Requests for it share one wake."""
        launch = instance.launch
        key = launch.spec.key if launch is not None else (instance.name,)
        return await self._join(instance.name, key, lambda: self._place_awaken(instance, footprint), deadline)

    async def _place_awaken(self, instance: Instance, footprint: Footprint) -> Instance:
        """Under its GPUs' placement locks: wait for a park under way to end, make room, wake."""
        async with self._gpus_locked(footprint.gpus):
            await instance.machine.wait_for(lambda s: s.state is not S.PARKING, None)
            if instance.machine.state is not S.SLEEPING:
                return instance  # stopped meanwhile: waiting for it says so (a request loads it again)
            await self._make_room(Candidate(instance.name, footprint.gpus, footprint.utilization), instance)
            self._used(instance)
            await instance.wake()  # under the locks: its room is not taken while it wakes
            return instance

    def _prune(self) -> None:
        """Forget loaded free-form instances that no longer run (catalogue entries stay listed,
        stopped, with their last error and their port)."""
        for name, instance in list(self.loaded.items()):
            if name not in self.settings.models and not _holding(instance):
                self._forget(name)

    def _forget(self, name: str) -> None:
        """Drop the loaded instance ``name`` (it no longer runs) and what the fleet keeps of it."""
        instance = self.loaded.pop(name)
        self._loads.pop(instance, None)
        if instance in self._recent:
            self._recent.remove(instance)

    async def _free_port(self, keep: Instance | None = None) -> int:
        """The first port after ``--vllm-port`` that no other instance has and no other process
        listens on (``keep``'s own port is kept when it is still free: a catalogue entry keeps
        its port from load to load). The port is reserved (``_reserved``) from the moment it is
        picked: placements on other GPUs pick at the same time; :meth:`_place` releases it
        once the instance has it."""
        if keep is not None and keep.port not in self._reserved and await self._reserve(keep.port):
            return keep.port
        port = self.settings.vllm_port
        while True:
            port += 1
            if port in self._reserved or any(i.port == port for i in self.instances if i is not keep):
                continue
            if await self._reserve(port):
                return port

    async def _reserve(self, port: int) -> bool:
        """Reserve ``port`` if no other process listens on it (released again if not, or if
        the placement is cancelled meanwhile)."""
        self._reserved.add(port)
        try:
            free = await asyncio.to_thread(port_is_free, self.settings.vllm_host, port)
        except BaseException:
            self._reserved.discard(port)
            raise
        if not free:
            self._reserved.discard(port)
        return free

    async def load(self, name: str, spec: ModelSpec, footprint: Footprint, *, wait: bool) -> LoadResult:
        """``POST /load``: ``name`` loaded beside the others (see :meth:`ensure`); waits until it
        is ready when ``wait``. Raises the load's :class:`EngineError`."""
        started = time.monotonic()
        entry = name if name in self.settings.models else None
        launched, _ = self.names_for(spec, entry, footprint.sleep_level)
        before = self._by_name.get(name)
        changed = before is None or not _same_launch(before, launched)
        asleep = before is not None and not changed and before.machine.state in ASLEEP
        launched_at = before.machine.snapshot.started_at if before is not None else None
        held = {i.name for i in self.instances if _holding(i)}
        # Waiting, it waits for room as long as it takes; in the background, for a request's wait.
        deadline = None if wait else time.monotonic() + self.settings.request_wait_timeout
        instance = await self.ensure(name, spec, footprint, deadline=deadline)
        task = self._loads.get(instance)
        if wait and task is not None:
            await instance.outcome(task, launched)  # raises why it failed (log tail and all)
        elif wait and not instance.serving:
            await instance.wait_for_model(self.settings.ready_timeout + self.settings.stop_timeout)
        evicted = sorted(held - {i.name for i in self.instances if _holding(i)} - {name})
        snap = instance.machine.snapshot
        cold = snap.started_at != launched_at  # vLLM was started (a failed wake starts it cold too)
        load_seconds = None
        if (changed or cold) and instance.serving and snap.ready_at and snap.started_at:
            load_seconds = round((snap.ready_at - snap.started_at).total_seconds(), 3)
        woke = asleep and instance.serving and not cold
        return LoadResult(
            changed=changed or asleep,
            woke=woke,
            name=instance.name,
            load_seconds=load_seconds,
            wake_seconds=instance.wake_seconds if woke else None,
            total_seconds=round(time.monotonic() - started, 3),
            evicted=evicted,
            message=f"{name} is {'ready' if instance.serving else 'loading'}"
            + ("" if changed else " (it was loaded already)"),
            instance=instance.instance_status(primary=instance is self.primary),
            hook_reports=instance.hook_reports,
        )

    def preload(self) -> None:
        """Begin loading the catalogue entries marked ``preload`` (at start-up)."""
        for name in self.settings.models:
            spec, footprint = self._entry_spec(name)
            if footprint.preload:
                self._spawn(self._preload(name, spec, footprint))

    async def _preload(self, name: str, spec: ModelSpec, footprint: Footprint) -> None:
        try:
            await self.load(name, spec, footprint, wait=True)
        except EngineError as exc:
            log.error("preloading %s failed: %s", name, exc.message)

    # ------------------------------------------------------------------ switch

    async def switch(self, spec: ModelSpec, *, force: bool = False, entry: str | None = None) -> SwitchResult:
        """``POST /switch``: ``spec`` becomes the only model on its GPUs (and the primary). It
        loads in the slot, unless an instance loaded beside it runs exactly that already (that
        one stays), or it is parked by sleeping rather than stopped: then it loads beside the
        slot (:meth:`_switch_beside`). The others on its GPUs go (parked when they can)."""
        footprint = self.settings.footprint(spec, entry, self.node)
        if footprint.sleep_level:
            return await switch_outcome(self._begin_beside(spec, entry, footprint, force), spec)
        launched = self._queue_slot(spec, entry)
        running = self._running_elsewhere(spec, entry, force)
        if running is not None:
            return await self._keep(running)
        return await self.slot.switch(launched, force=force)

    def switch_in_background(
        self, spec: ModelSpec, *, force: bool = False, entry: str | None = None
    ) -> ModelSpec:
        """Begin :meth:`switch` (pending in ``/status`` from this call on); returns the spec
        it launches (an entry's, with the flags the proxy adds), which ``/status`` will show."""
        footprint = self.settings.footprint(spec, entry, self.node)
        if footprint.sleep_level:
            self._begin_beside(spec, entry, footprint, force)
            return self.names_for(spec, entry, footprint.sleep_level)[0]
        launched = self._queue_slot(spec, entry)
        running = self._running_elsewhere(spec, entry, force)
        if running is not None:
            self._spawn(self._keep(running))
        else:
            self.slot.switch_in_background(launched, force=force)
        return launched

    def _queue_slot(self, spec: ModelSpec, entry: str | None) -> ModelSpec:
        """The spec the slot launches for ``spec``; the entry it came from is remembered for
        when its switch begins (:meth:`_slot_switching`)."""
        launched = self.names_for(spec, entry)[0]
        self._slot_entries[launched.key] = entry
        self._beside_error = None  # a new switch: the last one's failure is history
        return launched

    def _begin_beside(
        self, spec: ModelSpec, entry: str | None, footprint: Footprint, force: bool
    ) -> asyncio.Task[SwitchResult]:
        """Begin a ``/switch`` beside the slot (:meth:`_switch_beside`). It is pending in
        ``/status`` (``switching``, ``target_model_spec``) from this very step, and its failure
        shows there as ``last_switch_error``, as a switch of the slot does."""
        launched = self.names_for(spec, entry, footprint.sleep_level)[0]
        name = entry or spec.served_name
        self._beside_error = None
        self.events.publish("switch", name, phase="queued", model_spec=launched.raw)
        task = asyncio.ensure_future(self._switch_beside(spec, entry, footprint, force, launched))
        pending = (launched, task)
        self._beside.append(pending)

        def done(_: object) -> None:
            self._beside.remove(pending)
            if task.cancelled():
                self._beside_error = cancelled_by_stop(launched)
            elif (exc := task.exception()) is None:
                seconds = task.result().total_seconds
                self.events.publish("switch", name, phase="done", model_spec=launched.raw, seconds=seconds)
                return
            elif isinstance(exc, EngineError):
                self._beside_error = exc.message
                log.warning("the switch to %s failed: %s", launched.model, exc.message)
            error = self._beside_error or "the switch failed; see the daemon's log"
            self.events.publish("switch", name, phase="failed", model_spec=launched.raw, error=error)

        task.add_done_callback(done)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _switch_beside(
        self, spec: ModelSpec, entry: str | None, footprint: Footprint, force: bool, launched: ModelSpec
    ) -> SwitchResult:
        """``/switch`` to a model parked by sleeping (``sleep`` > 0): it is loaded (or woken)
        beside the slot, on a port of its own (the slot's ``--vllm-port`` is for models that
        stop: a parked model keeps its port), as ``POST /load`` would; then it becomes the
        primary and the others on its GPUs go. ``force``: a running one is stopped first and
        started again. ``launched``: the spec it launches (:meth:`names_for`'s, as queued)."""
        started = time.monotonic()
        name = entry or spec.served_name
        self.events.publish("switch", name, phase="started", model_spec=launched.raw)
        old = self.loaded.get(name)
        if force and old is not None and _holding(old):
            await self._evict_all([old], stop=True)
        loaded = await self.load(name, spec, footprint, wait=True)
        instance = self.loaded[loaded.name]
        await self._keep(instance)  # the primary; the others on its GPUs go
        return SwitchResult(
            changed=loaded.changed,
            woke=loaded.woke,
            load_seconds=loaded.load_seconds,
            wake_seconds=loaded.wake_seconds,
            total_seconds=round(time.monotonic() - started, 3),
            message=f"{name} "
            + (
                "woke"
                if loaded.woke
                else "is ready"
                if loaded.changed
                else "is already loaded with these arguments; nothing restarted"
            ),
            status=self.status(),
            hook_reports=loaded.hook_reports,
        )

    def _running_elsewhere(self, spec: ModelSpec, entry: str | None, force: bool) -> Instance | None:
        """An instance loaded beside the slot that runs (or has parked) exactly ``spec``."""
        launched = self.names_for(spec, entry)[0]
        found = self.loaded.get(entry or launched.served_name)
        if force or found is None or not (found.serving or found.machine.state in ASLEEP):
            return None
        same = _same_launch(found, self.names_for(spec, entry, found.sleep_level)[0])
        return found if same else None

    async def _keep(self, instance: Instance) -> SwitchResult:
        """``/switch`` to what ``instance`` runs already: it stays (woken if asleep) and is the
        primary; the others on its GPUs go."""
        started = time.monotonic()
        self._used(instance)
        woke = instance.machine.state in ASLEEP
        if woke:
            await self._awaken(instance, self._footprint_of(instance), None)
        view = instance.view()
        others = [
            i
            for i in self.instances
            if i is not instance and _on_gpus(i) and shares_gpu(view, i.view())  # parked ones stay
        ]
        for each in others:
            self.events.publish("eviction", each.name, reason="switch")
        await self._evict_all(others)
        return SwitchResult(
            changed=woke,
            woke=woke and instance.serving,
            wake_seconds=instance.wake_seconds if woke and instance.serving else None,
            total_seconds=round(time.monotonic() - started, 3),
            message=f"{instance.name} "
            + ("woke" if woke else "is already loaded with these arguments; nothing restarted"),
            status=self.status(),
        )

    def _slot_switching(self, spec: ModelSpec) -> None:
        """The slot's switch to ``spec`` begins: it is named after what it loads, takes that
        footprint and becomes the primary."""
        slot = self.slot
        entry = self._slot_entries.get(spec.key)  # kept: a restart switches to the same spec
        footprint = self.settings.footprint(spec, entry, self.node)
        slot.name = self._slot_name(spec)
        _apply(slot, footprint, self.names_for(spec, entry)[1])
        # The slot's own model is stopped by the next switch, never parked (the slot keeps
        # --vllm-port; a spec with a sleep level is switched to beside it: _switch_beside).
        slot.sleep_level = 0
        self._used(slot)
        self._ensure_ttl_task()

    def _slot_name(self, spec: ModelSpec) -> str:
        """The slot's name while it runs ``spec``: the entry it came from, else its served name."""
        return self._slot_entries.get(spec.key) or spec.served_name

    async def _before_slot_start(self, spec: ModelSpec) -> None:
        """Before the slot launches: the other instances on its GPUs (or under its name) are
        drained and stopped."""
        slot = self.slot
        view = slot.view()
        others = [
            i
            for i in self.loaded.values()
            if (_holding(i) and i.name == slot.name) or (_on_gpus(i) and shares_gpu(view, i.view()))
        ]
        for each in others:
            self.events.publish("eviction", each.name, reason="switch")
        if others:
            log.info("switching to %s: stopping %s", slot.name, ", ".join(i.name for i in others))
            await self._evict_all(others)
        for name, instance in list(self.loaded.items()):
            if name == slot.name and not _holding(instance):  # the slot has its name now
                self._forget(name)

    # -------------------------------------------------------------------- stop

    async def unload(self, name: str, *, drain: bool = True) -> tuple[str, bool, StopOutcome]:
        """Drain (unless not ``drain``) and stop the instance ``name``; returns its name, whether
        it ran and what the stop did. A catalogue entry never loaded did not run; anything else
        unknown is :class:`ModelNotFound`."""
        self._cancel_placement(name)
        instance = self.find(name)
        if instance is None:
            entry = self.entry_named(name)
            if entry is None:
                raise ModelNotFound(name, self.known_names())
            return entry, False, StopOutcome()
        ran = _holding(instance)
        return instance.name, ran, await instance.halt(drain=drain)

    async def stop(self, *, drain: bool = True) -> Status:
        """Stop every instance (in parallel), every load still being placed and every switch
        under way beside the slot."""
        for name in list(self._placing):
            self._cancel_placement(name)
        for _, task in self._beside:
            task.cancel()
        await asyncio.gather(*(i.stop(drain=drain) for i in self.instances))
        return self.status()

    def _cancel_placement(self, name: str) -> None:
        """A stop or unload of ``name`` cancels its load still being placed (its waiters get
        :class:`SwitchCancelled`); a load already begun is the instance's to cancel."""
        placing = self._placing.get(name)
        if placing is not None and not placing.done():
            log.info("cancelling the load of %s: a stop was requested", name)
            placing.cancel()

    async def stop_across_nodes(self) -> None:
        """Stop the models across nodes (at shutdown, while their agents can still be told)."""
        spanning = [i for i in self.instances if i.launch is not None and i.launch.remote is not None]
        await asyncio.gather(*(instance.stop() for instance in spanning))

    async def shutdown(self) -> None:
        """On proxy exit: stop every instance and wait for their process trees to go."""
        tasks: list[asyncio.Future[object]] = [*self._tasks]
        tasks += self._placing.values()  # type: ignore[arg-type]
        if self._ttl_task is not None:
            tasks.append(self._ttl_task)  # type: ignore[arg-type]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(i.shutdown() for i in self.instances))
        self.nodes.close()

    # --------------------------------------------------------------------- TTL

    def _ensure_ttl_task(self) -> None:
        """Start the TTL checks once an instance has a ttl; a new instance makes them look again
        (its ttl may be the shortest)."""
        if self._ttl_task is None and any(i.ttl > 0 for i in self.instances):
            self._ttl_task = asyncio.ensure_future(detached(self._expire_idle()))
        self._ttl_kick.set()

    async def _expire_idle(self) -> None:
        """Unload each instance idle for its ``ttl`` (``pre_stop``/``post_stop`` run as for any
        stop). It looks again at the next expiry, and at least every tenth of the shortest ttl
        (an instance that goes idle is not waited for: requests cost nothing here), so an
        instance goes at most a tenth of its ttl late."""
        while True:
            now = time.monotonic()
            sleep = TTL_CHECK
            for instance in self.instances:
                if instance.ttl <= 0:
                    continue
                sleep = min(sleep, max(instance.ttl / 10, TTL_MIN_CHECK))
                view = instance.view()
                if expired(view, instance.ttl, now):
                    if instance not in self._expiring:
                        self._expiring.add(instance)
                        self._spawn(self._expire(instance))
                elif (due := expires_at(view, instance.ttl)) is not None:
                    sleep = min(sleep, due - now)
            self._ttl_kick.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ttl_kick.wait(), max(sleep, TTL_MIN_CHECK))

    async def _expire(self, instance: Instance) -> None:
        try:
            verb = "parking" if instance.sleep_level else "unloading"
            log.info("%s %s: idle for %g s (its ttl)", verb, instance.name, instance.ttl)
            await self._evict(instance)
            parked = instance.machine.state is S.SLEEPING
            self.events.publish("ttl", instance.name, outcome="parked" if parked else "stopped")
        finally:
            self._expiring.discard(instance)

    def _spawn(self, coro: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        """Start-up: the TTL checks, and the entries marked ``preload``."""
        self._ensure_ttl_task()
        self.preload()


def _apply(instance: Instance, footprint: Footprint, names: tuple[str, ...]) -> None:
    """Give ``instance`` the footprint and names of what it is about to load."""
    instance.gpus = footprint.gpus or None
    instance.utilization = footprint.utilization
    instance.ttl = footprint.ttl
    instance.pinned = footprint.pinned
    instance.sleep_level = footprint.sleep_level
    instance.names = names


def _on_gpus(instance: Instance) -> bool:
    """The instance holds GPU memory (or is about to: a load queued); a parked one does not."""
    return instance.machine.state in HOLDING or instance.switching


def _holding(instance: Instance) -> bool:
    """The instance runs a model (awake or asleep) or is loading one (a switch queued or under
    way)."""
    return instance.machine.state in PRESENT or instance.switching


def _same_launch(instance: Instance, spec: ModelSpec) -> bool:
    """``instance`` runs (or is loading) exactly ``spec``."""
    snap = instance.machine.snapshot
    current = snap.pending[-1].raw if snap.pending else snap.model_spec
    return current is not None and ModelSpec.parse(current).key == spec.key


def _where(gpus: tuple[str, ...]) -> str:
    return f"GPUs {','.join(gpus)}" if gpus else "the node's GPUs"


__all__ = ["PRIMARY", "Supervisor"]
