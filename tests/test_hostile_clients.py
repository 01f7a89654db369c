"""Clients that never read what they asked for (issue 16, items 1 and 2).

A client that pipelines requests and never reads its answers must not make the proxy buffer for
it, nor keep sending its requests to vLLM: the proxy stops where the socket buffers are full, and
cuts the connection (abort, not a polite close that would wait for ever) once the client has
taken nothing for ``--client-timeout`` seconds. The same on the front door, on a connection it
handed to aiohttp, and with ``--access-log`` (aiohttp alone). The echo upstream of
``tests/helpers.py`` answers ``/blob`` (30 KB, head and body in one write) and ``/stream`` (a
long chunked stream), and counts what it was asked for."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from typing import Any

import httpx
import pytest
from helpers import ECHO, async_wait_until, wait_until

from aic_vllm_proxy.relay.front import Front, FrontProtocol

#: Seconds a client may leave its answers untaken (also the keep-alive timeout: see cli.py).
CLIENT_TIMEOUT = 3
BLOB = b"GET /blob?size=30000 HTTP/1.1\r\nHost: x\r\n\r\n"
#: About 490 MB of events; HTTP/1.0 sends the request to aiohttp.
STREAM_EVENTS = 30_000
STREAM_10 = (
    b"GET /stream?events=%d&size=16384 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n" % STREAM_EVENTS
)
#: tcpi_state of a socket the peer reset (Linux ``TCP_CLOSE``).
TCP_CLOSE = 7
MB = 1024 * 1024


def never_reading_client(port: int) -> socket.socket:
    """A connection with a small receive buffer, that will never be read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def send_what_fits(sock: socket.socket, data: bytes, seconds: float = 3.0) -> int:
    """Send as much of ``data`` as the proxy lets in within ``seconds``; how much was sent."""
    sent, deadline = 0, time.monotonic() + seconds
    while sent < len(data):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [sock], [], left)[1]:
            break
        try:
            sent += sock.send(data[sent:])
        except BlockingIOError:
            continue
    return sent


def cut(sock: socket.socket) -> bool:
    """The proxy aborted the connection: a reset, though nothing was read (a polite close cannot
    end a connection whose client does not read)."""
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]) == TCP_CLOSE


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak) of a process, in kB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


def count(url: str, path: str, key: str) -> int:
    return int(httpx.get(url + path, timeout=30).json()[key])


# ------------------------------------------------------------ the daemon as a separate process


@pytest.mark.slow
@pytest.mark.parametrize("access_log", [False, True], ids=["front-door", "access-log"])
@pytest.mark.parametrize("then_stream", [False, True], ids=["blobs", "blobs-then-stream"])
def test_a_client_that_never_reads_costs_bounded_memory_and_is_cut(
    spawn_proxy: Any, vllm_groups: set[int], access_log: bool, then_stream: bool
) -> None:
    """6,000 pipelined requests for 30 KB answers (then, in the same send, an HTTP/1.0 request
    for a ~490 MB stream) on one connection that never reads: vLLM gets only as many requests
    as the socket buffers hold answers for, the proxy's memory stays flat, and the connection
    is aborted after the client timeout. Before the fix the front door sent all 6,000 upstream
    and grew by ~180 MB (~1 GB with the stream), and no path ever ended the connection."""
    flags = ["--vllm-command", ECHO, "--client-timeout", str(CLIENT_TIMEOUT)]
    proxy = spawn_proxy(*flags, *(["--access-log"] if access_log else []))
    switched = httpx.post(proxy.url + "/switch", json={"model_spec": "echo-model"}, timeout=60)
    assert switched.status_code == 200, switched.text
    vllm_groups.add(int(switched.json()["status"]["pid"]))
    pid = proxy.process.pid
    before = memory_kb(pid)
    sock = never_reading_client(int(proxy.url.rsplit(":", 1)[1]))
    try:
        data = BLOB * (200 if then_stream else 6000) + (STREAM_10 if then_stream else b"")
        sent = send_what_fits(sock, data)
        was_cut = wait_until(lambda: cut(sock), 8 * CLIENT_TIMEOUT)
        after = memory_kb(pid)
        blobs = count(proxy.url, "/blob/count", "count")
        events = count(proxy.url, "/stream/progress", "events")
    finally:
        sock.close()
    growth = (max(after["VmHWM"], after["VmRSS"]) - before["VmRSS"]) / 1024
    print(f"sent {sent} B; vLLM asked for {blobs} blobs, {events} events; RSS {before} -> {after}")
    assert growth < 50, f"the proxy grew by {growth:.0f} MB for a client that reads nothing"
    assert blobs < 1000, f"{blobs} requests went to vLLM for a client that reads nothing"
    assert events < STREAM_EVENTS // 10, events
    assert was_cut, "the connection was never cut"
    assert proxy.process.poll() is None


# --------------------------------------------------------------------- the proxy in this process


def front_door_connection(front: Front, sock: socket.socket) -> FrontProtocol:
    """The front door's connection for the client socket ``sock``."""
    for conn in front.connections:
        if conn.transport is not None and conn.transport.get_extra_info("peername") == sock.getsockname():
            return conn
    raise AssertionError("no front door connection for this client")


async def front_door_client(make_proxy: Any) -> tuple[Any, socket.socket, FrontProtocol, asyncio.Transport]:
    """A proxy in this process in front of the echo upstream, a never reading client whose first
    request (read) went through the front door, the front door's connection for it and its
    transport."""
    proxy = await make_proxy(vllm_command=ECHO, client_timeout=CLIENT_TIMEOUT)
    status, body = await proxy.switch("echo-model")
    assert status == 200, body
    served = proxy.front.served
    sock = never_reading_client(proxy.settings.port)
    sock.setblocking(True)
    sock.settimeout(30)
    await asyncio.to_thread(sock.sendall, b"GET /blob?size=10 HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b"\r\n\r\n" + b"b" * 10):
        answer += await asyncio.to_thread(sock.recv, 4096)
    assert proxy.front.served == served + 1
    conn = front_door_connection(proxy.front, sock)
    assert isinstance(conn.transport, asyncio.Transport)
    return proxy, sock, conn, conn.transport


async def blobs_served(proxy: Any) -> int:
    async with proxy.session.get(proxy.url + "/blob/count") as resp:
        return int((await resp.json())["count"])


@pytest.mark.slow
async def test_a_hand_off_while_writes_are_paused_keeps_aiohttp_waiting(make_proxy: Any) -> None:
    """The front door's answer fills the client's buffers (writes pause), and the next request,
    already read, goes to aiohttp (HTTP/1.0): aiohttp must know that writes are paused, or its
    drain() returns at once and the whole stream is buffered in the proxy. Then the connection
    is aborted after the client timeout. The answers are pipelined one at a time until the
    kernel holds all it takes; the proxy's high-water mark is then set to what waits in its
    buffer, so that the next answer is the one that pauses writing."""
    proxy, sock, conn, transport = await front_door_client(make_proxy)
    try:
        for _ in range(2000):
            served = proxy.front.served + 1
            await asyncio.to_thread(sock.sendall, BLOB)
            # Its answer is written once its task is over.
            assert await async_wait_until(lambda: proxy.front.served == served and conn.task is None, 30)  # noqa: B023
            if transport.get_write_buffer_size() > 0:
                break  # the kernel holds all it takes: what is written now waits in the proxy
        high = transport.get_write_buffer_size()
        assert 0 < high < 64 * 1024, high
        transport.set_write_buffer_limits(high=high)
        handed = proxy.front.handed_off
        await asyncio.to_thread(sock.sendall, BLOB + STREAM_10)
        assert await async_wait_until(lambda: proxy.front.handed_off == handed + 1, 30)
        assert transport.get_write_buffer_size() > high  # writes were paused at the hand-off
        was_cut = await async_wait_until(lambda: cut(sock), 8 * CLIENT_TIMEOUT)
        async with proxy.session.get(proxy.url + "/stream/progress") as resp:
            events = int((await resp.json())["events"])
    finally:
        sock.close()
    assert 0 < events < STREAM_EVENTS // 10, f"{events} of {STREAM_EVENTS} events were read from vLLM"
    assert was_cut, "the connection was never cut"


@pytest.mark.slow
@pytest.mark.parametrize("handed_off", [False, True], ids=["front-door", "aiohttp"])
async def test_a_close_that_waits_for_a_client_that_never_reads_is_cut(
    make_proxy: Any, handed_off: bool
) -> None:
    """Answers that wait in the proxy's buffer (below the high-water mark, so writes never
    pause) for a client that never reads: the connection is closed when idle for the keep-alive
    timeout (by the front door, or by aiohttp after a hand-off), and that close would wait for
    ever; it is aborted after the client timeout."""
    proxy, sock, _, transport = await front_door_client(make_proxy)
    try:
        transport.set_write_buffer_limits(high=1 << 30)  # never pause: the answers wait in the proxy
        first = b"GET /blob?size=30000 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
        handed = proxy.front.handed_off
        await asyncio.to_thread(sock.sendall, (first if handed_off else BLOB) + BLOB * 399)
        assert await async_wait_until(lambda: transport.get_write_buffer_size() > 0, 30)
        assert proxy.front.handed_off == handed + handed_off
        deadline = time.monotonic() + 60
        while await blobs_served(proxy) < 401 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await blobs_served(proxy) == 401
        assert transport.get_write_buffer_size() > 0  # the rest waits for the client
        assert await async_wait_until(lambda: cut(sock), 8 * CLIENT_TIMEOUT), "never cut"
    finally:
        sock.close()
