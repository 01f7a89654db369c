"""notify against a small webhook receiver on loopback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aic_vllm_proxy_notify.plugin import (
    CRASHED,
    START_FAILED,
    SWITCH_DONE,
    Notifier,
    NotifyConfig,
    failure_kind,
)
from aiohttp import web
from aiohttp.test_utils import TestServer

from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.hooks import HookContext

CRASH = (
    "vLLM (org/model, pid 4321) exited with signal SIGKILL after it was ready; its engine may have "
    "died. Load a model again with POST /switch."
)
START = "vLLM exited with status 1 while starting org/model: ValueError: bad. Check the model name."


@dataclass
class Receiver:
    url: str
    received: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    #: The receiver answers only once this is set (a slow Slack, a hung Matrix server).
    release: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 200


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    server = TestServer(app, host="127.0.0.1")
    state = Receiver(url="")
    state.release.set()

    async def hook(request: web.Request) -> web.Response:
        state.received.append((dict(request.headers), await request.json()))
        state.arrived.set()
        await state.release.wait()
        return web.Response(status=state.status, text="ok" if state.status < 300 else "nope")

    app.router.add_post("/hook", hook)
    await server.start_server()
    state.url = str(server.make_url("/hook"))
    yield state
    state.release.set()
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    yield session
    await session.close()


Make = Callable[..., HookContext]


@pytest.fixture
def make_ctx(session: aiohttp.ClientSession) -> Make:
    def make(event: str = "post_switch", **fields: Any) -> HookContext:
        config = fields.pop("config", {})
        values: dict[str, Any] = {
            "old_spec": "org/old",
            "new_spec": "org/model --max-model-len 4096",
            "log_path": "/var/log/vllm/1.log",
            "model": "org/model",
            "pid": 4321,
        }
        values.update(fields)
        return HookContext(
            event=event,
            settings=Settings(),
            vllm_base="http://127.0.0.1:8225",
            session=session,
            plugin_config={"node": "gpu-node-1", **config},
            **values,
        )

    return make


async def test_switch_done_never_waits_for_a_slow_receiver(receiver: Receiver, make_ctx: Make) -> None:
    notifier = Notifier()
    receiver.release.clear()  # the receiver hangs until told
    started = time.monotonic()
    await notifier.post_switch(make_ctx(config={"url": receiver.url}))
    assert time.monotonic() - started < 1  # the receiver has not even answered
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    assert len(notifier.tasks) == 1  # kept referenced while it runs
    receiver.release.set()
    await notifier.drain(5)
    assert not notifier.tasks
    headers, event = receiver.received[0]
    assert headers["Content-Type"] == "application/json"
    assert event["event"] == SWITCH_DONE
    assert event["text"] == "[gpu-node-1] org/model is ready (replacing org/old)"
    assert event["model_spec"] == "org/model --max-model-len 4096"
    assert event["previous_model_spec"] == "org/old"
    assert event["pid"] == 4321 and event["node"] == "gpu-node-1"
    assert event["time"].endswith("+00:00")


async def test_failures_are_told_apart(receiver: Receiver, make_ctx: Make) -> None:
    notifier = Notifier()
    tail = [f"line {i}" for i in range(50)]
    config = {"url": receiver.url}
    await notifier.on_failure(make_ctx("on_failure", error=START, exit_code=1, log_tail=tail, config=config))
    await notifier.drain(5)
    await notifier.on_failure(make_ctx("on_failure", error=CRASH, exit_code=-9, config=config))
    await notifier.drain(5)
    (_, start), (_, crash) = receiver.received
    assert start["event"] == START_FAILED
    assert start["text"] == f"[gpu-node-1] org/model --max-model-len 4096 failed to start: {START}"
    assert start["exit_code"] == 1
    assert start["log_tail"] == tail[-20:]
    assert crash["event"] == CRASHED
    assert crash["text"].startswith("[gpu-node-1] org/model crashed: vLLM (org/model, pid 4321) exited")


async def test_events_name_the_instance(receiver: Receiver, make_ctx: Make) -> None:
    """Several models side by side: the event says which instance it is about, and the text
    names it when the model's own name does not (a catalogue entry serving a repository)."""
    notifier = Notifier()
    config = {"url": receiver.url}
    entry = {"instance": "llama-8b", "gpus": ("0", "1"), "old_spec": None, "config": config}
    await notifier.post_switch(make_ctx(**entry))
    await notifier.drain(5)
    await notifier.on_failure(make_ctx("on_failure", error=CRASH, **entry))
    await notifier.drain(5)
    # A free-form spec's instance is called by its served name: the text stays as it was.
    await notifier.post_switch(make_ctx(instance="org/model", gpus=("GPU-8f3c",), config=config))
    await notifier.drain(5)
    (_, ready), (_, crashed), (_, plain) = receiver.received
    assert ready["text"] == "[gpu-node-1] org/model (instance llama-8b) is ready"
    assert (ready["instance"], ready["gpus"]) == ("llama-8b", ["0", "1"])
    assert crashed["text"].startswith("[gpu-node-1] org/model (instance llama-8b) crashed: vLLM")
    assert plain["text"] == "[gpu-node-1] org/model is ready (replacing org/old)"
    assert (plain["instance"], plain["gpus"]) == ("org/model", ["GPU-8f3c"])


def test_failure_kind_from_the_proxy_messages(make_ctx: Make) -> None:
    assert failure_kind(make_ctx("on_failure", error=CRASH)) == CRASHED
    died = "vLLM (org/model) answers 503 on /health: its engine has died. Load a model again."
    assert failure_kind(make_ctx("on_failure", error=died)) == CRASHED
    timeout = "org/model was not ready after 1800 s (--ready-timeout), so vLLM was stopped."
    assert failure_kind(make_ctx("on_failure", error=timeout)) == START_FAILED


async def test_slack_and_matrix_payloads(receiver: Receiver, make_ctx: Make) -> None:
    notifier = Notifier()
    await notifier.post_switch(make_ctx(config={"url": receiver.url, "format": "slack"}))
    await notifier.drain(5)
    ctx = make_ctx(
        "on_failure", error="<oops>", log_tail=["a < b"], config={"url": receiver.url, "format": "matrix"}
    )
    await notifier.on_failure(ctx)
    await notifier.drain(5)
    (_, slack), (_, matrix) = receiver.received
    assert slack == {"text": "[gpu-node-1] org/model is ready (replacing org/old)"}
    assert set(matrix) == {"text", "html"}
    assert matrix["html"].endswith("&lt;oops&gt;<pre>a &lt; b</pre>")


async def test_only_chosen_events_and_headers(receiver: Receiver, make_ctx: Make) -> None:
    notifier = Notifier()
    config = {"url": receiver.url, "events": "crashed", "headers": '{"Authorization": "Bearer t0k"}'}
    await notifier.post_switch(make_ctx(config=config))
    assert not notifier.tasks
    await notifier.on_failure(make_ctx("on_failure", error=CRASH, config=config))
    await notifier.drain(5)
    ((headers, event),) = receiver.received
    assert event["event"] == CRASHED
    assert headers["Authorization"] == "Bearer t0k"


async def test_without_url_it_warns_once(make_ctx: Make, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier()
    with caplog.at_level(logging.WARNING, logger="aic_vllm_proxy_notify"):
        await notifier.post_switch(make_ctx())
        await notifier.on_failure(make_ctx("on_failure", error=CRASH))
    assert not notifier.tasks
    assert caplog.text.count("no webhook url configured") == 1
    assert "AIC_VLLM_PROXY_PLUGIN_NOTIFY_URL" in caplog.text


async def test_a_hung_receiver_times_out(
    receiver: Receiver, make_ctx: Make, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier()
    receiver.release.clear()
    with caplog.at_level(logging.WARNING, logger="aic_vllm_proxy_notify"):
        await notifier.post_switch(make_ctx(config={"url": receiver.url, "timeout": "0.2"}))
        started = time.monotonic()
        await notifier.drain(5)
    assert time.monotonic() - started < 2
    assert "switch_done event to" in caplog.text and "timed out after 0.2 s" in caplog.text


async def test_receiver_errors_are_logged(
    receiver: Receiver, make_ctx: Make, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier()
    receiver.status = 500
    with caplog.at_level(logging.WARNING, logger="aic_vllm_proxy_notify"):
        await notifier.post_switch(make_ctx(config={"url": receiver.url}))
        await notifier.drain(5)
        await notifier.post_switch(make_ctx(config={"url": "http://127.0.0.1:9/nothing-here"}))
        await notifier.drain(5)
    assert "answered 500: nope" in caplog.text
    assert "failed: Cannot connect" in caplog.text


def test_settings() -> None:
    assert NotifyConfig.parse({}).url is None
    config = NotifyConfig.parse({"url": " http://x/y ", "events": ["crashed"], "timeout": "3"})
    assert (config.url, config.events, config.timeout) == ("http://x/y", ("crashed",), 3.0)
    with pytest.raises(ValueError, match="format"):
        NotifyConfig.parse({"format": "teams"})
    with pytest.raises(ValueError, match="unknown exploded"):
        NotifyConfig.parse({"events": "exploded"})
    with pytest.raises(ValueError, match="JSON object"):
        NotifyConfig.parse({"headers": "Authorization: x"})
