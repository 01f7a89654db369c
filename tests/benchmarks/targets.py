"""The things measured, each a real process on loopback: the proxy (``python -m
aic_vllm_proxy serve``), a bare Python TCP relay (``relay.py``), nginx as a reverse proxy,
LiteLLM's proxy. "direct" is the upstream
itself: the vLLM simulator (or ``upstream.py``) that the proxy launched.

Every launcher writes its files in the run's temporary directory and stops its process (and,
for the proxy, the upstream group it started) in :meth:`stop`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .measure import children, tree

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def call(method: str, port: int, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """A control request (not measured): JSON in, JSON (or text) out."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} answered")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if call("GET", port, path, timeout=2.0)[0] == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"127.0.0.1:{port}{path} did not answer 200 within {timeout:g} s")


class Process:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=log.parent,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def wait_listening(self, port: int, ready: Callable[[], bool] = lambda: True) -> None:
        """Until ``port`` accepts a connection and ``ready()`` holds; raises if the process
        exits first or 10 s pass."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, port)):
                if ready():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start listening")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Proxy:
    """aic-vllm-proxy in front of the simulator (or of ``upstream.py``)."""

    name = "proxy"

    def __init__(
        self,
        workdir: Path,
        label: str,
        vllm_command: str | None = None,
        config: Path | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.label = label
        self.config = config  # a config file (the "routed" target's catalogue)
        self.args = list(args)  # more options of ``serve`` (e.g. ``--gpus 0``)
        self.env = env  # its environment (None: the benchmark's)
        self.port = free_port()
        self.vllm_port = free_port()
        self.vllm_command = vllm_command
        self.process: Process | None = None

    def start(self) -> None:
        argv = [PY, "-m", "aic_vllm_proxy", "serve", "--host", HOST, "--port", str(self.port)]
        argv += ["--vllm-port", str(self.vllm_port), "--log-dir", str(self.workdir / f"{self.label}-logs")]
        argv += ["--log-level", "warning"]
        argv += ["--config", str(self.config)] if self.config else []
        argv += self.args
        argv += ["--vllm-command", self.vllm_command] if self.vllm_command else ["--simulator"]
        self.process = Process(self.label, argv, self.workdir / f"{self.label}.log", env=self.env)
        try:
            wait_http(self.port, "/proxy/health", 30.0, self.process.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{self.label} did not start: {exc}\n{self.process.log_tail()}") from None

    def switch(self, spec: str, timeout: float = 120.0) -> dict[str, Any]:
        status, body = call("POST", self.port, "/switch", {"model_spec": spec}, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"POST /switch {spec!r} answered {status}: {body}")
        return body  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return call("GET", self.port, "/status")[1]  # type: ignore[no-any-return]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_pids(self) -> list[int]:
        return [self.pid]  # the proxy alone: not vLLM, not the watchdog

    def upstream_pids(self) -> list[int]:
        pid = self.status().get("pid")
        return [pid] if pid else []

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30.0)


NGINX_CONF = """\
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
{servers}
}}
"""
NGINX_SERVER = """\
    upstream up{n} {{ server {host}:{upstream}; keepalive 1024; keepalive_timeout 4s; }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://up{n};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
"""


class Nginx:
    """nginx (one worker) as a plain reverse proxy: the reference for a near-free hop."""

    name = "nginx"

    def __init__(self, workdir: Path, upstreams: dict[str, int]) -> None:
        self.workdir = workdir
        self.ports = {key: free_port() for key in upstreams}  # one listener per upstream
        self.upstreams = upstreams
        self.process: Process | None = None

    @staticmethod
    def binary() -> str | None:
        return shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
        )

    def start(self) -> None:
        binary = self.binary()
        assert binary is not None
        servers = "".join(
            NGINX_SERVER.format(n=n, host=HOST, upstream=self.upstreams[key], port=self.ports[key])
            for n, key in enumerate(self.upstreams)
        )
        conf = self.workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.workdir, servers=servers))
        argv = [binary, "-p", str(self.workdir), "-c", str(conf), "-e", str(self.workdir / "nginx-error.log")]
        self.process = process = Process("nginx", [*argv, "-g", "daemon off;"], self.workdir / "nginx.log")
        process.wait_listening(next(iter(self.ports.values())), lambda: bool(children(process.pid)))

    def port(self, key: str) -> int:
        return self.ports[key]

    def cpu_pids(self) -> list[int]:
        assert self.process is not None
        return tree(self.process.pid)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class Relay:
    """``relay.py``: a bare TCP relay in Python on uvloop, the floor for a Python hop."""

    name = "relay"

    def __init__(self, workdir: Path, upstreams: dict[str, int]) -> None:
        self.workdir = workdir
        self.ports = {key: free_port() for key in upstreams}  # one listener per upstream
        self.upstreams = upstreams
        self.process: Process | None = None

    def start(self) -> None:
        pairs = [f"{self.ports[key]}:{port}" for key, port in self.upstreams.items()]
        argv = [PY, str(Path(__file__).with_name("relay.py")), *pairs]
        self.process = Process("relay.py", argv, self.workdir / "relay.log")
        self.process.wait_listening(next(iter(self.ports.values())))

    def port(self, key: str) -> int:
        return self.ports[key]

    def cpu_pids(self) -> list[int]:
        assert self.process is not None
        return [self.process.pid]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


LITELLM_CONF = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: http://{host}:{upstream}/v1
      api_key: none
litellm_settings:
  telemetry: false
  drop_params: true
"""


class LiteLLM:
    """LiteLLM's proxy (``litellm --config``, one worker) in front of the same upstream."""

    name = "litellm"

    def __init__(self, workdir: Path, upstream: int, model: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.upstream = upstream
        self.model = model
        self.process: Process | None = None

    @staticmethod
    def binary() -> str | None:
        given = os.environ.get("BENCH_LITELLM")
        candidates = [given] if given else []
        candidates += [str(REPO / ".bench" / "litellm-venv" / "bin" / "litellm"), shutil.which("litellm")]
        return next((c for c in candidates if c and os.access(c, os.X_OK)), None)

    def start(self) -> None:
        binary = self.binary()
        assert binary is not None
        conf = self.workdir / "litellm.yaml"
        conf.write_text(LITELLM_CONF.format(model=self.model, host=HOST, upstream=self.upstream))
        env = dict(os.environ)
        env.update(
            LITELLM_LOCAL_MODEL_COST_MAP="True",  # no download at start-up
            LITELLM_LOG="ERROR",
            LITELLM_TELEMETRY="False",
            NO_PROXY="*",
            # no key, like the proxy here (loopback only): LiteLLM refuses that unless told
            LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",
        )
        argv = [binary, "--config", str(conf), "--host", HOST, "--port", str(self.port), "--num_workers", "1"]
        self.process = Process("litellm", argv, self.workdir / "litellm.log", env=env)
        try:
            wait_http(self.port, "/health/liveliness", 180.0, self.process.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"litellm did not start: {exc}\n{self.process.log_tail()}") from None

    def cpu_pids(self) -> list[int]:
        assert self.process is not None
        return tree(self.process.pid)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def upstream_command() -> str:
    """The ``--vllm-command`` that runs ``upstream.py`` with this Python."""
    return f"{shlex.quote(PY)} {shlex.quote(str(Path(__file__).with_name('upstream.py')))}"
