"""vLLM log files: one per launch, read from the end for tails, streamed for the whole file,
followed live like ``tail -f``. All file I/O runs in worker threads, never in the event loop."""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

CHUNK = 64 * 1024
MAX_TAIL_LINES = 100_000


def _stamp() -> str:
    return datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


def open_launch_log(log_dir: Path, argv: list[str]) -> tuple[Path, BinaryIO]:
    """Create the log file of a new launch, with a header line that has the command.

    Its name gets the pid once it is known (:func:`name_with_pid`). Blocking: call it in a thread.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = _stamp()
    path = log_dir / f"{stamp}_starting-{os.getpid()}-{id(argv):x}.log"
    handle = open(path, "ab", buffering=0)  # noqa: SIM115 - handed to the child process
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    header = f"# aic-vllm-proxy {started} launching: {shlex.join(argv)}\n"
    handle.write(header.encode())
    return path, handle


def name_with_pid(path: Path, pid: int) -> Path:
    """Rename ``<time>_starting-...log`` to ``<time>_pid-<pid>.log``. Blocking."""
    stamp = path.name.split("_", 1)[0]
    target = path.with_name(f"{stamp}_pid-{pid}.log")
    path.rename(target)
    return target


def parse_lines_param(raw: str | None, default: int = 200) -> int:
    """Validate ``?lines=N``: a whole number from 1 to :data:`MAX_TAIL_LINES`."""
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"lines must be a whole number, got {raw!r}") from None
    if not 1 <= value <= MAX_TAIL_LINES:
        raise ValueError(f"lines must be between 1 and {MAX_TAIL_LINES}, got {value}")
    return value


def _read_tail_block(path: Path, n: int) -> tuple[int, bytes]:
    """Read backwards from the end until the block holds the last ``n`` lines (or the whole
    file); return where the block starts and the block. Blocking."""
    with open(path, "rb") as handle:
        pos = handle.seek(0, os.SEEK_END)
        data = b""
        # A file that ends with a newline has one more separator than lines.
        while pos > 0 and data.count(b"\n") <= n:
            step = min(CHUNK, pos)
            pos -= step
            handle.seek(pos)
            data = handle.read(step) + data
    return pos, data


def tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of ``path``, reading backwards so a huge file costs nothing. Blocking."""
    _, data = _read_tail_block(path, n)
    if not data:
        return []
    # Lines end in "\n" only, as for `tail -n`: a progress bar redrawn with "\r" is one line.
    lines = data.decode("utf-8", errors="replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines[-n:]


async def tail_lines_async(path: Path, n: int) -> list[str]:
    return await asyncio.to_thread(tail_lines, path, n)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


async def iter_file(path: Path, start: int = 0) -> AsyncIterator[bytes]:
    """The file from ``start`` to its current end, in chunks, without holding it in memory."""
    offset = start
    while True:
        chunk = await asyncio.to_thread(_read_at, path, offset, CHUNK)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def _tail_offset(path: Path, n: int) -> int:
    """Byte offset where the last ``n`` lines of ``path`` begin. Blocking."""
    pos, data = _read_tail_block(path, n)
    cut = len(data) - (1 if data.endswith(b"\n") else 0)
    for _ in range(n):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return pos  # fewer than n lines: the block is the whole file (pos == 0)
    return pos + cut + 1


async def follow(
    path: Path,
    lines: int,
    still_writing: Callable[[], bool],
    poll: float = 0.1,
) -> AsyncIterator[bytes]:
    """Like ``tail -n LINES -f``: the last lines, then whatever is appended, until
    ``still_writing()`` is false and everything written has been sent."""
    offset = await asyncio.to_thread(_tail_offset, path, lines)
    while True:
        writing = still_writing()
        async for chunk in iter_file(path, offset):
            offset += len(chunk)
            yield chunk
        if not writing:
            return
        await asyncio.sleep(poll)
