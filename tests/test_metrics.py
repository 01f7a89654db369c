"""The proxy's own Prometheus metrics (issue 15, docs/metrics.md): ``GET /proxy/metrics`` on a
real socket, with the simulator as vLLM, scraped after what a site would do: requests on both
HTTP paths (the front door, and aiohttp's with ``--access-log``), loads, an eviction, a drain,
unloads; who may scrape; label values a client cannot blow up; vLLM's own ``/metrics`` per
instance with ``?model=``; the Grafana dashboard and alert rules in docs/ parse and use only
metrics that exist."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import yaml
from helpers import CHAT, FAST, QUICK, chat_request
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from aic_vllm_proxy.hooks import HookContext, hookimpl
from aic_vllm_proxy.simulator.server import INSTANCE_HEADER, parse_instance_header

DOCS = Path(__file__).resolve().parent.parent / "docs"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series is absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(proxy: Any, key: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with proxy.session.get(f"{proxy.url}/proxy/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST  # the text format
        return parse(await resp.text())


async def chat(proxy: Any, model: str, *, stream: bool = False, key: str | None = None, **extra: Any) -> int:
    """A chat completion on a connection of its own (one the front door may serve: a
    connection it handed to aiohttp stays aiohttp's)."""
    body = chat_request(model, stream=stream, **extra)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.post(proxy.url + CHAT, json=body, headers=headers) as resp,
    ):
        await resp.read()
        return resp.status


@pytest.mark.parametrize("access_log", [False, True], ids=["front-door", "aiohttp"])
async def test_proxied_requests_are_counted_on_both_http_paths(make_proxy: Any, access_log: bool) -> None:
    """Requests by model, route and status class, their durations and times to first byte, the
    load that made the model ready, its state and its requests in flight (open: no keys)."""
    proxy = await make_proxy(access_log=access_log)
    status, _ = await proxy.switch(f"org/model-a {QUICK}")
    assert status == 200
    name = (await proxy.status())["instances"][0]["name"]
    assert name == "org/model-a"
    served_before = proxy.front.served if proxy.front else 0
    assert await chat(proxy, "org/model-a") == 200
    assert await chat(proxy, "org/model-a", stream=True) == 200
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(f"{proxy.url}/no/such/path?x=1") as resp,
    ):
        assert resp.status == 404  # vLLM's 404, under the fixed label "other"
    if proxy.front is not None:
        assert proxy.front.served - served_before == 3  # the front door served them
    samples = await scrape(proxy)
    labels = {"model": name, "route": CHAT}
    assert value(samples, "aic_proxy_requests_total", status="2xx", **labels) == 2
    assert value(samples, "aic_proxy_requests_total", model=name, route="other", status="4xx") == 1
    assert value(samples, "aic_proxy_request_duration_seconds_count", **labels) == 2
    assert value(samples, "aic_proxy_time_to_first_byte_seconds_count", **labels) == 2
    assert value(samples, "aic_proxy_request_duration_seconds_bucket", le="600.0", **labels) == 2
    assert (
        0
        < value(samples, "aic_proxy_time_to_first_byte_seconds_sum", **labels)
        <= value(samples, "aic_proxy_request_duration_seconds_sum", **labels)
    )
    assert value(samples, "aic_proxy_requests_in_flight", model=name) == 0
    assert value(samples, "aic_proxy_requests_waiting", model=name) == 0
    assert value(samples, "aic_proxy_instance_state", model=name, state="ready") == 1
    assert value(samples, "aic_proxy_instance_state", model=name, state="starting") == 0
    assert value(samples, "aic_proxy_loads_total", model=name, reason="start") == 1
    assert value(samples, "aic_proxy_load_duration_seconds_count", model=name, reason="start") == 1


async def test_a_client_that_leaves_before_the_answer_is_counted_as_cancelled(make_proxy: Any) -> None:
    """No answer went out: the status label is ``cancelled``, with its duration and no time to
    first byte."""
    proxy = await make_proxy()
    status, _ = await proxy.switch(f"org/model-a {QUICK} --sim-ttft 5")
    assert status == 200
    asking = asyncio.ensure_future(chat(proxy, "org/model-a"))
    deadline = asyncio.get_running_loop().time() + 30
    while proxy.supervisor.slot.in_flight == 0:  # admitted, waiting for vLLM's answer
        assert asyncio.get_running_loop().time() < deadline and not asking.done()
        await asyncio.sleep(0.02)
    asking.cancel()  # the client leaves: its connection closes
    with pytest.raises(asyncio.CancelledError):
        await asking
    labels = {"model": "org/model-a", "route": CHAT}
    samples = await scraped_until(
        proxy, lambda s: value(s, "aic_proxy_requests_total", status="cancelled", **labels) == 1
    )
    assert value(samples, "aic_proxy_request_duration_seconds_count", **labels) == 1
    assert value(samples, "aic_proxy_time_to_first_byte_seconds_count", **labels) == 0
    assert value(samples, "aic_proxy_requests_in_flight", model="org/model-a") == 0


class Hooked:
    """A plugin whose post_switch hook says something (every load calls it)."""

    @hookimpl
    async def post_switch(self, ctx: HookContext) -> str:
        return f"{ctx.instance} is ready"


async def post(proxy: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with proxy.session.post(proxy.url + path, json=body) as resp:
        answer: dict[str, Any] = await resp.json()
        assert resp.status == 200, answer
        pid = (answer.get("instance") or {}).get("pid")
        if pid:
            proxy.groups.add(int(pid))
        return answer


async def test_loads_evictions_drains_and_unloads_are_counted(make_proxy: Any) -> None:
    """Two entries that do not fit on one GPU together: loading b evicts a (reason room);
    unloading b while a request is in flight drains it; each stop is an unload; each load's
    post_switch hook call is counted by hook, plugin and outcome."""
    slow = f"{FAST} --sim-token-delay 0.05"
    models = {
        "a": {"model": "org/a", "args": FAST, "gpus": [0], "gpu_memory_utilization": 0.6},
        "b": {"model": "org/b", "args": slow, "gpus": [0], "gpu_memory_utilization": 0.6},
    }
    proxy = await make_proxy(models=models, gpus=("0",), extra_plugins=[("counting", Hooked())])
    await post(proxy, "/load", {"model": "a"})
    loaded = await post(proxy, "/load", {"model": "b"})
    assert loaded["evicted"] == ["a"]
    streaming = asyncio.ensure_future(chat(proxy, "b", stream=True, max_tokens=20))
    deadline = asyncio.get_running_loop().time() + 30
    while proxy.supervisor.loaded["b"].in_flight == 0:
        assert asyncio.get_running_loop().time() < deadline and not streaming.done()
        await asyncio.sleep(0.02)
    in_flight = await scrape(proxy)
    assert value(in_flight, "aic_proxy_requests_in_flight", model="b") == 1
    unloaded = await post(proxy, "/unload", {"model": "b"})
    assert unloaded["drained"] == 1
    assert await streaming == 200
    samples = await scrape(proxy)
    for name in ("a", "b"):
        assert value(samples, "aic_proxy_loads_total", model=name, reason="start") == 1
        assert value(samples, "aic_proxy_load_duration_seconds_count", model=name, reason="start") == 1
        assert value(samples, "aic_proxy_unloads_total", model=name, reason="stopped") == 1
        assert value(samples, "aic_proxy_instance_state", model=name, state="stopped") == 1
    hook = {"hook": "post_switch", "plugin": "counting"}
    assert value(samples, "aic_proxy_hook_calls_total", outcome="ok", **hook) == 2
    assert value(samples, "aic_proxy_evictions_total", model="a", reason="room") == 1
    assert value(samples, "aic_proxy_evictions_total", model="b", reason="room") == 0
    assert value(samples, "aic_proxy_drain_requests_total", model="b", outcome="drained") == 1
    assert value(samples, "aic_proxy_requests_total", model="b", route=CHAT, status="2xx") == 1
    assert value(samples, "aic_proxy_failures_total", model="a", reason="load") == 0


async def scraped_until(proxy: Any, done: Any, timeout: float = 60) -> Samples:
    """Scrape until ``done(samples)`` (asserting it gets there within ``timeout``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    samples = await scrape(proxy)
    while not done(samples):
        assert asyncio.get_running_loop().time() < deadline, samples
        await asyncio.sleep(0.1)
        samples = await scrape(proxy)
    return samples


async def test_failures_restarts_and_ttl_expiries_are_counted(make_proxy: Any) -> None:
    """A load that fails (vLLM exits while loading) is a failure "load"; a model that dies after
    it was ready is a failure "died" and, with --restart on-failure, a restart; an idle model
    past its ttl is a TTL expiry (and an unload)."""
    models = {
        "bad": {"model": "org/bad", "args": f"{FAST} --sim-fail-during-load", "gpus": [0]},
        "dies": {"model": "org/dies", "args": f"{FAST} --sim-engine-die-after 0.5", "gpus": [1]},
        "idle": {"model": "org/idle", "args": FAST, "gpus": [2], "ttl": 1},
    }
    proxy = await make_proxy(
        models=models, gpus=("0", "1", "2"), restart="on-failure", restart_backoff=0.1, max_restarts=1
    )
    async with proxy.session.post(f"{proxy.url}/load", json={"model": "bad"}) as resp:
        assert resp.status >= 500, await resp.text()
    await post(proxy, "/load", {"model": "idle"})
    await post(proxy, "/load", {"model": "dies"})
    samples = await scraped_until(
        proxy,
        lambda s: (
            value(s, "aic_proxy_restarts_total", model="dies", reason="died") == 1
            and value(s, "aic_proxy_failures_total", model="dies", reason="died") == 2
            and value(s, "aic_proxy_ttl_expiries_total", model="idle", reason="stopped") == 1
        ),
    )
    assert value(samples, "aic_proxy_failures_total", model="bad", reason="load") == 1
    assert value(samples, "aic_proxy_loads_total", model="bad", reason="start") == 1
    assert value(samples, "aic_proxy_load_duration_seconds_count", model="bad", reason="start") == 0
    assert value(samples, "aic_proxy_loads_total", model="dies", reason="start") == 2  # and its restart
    assert value(samples, "aic_proxy_failures_total", model="idle", reason="died") == 0
    assert value(samples, "aic_proxy_unloads_total", model="idle", reason="stopped") == 1
    assert value(samples, "aic_proxy_instance_state", model="bad", state="failed") == 1


async def test_parking_and_waking_are_counted(make_proxy: Any) -> None:
    """Sleep mode: a model parked to make room is an eviction and an unload "parked"; a request
    that wakes it is a load "wake" with its duration."""
    models = {
        name: {"model": f"org/{name}", "args": FAST, "gpus": [0], "gpu_memory_utilization": 0.6, "sleep": 1}
        for name in ("a", "b")
    }
    proxy = await make_proxy(models=models, gpus=("0",))
    await post(proxy, "/load", {"model": "a"})
    await post(proxy, "/load", {"model": "b"})
    assert await chat(proxy, "a") == 200  # wakes a, parks b
    samples = await scrape(proxy)
    assert value(samples, "aic_proxy_evictions_total", model="a", reason="room") == 1
    assert value(samples, "aic_proxy_evictions_total", model="b", reason="room") == 1
    for name in ("a", "b"):
        assert value(samples, "aic_proxy_unloads_total", model=name, reason="parked") == 1
        assert value(samples, "aic_proxy_loads_total", model=name, reason="start") == 1
    assert value(samples, "aic_proxy_loads_total", model="a", reason="wake") == 1
    assert value(samples, "aic_proxy_load_duration_seconds_count", model="a", reason="wake") == 1
    assert value(samples, "aic_proxy_instance_state", model="a", state="ready") == 1
    assert value(samples, "aic_proxy_instance_state", model="b", state="sleeping") == 1


async def status_of(proxy: Any, path: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with proxy.session.get(proxy.url + path, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_who_may_scrape(make_proxy: Any) -> None:
    """With keys: an admin key or a metrics key may scrape; no key is a 401, a user key a 403;
    a metrics key may do nothing else (not even a proxied request, on either HTTP path)."""
    proxy = await make_proxy(admin_keys=("adm",), api_keys=("usr",), metrics_key=("met",))
    assert await status_of(proxy, "/proxy/metrics", None) == 401
    assert await status_of(proxy, "/proxy/metrics", "wrong") == 401
    assert await status_of(proxy, "/proxy/metrics", "usr") == 403
    assert await status_of(proxy, "/proxy/metrics", "adm") == 200
    assert await status_of(proxy, "/proxy/metrics", "met") == 200
    assert await status_of(proxy, "/status", "met") == 403
    assert await status_of(proxy, "/v1/models", "met") == 403
    assert await status_of(proxy, "/status", "usr") == 200
    # A model ready: the front door would serve the request if it took the metrics key.
    headers = {"Authorization": "Bearer adm"}
    async with proxy.session.post(
        f"{proxy.url}/switch", json={"model_spec": f"org/model-a {QUICK}"}, headers=headers
    ) as resp:
        assert resp.status == 200
        proxy.groups.add(int((await resp.json())["status"]["pid"]))
    served = proxy.front.served
    assert await chat(proxy, "org/model-a", key="met") == 403
    assert proxy.front.served == served  # handed to aiohttp, which said no
    assert await chat(proxy, "org/model-a", key="usr") == 200
    assert proxy.front.served == served + 1


async def test_a_metrics_key_alone_guards_only_the_metrics(make_proxy: Any, tmp_path: Path) -> None:
    """Metrics keys (``--metrics-key``, or ``metrics KEY`` lines of the keys file) without
    admin or user keys: the API stays open, the metrics need one of them."""
    keys = tmp_path / "keys"
    keys.write_text("metrics from-file\n")
    proxy = await make_proxy(metrics_key=("met",), keys_file=keys)
    assert await status_of(proxy, "/proxy/metrics", None) == 401
    assert await status_of(proxy, "/proxy/metrics", "met") == 200
    assert await status_of(proxy, "/proxy/metrics", "from-file") == 200
    assert await status_of(proxy, "/status", None) == 200


def test_metrics_keys_from_the_environment_and_the_command_line(spawn_proxy: Any) -> None:
    """The daemon (``serve``) reads metrics keys like the others: AIC_VLLM_PROXY_METRICS_KEY
    (comma-separated), or ``--metrics-key`` (repeatable), which takes its place."""

    def scraped(url: str, key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(url + "/proxy/metrics", headers=headers, timeout=30).status_code

    env = {"AIC_VLLM_PROXY_METRICS_KEY": "env-m1, env-m2"}
    proxy = spawn_proxy("--admin-key", "adm", env=env)
    codes = {key: scraped(proxy.url, key) for key in ("env-m1", "env-m2", "adm", None)}
    assert codes == {"env-m1": 200, "env-m2": 200, "adm": 200, None: 401}
    proxy = spawn_proxy("--metrics-key", "cli-m", env=env)
    assert (scraped(proxy.url, "cli-m"), scraped(proxy.url, "env-m1")) == (200, 401)
    assert httpx.get(proxy.url + "/status", timeout=30).status_code == 200  # the API stays open


async def test_unknown_models_do_not_grow_the_series(make_proxy: Any) -> None:
    """Requests naming models nobody knows count under model="unknown": a flood of made-up
    names adds no series."""
    models = {"a": {"model": "org/a", "args": FAST}}
    proxy = await make_proxy(models=models)

    async def flood(count: int) -> None:
        for _ in range(count):
            assert await chat(proxy, f"made-up-{os.urandom(6).hex()}") == 404

    await flood(5)
    before = await scrape(proxy)
    await flood(40)
    after = await scrape(proxy)
    assert set(after) == set(before)  # the same series, only their values moved
    labels = {"model": "unknown", "route": CHAT}
    assert value(after, "aic_proxy_requests_total", status="4xx", **labels) == 45
    assert not [key for key in after if any("made-up" in label for _, label in key[1])]


async def test_vllm_metrics_of_each_instance(make_proxy: Any) -> None:
    """vLLM's own /metrics passes through: the primary's without ``?model=``, the one named
    with it; a name that is not serving is a 404 (a scrape never loads a model)."""
    models = {
        "a": {"model": "org/a", "args": FAST, "gpus": [0]},
        "b": {"model": "org/b", "args": FAST, "gpus": [1]},
        "c": {"model": "org/c", "args": FAST, "gpus": [1]},
    }
    proxy = await make_proxy(models=models, gpus=("0", "1"))
    pids = {name: (await post(proxy, "/load", {"model": name}))["instance"]["pid"] for name in ("a", "b")}

    async def scraped(query: str) -> tuple[int, str | None, str]:
        async with proxy.session.get(f"{proxy.url}/metrics{query}") as resp:
            text = await resp.text()
            header = resp.headers.get(INSTANCE_HEADER)
            return resp.status, parse_instance_header(header)["pid"] if header else None, text

    for name in ("a", "b"):
        status, pid, text = await scraped(f"?model={name}")
        assert status == 200 and pid == str(pids[name])
        assert "vllm:num_requests_running" in text
    status, pid, _ = await scraped("")
    assert status == 200 and pid == str(pids["b"])  # the primary: the last loaded
    for name in ("c", "nobody"):
        status, _, text = await scraped(f"?model={name}")
        assert status == 404, text
    assert proxy.supervisor.find("c") is None  # not loaded by the scrape


def test_dashboard_and_alerts_parse_and_use_metrics_that_exist() -> None:
    """docs/grafana-dashboard.json and docs/alerts.yml parse, and every aic_proxy_* metric they
    use is one the proxy exposes (docs/metrics.md lists them)."""
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["panels"] and all(panel.get("targets") for panel in dashboard["panels"])
    alerts = yaml.safe_load((DOCS / "alerts.yml").read_text())
    rules = [rule for group in alerts["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} >= {"AicProxyInstanceFailed", "AicProxyLoadsFailing"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]] + [r["expr"] for r in rules]
    used = {name for expr in exprs for name in re.findall(r"\baic_proxy_[a-z_]+", expr)}
    used_vllm = {name for expr in exprs for name in re.findall(r"\bvllm:[a-z_:]+", expr)}
    assert used and used_vllm
    documented = (DOCS / "metrics.md").read_text()
    for name in used:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{base}" in documented, name
