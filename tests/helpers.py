"""Helpers for the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aic_vllm_proxy.config import simulator_command
from aic_vllm_proxy.engine.procgroup import group_alive, group_members

__all__ = ["group_alive", "group_members"]

SIM = simulator_command()
#: Fast simulator timings for tests (model specs can append their own --sim-* flags).
FAST = "--sim-import-delay 0.05 --sim-load-delay 0.2"


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range (:func:`free_port_run`)."""
    return free_port_run(1)


def process_exists(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def async_wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


def kill_group_now(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# ---------------------------------------------------------------------- processes left behind

#: The environment variable that marks every process a test session starts (conftest.py sets it
#: to a value of its own at start-up): the daemons, the vLLM they launch and its children, the
#: watchdogs. A process keeps its environment when it is orphaned or leaves its process group,
#: so ``/proc`` finds all of them, and only this session's (other sessions have other values).
SESSION_MARKER = "AIC_PROXY_TEST_SESSION"


@dataclass(frozen=True)
class Proc:
    """A live process as ``/proc`` shows it; ``mark`` is the value of the environment variable
    asked for in :func:`processes` (None without it)."""

    pid: int
    ppid: int
    pgid: int
    comm: str
    cmdline: str
    mark: str | None

    @property
    def is_vllm_child(self) -> bool:
        """vLLM's EngineCore and workers name themselves ``VLLM::...``."""
        return self.comm.startswith("VLLM::") or self.cmdline.startswith("VLLM::")


def processes(marker: str) -> list[Proc]:
    """Every live (non-zombie) process we may read, with the value of ``marker`` it inherited."""
    found: list[Proc] = []
    prefix = marker.encode() + b"="
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        base = f"/proc/{entry}"
        try:
            with open(f"{base}/stat", "rb") as handle:
                stat = handle.read()
            with open(f"{base}/cmdline", "rb") as handle:
                cmdline = handle.read()
            with open(f"{base}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 3 or fields[0] in (b"Z", b"X"):
            continue
        values = [item[len(prefix) :] for item in environ.split(b"\0") if item.startswith(prefix)]
        mark = values[0].decode(errors="replace") if values else None
        comm = stat[stat.find(b"(") + 1 : stat.rfind(b")")].decode(errors="replace")
        text = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        found.append(Proc(int(entry), int(fields[1]), int(fields[2]), comm, text, mark))
    return found


@dataclass(frozen=True)
class Alive:
    """What of a test session was alive at one moment: its process groups (other than this
    process's own) and all its pids."""

    groups: dict[int, list[Proc]]
    pids: frozenset[int]


def session_alive(session: str) -> Alive:
    own = os.getpgrp()
    mine = [proc for proc in processes(SESSION_MARKER) if proc.mark == session]
    groups: dict[int, list[Proc]] = {}
    for proc in mine:
        if proc.pgid != own:
            groups.setdefault(proc.pgid, []).append(proc)
    return Alive(groups, frozenset(proc.pid for proc in mine))


def new_groups(before: Alive, session: str, named: Collection[int] = ()) -> dict[int, list[Proc]]:
    """The session's process groups alive now that were not alive at ``before``, and the groups
    in ``named`` that are still alive.

    A new group is not counted while the process that started it was alive at ``before`` and
    still runs (it is not this process): that is a daemon of a wider fixture (a module's), which
    answers for its groups when that fixture ends. This process runs ``make_proxy``'s proxies,
    which are the test's own: what they started must be gone."""
    now = session_alive(session)
    left: dict[int, list[Proc]] = {}
    for pgid, members in now.groups.items():
        leader = next((proc for proc in members if proc.pid == pgid), None)
        held = leader is not None and leader.ppid != os.getpid() and leader.ppid in before.pids
        if pgid not in before.groups and not held:
            left[pgid] = members
    for pgid in named:
        if pgid not in left and group_alive(pgid):
            left[pgid] = now.groups.get(pgid, [])
    return left


def reap_left_behind(before: Alive, session: str, named: Collection[int] = (), wait: float = 15) -> list[str]:
    """Wait up to ``wait`` seconds for the groups :func:`new_groups` finds to go (one may still
    be stopping), SIGKILL what is left, and describe each group that had to be killed."""
    left: dict[int, list[Proc]] = {}

    def gone() -> bool:
        nonlocal left
        left = new_groups(before, session, named)
        return not left

    if wait_until(gone, wait, interval=0.1):
        return []
    for pgid in left:
        kill_group_now(pgid)
    return [
        f"group {pgid}: "
        + ("; ".join(f"{proc.pid} {proc.cmdline or proc.comm}" for proc in members) or "unmarked")
        for pgid, members in sorted(left.items())
    ]


# ---------------------------------------------------------------------------------------------
# Added for the switch / proxy / lifecycle / logs / CLI suites.

#: ``--vllm-command`` for :func:`echo_upstream_main`: a stand-in vLLM that answers /health and
#: /v1/models and echoes every other request (method, raw target, headers, body hash) as JSON.
ECHO = f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} echo-upstream"


def sse_data(body: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    events = []
    for block in body.decode("utf-8", errors="replace").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data:"):
                events.append(line[5:].strip())
    return events


def sse_text(events: list[str]) -> str:
    """The generated text of chat/completions stream events."""
    text = []
    for event in events:
        if event == "[DONE]":
            continue
        data = json.loads(event)
        for choice in data.get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(text)


def kill_groups(groups: set[int]) -> None:
    for pgid in groups:
        if group_alive(pgid):
            kill_group_now(pgid)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
        return True
    return False


@dataclass
class Daemon:
    """``python -m aic_vllm_proxy serve`` as a child process (for module-wide fixtures and CLI
    tests). ``groups`` collects the pgids of the vLLM launches it reported in /status."""

    url: str
    port: int
    vllm_port: int
    process: subprocess.Popen[bytes]
    output: Path
    log_dir: Path
    groups: set[int] = field(default_factory=set)

    def read_output(self) -> str:
        return self.output.read_text(errors="replace")

    def get(self, path: str, timeout: float = 30) -> Any:
        import httpx

        response = httpx.get(self.url + path, timeout=timeout)
        return response

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/status").json()
        if body.get("pid"):
            self.groups.add(int(body["pid"]))
        return body

    def switch(self, spec: str, timeout: float = 60, **extra: Any) -> tuple[int, dict[str, Any]]:
        import httpx

        response = httpx.post(self.url + "/switch", json={"model_spec": spec, **extra}, timeout=timeout)
        body: dict[str, Any] = response.json()
        pid = (body.get("status") or {}).get("pid")
        if pid:
            self.groups.add(int(pid))
        return response.status_code, body

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM the daemon (it stops vLLM first); anything left is killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        kill_groups(self.groups)
        return self.process.returncode


def _answers_as_proxy(url: str) -> bool:
    import httpx

    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = httpx.get(url + "/proxy/health", timeout=2)
        return response.status_code == 200 and response.json().get("status") == "ok"
    return False


def start_daemon(
    workdir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    defaults: bool = True,
    command: list[str] | None = None,
    wait: float = 30,
) -> Daemon:
    """Start the daemon; with ``defaults`` it listens on 127.0.0.1:<free port> and runs the
    simulator. Returns once its port accepts connections (raises with its output otherwise)."""
    port = port or free_port()
    vllm_port = free_port()
    log_dir = workdir / f"logs-{port}"
    output = workdir / f"daemon-{port}.out"
    argv = command or [sys.executable, "-m", "aic_vllm_proxy", "serve"]
    if defaults:
        argv = [
            *argv, "--host", "127.0.0.1", "--port", str(port), "--vllm-port", str(vllm_port),
            "--log-dir", str(log_dir), "--vllm-command", SIM, "--stop-timeout", "5",
        ]  # fmt: skip
    argv = [*argv, *args]
    with open(output, "wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=workdir
        )
    daemon = Daemon(f"http://127.0.0.1:{port}", port, vllm_port, process, output, log_dir)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and process.poll() is None:
        if port_open(port) and _answers_as_proxy(daemon.url) and process.poll() is None:
            return daemon  # our daemon, not another process that took the same free port
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"daemon did not start (exit {process.returncode}):\n{daemon.read_output()}")


# ------------------------------------------------------------------------------ echo upstream


def _parse_echo_args(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"model": argv[0] if argv and not argv[0].startswith("-") else "echo"}
    opts.update(host="127.0.0.1", port=8000, served=None, keepalive=5.0)
    words = iter(argv[1:] if argv and not argv[0].startswith("-") else argv)
    for word in words:
        if word == "--host":
            opts["host"] = next(words)
        elif word == "--port":
            opts["port"] = int(next(words))
        elif word == "--served-model-name":
            opts["served"] = next(words)
        elif word == "--keepalive":
            opts["keepalive"] = float(next(words))
    return opts


def echo_upstream_main(argv: list[str]) -> None:
    """A minimal upstream that shows what the proxy forwarded (real aiohttp server).

    Idle keep-alive connections are closed after 5 s, as uvicorn does (``--keepalive S``).
    """
    from aiohttp import web

    opts = _parse_echo_args(argv)
    served = opts["served"] or opts["model"]

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": served, "object": "model"}]})

    streamed = {"events": 0}

    async def stream(request: web.Request) -> web.StreamResponse:
        """``/stream?events=N&size=S[&gap=SECONDS]``: N SSE events of S bytes, each written (and
        drained) as a chunk of its own, as vLLM writes tokens; ``/stream/progress`` says how many
        went out."""
        events, size = int(request.query["events"]), int(request.query["size"])
        gap = float(request.query.get("gap", "0"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        streamed["events"] = 0
        for n in range(events):
            text = f"data: {n} "
            await response.write((text + "x" * (size - len(text) - 2) + "\n\n").encode())
            streamed["events"] = n + 1
            if gap:
                await asyncio.sleep(gap)
        await response.write_eof()
        return response

    async def stream_progress(request: web.Request) -> web.Response:
        return web.json_response(streamed)

    blobs = {"count": 0}

    async def blob(request: web.Request) -> web.Response:
        """``/blob?size=N``: N bytes with a Content-Length, head and body in one write (as vLLM
        sends a small answer); ``/blob/count`` says how many were asked for."""
        blobs["count"] += 1
        return web.Response(body=b"b" * int(request.query.get("size", "30000")))

    async def blob_count(request: web.Request) -> web.Response:
        return web.json_response(blobs)

    async def echo(request: web.Request) -> web.StreamResponse:
        if request.path == "/early":
            # Answer before reading the body and close, like an auth check that rejects a big
            # upload (uvicorn closes a connection whose request body was not read).
            payload = json.dumps({"error": {"message": "rejected early", "code": 401}}).encode()
            early = web.StreamResponse(status=401, headers={"Content-Type": "application/json"})
            early.content_length = len(payload)
            early.force_close()
            await early.prepare(request)
            await early.write(payload)
            await early.write_eof()
            if request.transport is not None:
                request.transport.close()  # the unread body is never read
            return early
        digest = hashlib.sha256()
        size = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            size += len(chunk)
            digest.update(chunk)
        path = request.path
        if path == "/gzip":
            import gzip

            data = gzip.compress(b"compressed payload " * 100)
            return web.Response(body=data, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
        body = {
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_size": size,
            "body_sha256": digest.hexdigest(),
        }
        status = int(request.query.get("status", "200"))
        response = web.json_response(body, status=status)
        response.headers["X-Echo"] = "1"
        if request.query.get("request_id"):  # as vLLM does with --enable-request-id-headers
            response.headers["X-Request-Id"] = request.query["request_id"]
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        if request.query.get("hop"):
            response.headers["Connection"] = "keep-alive, X-Hop-Secret"
            response.headers["X-Hop-Secret"] = "must not pass"
            response.headers["Keep-Alive"] = "timeout=5"
        print(f"echo {request.method} {request.raw_path} {status}", flush=True)
        return response

    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stream", stream)
    app.router.add_get("/stream/progress", stream_progress)
    app.router.add_get("/blob", blob)
    app.router.add_get("/blob/count", blob_count)
    app.router.add_route("*", "/{tail:.*}", echo)
    print(f"echo upstream for {served} on {opts['host']}:{opts['port']}", flush=True)
    web.run_app(
        app,
        host=opts["host"],
        port=opts["port"],
        print=None,
        access_log=None,
        keepalive_timeout=opts["keepalive"],
        auto_decompress=False,  # report the bytes that arrived, not a decompressed copy
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["echo-upstream"]:
        echo_upstream_main(sys.argv[2:])


# ---------------------------------------------------------------------------------------------
# Added for the reliability and security suites (auth/policy, drain, faults, bad input).


def sim_groups(vllm_port: int) -> set[int]:
    """Process groups of the simulator API servers that listen on ``vllm_port`` (from /proc).

    Only the API server's command line has ``--port N``; its EngineCore child shares its process
    group, so one pgid is one "vLLM". Zombies do not count (they hold nothing)."""
    needle = b"\x00--port\x00" + str(vllm_port).encode() + b"\x00"
    groups: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
            if b"aic_vllm_proxy.simulator" not in cmdline or needle not in cmdline + b"\x00":
                continue
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[0] not in (b"Z", b"X"):
            groups.add(int(fields[2]))
    return groups


class GroupMonitor:
    """Polls :func:`sim_groups` in a thread: every vLLM group seen, and the most alive at once.

    Use as a context manager; ``seen`` can be handed to the ``vllm_groups`` fixture."""

    def __init__(self, vllm_port: int, interval: float = 0.02) -> None:
        import threading

        self.vllm_port = vllm_port
        self.interval = interval
        self.seen: set[int] = set()
        self.max_at_once = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = sim_groups(self.vllm_port)
            self.seen |= now
            self.max_at_once = max(self.max_at_once, len(now))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> GroupMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class RawReply:
    """What came back on a raw connection: the bytes, whether the server closed the connection,
    and after how many seconds (from the last byte we sent) a whole answer came or it closed."""

    data: bytes
    closed: bool
    seconds: float

    @property
    def status(self) -> int | None:
        line = self.data.split(b"\r\n", 1)[0].split()
        return int(line[1]) if len(line) > 1 and line[1].isdigit() else None


def _complete_response(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip() or 0)
    return False


async def raw_exchange(port: int, data: bytes, *, wait: float, host: str = "127.0.0.1") -> RawReply:
    """Send ``data`` on a fresh connection and read until a whole response (with Content-Length)
    has come, the server closes the connection, or ``wait`` seconds pass (then ``closed`` is False
    and ``data`` has what came). Used for slow and malformed clients."""
    reader, writer = await asyncio.open_connection(host, port)
    start = time.monotonic()
    received = b""
    closed = False
    try:
        writer.write(data)
        await writer.drain()
        start = time.monotonic()
        deadline = start + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except asyncio.TimeoutError:
                break
            except ConnectionError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
            if _complete_response(received):
                break  # a whole answer: the time until it came is what counts
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return RawReply(received, closed, time.monotonic() - start)


def metric_total(text: str, name: str) -> float:
    """The sum of the samples of one Prometheus metric in ``text``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


#: No start-up delays at all (for tests about switching and draining, not loading).
QUICK = "--sim-import-delay 0 --sim-load-delay 0"
CHAT = "/v1/chat/completions"


def chat_request(
    model: str, *, stream: bool, max_tokens: int = 8, content: str = "Hello there"
) -> dict[str, Any]:
    """A chat completion request body."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def wait_status(
    proxy: Any, done: Callable[[dict[str, Any]], bool], timeout: float = 20
) -> dict[str, Any]:
    """Poll the proxy's /status until ``done(status)`` (asserting it gets there)."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = await proxy.status()
    while not done(status) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        status = await proxy.status()
    assert done(status), status
    return status


async def wait_state(proxy: Any, state: str, timeout: float = 20) -> dict[str, Any]:
    """Poll the proxy's /status until its state is ``state`` (asserting it gets there)."""
    return await wait_status(proxy, lambda status: status["state"] == state, timeout)


# ---------------------------------------------------------------------------------------------
# Added for the fleet suite (test_fleet.py).


def free_port_run(count: int, attempts: int = 200) -> int:
    """A port such that it and the ``count - 1`` ports after it are free now (a fleet's daemon
    gives its instances the ports after ``--vllm-port``), below the kernel's ephemeral range.
    Every port a test hands to a process comes from here: in that range an outgoing connection
    of anything on the machine may take a port as its local port between the pick and the
    process's bind (a vLLM binds only after its imports: "Address already in use" in a full
    run), and such a port stays taken in TIME_WAIT for a minute, even for SO_REUSEADDR."""
    import random

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(attempts):
        base = random.randrange(max(1024, low // 2), low - count)
        if all(_bindable(base + n) for n in range(count)):
            return base
    raise RuntimeError(f"no run of {count} free ports found below {low}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
