"""Process groups: who is still in vLLM's group, and signalling all of it.

vLLM runs in a session (and process group) of its own, so its EngineCore and worker children
can be found and killed together even after the main process is gone. A process counts as
alive unless it is a zombie: orphaned children are reaped by init, not by us, and a zombie
holds no GPU memory. Only the standard library is used (the watchdog imports this module).
"""

from __future__ import annotations

import os
import signal
import time


def group_members(pgid: int) -> list[int]:
    """The pids of the group's live (non-zombie) processes, from ``/proc``."""
    members: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc: fall back to "the group exists"
        return [pgid] if _group_exists(pgid) else []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Fields after the command name (which may contain spaces and parentheses).
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    return _group_exists(pgid) and bool(group_members(pgid))


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to the whole group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def kill_group(pgid: int, grace: float, poll: float = 0.05) -> None:
    """SIGTERM the group, wait up to ``grace`` seconds for it to go, then SIGKILL it. Blocking."""
    if not signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return
        time.sleep(poll)
    signal_group(pgid, signal.SIGKILL)
