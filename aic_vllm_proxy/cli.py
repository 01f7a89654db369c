"""The command line: ``aic-vllm-proxy [OPTIONS]`` (or ``... serve [OPTIONS]``) runs the daemon;
``status``, ``switch``, ``stop``, ``logs`` and ``plugins`` talk to a running one (``client_cli``).

Every daemon option can also be set with an environment variable ``AIC_VLLM_PROXY_<NAME>``
(e.g. ``AIC_VLLM_PROXY_VLLM_PORT=8300``) or in the ``[proxy]`` table of ``--config FILE``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import click
from pydantic.fields import FieldInfo

from aic_vllm_proxy import __version__
from aic_vllm_proxy.config import (
    ENV_PREFIX,
    NOT_OPTIONS,
    OPTION_FIELDS,
    ConfigError,
    Settings,
    build_settings,
    names_list,
    simulator_command,
)
from aic_vllm_proxy.engine.gpus import node_gpus
from aic_vllm_proxy.hooks.runner import PluginLoadError, import_plugin

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("aic_vllm_proxy")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper().replace("-", "_")


#: The option of each field spelled unlike it (``admin_keys`` -> ``admin_key``).
OPTION_NAMES = {field: option for option, field in OPTION_FIELDS.items()}


def option_name(field: str) -> str:
    """``vllm_port`` -> ``--vllm-port``; ``admin_keys`` -> ``--admin-key``."""
    return "--" + OPTION_NAMES.get(field, field).replace("_", "-")


def default_text(field: FieldInfo) -> str | None:
    """A setting's default as ``--help`` and the README show it; None when it is "nothing"
    (no value, an empty list, off)."""
    value = field.default
    if value is None or value is False or value == ():
        return None
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class _CommaSeparated(click.types.StringParamType):
    """A list option's type: its environment variable holds comma-separated values."""

    envvar_list_splitter = ","


def _names(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """A list option's values: each given value split at commas (``--admin-key a,b --admin-key c``)."""
    return tuple(name for value in values for name in names_list(value) or ())


def _value_type(annotation: Any) -> Any:
    """The type a field holds, without ``| None``."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [arg for arg in get_args(annotation) if arg is not type(None)]
    return annotation


def setting_option(name: str) -> Callable[[F], F]:
    """The option of the :class:`Settings` field ``name``: its type, description and default, and
    an environment variable ``AIC_VLLM_PROXY_<OPTION>``. Not given, its value is None (or ``()``)
    so that the file and the default stay below it."""
    field = Settings.model_fields[name]
    option = option_name(name)
    envvar = _env(option[2:])
    help_text = field.description or ""
    kind = _value_type(field.annotation)
    if kind is bool:
        return click.option(
            f"{option}/--no-{option[2:]}", name, default=None, envvar=envvar, show_envvar=True, help=help_text
        )
    extra: dict[str, Any] = {}
    if get_origin(kind) is tuple:
        help_text += " Repeatable, or comma-separated."
        extra = {"multiple": True, "type": _CommaSeparated(), "callback": _names}
    elif get_origin(kind) is Literal:
        extra = {"type": click.Choice([str(arg) for arg in get_args(kind)], case_sensitive=False)}
    elif kind is Path:
        extra = {"type": click.Path(path_type=Path)}
    elif isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("unit") == "bytes":
        extra = {"type": str, "metavar": "SIZE"}  # config.parse_bytes reads it
    elif kind in (int, float, str):
        extra = {"type": kind}
    else:
        raise TypeError(f"no option type for Settings.{name} ({kind}): add it to config.NOT_OPTIONS?")
    shown = default_text(field)
    if shown is not None:
        help_text += f"  [default: {shown}]"
    return click.option(option, name, default=None, envvar=envvar, show_envvar=True, help=help_text, **extra)


#: The options that are not settings: they choose the file, preset ``vllm_command``, add modules.
COMMAND_LINE_ONLY: list[Callable[[F], F]] = [
    click.option(
        "--config",
        envvar=_env("config"),
        show_envvar=True,
        default=None,
        type=click.Path(path_type=Path, dir_okay=False),
        help="TOML file with a [proxy] table and [plugins.<name>] tables.",
    ),
    click.option(
        "--simulator",
        is_flag=True,
        default=False,
        help="Run the bundled vLLM simulator instead of vLLM (no GPU needed).",
    ),
    click.option(
        "--plugin",
        "plugin_modules",
        multiple=True,
        metavar="MODULE[:ATTR]",
        help="Also load this module as a plugin (repeatable).",
    ),
]

SERVE_OPTIONS: list[Callable[[F], F]] = COMMAND_LINE_ONLY + [
    setting_option(name) for name in Settings.model_fields if name not in NOT_OPTIONS
]


def serve_options(func: F) -> F:
    for option in reversed(SERVE_OPTIONS):
        func = option(func)
    return func


def settings_from_options(options: dict[str, Any]) -> Settings:
    """Turn the parsed options into :class:`Settings` (file < environment < command line)."""
    options = dict(options)
    config = options.pop("config", None)
    options.pop("plugin_modules", None)
    if options.pop("simulator", False) and not options.get("vllm_command"):
        options["vllm_command"] = simulator_command()
    return on_this_node(build_settings(config, options))


def on_this_node(settings: Settings, environ: Mapping[str, str] | None = None) -> Settings:
    """``settings`` with ``gpus`` set to the node's GPUs (``--gpus``, else what
    :func:`~aic_vllm_proxy.engine.gpus.node_gpus` finds; empty: none known), the catalogue
    checked against them (a :class:`ConfigError` names the entry and key at fault)."""
    node = node_gpus(settings.gpus, environ)
    settings.footprints(node)
    return settings.model_copy(update={"gpus": node})


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_server(settings: Settings, extra_plugins: list[tuple[str, object]]) -> None:
    from aic_vllm_proxy.web import server
    from aic_vllm_proxy.web.app import create_app
    from aic_vllm_proxy.web.connection import CannotPublish
    from aic_vllm_proxy.web.logs_format import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    from aic_vllm_proxy.web.appkeys import KEYS

    app = create_app(settings, extra_plugins=extra_plugins)  # reads the keys file, once
    if not app[KEYS].enabled and not _is_loopback(settings.host):
        log.warning(
            "listening on %s without authentication: anyone who can reach port %d can switch "
            "models; bind to 127.0.0.1 or restrict access to the node",
            settings.host,
            settings.port,
        )

    def listening(port: int) -> None:
        log.info(
            "aic-vllm-proxy %s on http://%s:%d, vLLM at %s (command: %s); no model loaded until POST /switch",
            __version__,
            settings.host,
            port,
            settings.vllm_base,
            settings.vllm_command,
        )

    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        server.run(app, loop, listening=listening)
    except (server.CannotListen, CannotPublish) as exc:
        log.error("%s", exc)  # one line, no traceback
        sys.exit(1)


def _serve(options: dict[str, Any]) -> None:
    try:
        settings = settings_from_options(options)
        extra = [import_plugin(spec) for spec in options.get("plugin_modules") or ()]
        run_server(settings, extra)
    except (ConfigError, PluginLoadError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aic-vllm-proxy")
@serve_options
@click.pass_context
def cli(ctx: click.Context, /, **options: Any) -> None:
    """Run vLLM on this node behind an OpenAI-compatible proxy that can switch models.

    With no command, runs the daemon (the same as `serve`). The other commands talk to a
    running daemon.
    """
    if ctx.invoked_subcommand is None:
        _serve(options)


@cli.command()
@serve_options
def serve(**options: Any) -> None:
    """Run the daemon (no model runs until POST /switch or /load, a request naming a catalogue
    model, or a catalogue entry marked preload)."""
    _serve(options)


@cli.command()
@click.option("--head", envvar="AIC_VLLM_PROXY_URL", show_envvar=True, help="The head daemon's URL.")
@click.option(
    "--connection-file",
    "connection_file",
    envvar="AIC_VLLM_PROXY_CONNECTION_FILE",
    show_envvar=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Read the head's URL and key from this connection file (without --head); read again at "
    "each attempt, so the agent may start before the head.",
)
@click.option("--api-key", envvar="AIC_VLLM_PROXY_KEY", show_envvar=True, help="An admin key of the head.")
@click.option(
    "--node-name",
    default=None,
    help="This node's name at the head [default: $SLURMD_NODENAME (set by srun), else the hostname].",
)
@click.option(
    "--head-timeout",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds without the head after which this node's ranks are stopped and the agent exits.",
)
@click.option("--gpus", default=None, help="This node's GPUs [default: as the daemon finds them].")
@click.option("--vllm-command", default="vllm serve", show_default=True, help="How to run vLLM here.")
@click.option("--simulator", is_flag=True, help="Run the bundled simulator instead of vLLM.")
@click.option(
    "--log-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("logs/vllm"),
    show_default=True,
    help="Where the ranks' logs go (the head keeps a copy of each).",
)
@click.option("--stop-timeout", type=click.FloatRange(min=0), default=15.0, show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
def agent(
    head: str | None,
    connection_file: Path | None,
    api_key: str | None,
    node_name: str | None,
    head_timeout: float,
    gpus: str | None,
    vllm_command: str,
    simulator: bool,
    log_dir: Path,
    stop_timeout: float,
    log_level: str,
) -> None:
    """Run the ranks of models across nodes for a head daemon, on this node (docs/cluster.md):
    started by srun on every other node of the job."""
    import os
    import socket

    from aic_vllm_proxy.agent.runner import AgentOptions, run
    from aic_vllm_proxy.web.logs_format import setup_logging

    if not head and connection_file is None:
        raise click.UsageError("give the head: --head URL or --connection-file PATH")
    try:
        settings = Settings(
            vllm_command=simulator_command() if simulator else vllm_command,
            log_dir=log_dir,
            stop_timeout=stop_timeout,
            gpus=names_list(gpus) or (),
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    settings = settings.model_copy(update={"gpus": node_gpus(settings.gpus)})
    setup_logging(log_level.lower(), "text")
    options = AgentOptions(
        head=head,
        connection_file=connection_file.expanduser() if connection_file else None,
        key=api_key,
        node_name=node_name or os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        head_timeout=head_timeout,
        settings=settings,
    )
    sys.exit(run(options))


def main() -> None:
    from aic_vllm_proxy.client import cli as client_cli

    client_cli.register(cli)
    cli(prog_name="aic-vllm-proxy")


if __name__ == "__main__":  # pragma: no cover
    main()
