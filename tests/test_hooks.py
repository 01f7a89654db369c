"""Lifecycle hooks through the real daemon: plugins found as entry points (see plugin_env.py),
vetoes, warm-up seen by the simulator, ordering, timeouts, sync hooks next to live traffic,
enable/disable, ``GET /plugins``, and docs/hooks.md kept in step with hooks.py.

Run ``python tests/test_hooks.py`` to rewrite the generated reference in docs/hooks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import FAST, async_wait_until, free_port, wait_until
from plugin_env import REPO, Dist, on_sys_path, plugin, top_level_modules, write_site

from aic_vllm_proxy.hooks import HookContext, Veto, hookimpl
from aic_vllm_proxy.hooks import specs as hooks

DOCS = REPO / "docs" / "hooks.md"
SPEC_A = f"org/model-a {FAST}"
SPEC_B = f"org/model-b {FAST}"


@pytest.fixture
def install(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``install("warmup", "site-hooks", ...)`` makes those plugins findable as entry points by
    proxies created in this process; returns the site folder (for a subprocess's PYTHONPATH)."""
    with contextlib.ExitStack() as stack:
        count = 0

        def do(*plugins: str | Dist) -> Path:
            nonlocal count
            count += 1
            dists = [plugin(p) if isinstance(p, str) else p for p in plugins]
            root = write_site(tmp_path / f"site-{count}", *dists)
            stack.enter_context(on_sys_path(root, top_level_modules(*dists)))
            return root

        yield do


async def chat(proxy: Any, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with proxy.session.post(f"{proxy.url}/v1/chat/completions", json=body) as resp:
        await resp.read()
        return int(resp.status)


def report(reports: list[dict[str, Any]], plugin_name: str, hook: str) -> dict[str, Any]:
    found = [r for r in reports if r["plugin"] == plugin_name and r["hook"] == hook]
    assert len(found) == 1, reports
    return found[0]


# --------------------------------------------------------------------------- veto


async def test_site_allow_list_refuses_and_the_old_model_keeps_running(
    install: Callable[..., Path], make_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    install("site-hooks")
    proxy = await make_proxy(plugin_settings={"site-hooks": {"allowed_models": ["org/model-a", "meta/*"]}})
    status, body = await proxy.switch(SPEC_A)
    assert status == 200, body
    pid = body["status"]["pid"]

    status, body = await proxy.switch(SPEC_B)
    assert status == 409
    error = body["error"]
    assert error["type"] == "switch_vetoed"
    assert error["message"] == (
        "Switch to org/model-b refused by plugin site-hooks: org/model-b is not on this site's "
        "allow-list (org/model-a, meta/*); ask the node's admins to add it to allowed_models in "
        f"[plugins.site-hooks]. {SPEC_A!r} is still loaded."
    )
    now = await proxy.status()
    assert (now["state"], now["model"], now["pid"]) == ("ready", "org/model-a", pid)
    assert await chat(proxy, "org/model-a") == 200

    # Environment variables override the config file's table, at the next hook call.
    monkeypatch.setenv("AIC_VLLM_PROXY_PLUGIN_SITE_HOOKS_ALLOWED_MODELS", "org/*")
    status, body = await proxy.switch(SPEC_B)
    assert status == 200, body


async def test_without_an_allow_list_every_model_is_allowed(
    install: Callable[..., Path], make_proxy: Any
) -> None:
    install("site-hooks")
    proxy = await make_proxy()
    status, body = await proxy.switch(f"anything/at-all {FAST}")
    assert status == 200, body
    assert body["hook_reports"] == [
        {
            "hook": "pre_switch",
            "plugin": "site-hooks",
            "ok": True,
            "message": "",
            "seconds": pytest.approx(0, abs=1),
        }
    ]


# ------------------------------------------------------------------------- warm-up


async def test_warmup_after_the_switch_is_seen_by_the_simulator(
    install: Callable[..., Path], make_proxy: Any
) -> None:
    install("warmup")
    proxy = await make_proxy()
    status, body = await proxy.switch(SPEC_A)
    assert status == 200, body
    warm = report(body["hook_reports"], "warmup", "post_switch")
    assert warm["ok"], warm
    assert re.fullmatch(r"warm-up: 1 request, \d+ ms", warm["message"])
    assert report((await proxy.status())["hook_reports"], "warmup", "post_switch") == warm
    log = Path(body["status"]["log_path"])
    assert await async_wait_until(
        lambda: '"POST /v1/chat/completions HTTP/1.1" 200 OK' in log.read_text(), 5
    ), log.read_text()[-2000:]

    async with proxy.session.get(f"{proxy.url}/plugins") as resp:
        listed = (await resp.json())["plugins"]
    assert listed == [
        {
            "name": "warmup",
            "version": "0.1.0",
            "hooks": ["post_switch"],
            "enabled": True,
            "source": "aic_vllm_proxy_warmup.plugin",
        }
    ]


# ------------------------------------------------------------------------ ordering


class Recorder:
    """Records every hook call; pre_switch and post_stop are plain functions, the rest async."""

    def __init__(self, name: str, calls: list[tuple[Any, ...]]) -> None:
        self.name = name
        self.calls = calls

    def note(self, ctx: HookContext) -> None:
        self.calls.append((self.name, ctx.event, ctx.old_spec, ctx.new_spec, ctx.pid, ctx.model))

    @hookimpl
    def pre_switch(self, ctx: HookContext) -> None:
        self.note(ctx)

    @hookimpl
    async def post_switch(self, ctx: HookContext) -> None:
        self.note(ctx)

    @hookimpl
    async def pre_stop(self, ctx: HookContext) -> None:
        self.note(ctx)

    @hookimpl
    def post_stop(self, ctx: HookContext) -> None:
        self.note(ctx)

    @hookimpl
    async def on_failure(self, ctx: HookContext) -> None:
        self.note(ctx)
        self.calls.append(("failure", ctx.exit_code, ctx.error, list(ctx.log_tail)))


class Early(Recorder):
    @hookimpl(tryfirst=True)
    def pre_switch(self, ctx: HookContext) -> None:
        self.note(ctx)


async def test_hooks_run_in_order_with_what_they_need_to_know(make_proxy: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    proxy = await make_proxy(
        extra_plugins=[
            ("early", Early("early", calls)),
            ("one", Recorder("one", calls)),
            ("two", Recorder("two", calls)),
        ]
    )
    assert (await proxy.switch(SPEC_A))[0] == 200
    pid_a = proxy.supervisor.launch.pgid
    assert (await proxy.switch(SPEC_B))[0] == 200
    pid_b = proxy.supervisor.launch.pgid
    async with proxy.session.post(f"{proxy.url}/stop") as resp:
        assert resp.status == 200
    events = [(name, event) for name, event, *_ in calls]
    # Later-registered plugins first (pluggy's order), tryfirst before them all.
    pre = [("early", "pre_switch"), ("two", "pre_switch"), ("one", "pre_switch")]
    later = [("two", "post_switch"), ("one", "post_switch"), ("early", "post_switch")]
    stop = [(p, e) for e in ("pre_stop", "post_stop") for p in ("two", "one", "early")]
    assert events == pre + later + pre + stop + later + stop
    by_event = {event: rest for name, event, *rest in calls if name == "one"}
    calls_one = [c for c in calls if c[0] == "one"]
    assert calls_one[0][1:] == ("pre_switch", None, SPEC_A, None, None)
    assert calls_one[1][1:] == ("post_switch", None, SPEC_A, pid_a, "org/model-a")
    assert calls_one[2][1:] == ("pre_switch", SPEC_A, SPEC_B, pid_a, "org/model-a")  # the running one
    assert calls_one[3][1:4] == ("pre_stop", SPEC_A, None) and calls_one[3][4] == pid_a
    assert calls_one[4][1:] == ("post_stop", SPEC_A, None, pid_a, "org/model-a")
    assert calls_one[5][1:] == ("post_switch", SPEC_A, SPEC_B, pid_b, "org/model-b")
    assert by_event["post_stop"][2] == pid_b

    # A start that fails: on_failure, with what happened.
    calls.clear()
    status, body = await proxy.switch(f"org/broken --sim-fail-during-load {FAST}")
    assert status == 500, body
    failure = next(c for c in calls if c[0] == "failure")
    assert failure[1] == 1 and "org/broken" in failure[2] and failure[3]
    assert ("one", "on_failure") in [(c[0], c[1]) for c in calls]


# ------------------------------------------------------------ timeouts and failures


class Troublemaker:
    """post_switch hooks that hang or crash, a pre_switch that can be made to hang."""

    def __init__(self) -> None:
        self.hang_pre_switch = False
        self.release = threading.Event()

    @hookimpl
    def pre_switch(self, ctx: HookContext) -> None:
        if self.hang_pre_switch:
            self.release.wait(10)  # a plain function: only its thread waits

    @hookimpl
    async def post_switch(self, ctx: HookContext) -> str:
        await asyncio.sleep(10)
        return "never"


class Broken:
    @hookimpl
    def post_switch(self, ctx: HookContext) -> None:
        raise RuntimeError("the dashboard is down")


async def test_timeouts_and_failures_are_reported_and_never_kill_a_model(make_proxy: Any) -> None:
    trouble = Troublemaker()
    proxy = await make_proxy(hook_timeout=0.5, extra_plugins=[("hangs", trouble), ("broken", Broken())])
    started = time.monotonic()
    status, body = await proxy.switch(SPEC_A)
    assert status == 200, body
    assert time.monotonic() - started < 8
    hung = report(body["hook_reports"], "hangs", "post_switch")
    assert (hung["ok"], hung["message"]) == (False, "timed out after 0.5 s")
    crashed = report(body["hook_reports"], "broken", "post_switch")
    assert (crashed["ok"], crashed["message"]) == (False, "RuntimeError: the dashboard is down")
    now = await proxy.status()
    assert now["state"] == "ready"
    assert {(r["plugin"], r["ok"]) for r in now["hook_reports"]} == {("hangs", False), ("broken", False)}
    assert await chat(proxy, "org/model-a") == 200

    # A pre_switch that times out stops the switch; the running model stays.
    trouble.hang_pre_switch = True
    try:
        status, body = await proxy.switch(SPEC_B)
    finally:
        trouble.release.set()
    assert status == 500
    assert body["error"]["type"] == "hook_failed"
    assert "the pre_switch hook of plugin hangs failed (timed out after 0.5 s)" in body["error"]["message"]
    now = await proxy.status()
    assert (now["state"], now["model"]) == ("ready", "org/model-a")


class Veto409:
    @hookimpl
    async def pre_switch(self, ctx: HookContext) -> None:
        raise Veto("maintenance window until 18:00")


async def test_a_veto_with_nothing_loaded(make_proxy: Any) -> None:
    proxy = await make_proxy(extra_plugins=[("maintenance", Veto409())])
    status, body = await proxy.switch(SPEC_A)
    assert status == 409
    assert body["error"]["message"] == (
        "Switch to org/model-a refused by plugin maintenance: maintenance window until 18:00. "
        "Nothing was loaded."
    )
    assert (await proxy.status())["state"] == "stopped"


# ----------------------------------------------------------- sync hooks vs traffic


class Blocking:
    """A plain post_switch that blocks (as a careless plugin would) until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    @hookimpl
    def post_switch(self, ctx: HookContext) -> str:
        self.entered.set()
        self.release.wait(15)
        return "released"


async def test_a_blocking_sync_hook_does_not_block_proxied_traffic(make_proxy: Any) -> None:
    blocking = Blocking()
    proxy = await make_proxy(extra_plugins=[("blocking", blocking)])
    switch = asyncio.ensure_future(proxy.switch(SPEC_A))
    try:
        assert await async_wait_until(blocking.entered.is_set, 20)
        started = time.monotonic()
        statuses = await asyncio.gather(*(chat(proxy, "org/model-a") for _ in range(5)))
        assert statuses == [200] * 5
        status = await proxy.status()
        assert time.monotonic() - started < 5
        assert status["switching"] and status["state"] == "ready"
        assert not switch.done()
    finally:
        blocking.release.set()
    status, body = await switch
    assert status == 200
    assert report(body["hook_reports"], "blocking", "post_switch")["message"] == "released"


# -------------------------------------------------------- the daemon as a process


def get_json(url: str) -> Any:
    async def fetch() -> Any:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return await resp.json()

    return asyncio.run(fetch())


def test_installed_plugins_are_listed_enabled_and_disabled(
    install: Callable[..., Path], spawn_proxy: Any, tmp_path: Path
) -> None:
    site = install("gpu-guard", "warmup", "notify", "site-hooks")
    env = {"PYTHONPATH": str(site)}
    daemon = spawn_proxy("--disable-plugin", "notify", env=env)
    listed = {p["name"]: p for p in get_json(f"{daemon.url}/plugins")["plugins"]}
    assert listed == {
        "gpu-guard": {
            "name": "gpu-guard",
            "version": "0.1.0",
            "hooks": ["post_stop", "post_switch", "pre_stop", "pre_switch"],
            "enabled": True,
            "source": "aic_vllm_proxy_gpu_guard.plugin:plugin",
        },
        "warmup": {
            "name": "warmup",
            "version": "0.1.0",
            "hooks": ["post_switch"],
            "enabled": True,
            "source": "aic_vllm_proxy_warmup.plugin",
        },
        "notify": {
            "name": "notify",
            "version": "0.1.0",
            "hooks": [],
            "enabled": False,
            "source": "aic_vllm_proxy_notify.plugin:plugin",
        },
        "site-hooks": {
            "name": "site-hooks",
            "version": "0.1.0",
            "hooks": ["pre_switch"],
            "enabled": True,
            "source": "site_hooks",
        },
    }

    # Only some, by option; by environment variable; an unknown name is an error.
    daemon = spawn_proxy(
        "--enable-plugin", "warmup,site-hooks", env={**env, "AIC_VLLM_PROXY_DISABLE_PLUGIN": "warmup"}
    )
    enabled = {p["name"]: p["enabled"] for p in get_json(f"{daemon.url}/plugins")["plugins"]}
    assert enabled == {"gpu-guard": False, "warmup": False, "notify": False, "site-hooks": True}
    port = str(free_port())
    failed = subprocess.run(
        [sys.executable, "-m", "aic_vllm_proxy", "serve", "--port", port, "--enable-plugin", "warmup,nope"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert failed.returncode != 0
    assert "plugins to enable are not installed: nope" in failed.stderr


def test_plugin_settings_from_the_config_file(
    install: Callable[..., Path], spawn_proxy: Any, tmp_path: Path
) -> None:
    site = install("gpu-guard", "site-hooks")
    gpus = tmp_path / "gpus.json"
    busy = {"gpus": [{"uuid": "GPU-1", "total_mib": 10240, "used_mib": 8192}]}
    idle = {"gpus": [{"uuid": "GPU-1", "total_mib": 10240, "used_mib": 0}]}
    gpus.write_text(json.dumps(idle))
    config = tmp_path / "proxy.toml"
    config.write_text(
        f"""
[plugins.gpu-guard]
nvml_source = "file:{gpus}"
free_wait = 0
release_timeout = 2

[plugins.site-hooks]
allowed_models = ["org/*"]
"""
    )
    daemon = spawn_proxy("--config", str(config), env={"PYTHONPATH": str(site), "CUDA_VISIBLE_DEVICES": "0"})

    def switch(spec: str) -> tuple[int, Any]:
        async def post() -> tuple[int, Any]:
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{daemon.url}/switch", json={"model_spec": spec}) as resp,
            ):
                return resp.status, await resp.json()

        return asyncio.run(post())

    status, body = switch(f"other/model {FAST}")
    assert status == 409 and "refused by plugin site-hooks" in body["error"]["message"]
    gpus.write_text(json.dumps(busy))
    status, body = switch(SPEC_A)
    assert status == 409
    assert body["error"]["message"].startswith(
        "Switch to org/model-a refused by plugin gpu-guard: not enough free GPU memory for org/model-a: "
        "GPU 0 (NVIDIA Fake GPU, GPU-1) has 2.0 GiB available, needs 9.0 GiB (--gpu-memory-utilization 0.9"
    )
    gpus.write_text(json.dumps(idle))
    status, body = switch(SPEC_A)
    assert status == 200, body
    guard = report(body["hook_reports"], "gpu-guard", "pre_switch")
    assert guard["message"] == "GPU 0: 10.0 GiB free, 9.0 GiB needed"
    assert wait_until(lambda: get_json(f"{daemon.url}/status")["state"] == "ready", 5)


# ---------------------------------------------------------------- docs in step


BEGIN, END = (
    "<!-- BEGIN hook reference: generated from aic_vllm_proxy/hooks/specs.py -->",
    "<!-- END hook reference -->",
)


def markdown(docstring: str) -> str:
    """One paragraph of Markdown from reStructuredText-ish docstring text."""
    text = " ".join(inspect.cleandoc(docstring).split())
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")


def reference() -> str:
    """The hook reference section of docs/hooks.md, from the docstrings and fields in hooks.py."""
    doc = hooks.__doc__ or ""
    table = doc[doc.index("=====") : doc.rindex("=====") + 5]
    after = markdown(doc[doc.rindex("=====") + 5 :])
    lines = [BEGIN, "", "### What an outcome means", "", "```text", table, "```", "", after, ""]
    for name in hooks.HOOK_NAMES:
        lines += [f"### `{name}(ctx)`", "", markdown(getattr(hooks.HookSpecs, name).__doc__ or ""), ""]
    lines += ["### `HookContext`", "", markdown(HookContext.__doc__ or ""), ""]
    lines += ["| field | type | meaning |", "| --- | --- | --- |"]
    source = inspect.getsource(HookContext)
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
        elif ":" in text and not text.startswith(("class", '"""', "@")) and pending:
            comments[text.split(":")[0]] = markdown(" ".join(pending))
            pending = []
    shared = ""
    for name, field in HookContext.__dataclass_fields__.items():
        meaning = comments.get(name, shared)
        shared = meaning
        kind = str(field.type).replace("|", "\\|")
        lines.append(f"| `{name}` | `{kind}` | {meaning} |")
    lines += ["", END]
    return "\n".join(lines)


def test_docs_reference_is_in_step_with_hooks_py() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert BEGIN in text and END in text
    current = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert current == reference(), "docs/hooks.md is out of date: run `python tests/test_hooks.py`"


def _write_docs() -> None:
    text = DOCS.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(head + reference() + tail, encoding="utf-8")
    print(f"rewrote the reference in {DOCS}")


if __name__ == "__main__":
    _write_docs()
