"""The model catalogue and the argument policy: what may be loaded, checked before anything stops.

The catalogue comes from the config file::

    [models.llama-8b]
    model = "meta-llama/Llama-3.1-8B-Instruct"
    args = "--max-model-len 8192 --gpu-memory-utilization 0.9"
    aliases = ["llama"]
    description = "Llama 3.1 8B, 8k context"

``/switch {"model_spec": "llama-8b"}`` (or an alias) loads that entry. With the policy ``catalog``
only catalogue entries may be loaded; with ``open`` (the default) any spec may, except that flags
on the deny-list (``--trust-remote-code`` unless allowed) are refused in specs users write, in
every spelling vLLM reads as them (``--trust_remote_code``, ``--trust-remote``: the flag scanner
of :mod:`aic_vllm_proxy.spec`, through ``ModelSpec.has_flag``).
"""

from __future__ import annotations

import shlex

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aic_vllm_proxy.spec import ModelSpec, SpecError

DEFAULT_DENIED_FLAGS = ("--trust-remote-code",)


class CatalogEntry(BaseModel):
    """One ``[models.<name>]`` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    args: str = ""
    aliases: tuple[str, ...] = ()
    description: str = ""

    @field_validator("args", mode="before")
    @classmethod
    def _join_list(cls, value: object) -> object:
        if isinstance(value, list):
            return shlex.join(str(v) for v in value)
        return value

    @property
    def spec_text(self) -> str:
        return f"{shlex.quote(self.model)} {self.args}".strip()


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


__all__ = ["DEFAULT_DENIED_FLAGS", "CatalogEntry", "CatalogInfo", "PolicyError", "SpecError", "resolve"]
