"""A tiny guard process that kills vLLM's process group if the proxy dies without stopping it.

The supervisor starts one per launch: ``python -m aic_vllm_proxy.engine.watchdog PGID GRACE`` in a
session of its own, with the read end of a pipe as standard input. The proxy keeps the write
end; the kernel closes it however the proxy ends, SIGKILL included. On end-of-file the watchdog
sends SIGTERM to the group, waits up to GRACE seconds, then SIGKILLs whatever is left. When the
proxy has already stopped the group normally, the group is gone and the watchdog just exits.

It imports only the standard library and ``procgroup``, so it starts in a few milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys

from aic_vllm_proxy.engine.procgroup import group_alive, kill_group


def main(argv: list[str]) -> int:
    pgid, grace = int(argv[0]), float(argv[1])
    # Ignore the terminal's signals: a Ctrl-C meant for the proxy must not take the guard down
    # before it has done its job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        try:
            if not os.read(0, 4096):
                break  # end of file: the proxy is gone or has finished with this launch
        except InterruptedError:
            continue
        except OSError:
            break
    if group_alive(pgid):
        kill_group(pgid, grace)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
