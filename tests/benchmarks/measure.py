"""What a process costs, read from ``/proc``, and the statistics the report uses.

- CPU time: the sum over a process's live threads of ``/proc/PID/task/TID/schedstat``'s first
  field (nanoseconds on the CPU), so short windows are exact, unlike ``utime``/``stime`` in
  100 Hz clock ticks. Threads that exit during a window lose their time; the proxy, nginx and
  uvicorn keep theirs for their whole life.
- Memory: resident set size from ``/proc/PID/statm``, sampled by a background thread.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence

PAGE = os.sysconf("SC_PAGE_SIZE")


def thread_cpu_ns(pid: int) -> int:
    """CPU nanoseconds of the live threads of ``pid`` (0 if it is gone)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as handle:
                total += int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def cpu_ns(pids: Iterable[int]) -> int:
    return sum(thread_cpu_ns(pid) for pid in pids)


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as handle:
                total += int(handle.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (a scan of /proc: no CONFIG_PROC_CHILDREN needed)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(name))
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children(current))
    return out


class CpuWindow:
    """CPU time of some processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._fixed: list[int] = []
        self.begin = 0
        self.ns = 0

    def start(self) -> None:
        self._fixed = self._pids()
        self.begin = cpu_ns(self._fixed)

    def stop(self) -> int:
        self.ns = cpu_ns(self._fixed) - self.begin
        return self.ns


class RssSampler(threading.Thread):
    """Samples the RSS of ``pids`` every ``interval`` seconds until :meth:`finish`."""

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - start, rss_bytes(self.pids)))
            self._halt.wait(self.interval)

    def finish(self) -> list[tuple[float, int]]:
        self._halt.set()
        self.join()
        return self.samples

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


# ---------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between order statistics; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return percentile(finite, 50.0)


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan
