"""The command line: ``aic-vllm-proxy [OPTIONS]`` (or ``... serve [OPTIONS]``) runs the daemon;
``status``, ``switch``, ``stop``, ``logs`` and ``plugins`` talk to a running one (``client_cli``).

Every daemon option can also be set with an environment variable ``AIC_VLLM_PROXY_<NAME>``
(e.g. ``AIC_VLLM_PROXY_VLLM_PORT=8300``) or in the ``[proxy]`` table of ``--config FILE``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from aic_vllm_proxy import __version__
from aic_vllm_proxy.config import (
    ENV_PREFIX,
    OPTION_FIELDS,
    ConfigError,
    Settings,
    build_settings,
    names_list,
    simulator_command,
)
from aic_vllm_proxy.plugins import PluginLoadError, import_plugin

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("aic_vllm_proxy")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper().replace("-", "_")


def _opt(name: str, **kwargs: Any) -> Callable[[F], F]:
    return click.option(f"--{name}", envvar=_env(name), show_envvar=True, default=None, **kwargs)


SERVE_OPTIONS: list[Callable[[F], F]] = [
    _opt("host", help="Address to listen on.  [default: 0.0.0.0]"),
    _opt("port", type=int, help="Port to listen on.  [default: 8224]"),
    _opt(
        "vllm-command", help="How to run vLLM (split like a shell, never run by one).  [default: vllm serve]"
    ),
    click.option(
        "--simulator",
        is_flag=True,
        default=False,
        help="Run the bundled vLLM simulator instead of vLLM (no GPU needed).",
    ),
    _opt("vllm-host", help="Loopback address vLLM listens on.  [default: 127.0.0.1]"),
    _opt("vllm-port", type=int, help="Port vLLM listens on.  [default: 8225]"),
    _opt("log-dir", type=click.Path(path_type=Path), help="Where vLLM logs go.  [default: logs/vllm]"),
    _opt("ready-timeout", type=float, help="Seconds a model may take to load.  [default: 1800]"),
    _opt("stop-timeout", type=float, help="Seconds from SIGTERM to SIGKILL.  [default: 15]"),
    _opt(
        "request-wait-timeout",
        type=float,
        help="Seconds a request waits for a switch in progress.  [default: 600]",
    ),
    _opt("health-interval", type=float, help="Seconds between health checks (0: off).  [default: 5]"),
    _opt("hook-timeout", type=float, help="Seconds one plugin hook call may take.  [default: 60]"),
    _opt(
        "log-level",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        help="Log level of the proxy.  [default: info]",
    ),
    click.option(
        "--access-log/--no-access-log",
        default=None,
        envvar=_env("access-log"),
        show_envvar=True,
        help="Log every request (costs a little per request).",
    ),
    _opt(
        "config",
        type=click.Path(path_type=Path, dir_okay=False),
        help="TOML file with a [proxy] table and [plugins.<name>] tables.",
    ),
    _opt("enable-plugin", help="Only load these plugins (comma-separated entry-point names)."),
    _opt("disable-plugin", help="Do not load these plugins (comma-separated)."),
    click.option(
        "--admin-key",
        "admin_key",
        multiple=True,
        help=f"A key that may do everything (repeatable; env {ENV_PREFIX}ADMIN_KEY, comma-separated).",
    ),
    click.option(
        "--api-key",
        "api_key",
        multiple=True,
        help=f"A key for the API and /status only (repeatable; env {ENV_PREFIX}API_KEY, comma-separated).",
    ),
    _opt(
        "keys-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="File of 'admin KEY' / 'user KEY' lines.",
    ),
    _opt(
        "model-policy",
        type=click.Choice(["open", "catalog"]),
        help="open: any spec; catalog: only the config's [models.*] entries.  [default: open]",
    ),
    _opt(
        "allow-flag", help="vLLM flags to take off the deny-list (comma-separated), e.g. --trust-remote-code."
    ),
    _opt(
        "drain-timeout",
        type=float,
        help="Seconds in-flight requests may take to finish before a stop.  [default: 30]",
    ),
    _opt("max-waiting", type=int, help="Requests that may wait for a model at once.  [default: 1000]"),
    _opt("vllm-shutdown-timeout", type=float, help="Pass --shutdown-timeout N to vLLM (vLLM >= 0.18)."),
    _opt(
        "restart", type=click.Choice(["off", "on-failure"]), help="Restart a model that died.  [default: off]"
    ),
    _opt("max-restarts", type=int, help="Restarts in a row before giving up.  [default: 3]"),
    _opt("restart-backoff", type=float, help="Seconds before the first restart (doubles).  [default: 5]"),
    _opt("max-body-size", type=int, help="Largest request body in bytes.  [default: 104857600]"),
    _opt(
        "client-timeout",
        type=float,
        help="Seconds a client may pause while sending a body (408) or while not reading its answer "
        "(cut off).  [default: 60]",
    ),
    click.option(
        "--plugin",
        "plugin_modules",
        multiple=True,
        metavar="MODULE[:ATTR]",
        help="Also load this module as a plugin (repeatable).",
    ),
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
    for option, field in OPTION_FIELDS.items():
        options[field] = _values(options.pop(option, None), option)
    return build_settings(config, options)


def _values(given: str | tuple[str, ...] | None, option: str) -> tuple[str, ...] | None:
    """A list option's values: repeated options as given, one comma-separated value split; a
    repeatable option not given falls back to its comma-separated environment variable."""
    if isinstance(given, tuple):
        return given or names_list(os.environ.get(_env(option)))
    return names_list(given)


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
    from aic_vllm_proxy import server
    from aic_vllm_proxy.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from aic_vllm_proxy.auth import keyring_from

    app = create_app(settings, extra_plugins=extra_plugins)
    if not keyring_from(settings).enabled and not _is_loopback(settings.host):
        log.warning(
            "listening on %s without authentication: anyone who can reach port %d can switch "
            "models; bind to 127.0.0.1 or restrict access to the node",
            settings.host,
            settings.port,
        )

    def listening() -> None:
        log.info(
            "aic-vllm-proxy %s on http://%s:%d, vLLM at %s (command: %s); no model loaded until POST /switch",
            __version__,
            settings.host,
            settings.port,
            settings.vllm_base,
            settings.vllm_command,
        )

    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        server.run(
            app,
            loop,
            host=settings.host,
            port=settings.port,
            access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
            drain_timeout=settings.drain_timeout,  # in-flight requests may finish on SIGTERM
            # A connection must bring a whole request head within this time (slow headers), and
            # an idle keep-alive connection is closed after it.
            keepalive_timeout=min(75.0, settings.client_timeout),
            listening=listening,
        )
    except server.CannotListen as exc:
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
    """Run the daemon (no model is loaded until POST /switch)."""
    _serve(options)


def main() -> None:
    from aic_vllm_proxy import client_cli

    client_cli.register(cli)
    cli(prog_name="aic-vllm-proxy")


if __name__ == "__main__":  # pragma: no cover
    main()
