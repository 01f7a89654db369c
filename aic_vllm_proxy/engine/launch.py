"""One run of vLLM as an operating-system process tree: how it is started, guarded and killed.

- :func:`spawn_vllm` starts ``vllm serve ...`` in a session (and process group) of its own, with
  stdout and stderr into its log file, so that its EngineCore and worker children can be found
  and signalled together.
- :meth:`Launch.start_guard` starts the watchdog (``watchdog.py``) that kills the group if the
  proxy dies, even by SIGKILL.
- :meth:`Launch.terminate` is the only way a group is stopped: SIGTERM to the group, wait, SIGKILL
  to the group, and wait until no process of it is left.
- :func:`child_env` is vLLM's environment (the proxy's, without its secrets);
  :func:`port_is_free` checks vLLM's port before a launch.

The supervisor decides *when*; this module knows *how*. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from aic_vllm_proxy.config import ENV_PREFIX, Settings
from aic_vllm_proxy.engine.procgroup import group_alive, signal_group
from aic_vllm_proxy.spec import ModelSpec

if TYPE_CHECKING:
    from aic_vllm_proxy.engine.nodes import RankGroup, RemoteRank

log = logging.getLogger(__name__)
GROUP_POLL = 0.05


@dataclass(eq=False)
class Launch:
    """One run of vLLM: its process (the group leader), log, watchdog and exit."""

    spec: ModelSpec
    process: asyncio.subprocess.Process
    log_path: Path
    guard_fd: int | None
    guard: asyncio.subprocess.Process | None
    upstream_headers: dict[str, str]
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    #: The instance it was launched for: its name and GPUs then (the slot takes the next
    #: model's before it stops this one: hooks about this run are told these).
    instance: str = ""
    gpus: tuple[str, ...] = ()
    utilization: float = 0.0
    #: A model across nodes: its ranks on the agents (this process is rank 0), and the first
    #: of them that died or was lost, which ended the launch.
    remote: RankGroup | None = None
    failed_rank: RemoteRank | None = None
    #: How long its log was when it became ready: the cause of a later death is after that.
    ready_offset: int = 0

    @property
    def pgid(self) -> int:
        return self.process.pid

    async def start_guard(self, *, grace: float) -> None:
        """Start the watchdog that kills the group if this process dies (see watchdog.py)."""
        read_fd, write_fd = os.pipe()
        try:
            self.guard = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aic_vllm_proxy.engine.watchdog",
                str(self.pgid),
                str(grace),
                stdin=read_fd,
                stdout=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:  # pragma: no cover - python itself missing
            log.error("cannot start the watchdog: %s", exc)
            os.close(write_fd)
            return
        finally:
            os.close(read_fd)
        self.guard_fd = write_fd

    async def terminate(self, *, grace: float) -> None:
        """SIGTERM the group, wait up to ``grace`` s, SIGKILL what is left, wait until it is gone;
        the ranks on other nodes are stopped at the same time."""
        if self.remote is None:
            await self._terminate_group(grace)
            return
        await asyncio.gather(self._terminate_group(grace), self.remote.stop(grace))

    async def _terminate_group(self, grace: float) -> None:
        pgid = self.pgid
        deadline = time.monotonic() + grace
        if await asyncio.to_thread(group_alive, pgid):
            signal_group(pgid, signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.exited.wait(), max(grace, 0.0))
            while time.monotonic() < deadline and await asyncio.to_thread(group_alive, pgid):
                await asyncio.sleep(GROUP_POLL)
            if await asyncio.to_thread(group_alive, pgid):
                log.warning("vLLM group %d still alive %.0f s after SIGTERM: sending SIGKILL", pgid, grace)
                signal_group(pgid, signal.SIGKILL)
            gone_by = time.monotonic() + 10.0
            while await asyncio.to_thread(group_alive, pgid) and time.monotonic() < gone_by:
                await asyncio.sleep(GROUP_POLL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.exited.wait(), 10.0)
        await self._release_guard()

    async def _release_guard(self) -> None:
        if self.guard_fd is not None:
            os.close(self.guard_fd)
            self.guard_fd = None
        if self.guard is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.guard.wait(), 5.0)
            self.guard = None


async def spawn_vllm(argv: list[str], log_file: BinaryIO, env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start vLLM in a new session: its own process group, so the whole tree can be signalled."""
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log_file,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


#: Words that make one of the proxy's variables (``AIC_VLLM_PROXY_*``) a secret: its keys, the
#: keys file, the client's key. Secrets never reach vLLM's environment.
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD")


def is_proxy_secret(name: str) -> bool:
    upper = name.upper()
    return upper.startswith(ENV_PREFIX) and any(word in upper for word in SECRET_WORDS)


def child_env(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """vLLM's environment: the proxy's (``environ``, default ``os.environ``) without the proxy's
    secrets, because any code running in vLLM (a model's remote code, a vLLM plugin) can read
    it; vLLM's own variables (``VLLM_API_KEY``, ``HF_TOKEN``, ...) pass."""
    source = os.environ if environ is None else environ
    env = {name: value for name, value in source.items() if not is_proxy_secret(name)}
    env.setdefault("PYTHONUNBUFFERED", "1")  # log lines reach the file as they are written
    if env.get("VLLM_PORT") == str(settings.vllm_port):
        # VLLM_PORT is vLLM's internal port, not its HTTP port: the same value breaks start-up.
        log.warning("VLLM_PORT equals --vllm-port (%s); not passing it to vLLM", settings.vllm_port)
        del env["VLLM_PORT"]
    return env


def api_key_of(spec: ModelSpec) -> str | None:
    return spec.flag_value("--api-key") or os.environ.get("VLLM_API_KEY") or None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def port_taken_message(port: int) -> str:
    """Why a switch fails when something else has vLLM's port (``--vllm-port``)."""
    return f"vLLM port {port} is in use by another process"


def host_addresses(host: str, port: int) -> list[str]:
    """The addresses ``host`` (``--vllm-host``) stands for. Blocking (name resolution)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick), e.g. a master port. Blocking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """False if something already has ``host:port``: a trial bind with ``SO_REUSEADDR``, as vLLM
    binds (so connections of a stopped vLLM lingering in TIME_WAIT do not count, a listener
    does). Other errors (a host that is not local) are left for vLLM to report. Blocking."""
    try:
        targets = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return True
    for family, kind, proto, _, address in targets:
        with socket.socket(family, kind, proto) as trial:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                trial.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
    return True
