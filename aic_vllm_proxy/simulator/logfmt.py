"""Log lines in vLLM's and uvicorn's formats (as written by vLLM 0.32).

* vLLM records go to stdout as ``(PROCESS pid=N) LEVEL MM-DD HH:MM:SS [file.py:line] msg``;
  the lines of a multi-line message each repeat that whole header.
* uvicorn's lines are *not* prefixed: ``INFO:     Started server process [N]`` on
  stderr, access lines ``INFO:     127.0.0.1:5555 - "GET /health HTTP/1.1" 200 OK``
  on stdout.
* Python tracebacks (an uncaught error) are plain text on stderr.

Every record is written with one ``os.write`` so that the lines of the API server
and of the engine child, which share the same pipe, never interleave. Write errors
(the reader is gone) are ignored: the engine child must keep running when its parent
and the log reader are gone.
"""

from __future__ import annotations

import os
import sys
import time
from http import HTTPStatus

STDOUT = 1
STDERR = 2

_LEVELS = {"TRACE": 5, "DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_PHRASES = {status.value: status.phrase for status in HTTPStatus}

PY_SITE = f"/usr/local/lib/python3.{sys.version_info[1]}/dist-packages"
#: The standard library and vLLM's tracing wrapper, as tracebacks name them.
STDLIB = f"/usr/lib/python3.{sys.version_info[1]}"
OTEL = f"{PY_SITE}/vllm/tracing/otel.py"
"""Where the fake tracebacks pretend vLLM is installed."""


GiB = 1024**3


def format_gib(size: float) -> str:
    """vLLM's ``format_gib``: bytes as GiB rounded to 2 places (``1.12``, ``0.5``, ``12.0``)."""
    return f"{round(size / GiB, 2)}"


def write_fd(fd: int, text: str) -> None:
    data = text.encode("utf-8", "replace")
    try:
        while data:
            written = os.write(fd, data)
            data = data[written:]
    except OSError:
        pass


def uvicorn_level_number(name: str) -> int:
    return _LEVELS.get(name.upper(), 20)


def vllm_line(level: str, where: str, message: str, prefix: str = "") -> str:
    """One vLLM log record; each line of a multi-line message repeats the header."""
    header = f"{prefix}{level} {time.strftime('%m-%d %H:%M:%S')} [{where}] "
    return "".join(header + line + "\n" for line in message.split("\n"))


class ProcessLog:
    """The log output of one simulated process (``APIServer`` or ``EngineCore``)."""

    def __init__(
        self, name: str, *, out_fd: int = STDOUT, err_fd: int = STDERR, pid: int | None = None
    ) -> None:
        self.prefix = f"({name} pid={os.getpid() if pid is None else pid}) "
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.uvicorn_level = 20  # logging.INFO
        self.access_log = True

    def log(self, level: str, where: str, message: str) -> None:
        write_fd(self.out_fd, vllm_line(level, where, message, self.prefix))

    def info(self, where: str, message: str) -> None:
        self.log("INFO", where, message)

    def warning(self, where: str, message: str) -> None:
        self.log("WARNING", where, message)

    def error(self, where: str, message: str) -> None:
        self.log("ERROR", where, message)

    def raw(self, text: str, *, stderr: bool = True) -> None:
        """Unprefixed text: tracebacks, progress bars."""
        write_fd(self.err_fd if stderr else self.out_fd, text if text.endswith("\n") else text + "\n")

    def uvicorn(self, message: str, level: str = "INFO") -> None:
        """A line of uvicorn's ``uvicorn.error`` logger (stderr)."""
        if _LEVELS.get(level, 20) >= self.uvicorn_level:
            write_fd(self.err_fd, f"{level + ':':<9} {message}\n")

    def access(self, client: str, method: str, path: str, version: str, status: int) -> None:
        """A uvicorn access-log line (stdout)."""
        if self.access_log and self.uvicorn_level <= 20:
            phrase = _PHRASES.get(status, "")
            write_fd(
                self.out_fd,
                f'INFO:     {client} - "{method} {path} HTTP/{version}" {status} {phrase}\n',
            )


def traceback_text(frames: list[tuple[str, int, str, str]], final: str) -> str:
    """A Python-style traceback from (file, line, function, source) frames."""
    parts = ["Traceback (most recent call last):"]
    for file, line, func, source in frames:
        parts.append(f'  File "{file}", line {line}, in {func}')
        parts.append(f"    {source}")
    parts.append(final)
    return "\n".join(parts)
