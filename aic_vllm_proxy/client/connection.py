"""A daemon's connection file (``aic-vllm-proxy serve --connection-file PATH``), read by the
client: ``VLLMProxyClient.from_connection_file(PATH)``, or ``$AIC_VLLM_PROXY_CONNECTION_FILE``
when no URL is given. The format is ``aic_vllm_proxy.connection_file.ConnectionInfo``.

Reading it checks what can be checked without the network, each with a message that says what
to do: a missing file (the job has not started the daemon yet, or the daemon has exited and
removed it), a file that is not JSON or not a connection file, a file others may read (a
warning: it holds an admin key), and, on the daemon's own host, a pid that is not running (a
warning: a daemon killed with SIGKILL leaves its file behind). On another host a pid says
nothing, so the URL is simply tried: a daemon that is gone is then a ``ProxyUnreachable`` that
names the file.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from pydantic import ValidationError

from aic_vllm_proxy.client.errors import ProxyError
from aic_vllm_proxy.connection_file import ConnectionInfo

CONNECTION_FILE_ENV = "AIC_VLLM_PROXY_CONNECTION_FILE"


class ConnectionFileError(ProxyError):
    """The connection file cannot be used: missing, unreadable, not JSON, or not a connection
    file. The message names the file and says what to do."""


class ConnectionFile(NamedTuple):
    """A connection file that was read: where, and what it says."""

    path: Path
    info: ConnectionInfo


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def read_connection_file(path: str | os.PathLike[str], *, stacklevel: int = 2) -> ConnectionFile:
    """Read and check the connection file at ``path`` (``~`` expanded). Raises
    :class:`ConnectionFileError`; warns (``UserWarning``) about a file others may read and about
    a daemon that is not running on this host."""
    where = Path(path).expanduser()
    try:
        data = where.read_bytes()
        mode = where.stat().st_mode
    except FileNotFoundError:
        raise ConnectionFileError(
            f"no connection file {where}: the daemon has not written it yet (is its job running? "
            "squeue --me; it writes the file once it listens) or it has exited (it removes the file "
            "when it stops)"
        ) from None
    except OSError as exc:
        raise ConnectionFileError(f"cannot read the connection file {where}: {exc.strerror or exc}") from None
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ConnectionFileError(f"the connection file {where} is not JSON ({exc})") from None
    try:
        info = ConnectionInfo.model_validate(raw)
    except ValidationError as exc:
        wrong = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'the file'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        raise ConnectionFileError(
            f"{where} is not an aic-vllm-proxy connection file ({wrong}): give the file the daemon's "
            "--connection-file names"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(
            f"the connection file {where} may be read by others (mode {stat.S_IMODE(mode):04o}) and "
            f"it holds the daemon's admin key: chmod 600 {where}",
            UserWarning,
            stacklevel=stacklevel,
        )
    if info.host == socket.gethostname() and not _pid_running(info.pid):
        warnings.warn(
            f"the daemon that wrote {where} (pid {info.pid} on {info.host}, started "
            f"{info.started_at:%Y-%m-%d %H:%M:%S} UTC) is not running: the file is left over (a "
            "daemon killed with SIGKILL cannot remove it); start a new one",
            UserWarning,
            stacklevel=stacklevel,
        )
    return ConnectionFile(where, info)


def connection_from_environment(
    environ: Mapping[str, str] | None = None, *, stacklevel: int = 2
) -> ConnectionFile | None:
    """The file ``$AIC_VLLM_PROXY_CONNECTION_FILE`` names, read (see
    :func:`read_connection_file`); None when the variable is not set."""
    value = (os.environ if environ is None else environ).get(CONNECTION_FILE_ENV, "").strip()
    if not value:
        return None
    return read_connection_file(value, stacklevel=stacklevel + 1)
