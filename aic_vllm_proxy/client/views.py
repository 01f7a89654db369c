"""What the clients return: the typed answer, also usable as the plain JSON dict.

The first client returned the JSON of ``GET /status`` as a dict, and notebooks written for it do
``st["model_spec"]``, ``st.get("running")`` and ``json.dumps(st)``. :class:`StatusDict` and
:class:`SwitchResultDict` are read-only dicts of the JSON fields (enums as their strings,
datetimes as ISO strings, exactly as the proxy sends them), whose attributes are the typed
values of the pydantic model (``st.state`` is a :class:`~aic_vllm_proxy.schemas.ProcessState`,
``st.started_at`` a :class:`~datetime.datetime`). ``print()`` shows a few readable lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, ClassVar, Generic, NoReturn, TypeVar

from pydantic import BaseModel

from aic_vllm_proxy.schemas import (
    HookReport,
    InstanceStatus,
    LoadResult,
    NodeStatus,
    ProcessState,
    Status,
    SwitchResult,
    UnloadResult,
    to_json,
)

M = TypeVar("M", bound=BaseModel)


class JsonView(dict[str, Any], Generic[M]):
    """A read-only dict of a pydantic model's JSON fields; its attributes are the model's.

    ``view["field"]`` is the JSON value, ``view.field`` the typed one; the model's methods work
    too (``view.model_dump()``). :meth:`as_model` returns the model itself (for type checkers,
    which see the attributes as ``Any``). ``dict(view)`` or ``view.copy()`` is a plain dict that
    may be changed.
    """

    __slots__ = ("_model",)
    #: Fields holding a nested model, shown as a view of their own (field name -> view class).
    _nested: ClassVar[dict[str, type[JsonView[Any]]]] = {}
    _model: M

    def __init__(self, model: M) -> None:
        data = to_json(model)
        for name, view in self._nested.items():
            data[name] = view(getattr(model, name))
        super().__init__(data)
        object.__setattr__(self, "_model", model)

    def as_model(self) -> M:
        """The pydantic model (typed for type checkers)."""
        return self._model

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # private and special names are never fields
            raise AttributeError(name)
        if name in self._nested:
            return self[name]  # the nested view: both typed attributes and JSON items
        return getattr(self._model, name)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *type(self._model).model_fields})

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._model,))  # pickle and copy rebuild it from the model

    def copy(self) -> dict[str, Any]:
        """A plain dict of the JSON fields, which may be changed."""
        return dict(self)

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            f"{type(self).__name__} is read-only: use dict(...) or .copy() for a dict you can change"
        )

    def __setitem__(self, key: str, value: Any) -> NoReturn:
        self._read_only()

    def __delitem__(self, key: str) -> NoReturn:
        self._read_only()

    def __ior__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        self._read_only()

    def clear(self) -> NoReturn:
        self._read_only()

    def pop(self, *args: Any) -> NoReturn:
        self._read_only()

    def popitem(self) -> NoReturn:
        self._read_only()

    def setdefault(self, *args: Any) -> NoReturn:
        self._read_only()

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._read_only()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({super().__repr__()})"


def status_lines(status: Status) -> list[str]:
    """``GET /status`` in a few readable lines (``print(proxy.status())``, ``aic-vllm-proxy status``)."""
    rows: list[tuple[str, str]] = [("state", status.state.value)]
    if status.model_spec:
        rows.append(("model", f"{status.model}  ({status.model_spec})"))
    if status.pid:
        rows.append(("pid", str(status.pid)))
    if status.started_at:
        started = status.started_at.isoformat(timespec="seconds")
        if status.ready_at and status.state in (ProcessState.READY, ProcessState.DRAINING):
            load = (status.ready_at - status.started_at).total_seconds()
            started += f"  (ready after {load:.1f} s)"
        rows.append(("started", started))
    if status.switching:
        rows.append(("switching to", status.target_model_spec or "?"))
    past = "" if status.state is ProcessState.FAILED else "last "  # of a process that is gone
    if status.error:
        rows.append((past + "error", status.error))
    if status.exit_code is not None:
        rows.append((past + "exit code", str(status.exit_code)))
    if status.log_path and not (status.state is ProcessState.STARTING and status.pid is None):
        rows.append(("log", status.log_path))  # not before it has its final name (with the pid)
    if status.in_flight:
        rows.append(("in flight", str(status.in_flight)))
    rows.append(("vLLM", f"{status.vllm_base} (proxy version {status.version or '?'})"))
    width = max(len(name) for name, _ in rows) + 1
    return [f"{name + ':':<{width}} {value}" for name, value in rows]


def _ago(seconds: float) -> str:
    """A duration in its largest whole unit: ``"45s"``, ``"12m"``, ``"3h"``, ``"2d"``."""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def instances_table(instances: Sequence[InstanceStatus], now: datetime | None = None) -> list[str]:
    """The instances of the fleet as a table (``aic-vllm-proxy ps``): one header line, then one
    line per instance. Times are relative to ``now`` (default: the current time)."""
    now = now or datetime.now(timezone.utc)
    header = ("NAME", "STATE", "MODEL", "GPUS", "UTIL", "IN FLIGHT", "WAITING", "LAST USED", "EXPIRES")
    rows: list[tuple[str, ...]] = [(*header, "PINNED", "PID")]
    for instance in instances:
        last_used = f"{_ago((now - instance.last_used).total_seconds())} ago" if instance.last_used else "-"
        expires = f"in {_ago((instance.expires_at - now).total_seconds())}" if instance.expires_at else "-"
        rows.append(
            (
                instance.name + (" *" if instance.primary else ""),
                instance.state.value
                + (f"/{instance.sleep_level}" if instance.state is ProcessState.SLEEPING else ""),
                instance.model or "-",
                ",".join(instance.gpus) or "all",
                f"{instance.gpu_memory_utilization:g}" if instance.gpu_memory_utilization else "-",
                str(instance.in_flight),
                str(instance.waiting),
                last_used,
                expires,
                "yes" if instance.pinned else "-",
                str(instance.pid) if instance.pid is not None else "-",
            )
        )
    return _table(rows)


def nodes_table(nodes: Sequence[NodeStatus]) -> list[str]:
    """The agents of ``GET /nodes`` as a table (``aic-vllm-proxy nodes``): one header line, then
    one line per node: its state, host, GPUs in use of those it has (``-``: none known, one rank
    at a time) and its ranks, each as ``model#rank pid state``."""
    rows: list[tuple[str, ...]] = [("NODE", "STATE", "HOST", "GPUS", "RANKS")]
    for node in nodes:
        ranks = ", ".join(
            f"{rank.instance}#{rank.rank} {rank.pid if rank.pid is not None else '-'} {rank.state}"
            for rank in node.ranks
        )
        gpus = f"{len(node.gpus_in_use)}/{len(node.gpus)}" if node.gpus else "-"
        rows.append((node.name, node.state, node.host, gpus, ranks or "-"))
    return _table(rows)


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """``rows`` (the header first) in columns two spaces apart."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _report_lines(reports: Sequence[HookReport]) -> list[str]:
    return [
        f"{report.plugin}.{report.hook}: {report.message or ('ok' if report.ok else 'failed')}"
        for report in reports
    ]


class StatusDict(JsonView[Status]):
    """``GET /status``: a read-only dict of its JSON fields whose attributes are typed (see
    :class:`~aic_vllm_proxy.schemas.Status`): ``st["state"] == "ready"``, ``st.state is
    ProcessState.READY``."""

    __slots__ = ()

    def __str__(self) -> str:
        return "\n".join(status_lines(self._model))


class SwitchResultDict(JsonView[SwitchResult]):
    """The result of a switch (see :class:`~aic_vllm_proxy.schemas.SwitchResult`); ``result["status"]``
    and ``result.status`` are the same :class:`StatusDict`."""

    __slots__ = ()
    _nested = {"status": StatusDict}

    def __str__(self) -> str:
        return "\n".join([self._model.message, *_report_lines(self._model.hook_reports)])


class LoadResultDict(JsonView[LoadResult]):
    """The result of a load (see :class:`~aic_vllm_proxy.schemas.LoadResult`): ``result.instance``
    is the typed :class:`~aic_vllm_proxy.schemas.InstanceStatus`, ``result["instance"]`` its JSON."""

    __slots__ = ()

    def __str__(self) -> str:
        return "\n".join([self._model.message, *_report_lines(self._model.hook_reports)])


class UnloadResultDict(JsonView[UnloadResult]):
    """The result of an unload (see :class:`~aic_vllm_proxy.schemas.UnloadResult`); ``result["status"]``
    and ``result.status`` are the same :class:`StatusDict`."""

    __slots__ = ()
    _nested = {"status": StatusDict}

    def __str__(self) -> str:
        return self._model.message
