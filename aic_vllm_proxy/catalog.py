"""The model catalogue and the argument policy: what may be loaded, checked before anything stops.

The catalogue comes from the config file::

    [models.llama-8b]
    model = "meta-llama/Llama-3.1-8B-Instruct"
    args = "--max-model-len 8192 --gpu-memory-utilization 0.9"
    aliases = ["llama"]
    description = "Llama 3.1 8B, 8k context"
    gpus = [0, 1]          # where it runs (default: all of the node's GPUs)
    ttl = 600              # seconds idle before it is unloaded (0: never; default --default-ttl)
    pinned = false         # true: never evicted (nor unloaded by its ttl)
    preload = false        # true: loaded when the daemon starts
    nodes = 2              # spans this many nodes: rank 0 here, the others on agents (--nnodes)

``gpu_memory_utilization`` (the share of each of its GPUs it takes) defaults to the
``--gpu-memory-utilization`` its ``args`` give, else vLLM's default; set as a key, it is passed
to vLLM (:attr:`CatalogEntry.spec_text`). :class:`Footprint` is what a model takes on the node,
resolved against the node's GPUs (:meth:`CatalogEntry.footprint`, :func:`spec_footprint`).

``/switch {"model_spec": "llama-8b"}`` (or an alias) loads that entry. With the policy ``catalog``
only catalogue entries may be loaded; with ``open`` (the default) any spec may, except that flags
on the deny-list (``--trust-remote-code`` unless allowed) are refused in specs users write, in
every spelling vLLM reads as them (``--trust_remote_code``, ``--trust-remote``: the flag scanner
of :mod:`aic_vllm_proxy.spec`, through ``ModelSpec.has_flag``).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from aic_vllm_proxy.spec import ModelSpec, SpecError
from aic_vllm_proxy.vllm_flags import FLAGS

DEFAULT_DENIED_FLAGS = ("--trust-remote-code",)
UTILIZATION_FLAG = "--gpu-memory-utilization"
#: The keys of an entry that place it on the node (issue 13).
FLEET_KEYS = ("gpus", "gpu_memory_utilization", "ttl", "pinned", "preload", "sleep", "nodes")
NNODES_FLAG = "--nnodes"
#: vLLM's own default share of each GPU (``--help`` of vLLM 0.32 says 0.92), from the flag table.
VLLM_DEFAULT_UTILIZATION = float(next(row[3] for row in FLAGS if row[0].split()[0] == UTILIZATION_FLAG))


def spec_utilization(spec: ModelSpec) -> float:
    """The share of each GPU vLLM takes for ``spec``: its ``--gpu-memory-utilization`` (in any
    spelling vLLM reads), else vLLM's default. A value that is not a number in (0, 1] is a
    :class:`SpecError` (vLLM refuses it too)."""
    value = spec.flag_value(UTILIZATION_FLAG)
    if value is None:
        return VLLM_DEFAULT_UTILIZATION
    return _share(value, f"{UTILIZATION_FLAG} {value!r}")


def _share(value: str, what: str) -> float:
    try:
        share = float(value)
    except ValueError:
        share = float("nan")
    if not 0 < share <= 1:  # NaN fails too
        raise SpecError(f"{what} is not a share of the GPU in (0, 1], e.g. 0.45")
    return share


@dataclass(frozen=True)
class Footprint:
    """What a model takes on the node and how long it may stay idle: its GPUs (empty when no GPU
    set is known: it then needs the whole node, one model at a time), the share of each of them
    (``gpu_memory_utilization``), its ``ttl`` in seconds (0: never unloaded for idling; always 0
    when pinned), ``pinned`` (never evicted) and ``preload`` (loaded at start-up)."""

    gpus: tuple[str, ...]
    utilization: float
    ttl: float = 0.0
    pinned: bool = False
    preload: bool = False
    sleep_level: int = 0  # vLLM's sleep mode: parked at this level instead of stopped (0: off)


def spec_footprint(
    spec: ModelSpec, node_gpus: Sequence[str], default_ttl: float, default_sleep: int = 0
) -> Footprint:
    """The footprint of a free-form spec (not a catalogue entry): all of the node's GPUs, the
    utilization its arguments give, ``--default-ttl`` and ``--default-sleep-level``."""
    return Footprint(
        gpus=tuple(node_gpus), utilization=spec_utilization(spec), ttl=default_ttl, sleep_level=default_sleep
    )


def with_served_names(spec: ModelSpec, names: Sequence[str]) -> ModelSpec:
    """``spec`` made to answer to ``names`` too: vLLM accepts a request's ``model`` only when it
    is one of its served names, so a catalogue entry is launched with
    ``--served-model-name FIRST NAME ALIASES...``, where FIRST is the name it would report
    anyway (its own ``--served-model-name``s, else the model). Unchanged when it answers to all
    of them already (vLLM takes the last ``--served-model-name`` given: the one appended wins)."""
    served = list(spec.served_names or (spec.model,))
    extra = [name for name in names if name not in served]
    if not extra:
        return spec
    return ModelSpec.parse(f"{spec.text} --served-model-name {shlex.join([*served, *extra])}")


def lora_names(spec: ModelSpec) -> tuple[str, ...]:
    """The LoRA adapters ``spec`` serves from the start (``--lora-modules name=path`` or vLLM's
    JSON form ``{"name": ..., "path": ...}``): requests may name them as models."""
    names = []
    for value in spec.flag_values("--lora-modules") or ():
        if value.lstrip().startswith("{"):
            try:
                found = json.loads(value).get("name")
            except (ValueError, AttributeError):
                continue
            if isinstance(found, str) and found:
                names.append(found)
        elif "=" in value:
            names.append(value.split("=", 1)[0])
    return tuple(names)


class CatalogEntry(BaseModel):
    """One ``[models.<name>]`` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    args: str = ""
    aliases: tuple[str, ...] = ()
    description: str = ""
    #: GPU names as ``CUDA_VISIBLE_DEVICES`` takes them (see ``engine/gpus.py``); None: all.
    gpus: tuple[str, ...] | None = None
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    ttl: float | None = Field(default=None, ge=0)
    pinned: bool = False
    preload: bool = False
    #: vLLM's sleep mode: park at this level instead of stopping (1: weights to host RAM, 2:
    #: weights dropped; 0: off); None: ``--default-sleep-level``.
    sleep: int | None = Field(default=None, ge=0, le=2)
    #: How many nodes it spans (vLLM's ``--nnodes``): rank 0 on the head, one rank on each of
    #: ``nodes - 1`` agents (docs/cluster.md); None: what ``args`` say, else one.
    nodes: int | None = Field(default=None, ge=1)

    @model_serializer(mode="wrap")
    def _without_unset_fleet_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """An entry that does not use a fleet key is listed (``GET /models/catalog``) as before
        they existed, so that older clients, which refuse unknown keys, still read it."""
        data: dict[str, Any] = handler(self)
        for key in FLEET_KEYS:
            if getattr(self, key) == type(self).model_fields[key].default:
                data.pop(key, None)
        return data

    @field_validator("args", mode="before")
    @classmethod
    def _join_list(cls, value: object) -> object:
        if isinstance(value, list):
            return shlex.join(str(v) for v in value)
        return value

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_names(cls, value: object) -> object:
        """``[0, 1]``, ``["GPU-8f3c..."]`` or ``"0,1"`` -> ``("0", "1")``."""
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError("give a list of GPU ids, e.g. [0, 1]")
        names: list[str] = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise ValueError(f"{item!r} is not a GPU id (an index like 0, or a UUID like 'GPU-...')")
            name = str(item).strip()
            if not name or name.startswith("-"):
                raise ValueError(f"{item!r} is not a GPU id (an index like 0, or a UUID like 'GPU-...')")
            if name in names:
                raise ValueError(f"GPU {name} is listed twice")
            names.append(name)
        if not names:
            raise ValueError("is empty; leave it out to use all of the node's GPUs")
        return tuple(names)

    @model_validator(mode="after")
    def _consistent(self) -> CatalogEntry:
        given = self._args_utilization()
        if given is not None:
            share = _share(given, f"args give {UTILIZATION_FLAG} {given!r}, which")
            if self.gpu_memory_utilization is not None and share != self.gpu_memory_utilization:
                raise ValueError(
                    f"gpu_memory_utilization = {self.gpu_memory_utilization} but args give "
                    f"{UTILIZATION_FLAG} {given}: set it in one place"
                )
        if self.nodes is not None:
            said = self._base_spec().flag_value(NNODES_FLAG) if self._args_readable() else None
            if said is not None and said != str(self.nodes):
                raise ValueError(
                    f"nodes = {self.nodes} but args give {NNODES_FLAG} {said}: set it in one place"
                )
        if self.pinned and self.ttl:
            raise ValueError(f"pinned = true and ttl = {self.ttl:g} contradict: a pinned model stays loaded")
        return self

    def _args_readable(self) -> bool:
        try:
            self._base_spec()
        except SpecError:
            return False
        return True

    def _base_spec(self) -> ModelSpec:
        return ModelSpec.parse(self._base_spec_text)

    def _args_utilization(self) -> str | None:
        """The ``--gpu-memory-utilization`` the args give (None: none, or args vLLM cannot read,
        which the switch reports)."""
        return self._base_spec().flag_value(UTILIZATION_FLAG) if self._args_readable() else None

    @property
    def _base_spec_text(self) -> str:
        return f"{shlex.quote(self.model)} {self.args}".strip()

    @property
    def spec_text(self) -> str:
        """The spec this entry loads; ``gpu_memory_utilization`` set as a key is passed on as
        ``--gpu-memory-utilization`` (unless ``args`` already say the same)."""
        text = self._base_spec_text
        if self.gpu_memory_utilization is not None and self._args_utilization() is None:
            text += f" {UTILIZATION_FLAG} {self.gpu_memory_utilization!r}"
        if (
            self.nodes is not None
            and self._args_readable()
            and self._base_spec().flag_value(NNODES_FLAG) is None
        ):
            text += f" {NNODES_FLAG} {self.nodes}"
        return text

    def footprint(self, node_gpus: Sequence[str], default_ttl: float, default_sleep: int = 0) -> Footprint:
        """What this entry takes on a node with ``node_gpus`` (empty: none known). Raises
        :class:`ValueError` (a :class:`SpecError` for bad args) naming the setting at fault."""
        if self.gpus is not None:
            unknown = [gpu for gpu in self.gpus if gpu not in node_gpus]
            if unknown:
                known = ", ".join(node_gpus) or "none known; give the node's GPUs with --gpus"
                raise ValueError(
                    f"gpus names GPU {', '.join(unknown)}, which is not one of the node's GPUs ({known})"
                )
        utilization = self.gpu_memory_utilization
        if utilization is None:
            utilization = spec_utilization(ModelSpec.parse(self.spec_text))
        return Footprint(
            gpus=tuple(node_gpus) if self.gpus is None else self.gpus,
            utilization=utilization,
            ttl=0.0 if self.pinned else (default_ttl if self.ttl is None else self.ttl),
            pinned=self.pinned,
            preload=self.preload,
            sleep_level=default_sleep if self.sleep is None else self.sleep,
        )


class CatalogInfo(BaseModel):
    """What ``GET /models/catalog`` lists."""

    policy: str
    denied_flags: list[str]
    models: dict[str, CatalogEntry] = Field(default_factory=dict)


class PolicyError(ValueError):
    """The spec is not allowed here; the message says why and what is allowed."""


def resolve(
    text: str,
    catalog: dict[str, CatalogEntry],
    *,
    policy: str,
    denied_flags: tuple[str, ...],
) -> tuple[ModelSpec, str | None]:
    """Turn the ``model_spec`` of a switch into a :class:`ModelSpec`, applying the policy.

    Returns the spec and the catalogue name it came from (None for a free-form spec). Raises
    :class:`SpecError` for a malformed spec and :class:`PolicyError` for a refused one.
    """
    words = text.split()
    name = words[0] if len(words) == 1 else None
    entry_name = None
    if name is not None:
        for key, entry in catalog.items():
            if name == key or name in entry.aliases:
                entry_name = key
                break
    if entry_name is not None:
        return ModelSpec.parse(catalog[entry_name].spec_text), entry_name
    spec = ModelSpec.parse(text)
    if policy == "catalog":
        known = ", ".join(sorted(catalog)) or "none configured"
        raise PolicyError(
            f"this proxy only loads models from its catalogue ({known}); {spec.model!r} is not one. "
            "Ask the admin to add it to the [models] section of the config, or see GET /models/catalog."
        )
    refused = sorted({flag for flag in denied_flags if spec.has_flag(flag)})
    if refused:
        raise PolicyError(
            f"{', '.join(refused)} is not allowed in model specs on this proxy (denied flags: "
            f"{', '.join(denied_flags)}). Ask the admin to allow it (--allow-flag) or to add a "
            "catalogue entry that uses it."
        )
    return spec, None


__all__ = [
    "DEFAULT_DENIED_FLAGS",
    "UTILIZATION_FLAG",
    "VLLM_DEFAULT_UTILIZATION",
    "CatalogEntry",
    "CatalogInfo",
    "Footprint",
    "PolicyError",
    "SpecError",
    "lora_names",
    "resolve",
    "spec_footprint",
    "spec_utilization",
    "with_served_names",
]
