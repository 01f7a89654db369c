"""The status page (``GET /ui``, docs/ui.md) in a real browser: Debian's Chromium, driven by
Playwright for Python (``executable_path``: no browser is downloaded), against the proxy with
the simulator on a real socket.

- ``/ui`` and its files are open (no key), served by aiohttp on both HTTP paths (the front door
  must not forward them to vLLM), only the known files;
- the page shows a model loading, then ready, as it happens (live: ``GET /events``);
- with the admin key its buttons switch, load, unload and stop models, a refused action says
  why, and its live log grows; a failed switch shows its error and the log's root cause; the
  spec field offers the catalogue;
- a wrong key, no key on a daemon with keys, a user key: a clear message, or no admin buttons;
- the key is kept in sessionStorage only;
- after a dropped /events stream it reconnects with Last-Event-ID;
- a model across nodes: the Nodes section (agents, their ranks, a rank's log), ranks per instance;
- paths that read as the page's but are routed on to vLLM need a key (relay/auth.authorize).

Without /usr/bin/chromium the browser tests skip, unless ``CI`` is set: then they fail (CI
installs it, .ci/run).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import CHAT, chat_request, raw_exchange
from test_nodes import agents  # noqa: F401 (a fixture: agents on this machine)

from aic_vllm_proxy.relay.auth import Role, required_role

CHROMIUM = "/usr/bin/chromium"
ADMIN, USER = "admin-secret-1", "user-secret-1"
#: Playwright's deadlines (ms): generous, the machine may be loaded.
DEADLINE = 60_000
#: A model that takes a few seconds to load, so "starting" can be seen.
SLOW = "org/slow --sim-import-delay 0.1 --sim-load-delay 4"
QUICK_A = "org/a --sim-import-delay 0 --sim-load-delay 0"
QUICK_B = "org/b --sim-import-delay 0 --sim-load-delay 0"
QUICK_Z = "org/z --sim-import-delay 0 --sim-load-delay 0"


def test_required_role_of_the_page() -> None:
    for path in ("/ui", "/ui/", "/ui/app.js", "/ui/style.css", "/ui/index.html", "/ui/nope"):
        assert required_role(path) is None, path
    # Only the page's own paths.
    assert required_role("/uix") is Role.USER
    assert required_role("/v1/ui") is Role.USER


@pytest.mark.parametrize("access_log", [False, True], ids=["front-door", "aiohttp"])
@pytest.mark.parametrize("keys", [False, True], ids=["open", "keys"])
async def test_page_files_are_served_open(make_proxy: Any, access_log: bool, keys: bool) -> None:
    """Raw requests without a key: the page and its files, on both HTTP paths; nothing else."""
    extra: dict[str, Any] = {"admin_keys": (ADMIN,)} if keys else {}
    proxy = await make_proxy(access_log=access_log, **extra)
    port = proxy.settings.port

    async def get(target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        request = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        reply = await raw_exchange(port, request, wait=20)
        head, _, body = reply.data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    status, headers, body = await get("/ui")
    assert status == 200, body
    assert headers["content-type"].startswith("text/html") and b'src="ui/app.js"' in body
    assert "default-src 'self'" in headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, headers, body = await get(f"/ui/{name}")
        assert status == 200 and headers["content-type"].startswith(kind), body
    for target in ("/ui/nope.js", "/ui/../pyproject.toml", "/ui/ui.py", "/ui/%2e%2e/ui.py"):
        status, headers, body = await get(target)
        assert status == 404 and b"status page has no file" in body, (target, body)
    status, headers, _ = await get("/ui", "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    if keys:  # the data stays behind the key
        assert (await get("/status"))[0] == 401
        # Paths that read as open ones but are routed on to vLLM need a key like the rest.
        for target in ("/ui%2Fapp.js", "/ui%2F..%2Fv1%2Fmodels", "/proxy%2Fhealth"):
            status, _, body = await get(target)
            assert status == 401 and b"Missing or invalid API key" in body, (target, body)
        assert (await get("/%75i/app.js"))[0] == 200  # routed to the page: served


# ------------------------------------------------------------------------------------ browser


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    """A fresh headless Chromium page; fails the test on any script error in it."""
    if not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} is missing (apt-get install chromium): the browser tests cannot run"
        if os.environ.get("CI"):
            pytest.fail(reason + ", and CI must run them")
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    errors: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            page.set_default_timeout(DEADLINE)
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page
        finally:
            await browser.close()
    assert not errors, errors


async def use_key(page: Any, key: str) -> None:
    await page.fill("#key", key)
    await page.click("#key-form button[type=submit]")


def row(page: Any, name: str) -> Any:
    return page.locator(f'#instances tr[data-name="{name}"]')


@pytest.mark.slow
async def test_page_shows_a_model_loading_then_ready_live(make_proxy: Any, page: Any) -> None:
    from playwright.async_api import expect

    proxy = await make_proxy()
    await page.goto(proxy.url + "/ui")
    await expect(page.locator("#live")).to_have_text("live", timeout=DEADLINE)
    await expect(page.locator("#no-instances")).to_be_visible()
    # Started by someone else: the page learns it from /events, nobody reloads it.
    async with proxy.session.post(proxy.url + "/switch", json={"model_spec": SLOW, "wait": False}) as resp:
        assert resp.status == 202
    slow = row(page, "org/slow")
    await expect(slow.locator(".state")).to_have_text(re.compile("starting"), timeout=DEADLINE)
    await expect(page.locator("#sw-target")).to_have_text(SLOW)
    await expect(slow.locator(".state")).to_have_text("ready", timeout=DEADLINE)
    await expect(page.locator("#sw-target")).to_have_text("-")
    await expect(page.locator("#events")).to_contain_text("state", timeout=DEADLINE)
    await expect(page.locator("#events li.event-load")).to_contain_text("org/slow")
    # Uptime counts in the page; no buttons without a key.
    uptime = slow.locator("[data-since]")
    await expect(uptime).to_have_text(re.compile(r"^\d+s$"))
    await expect(uptime).not_to_have_text(await uptime.text_content() or "")  # it ticks
    assert not await page.locator("#controls").is_visible()
    assert await slow.get_by_role("button").count() == 0


@pytest.mark.slow
async def test_buttons_switch_models_and_the_live_log_grows(make_proxy: Any, page: Any) -> None:
    from playwright.async_api import expect

    proxy = await make_proxy(admin_keys=(ADMIN,))
    await page.goto(proxy.url + "/ui")
    await use_key(page, ADMIN)
    await expect(page.locator("#role")).to_have_text("admin")
    # The key is in sessionStorage only: not in localStorage, a cookie or the URL.
    kept = await page.evaluate(
        "() => [sessionStorage.getItem('aic-vllm-proxy-key'), localStorage.length,"
        " document.cookie, location.href]"
    )
    assert kept == [ADMIN, 0, "", proxy.url + "/ui"]

    # A refused action says why, and stays said.
    await page.fill("#spec", "org/z --trust-remote-code")
    await page.click("#controls button[data-action=switch]")
    message = page.locator("#message")
    refused = "switch to org/z --trust-remote-code: This key may not do that"
    await expect(message).to_contain_text(refused)
    # Still there after the page read /status again (org/z ready: a later read).
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with proxy.session.post(proxy.url + "/switch", json={"model_spec": QUICK_Z}, headers=auth) as resp:
        assert resp.status == 200
    await expect(row(page, "org/z").locator(".state")).to_have_text("ready", timeout=DEADLINE)
    await expect(message).to_contain_text(refused)

    await page.fill("#spec", QUICK_A)
    await page.click("#controls button[data-action=switch]")
    await expect(message).to_contain_text(f"switch to {QUICK_A}: accepted (launching {QUICK_A}")
    await expect(row(page, "org/a").locator(".state")).to_have_text("ready", timeout=DEADLINE)
    await page.fill("#spec", QUICK_B)
    await page.click("#controls button[data-action=switch]")
    await expect(row(page, "org/b").locator(".state")).to_have_text("ready", timeout=DEADLINE)
    await expect(row(page, "org/a")).to_have_count(0, timeout=DEADLINE)
    status = proxy.supervisor.status()
    assert status.model_spec is not None and status.model_spec.startswith("org/b")

    # The live log of org/b: each request the simulator serves adds an access line.
    await row(page, "org/b").get_by_role("button", name="Log").click()
    log = page.locator("#log")
    await expect(log).to_contain_text("Application startup complete", timeout=DEADLINE)
    for count in (1, 2):
        body = chat_request("org/b", stream=False)
        async with proxy.session.post(proxy.url + CHAT, json=body, headers=auth) as resp:
            assert resp.status == 200
        await expect(log).to_contain_text(re.compile(f"(POST /v1/chat/completions.*){{{count}}}", re.S))

    await page.click("#controls button[data-action=stop]")
    await expect(row(page, "org/b").locator(".state")).to_have_text("stopped", timeout=DEADLINE)
    await expect(log).to_contain_text("the log ended", timeout=DEADLINE)

    # Load beside the (stopped) slot, then unload it.
    await page.fill("#spec", QUICK_A)
    await page.click("#controls button[data-action=load]")
    await expect(row(page, "org/a").locator(".state")).to_have_text("ready", timeout=DEADLINE)
    await row(page, "org/a").get_by_role("button", name="Unload").click()
    await expect(message).to_contain_text("org/a is unloaded", timeout=DEADLINE)
    await expect(row(page, "org/a").locator(".state")).to_have_text("stopped", timeout=DEADLINE)
    assert [item.state.value for item in proxy.supervisor.instance_statuses() if item.name == "org/a"] == [
        "stopped"
    ]


async def test_a_wrong_key_says_so(make_proxy: Any, page: Any) -> None:
    from playwright.async_api import expect

    proxy = await make_proxy(admin_keys=(ADMIN,))
    await page.goto(proxy.url + "/ui")
    # First the admin key, with a model that failed to load: its row, error, log tail and events.
    await use_key(page, ADMIN)
    await page.fill("#spec", "org/broken --sim-import-delay 0 --sim-load-delay 0 --sim-fail-during-load")
    await page.click("#controls button[data-action=switch]")
    await expect(page.locator("#sw-tail")).to_be_visible(timeout=DEADLINE)
    await expect(page.locator("#events li")).not_to_have_count(0)
    await expect(row(page, "org/broken")).to_have_count(1)

    await use_key(page, "not-a-key")
    message = page.locator("#message")
    await expect(message).to_contain_text("The key was refused")
    await expect(message).to_contain_text("this proxy does not accept the key that was sent")
    assert not await page.locator("#controls").is_visible()
    # Nothing read with the admin key stays on the page.
    await expect(page.locator("#instances tbody tr")).to_have_count(0)
    await expect(page.locator("#events li")).to_have_count(0)
    await expect(page.locator("#sw-tail")).to_be_hidden()
    await expect(page.locator("#sw-error")).to_have_text("-")
    assert await page.locator("#catalog option").count() == 0


async def test_no_key_on_a_daemon_with_keys_asks_for_one(make_proxy: Any, page: Any) -> None:
    from playwright.async_api import expect

    proxy = await make_proxy(admin_keys=(ADMIN,), api_keys=(USER,))
    await page.goto(proxy.url + "/ui")
    await expect(page.locator("#message")).to_contain_text("This daemon needs a key: enter an API key above.")
    await expect(page.locator("#live")).to_have_text("no events: key needed")
    assert not await page.locator("#controls").is_visible()
    assert not await page.locator("#no-instances").is_visible()  # it does not know: it says nothing


async def test_a_user_key_sees_the_fleet_without_buttons(make_proxy: Any, page: Any) -> None:
    from playwright.async_api import expect

    proxy = await make_proxy(admin_keys=(ADMIN,), api_keys=(USER,))
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with proxy.session.post(proxy.url + "/switch", json={"model_spec": QUICK_A}, headers=auth) as resp:
        assert resp.status == 200
    await page.goto(proxy.url + "/ui")
    await use_key(page, USER)
    await expect(page.locator("#role")).to_have_text("read-only key")
    await expect(row(page, "org/a").locator(".state")).to_have_text("ready")
    await expect(page.locator("#live")).to_have_text("live", timeout=DEADLINE)
    assert not await page.locator("#controls").is_visible()
    assert await row(page, "org/a").get_by_role("button").count() == 0
    assert not await page.locator("#message").is_visible()


async def test_a_failed_switch_shows_its_error_and_log_tail(make_proxy: Any, page: Any) -> None:
    from playwright.async_api import expect

    catalogue = {"tiny": {"model": "org/tiny"}, "small": {"model": "org/small"}}
    proxy = await make_proxy(admin_keys=(ADMIN,), models=catalogue)
    await page.goto(proxy.url + "/ui")
    await use_key(page, ADMIN)
    await expect(page.locator("#role")).to_have_text("admin")
    # The spec field offers the catalogue's entries (GET /models/catalog).
    options = page.locator("#catalog option")
    await expect(options).to_have_count(2)
    assert {await option.get_attribute("value") for option in await options.all()} == {"tiny", "small"}
    await page.fill("#spec", "org/broken --sim-import-delay 0 --sim-load-delay 0 --sim-fail-during-load")
    await page.click("#controls button[data-action=switch]")
    await expect(page.locator("#sw-error")).to_contain_text("org/broken", timeout=DEADLINE)
    tail = page.locator("#sw-tail")
    await expect(tail).to_be_visible()
    await expect(tail).to_contain_text("OutOfMemoryError")  # the simulated root cause, first
    await expect(page.locator("#events li.event-failure")).to_have_count(1)


async def test_the_page_reconnects_to_events_with_the_last_id(make_proxy: Any, page: Any) -> None:
    """A dropped /events stream: the page connects again, sending the id of the last event it
    saw as Last-Event-ID (the first stream here is a canned one that ends after one event)."""
    from playwright.async_api import expect

    proxy = await make_proxy()
    asked: list[str | None] = []
    again = asyncio.Event()
    hello = {"id": 7, "type": "hello", "time": "2026-12-04T00:00:00+00:00", "model": None, "last_id": 7}

    async def events(route: Any) -> None:
        asked.append(route.request.headers.get("last-event-id"))
        if len(asked) == 1:
            body = f": hi\n\nid: 7\ndata: {json.dumps(hello)}\n\n"
            await route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
        else:
            again.set()
            await route.continue_()

    await page.route("**/events", events)
    await page.goto(proxy.url + "/ui")
    await asyncio.wait_for(again.wait(), DEADLINE / 1000)
    assert asked[:2] == [None, "7"]
    await expect(page.locator("#live")).to_have_text("live")
    # The real stream now: a switch shows up live.
    async with proxy.session.post(proxy.url + "/switch", json={"model_spec": QUICK_A, "wait": False}) as resp:
        assert resp.status == 202
    await expect(row(page, "org/a").locator(".state")).to_have_text("ready", timeout=DEADLINE)


@pytest.mark.slow
async def test_the_nodes_of_a_model_across_nodes_and_a_ranks_log(
    make_proxy: Any,
    page: Any,
    agents: Any,  # noqa: F811 (test_nodes' fixture)
) -> None:
    """An agent joins, a 2-node model loads: the Nodes section lists the agent and its rank,
    the instance its rank; the rank's Log button follows that rank's log (through the head)."""
    from playwright.async_api import expect

    proxy = await make_proxy(admin_keys=(ADMIN,), node_wait=30.0)
    await page.goto(proxy.url + "/ui")
    await use_key(page, ADMIN)
    await expect(page.locator("#role")).to_have_text("admin")
    assert not await page.locator("#nodes").is_visible()  # no agent yet: no section
    agent = agents("node-a", "--api-key", ADMIN, head=proxy.url)
    node = page.locator('#nodes tr[data-node="node-a"]')
    await expect(node.locator(".state").first).to_have_text("connected", timeout=DEADLINE)
    await expect(node.locator("td.ranks")).to_have_text("-")  # no rank yet
    auth = {"Authorization": f"Bearer {ADMIN}"}
    spec = "org/wide --sim-import-delay 0 --sim-load-delay 0 -tp 2 --nnodes 2"
    async with proxy.session.post(proxy.url + "/switch", json={"model_spec": spec}, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    ranked = row(page, "org/wide").locator(".rank")
    await expect(ranked).to_have_text("rank 1 on node-a: running", timeout=DEADLINE)
    rank = node.locator(".rank")
    await expect(rank).to_contain_text(re.compile(r"org/wide #1 running pid \d+"))
    await rank.get_by_role("button", name="Log").click()
    await expect(page.locator("#log-name")).to_have_text("org/wide, rank 1")
    await expect(page.locator("#log")).to_contain_text("node_rank 1", timeout=DEADLINE)  # the headless rank's

    agent.process.send_signal(signal.SIGTERM)  # it stops its rank and leaves
    await asyncio.to_thread(agent.process.wait, 60)
    await expect(node.locator(".state").first).to_have_text("left", timeout=DEADLINE)
    await expect(row(page, "org/wide").locator(".state").first).to_contain_text("failed", timeout=DEADLINE)
