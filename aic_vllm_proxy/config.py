"""Settings: command-line options > ``AIC_VLLM_PROXY_<NAME>`` environment variables > TOML file > defaults.

:class:`Settings` is the one description of the daemon's settings: its fields (type, default,
description) are the command-line options (``cli.py`` builds them from it), except the fields
named in :data:`NOT_OPTIONS`; :data:`OPTION_FIELDS` names the options spelled unlike their field.

The TOML file (``--config``) has a ``[proxy]`` table with the same names as the options
(underscores), and a ``[plugins.<name>]`` table per plugin for that plugin's own settings::

    [proxy]
    port = 8224
    vllm_command = "vllm serve"
    ready_timeout = 1800

    [plugins.warmup]
    prompt = "Hello"

    [models.llama-8b]              # the catalogue (see catalog.py)
    model = "meta-llama/Llama-3.1-8B-Instruct"
    args = "--max-model-len 8192"
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from aic_vllm_proxy.catalog import DEFAULT_DENIED_FLAGS, CatalogEntry, Footprint, spec_footprint
from aic_vllm_proxy.spec import ModelSpec, flag_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "AIC_VLLM_PROXY_"


#: ``--host`` values that listen on every address: no use in a URL.
WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which setting and why."""


def http_base(host: str, port: int) -> str:
    """``http://HOST:PORT`` for a vLLM listening there (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Settings(BaseModel):
    """Everything the daemon is configured with. Field names are the option names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="0.0.0.0", description="Address the proxy listens on.")
    port: int = Field(
        default=8224, ge=0, le=65535, description="Port the proxy listens on (0: one the kernel picks)."
    )
    connection_file: Path | None = Field(
        default=None,
        description="Once listening, write the URL, admin key, pid and port here (JSON, mode 0600); "
        "removed when the daemon exits.",
    )
    advertise_host: str | None = Field(
        default=None,
        description="Host name or address the connection file's URL gives (default: --host when it "
        "is one address, else this node's hostname).",
    )
    vllm_command: str = Field(
        default="vllm serve",
        description="How to run vLLM; split like a shell would but never run through one.",
    )
    vllm_host: str = Field(default="127.0.0.1", description="Loopback address vLLM listens on.")
    vllm_port: int = Field(default=8225, ge=1, le=65535, description="Port vLLM listens on.")
    log_dir: Path = Field(default=Path("logs/vllm"), description="Where vLLM's logs go, one file per launch.")
    ready_timeout: float = Field(
        default=1800.0, gt=0, description="Seconds a launch may take to become ready."
    )
    stop_timeout: float = Field(
        default=15.0, ge=0, description="Seconds between SIGTERM and SIGKILL of vLLM's group."
    )
    request_wait_timeout: float = Field(
        default=600.0,
        ge=0,
        description="Seconds a proxied request waits for a switch in progress before a 503.",
    )
    health_interval: float = Field(
        default=5.0, ge=0, description="Seconds between health checks of a ready vLLM (0: off)."
    )
    probe_interval: float = Field(
        default=0.05, gt=0, description="Seconds between readiness probes while vLLM starts."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="The proxy's own log level."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="The proxy's own log lines as text, or one JSON object a line."
    )
    access_log: bool = Field(default=False, description="Log every request (costs a little per request).")
    events_keepalive: float = Field(
        default=15.0, gt=0, description="Seconds between keep-alive comments on GET /events."
    )
    event_queue_size: int = Field(
        default=1000,
        ge=1,
        description="Events held for each slow /events reader before the oldest are dropped.",
    )
    plugins_enable: tuple[str, ...] = Field(
        default=(), description="Only these plugins (entry-point names); empty: all installed."
    )
    plugins_disable: tuple[str, ...] = Field(default=(), description="Plugins not to load.")
    hook_timeout: float = Field(default=60.0, gt=0, description="Seconds one hook call may take.")
    plugin_settings: dict[str, dict[str, Any]] = Field(default_factory=dict)
    config_file: Path | None = None
    # --- access control (auth.py)
    admin_keys: tuple[str, ...] = Field(default=(), description="Keys that may do everything.")
    api_keys: tuple[str, ...] = Field(default=(), description="Keys for the API and /status only.")
    keys_file: Path | None = Field(default=None, description="File of 'admin KEY' / 'user KEY' lines.")
    metrics_key: tuple[str, ...] = Field(default=(), description="Keys that may only scrape /proxy/metrics.")
    # --- what may be loaded (catalog.py)
    model_policy: Literal["open", "catalog"] = Field(
        default="open", description="open: any spec; catalog: only [models.*] entries."
    )
    denied_flags: tuple[str, ...] = Field(
        default=DEFAULT_DENIED_FLAGS, description="vLLM flags refused in free-form specs."
    )
    allowed_flags: tuple[str, ...] = Field(
        default=(), description="vLLM flags taken off the deny-list, e.g. --trust-remote-code."
    )
    models: dict[str, CatalogEntry] = Field(default_factory=dict, description="The catalogue.")
    # --- several models on one node (catalog.Footprint, engine/gpus.py, engine/placement.py)
    gpus: tuple[str, ...] = Field(
        default=(),
        description="The node's GPUs (indices or UUIDs as CUDA_VISIBLE_DEVICES takes them); "
        "default: CUDA_VISIBLE_DEVICES, else the GPUs NVML counts, else none (one model at a time).",
    )
    on_demand: bool | None = Field(
        default=None,
        description="Load the catalogue model a request names (default: on when there is a catalogue).",
    )
    default_ttl: float = Field(
        default=0.0, ge=0, description="Seconds a model may sit idle before it is unloaded (0: never)."
    )
    min_residency: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a freshly loaded model with requests waiting is safe from eviction.",
    )
    # --- a model across nodes (engine/nodes.py, docs/cluster.md)
    node_wait: float = Field(
        default=300.0,
        ge=0,
        description="Seconds a load of a model across nodes (--nnodes) waits for enough agents with room.",
    )
    # --- vLLM's sleep mode (engine/sleep.py)
    default_sleep_level: int = Field(
        default=0,
        ge=0,
        le=2,
        description="Park models with vLLM's sleep mode at this level instead of stopping them "
        "(1: weights to host RAM, 2: weights dropped; 0: off); a catalogue entry's sleep wins.",
    )
    host_memory_budget: int | None = Field(
        default=None,
        ge=0,
        description="Host RAM the weights of models parked at sleep level 1 may take, e.g. 200GiB "
        "(default: 80% of MemAvailable at start).",
        json_schema_extra={"unit": "bytes"},  # a size: "200GiB" on the command line too
    )
    # --- graceful switching and limits
    drain_timeout: float = Field(
        default=30.0, ge=0, description="Seconds in-flight requests may take to finish before a stop."
    )
    max_waiting: int = Field(
        default=1000, ge=0, description="Requests that may wait for a model at once; more get 503."
    )
    vllm_shutdown_timeout: float | None = Field(
        default=None, ge=0, description="Pass --shutdown-timeout N to vLLM (vLLM >= 0.18 drains itself)."
    )
    restart: Literal["off", "on-failure"] = Field(
        default="off", description="Restart a model that died after it was ready."
    )
    max_restarts: int = Field(default=3, ge=0, description="Restarts in a row before giving up.")
    restart_backoff: float = Field(
        default=5.0, ge=0, description="Seconds before the first restart (doubles each time)."
    )
    max_body_size: int = Field(
        default=100 * 1024 * 1024, gt=0, description="Largest request body in bytes (413 beyond)."
    )
    client_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a client may pause while sending a body (408) or not read its answer (cut).",
    )

    @field_validator("vllm_command")
    @classmethod
    def _command_splits(cls, value: str) -> str:
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split vllm_command {value!r}: {exc}") from exc
        if not words:
            raise ValueError("vllm_command is empty; the default is 'vllm serve'")
        return value

    @field_validator("host_memory_budget", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        """``"200GiB"``, ``"512MB"``, ``"1e9"`` or a number -> bytes."""
        return parse_bytes(value) if isinstance(value, str) else value

    @field_validator("gpus", mode="before")
    @classmethod
    def _node_gpu_names(cls, value: Any) -> Any:
        """``[0, 1]`` (TOML) or ``"0,1"`` -> ``("0", "1")``; a name given twice is refused."""
        if isinstance(value, str):
            value = names_list(value) or ()
        if isinstance(value, (list, tuple)):
            names = [str(item).strip() for item in value if not isinstance(item, bool)]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ValueError(f"GPU {', '.join(twice)} is given twice")
            if any(not name or name.startswith("-") for name in names) or len(names) != len(value):
                raise ValueError("give GPU ids: indices like 0 or UUIDs like GPU-...")
            return tuple(names)
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _choices_in_any_case(cls, value: Any, info: ValidationInfo) -> Any:
        """A choice (``log_level``, ``restart``, ...) is taken in any case, as its option is."""
        field = cls.model_fields[info.field_name] if info.field_name else None
        if isinstance(value, str) and field is not None and get_origin(field.annotation) is Literal:
            return value.lower()
        return value

    @property
    def effective_denied_flags(self) -> tuple[str, ...]:
        """The deny-list less the allowed flags, each compared by its main spelling
        (``--trust_remote_code`` allows ``--trust-remote-code``)."""
        allowed = {flag_name(flag) for flag in self.allowed_flags}
        return tuple(flag for flag in self.denied_flags if flag_name(flag) not in allowed)

    @property
    def on_demand_enabled(self) -> bool:
        """``--on-demand``, or when not given: whether the catalogue has entries."""
        return bool(self.models) if self.on_demand is None else self.on_demand

    def footprints(self, node_gpus: tuple[str, ...]) -> dict[str, Footprint]:
        """Each catalogue entry's :class:`Footprint` on a node with ``node_gpus`` (``--gpus`` or
        what ``engine.gpus.node_gpus`` found; empty: none known). Checked at start-up: a
        :class:`ConfigError` names the entry and the key at fault (a GPU not on the node, a
        ``--gpu-memory-utilization`` in its args that is not a share in (0, 1], args vLLM cannot
        read)."""
        found: dict[str, Footprint] = {}
        for name, entry in self.models.items():
            try:
                found[name] = entry.footprint(node_gpus, self.default_ttl, self.default_sleep_level)
            except ValueError as exc:
                raise ConfigError(f"invalid configuration: models.{name}: {exc}") from exc
        return found

    def footprint(self, spec: ModelSpec, entry_name: str | None, node_gpus: tuple[str, ...]) -> Footprint:
        """The footprint of what :func:`catalog.resolve` returned: the entry's when it came from
        the catalogue, else a free-form spec's (all of the node's GPUs, the utilization its args
        give, ``--default-ttl``). Raises :class:`SpecError` for a utilization vLLM refuses."""
        if entry_name is not None:
            return self.models[entry_name].footprint(node_gpus, self.default_ttl, self.default_sleep_level)
        return spec_footprint(spec, node_gpus, self.default_ttl, self.default_sleep_level)

    def advertised_host(self, hostname: str) -> str:
        """The name other hosts reach this daemon by (the connection file's URL, the
        ``--master-addr`` of a model across nodes): ``--advertise-host``; else ``--host`` when
        it is one address; else ``hostname`` (this node's)."""
        if self.advertise_host:
            return self.advertise_host
        if self.host not in WILDCARDS:
            return self.host
        return hostname

    @property
    def vllm_argv(self) -> list[str]:
        return shlex.split(self.vllm_command)

    @property
    def vllm_base(self) -> str:
        return http_base(self.vllm_host, self.vllm_port)

    def plugin_config(self, name: str) -> dict[str, Any]:
        """A plugin's own settings: its ``[plugins.<name>]`` table plus
        ``AIC_VLLM_PROXY_PLUGIN_<NAME>_<KEY>`` environment variables (strings)."""
        merged = dict(self.plugin_settings.get(name, {}))
        prefix = f"{ENV_PREFIX}PLUGIN_{name.upper().replace('-', '_')}_"
        for key, value in os.environ.items():
            if key.startswith(prefix):
                merged[key[len(prefix) :].lower()] = value
        return merged


#: Settings that are not command-line options (nor environment variables): the file's own
#: tables and path, and tuning that only the ``[proxy]`` table sets.
NOT_OPTIONS = frozenset({"plugin_settings", "config_file", "models", "denied_flags", "probe_interval"})

#: Options whose settings field is spelled differently (the option takes one name, or several
#: comma-separated, and may be repeated; the field holds them all). A ``[proxy]`` key may use
#: either spelling.
OPTION_FIELDS: dict[str, str] = {
    "allow_flag": "allowed_flags",
    "admin_key": "admin_keys",
    "api_key": "api_keys",
    "enable_plugin": "plugins_enable",
    "disable_plugin": "plugins_disable",
}


#: Units of a size: binary (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB, TB).
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3}
_UNITS |= {"gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2}
_UNITS |= {"gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """A size in bytes: ``"200GiB"``, ``"1.5 TB"``, ``"4096"``. Raises :class:`ValueError`."""
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :]
    if unit not in _UNITS or not number:
        units = "KiB, MiB, GiB, TiB, KB, MB, GB or TB"
        raise ValueError(f"{text!r} is not a size: give bytes or a number with {units}")
    size = float(number) * _UNITS[unit]
    if not size >= 0 or size == float("inf"):
        raise ValueError(f"{text!r} is not a size")
    return int(size)


def names_list(value: str | None) -> tuple[str, ...] | None:
    """``"a, b,c"`` -> ``("a", "b", "c")``; empty or ``None`` -> ``None`` (not given)."""
    if not value:
        return None
    return tuple(name.strip() for name in value.split(",") if name.strip())


def proxy_table_values(table: dict[str, Any], *, where: str) -> dict[str, Any]:
    """A ``[proxy]`` table as :class:`Settings` keyword arguments. Keys are the option names
    (``vllm-port`` or ``vllm_port``, ``allow_flag`` or ``allowed_flags``); a list setting takes
    a TOML list or a comma-separated string, as its option and environment variable do."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        field = OPTION_FIELDS.get(name, name)
        if field in OPTION_FIELDS.values() and isinstance(value, str):
            value = names_list(value) or ()
        if field in values:
            raise ConfigError(f"{where}: {key!r} is given twice (as {field!r} and another spelling)")
        values[field] = value
    return values


def simulator_command() -> str:
    """The ``--vllm-command`` that runs the bundled simulator with this Python."""
    return f"{shlex.quote(sys.executable)} -m aic_vllm_proxy.simulator serve"


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML file, as keyword arguments for :class:`Settings`."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    proxy = data.get("proxy", {})
    if not isinstance(proxy, dict):
        raise ConfigError(f"{path}: [proxy] must be a table")
    values = proxy_table_values(proxy, where=f"{path}: [proxy]")
    plugins = data.get("plugins", {})
    if not isinstance(plugins, dict):
        raise ConfigError(f"{path}: [plugins] must be a table of tables")
    values["plugin_settings"] = {name: dict(table) for name, table in plugins.items()}
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: [models] must be a table of tables ([models.<name>])")
    values["models"] = models
    values["config_file"] = path
    return values


def build_settings(config_file: Path | None, overrides: dict[str, Any]) -> Settings:
    """Merge the file's values with the options given (``None`` means "not given")."""
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_describe(exc)}") from exc
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc


def _describe(exc: ValidationError) -> str:
    """One line per wrong setting, named as the user wrote it (no pydantic URLs)."""
    lines = []
    for error in exc.errors(include_url=False):
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            lines.append(f"{name}: no such setting")
        elif isinstance(error.get("input"), dict):  # a whole table: the message says what is wrong
            lines.append(f"{name}: {message}")
        else:
            lines.append(f"{name}: {message} (got {error.get('input')!r})")
    return "; ".join(lines)
