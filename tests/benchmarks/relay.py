"""A bare TCP relay for the benchmark: the floor for a hop written in Python.

Each client connection gets its own connection to the upstream, and bytes pass both ways as
they come: one read and one write per chunk, flow control both ways, and no HTTP at all (no
parsing, no pooling, no checks). What the proxy spends above this relay is what its HTTP work
costs; what this relay spends above nginx is what Python and the event loop cost.

    python tests/benchmarks/relay.py LISTEN_PORT:UPSTREAM_PORT [...]
"""

from __future__ import annotations

import asyncio
import signal
import sys

HOST = "127.0.0.1"


class Side(asyncio.Protocol):
    """One end of a relayed connection; ``peer`` is the other end."""

    def __init__(self, peer: Side | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.early: list[bytes] = []  # from the client before the upstream connection is up
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
        else:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        return True  # keep the other direction open until the peer closes too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class ClientSide(Side):
    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: Side(self), HOST, self.upstream_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.closed:
            upstream.transport.close()  # type: ignore[union-attr]
            return
        self.peer = upstream
        early, self.early = self.early, []
        for data in early:
            upstream.transport.write(data)  # type: ignore[union-attr]


async def serve(pairs: list[tuple[int, int]]) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(lambda up=up: ClientSide(up), HOST, listen, backlog=4096)  # type: ignore[misc]
        for listen, up in pairs
    ]
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    print("relay listening on " + ", ".join(f"{listen} -> {up}" for listen, up in pairs), flush=True)
    await stop
    for server in servers:
        server.close()


def main(argv: list[str]) -> int:
    pairs = [(int(a), int(b)) for a, b in (arg.split(":") for arg in argv)]
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(pairs))
    else:
        uvloop.run(serve(pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
