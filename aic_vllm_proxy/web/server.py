"""Runs the daemon's application until SIGINT or SIGTERM, like ``web.run_app``: aiohttp's
``AppRunner`` starts and cleans up the application, and the daemon owns its listening socket
(:class:`Listener`, asyncio's ``create_server``; no aiohttp site) whose connections start at the
front door (``front.py``).

Once listening, the connection file is written when ``--connection-file`` asks for one
(``connection.py``). On a signal (or a fatal error): that file is removed, the listening socket
closes, idle connections close, requests in flight get up to ``drain_timeout`` seconds, then the
application's cleanup runs (vLLM is stopped and its whole process tree is gone before the process
exits).
A malformed request head (aiohttp answers 400 and closes the connection) is logged in one line,
at most :data:`MalformedRequests.burst` lines per :data:`MalformedRequests.window` seconds
(:class:`MalformedRequests`), instead of aiohttp's ERROR with a traceback for each.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from aic_vllm_proxy.relay.front import AiohttpConnection, Front, FrontProtocol
from aic_vllm_proxy.web import connection, control, nodes
from aic_vllm_proxy.web.app import SERVER_OPTIONS
from aic_vllm_proxy.web.appkeys import KEYS, PASSTHROUGH, SETTINGS
from aic_vllm_proxy.web.logs_format import ACCESS_LOG_FORMAT

log = logging.getLogger(__name__)


class MalformedRequests(logging.Filter):
    """A filter for aiohttp's server logger: what it logs about a request head it could not
    parse (an ``HttpProcessingError``, answered 400) becomes one WARNING line without a
    traceback, and at most ``burst`` such lines are let through per ``window`` seconds; the
    first line of the next window says how many were left out. Everything else passes as it is
    (a failure inside the proxy keeps its traceback)."""

    def __init__(
        self, burst: int = 10, window: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self._clock = clock
        self._window_start = -window
        self._logged = 0
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        now = self._clock()
        note = ""
        if now - self._window_start >= self.window:
            if self._suppressed:
                note = f" ({self._suppressed} more in the last {self.window:g} s not logged)"
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged >= self.burst:
            self._suppressed += 1
            return False
        self._logged += 1
        detail = " ".join(str(exc.message).split()).removesuffix(" ^")
        detail = "".join(c if c.isprintable() else repr(c)[1:-1] for c in detail[:300])
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "a client"
        record.msg = "malformed request from %s (400): %s%s"
        record.args = (remote, detail, note)
        record.exc_info = record.exc_text = None
        record.levelno = min(record.levelno, logging.WARNING)
        record.levelname = logging.getLevelName(record.levelno)
        return True


#: The one filter on aiohttp's server logger (installed by :func:`make_runner`).
MALFORMED_REQUESTS = MalformedRequests()


def make_runner(
    app: web.Application,
    *,
    access_log: logging.Logger | None,
    keepalive_timeout: float,
    drain_timeout: float,
    handle_signals: bool = False,
) -> web.AppRunner:
    server_log = logging.getLogger("aiohttp.server")
    if MALFORMED_REQUESTS not in server_log.filters:
        server_log.addFilter(MALFORMED_REQUESTS)
    return web.AppRunner(
        app,
        handle_signals=handle_signals,
        access_log=access_log,
        access_log_format=ACCESS_LOG_FORMAT,  # with the request's id
        keepalive_timeout=keepalive_timeout,
        shutdown_timeout=drain_timeout,
        **SERVER_OPTIONS,
    )


class Listener:
    """The daemon's listening socket, its own (``loop.create_server``), for an application whose
    runner is set up. Each connection starts at the front door; with ``lean=False`` (an access
    log) every connection is aiohttp's from the start, still watched for clients that do not
    read (``front.AiohttpConnection``). :meth:`stop` before the runner's ``cleanup()``."""

    def __init__(
        self, runner: web.AppRunner, *, keepalive_timeout: float, drain_timeout: float, lean: bool = True
    ) -> None:
        self.front: Front = make_front(runner, keepalive_timeout=keepalive_timeout)
        self.drain_timeout = drain_timeout
        self.lean = lean
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, backlog: int = 1024) -> None:
        """Listen on host:port (port 0: one the kernel picks, see :attr:`port`); ``OSError`` if
        it cannot."""
        front = self.front
        protocol: Callable[[], FrontProtocol | AiohttpConnection]
        protocol = (lambda: FrontProtocol(front)) if self.lean else front.aiohttp_connection
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(protocol, host, port, backlog=backlog, reuse_address=True)
        front.start()

    @property
    def port(self) -> int:
        """The port listened on (the one the kernel gave for port 0)."""
        assert self._server is not None and self._server.sockets, "not listening"
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close the listening socket, then the front door's connections: idle ones at once,
        requests in flight get up to ``drain_timeout`` (aiohttp's connections are the runner's
        ``cleanup()``'s, with the same timeout)."""
        if self._server is None:
            return
        self._server.close()  # no wait_closed(): it would wait for every connection to end
        self._server = None
        await self.front.shutdown(self.drain_timeout)


async def listen(
    runner: web.AppRunner,
    host: str,
    port: int,
    *,
    keepalive_timeout: float,
    drain_timeout: float,
    front: bool = True,
    backlog: int = 1024,
) -> Listener:
    """Listen on host:port for ``runner``'s application (after ``runner.setup()``). With an access
    log the front door is left out (``front=False``), so that every request goes through aiohttp
    and is logged."""
    listener = Listener(runner, keepalive_timeout=keepalive_timeout, drain_timeout=drain_timeout, lean=front)
    await listener.start(host, port, backlog=backlog)
    return listener


class CannotListen(Exception):
    """The daemon's own port cannot be listened on; the message says why in one line."""


def cannot_listen(host: str, port: int, exc: OSError) -> CannotListen:
    if exc.errno == errno.EADDRINUSE:
        return CannotListen(f"port {port} is in use: another aic-vllm-proxy?")
    reason = exc.strerror or str(exc)
    return CannotListen(f"cannot listen on {host}:{port}: {reason}")


async def _serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    access_log: logging.Logger | None,
    keepalive_timeout: float,
    drain_timeout: float,
    listening: Callable[[int], None] | None = None,
) -> None:
    runner = make_runner(
        app,
        access_log=access_log,
        keepalive_timeout=keepalive_timeout,
        drain_timeout=drain_timeout,
        handle_signals=False,  # run() handles SIGINT and SIGTERM
    )
    await runner.setup()
    listener = Listener(
        runner, keepalive_timeout=keepalive_timeout, drain_timeout=drain_timeout, lean=access_log is None
    )
    published: connection.Published | None = None
    try:
        try:
            await listener.start(host, port)
        except OSError as exc:
            raise cannot_listen(host, port, exc) from None
        if listening is not None:
            listening(listener.port)
        published = connection.publish(app[SETTINGS], listener.port, app[KEYS])
        await asyncio.Event().wait()
    finally:
        if published is not None:
            published.withdraw()  # first: clients that read it now find no daemon leaving
        await listener.stop()  # the socket closes and requests in flight finish first
        # Models across nodes stop while their agents can still be told (aiohttp's cleanup
        # stops reading every connection, the agents' too).
        await nodes.release_agents(app)
        await runner.cleanup()  # then aiohttp's connections, then the app's cleanup (vLLM stops)


def run(
    app: web.Application,
    loop: asyncio.AbstractEventLoop,
    *,
    listening: Callable[[int], None] | None = None,
) -> None:
    """Serve ``app`` as its settings say (host, port, access log, client timeout, drain) until a
    signal, then shut down in order and close ``loop``. ``listening`` is called with the port
    once it listens (the one the kernel picked for port 0); :class:`CannotListen` is raised
    (after the cleanup) if it cannot, ``connection.CannotPublish`` if the connection file
    cannot be written."""
    settings = app[SETTINGS]
    main = loop.create_task(
        _serve(
            app,
            host=settings.host,
            port=settings.port,
            access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
            # A connection must bring a whole request head within this time (slow headers), and
            # an idle keep-alive connection is closed after it.
            keepalive_timeout=min(75.0, settings.client_timeout),
            drain_timeout=settings.drain_timeout,  # in-flight requests may finish on SIGTERM
            listening=listening,
        )
    )
    stopping: list[str] = []

    def on_signal(name: str) -> None:
        """The first SIGINT or SIGTERM stops the daemon in order (requests drain, vLLM stops);
        another one while it does is logged, not obeyed: cut short, the stop would leave vLLM
        to the watchdog and skip the drain (a batch job's shell may pass a signal on twice).
        SIGKILL still ends it at once."""
        if stopping:
            log.warning("%s: already stopping (since %s): requests drain, then vLLM stops", name, stopping[0])
            return
        stopping.append(name)
        log.info("%s: stopping", name)
        main.cancel()  # runs the runner's cleanup

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum.name)
    try:
        loop.run_until_complete(main)
    except asyncio.CancelledError:
        pass
    finally:
        main.cancel()  # runs the runner's cleanup (when it ended otherwise)
        loop.run_until_complete(asyncio.gather(main, return_exceptions=True))
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def make_front(runner: web.AppRunner, *, keepalive_timeout: float) -> Front:
    """The front door for an application made by ``web.app.create_app``, after ``runner.setup()``
    (``runner.server``, aiohttp's request handler factory, serves what is handed off). The
    listening socket is the :class:`Listener`'s."""
    app = runner.app
    server = runner.server
    assert server is not None, "call runner.setup() first"
    return Front(
        app[PASSTHROUGH].pipeline,
        app[KEYS],
        server,
        control.own_routes(),
        keepalive_timeout=keepalive_timeout,
    )
