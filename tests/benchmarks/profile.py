"""``--profile DIR``: py-spy samples the proxy during its closed-loop runs; the collapsed
stacks are kept in DIR and summarised (top functions by own and by inclusive samples).

Profiling costs CPU on the same two cores: figures of a profiled run are marked
``"profiled": true`` in the JSON and should not be compared with unprofiled ones.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("py-spy")


class Profiler:
    def __init__(self, out_dir: Path, native: bool = False, rate: int = 250) -> None:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self.binary = binary
        self.out_dir = out_dir
        self.native = native
        self.rate = rate
        self.files: list[Path] = []
        self._proc: subprocess.Popen[bytes] | None = None
        out_dir.mkdir(parents=True, exist_ok=True)

    def start(self, pid: int, label: str) -> None:
        path = self.out_dir / f"proxy-{label}.txt"
        argv = [self.binary, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw"]
        argv += ["--nolineno", "-o", str(path)]
        argv += ["--native"] if self.native else ["--nonblocking"]
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.files.append(path)
        time.sleep(0.3)  # attaching takes a moment

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def summary(self, top: int = 25) -> dict[str, Any]:
        paths = [path for path in self.files if path.exists()]
        return {"files": [str(p) for p in paths], **summarise(paths, top)}


#: Leaves of a thread waiting for work (with --native): not CPU time.
IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "select ", "poll ")
#: Frames that hold every busy sample: left out of the inclusive list.
WRAPPERS = (
    "(<frozen runpy>)", "(click/", "aic_vllm_proxy/cli.py", "aic_vllm_proxy/__main__.py",
    "run_app (aiohttp/web.py)", "(object.h)", "(core.c)", "Loop__run", "run_forever (loop.c)",
    "run_until_complete (loop.c)", "(libc.so.6)",
)  # fmt: skip


def summarise(paths: list[Path], top: int = 25) -> dict[str, Any]:
    """Top frames of collapsed-stack files: own samples (the frame on top of the stack) and
    inclusive samples (the frame anywhere in the stack), as percentages of the busy samples
    (idle waits and the idle thread pool are left out)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            if not frames or frames[-1].startswith(IDLE_LEAVES) or "concurrent/futures/thread.py" in stack:
                continue
            total += count
            own[frames[-1]] += count
            for frame in set(frames):
                if not any(w in frame for w in WRAPPERS) or frame == frames[-1]:
                    inclusive[frame] += count

    def pct(counter: Counter[str]) -> list[tuple[float, str]]:
        return (
            [(round(100.0 * n / total, 1), frame) for frame, n in counter.most_common(top)] if total else []
        )

    return {"samples": total, "own": pct(own), "inclusive": pct(inclusive)}
