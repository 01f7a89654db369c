"""Runs the daemon's application until SIGINT or SIGTERM: aiohttp's ``AppRunner`` behind the
front door (``front.py``), like ``web.run_app`` but with that site.

On a signal: the listening socket closes, idle connections close, requests in flight get up to
``drain_timeout`` seconds, then the application's cleanup runs (vLLM is stopped and its whole
process tree is gone before the process exits).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from aic_vllm_proxy.app import SERVER_OPTIONS
from aic_vllm_proxy.front import front_site

log = logging.getLogger(__name__)


def make_runner(
    app: web.Application,
    *,
    access_log: logging.Logger | None,
    keepalive_timeout: float,
    drain_timeout: float,
    handle_signals: bool = False,
) -> web.AppRunner:
    return web.AppRunner(
        app,
        handle_signals=handle_signals,
        access_log=access_log,
        keepalive_timeout=keepalive_timeout,
        shutdown_timeout=drain_timeout,
        **SERVER_OPTIONS,
    )


async def start_site(
    runner: web.AppRunner,
    host: str,
    port: int,
    *,
    keepalive_timeout: float,
    drain_timeout: float,
    front: bool = True,
    backlog: int = 1024,
) -> web.TCPSite:
    """Listen on host:port. With an access log the front door is left out, so that every
    request goes through aiohttp and is logged."""
    site: web.TCPSite
    if front:
        site = front_site(
            runner,
            host,
            port,
            keepalive_timeout=keepalive_timeout,
            drain_timeout=drain_timeout,
            backlog=backlog,
        )
    else:
        site = web.TCPSite(runner, host, port, backlog=backlog)
    await site.start()
    return site


async def _serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    access_log: logging.Logger | None,
    keepalive_timeout: float,
    drain_timeout: float,
) -> None:
    runner = make_runner(
        app,
        access_log=access_log,
        keepalive_timeout=keepalive_timeout,
        drain_timeout=drain_timeout,
        handle_signals=True,  # SIGINT/SIGTERM raise GracefulExit out of the loop
    )
    await runner.setup()
    try:
        await start_site(
            runner,
            host,
            port,
            keepalive_timeout=keepalive_timeout,
            drain_timeout=drain_timeout,
            front=access_log is None,
        )
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(
    app: web.Application,
    loop: asyncio.AbstractEventLoop,
    *,
    host: str,
    port: int,
    access_log: logging.Logger | None,
    keepalive_timeout: float,
    drain_timeout: float,
) -> None:
    """Serve until a signal, then shut down in order and close ``loop``."""
    main = loop.create_task(
        _serve(
            app,
            host=host,
            port=port,
            access_log=access_log,
            keepalive_timeout=keepalive_timeout,
            drain_timeout=drain_timeout,
        )
    )
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()  # runs the runner's cleanup
        loop.run_until_complete(asyncio.gather(main, return_exceptions=True))
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
