"""Command-line client: ``aic-vllm-proxy status | switch MODEL [ARGS...] | stop | logs | plugins``,
for the fleet of several models ``aic-vllm-proxy ps | load NAME | unload NAME``, and for models
across nodes ``aic-vllm-proxy nodes``.

Each command talks to a running daemon at ``--url`` (``$AIC_VLLM_PROXY_URL``; else the URL and
key of the connection file ``$AIC_VLLM_PROXY_CONNECTION_FILE`` names; default
``http://127.0.0.1:8224``), prints something readable, or JSON with ``--json``.

Exit codes: 0 success; 1 the proxy reported a failure (a switch failed, no log yet, an API key
was refused, ...); 2 bad usage; 3 the proxy could not be reached (or did not answer in time).
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from aic_vllm_proxy.schemas import ProcessState

if TYPE_CHECKING:  # the client needs the `client` extra: imported only when a command runs
    from aic_vllm_proxy.client import ProxyError, VLLMProxyClient
    from aic_vllm_proxy.client.views import StatusDict

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

F = TypeVar("F", bound=Callable[..., Any])

#: Options of ``switch`` that are surely not ``vllm serve`` flags: found after MODEL, they are a
#: mistake (everything after MODEL goes to vLLM).
_OWN_SWITCH_OPTIONS = ("--json", "--no-progress", "--no-wait", "--url", "--verbose")
EPILOG = "Exit codes: 0 ok, 1 failure reported by the proxy, 2 usage error, 3 proxy unreachable."


def client_options(func: F) -> F:
    """``--url``, ``--api-key`` and ``--json``, shared by every client command."""
    func = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")(func)
    func = click.option(
        "--api-key",
        envvar="AIC_VLLM_PROXY_KEY",
        show_envvar=True,
        default=None,
        help="API key of the proxy (sent as a bearer token).",
    )(func)
    func = click.option(
        "--url",
        envvar="AIC_VLLM_PROXY_URL",
        show_envvar=True,
        default=None,
        help="The proxy [default: the url in $AIC_VLLM_PROXY_CONNECTION_FILE's file (a daemon's "
        "--connection-file, its key too), else http://127.0.0.1:8224].",
    )(func)
    return func


@contextmanager
def _connected(url: str | None, api_key: str | None, as_json: bool) -> Iterator[VLLMProxyClient]:
    """A client for the command; turns client errors into a message and an exit code."""
    try:
        from aic_vllm_proxy.client import ProxyError, VLLMProxyClient
    except ImportError as exc:  # pragma: no cover - the client extra is missing
        raise click.ClickException(
            f"the client needs the 'client' extra ({exc}): pip install 'aic-vllm-proxy[client]'"
        ) from exc
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            client: VLLMProxyClient | None = VLLMProxyClient(url, api_key=api_key, progress=False)
        except ProxyError as exc:  # $AIC_VLLM_PROXY_CONNECTION_FILE names a file that cannot be used
            client, failed = None, exc
    for warning in caught:  # e.g. a URL ending in /v1, a connection file others may read
        click.echo(f"Warning: {warning.message}", err=True)
    if client is None:
        _exit_with(failed, as_json)
    if client.connection_file is None:  # else the error messages name the file
        client.url_option = "--url"
    client.key_option = "--api-key"  # named in error messages
    try:
        yield client
    except ProxyError as exc:
        _exit_with(exc, as_json)
    finally:
        client.close()


def _exit_with(exc: ProxyError, as_json: bool) -> NoReturn:
    """Report a client error (and as JSON with ``--json``); exit with its code."""
    from aic_vllm_proxy.client import NoRoomError, ProxyUnreachable, SwitchError

    code = EXIT_UNREACHABLE if isinstance(exc, ProxyUnreachable) else EXIT_FAILED
    if as_json:
        error: dict[str, Any] = {"message": exc.message, "type": exc.error_type or type(exc).__name__}
        if isinstance(exc, SwitchError):
            error.update(exit_code=exc.exit_code, log_tail=exc.log_tail, state=exc.state)
        if isinstance(exc, NoRoomError):
            error.update(retry_after=exc.retry_after)
        click.echo(json.dumps({"error": error}, indent=2))
    click.echo(f"Error: {exc}", err=True)
    sys.exit(code)


def _dump(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@click.command(epilog=EPILOG)
@client_options
def status(url: str | None, api_key: str | None, as_json: bool) -> None:
    """Show what the proxy runs (state, model, pid, log, errors)."""
    with _connected(url, api_key, as_json) as client:
        current = client.status()
    if as_json:
        _dump(current)
    else:
        click.echo(str(current))


@click.command(
    epilog=EPILOG,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@client_options
@click.option("--force", is_flag=True, help="Restart even if the same spec is already loaded.")
@click.option("--no-wait", is_flag=True, help="Start the switch and return at once (see `status`).")
@click.option("--no-progress", is_flag=True, help="Do not show the vLLM log while loading.")
@click.option(
    "--verbose",
    is_flag=True,
    help="Show every line of the vLLM log, not only progress (weights, memory, compile, graph "
    "capture, ready), warnings and errors.",
)
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Give up waiting after this many seconds (exit 1; the switch goes on).",
)
@click.argument("model")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def switch(
    url: str | None,
    api_key: str | None,
    as_json: bool,
    force: bool,
    no_wait: bool,
    no_progress: bool,
    verbose: bool,
    timeout: float | None,
    model: str,
    args: tuple[str, ...],
) -> None:
    """Load MODEL with the `vllm serve` arguments ARGS and wait until it is ready.

    The options of this command go before MODEL: everything after MODEL goes to vLLM.
    While the model loads, the lines of the vLLM log that tell progress, warnings and errors are
    shown (every line with --verbose; on stderr with --json).

    \b
    Example:
      aic-vllm-proxy switch --force meta-llama/Llama-2-7b-hf --tensor-parallel-size 2
    """
    if model.startswith("-"):
        raise click.UsageError(f"expected MODEL before the vLLM arguments, got {model!r}")
    misplaced = [arg for arg in args if arg.split("=", 1)[0] in _OWN_SWITCH_OPTIONS]
    if misplaced:
        raise click.UsageError(
            f"{', '.join(misplaced)} must come before MODEL: everything after MODEL goes to vllm serve"
        )
    with _connected(url, api_key, as_json) as client:
        if no_wait:
            started = client.start_switch(model, list(args), force=force)
            if as_json:
                _dump(started)
            else:
                click.echo(f"Switch to {model} started; follow it with `aic-vllm-proxy status`.")
            return
        progress: Any = False if no_progress else (sys.stderr if as_json else sys.stdout)
        result = client.switch(
            model, list(args), force=force, timeout=timeout, progress=progress, verbose=verbose
        )
    if as_json:
        _dump(result)
    elif no_progress:  # the progress display already ends with this line
        click.echo(result.message)


@click.command(epilog=EPILOG)
@client_options
@click.option("--force", is_flag=True, help="Cut in-flight requests instead of letting them finish.")
@click.option("--model", default=None, metavar="NAME", help="Stop only this instance (see `ps`).")
def stop(url: str | None, api_key: str | None, as_json: bool, force: bool, model: str | None) -> None:
    """Stop vLLM (the whole process tree of every instance, or of the one --model names), after
    in-flight requests have finished."""
    with _connected(url, api_key, as_json) as client:
        before = client.status()
        after = client.stop(model, force=force)
    if as_json:
        _dump(after)
    elif model is not None:
        click.echo(_stopped_instance(before, model))
    elif before.running:
        click.echo(f"Stopped {before.model_spec or 'vLLM'}.")
    elif before.state is ProcessState.FAILED:
        click.echo(f"Nothing was running; cleared the failed state of {before.model_spec or 'vLLM'}.")
    else:
        click.echo("Nothing was running.")


def _stopped_instance(before: StatusDict, model: str) -> str:
    """What ``stop --model NAME`` did, from the status read before it."""
    from aic_vllm_proxy.client.progress import find_instance

    instance = find_instance(before.as_model(), model)
    if instance is None or instance.state is ProcessState.STOPPED:
        return f"{model} was not running."
    if instance.state is ProcessState.FAILED:
        return f"{instance.name} was not running; cleared its failed state."
    return f"Stopped {instance.name} ({instance.model_spec or instance.model or 'vLLM'})."


@click.command(epilog=EPILOG)
@client_options
@click.option("-n", "--lines", type=click.IntRange(1, 100_000), default=None, help="Only the last N lines.")
@click.option(
    "-f", "--follow", is_flag=True, help="Keep printing new lines until vLLM exits (Ctrl-C to leave)."
)
@click.option(
    "--model", default=None, metavar="NAME", help="The log of this instance (default: the primary)."
)
@click.option(
    "--rank",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Of a model across nodes, the log of rank N (the daemon's copy; see `nodes`) [default: "
    "rank 0's, the daemon's own].",
)
def logs(
    url: str | None,
    api_key: str | None,
    as_json: bool,
    lines: int | None,
    follow: bool,
    model: str | None,
    rank: int | None,
) -> None:
    """Print the current vLLM log (all of it, or the last N lines; -f follows it).

    With --json: {"lines": [...]}, or one JSON string per line with -f.
    """
    with _connected(url, api_key, as_json) as client:
        if follow:
            try:
                for line in client.follow_logs(lines or 50, model=model, rank=rank):
                    click.echo(json.dumps(line) if as_json else line)
            except KeyboardInterrupt:
                pass
            return
        text = client.logs(lines, model=model, rank=rank)
    if as_json:
        _dump({"lines": text.splitlines()})
    else:
        click.echo(text, nl=not text.endswith("\n") and bool(text))


@click.command(epilog=EPILOG)
@client_options
def plugins(url: str | None, api_key: str | None, as_json: bool) -> None:
    """List the proxy's plugins (name, version, hooks, enabled)."""
    with _connected(url, api_key, as_json) as client:
        found = client.plugins()
    if as_json:
        _dump([plugin.model_dump(mode="json") for plugin in found])
        return
    if not found:
        click.echo("No plugins loaded.")
        return
    for plugin in found:
        state = "enabled" if plugin.enabled else "disabled"
        click.echo(f"{plugin.name} {plugin.version or ''}".rstrip() + f"  [{state}]")
        click.echo(f"    hooks: {', '.join(plugin.hooks) or '-'}")
        if plugin.source:
            click.echo(f"    from:  {plugin.source}")


@click.command(epilog=EPILOG)
@client_options
def ps(url: str | None, api_key: str | None, as_json: bool) -> None:
    """List the instances of the fleet: name (* the primary, where requests that name no model
    go), state, model, GPUs, GPU memory share, requests in flight and waiting, last use, when
    it is unloaded for idling, pinned, pid."""
    with _connected(url, api_key, as_json) as client:
        found = client.instances()
    if as_json:
        _dump([instance.model_dump(mode="json") for instance in found])
        return
    if not found:
        click.echo("No instances.")
        return
    from aic_vllm_proxy.client.views import instances_table

    for line in instances_table(found):
        click.echo(line)


@click.command(epilog=EPILOG)
@client_options
@click.option("--no-wait", is_flag=True, help="Start the load and return at once (see `ps`).")
@click.option("--no-progress", is_flag=True, help="Do not show the vLLM log while loading.")
@click.option(
    "--verbose",
    is_flag=True,
    help="Show every line of the vLLM log, not only progress, warnings and errors.",
)
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Give up waiting after this many seconds (exit 1; the load goes on).",
)
@click.argument("name")
def load(
    url: str | None,
    api_key: str | None,
    as_json: bool,
    no_wait: bool,
    no_progress: bool,
    verbose: bool,
    timeout: float | None,
    name: str,
) -> None:
    """Load the catalogue model NAME beside the others (on its own GPUs) and wait until it is
    ready, with the same live progress as `switch`. Idle instances in its way are unloaded
    first, least recently used first."""
    with _connected(url, api_key, as_json) as client:
        if no_wait:
            started = client.load(name, wait=False)
            if as_json:
                _dump(started)
            else:
                click.echo(started.message or f"Loading {started.name}; follow it with `aic-vllm-proxy ps`.")
            return
        progress: Any = False if no_progress else (sys.stderr if as_json else sys.stdout)
        result = client.load(name, timeout=timeout, progress=progress, verbose=verbose)
    if as_json:
        _dump(result)
    elif no_progress:  # the progress display already ends with this line
        click.echo(result.message)


@click.command(epilog=EPILOG)
@client_options
@click.option("--force", is_flag=True, help="Cut in-flight requests instead of letting them finish.")
@click.argument("name")
def unload(url: str | None, api_key: str | None, as_json: bool, force: bool, name: str) -> None:
    """Unload the instance NAME after its in-flight requests have finished."""
    with _connected(url, api_key, as_json) as client:
        result = client.unload(name, force=force)
    if as_json:
        _dump(result)
    elif result.message:
        click.echo(result.message)
    else:
        click.echo(f"Unloaded {result.name}." if result.changed else f"{result.name} was not loaded.")


@click.command(epilog=EPILOG)
@client_options
def nodes(url: str | None, api_key: str | None, as_json: bool) -> None:
    """List the agents that run the other ranks of models across nodes (--nnodes): node, state
    (connected, disconnected, lost, left), host, GPUs in use of those it has, and its ranks as
    model#rank pid state. Needs an admin key when the daemon has keys."""
    with _connected(url, api_key, as_json) as client:
        found = client.nodes()
    if as_json:
        _dump(found.model_dump(mode="json"))
        return
    if not found.nodes:
        click.echo(f"No nodes: no agent has connected to the daemon ({found.head}).")
        return
    from aic_vllm_proxy.client.views import nodes_table

    for line in nodes_table(found.nodes):
        click.echo(line)


COMMANDS = (status, switch, stop, logs, plugins, ps, load, unload, nodes)


def register(group: click.Group) -> None:
    """Add the client commands to the main command group (calling it twice is harmless)."""
    for command in COMMANDS:
        group.add_command(command)
