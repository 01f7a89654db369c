"""Issue 16, items 3, 4, 12, 14 and 17: what the daemon gives vLLM, who it talks to on vLLM's
port, why a start failed, its own port taken, and the state after a failed model is stopped.

- 3: vLLM's environment holds none of the proxy's secrets (read from ``/proc/<pid>/environ`` of
  the simulator's processes, with the keys given through environment variables).
- 4: another process on vLLM's port (a second simulator, or a socket that starts listening while
  the launch loads) fails the switch with "vLLM port N is in use by another process" and gets no
  request; readiness waits until ``/v1/models`` lists the model that was launched.
- 12: the root cause of a failed start (``logs.root_cause``) from real-looking vLLM logs, and
  through the proxy with the simulator's out-of-memory failure (printed, as by vLLM, far above
  the last line).
- 14: ``serve`` on a port in use says so in one line and exits 1.
- 17: a failed model that is stopped leaves no error as the current state; failure texts are
  clean sentences.

Run as ``python tests/test_engine_defects.py fake-vllm FLAG MODEL ...`` this file is a stand-in
vLLM whose ``/v1/models`` lists another model until the file FLAG exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    FAST,
    async_wait_until,
    chat_request,
    free_port,
    group_members,
    port_open,
    sim_groups,
    start_daemon,
    wait_until,
)

from aic_vllm_proxy import __version__
from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.engine.launch import child_env, is_proxy_secret, port_is_free
from aic_vllm_proxy.engine.logs import failure_tail, parse_line, root_cause
from aic_vllm_proxy.engine.prober import Target, names_model, serves
from aic_vllm_proxy.engine.procgroup import FOREIGN, NOBODY, OURS, port_listener
from aic_vllm_proxy.errors import sentences
from aic_vllm_proxy.simulator.engine import OOM_MESSAGE
from aic_vllm_proxy.spec import ModelSpec

THIS = Path(__file__).resolve()
CHAT = "/v1/chat/completions"


def port_message(port: int) -> str:
    return f"vLLM port {port} is in use by another process"


def launched(proxy: Any) -> set[int]:
    """The process groups of every vLLM the proxy launched (its logs are ``<time>_pid-<pid>.log``)."""
    return {int(path.stem.rsplit("_pid-", 1)[1]) for path in Path(proxy.settings.log_dir).glob("*_pid-*.log")}


async def stop_and_check(proxy: Any) -> None:
    """POST /stop, then no process of any group the proxy launched is left."""
    async with proxy.session.post(proxy.url + "/stop") as resp:
        assert resp.status == 200
    pgids = launched(proxy)
    assert await async_wait_until(lambda: not any(group_members(pgid) for pgid in pgids), 15), pgids


# --------------------------------------------------------------- 3: secrets stay in the proxy


def test_child_env_drops_the_proxys_secrets() -> None:
    environ = {
        "AIC_VLLM_PROXY_ADMIN_KEY": "a",
        "AIC_VLLM_PROXY_API_KEY": "u",
        "AIC_VLLM_PROXY_KEYS_FILE": "/etc/keys",
        "AIC_VLLM_PROXY_KEY": "client",
        "AIC_VLLM_PROXY_PLUGIN_SLACK_TOKEN": "t",
        "AIC_VLLM_PROXY_VLLM_PORT": "8225",
        "VLLM_API_KEY": "vllm's own",
        "HF_TOKEN": "hf",
        "PATH": "/bin",
    }
    env = child_env(Settings(), environ)
    assert set(env) == {"AIC_VLLM_PROXY_VLLM_PORT", "VLLM_API_KEY", "HF_TOKEN", "PATH", "PYTHONUNBUFFERED"}
    assert is_proxy_secret("aic_vllm_proxy_admin_key") and not is_proxy_secret("VLLM_API_KEY")


def test_vllm_does_not_inherit_the_proxys_secrets(
    spawn_proxy: Any, vllm_groups: set[int], tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("admin file-admin-secret\n")
    secrets = {
        "AIC_VLLM_PROXY_ADMIN_KEY": "env-admin-secret",
        "AIC_VLLM_PROXY_API_KEY": "env-user-secret",
        "AIC_VLLM_PROXY_KEYS_FILE": str(keys_file),
        "AIC_VLLM_PROXY_KEY": "client-secret",
    }
    visible = {"AIC_VLLM_PROXY_TEST_VISIBLE": "marker-value", "VLLM_API_KEY": "vllm-own-key"}
    proxy = spawn_proxy(env={**secrets, **visible})
    admin = {"Authorization": "Bearer file-admin-secret"}  # the keys file was read
    with httpx.Client(timeout=60, headers=admin) as http:
        answer = http.post(proxy.url + "/switch", json={"model_spec": f"m {FAST}"})
        assert answer.status_code == 200, answer.text
        pgid = answer.json()["status"]["pid"]
        vllm_groups.add(pgid)
        members = group_members(pgid)
        assert len(members) >= 2, members  # the API server and its EngineCore
        for pid in members:
            items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            names = {item.split(b"=", 1)[0].decode() for item in items if item}
            for name, value in secrets.items():
                assert name not in names, (pid, name)
                assert not any(value.encode() in item for item in items), (pid, name)
            for name, value in visible.items():  # the check reads the right thing
                assert f"{name}={value}".encode() in items, (pid, name)
        assert http.post(proxy.url + "/stop").status_code == 200
    assert wait_until(lambda: group_members(pgid) == [], 15)


# ------------------------------------------------- 4: nothing goes to a process we did not start


class Impostor:
    """A socket on vLLM's port that answers like vLLM (``/health`` 200, ``/v1/models`` listing
    ``model``) once it listens, and records every byte it is sent."""

    def __init__(self, port: int, model: str) -> None:
        self.model = model
        self.received = b""
        self.connections = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))  # bound like a vLLM still loading: not listening

    def listen(self) -> None:
        self.sock.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
            self.received += chunk
        path = data.split(b" ", 2)[1]
        body = (
            b'{"object":"list","data":[{"id":"%s"}]}' % self.model.encode() if path == b"/v1/models" else b""
        )
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )

    def close(self) -> None:
        self.sock.close()


async def test_another_vllm_on_the_port_fails_the_switch(
    make_proxy: Any, vllm_groups: set[int], tmp_path: Path
) -> None:
    """Two daemons with the same --vllm-port: the second one's switch fails at once with the
    reason, starts nothing, and never forwards a request to the first one's vLLM."""
    port = free_port()
    output = tmp_path / "theirs.log"
    with open(output, "wb") as out:
        theirs = subprocess.Popen(
            [sys.executable, "-m", "aic_vllm_proxy.simulator", "serve", "theirs", "--host", "127.0.0.1",
             "--port", str(port), *FAST.split()],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    vllm_groups.add(theirs.pid)
    try:
        assert await async_wait_until(lambda: port_open(port), 30), output.read_text()
        assert not port_is_free("127.0.0.1", port)
        proxy = await make_proxy(vllm_port=port)
        code, body = await proxy.switch(f"mine --served-model-name theirs {FAST}")
        assert code == 409, body
        error = body["error"]
        assert error["type"] == "switch_failed" and port_message(port) in error["message"], error
        assert "--vllm-port" in error["message"]
        assert proxy.supervisor.launch is None and sim_groups(port) == {theirs.pid}
        assert not list(Path(proxy.settings.log_dir).glob("*_pid-*.log"))  # nothing was started
        status = await proxy.status()
        assert (status["state"], status["running"], status["error"]) == ("failed", False, port_message(port))
        async with proxy.session.post(proxy.url + CHAT, json=chat_request("theirs", stream=False)) as resp:
            assert resp.status == 503, await resp.text()
        assert '"GET ' not in output.read_text() and '"POST ' not in output.read_text()  # nothing reached it
    finally:
        os.killpg(theirs.pid, signal.SIGTERM)
        theirs.wait(15)
    assert wait_until(lambda: group_members(theirs.pid) == [], 15)


async def test_a_listener_that_appears_during_the_start_is_never_used(make_proxy: Any) -> None:
    """The port was free at launch, then another process listens on it (answering like vLLM, with
    the very model asked for) before our vLLM does: the switch fails, our launch is killed, and
    the other process is sent nothing."""
    port = free_port()
    impostor = Impostor(port, "mine")
    try:
        proxy = await make_proxy(vllm_port=port, ready_timeout=60)
        # A long import: our vLLM does not even bind before the impostor is found out.
        switch = asyncio.ensure_future(
            proxy.switch("mine --served-model-name mine --sim-import-delay 30 --sim-load-delay 0.2")
        )
        assert await async_wait_until(lambda: proxy.supervisor.launch is not None, 20)
        launch = proxy.supervisor.launch
        assert launch is not None
        proxy.groups.add(launch.pgid)
        impostor.listen()
        code, body = await asyncio.wait_for(switch, 60)
        assert code == 409, body
        assert port_message(port) in body["error"]["message"], body
        assert impostor.connections >= 1 and impostor.received == b""  # seen, never spoken to
        assert await async_wait_until(lambda: group_members(launch.pgid) == [], 15)
        status = await proxy.status()
        assert (status["state"], status["error"], status["exit_code"]) == ("failed", port_message(port), None)
        async with proxy.session.post(proxy.url + CHAT, json=chat_request("mine", stream=False)) as resp:
            assert resp.status == 503
        assert impostor.received == b""
    finally:
        impostor.close()


async def test_readiness_waits_until_the_launched_model_is_listed(make_proxy: Any, tmp_path: Path) -> None:
    """Our own vLLM answers /health but lists another model: not ready until it lists ours."""
    flag = tmp_path / "list-the-model"
    command = f"{sys.executable} {THIS} fake-vllm {flag}"
    proxy = await make_proxy(vllm_command=command, ready_timeout=60)
    switch = asyncio.ensure_future(proxy.switch("wanted --served-model-name wanted"))
    # Once the pid is in the state, the log file has its final name.
    assert await async_wait_until(lambda: proxy.supervisor.machine.snapshot.pid is not None, 20)
    launch = proxy.supervisor.launch
    assert launch is not None
    pgid = launch.pgid
    proxy.groups.add(pgid)
    log_path: Path = launch.log_path

    def listings() -> int:
        return log_path.read_text().count("listed ['other']")

    assert await async_wait_until(lambda: listings() >= 3, 30), log_path.read_text()
    status = await proxy.status()
    assert status["state"] == "starting" and not switch.done(), status
    flag.touch()
    code, body = await asyncio.wait_for(switch, 30)
    assert code == 200, body
    assert (body["status"]["state"], body["status"]["model"]) == ("ready", "wanted")
    await stop_and_check(proxy)


def test_readiness_rules_without_a_process() -> None:
    target = Target(pgid=1, port=1, addresses=("127.0.0.1",), model="org/m")
    assert serves(["org/m"], target, ours=False)
    assert not serves(["other"], target, ours=False)
    assert serves(["other-name"], target, ours=True)  # vLLM chose the name; the listener is ours
    # HF_HUB_OFFLINE: vLLM lists the local snapshot of the repo.
    assert names_model("/root/.cache/huggingface/hub/models--org--m/snapshots/abc", "org/m")
    named = Target(pgid=1, port=1, addresses=(), model="org/m", served_names=("a", "b"))
    assert serves(["a", "b"], named, ours=False) and not serves(["a"], named, ours=True)
    assert not serves(["org/m"], named, ours=True)  # a served name is listed as given
    assert ModelSpec.parse("m --served-model-name a b --x").served_names == ("a", "b")
    assert ModelSpec.parse("m --served_model_name=a").served_names == ("a",)
    assert ModelSpec.parse("m").served_names == () and ModelSpec.parse("m").served_name == "m"


def test_port_listener_tells_ours_from_foreign() -> None:
    port = free_port()
    assert port_listener(os.getpgrp(), port, ["127.0.0.1"]) == NOBODY
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert port_listener(os.getpgrp(), port, ["127.0.0.1"]) == OURS
        assert port_listener(os.getpgrp(), port, ["127.0.0.2"]) == NOBODY  # another address
        other = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
        )
        try:
            assert port_listener(other.pid, port, ["127.0.0.1"]) == FOREIGN
        finally:
            other.kill()
            other.wait()


# ------------------------------------------------------------------- 12: why a start failed

# vLLM 0.32 (CPU build), VLLM_CPU_KVCACHE_SPACE=1000 on an 8 GiB node: the worker's error, the
# EngineCore's pointer to it, the API server's pointer (frames shortened; observed output).
REAL_KV_CACHE_FAILURE = """\
(EngineCore pid=4820) INFO 12-03 13:31:10 [utils.py:347] Using LBHNC KV cache layout.
(Worker pid=4849) ERROR 12-03 13:31:10 [multiproc_executor.py:1063] WorkerProc hit an exception.
(Worker pid=4849) ERROR 12-03 13:31:10 [multiproc_executor.py:1063] Traceback (most recent call last):
(Worker pid=4849) ERROR 12-03 13:31:10 [multiproc_executor.py:1063]   File "/v/vllm/v1/worker/cpu_worker.py", line 219, in determine_available_memory
(Worker pid=4849) ERROR 12-03 13:31:10 [multiproc_executor.py:1063]     raise ValueError(
(Worker pid=4849) ERROR 12-03 13:31:10 [multiproc_executor.py:1063] ValueError: Available memory on node 0 (6.77/8.09 GiB) on kv cache allocation is less than requested memory for kv (1000.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other processes.
(Worker pid=4849) ERROR 12-03 13:31:10 [multiproc_executor.py:1063] \n\
(EngineCore pid=4820) ERROR 12-03 13:31:10 [core.py:1510] EngineCore failed to start.
(EngineCore pid=4820) ERROR 12-03 13:31:10 [core.py:1510] Traceback (most recent call last):
(EngineCore pid=4820) ERROR 12-03 13:31:10 [core.py:1510]   File "/v/vllm/v1/executor/multiproc_executor.py", line 444, in get_response
(EngineCore pid=4820) ERROR 12-03 13:31:10 [core.py:1510]     raise RuntimeError(
(EngineCore pid=4820) ERROR 12-03 13:31:10 [core.py:1510] RuntimeError: Worker failed with error 'Available memory on node 0 (6.77/8.09 GiB) on kv cache allocation is less than requested memory for kv (1000.0 GiB).', please check the stack trace above for the root cause
(EngineCore pid=4820) ERROR 12-03 13:31:13 [multiproc_executor.py:315] Worker proc VllmWorker-0 died unexpectedly (exit code: 0), shutting down executor.
Process EngineCore:
Traceback (most recent call last):
  File "/usr/lib/python3.11/multiprocessing/process.py", line 314, in _bootstrap
    self.run()
RuntimeError: Worker failed with error 'Available memory on node 0 (6.77/8.09 GiB) on kv cache allocation is less than requested memory for kv (1000.0 GiB).', please check the stack trace above for the root cause
Traceback (most recent call last):
  File "/v/vllm/v1/engine/utils.py", line 1431, in wait_for_engine_startup
    raise RuntimeError(
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: There appear to be 1 leaked shared_memory objects to clean up at shutdown
  warnings.warn('resource_tracker: There appear to be %d '
"""  # noqa: E501
REAL_VALIDATION_FAILURE = """\
(APIServer pid=12573) INFO 11-27 09:14:32 [model.py:2495] Downcasting torch.float32 to torch.bfloat16.
Traceback (most recent call last):
  File "/v/pydantic/_internal/_dataclasses.py", line 121, in __init__
    s.__pydantic_validator__.validate_python(ArgsKwargs(args, kwargs), self_instance=s)
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, User-specified max_model_len (99999) is greater than the derived max_model_len (max_position_embeddings=2048.0 or model_max_length=None in model's config.json). [type=value_error]
    For further information visit https://errors.pydantic.dev/2.14/v/value_error
"""  # noqa: E501
REAL_UNKNOWN_FLAG = """\
W1127 09:14:06.962000 11508 torch/_library/triton.py:53] Triton not available, find_triton_kernels = []
usage: vllm [-h] [-v]
            {chat,complete,serve,launch,bench,collect-env,download-kernels,preload,run-batch,snapshot}
            ...
vllm: error: unrecognized arguments: --bogus-flag
"""


def test_prefixes_are_stripped() -> None:
    line = parse_line("(EngineCore_DP0 pid=123) ERROR 12-03 13:00:00 [core.py:123] torch.OutOfMemoryError: x")
    assert (line.process, line.level, line.text) == (
        "EngineCore_DP0 pid=123",
        "ERROR",
        "torch.OutOfMemoryError: x",
    )
    line = parse_line("(VllmWorker TP0 pid=9) WARNING 12-03 13:00:00 [gpu_worker.py:9] careful")
    assert (line.process, line.level, line.text) == ("VllmWorker TP0 pid=9", "WARNING", "careful")
    line = parse_line("ERROR 12-03 13:00:00.123 [file.py:12] ValueError: y")
    assert (line.process, line.level, line.text) == ("", "ERROR", "ValueError: y")
    line = parse_line("\x1b[1;36m(APIServer pid=1)\x1b[0;0m INFO 12-03 13:00:00 [a.py:1] hi")
    assert (line.process, line.level, line.text) == ("APIServer pid=1", "INFO", "hi")
    assert parse_line("INFO:     Shutting down").text == "INFO:     Shutting down"
    # Ray's forwarded worker lines (--distributed-executor-backend ray, docs/ray.md).
    line = parse_line("(RayWorkerWrapper pid=77, ip=10.0.0.2) ERROR 12-03 13:00:00 [w.py:3] RuntimeError: z")
    assert (line.process, line.level, line.text) == (
        "RayWorkerWrapper pid=77, ip=10.0.0.2",
        "ERROR",
        "RuntimeError: z",
    )
    line = parse_line("(pid=78) INFO 12-03 13:00:00 [w.py:3] up")
    assert (line.process, line.level, line.text) == ("pid=78", "INFO", "up")


@pytest.mark.parametrize(
    ("log", "cause"),
    [
        (
            REAL_KV_CACHE_FAILURE,
            "ValueError: Available memory on node 0 (6.77/8.09 GiB) on kv cache allocation is less than "
            "requested memory for kv (1000.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, "
            "or reduce CPU memory used by other processes.",
        ),
        (
            REAL_VALIDATION_FAILURE,
            "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig: Value error, "
            "User-specified max_model_len (99999) is greater than the derived max_model_len "
            "(max_position_embeddings=2048.0 or model_max_length=None in model's config.json). "
            "[type=value_error]",
        ),
        (REAL_UNKNOWN_FLAG, "vllm: error: unrecognized arguments: --bogus-flag"),
        (
            "(EngineCore_DP0 pid=7) INFO 12-03 13:00:00 [core.py:1] loading\n"
            "(EngineCore_DP0 pid=7) ERROR 12-03 13:00:01 [core.py:2] EngineCore failed to start.\n"
            "(EngineCore_DP0 pid=7) ERROR 12-03 13:00:01 [core.py:2] Traceback (most recent call last):\n"
            "(APIServer pid=6) INFO 12-03 13:00:01 [api.py:3] interleaved\n"
            '(EngineCore_DP0 pid=7) ERROR 12-03 13:00:01 [core.py:2]   File "x.py", line 1, in f\n'
            "(EngineCore_DP0 pid=7) ERROR 12-03 13:00:01 [core.py:2] torch.OutOfMemoryError: CUDA out of"
            " memory.\n"
            "RuntimeError: Engine core initialization failed. See root cause above.\n",
            "torch.OutOfMemoryError: CUDA out of memory.",
        ),
        (
            # A traceback logged as a warning was survived; the ERROR record is the cause.
            "(APIServer pid=1) WARNING 12-03 13:00:00 [a.py:1] Traceback (most recent call last):\n"
            "(APIServer pid=1) WARNING 12-03 13:00:00 [a.py:1] ImportError: optional thing\n"
            "(APIServer pid=1) ERROR 12-03 13:00:01 [b.py:2] Engine died: out of memory\n"
            "(APIServer pid=1) ERROR 12-03 13:00:01 [b.py:2] shutting down\n",
            "Engine died: out of memory",
        ),
        (
            # vllm-cpu 0.32, its worker killed by SIGILL at the first forward pass (a ready model
            # dies at its first request): the executor's line, not the "cancelled" it causes.
            "(APIServer pid=1) INFO 12-04 13:41:11 [async_llm.py:578] Added request cmpl-1.\n"
            "(EngineCore pid=2) ERROR 12-04 13:41:11 [multiproc_executor.py:315] Worker proc VllmWorker-0"
            " died unexpectedly (exit code: -4), shutting down executor.\n"
            "(EngineCore pid=2) ERROR 12-04 13:41:11 [core.py:1512] EngineCore encountered a fatal error.\n"
            "(EngineCore pid=2) ERROR 12-04 13:41:11 [core.py:1512] Traceback (most recent call last):\n"
            '(EngineCore pid=2) ERROR 12-04 13:41:11 [core.py:1512]   File "shm_broadcast.py", line 867\n'
            "(EngineCore pid=2) ERROR 12-04 13:41:11 [core.py:1512] RuntimeError: cancelled\n",
            "Worker proc VllmWorker-0 died unexpectedly (exit code: -4, SIGILL), shutting down executor.",
        ),
        (
            # A worker that died after the real error (its traceback first) is not the cause.
            "(Worker pid=3) ERROR 12-04 13:00:00 [w.py:1] Traceback (most recent call last):\n"
            "(Worker pid=3) ERROR 12-04 13:00:00 [w.py:1] torch.OutOfMemoryError: CUDA out of memory.\n"
            "(EngineCore pid=2) ERROR 12-04 13:00:01 [multiproc_executor.py:315] Worker proc VllmWorker-0"
            " died unexpectedly (exit code: 1), shutting down executor.\n",
            "torch.OutOfMemoryError: CUDA out of memory.",
        ),
        ("", None),
    ],
)
def test_root_cause_of_real_looking_logs(log: str, cause: str | None) -> None:
    found = root_cause(log.splitlines())
    assert (found.text if found else None) == cause


def test_failure_tail_shows_the_cause_first() -> None:
    lines = REAL_KV_CACHE_FAILURE.splitlines()
    cause = root_cause(lines)
    assert cause is not None
    tail = failure_tail(lines, cause, 5)
    assert tail[0] == lines[cause.index] and "ValueError: Available memory" in tail[0]
    assert tail[1] == f"[... {len(lines) - 5 - cause.index - 1} more lines ...]"
    assert tail[2:] == lines[-5:]
    assert failure_tail(lines, cause, 100) == lines  # the cause is in the tail already
    assert failure_tail(lines, None, 3) == lines[-3:]


async def test_out_of_memory_is_named_in_the_switch_error(make_proxy: Any) -> None:
    """The simulator fails like vLLM: the cause far above the last line; the error names it."""
    proxy = await make_proxy(ready_timeout=60)
    code, body = await proxy.switch(f"sim/oom --sim-fail-during-load {FAST}")
    assert code == 500, body
    error = body["error"]
    assert error["message"].startswith(f"vLLM exited with status 1 while starting sim/oom: {OOM_MESSAGE}. ")
    assert "Engine core initialization failed" not in error["message"]
    log = (await proxy.status())["log_path"]
    lines = Path(log).read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith(OOM_MESSAGE))
    assert len(lines) - at > 50, len(lines) - at  # as with real vLLM: not in the last 40 lines
    tail = error["log_tail"]
    assert tail[0] == lines[at] and tail[1].startswith("[... ") and tail[2:] == lines[-40:]
    status = await proxy.status()
    assert status["error"] == f"vLLM exited with status 1 while starting sim/oom: {OOM_MESSAGE}"
    await stop_and_check(proxy)


async def test_out_of_memory_through_the_python_client(make_proxy: Any) -> None:
    """docs/client.md's example: the client's SwitchError says what vLLM said."""
    from aic_vllm_proxy.client import AsyncVLLMProxyClient, SwitchError

    proxy = await make_proxy(ready_timeout=60)
    async with AsyncVLLMProxyClient(proxy.url, progress=False) as client:
        with pytest.raises(SwitchError) as info:
            await client.switch(
                "meta-llama/Llama-2-70b-hf", f"--tensor-parallel-size 1 --sim-fail-during-load {FAST}"
            )
    assert info.value.exit_code == 1
    assert "torch.OutOfMemoryError: CUDA out of memory" in info.value.message
    await stop_and_check(proxy)


# ------------------------------------------------------------------- 14: the daemon's own port


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "aic_vllm_proxy", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--simulator", "--log-dir", str(tmp_path / "logs")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    output = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1, output
    assert len(output) == 1 and output[0].endswith(f"port {port} is in use: another aic-vllm-proxy?"), output


def test_the_listening_line_comes_after_the_bind(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path)
    try:
        assert f"aic-vllm-proxy {__version__} on http://127.0.0.1:{daemon.port}" in daemon.read_output()
    finally:
        assert daemon.stop() == 0


# --------------------------------------------------------------- 17: state and texts after a failure


@pytest.mark.parametrize(
    ("spec", "state"),
    [
        (f"broken --sim-fail-during-load {FAST}", None),  # the start fails
        (f"dies --sim-engine-die-after 0.3 --sim-exit-code 3 --sim-dead-exit-delay 0.1 {FAST}", "failed"),
    ],
)
async def test_a_stopped_failure_is_not_the_current_state(
    make_proxy: Any, spec: str, state: str | None
) -> None:
    proxy = await make_proxy(ready_timeout=60)
    code, body = await proxy.switch(spec)
    if state is None:
        assert code == 500, body
    else:  # ready, then dies
        assert code == 200, body
        assert await async_wait_until(lambda: proxy.supervisor.machine.state.value == "failed", 20)
        assert await async_wait_until(lambda: proxy.supervisor.launch is None, 20)
    failed = await proxy.status()
    assert failed["state"] == "failed" and failed["error"] and failed["exit_code"] is not None, failed
    async with proxy.session.post(proxy.url + CHAT, json=chat_request("m", stream=False)) as resp:
        assert resp.status == 503
        message = (await resp.json())["error"]["message"]
    assert ".." not in message and message.count("POST /switch") == 1, message
    await stop_and_check(proxy)
    stopped = await proxy.status()
    assert stopped["state"] == "stopped", stopped
    assert (stopped["error"], stopped["exit_code"], stopped["running"]) == (None, None, False), stopped


async def test_failure_messages_are_clean_sentences(make_proxy: Any, tmp_path: Path) -> None:
    """vLLM's words often end with a full stop ("... if needed."): the advice after them is a
    sentence of its own, never joined with ".."."""
    proxy = await make_proxy(ready_timeout=60)
    code, body = await proxy.switch(f"{tmp_path}/no/such/model {FAST}")
    assert code == 500, body
    message = body["error"]["message"]
    assert "Use `repo_type` argument if needed. Check the model name" in message, message
    assert ".." not in message, message
    assert sentences("X failed.", None, "Retry", "Sure?") == "X failed. Retry. Sure?"
    await stop_and_check(proxy)


# ------------------------------------------------------------------------ stand-in vLLM


def fake_vllm_main(argv: list[str]) -> None:
    """``fake-vllm FLAG MODEL [--served-model-name NAME] --host H --port P``: answers /health;
    ``/v1/models`` lists "other" until the file FLAG exists, then the served name."""
    from aiohttp import web

    flag = Path(argv[0])
    words = argv[1:]
    option = {words[i]: words[i + 1] for i in range(1, len(words) - 1) if words[i].startswith("--")}
    served = option.get("--served-model-name", words[0])

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(request: web.Request) -> web.Response:
        listed = [served] if flag.exists() else ["other"]
        print(f"listed {listed}", flush=True)
        return web.json_response({"object": "list", "data": [{"id": name} for name in listed]})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    web.run_app(app, host=option["--host"], port=int(option["--port"]), print=None, access_log=None)


if __name__ == "__main__":
    if sys.argv[1:2] == ["fake-vllm"]:
        fake_vllm_main(sys.argv[2:])
