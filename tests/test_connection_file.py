"""The connection file (issue 17, "A job that publishes the daemon"): ``--connection-file`` with
``--port 0``, its removal on SIGTERM and SIGINT, the client's reading of it, and
``examples/slurm/aic-vllm-proxy.sbatch`` run with bash and the SLURM variables set (no SLURM here:
the script runs this checkout's daemon with the simulator, as its header says a test may).

The daemons run as real processes. With ``--port 0`` their port is known only from the file, so
they are started here and waited for by the file (``spawn_proxy`` and ``start_daemon`` wait for a
port they chose).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from helpers import FAST, SIM, free_port, group_members, process_exists, wait_until
from plugin_env import REPO

from aic_vllm_proxy import __version__
from aic_vllm_proxy.client import AsyncVLLMProxyClient, ProxyUnreachable, VLLMProxyClient
from aic_vllm_proxy.client.connection import CONNECTION_FILE_ENV, ConnectionFileError, read_connection_file
from aic_vllm_proxy.config import http_base
from aic_vllm_proxy.connection_file import ConnectionInfo

SBATCH = REPO / "examples" / "slurm" / "aic-vllm-proxy.sbatch"
DAEMON = [sys.executable, "-m", "aic_vllm_proxy"]
#: Deadlines: generous, for a loaded 2-core machine.
START = 40.0
EXIT = 40.0


def _environment(**extra: str) -> dict[str, str]:
    """This process's environment without the variables that would change what is tested."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "AIC_VLLM_PROXY_"))
    }
    return {**env, **extra}


def _wait_for_file(path: Path, process: subprocess.Popen[bytes], output: Path) -> ConnectionInfo:
    """The connection file once the daemon wrote it (it is renamed into place whole)."""
    if not wait_until(lambda: path.exists() or process.poll() is not None, START, interval=0.05):
        raise AssertionError(f"no connection file after {START} s:\n{output.read_text(errors='replace')}")
    assert path.exists(), (
        f"exited {process.returncode} without writing it:\n{output.read_text(errors='replace')}"
    )
    return ConnectionInfo.model_validate_json(path.read_bytes())


def _reachable(info: ConnectionInfo) -> str:
    """The file's URL; this machine's own name where it does not resolve here (a container)."""
    try:
        socket.getaddrinfo(info.url.split("//", 1)[1].rsplit(":", 1)[0].strip("[]"), info.port)
    except OSError:
        return f"http://127.0.0.1:{info.port}"
    return info.url


def _exit_code(process: subprocess.Popen[bytes], output: Path) -> int:
    try:
        return process.wait(EXIT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"did not exit within {EXIT} s:\n{output.read_text(errors='replace')}") from None


def _switch(url: str, spec: str, key: str | None, groups: set[int]) -> int:
    """Switch to ``spec`` with ``key``; the pid (process group) of the vLLM launched."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(url + "/switch", json={"model_spec": spec}, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    pgid = int(response.json()["status"]["pid"])
    groups.add(pgid)
    return pgid


Started = tuple[subprocess.Popen[bytes], Path]


@pytest.fixture
def run_daemon(tmp_path: Path) -> Iterator[Callable[..., Started]]:
    """``run_daemon(*options, env=...)``: ``python -m aic_vllm_proxy serve --simulator`` on a
    loopback vLLM port; every daemon still running at the end gets SIGTERM (then SIGKILL)."""
    started: list[Started] = []

    def start(*options: str, env: dict[str, str] | None = None) -> Started:
        output = tmp_path / f"daemon-{len(started)}.out"
        command = [
            *DAEMON, "serve", "--vllm-command", SIM, "--vllm-port", str(free_port()),
            "--log-dir", str(tmp_path / "logs"), "--stop-timeout", "5", *options,
        ]  # fmt: skip
        with open(output, "wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env or _environment(), cwd=tmp_path
            )
        started.append((process, output))
        return process, output

    yield start
    for process, _ in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(EXIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------ the daemon


def test_port_0_file_private_reachable_admin_key_and_sigterm_removes_it(
    tmp_path: Path, run_daemon: Callable[..., Started], vllm_groups: set[int]
) -> None:
    """``--port 0 --connection-file``: the file appears once the daemon listens, mode 0600 in new
    0700 folders, with the kernel's port, the node's hostname (``--host`` is the wildcard), the
    admin key, the pid, the SLURM job id; the URL answers and the key may switch. SIGTERM: the
    file is gone, vLLM stopped, exit 0."""
    path = tmp_path / "state" / "jobs" / "4242.json"
    before = datetime.now(timezone.utc)
    process, output = run_daemon(
        "--port", "0", "--connection-file", str(path), "--admin-key", "adm-1,adm-2", "--api-key", "usr",
        env=_environment(SLURM_JOB_ID="4242"),
    )  # fmt: skip
    info = _wait_for_file(path, process, output)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700 and _mode(path.parent.parent) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it
    assert info.port != 0 and info.pid == process.pid
    assert info.host == socket.gethostname()
    assert info.url == http_base(socket.gethostname(), info.port)
    assert info.key == "adm-1" and info.slurm_job_id == "4242" and info.version == __version__
    assert before - timedelta(seconds=1) <= info.started_at <= datetime.now(timezone.utc)
    assert json.loads(path.read_text())["started_at"].endswith("Z")  # ISO, UTC

    url = _reachable(info)
    assert httpx.get(url + "/status", timeout=10).status_code == 401  # a key is needed...
    pgid = _switch(url, f"sim/published {FAST}", info.key, vllm_groups)  # ...and this one is admin
    assert group_members(pgid)

    process.send_signal(signal.SIGTERM)
    assert _exit_code(process, output) == 0, output.read_text()
    assert not path.exists()
    assert group_members(pgid) == []
    assert "connection file" in output.read_text() and "adm-1" not in output.read_text()


def test_sigint_removes_it_too_with_the_keys_files_admin_key_and_advertise_host(
    tmp_path: Path, run_daemon: Callable[..., Started], vllm_groups: set[int]
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("user u-1\nadmin from-file\n")
    path = tmp_path / "c.json"
    process, output = run_daemon(
        "--port", "0", "--connection-file", str(path), "--keys-file", str(keys),
        "--advertise-host", "127.0.0.1",
    )  # fmt: skip
    info = _wait_for_file(path, process, output)
    assert info.url == f"http://127.0.0.1:{info.port}" and info.key == "from-file"
    assert info.slurm_job_id is None
    pgid = _switch(info.url, f"sim/interrupted {FAST}", info.key, vllm_groups)
    # The command line finds the daemon and its key through $AIC_VLLM_PROXY_CONNECTION_FILE.
    cli = subprocess.run(
        [*DAEMON, "status", "--json"],
        env=_environment(**{CONNECTION_FILE_ENV: str(path)}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["state"] == "ready"
    process.send_signal(signal.SIGINT)
    assert _exit_code(process, output) == 0, output.read_text()
    assert not path.exists()
    assert group_members(pgid) == []


def test_a_specific_host_is_the_url_and_no_key_is_null(
    tmp_path: Path, run_daemon: Callable[..., Started]
) -> None:
    path = tmp_path / "c.json"
    process, output = run_daemon("--host", "127.0.0.1", "--port", "0", "--connection-file", str(path))
    info = _wait_for_file(path, process, output)
    assert info.url == f"http://127.0.0.1:{info.port}" and info.key is None
    assert httpx.get(info.url + "/proxy/health", timeout=10).json()["status"] == "ok"


def test_a_file_another_daemon_wrote_over_it_is_left_alone(
    tmp_path: Path, run_daemon: Callable[..., Started]
) -> None:
    """Two jobs given the same path: the first to exit removes only its own file."""
    path = tmp_path / "c.json"
    process, output = run_daemon("--host", "127.0.0.1", "--port", "0", "--connection-file", str(path))
    info = _wait_for_file(path, process, output)
    newer = info.model_copy(update={"pid": info.pid + 1, "started_at": datetime.now(timezone.utc)})
    path.write_text(newer.model_dump_json())
    process.send_signal(signal.SIGTERM)
    assert _exit_code(process, output) == 0, output.read_text()
    assert ConnectionInfo.model_validate_json(path.read_bytes()) == newer
    assert "not this daemon's" in output.read_text()


def test_a_file_that_cannot_be_written_is_a_one_line_error(
    tmp_path: Path, run_daemon: Callable[..., Started]
) -> None:
    (tmp_path / "not-a-folder").write_text("")
    path = tmp_path / "not-a-folder" / "c.json"
    process, output = run_daemon("--host", "127.0.0.1", "--port", "0", "--connection-file", str(path))
    assert _exit_code(process, output) == 1
    text = output.read_text()
    assert f"cannot write the connection file {path}" in text and "Traceback" not in text


# ------------------------------------------------------------------------------ the client's reading


def _write(path: Path, data: str, mode: int = 0o600) -> Path:
    path.write_text(data)
    path.chmod(mode)
    return path


def _info(**changes: object) -> ConnectionInfo:
    values: dict[str, object] = {
        "url": "http://gpu042:40117",
        "key": "k",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "port": 40117,
        "started_at": datetime.now(timezone.utc),
        "slurm_job_id": "7",
        "version": __version__,
    }
    return ConnectionInfo.model_validate({**values, **changes})


def test_reading_a_good_file(tmp_path: Path) -> None:
    info = _info()
    path = _write(tmp_path / "c.json", info.model_dump_json())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = read_connection_file(path)
    assert found.info == info and found.path == path


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "no connection file"),
        ("{not json", "is not JSON"),
        ('{"url": "http://x:1"}', "is not an aic-vllm-proxy connection file (key: Field required"),
        ("[1, 2]", "is not an aic-vllm-proxy connection file"),
    ],
)
def test_a_file_that_cannot_be_used_is_a_clear_error(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "c.json"
    if content is not None:
        _write(path, content)
    with pytest.raises(ConnectionFileError, match=str(path)) as caught:
        read_connection_file(path)
    assert words in caught.value.message


def test_a_file_others_may_read_is_warned_about(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.json", _info().model_dump_json(), mode=0o644)
    with pytest.warns(UserWarning, match=r"may be read by others \(mode 0644\).*chmod 600"):
        read_connection_file(path)


def test_a_daemon_gone_from_this_host_is_warned_about(tmp_path: Path) -> None:
    """A pid that is not running on the daemon's own host: the file is left over (SIGKILL)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not process_exists(gone.pid)
    path = _write(tmp_path / "c.json", _info(pid=gone.pid).model_dump_json())
    with pytest.warns(UserWarning, match=f"pid {gone.pid} on .* is not running: the file is left over"):
        read_connection_file(path)
    elsewhere = _write(tmp_path / "d.json", _info(pid=gone.pid, host="another-node").model_dump_json())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on another host a pid says nothing
        read_connection_file(elsewhere)


def test_from_connection_file_takes_its_url_and_key_unless_a_key_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIC_VLLM_PROXY_KEY", raising=False)
    path = _write(tmp_path / "c.json", _info(url="http://gpu042:40117", key="from-file").model_dump_json())
    with VLLMProxyClient.from_connection_file(path) as proxy:
        assert (proxy.proxy_url, proxy.api_key, proxy.connection_file) == (
            "http://gpu042:40117",
            "from-file",
            path,
        )
    with VLLMProxyClient.from_connection_file(str(path), api_key="given") as proxy:
        assert proxy.api_key == "given"
    monkeypatch.setenv("AIC_VLLM_PROXY_KEY", "from-env")
    with VLLMProxyClient.from_connection_file(path) as proxy:
        assert proxy.api_key == "from-env"


async def test_the_async_twin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIC_VLLM_PROXY_KEY", raising=False)
    path = _write(tmp_path / "c.json", _info(url="http://gpu042:40117", key="from-file").model_dump_json())
    async with AsyncVLLMProxyClient.from_connection_file(path) as proxy:
        assert isinstance(proxy, AsyncVLLMProxyClient)
        assert (proxy.proxy_url, proxy.api_key, proxy.connection_file) == (
            "http://gpu042:40117",
            "from-file",
            path,
        )


def test_the_environment_variable_when_no_url_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AIC_VLLM_PROXY_URL", "AIC_VLLM_PROXY_KEY"):
        monkeypatch.delenv(name, raising=False)
    path = _write(tmp_path / "c.json", _info(url="http://gpu042:40117", key="from-file").model_dump_json())
    monkeypatch.setenv(CONNECTION_FILE_ENV, str(path))
    with VLLMProxyClient() as proxy:
        assert (proxy.proxy_url, proxy.api_key, proxy.connection_file) == (
            "http://gpu042:40117",
            "from-file",
            path,
        )
    with VLLMProxyClient("http://other:1") as proxy:  # a URL given wins, and its key is not the file's
        assert (proxy.proxy_url, proxy.api_key, proxy.connection_file) == ("http://other:1", None, None)
    monkeypatch.setenv("AIC_VLLM_PROXY_URL", "http://from-env:2")
    with VLLMProxyClient() as proxy:
        assert (proxy.proxy_url, proxy.connection_file) == ("http://from-env:2", None)
    monkeypatch.delenv("AIC_VLLM_PROXY_URL")
    monkeypatch.setenv(CONNECTION_FILE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ConnectionFileError, match="no connection file"):
        VLLMProxyClient()


def test_a_daemon_gone_elsewhere_is_unreachable_naming_the_file(tmp_path: Path) -> None:
    """On another host a pid says nothing: the URL is tried, and the error names the file."""
    info = _info(url=f"http://127.0.0.1:{free_port()}", host="another-node", pid=1)
    path = _write(tmp_path / "c.json", info.model_dump_json())
    with VLLMProxyClient.from_connection_file(path) as proxy, pytest.raises(ProxyUnreachable) as caught:
        proxy.status()
    assert f"connection file {path}" in caught.value.message


def test_the_command_line_with_a_file_that_cannot_be_used(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    cli = subprocess.run(
        [*DAEMON, "status"],
        env=_environment(**{CONNECTION_FILE_ENV: str(missing)}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 1
    assert f"Error: no connection file {missing}" in cli.stderr and "Traceback" not in cli.stderr


# ------------------------------------------------------------------------------ the sbatch script


def test_the_sbatch_script_run_with_bash(tmp_path: Path, vllm_groups: set[int]) -> None:
    """``bash aic-vllm-proxy.sbatch`` with SLURM's variables: the connection file appears (0600)
    with the job's id and a key that the job's output never shows; a notebook-style client made
    from it finds the preloaded catalogue model (examples/slurm/proxy.toml), switches to a
    simulator model and gets a completion; SIGTERM to bash (what ``--signal=B:TERM@120`` sends)
    reaches the daemon once: vLLM is stopped, the file and the keys file are gone, exit 0."""
    home = tmp_path / "home"
    home.mkdir()
    job = "31337"
    path = home / ".aic-vllm-proxy" / "jobs" / f"{job}.json"
    daemon_args = [
        "--simulator", "--host", "127.0.0.1", "--vllm-port", str(free_port()), "--stop-timeout", "5",
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    env = _environment(
        HOME=str(home),
        SLURM_JOB_ID=job,
        SLURM_SUBMIT_DIR=str(SBATCH.parent),
        SLURM_JOB_NODELIST=socket.gethostname(),
        AIC_VLLM_PROXY_CMD=shlex.join(DAEMON),
        AIC_VLLM_PROXY_ARGS=shlex.join(daemon_args),
    )
    output = tmp_path / f"aic-vllm-proxy-{job}.out"
    with open(output, "wb") as out:
        script = subprocess.Popen(
            ["bash", str(SBATCH)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )
    try:
        info = _wait_for_file(path, script, output)
        keys_file = path.with_suffix(".keys")
        assert _mode(path) == 0o600 and _mode(keys_file) == 0o600 and _mode(path.parent) == 0o700
        assert info.slurm_job_id == job and info.key and len(info.key) >= 32
        assert keys_file.read_text() == f"admin {info.key}\n"

        with VLLMProxyClient.from_connection_file(path, progress=False) as proxy:  # the notebook's line
            assert wait_until(lambda: _preloaded_ready(proxy), START), proxy.status()
            vllm_groups.update(int(i["pid"]) for i in proxy.status()["instances"] if i.get("pid"))
            result = proxy.switch("sim/notebook", args=FAST)
            assert result["changed"] is True
            pgid = int(result["status"]["pid"])
            vllm_groups.add(pgid)
            completion = proxy.get_openai_client().completions.create(
                model="sim/notebook", prompt="Hello", max_tokens=4
            )
            assert completion.choices[0].text

        script.send_signal(signal.SIGTERM)
        assert _exit_code(script, output) == 0, output.read_text()
        assert not path.exists() and not keys_file.exists()
        assert group_members(pgid) == []
        text = output.read_text()
        assert info.key not in text
        assert "stopping the daemon" in text and "connection file" in text and "removed" in text
    finally:
        if script.poll() is None:
            script.kill()
        if process_exists(info_pid := _pid_in(path)):
            os.kill(info_pid, signal.SIGTERM)


def _preloaded_ready(proxy: VLLMProxyClient) -> bool:
    instances = proxy.status()["instances"]
    return any(i["name"] == "qwen-7b" and i["state"] == "ready" for i in instances)


def _pid_in(path: Path) -> int:
    """The daemon's pid from a file still there (for clean-up after a failure); 0 without one."""
    try:
        return ConnectionInfo.model_validate_json(path.read_bytes()).pid
    except (OSError, ValueError):
        return 0
