"""Process groups: who is still in vLLM's group, and signalling all of it.

vLLM runs in a session (and process group) of its own, so its EngineCore and worker children
can be found and killed together even after the main process is gone. A process counts as
alive unless it is a zombie: orphaned children are reaped by init, not by us, and a zombie
holds no GPU memory. Only the standard library is used (the watchdog imports this module).

:func:`port_listener` tells whether the process listening on vLLM's port is one of the group's
(from ``/proc/net/tcp`` and the group's open sockets), so that nothing is sent to a process the
proxy did not start.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import time
from collections.abc import Collection


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


# ------------------------------------------------------------------ who listens on a port

#: Who listens on a TCP port, as seen from ``/proc`` (see :func:`port_listener`).
OURS, FOREIGN, NOBODY, UNKNOWN = "ours", "foreign", "nobody", "unknown"
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def _proc_address(hex_address: str) -> str:
    """An address of ``/proc/net/tcp{,6}`` (32-bit words in host byte order) as text."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def listening_sockets(port: int, addresses: Collection[str]) -> set[int] | None:
    """Inodes of the TCP sockets listening on ``port`` at one of ``addresses`` or at a wildcard
    address (which takes connections for every address); None when ``/proc`` cannot tell."""
    wanted = {str(ipaddress.ip_address(a)) for a in addresses} | {"0.0.0.0", "::"}
    wanted |= {f"::ffff:{a}" for a in wanted if ":" not in a}
    found: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port and _proc_address(address) in wanted:
                found.add(int(fields[9]))
    return found if readable else None


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets open in process ``pid`` (empty if it cannot be read)."""
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def port_listener(pgid: int, port: int, addresses: Collection[str]) -> str:
    """Who listens on ``port`` (at ``addresses``): :data:`OURS` when every listening socket is
    held by a process of group ``pgid``, :data:`FOREIGN` when one is not (another process
    answers there, or shares the port with ``SO_REUSEPORT``), :data:`NOBODY`, or
    :data:`UNKNOWN` when ``/proc`` cannot tell. Blocking: call it in a thread."""
    listening = listening_sockets(port, addresses)
    if listening is None:
        return UNKNOWN
    if not listening:
        return NOBODY
    held: set[int] = set()
    for pid in group_members(pgid):
        held |= socket_inodes(pid)
    return OURS if listening <= held else FOREIGN
