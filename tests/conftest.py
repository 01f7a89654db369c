"""Shared fixtures: the proxy (in this process on a real socket, or as a real subprocess) in
front of the bundled vLLM simulator, always run as a real subprocess.

- ``make_proxy(**settings)`` -> :class:`ProxyHandle`: the aiohttp app served on a free loopback
  port inside the test's event loop, with ``handler_cancellation`` as in production; behind the
  front door, or with ``access_log=True`` by aiohttp alone (as ``--access-log`` does).
- ``spawn_proxy(*args, env=...)`` -> :class:`ProxyProcess`: ``python -m aic_vllm_proxy serve``
  as a child process (for signal tests).
- ``SIM``: the ``--vllm-command`` that runs the simulator with this interpreter.

Every test ends with no process group left (``no_process_group_left``): a group the test or its
proxies started that is still alive after its fixtures ended fails the test, and is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import SESSION_MARKER, SIM, Alive, free_port, reap_left_behind, session_alive, wait_until

from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.engine.supervisor import Supervisor
from aic_vllm_proxy.relay.front import Front
from aic_vllm_proxy.web.app import create_app
from aic_vllm_proxy.web.appkeys import SUPERVISOR
from aic_vllm_proxy.web.server import Listener, listen, make_runner

#: This session's value of the marker every process the tests start inherits (helpers.py).
SESSION = os.environ[SESSION_MARKER] = uuid.uuid4().hex
#: How long a group may take to go after a test's fixtures ended (one may still be stopping).
GROUP_GRACE = float(os.environ.get("AIC_PROXY_TEST_GROUP_GRACE", "15"))


@pytest.fixture
def vllm_groups() -> set[int]:
    """Process groups of vLLM launches the test knows of: ``no_process_group_left`` checks them
    too (beside every group it finds by the session's marker)."""
    return set()


@pytest.fixture(autouse=True)
def no_process_group_left(vllm_groups: set[int]) -> Iterator[None]:
    """Every test ends with no process group left that it (or a proxy it ran) started: one
    still alive after the test's fixtures ended (and a grace period for one being stopped) is
    killed, and the test fails, naming it. Groups of a module's daemon are checked when the
    module ends (``no_process_group_left_by_module``)."""
    before = session_alive(SESSION)
    yield
    fail_if_left(before, vllm_groups, "the test")


@pytest.fixture(scope="module", autouse=True)
def no_process_group_left_by_module() -> Iterator[None]:
    """The same check over a whole module, after its module-wide fixtures (daemons) ended."""
    before = session_alive(SESSION)
    yield
    fail_if_left(before, (), "the module")


def fail_if_left(before: Alive, named: Collection[int], who: str) -> None:
    left = reap_left_behind(before, SESSION, named, wait=GROUP_GRACE)
    if left:
        pytest.fail(f"process groups left behind by {who} (killed now):\n" + "\n".join(left), pytrace=False)


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    """The proxy's settings for a test. Port 0: the kernel picks a free port as the proxy listens
    (no race with other processes). vLLM's port must be known before vLLM starts: a free one."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "vllm_command": SIM,
        "vllm_port": free_port(),
        "log_dir": tmp_path / "logs",
        "ready_timeout": 30.0,
        "stop_timeout": 5.0,
        "request_wait_timeout": 30.0,
        "health_interval": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class ProxyHandle:
    url: str
    app: web.Application
    settings: Settings  # the app's, with the port it listens on (the app's say 0 if it was 0)
    session: aiohttp.ClientSession
    groups: set[int] = field(default_factory=set)
    front: Front | None = None  # the front door of its listening site (front.py)

    @property
    def supervisor(self) -> Supervisor:
        return self.app[SUPERVISOR]

    async def switch(self, spec: str, **extra: Any) -> tuple[int, dict[str, Any]]:
        async with self.session.post(f"{self.url}/switch", json={"model_spec": spec, **extra}) as resp:
            body = await resp.json()
            launch = self.supervisor.launch
            if launch is not None:
                self.groups.add(launch.pgid)
            return resp.status, body

    async def status(self) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/status") as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
            if body.get("pid"):
                self.groups.add(int(body["pid"]))
            return body


@pytest.fixture
async def make_proxy(tmp_path: Path, vllm_groups: set[int]) -> AsyncIterator[Callable[..., Any]]:
    """Start the proxy app on a real socket in this event loop; stopped (with vLLM) at teardown."""
    runners: list[tuple[web.AppRunner, Listener]] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(*, extra_plugins: Any = (), **overrides: Any) -> ProxyHandle:
        settings = settings_for(tmp_path, **overrides)
        app = create_app(settings, extra_plugins=extra_plugins)
        keepalive = min(75.0, settings.client_timeout)
        # access_log=True: aiohttp serves every request, without the front door (as in cli.py).
        access_log = logging.getLogger("aiohttp.access") if settings.access_log else None
        runner = make_runner(app, access_log=access_log, keepalive_timeout=keepalive, drain_timeout=1.0)
        await runner.setup()
        listener = await listen(
            runner,
            settings.host,
            settings.port,
            keepalive_timeout=keepalive,
            drain_timeout=1.0,
            front=access_log is None,
        )
        runners.append((runner, listener))
        if settings.port == 0:
            settings = settings.model_copy(update={"port": listener.port})
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        sessions.append(session)
        front = listener.front if listener.lean else None  # no front door: None
        return ProxyHandle(f"http://127.0.0.1:{settings.port}", app, settings, session, vllm_groups, front)

    yield start
    for session in sessions:
        await session.close()
    for runner, listener in runners:
        await listener.stop()
        await runner.cleanup()


@dataclass
class ProxyProcess:
    url: str
    process: subprocess.Popen[bytes]
    vllm_port: int
    output: Path

    def read_output(self) -> str:
        return self.output.read_text(errors="replace")


@pytest.fixture
def spawn_proxy(tmp_path: Path, vllm_groups: set[int]) -> Iterator[Callable[..., ProxyProcess]]:
    """Run ``python -m aic_vllm_proxy serve --simulator`` as a real child process."""
    started: list[ProxyProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ProxyProcess:
        port, vllm_port = free_port(), free_port()
        output = tmp_path / f"proxy-{port}.out"
        command = [
            sys.executable, "-m", "aic_vllm_proxy", "serve",
            "--host", "127.0.0.1", "--port", str(port),
            "--vllm-port", str(vllm_port), "--log-dir", str(tmp_path / "logs"),
            "--vllm-command", SIM, "--stop-timeout", "5", *args,
        ]  # fmt: skip
        with open(output, "wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        handle = ProxyProcess(f"http://127.0.0.1:{port}", process, vllm_port, output)
        started.append(handle)

        def up() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return True
            return False

        if not wait_until(up, 20):
            process.kill()
            raise RuntimeError(f"proxy did not start:\n{handle.read_output()}")
        return handle

    yield start
    for handle in started:
        if handle.process.poll() is None:
            handle.process.send_signal(signal.SIGTERM)
            try:
                handle.process.wait(15)
            except subprocess.TimeoutExpired:
                handle.process.kill()
                handle.process.wait()
