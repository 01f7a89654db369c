"""The API server's side of the engine child: start it, await readiness, notice its
death (end-of-file on the ready pipe) and, on rank 0 of a multi-node launch, a lost rank
(``LOST`` on that pipe), make it crash, terminate it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .logfmt import ProcessLog

ENGINE_MODULE = "aic_vllm_proxy.simulator.engine"
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


class EngineProcess:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self._fd = -1
        self._buffer = b""
        self.ready = asyncio.Event()
        self.dead = asyncio.Event()
        self.on_death: Callable[[], None] | None = None
        self.peer_lost = False  # multi-node rank 0: another rank went away (its next step fails)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Spawn the engine in our process group and watch its ready pipe."""
        read_fd, write_fd = os.pipe()
        self.config["ready_fd"] = write_fd
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", ENGINE_MODULE, json.dumps(self.config)],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                env=env,
            )
        finally:
            os.close(write_fd)
        self._fd = read_fd
        asyncio.get_running_loop().add_reader(read_fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except OSError:
            data = b""
        if data:
            self._buffer += data
            if b"READY\n" in self._buffer:
                self.ready.set()
            if b"LOST\n" in self._buffer:
                self.peer_lost = True
            return
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.dead.set()
        if self.on_death is not None:
            self.on_death()

    async def wait_ready(self) -> bool:
        """True once the engine is ready, False if it died first."""
        ready = asyncio.ensure_future(self.ready.wait())
        dead = asyncio.ensure_future(self.dead.wait())
        try:
            await asyncio.wait({ready, dead}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            dead.cancel()
        return self.ready.is_set() and not self.dead.is_set()

    def crash(self) -> None:
        """Ask the engine to die with a fatal error (for --sim-crash-on-request)."""
        if self.proc is None or self.proc.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(b"crash\n")
            self.proc.stdin.flush()

    def close_stdin(self) -> None:
        """Close the child's stdin (a headless rank's worker reads it as vLLM's death pipe)."""
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    async def terminate(self, timeout: float, log: ProcessLog | None = None) -> None:
        """SIGTERM the engine, wait up to ``timeout`` s (at least a moment), then
        SIGKILL it, logging as vLLM's process manager does."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            if log is not None:
                log.info("utils.py:628", "[shutdown] Process manager: send sigterm to process EngineCore")
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + max(timeout, 0.1)
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if proc.poll() is None:
                if log is not None:
                    log.warning(
                        "utils.py:648",
                        "[shutdown] Process manager: force killing remaining processes count=1",
                    )
                    log.warning(
                        "utils.py:653",
                        "[shutdown] Process manager: force killing remaining process "
                        f"EngineCore pid {proc.pid}",
                    )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                while proc.poll() is None:
                    await asyncio.sleep(0.01)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
