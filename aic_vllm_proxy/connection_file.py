"""The connection file's format (``--connection-file``): what a daemon that is listening tells
the clients that read the file (a notebook on the login node, the command line), so that
nobody copies a node name, a port and a key by hand.

The daemon writes it (``web/connection.py``: once listening, atomically, mode 0600) and removes
it when it exits; the client reads it (``client/connection.py``). One JSON object::

    {"url": "http://gpu042:40117", "key": "…", "pid": 81234, "host": "gpu042", "port": 40117,
     "started_at": "2026-12-04T02:30:00.123456Z", "slurm_job_id": "123456", "version": "0.9.0"}

Fields a newer daemon adds are ignored by an older client.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class ConnectionInfo(BaseModel):
    """One daemon, as its connection file describes it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    url: str = Field(description="Where clients reach the daemon: http://HOST:PORT.")
    key: str | None = Field(description="An admin key of the daemon; null when it needs no key.")
    pid: int = Field(description="The daemon's process id, on `host`.")
    host: str = Field(description="The hostname of the node the daemon runs on.")
    port: int = Field(ge=1, le=65535, description="The port it listens on (the kernel's pick for --port 0).")
    started_at: datetime = Field(description="When it started listening (UTC).")
    slurm_job_id: str | None = Field(default=None, description="$SLURM_JOB_ID of the daemon, if set.")
    version: str = Field(description="The daemon's aic-vllm-proxy version.")
