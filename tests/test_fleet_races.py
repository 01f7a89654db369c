"""Races of the fleet (issue 13) found in a review, one regression test each: the daemon (a real
process on real sockets, ``test_fleet.py``'s ``fleet`` fixture) with simulator instances on
``--gpus 0,1``, and one unit test of ``Supervisor.admit``.

- a slot switching to other GPUs keeps its old GPUs counted until its old model has stopped;
- a ``/switch`` to an entry whose placement waits for room gives one copy of it;
- a ``/switch`` whose client hangs up, or a slot's switch cancelled by ``/unload``, leaves
  no instance draining for ever;
- a restart of the slot (``--restart on-failure``) keeps its catalogue entry's GPUs;
- ``/load`` of a model being unloaded waits for the stop and loads it again;
- the ttl of an instance loaded after one with a longer ttl is honoured;
- ``/unload`` and ``/stop`` cancel a load still being placed (409 ``switch_cancelled``);
- two ``/load`` of one name with other specs: the later one's spec ends running;
- ``admit`` never hands a request to an instance that began to go during its wait.

Where a test must let a request reach the daemon before the next one (nothing in ``/status``
shows a placement waiting for room), it gives it :data:`ARRIVAL` seconds: that pause is never
the proof; had the request not arrived in time, the test would fail, not pass.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import test_fleet
from helpers import CHAT, FAST, async_wait_until, chat_request, process_exists, wait_until
from test_fleet import HOLDING, SLOW_TOKENS, StartFleet, catalogue

from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.engine.supervisor import Supervisor
from aic_vllm_proxy.errors import ModelUnavailable
from aic_vllm_proxy.hooks.runner import HookRunner, load_plugins
from aic_vllm_proxy.schemas import ProcessState
from aic_vllm_proxy.spec import ModelSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
#: test_fleet.py's fixture: a daemon with a catalogue on ``--gpus 0,1``.
fleet = test_fleet.fleet

#: Seconds given to a request to reach the daemon before the next one is sent (see above).
ARRIVAL = 1.5
#: Tokens of a stream that keeps its instance busy past :data:`ARRIVAL` (0.2 s a token).
LONG = 25
#: Generous deadline for anything the daemon does on its own on a loaded machine.
DEADLINE = 60.0
#: The GPU of each entry of :func:`shares`.
GPU_OF = {"a": 0, "b": 1, "c": 0}


def shares(**utilization: float) -> str:
    """A catalogue of the entries named (``a`` and ``c`` on GPU 0, ``b`` on GPU 1), each with
    its share of its GPU; their tokens come at 0.2 s each."""
    return "".join(
        f"""
[models.{name}]
model = "org/{name}"
args = "{FAST} {SLOW_TOKENS}"
gpus = [{GPU_OF[name]}]
gpu_memory_utilization = {share}
"""
        for name, share in utilization.items()
    )


async def instances(client: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    """``/status``'s ``instances`` (without blocking the event loop, unlike ``Fleet.status``)."""
    response = await client.get(url + "/status")
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["instances"]
    return found


def named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next((item for item in items if item["name"] == name), {})


async def streaming(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> AsyncIterator[bytes]:
    """A streamed chat to ``model`` that has begun (its first bytes are in): the instance is
    busy until the rest is read from the iterator returned."""
    request = client.build_request(
        "POST", url + CHAT, json=chat_request(model, stream=True, max_tokens=tokens)
    )
    response = await client.send(request, stream=True)
    assert response.status_code == 200, await response.aread()
    chunks = response.aiter_bytes()
    await chunks.__anext__()
    return chunks


async def drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass


# ------------------------------------------------------------------ placement and the slot


async def test_a_slot_switching_to_other_gpus_counts_its_old_gpus_until_its_old_model_stopped(
    fleet: StartFleet,
) -> None:
    """The slot runs ``a`` (GPU 0, 0.9) with a request in flight and switches to ``b`` (GPU 1):
    while ``a`` drains, a load of ``c`` (GPU 0, 0.9) waits; it never runs beside ``a``."""
    daemon = fleet(shares(a=0.9, b=0.9, c=0.9))
    old = daemon.switch("a")["status"]["pid"]
    beside: list[list[dict[str, Any]]] = []  # every /status seen with c and a's vLLM on GPU 0
    async with httpx.AsyncClient(timeout=120) as client:
        chunks = await streaming(client, daemon.url, "a", 30)  # ~6 s
        switched = await client.post(daemon.url + "/switch", json={"model_spec": "b", "wait": False})
        assert switched.status_code == 202, switched.text
        load = asyncio.ensure_future(client.post(daemon.url + "/load", json={"model": "c", "wait": True}))
        rest = asyncio.ensure_future(drain(chunks))
        while not load.done():
            seen = await instances(client, daemon.url)
            c = named(seen, "c")
            if c.get("state") in HOLDING and c.get("gpus") == ["0"] and process_exists(old):
                beside.append(seen)
            await asyncio.sleep(0.1)
        await rest
        loaded = await load
    assert loaded.status_code == 200, loaded.text
    body = loaded.json()
    daemon.groups.add(body["instance"]["pid"])
    assert (body["instance"]["state"], body["instance"]["gpus"]) == ("ready", ["0"]), body
    assert not beside, f"c ran beside a's vLLM (pid {old}) on GPU 0 (0.9 + 0.9): {beside[0]}"
    assert not process_exists(old)


async def test_a_switch_to_an_entry_whose_placement_waits_gives_one_copy(fleet: StartFleet) -> None:
    """``/load a`` waits for room (``c`` is young and busy on GPU 0); a ``/switch`` to ``a``
    meanwhile: the slot runs it, and the load ends with that one copy, never a second."""
    daemon = fleet(shares(a=0.9, c=0.9))
    daemon.load("c")
    copies: list[list[dict[str, Any]]] = []  # every /status seen with two copies of a

    def held_a(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [item for item in seen if item["model"] == "org/a" and item["state"] in HOLDING]

    async with httpx.AsyncClient(timeout=120) as client:
        chunks = await streaming(client, daemon.url, "c", LONG)  # ~5 s, well past ARRIVAL
        load = asyncio.ensure_future(client.post(daemon.url + "/load", json={"model": "a", "wait": True}))
        await asyncio.sleep(ARRIVAL)
        switched = await client.post(daemon.url + "/switch", json={"model_spec": "a", "wait": False})
        assert switched.status_code == 202, switched.text
        rest = asyncio.ensure_future(drain(chunks))
        while not load.done():
            seen = await instances(client, daemon.url)
            if len(held_a(seen)) > 1:
                copies.append(seen)
            await asyncio.sleep(0.1)
        await rest
        loaded = await load
        assert loaded.status_code == 200, loaded.text
        seen = await instances(client, daemon.url)
    daemon.groups.update(item["pid"] for item in seen if item["pid"])
    assert not copies, f"two copies of a on GPU 0: {copies[0]}"
    held = held_a(seen)
    assert len(held) == 1, seen
    assert loaded.json()["instance"]["pid"] == held[0]["pid"] and held[0]["state"] == "ready", (
        loaded.json(),
        held,
    )


async def test_a_switch_whose_client_hangs_up_leaves_no_instance_draining(fleet: StartFleet) -> None:
    """``/switch a`` (loaded beside the slot: the switch keeps it) drains ``c``, which shares
    its GPU; its client gives up meanwhile: ``c`` still stops, it is not left draining."""
    daemon = fleet(shares(a=0.4, c=0.4))
    daemon.load("a")
    daemon.load("c")
    async with httpx.AsyncClient(timeout=120) as client:
        chunks = await streaming(client, daemon.url, "c", 15)  # ~3 s
        with pytest.raises(httpx.TimeoutException):
            await client.post(daemon.url + "/switch", json={"model_spec": "a"}, timeout=0.7)
        await drain(chunks)

    def c_stopped() -> bool:
        return str(daemon.instances().get("c", {}).get("state", "stopped")) == "stopped"

    assert wait_until(c_stopped, DEADLINE, interval=0.2), daemon.instances()
    assert daemon.instances()["a"]["state"] == "ready"


async def test_a_slot_switch_cancelled_while_it_drains_another_leaves_none_draining(
    fleet: StartFleet,
) -> None:
    """The slot's switch to ``a`` drains ``c`` (loaded on its GPU, a request in flight); the
    switch is cancelled meanwhile (``/unload a``): ``c`` still stops, not left draining."""
    daemon = fleet(shares(a=0.4, c=0.4))
    daemon.load("c")
    async with httpx.AsyncClient(timeout=120) as client:
        chunks = await streaming(client, daemon.url, "c", 15)  # ~3 s
        switched = await client.post(daemon.url + "/switch", json={"model_spec": "a", "wait": False})
        assert switched.status_code == 202, switched.text

        async def c_draining() -> bool:
            return named(await instances(client, daemon.url), "c").get("state") == "draining"

        deadline = time.monotonic() + DEADLINE
        while not await c_draining():
            assert time.monotonic() < deadline, "the switch never drained c"
            await asyncio.sleep(0.05)
        unloaded = await client.post(daemon.url + "/unload", json={"model": "a"})
        assert unloaded.status_code == 200, unloaded.text
        await drain(chunks)

    def c_stopped() -> bool:
        return str(daemon.instances().get("c", {}).get("state", "stopped")) == "stopped"

    assert wait_until(c_stopped, DEADLINE, interval=0.2), daemon.instances()


def test_a_restart_of_the_slot_keeps_its_entrys_gpus(fleet: StartFleet) -> None:
    """The slot runs entry ``a`` (GPU 0), ``b`` is loaded on GPU 1; ``a``'s vLLM is killed and
    the restart policy starts it again: on GPU 0 only, as its entry says, and ``b`` stays."""
    daemon = fleet(catalogue(), "--restart", "on-failure", "--restart-backoff", "0")
    killed = daemon.switch("a")["status"]["pid"]
    b_pid = daemon.load("b")["instance"]["pid"]
    os.killpg(killed, signal.SIGKILL)
    slot: dict[str, Any] = {}

    def restarted() -> bool:
        nonlocal slot
        slot = next(
            (
                item
                for item in daemon.status()["instances"]
                if item["model"] == "org/a" and item["state"] == "ready" and item["pid"] not in (killed, None)
            ),
            {},
        )
        return bool(slot)

    assert wait_until(restarted, DEADLINE, interval=0.2), daemon.status()
    assert (slot["name"], slot["gpus"]) == ("a", ["0"]), slot
    b = daemon.instances()["b"]
    assert (b["state"], b["pid"]) == ("ready", b_pid), f"a's restart stopped b: {b}"


async def test_a_load_during_an_unloads_drain_ends_with_the_model_loaded(fleet: StartFleet) -> None:
    """``/unload a`` drains ``a`` (a request in flight); ``/load a`` meanwhile waits for the
    stop and loads ``a`` again: it answers 200 with a new, ready instance, which stays."""
    daemon = fleet(catalogue(f"{FAST} {SLOW_TOKENS}"))
    old = daemon.load("a")["instance"]["pid"]
    async with httpx.AsyncClient(timeout=120) as client:
        chunks = await streaming(client, daemon.url, "a", 15)  # ~3 s
        unload = asyncio.ensure_future(client.post(daemon.url + "/unload", json={"model": "a"}))

        async def draining() -> bool:
            return named(await instances(client, daemon.url), "a").get("state") == "draining"

        deadline = time.monotonic() + DEADLINE
        while not await draining():
            assert time.monotonic() < deadline, "a never drained"
            await asyncio.sleep(0.05)
        load = asyncio.ensure_future(client.post(daemon.url + "/load", json={"model": "a", "wait": True}))
        await drain(chunks)
        unloaded, loaded = await unload, await load
    assert unloaded.status_code == 200, unloaded.text
    assert loaded.status_code == 200, loaded.text
    instance = loaded.json()["instance"]
    daemon.groups.add(instance["pid"])
    assert instance["state"] == "ready" and instance["pid"] != old, instance
    a = daemon.instances()["a"]
    assert (a["state"], a["pid"]) == ("ready", instance["pid"]), a


def test_the_ttl_of_an_instance_loaded_after_a_longer_one_is_honoured(fleet: StartFleet) -> None:
    """``a`` (ttl 300 s) makes the TTL checks look again in 30 s; ``b`` (ttl 3 s) loaded then
    goes after its ttl, a tenth of it late at most (and some slack for a loaded machine)."""
    ttl, slack = 3.0, 4.0
    config = catalogue().replace('aliases = ["alpha"]', 'aliases = ["alpha"]\nttl = 300')
    daemon = fleet(config.replace("gpus = [1]", f"gpus = [1]\nttl = {ttl}"))
    daemon.load("a")
    daemon.load("b")
    loaded = time.monotonic()
    assert wait_until(lambda: daemon.instances()["b"]["state"] != "ready", DEADLINE, interval=0.1)
    took = time.monotonic() - loaded
    assert took < ttl * 1.1 + slack, f"b (ttl {ttl:g} s) went after {took:.1f} s"
    assert wait_until(lambda: daemon.instances()["b"]["state"] == "stopped", DEADLINE, interval=0.2)
    assert daemon.instances()["a"]["state"] == "ready"


@pytest.mark.parametrize("how", ["unload", "stop"])
async def test_unload_or_stop_cancels_a_load_being_placed(fleet: StartFleet, how: str) -> None:
    """``/load c`` waits for room (``a`` is young and busy on GPU 0); ``/unload c`` (or
    ``/stop``) cancels it: its client gets 409 ``switch_cancelled``, and ``c`` does not load
    once ``a`` is idle."""
    daemon = fleet(shares(a=0.9, c=0.9))
    a_pid = daemon.load("a")["instance"]["pid"]
    async with httpx.AsyncClient(timeout=120) as client:
        chunks = await streaming(client, daemon.url, "a", LONG)  # ~5 s, well past ARRIVAL
        load = asyncio.ensure_future(client.post(daemon.url + "/load", json={"model": "c", "wait": True}))
        await asyncio.sleep(ARRIVAL)
        body = {"model": "c"} if how == "unload" else {}
        stop = asyncio.ensure_future(client.post(f"{daemon.url}/{how}", json=body))
        loaded = await load
        await drain(chunks)
        stopped = await stop
        assert stopped.status_code == 200, stopped.text
        assert loaded.status_code == 409, loaded.text
        assert loaded.json()["error"]["type"] == "switch_cancelled", loaded.text

        async def c_loads() -> bool:
            c = named(await instances(client, daemon.url), "c")
            daemon.groups.update([c["pid"]] if c.get("pid") else [])
            return c.get("state") in HOLDING

        # a is idle now: a placement still under way would evict it and load c at once.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert not await c_loads(), "c loaded after its load was cancelled"
            await asyncio.sleep(0.1)
        a = named(await instances(client, daemon.url), "a")
    expected = ("ready", a_pid) if how == "unload" else ("stopped", None)
    assert (a["state"], a["pid"]) == expected, a


async def test_two_loads_of_one_name_with_other_specs_run_one_after_the_other(fleet: StartFleet) -> None:
    """``/load`` of ``org/x`` waits for room (``a`` is young and busy on GPU 0); a second
    ``/load`` of ``org/x`` with another spec meanwhile does not join it: the first loads, then
    the second replaces it, and answers with its own spec."""
    daemon = fleet(shares(a=0.9))
    daemon.load("a")
    one = f"org/x {FAST} --gpu-memory-utilization 0.3"
    two = f"{one} --sim-token-delay 0.01"
    async with httpx.AsyncClient(timeout=120) as client:
        chunks = await streaming(client, daemon.url, "a", LONG)  # ~5 s, well past ARRIVAL
        first = asyncio.ensure_future(client.post(daemon.url + "/load", json={"model": one}))
        await asyncio.sleep(ARRIVAL)
        second = asyncio.ensure_future(client.post(daemon.url + "/load", json={"model": two}))
        await drain(chunks)
        await first  # it loads, or is stopped by the second: either way its answer is its own
        loaded = await second
        seen = await instances(client, daemon.url)
    daemon.groups.update(item["pid"] for item in seen if item["pid"])
    assert loaded.status_code == 200, loaded.text
    instance = loaded.json()["instance"]
    assert instance["model_spec"].startswith(two), instance["model_spec"]
    running = [item for item in seen if item["model"] == "org/x" and item["state"] in HOLDING]
    assert [item["model_spec"].startswith(two) for item in running] == [True], running
    assert running[0]["pid"] == instance["pid"], (running, instance)


# ------------------------------------------------------------------ admit (a unit test)


async def test_admit_never_hands_a_request_to_an_instance_that_began_to_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request waits for the slot's load; the wait sees it ready, and before ``admit`` goes
    on, a stop begins (the instance drains): ``admit`` does not return it. Deterministic: the
    stop begins in the wait's own last step (the machine's ``wait_for``, wrapped)."""
    settings = Settings()
    supervisor = Supervisor(settings, lambda: None, HookRunner(load_plugins(settings)[0], settings))  # type: ignore[arg-type, return-value]
    machine = supervisor.slot.machine
    wait_for = machine.wait_for
    began_to_go = asyncio.Event()

    async def wait_then_stop_begins(*args: Any, **kwargs: Any) -> Any:
        snapshot = await wait_for(*args, **kwargs)
        if not began_to_go.is_set():
            began_to_go.set()
            await machine.transition(ProcessState.DRAINING)
        return snapshot

    monkeypatch.setattr(machine, "wait_for", wait_then_stop_begins)
    spec = ModelSpec.parse("org/m")
    machine.queue_switch(spec)
    await machine.transition(ProcessState.STARTING)
    admit = asyncio.ensure_future(supervisor.admit(None, 30))
    assert await async_wait_until(lambda: supervisor.slot.waiting == 1, 10)  # it waits
    machine.end_switch(spec)
    await machine.transition(ProcessState.READY)
    await asyncio.wait_for(began_to_go.wait(), 10)
    assert not admit.done() or admit.exception() is not None, "admit returned a draining instance"
    await machine.transition(ProcessState.STOPPING)
    await machine.transition(ProcessState.STOPPED)
    with pytest.raises(ModelUnavailable):
        await asyncio.wait_for(admit, 10)
