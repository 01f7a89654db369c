"""The daemon's command line: --help, environment variables, --config files, --simulator.

Each test runs the real command (``aic-vllm-proxy`` or ``python -m aic_vllm_proxy``) as a child
process and talks to it over its port.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import FAST, SIM, Daemon, free_port, start_daemon

from aic_vllm_proxy import __version__

CONSOLE_SCRIPT = str(Path(sys.executable).parent / "aic-vllm-proxy")
MODULE = [sys.executable, "-m", "aic_vllm_proxy"]
SERVE_OPTIONS = [
    "--host", "--port", "--vllm-command", "--simulator", "--vllm-host", "--vllm-port", "--log-dir",
    "--ready-timeout", "--stop-timeout", "--request-wait-timeout", "--health-interval", "--config",
    "--log-level",
]  # fmt: skip


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test started; all stopped (with their vLLM) at teardown."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def test_console_script_help_lists_the_options() -> None:
    result = run([CONSOLE_SCRIPT, "--help"])
    assert result.returncode == 0, result.stderr
    for option in SERVE_OPTIONS:
        assert option in result.stdout, option
    assert "AIC_VLLM_PROXY_PORT" in result.stdout  # the environment variables are shown
    assert "serve" in result.stdout


def test_module_serve_help_lists_the_options() -> None:
    result = run([*MODULE, "serve", "--help"])
    assert result.returncode == 0, result.stderr
    for option in SERVE_OPTIONS:
        assert option in result.stdout, option
    assert "AIC_VLLM_PROXY_VLLM_COMMAND" in result.stdout


def test_version() -> None:
    result = run([*MODULE, "--version"])
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_bad_option_value_is_a_usage_error() -> None:
    result = run([*MODULE, "serve", "--port", "not-a-port"])
    assert result.returncode == 2
    assert "not-a-port" in result.stderr and "Traceback" not in result.stderr


def test_environment_variables_are_honoured(tmp_path: Path, daemons: list[Daemon]) -> None:
    port, vllm_port = free_port(), free_port()
    log_dir = tmp_path / "env-logs"
    env = {
        "AIC_VLLM_PROXY_HOST": "127.0.0.1",
        "AIC_VLLM_PROXY_PORT": str(port),
        "AIC_VLLM_PROXY_VLLM_PORT": str(vllm_port),
        "AIC_VLLM_PROXY_VLLM_COMMAND": SIM,
        "AIC_VLLM_PROXY_LOG_DIR": str(log_dir),
        "AIC_VLLM_PROXY_READY_TIMEOUT": "45",
    }
    daemon = start_daemon(tmp_path, env=env, port=port, defaults=False, command=[*MODULE, "serve"])
    daemons.append(daemon)
    assert daemon.get("/proxy/health").status_code == 200
    status = daemon.status()
    assert status["vllm_base"] == f"http://127.0.0.1:{vllm_port}"
    code, body = daemon.switch(f"sim/env {FAST}")
    assert code == 200, body
    assert Path(body["status"]["log_path"]).parent == log_dir
    # vLLM listens where the environment said.
    assert httpx.get(f"http://127.0.0.1:{vllm_port}/health", timeout=10).status_code == 200


def test_config_file_and_command_line_precedence(tmp_path: Path, daemons: list[Daemon]) -> None:
    file_port, cli_port, vllm_port = free_port(), free_port(), free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        "[proxy]\n"
        'host = "127.0.0.1"\n'
        f"port = {file_port}\n"
        f"vllm_port = {vllm_port}\n"
        f'vllm_command = "{SIM}"\n'
        f'log_dir = "{tmp_path / "cfg-logs"}"\n'
        "stop_timeout = 3\n"
    )
    daemon = start_daemon(tmp_path, "--config", str(config), defaults=False, command=[*MODULE, "serve"],
                          port=file_port)  # fmt: skip
    daemons.append(daemon)
    status = daemon.status()
    assert status["vllm_base"] == f"http://127.0.0.1:{vllm_port}"
    code, body = daemon.switch(f"sim/cfg {FAST}")
    assert code == 200, body
    assert Path(body["status"]["log_path"]).parent == tmp_path / "cfg-logs"
    daemon.stop()

    # The command line wins over the file, the environment wins over the file.
    other_vllm = free_port()
    daemon = start_daemon(
        tmp_path, "--config", str(config), "--port", str(cli_port), defaults=False,
        command=[*MODULE, "serve"], port=cli_port, env={"AIC_VLLM_PROXY_VLLM_PORT": str(other_vllm)},
    )  # fmt: skip
    daemons.append(daemon)
    assert daemon.status()["vllm_base"] == f"http://127.0.0.1:{other_vllm}"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "does not exist"),
        ("[proxy\nport = 1\n", "not valid TOML"),
        ("[proxy]\nvllm_port = 'abc'\n", "vllm_port"),
        ("[proxy]\nno_such_option = 1\n", "no_such_option"),
        ("[proxy]\nvllm_command = ''\n", "vllm_command"),
        ('proxy = "x"\n', "[proxy] must be a table"),
    ],
)
def test_invalid_config_is_a_clear_error(tmp_path: Path, content: str | None, words: str) -> None:
    config = tmp_path / "bad.toml"
    if content is not None:
        config.write_text(content)
    result = run([*MODULE, "serve", "--config", str(config), "--port", str(free_port())])
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert words in output, output
    assert "Traceback" not in output


def test_simulator_flag_runs_the_bundled_simulator(tmp_path: Path, daemons: list[Daemon]) -> None:
    port, vllm_port = free_port(), free_port()
    daemon = start_daemon(
        tmp_path,
        "--simulator", "--host", "127.0.0.1", "--port", str(port), "--vllm-port", str(vllm_port),
        "--log-dir", str(tmp_path / "sim-logs"),
        defaults=False, command=[CONSOLE_SCRIPT], port=port,  # no subcommand: runs the daemon
    )  # fmt: skip
    daemons.append(daemon)
    code, body = daemon.switch(f"sim/bundled --served-model-name bundled {FAST}")
    assert code == 200, body
    header = Path(body["status"]["log_path"]).read_text().splitlines()[0]
    assert "-m aic_vllm_proxy.simulator serve sim/bundled" in header
    response = httpx.post(
        daemon.url + "/v1/chat/completions",
        json={"model": "bundled", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == " tok0 tok1 tok2"
