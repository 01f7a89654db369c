"""The connection file (``--connection-file``): written once the daemon listens, removed when it
exits (``server.py`` calls :func:`publish` and :meth:`Published.withdraw`). The format is
``connection_file.ConnectionInfo``; the client reads it (``client/connection.py``).

- ``url``: ``http://HOST:PORT`` with the port listened on (the kernel's pick for ``--port 0``)
  and HOST: ``--advertise-host``; else ``--host`` when it is one address (not a wildcard such as
  ``0.0.0.0``); else this node's hostname as ``socket.gethostname()`` (``hostname``) gives it,
  the short name a cluster's nodes usually know each other by (no DNS lookup at start-up).
- ``key``: the first admin key (``--admin-key``, its environment variable, then the keys file);
  null when there is none.
- Written atomically: a temporary file beside it, created with mode 0600 (``mkstemp``), then
  renamed over it; missing directories are created with mode 0700. A reader sees the whole old
  file, the whole new one, or none.
- Removed only while it still describes this daemon (same host, pid and start): a file that
  another daemon wrote later over the same path is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from aic_vllm_proxy import __version__
from aic_vllm_proxy.config import Settings, http_base
from aic_vllm_proxy.connection_file import ConnectionInfo
from aic_vllm_proxy.relay.auth import KeyRing

log = logging.getLogger(__name__)


class CannotPublish(Exception):
    """The connection file cannot be written; the message says where and why in one line."""


def connection_info(
    settings: Settings, port: int, keys: KeyRing, environ: Mapping[str, str] | None = None
) -> ConnectionInfo:
    """What the daemon listening on ``port`` writes (now, with this process's pid)."""
    env = os.environ if environ is None else environ
    hostname = socket.gethostname()
    return ConnectionInfo(
        url=http_base(settings.advertised_host(hostname), port),
        key=keys.first_admin_key,
        pid=os.getpid(),
        host=hostname,
        port=port,
        started_at=datetime.now(timezone.utc),
        slurm_job_id=env.get("SLURM_JOB_ID") or None,
        version=__version__,
    )


def _make_private_dirs(directory: Path) -> None:
    """``directory`` and its missing parents, each created with mode 0700."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another job made it meanwhile
            os.mkdir(path, 0o700)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, the file readable by its owner only (0600 from
    its creation: no moment at which others could open it)."""
    _make_private_dirs(path.parent)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@dataclass(frozen=True)
class Published:
    """A connection file this daemon wrote."""

    path: Path
    info: ConnectionInfo

    def is_ours(self) -> bool:
        """The file at :attr:`path` still describes this daemon (host, pid and start)."""
        try:
            found = ConnectionInfo.model_validate_json(self.path.read_bytes())
        except (OSError, ValidationError):
            return False
        mine = self.info
        return (found.host, found.pid, found.started_at) == (mine.host, mine.pid, mine.started_at)

    def withdraw(self) -> None:
        """Remove the file if it is still ours (never raises: the daemon is exiting)."""
        if not self.is_ours():
            log.info("connection file %s is not this daemon's any more: left as it is", self.path)
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot remove the connection file %s: %s", self.path, exc)
            return
        log.info("connection file %s removed", self.path)


def publish(settings: Settings, port: int, keys: KeyRing) -> Published | None:
    """Write ``--connection-file`` for the daemon listening on ``port``; None without one.
    Raises :class:`CannotPublish` if it cannot be written."""
    if settings.connection_file is None:
        return None
    path = settings.connection_file.expanduser().absolute()
    info = connection_info(settings, port, keys)
    try:
        write_private(path, info.model_dump_json(indent=2).encode() + b"\n")
    except OSError as exc:
        raise CannotPublish(f"cannot write the connection file {path}: {exc.strerror or exc}") from None
    log.info("connection file %s written: %s (pid %d)", path, info.url, info.pid)
    return Published(path, info)
