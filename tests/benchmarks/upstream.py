"""A stand-in for ``vllm serve`` for the memory and readiness sections (raw asyncio, no
framework), run by the proxy as its ``--vllm-command``::

    python tests/benchmarks/upstream.py MODEL [--ready-delay S] --host H --port P

Like vLLM it listens only after "loading" (``--ready-delay`` seconds: connections are
refused until then). Routes:

- ``GET /health`` (200), ``GET /v1/models`` (the model list the proxy's prober wants);
- ``GET /bench/info``: ``listen_at`` (wall time the port started listening) and
  ``first_health_at`` (wall time of the first ``/health`` answered 200);
- ``GET /bench/bytes?n=N&chunk=C``: an SSE-framed, chunked body of ``N`` bytes written in
  ``C``-byte events as fast as the reader takes them (flow control respected), then the end.

Other flags are accepted and ignored (the proxy may add vLLM ones).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from urllib.parse import parse_qs


class Upstream:
    def __init__(self, model: str) -> None:
        self.model = model
        self.listen_at: float | None = None
        self.first_health_at: float | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                close = False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "connection":
                        close = "close" in value.lower()
                if length:
                    await reader.readexactly(length)
                await self.route(method, target, writer)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def route(self, method: str, target: str, writer: asyncio.StreamWriter) -> None:
        path, _, query = target.partition("?")
        if path == "/health":
            if self.first_health_at is None:
                self.first_health_at = time.time()
            self.reply(writer, 200, b"", "text/plain")
        elif path == "/v1/models":
            models = {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "bench"}]}
            self.reply(writer, 200, json.dumps(models).encode())
        elif path == "/bench/info":
            info = {
                "pid": os.getpid(),
                "model": self.model,
                "listen_at": self.listen_at,
                "first_health_at": self.first_health_at,
            }
            self.reply(writer, 200, json.dumps(info).encode())
        elif path == "/bench/bytes" and method == "GET":
            params = parse_qs(query)
            total = int(params.get("n", ["1048576"])[0])
            chunk = max(16, int(params.get("chunk", ["16384"])[0]))
            await self.stream_bytes(writer, total, chunk)
        else:
            self.reply(writer, 404, b'{"detail":"Not Found"}')

    @staticmethod
    def reply(writer: asyncio.StreamWriter, status: int, body: bytes, kind: str = "application/json") -> None:
        reason = {200: "OK", 404: "Not Found"}.get(status, "X")
        head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)

    @staticmethod
    async def stream_bytes(writer: asyncio.StreamWriter, total: int, chunk: int) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        event = b"data: " + b"x" * (chunk - 8) + b"\n\n"
        framed = f"{len(event):x}\r\n".encode() + event + b"\r\n"
        for _ in range(max(1, total // chunk)):
            writer.write(framed)
            await writer.drain()  # flow control: waits while the reader is behind
        writer.write(b"0\r\n\r\n")


async def serve(args: argparse.Namespace) -> None:
    upstream = Upstream(args.served_model_name or args.model)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    server = await asyncio.start_server(
        upstream.handle, args.host, args.port, reuse_address=True, backlog=2048, limit=1 << 16
    )
    upstream.listen_at = time.time()
    print(f"bench upstream {upstream.model} listening on {args.host}:{args.port}", flush=True)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upstream.py")
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--ready-delay", type=float, default=0.2, help="seconds before listening")
    parser.add_argument("--served-model-name", default=None)
    args, _ = parser.parse_known_args(argv)
    time.sleep(args.ready_delay)  # "loading the weights": the port refuses connections
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
