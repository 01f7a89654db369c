"""The command-line client (``aic-vllm-proxy status | switch | stop | logs | plugins``): output
and exit codes, against a real daemon process running the simulator.

The commands run in this process through :class:`click.testing.CliRunner` (fast); one test runs
the installed entry point as a child process to check that the commands are registered there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from helpers import FAST, Daemon, free_port, start_daemon

from aic_vllm_proxy.cli import cli
from aic_vllm_proxy.client import cli as client_cli

pytestmark = pytest.mark.timeout(120)
#: Environment variables of the client set to nothing, so the caller's shell cannot leak in.
CLEAN_ENV: dict[str, str | None] = {"AIC_VLLM_PROXY_URL": None, "AIC_VLLM_PROXY_KEY": None}


@pytest.fixture(scope="module")
def group() -> click.Group:
    client_cli.register(cli)
    return cli


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module; every test leaves it with nothing loaded."""
    started = start_daemon(tmp_path_factory.mktemp("cli"))
    yield started
    started.stop()


def invoke(group: click.Group, *args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(group, list(args), env={**CLEAN_ENV, **(env or {})}, catch_exceptions=False)


def test_status_switch_logs_plugins_stop(group: click.Group, daemon: Daemon) -> None:
    url = daemon.url
    result = invoke(group, "status", "--url", url)
    assert result.exit_code == 0 and result.stdout.startswith("state:") and "stopped" in result.stdout

    spec_args = [*FAST.split(), "--served-model-name", "chat"]
    result = invoke(group, "switch", "m", *spec_args, env={"AIC_VLLM_PROXY_URL": url})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"switching to m {FAST} --served-model-name chat" in out
    assert "vLLM started (pid" in out and "Loading weights took" in out  # the live log's progress
    assert "Route:" not in out and "non-default args" not in out  # not all of it
    assert out.rstrip().splitlines()[-1].split("] ", 1)[1].startswith("chat is ready after")

    result = invoke(group, "status", "--url", url)
    assert result.exit_code == 0
    assert (
        "ready" in result.stdout.splitlines()[0]
        and f"chat  (m {FAST} --served-model-name chat)" in result.stdout
    )
    status = json.loads(invoke(group, "status", "--url", url, "--json").stdout)
    assert status["state"] == "ready" and status["model"] == "chat"
    daemon.groups.add(status["pid"])

    result = invoke(group, "switch", "--url", url, "--json", "m", *spec_args)  # already loaded
    assert result.exit_code == 0
    again = json.loads(result.stdout)  # stdout is pure JSON: the progress went to stderr
    assert again["changed"] is False and "already loaded" in again["message"]
    assert "already loaded" in result.stderr

    assert len(invoke(group, "logs", "--url", url, "-n", "2").stdout.splitlines()) == 2
    whole = invoke(group, "logs", "--url", url).stdout
    assert whole.startswith("# aic-vllm-proxy") and "launching:" in whole
    assert (
        json.loads(invoke(group, "logs", "--url", url, "--json", "-n", "3").stdout)["lines"]
        == (whole.splitlines()[-3:])
    )

    assert invoke(group, "plugins", "--url", url).stdout.strip() == "No plugins loaded."
    assert json.loads(invoke(group, "plugins", "--url", url, "--json").stdout) == []

    result = invoke(group, "stop", "--url", url)
    assert result.exit_code == 0 and result.stdout.strip() == f"Stopped m {FAST} --served-model-name chat."
    assert invoke(group, "stop", "--url", url).stdout.strip() == "Nothing was running."
    result = invoke(group, "logs", "--url", url, "-f", "-n", "2")  # vLLM has exited: ends at once
    assert result.exit_code == 0 and len(result.stdout.splitlines()) >= 2


def test_failed_switch_exits_1_with_the_log_tail(group: click.Group, daemon: Daemon) -> None:
    url = daemon.url
    args = ["broken", *FAST.split(), "--sim-fail-during-load"]
    result = invoke(group, "switch", "--url", url, *args)
    assert result.exit_code == 1
    assert "FAILED: vLLM exited with status 1" in result.stdout  # the progress display ends so
    assert result.stderr.startswith("Error: vLLM exited with status 1 while starting broken")
    assert "CUDA out of memory" in result.stderr  # the log tail

    result = invoke(group, "switch", "--url", url, "--json", "--no-progress", *args)
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["exit_code"] == 1 and error["state"] == "failed" and error["type"] == "switch_failed"
    assert any("CUDA out of memory" in line for line in error["log_tail"])

    status = invoke(group, "status", "--url", url).stdout
    assert "failed" in status.splitlines()[0] and "exit code: 1" in status
    result = invoke(group, "stop", "--url", url)
    assert result.exit_code == 0 and "cleared the failed state" in result.stdout


def test_switch_verbose_shows_every_line_and_a_v1_url_works(group: click.Group, daemon: Daemon) -> None:
    result = invoke(group, "switch", "--url", f"{daemon.url}/v1", "--verbose", "m", *FAST.split())
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("Warning: drop /v1 from the proxy URL")
    assert result.stdout.count("Route:") >= 5 and "non-default args" in result.stdout
    daemon.status()
    assert invoke(group, "stop", "--url", daemon.url).exit_code == 0


def test_no_wait_returns_at_once(group: click.Group, daemon: Daemon) -> None:
    url = daemon.url
    result = invoke(group, "switch", "--url", url, "--no-wait", "--json", "m", *FAST.split())
    assert result.exit_code == 0
    started = json.loads(result.stdout)
    assert started["switching"] is True and started["target_model_spec"] == f"m {FAST}"
    result = invoke(group, "switch", "--url", url, "--no-progress", "m", *FAST.split())  # waits
    assert result.exit_code == 0 and "m is" in result.stdout
    assert invoke(group, "stop", "--url", url).exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["switch"], "Missing argument 'MODEL'"),
        (["switch", "m", "--json"], "--json must come before MODEL"),
        (["switch", "m", "--verbose"], "--verbose must come before MODEL"),
        (["switch", "--tensor-parallel-size", "2", "m"], "expected MODEL before the vLLM arguments"),
        (["logs", "-n", "0"], "0 is not in the range"),
        (["status", "--bogus"], "No such option"),
    ],
)
def test_usage_errors_exit_2(group: click.Group, args: list[str], message: str) -> None:
    result = invoke(group, *args)
    assert result.exit_code == 2 and message in result.stderr


def test_unreachable_proxy_exits_3(group: click.Group) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = invoke(group, "status", "--url", url)
    assert result.exit_code == 3 and url in result.stderr and "cannot reach" in result.stderr
    assert "(--url or $AIC_VLLM_PROXY_URL)" in result.stderr and "proxy_url=" not in result.stderr
    result = invoke(group, "switch", "--json", "m", env={"AIC_VLLM_PROXY_URL": url})
    assert result.exit_code == 3 and json.loads(result.stdout)["error"]["type"] == "ProxyUnreachable"


def test_entry_point_has_the_client_commands() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    script = str(Path(sys.executable).parent / "aic-vllm-proxy")
    run = subprocess.run([script, "status", "--url", url], capture_output=True, text=True, timeout=60)
    assert run.returncode == 3 and url in run.stderr
    helped = subprocess.run([script, "switch", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "everything after MODEL goes to vLLM" in " ".join(helped.stdout.split())
    assert "Exit codes: 0 ok" in " ".join(helped.stdout.split())


def test_api_key_option_and_environment(group: click.Group, tmp_path: Path) -> None:
    secured = start_daemon(tmp_path, "--admin-key", "adm-key")
    try:
        result = invoke(group, "status", "--url", secured.url)
        assert result.exit_code == 1 and "No API key was sent" in result.stderr
        assert "--api-key or $AIC_VLLM_PROXY_KEY" in result.stderr and "api_key=" not in result.stderr
        result = invoke(group, "status", "--url", secured.url, "--api-key", "nope")
        assert result.exit_code == 1 and "refused" in result.stderr
        assert invoke(group, "status", "--url", secured.url, "--api-key", "adm-key").exit_code == 0
        result = invoke(group, "plugins", "--url", secured.url, env={"AIC_VLLM_PROXY_KEY": "adm-key"})
        assert result.exit_code == 0
    finally:
        secured.stop()
