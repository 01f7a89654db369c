"""vLLM log files: one per launch, read from the end for tails, streamed for the whole file,
followed live like ``tail -f``. All file I/O runs in worker threads, never in the event loop.

:func:`root_cause` finds, in the log of a failed start, the line that says why (vLLM prints it
long before its last line), and :func:`failure_tail` makes a log tail that shows it."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, TypeAlias

CHUNK = 64 * 1024
MAX_TAIL_LINES = 100_000


def _stamp() -> str:
    return datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


def open_launch_log(log_dir: Path, argv: list[str]) -> tuple[Path, BinaryIO]:
    """Create the log file of a new launch, with a header line that has the command.

    Its name gets the pid once it is known (:func:`link_with_pid`). Blocking: call it in a thread.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = _stamp()
    path = log_dir / f"{stamp}_starting-{os.getpid()}-{id(argv):x}.log"
    handle = open(path, "ab", buffering=0)  # noqa: SIM115 - handed to the child process
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    header = f"# aic-vllm-proxy {started} launching: {shlex.join(argv)}\n"
    handle.write(header.encode())
    return path, handle


def link_with_pid(path: Path, pid: int) -> Path:
    """Give ``<time>_starting-...log`` its final name ``<time>_pid-<pid>.log`` as a second name
    (a hard link): the caller publishes the new name, then unlinks the old one, so that a
    reader never finds the published name missing. Blocking."""
    stamp = path.name.split("_", 1)[0]
    target = path.with_name(f"{stamp}_pid-{pid}.log")
    os.link(path, target)
    return target


#: A log to read: its path, or a descriptor opened on it (``os.open``), which goes on reading
#: the same file whatever its name becomes. Descriptors are not closed here.
LogFile: TypeAlias = Path | int


def _open(source: LogFile) -> BinaryIO:
    return open(source, "rb", closefd=not isinstance(source, int))


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


def _read_tail_block(path: LogFile, n: int) -> tuple[int, bytes]:
    """Read backwards from the end until the block holds the last ``n`` lines (or the whole
    file); return where the block starts and the block. Blocking."""
    with _open(path) as handle:
        pos = handle.seek(0, os.SEEK_END)
        data = b""
        # A file that ends with a newline has one more separator than lines.
        while pos > 0 and data.count(b"\n") <= n:
            step = min(CHUNK, pos)
            pos -= step
            handle.seek(pos)
            data = handle.read(step) + data
    return pos, data


def tail_lines(path: LogFile, n: int) -> list[str]:
    """The last ``n`` lines of ``path``, reading backwards so a huge file costs nothing. Blocking."""
    _, data = _read_tail_block(path, n)
    if not data:
        return []
    # Lines end in "\n" only, as for `tail -n`: a progress bar redrawn with "\r" is one line.
    lines = data.decode("utf-8", errors="replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines[-n:]


async def tail_lines_async(path: LogFile, n: int) -> list[str]:
    return await asyncio.to_thread(tail_lines, path, n)


def _read_at(path: LogFile, offset: int, size: int) -> bytes:
    with _open(path) as handle:
        handle.seek(offset)
        return handle.read(size)


async def iter_file(path: LogFile, start: int = 0) -> AsyncIterator[bytes]:
    """The file from ``start`` to its current end, in chunks, without holding it in memory."""
    offset = start
    while True:
        chunk = await asyncio.to_thread(_read_at, path, offset, CHUNK)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def _tail_offset(path: LogFile, n: int) -> int:
    """Byte offset where the last ``n`` lines of ``path`` begin. Blocking."""
    pos, data = _read_tail_block(path, n)
    cut = len(data) - (1 if data.endswith(b"\n") else 0)
    for _ in range(n):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return pos  # fewer than n lines: the block is the whole file (pos == 0)
    return pos + cut + 1


async def follow(
    path: LogFile,
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


# --------------------------------------------------------------------- why a start failed

#: vLLM's record header, ``(EngineCore pid=7) ERROR 12-03 13:00:00 [core.py:1510] `` (the
#: process part is missing outside vLLM's child processes in some versions); ANSI colours too.
#: Ray forwards its workers' lines to the driver as ``(RayWorkerWrapper pid=7, ip=10.0.0.2) ``
#: (docs/ray.md): the same, with the node's address.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PROCESS = re.compile(r"\((?P<process>(?:[^()]*? )?pid=\d+(?:, ip=[^()\s]+)?)\) ")
_RECORD = re.compile(
    r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\] ?"
)
#: The last line of a Python traceback: ``ValueError: ...``, ``torch.OutOfMemoryError: ...``
#: (a dotted name with a lower-case letter: uvicorn's ``INFO:`` is not one).
_EXCEPTION = re.compile(r"(?P<name>[A-Za-z_][\w.]*)(?::(?: .*)?)?")
#: Exceptions that only point at the real one, printed earlier by another process.
_POINTER = re.compile(r"see (?:the )?(?:root cause|stack trace)|(?:root cause|stack trace) above", re.I)
_BARE_ENDINGS = ("Error", "Exception", "Interrupt", "Exit", "Iteration")
_TRACEBACK = "Traceback (most recent call last):"
_FATAL = (None, "ERROR", "CRITICAL")  # a traceback logged at INFO or WARNING was survived


@dataclass(frozen=True)
class LogLine:
    """One log line taken apart: who wrote it, at what level, and the message."""

    process: str  # "EngineCore pid=7"; "" for unprefixed output (tracebacks on stderr, uvicorn)
    level: str | None  # vLLM's level, None for unprefixed output
    text: str  # the message without vLLM's prefixes


def parse_line(line: str) -> LogLine:
    """Strip vLLM's ``(PROCESS pid=N)`` and ``LEVEL MM-DD HH:MM:SS [file.py:N]`` prefixes."""
    text = _ANSI.sub("", line).rstrip()
    process = ""
    match = _PROCESS.match(text)
    if match:
        process, text = match.group("process"), text[match.end() :]
    record = _RECORD.match(text)
    level = None
    if record:
        level, text = record.group("level"), text[record.end() :]
    return LogLine(process, level, text)


@dataclass(frozen=True)
class RootCause:
    """The line that says why vLLM failed: ``text`` (prefixes stripped; an indented line that
    continues the exception message is joined to it) from ``lines[index : index + count]``."""

    text: str
    index: int
    count: int = 1


def _is_exception(text: str) -> bool:
    """``Name: message`` or a bare ``NameError``, where the name has a lower-case letter."""
    match = _EXCEPTION.fullmatch(text)
    if match is None or not any(c.islower() for c in match.group("name")):
        return False
    return ":" in text or match.group("name").endswith(_BARE_ENDINGS)


def _exceptions(parsed: Sequence[LogLine]) -> list[RootCause]:
    """The last line of every traceback that was fatal (not logged at INFO/WARNING), in order.
    Tracebacks are followed per process, so that lines of two processes may interleave."""
    open_tracebacks: set[str] = set()
    found: list[RootCause] = []
    for i, line in enumerate(parsed):
        if line.text == _TRACEBACK:
            if line.level in _FATAL:
                open_tracebacks.add(line.process)
            continue
        if line.process not in open_tracebacks or not line.text or line.text[0].isspace():
            continue
        if not _is_exception(line.text):
            continue  # another line of that process (e.g. "Process EngineCore:"): still open
        open_tracebacks.discard(line.process)
        text, count = line.text, 1
        after = parsed[i + 1] if i + 1 < len(parsed) else None
        # "ValidationError: 1 validation error for ModelConfig" says why on the next line.
        if after is not None and after.process == line.process and after.text[:1].isspace():
            detail = after.text.strip()
            if detail and not detail.startswith("File "):
                text, count = f"{text}{' ' if text.endswith(':') else ': '}{detail}", 2
        found.append(RootCause(text, i, count))
    return found


def _looks_like_error(text: str) -> bool:
    low = text.lower()
    return any(word in low for word in ("error", "exception", "invalid", "unrecognized"))


#: vLLM 0.32's MultiprocExecutor when a worker process ends unasked (multiproc_executor.py).
_WORKER_DIED = re.compile(r"^Worker proc \S+ died unexpectedly \(exit code: (?P<code>-?\d+|None)\)")


def _with_signal(match: re.Match[str]) -> str:
    """The worker-died line ``match`` found, with the signal's name after a negative exit code
    (``exit code: -4, SIGILL``)."""
    text, code = match.string, match.group("code")
    if not code.startswith("-"):
        return text
    try:
        name = signal.Signals(-int(code)).name
    except ValueError:
        return text
    return f"{text[: match.end('code')]}, {name}{text[match.end('code') :]}"


def root_cause(lines: Sequence[str], *, last_line: bool = True) -> RootCause | None:
    """Why a vLLM start failed, from its log: the exception of the earliest fatal traceback (the
    EngineCore's or a worker's, not the API server's "Engine core initialization failed. See root
    cause above"), else the first ERROR record, else the last error-looking line (argparse's
    ``vllm: error: ...``), else the last line (unless ``last_line`` is false: a process that was
    killed need not have said why). vLLM's line that a worker process died unexpectedly comes
    first when it precedes those exceptions (they follow from it). ``None`` for an empty log.
    Pure: lines in, no I/O."""
    parsed = [parse_line(line) for line in lines]
    exceptions = _exceptions(parsed)
    # A worker that died (a signal: SIGILL, the OOM killer's SIGKILL) says nothing itself; the
    # executor's line that names it comes before the exceptions it causes ("cancelled").
    died = next(((i, m) for i, line in enumerate(parsed) if (m := _WORKER_DIED.search(line.text))), None)
    if died is not None and (not exceptions or died[0] < exceptions[0].index):
        return RootCause(_with_signal(died[1]), died[0])
    real = [cause for cause in exceptions if not _POINTER.search(cause.text)]
    if real or exceptions:
        return (real or exceptions)[0]
    for i, line in enumerate(parsed):
        if line.level in ("ERROR", "CRITICAL") and line.text.strip():
            return RootCause(line.text.strip(), i)
    for i in range(len(parsed) - 1, -1, -1):
        if _looks_like_error(parsed[i].text):
            return RootCause(parsed[i].text.strip(), i)
    for i in range(len(parsed) - 1, -1, -1):
        if last_line and parsed[i].text.strip():
            return RootCause(parsed[i].text.strip(), i)
    return None


def failure_tail(lines: Sequence[str], cause: RootCause | None, n: int) -> list[str]:
    """The last ``n`` lines; when the root cause's lines come before them, those lines first and
    a marker line for what is left out, so that a tail always shows the cause."""
    start = max(len(lines) - n, 0)
    if cause is None or cause.index >= start:
        return list(lines[start:])
    end = cause.index + cause.count
    skipped = start - end
    marker = [f"[... {skipped} more line{'s' if skipped != 1 else ''} ...]"] if skipped > 0 else []
    return [*lines[cause.index : min(end, start)], *marker, *lines[start:]]


#: How far back from the end of a log the root cause of a failure is looked for.
ROOT_CAUSE_LINES = 5000


async def tail_with_cause(
    path: LogFile, n: int, *, last_line: bool = True
) -> tuple[list[str], RootCause | None]:
    """The last ``n`` lines of a log, preceded by its root cause's lines when they come earlier
    (:func:`failure_tail`), and that cause (None when the log shows no failure)."""
    lines = await tail_lines_async(path, max(n, ROOT_CAUSE_LINES))
    cause = root_cause(lines, last_line=last_line)
    return failure_tail(lines, cause, n), cause


#: How much of a log, at most, is read for the cause of a death after ready.
DEATH_CAUSE_BYTES = 1 << 20


def _read_since(path: LogFile, offset: int) -> bytes:
    with _open(path) as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(offset, size - DEATH_CAUSE_BYTES))
        return handle.read()


def log_size(path: Path) -> int:
    """How long the log is now (0 if it is gone). Blocking."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


async def cause_since(path: LogFile, offset: int) -> RootCause | None:
    """Why a vLLM that was ready died, from what its log says after ``offset`` (where the log
    stood when it became ready: an error logged earlier, say a bad request's, is not the cause);
    None when it said nothing error-like (it was killed, or exited quietly)."""
    data = await asyncio.to_thread(_read_since, path, offset)
    text = data.decode("utf-8", errors="replace")
    return root_cause(text.splitlines(), last_line=False)


#: vLLM's worker line with the size of the weights it loaded (per GPU), as vLLM 0.32 logs it.
_LOADING_TOOK = re.compile(rb"Model loading took ([0-9.]+) GiB memory")


def loaded_weights_gib(path: LogFile, limit: int = 8 << 20) -> list[float]:
    """Every "Model loading took X GiB memory" of a launch's log (one per worker that logs it),
    read from its first ``limit`` bytes (the line comes before vLLM is ready). Blocking."""
    with _open(path) as handle:
        data = handle.read(limit)
    return [float(match.group(1)) for match in _LOADING_TOOK.finditer(data)]
