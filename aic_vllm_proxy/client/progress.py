"""Following a model switch: deciding from ``GET /status`` when it is over, and showing its
progress (elapsed time, the lines of the new vLLM log that tell progress or trouble, the
plugins' hook reports, a one-line summary).

Nothing here does I/O on the network: the sync and the async client feed a :class:`SwitchWatch`
with the status answers, log lines and events (``GET /events``) they fetch, each in its own way,
and it tells them when to open the log stream and when the switch has succeeded or failed.
Which events are worth a new ``GET /status`` is decided here too (:func:`changes_status`). Only
:mod:`pydantic` models and the pure :mod:`aic_vllm_proxy.spec` are imported, so this works with the
``client`` extra alone.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from aic_vllm_proxy.schemas import (
    EVENT_TYPES,
    InstanceStatus,
    LoadResult,
    ProcessState,
    ProxyEvent,
    Status,
    SwitchResult,
)
from aic_vllm_proxy.spec import ModelSpec, SpecError

S = ProcessState

#: Print "still loading" after this many seconds without a log line.
HEARTBEAT_SECONDS = 30.0


@runtime_checkable
class Writable(Protocol):
    """Anything with ``write(str)``: a file, ``sys.stderr``, :class:`io.StringIO`."""

    def write(self, text: str, /) -> object: ...


#: A progress line goes to this callable.
Sink = Callable[[str], None]
#: What ``progress=`` accepts: True (print to stdout), False/None (silent), a stream, a callable.
ProgressArg = bool | None | Writable | Sink


def make_sink(progress: ProgressArg) -> Sink | None:
    """Turn a ``progress=`` argument into a function that shows one line (None: silent)."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return _stream_sink(None)
    if isinstance(progress, Writable):
        return _stream_sink(progress)
    if callable(progress):
        return progress
    raise TypeError(f"progress must be True, False, a stream or a callable, not {type(progress).__name__}")


def _stream_sink(stream: Writable | None) -> Sink:
    def show(line: str) -> None:
        target = stream if stream is not None else sys.stdout  # looked up late: Jupyter swaps it
        target.write(line + "\n")
        flush = getattr(target, "flush", None)
        if callable(flush):
            flush()

    return show


def _parsed(spec: str) -> ModelSpec | None:
    try:
        return ModelSpec.parse(spec)
    except SpecError:  # a spec the proxy would refuse: it is never the one loaded
        return None


#: States of a model parked with vLLM's sleep mode (or on its way in or out of it).
ASLEEP = (S.PARKING, S.SLEEPING, S.WAKING)


def woken(was: InstanceStatus | None, now: Status | InstanceStatus) -> bool:
    """``now`` is ready in the process that was asleep in ``was``: it was woken, not started."""
    return (
        was is not None
        and was.state in ASLEEP
        and now.state is S.READY
        and now.pid is not None
        and now.pid == was.pid
    )


def same_spec(a: str | None, b: str | None) -> bool:
    """The same launch, as the proxy compares specs (:attr:`ModelSpec.key`: quoting and spacing
    do not matter); a spec the proxy cannot parse is only the same as itself, word for word."""
    if a is None or b is None:
        return False
    parsed_a, parsed_b = _parsed(a), _parsed(b)
    if parsed_a is None or parsed_b is None:
        return a.split() == b.split()
    return parsed_a.key == parsed_b.key


def model_of(spec: str) -> str:
    parsed = _parsed(spec)
    return parsed.model if parsed is not None else spec


# ------------------------------------------------------------------ the log filter

#: A vLLM logger line: ``(EngineCore pid=7) INFO 11-27 09:10:54 [default_loader.py:501] message``
#: (older vLLM versions have no ``(process pid=N)`` prefix).
_VLLM_LINE = re.compile(
    r"^(?:\([^)]*\) )?(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[(?P<where>[^\]]*)\] ?(?P<message>.*)$"
)
#: uvicorn's own lines: ``INFO:     Application startup complete.``
_UVICORN_LINE = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL):\s+(?P<message>.*)$")
#: torch's C++ (glog) lines: ``W1127 09:10:33.233000 7530 torch/_library/triton.py:53] message``.
_GLOG_LINE = re.compile(r"^\[?(?P<level>[IWEF])\d{4} [\d:.]+ (?:\d+ )?(?P<where>\S+?)\] ?(?P<message>.*)$")
_GLOG_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
#: Python's warnings: ``/path/dispatcher.py:138: FutureWarning: message``.
_PY_WARNING = re.compile(r"^(?P<where>\S+:\d+): (?:\w+)?Warning: (?P<message>.*)$")
#: argparse refusing the command line: ``vllm serve: error: unrecognized arguments: --x``.
_USAGE_ERROR = re.compile(r"^[\w. -]+: error: ")
#: INFO messages that tell how far the start-up is: downloading and loading the weights, memory
#: and KV cache, torch.compile, CUDA graph capture, and ready.
_PROGRESS = re.compile(
    r"Starting to load model|downloading weights|Loading (?:model )?weights took|Model loading took"
    r"|Memory profiling|KV cache memory|KV cache size|GiB for KV cache|init engine"
    r"|Dynamo bytecode transform|Compiling a graph|compiled graph|torch\.compile takes"
    r"|Graph capturing finished|Application startup complete",
    re.IGNORECASE,
)
#: Distinct warnings shown from one place of vLLM's code before the rest are hidden.
WARNINGS_PER_SITE = 2
#: uvicorn's line once vLLM serves: the last line of the start-up, written just before the proxy
#: finds vLLM ready (so the log stream may still be carrying it when the status says ready).
READY_LINE = "Application startup complete"


class LogFilter:
    """Which lines of a vLLM start-up log the progress display shows.

    By default: the lines that tell progress (:data:`_PROGRESS`), warnings (a warning repeated
    by another vLLM process is shown once, and at most :data:`WARNINGS_PER_SITE` distinct ones
    per place in vLLM's code), errors, tracebacks with the exception's message, argparse errors
    and the proxy's own ``# ...`` lines. Hidden: the banner, the ``Route:`` list, progress bars
    and other INFO lines. ``verbose=True`` shows every line.
    """

    def __init__(self, *, verbose: bool = False) -> None:
        self.verbose = verbose
        self._in_traceback = False
        self._warnings_seen: set[tuple[str, str]] = set()
        self._warnings_per_site: dict[str, int] = {}

    def __call__(self, line: str) -> str | None:
        """The text to show for one log line (the line, or a note that replaces it); None: hide it."""
        text = line.rstrip("\r\n")
        if self.verbose:
            return text
        match = _VLLM_LINE.match(text) or _UVICORN_LINE.match(text) or _GLOG_LINE.match(text)
        if match is None:
            return self._unformatted(text)
        self._in_traceback = False  # a logger line ends the plain text of a traceback
        fields = match.groupdict()
        level = _GLOG_LEVELS.get(fields["level"], fields["level"])
        if level in ("ERROR", "CRITICAL"):
            return text
        if level == "WARNING":
            return self._warning(text, fields.get("where") or "uvicorn", fields["message"])
        return text if level == "INFO" and _PROGRESS.search(fields["message"]) else None

    def _unformatted(self, text: str) -> str | None:
        """A line without a logger's prefix: tracebacks and argparse errors are shown."""
        if not text.strip():
            return None
        if text.startswith("Traceback (most recent call last):"):
            self._in_traceback = True  # shown up to the next logger line: frames, the exception
        if self._in_traceback or text.startswith("# ") or _USAGE_ERROR.match(text):
            return text
        warning = _PY_WARNING.match(text)
        if warning is not None:
            return self._warning(text, warning["where"], warning["message"])
        return None

    def _warning(self, text: str, where: str, message: str) -> str | None:
        if (where, message) in self._warnings_seen:
            return None  # the same warning from another process of the same vLLM
        self._warnings_seen.add((where, message))
        count = self._warnings_per_site[where] = self._warnings_per_site.get(where, 0) + 1
        if count <= WARNINGS_PER_SITE:
            return text
        if count == WARNINGS_PER_SITE + 1:
            return f"(more warnings from [{where}] hidden: verbose=True or --verbose shows them)"
        return None


# ------------------------------------------------------------------ events

#: The ``GET /events`` types after which ``GET /status`` may tell something new: a state
#: transition, a launch's pid and log (``launched``), a switch's phase, a load, unload, eviction,
#: TTL expiry, restart, drain or failure, and ``dropped`` (this reader missed events). Not
#: ``hello`` nor ``hook`` (a report, shown as it is), nor a type this client does not know.
STATUS_CHANGES = EVENT_TYPES - {"hello", "hook"}


def changes_status(event: ProxyEvent) -> bool:
    """After ``event``, ``GET /status`` is worth reading again."""
    return event.type in STATUS_CHANGES


def hook_line(event: ProxyEvent) -> str:
    """A ``hook`` event as a progress line: ``hook post_switch (plugin X): veto: message``."""
    extra = event.model_extra or {}
    outcome = extra.get("outcome") or "?"
    message = extra.get("message")
    text = f"hook {extra.get('hook') or '?'} (plugin {extra.get('plugin') or '?'}): {outcome}"
    return f"{text}: {message}" if message else text


# ------------------------------------------------------------------ following a switch


@dataclass(frozen=True)
class Outcome:
    """How a switch, a load (or a wait) ended, as seen in the last status."""

    ok: bool
    status: Status
    message: str
    changed: bool = False
    #: The failure happened in a launch whose log has the details.
    has_log: bool = False
    #: For a load: the instance as last seen.
    instance: InstanceStatus | None = None
    #: It was asleep (sleep mode) and was woken: the same process, not a new launch.
    woke: bool = False

    @property
    def state(self) -> ProcessState:
        """The state it ended in: the instance's for a load, else the primary's."""
        return self.instance.state if self.instance is not None else self.status.state

    @property
    def exit_code(self) -> int | None:
        """vLLM's exit status, as far as ``/status`` tells (the primary's only)."""
        return self.status.exit_code if self.instance is None else None


class Watch:
    """What following a start has in common, whatever is started (:class:`SwitchWatch` for the
    primary, :class:`LoadWatch` for one instance of the fleet): the clock, the progress lines
    and the filter of the new launch's log.

    A subclass decides from each ``GET /status`` answer (:meth:`observe`) whether it is over.
    """

    #: The ``model`` whose log is followed (``?model=NAME``); None: the primary's.
    log_model: str | None = None
    #: A failure is a :class:`SwitchError` (a start that failed); False for a wait that found
    #: nothing loaded.
    starting = True

    def __init__(
        self,
        before: Status,
        *,
        sink: Sink | None = None,
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        verbose: bool = False,
    ) -> None:
        self.before = before
        self.sink = sink
        self.filter = LogFilter(verbose=verbose)
        self.timeout = timeout
        self._clock = clock
        self._start = clock()
        self._last_output = self._start
        self._announced: set[str] = set()
        #: Lines of the new launch's log received (shown or not); whether :data:`READY_LINE` was.
        self.log_lines_seen = 0
        self.ready_line_seen = False
        self.last: Status = before
        #: The ``X-Request-Id`` of the request that started what is followed (its events carry it).
        self.request_id: str | None = None

    # ------------------------------------------------------------------ timing

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def timed_out(self) -> bool:
        return self.timeout is not None and self.elapsed > self.timeout

    # ------------------------------------------------------------------ output

    def show(self, text: str) -> None:
        """One progress line, prefixed with the elapsed time."""
        self._last_output = self._clock()
        if self.sink is not None:
            self.sink(f"[{self.elapsed:7.1f}s] {text}")

    def _once(self, key: str, text: str) -> None:
        """Show ``text`` the first time ``key`` comes up."""
        if key not in self._announced:
            self._announced.add(key)
            self.show(text)

    def _ranks_started(self, instance: InstanceStatus | None) -> None:
        """A model across nodes: one line for each rank on another node once it runs."""
        for rank in instance.ranks if instance is not None else ():
            if rank.pid is not None:
                where = f" on {gpu_text(rank.gpus)}" if rank.gpus else ""
                self._once(
                    f"rank {rank.rank}",
                    f"rank {rank.rank} started on node {rank.node} (pid {rank.pid}){where}",
                )

    def log(self, line: str) -> None:
        """A line of the new launch's vLLM log: shown if :class:`LogFilter` keeps it."""
        self.log_lines_seen += 1
        self.ready_line_seen = self.ready_line_seen or READY_LINE in line
        shown = self.filter(line)
        if shown is not None:
            self.show(shown)

    def tick(self) -> None:
        """Say that we are still waiting when nothing was shown for a while."""
        if self._clock() - self._last_output >= HEARTBEAT_SECONDS:
            self.show(f"still waiting: {self.waiting_for()}")

    def summary(self, outcome: Outcome) -> None:
        self.show(outcome.message if outcome.ok else f"FAILED: {outcome.message}")

    def event(self, event: ProxyEvent) -> None:
        """An event of ``GET /events``: a hook's report is shown when it was not ok (every one
        when verbose) and it is about this wait (:meth:`concerns`)."""
        if event.type != "hook" or not self.concerns(event):
            return
        if self.filter.verbose or (event.model_extra or {}).get("outcome") != "ok":
            self.show(hook_line(event))

    def concerns(self, event: ProxyEvent) -> bool:
        """``event`` is about what is followed: caused by the request that started it
        (:attr:`request_id`), or by no request; any event when no request started it."""
        return self.request_id is None or event.request_id in (None, self.request_id)

    # ------------------------------------------------------------------ for subclasses

    def waiting_for(self) -> str:
        """What is awaited, for the heartbeat line: ``"MODEL is starting"``."""
        raise NotImplementedError

    def still_going(self) -> str:
        """What goes on after the client gave up waiting, and how to follow it or give up."""
        raise NotImplementedError

    def interrupted(self) -> None:
        """The caller interrupted the wait (Ctrl-C, a cancelled task)."""

    def wants_log(self, status: Status) -> bool:
        """The new launch's log file has its final name (the pid is known): follow it now."""
        raise NotImplementedError

    def launching(self, status: Status) -> bool:
        """A new launch has begun whose pid (and the log's final name) ``status`` does not show
        yet: they come a moment later (a ``launched`` event; daemons before it sent none, so the
        client also polls briefly meanwhile)."""
        raise NotImplementedError

    def observe(self, status: Status) -> Outcome | None:
        """Look at one ``/status`` answer; an :class:`Outcome` once it is over, else None."""
        raise NotImplementedError


class SwitchWatch(Watch):
    """Follows one switch (``spec`` given) or whatever the proxy is doing (``spec=None``).

    ``before`` is the status read just before the switch was requested: a launch is *new* when
    its ``started_at`` differs, so the previous model's ready state is never taken for the new one.
    """

    def __init__(
        self,
        spec: str | None,
        before: Status,
        *,
        sink: Sink | None = None,
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        label: str | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(before, sink=sink, timeout=timeout, clock=clock, verbose=verbose)
        self.spec = spec
        self.label = label or spec
        self.starting = spec is not None

    # ------------------------------------------------------------------ output

    def begin(self) -> None:
        if self.spec is None:
            return
        current = self.before.model_spec if self.before.state is S.READY else None
        target = self.label if self.label == self.spec else f"{self.label} ({self.spec})"
        replacing = f" (replacing {current})" if current and not same_spec(current, self.spec) else ""
        self.show(f"switching to {target}{replacing}")

    def waiting_for(self) -> str:
        status = self.last
        target = status.target_model_spec or status.model_spec or "the model"
        return f"{model_of(target)} is {status.state.value}"

    def still_going(self) -> str:
        status = self.last
        doing = f"switching to {status.target_model_spec}" if status.switching else f"{status.state.value}"
        return (
            f"the proxy is still {doing}. It goes on: wait with wait_until_ready() (or watch "
            "`aic-vllm-proxy status`), or give up with stop()."
        )

    def interrupted(self) -> None:
        if self.spec is not None:
            self.show("interrupted: the switch goes on in the proxy (wait_until_ready() or stop())")

    # ------------------------------------------------------------------ status

    def is_new_launch(self, status: Status) -> bool:
        if self._asleep_before(status) is not None:
            return False  # the primary now is a model that was parked: woken, not launched
        return status.started_at is not None and status.started_at != self.before.started_at

    def _asleep_before(self, status: Status) -> InstanceStatus | None:
        """The instance that runs ``status.pid``, as it was before, if it was asleep then."""
        was = next((i for i in self.before.instances if i.pid is not None and i.pid == status.pid), None)
        return was if was is not None and was.state in ASLEEP else None

    def wants_log(self, status: Status) -> bool:
        return self.is_new_launch(status) and status.pid is not None and status.log_path is not None

    def launching(self, status: Status) -> bool:
        return self.is_new_launch(status) and status.state is S.STARTING and not self.wants_log(status)

    def observe(self, status: Status) -> Outcome | None:
        self.last = status
        self._announce(status)
        if self.spec is None:
            return self._settled(status)
        return self._switched(status, self.spec)

    def _announce(self, status: Status) -> None:
        """One line for each phase worth knowing: draining, stopping the old model, the launch."""
        if self.is_new_launch(status):
            if status.pid is not None:
                self._once("launch", f"vLLM started (pid {status.pid}), log {status.log_path}")
                self._ranks_started(next((i for i in status.instances if i.pid == status.pid), None))
            return
        if self._asleep_before(status) is not None and status.pid is not None:
            self._once(
                "wake", f"waking {status.model or model_of(status.model_spec or '')} (pid {status.pid})"
            )
        if self.spec is None or same_spec(status.model_spec, self.spec):
            return
        if (
            status.state in (S.READY, S.DRAINING)
            and status.switching
            and status.in_flight
            and "drain" not in self._announced
        ):
            self._announced.add("drain")
            self.show(f"waiting for {status.in_flight} in-flight request(s) of {status.model_spec} to finish")
        elif status.state is S.STOPPING and "stop" not in self._announced:
            self._announced.add("stop")
            self.show(f"stopping {status.model_spec}")

    def _settled(self, status: Status) -> Outcome | None:
        if status.switching or status.state in (S.STARTING, S.DRAINING, S.STOPPING, S.PARKING, S.WAKING):
            return None
        if status.state is S.READY:
            return Outcome(True, status, f"{status.model} is ready")
        if status.state is S.FAILED:
            return Outcome(False, status, status.error or "vLLM failed", has_log=True)
        return Outcome(
            False, status, "No model is loaded: load one with switch(MODEL) or `aic-vllm-proxy switch MODEL`."
        )

    def _switched(self, status: Status, spec: str) -> Outcome | None:
        model = model_of(spec)
        new = self.is_new_launch(status)
        if status.state is S.READY and same_spec(status.model_spec, spec) and (new or not status.switching):
            if woken(self._asleep_before(status), status):
                return Outcome(
                    True, status, f"{status.model} woke after {self.elapsed:.1f} s", True, woke=True
                )
            return self._success(status, changed=new)
        if status.switching:
            return None
        # The switch is over and the requested model is not ready: say what happened instead.
        if new and status.state is S.FAILED:
            message = status.error or f"vLLM failed while starting {model}"
            return Outcome(False, status, message, has_log=True)
        if new and status.state is S.STOPPED:
            return Outcome(False, status, f"{model} was stopped before it was ready", has_log=True)
        if status.last_switch_error:  # refused, or failed on an instance other than the primary
            return Outcome(False, status, f"the switch to {model} failed: {status.last_switch_error}")
        hint = "a plugin may have refused it; the proxy's own log says why"
        if status.state is S.READY:
            message = f"the switch to {model} did not happen: {status.model_spec} is loaded ({hint})"
        else:
            message = f"the switch to {model} did not start and nothing is loaded ({hint})"
        return Outcome(False, status, message, has_log=new)

    def _success(self, status: Status, *, changed: bool) -> Outcome:
        served = status.model or model_of(status.model_spec or "")
        if not changed:
            message = f"{served} is already loaded with these arguments; nothing restarted"
            return Outcome(True, status, message, changed=False)
        load = load_seconds(status)
        took = f" (loading took {load:.1f} s)" if load is not None else ""
        return Outcome(True, status, f"{served} is ready after {self.elapsed:.1f} s{took}", changed=True)

    def result(self, outcome: Outcome) -> SwitchResult:
        """The :class:`SwitchResult` of a switch that succeeded."""
        status = outcome.status
        return SwitchResult(
            changed=outcome.changed,
            woke=outcome.woke,
            load_seconds=load_seconds(status) if outcome.changed and not outcome.woke else None,
            total_seconds=round(self.elapsed, 3),
            message=outcome.message,
            status=status,
            hook_reports=status.hook_reports,
        )


# ------------------------------------------------------------------ following a load


def find_instance(status: Status, name: str) -> InstanceStatus | None:
    """The instance ``name`` in ``status.instances``: by its name, else by a name it serves."""
    for instance in status.instances:
        if instance.name == name:
            return instance
    return next((instance for instance in status.instances if name in instance.served_names), None)


def gpu_text(gpus: list[str]) -> str:
    """``"GPU 0"``, ``"GPUs 0, 1"``, or the daemon's GPUs when none are named."""
    if not gpus:
        return "the daemon's GPUs"
    return f"GPU{'s' if len(gpus) > 1 else ''} {', '.join(gpus)}"


class LoadWatch(Watch):
    """Follows the load of one instance of the fleet (``POST /load``) in ``GET /status``'s
    ``instances``: its state changes and its launch (whose log is then followed with
    ``?model=NAME``), until it is ready or its load is over (``switching`` false).

    ``name`` is what was asked for (an entry or an alias); :meth:`accepted` takes the proxy's
    answer to ``POST /load``, which names the instance and the instances unloaded to make room.
    As for a switch, a launch is *new* when the instance's ``started_at`` differs from the one
    in ``before``.
    """

    def __init__(
        self,
        name: str,
        before: Status,
        *,
        sink: Sink | None = None,
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        verbose: bool = False,
    ) -> None:
        super().__init__(before, sink=sink, timeout=timeout, clock=clock, verbose=verbose)
        self.name = self.log_model = name
        self._was = find_instance(before, name)
        self._answer: LoadResult | None = None
        self.instance: InstanceStatus | None = self._was

    # ------------------------------------------------------------------ output

    def begin(self) -> None:
        self.show(f"loading {self.name}")

    def accepted(self, answer: LoadResult) -> None:
        """The proxy's answer to ``POST /load`` (with ``"wait": false``)."""
        self._answer = answer
        if answer.name != self.name:  # an alias, or a name the instance serves
            self._was = next((i for i in self.before.instances if i.name == answer.name), self._was)
            self.name = self.log_model = answer.name
        self.instance = instance = answer.instance
        for name in answer.evicted:
            self.show(f"unloaded {name} to make room")
        if answer.changed and instance.model_spec:
            self.show(f"{self.name}: {instance.model_spec} on {gpu_text(instance.gpus)}")

    def waiting_for(self) -> str:
        state = self.instance.state.value if self.instance is not None else "not listed"
        return f"{self.name} is {state}"

    def still_going(self) -> str:
        return (
            f"{self.waiting_for()}. It goes on in the proxy: wait for it with load({self.name!r}) "
            f"(which starts nothing twice), or give up with unload({self.name!r})."
        )

    def interrupted(self) -> None:
        self.show(f"interrupted: the load goes on in the proxy (load() to wait, unload({self.name!r}))")

    # ------------------------------------------------------------------ status

    def is_new_launch(self, instance: InstanceStatus) -> bool:
        before = self._was.started_at if self._was is not None else None
        return instance.started_at is not None and instance.started_at != before

    def wants_log(self, status: Status) -> bool:
        instance = find_instance(status, self.name)
        return (
            instance is not None
            and self.is_new_launch(instance)
            and instance.pid is not None
            and instance.log_path is not None
        )

    def launching(self, status: Status) -> bool:
        instance = find_instance(status, self.name)
        return (
            instance is not None
            and self.is_new_launch(instance)
            and instance.state is S.STARTING
            and not self.wants_log(status)
        )

    def observe(self, status: Status) -> Outcome | None:
        self.last = status
        instance = find_instance(status, self.name)
        if instance is None:  # a catalogue entry stays listed: a free-form one that failed
            last = self.instance
            new = last is not None and self.is_new_launch(last)
            message = f"{self.name} was unloaded before it was ready"
            return Outcome(False, status, message, has_log=new, instance=last)
        self.instance = instance
        new = self.is_new_launch(instance)
        if new and instance.pid is not None:
            self._once("launch", f"vLLM started (pid {instance.pid}), log {instance.log_path}")
            self._ranks_started(instance)
        restart = self._answer is None or self._answer.changed  # else it was loaded (or loading)
        if self._was is not None and self._was.state in ASLEEP and instance.pid == self._was.pid:
            self._once("wake", f"waking {self.name} (pid {instance.pid})")
        if woken(self._was, instance):
            message = f"{self.name} woke after {self.elapsed:.1f} s"
            return Outcome(True, status, message, changed=True, instance=instance, woke=True)
        if instance.state in (S.PARKING, S.WAKING):
            return None  # its wake waits for the park under way, or is under way
        if instance.state is S.READY and (new or not (restart or instance.switching)):
            return self._success(status, instance, changed=new and restart)
        if instance.switching:
            return None
        # The load is over and the instance is not ready: say what happened instead.
        if new or not restart:
            failed = instance.state is S.FAILED
            what = f"vLLM failed while starting {self.name}" if failed else None
            message = instance.error or what or f"{self.name} was stopped before it was ready"
            return Outcome(False, status, message, has_log=True, instance=instance)
        hint = "a plugin may have refused it; the proxy's own log says why"
        error = instance.error if instance.error != (self._was.error if self._was else None) else None
        message = f"the load of {self.name} did not start: {error or hint}"
        return Outcome(False, status, message, instance=instance)

    def _success(self, status: Status, instance: InstanceStatus, *, changed: bool) -> Outcome:
        if not changed and self._was is not None and self._was.state is S.READY:
            message = f"{self.name} is already loaded; nothing restarted"
            return Outcome(True, status, message, changed=False, instance=instance)
        load = load_seconds(instance)
        took = f" (loading took {load:.1f} s)" if load is not None else ""
        message = f"{self.name} is ready after {self.elapsed:.1f} s{took}"
        return Outcome(True, status, message, changed=changed, instance=instance)

    def result(self, outcome: Outcome) -> LoadResult:
        """The :class:`LoadResult` of a load that succeeded."""
        instance = outcome.instance
        assert instance is not None  # a load's outcome always has its instance
        return LoadResult(
            changed=outcome.changed,
            woke=outcome.woke,
            name=self.name,
            load_seconds=load_seconds(instance) if outcome.changed and not outcome.woke else None,
            total_seconds=round(self.elapsed, 3),
            evicted=self._answer.evicted if self._answer is not None else [],
            message=outcome.message,
            instance=instance,
            hook_reports=self._answer.hook_reports if self._answer is not None else [],
        )


def load_seconds(status: Status | InstanceStatus) -> float | None:
    """From launch to ready, by the proxy's clock."""
    if status.started_at is None or status.ready_at is None:
        return None
    return round((status.ready_at - status.started_at).total_seconds(), 3)
