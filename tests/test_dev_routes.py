"""vLLM's development routes (``/sleep``, ``/collective_rpc``, ...: what ``VLLM_SERVER_DEV_MODE=1``
adds, which an instance with sleep mode runs with) are never forwarded from a client, admin keys
included: the proxy answers 404 (relay/dev_routes.py), the same bytes on both HTTP paths, and
nothing of the request reaches vLLM, however the path is spelled (percent-encoded, trailing
slashes, under a ``--root-path`` prefix).

Real proxies in this process in front of the simulator, on real sockets; raw sockets for the
spellings an HTTP client would normalise. That nothing reached vLLM is read from the simulator's
own access log and from its ``X-Simulator-Instance`` header (on every answer it gives)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import FAST, async_wait_until, raw_exchange

from aic_vllm_proxy.relay.dev_routes import DEV_ROUTES, dev_route
from aic_vllm_proxy.simulator.server import INSTANCE_HEADER

ADMIN, USER = "admin-key-0123", "user-key-0123"
KEYS = {"admin_keys": (ADMIN,), "api_keys": (USER,)}
PATHS = ("front", "aiohttp")
NAMES = sorted(route[1:] for route in DEV_ROUTES)

#: Request targets vLLM would serve with a development route, spelled as a client may spell them.
SPELLINGS = [
    "/sleep?level=1&mode=wait",
    "/wake_up?tags=weights&tags=kv_cache",
    "/collective_rpc",
    "/%73leep",  # uvicorn percent-decodes the path: /sleep
    "/%63ollective%5Frpc",
    "/%72%65%73%65%74%5f%70%72%65%66%69%78%5f%63%61%63%68%65",  # /reset_prefix_cache
    "/sleep/",  # Starlette's redirect_slashes: 307 to /sleep
    "/is_sleeping//?x=1",
    "/sleep%2F",
    "/api/sleep",  # vLLM with --root-path /api serves /sleep there too
    "/a/b/collective_rpc",
    "/v1/../reset_prefix_cache",
]


@pytest.mark.realvllm
def test_the_list_is_vllms_own() -> None:
    """The routes vLLM 0.32 adds only in dev mode (vllm/entrypoints/launchers/api_server/routers.py),
    read from the installed vLLM when there is one (the real-vLLM tier's venv)."""
    support = Path(__file__).parent / "realvllm" / "realvllm_support.py"
    spec = importlib.util.spec_from_file_location("realvllm_support", support)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    if module.VLLM is None:
        pytest.skip(module.INSTALL_HINT)
    script = (
        "from fastapi import FastAPI\n"
        "from vllm.entrypoints.serve import register_vllm_dev_api_routers\n"
        "from vllm.entrypoints.rl.factories import register_rl_api_routers\n"
        "app = FastAPI()\n"
        "before = len(app.routes)\n"
        "register_vllm_dev_api_routers(app)\n"
        "register_rl_api_routers(app)\n"
        "import json; print(json.dumps([route.path for route in app.routes[before:]]))\n"
    )
    done = subprocess.run(
        [str(module.vllm_python(module.VLLM)), "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    vllms = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(vllms) == sorted(DEV_ROUTES)


def test_which_paths_are_development_routes() -> None:
    for route in DEV_ROUTES:
        encoded = "".join(f"%{ord(c):02x}" for c in route[1:])
        for path in (route, route + "/", route + "///", "/" + encoded, "/prefix" + route, route + "%2f"):
            assert dev_route(path.encode()), path
    for path in (
        "/",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/load",
        "/metrics",
        "/sleeping",
        "/Sleep",  # vLLM's routes are case-sensitive: a 404 of vLLM's own
        "/sleep.json",
        "/sleep/x",
        "/%2573leep",  # decoded once, as uvicorn does: /%73leep, no route of vLLM's
        "/sleep%3Flevel=1",  # an encoded '?' is part of the path: /sleep?level=1, no route
        "/v1/models/sleepy",
    ):
        assert not dev_route(path.encode()), path


# ------------------------------------------------------------------------------ end to end


async def loaded(make_proxy: Any, path: str, keys: bool) -> Any:
    """A proxy on one HTTP path (behind the front door, or aiohttp alone) with the simulator
    ready; its session sends no key."""
    proxy = await make_proxy(access_log=path == "aiohttp", **(KEYS if keys else {}))
    if keys:
        proxy.session.headers["Authorization"] = f"Bearer {ADMIN}"
    status, body = await proxy.switch(f"m {FAST}")
    assert status == 200, body
    proxy.session.headers.pop("Authorization", None)
    assert (proxy.front is None) == (path == "aiohttp")
    return proxy


async def assert_nothing_forwarded(proxy: Any, key: str | None) -> None:
    """No request for a development route reached the simulator: its access log (vLLM's log
    file) has none, up to a request forwarded after them all (which must be there). The model is
    started without sleep mode, so the daemon itself calls none of them either."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with proxy.session.get(f"{proxy.url}/version?after=dev-routes", headers=headers) as resp:
        assert resp.status == 200 and INSTANCE_HEADER in resp.headers, resp.headers
    log = proxy.supervisor.current_log()
    assert log is not None

    def marker_logged() -> bool:
        return "/version?after=dev-routes" in log.read_text(errors="replace")

    assert await async_wait_until(marker_logged, 20), log.read_text(errors="replace")[-3000:]
    access = [line for line in log.read_text(errors="replace").splitlines() if ' - "' in line]
    reached = [line for line in access if any(name in line for name in NAMES)]
    assert not reached, reached


def assert_refused(status: int, headers: Any, body: Any, what: Any) -> None:
    assert status == 404, (what, status, body)
    names = {name.lower() for name in headers}
    assert INSTANCE_HEADER.lower() not in names, (what, headers)  # the simulator did not answer
    assert isinstance(body, dict) and set(body) == {"error"}, (what, body)
    error = body["error"]
    assert error["code"] == 404 and error["type"] == "not_found_error", (what, body)
    assert "not available through this proxy" in error["message"], (what, body)


@pytest.mark.parametrize("keys", [False, True], ids=["open", "keys"])
@pytest.mark.parametrize("path", PATHS)
async def test_every_development_route_is_refused(make_proxy: Any, path: str, keys: bool) -> None:
    proxy = await loaded(make_proxy, path, keys)
    # A new connection for each request: the front door hands a connection to aiohttp for good
    # (the /switch above was aiohttp's), so a reused one would never meet it.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        # Without keys anyone; with keys a user key and an admin key alike.
        for key in (ADMIN, USER) if keys else (None,):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for name in NAMES:
                for method in ("POST", "GET", "PUT", "DELETE", "OPTIONS"):
                    async with session.request(
                        method, f"{proxy.url}/{name}?level=1", headers=headers, json={"method": "x"}
                    ) as resp:
                        body = json.loads(await resp.read())
                        assert_refused(resp.status, resp.headers, body, (method, name, key))
            async with session.head(f"{proxy.url}/sleep", headers=headers) as resp:
                assert resp.status == 404 and INSTANCE_HEADER not in resp.headers, resp.headers
        if keys:
            # With keys and no key: a 401, as for any path forwarded to vLLM (the key comes first).
            for name in NAMES:
                async with session.post(f"{proxy.url}/{name}") as resp:
                    assert resp.status == 401 and INSTANCE_HEADER not in resp.headers, (name, resp.status)
    if proxy.front is not None:
        assert proxy.front.served == 0  # all of them were aiohttp's to answer
    await assert_nothing_forwarded(proxy, USER if keys else None)


def _without_date(data: bytes) -> bytes:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.mark.parametrize("keys", [False, True], ids=["open", "keys"])
async def test_every_spelling_gets_the_same_404_on_both_paths(make_proxy: Any, keys: bool) -> None:
    """Raw targets (no client normalises them), each sent to a proxy behind the front door and to
    one with aiohttp alone: the same bytes back (but the date), a 404 of the proxy's."""
    front = await loaded(make_proxy, "front", keys)
    plain = await loaded(make_proxy, "aiohttp", keys)
    key = f"Authorization: Bearer {ADMIN}\r\n".encode() if keys else b""
    for target in SPELLINGS:
        for method in (b"POST", b"GET"):
            request = (
                method + b" " + target.encode() + b" HTTP/1.1\r\nHost: x\r\n" + key
                + b"X-Request-Id: same-bytes-1\r\n"  # the same bytes: else each answer has its own id
                + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            )  # fmt: skip
            answers = [await raw_exchange(proxy.settings.port, request, wait=20) for proxy in (front, plain)]
            for answer in answers:
                head, _, body = answer.data.partition(b"\r\n\r\n")
                headers = [line.split(b":")[0].decode() for line in head.split(b"\r\n")[1:]]
                assert_refused(answer.status or 0, headers, json.loads(body), (method, target))
                assert b"\r\nX-Request-Id: same-bytes-1\r\n" in head + b"\r\n", (method, target)
            assert _without_date(answers[0].data) == _without_date(answers[1].data), (method, target)
    assert front.front is not None and front.front.served == 0
    for proxy in (front, plain):
        await assert_nothing_forwarded(proxy, USER if keys else None)


async def test_other_paths_still_reach_vllm(make_proxy: Any) -> None:
    """Paths that only look like development routes are vLLM's to answer (its own 404 here)."""
    proxy = await make_proxy()
    status, body = await proxy.switch(f"m {FAST}")
    assert status == 200, body
    for target in (b"/sleeping", b"/%2573leep", b"/sleep%3Flevel=1", b"/Sleep"):
        answer = await raw_exchange(
            proxy.settings.port,
            b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            wait=20,
        )
        assert answer.status == 404, (target, answer.data)
        assert INSTANCE_HEADER.lower().encode() in answer.data.lower(), (target, answer.data)  # vLLM's
