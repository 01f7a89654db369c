"""The clients' side of the fleet (issue 13): ``load``, ``unload``, ``instances``, ``stop(model=)``
of the sync and async clients, and the ``ps | load | unload | stop --model`` commands.

The first tests feed the load-following logic (:class:`LoadWatch`) and the error mapping with
made-up answers (no process, no socket). The others run the real daemon with the simulator and
a catalogue of models on GPU sets of their own (``--gpus 0,1``), so two run side by side.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import click
import httpx
import pytest
from helpers import FAST, Daemon, chat_request, start_daemon
from test_client_cli import group, invoke

from aic_vllm_proxy.client import (
    AsyncVLLMProxyClient,
    NoRoomError,
    SwitchError,
    UnknownModelError,
    VLLMProxyClient,
    WaitTimeout,
)
from aic_vllm_proxy.client.calls import _response_error
from aic_vllm_proxy.client.progress import LoadWatch
from aic_vllm_proxy.client.views import instances_table
from aic_vllm_proxy.hooks import HookContext, Veto, hookimpl
from aic_vllm_proxy.schemas import InstanceStatus, LoadResult, ProcessState, Status
from aic_vllm_proxy.simulator.server import INSTANCE_HEADER, parse_instance_header

S = ProcessState
pytestmark = pytest.mark.timeout(180)
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
T1 = T0 + timedelta(minutes=5)
__all__ = ["group"]  # the command group fixture of test_client_cli, used here too


# ------------------------------------------------------------------------ no server


def inst(name: str, state: ProcessState, started: datetime | None = None, **kw: Any) -> InstanceStatus:
    return InstanceStatus(name=name, state=state, started_at=started, vllm_base="v", **kw)


def fleet(*instances: InstanceStatus) -> Status:
    return Status(running=False, vllm_base="v", instances=list(instances))


def accepted(instance: InstanceStatus, *, changed: bool = True, **kw: Any) -> LoadResult:
    return LoadResult(changed=changed, name=instance.name, instance=instance, **kw)


class TestLoadWatch:
    """Following a load in ``/status``'s ``instances``, fed with made-up statuses."""

    def watch(self, name: str, before: Status, **kw: Any) -> tuple[LoadWatch, list[str]]:
        lines: list[str] = []
        return LoadWatch(name, before, sink=lines.append, **kw), lines

    @staticmethod
    def shown(lines: list[str]) -> list[str]:
        return [line.split("] ", 1)[1] for line in lines]

    def test_a_new_launch_beside_another(self) -> None:
        a = inst("a", S.READY, T0, gpus=["0"])
        watch, lines = self.watch("b", fleet(a, inst("b", S.STOPPED, gpus=["1"])))
        watch.begin()
        pending = inst("b", S.STOPPED, model_spec="org/b --x 1", gpus=["1"], switching=True)
        watch.accepted(accepted(pending))
        assert watch.log_model == "b"
        assert watch.observe(fleet(a, pending)) is None and not watch.wants_log(fleet(a, pending))
        starting = fleet(a, inst("b", S.STARTING, T1, pid=7, log_path="/l", gpus=["1"], switching=True))
        assert watch.observe(starting) is None and watch.wants_log(starting)
        ready = inst("b", S.READY, T1, ready_at=T1 + timedelta(seconds=42), gpus=["1"], model="b")
        outcome = watch.observe(fleet(a, ready))
        assert outcome is not None and outcome.ok and outcome.changed and outcome.instance == ready
        result = watch.result(outcome)
        assert result.load_seconds == 42.0 and result.name == "b" and result.evicted == []
        assert result.message.startswith("b is ready after") and "(loading took 42.0 s)" in result.message
        assert self.shown(lines) == ["loading b", "b: org/b --x 1 on GPU 1", "vLLM started (pid 7), log /l"]

    def test_an_alias_follows_the_entry_it_names(self) -> None:
        watch, _ = self.watch("alpha", fleet(inst("a", S.READY, T0)))
        watch.accepted(accepted(inst("a", S.READY, T0), changed=False))
        assert watch.name == watch.log_model == "a"
        outcome = watch.observe(fleet(inst("a", S.READY, T0)))
        assert outcome is not None and outcome.ok and not outcome.changed
        assert outcome.message == "a is already loaded; nothing restarted"
        assert watch.result(outcome).load_seconds is None

    def test_a_load_already_under_way_is_waited_for(self) -> None:
        loading = inst("a", S.STARTING, T0, pid=3, log_path="/l", switching=True)
        watch, _ = self.watch("a", fleet(loading))
        watch.accepted(accepted(loading, changed=False))
        assert watch.observe(fleet(loading)) is None
        outcome = watch.observe(fleet(inst("a", S.READY, T0, ready_at=T1)))
        assert outcome is not None and outcome.ok and not outcome.changed
        assert "a is ready after" in outcome.message

    def test_the_instances_unloaded_to_make_room_are_named(self) -> None:
        watch, lines = self.watch("big", fleet(inst("c", S.READY, T0, gpus=["0"])))
        watch.accepted(accepted(inst("big", S.STOPPED, gpus=["0"], switching=True), evicted=["c"]))
        outcome = watch.observe(fleet(inst("c", S.STOPPED, gpus=["0"]), inst("big", S.READY, T1, gpus=["0"])))
        assert outcome is not None and outcome.ok
        assert watch.result(outcome).evicted == ["c"]
        assert self.shown(lines) == ["unloaded c to make room"]

    def test_failures(self) -> None:
        before = fleet(inst("b", S.STOPPED, gpus=["1"]))
        pending = inst("b", S.STOPPED, switching=True)
        watch, _ = self.watch("b", before)
        watch.accepted(accepted(pending))
        failed = watch.observe(fleet(inst("b", S.FAILED, T1, error="vLLM exited with status 1")))
        assert failed is not None and not failed.ok and failed.has_log
        assert failed.message == "vLLM exited with status 1" and failed.state is S.FAILED

        refused, _ = self.watch("b", before)
        refused.accepted(accepted(pending))
        assert refused.observe(fleet(pending)) is None  # not launched yet: its hooks are running
        vetoed = refused.observe(before)  # the load is over, and nothing was launched
        assert vetoed is not None and not vetoed.ok and not vetoed.has_log
        assert (
            vetoed.message
            == "the load of b did not start: a plugin may have refused it; the proxy's own log says why"
        )
        said, _ = self.watch("b", before)
        said.accepted(accepted(pending))
        why = said.observe(fleet(inst("b", S.FAILED, error="cannot run vllm: no such file")))
        assert why is not None and why.message == "the load of b did not start: cannot run vllm: no such file"

        gone, _ = self.watch("b", before)
        gone.accepted(accepted(pending))
        vanished = gone.observe(fleet())
        assert vanished is not None and not vanished.ok
        assert "b was unloaded before it was ready" in vanished.message

    def test_heartbeat_and_timeout_say_how_to_go_on(self) -> None:
        now = [0.0]
        watch, lines = self.watch("b", fleet(), timeout=10.0, clock=lambda: now[0])
        watch.accepted(accepted(inst("b", S.STARTING, T1, switching=True)))
        now[0] = 40.0
        watch.tick()
        assert self.shown(lines) == ["still waiting: b is starting"]
        assert watch.timed_out()
        assert "load('b')" in watch.still_going() and "unload('b')" in watch.still_going()


def answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    request = httpx.Request("POST", "http://proxy:8224/load")
    return httpx.Response(status, json=body, headers=headers, request=request)


def test_error_answers_of_a_load_map_to_the_clients_errors() -> None:
    known = "Unknown model 'nope': known models are 'a', 'b'."
    error = _response_error(
        answer(
            404, {"error": {"message": known, "type": "invalid_request_error", "code": "model_not_found"}}
        ),
        has_key=False,
        key_option="api_key=",
    )
    assert isinstance(error, UnknownModelError) and isinstance(error, ValueError)
    assert error.status_code == 404 and known in error.message and "'a', 'b'" in str(error)

    no_room = {"error": {"message": "No room on GPU 0 for big: a is pinned.", "type": "model_unavailable"}}
    error = _response_error(answer(503, no_room, {"Retry-After": "30"}), has_key=False, key_option="api_key=")
    assert isinstance(error, NoRoomError) and error.retry_after == 30.0 and error.status_code == 503
    assert "a is pinned" in str(error) and "retry after 30 s" in str(error)

    vetoed = {"error": {"message": "guard refused the load", "type": "switch_vetoed"}}
    error = _response_error(answer(409, vetoed), has_key=False, key_option="api_key=")
    assert isinstance(error, SwitchError) and error.status_code == 409 and error.error_type == "switch_vetoed"


def test_the_ps_table() -> None:
    now = T1
    rows = instances_table(
        [
            inst(
                "a", S.READY, T0, model="a", gpus=["0", "1"], gpu_memory_utilization=0.45, in_flight=2,
                last_used=now - timedelta(seconds=3), pinned=True, primary=True, pid=4242,
            ),
            inst(
                "b", S.STOPPED, model=None, gpu_memory_utilization=0.9, waiting=1,
                last_used=now - timedelta(minutes=12), expires_at=now + timedelta(minutes=18),
            ),
            inst("c", S.SLEEPING, T0, model="c", gpus=["0"], sleep_level=2, last_used=now, pid=4343),
        ],
        now,
    )  # fmt: skip
    header = rows[0].split()
    assert header[:5] == ["NAME", "STATE", "MODEL", "GPUS", "UTIL"] and header[-2:] == ["PINNED", "PID"]
    assert "LAST USED" in rows[0] and "EXPIRES" in rows[0] and "IN FLIGHT" in rows[0]
    assert rows[1].split() == [
        "a",
        "*",
        "ready",
        "a",
        "0,1",
        "0.45",
        "2",
        "0",
        "3s",
        "ago",
        "-",
        "yes",
        "4242",
    ]
    assert rows[2].split() == [
        "b",
        "stopped",
        "-",
        "all",
        "0.9",
        "0",
        "1",
        "12m",
        "ago",
        "in",
        "18m",
        "-",
        "-",
    ]
    assert rows[3].split()[:3] == ["c", "sleeping/2", "c"]  # parked at sleep level 2
    assert rows[0].index("STATE") == rows[1].index("ready") == rows[2].index("stopped")  # aligned


# ------------------------------------------------------------------ against the daemon

CONFIG = f"""
[models.a]
model = "org/a"
args = "{FAST}"
aliases = ["alpha"]
gpus = [0]
gpu_memory_utilization = 0.5
pinned = true

[models.b]
model = "org/b"
args = "{FAST}"
gpus = [1]

[models.big]
model = "org/big"
args = "{FAST}"
gpus = [0]
gpu_memory_utilization = 0.9

[models.slow]
model = "org/slow"
args = "--sim-import-delay 0.05 --sim-load-delay 3"
gpus = [1]

[models.broken]
model = "org/broken"
args = "{FAST} --sim-fail-during-load"
gpus = [1]
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with the catalogue above on the GPUs 0 and 1; every test leaves it with
    nothing loaded."""
    workdir = tmp_path_factory.mktemp("fleet")
    config = workdir / "proxy.toml"
    config.write_text(CONFIG)
    started = start_daemon(workdir, "--config", str(config), "--gpus", "0,1")
    yield started
    started.stop()


def track(daemon: Daemon, instances: list[InstanceStatus]) -> None:
    """Have the daemon's fixture check the process groups of these instances at the end."""
    daemon.groups.update(instance.pid for instance in instances if instance.pid is not None)


def running(instances: list[InstanceStatus]) -> dict[str, InstanceStatus]:
    return {i.name: i for i in instances if i.state in (S.STARTING, S.READY, S.DRAINING, S.STOPPING)}


def answered_by(url: str, model: str) -> dict[str, str]:
    """Which simulator answered a chat naming ``model`` through the proxy (its pid, port and
    ``CUDA_VISIBLE_DEVICES``), and under which name."""
    response = httpx.post(f"{url}/v1/chat/completions", json=chat_request(model, stream=False), timeout=60)
    assert response.status_code == 200, response.text
    return {**parse_instance_header(response.headers[INSTANCE_HEADER]), "model": response.json()["model"]}


def test_two_models_loaded_side_by_side_then_unloaded(daemon: Daemon) -> None:
    lines: list[str] = []
    with VLLMProxyClient(daemon.url, progress=lines.append) as client:
        first = client.load("a")
        track(daemon, [first.instance])
        assert first.changed and first.name == "a" and first.instance.state is S.READY
        assert first.instance.gpus == ["0"] and first.load_seconds is not None and first.load_seconds > 0
        assert first["instance"]["state"] == "ready" and json.loads(json.dumps(first))["name"] == "a"
        shown = [line.split("] ", 1)[1] for line in lines]
        assert shown[0] == "loading a" and any(line.startswith("vLLM started (pid") for line in shown)
        assert any("launching:" in line and "org/a" in line for line in shown)  # a's log, from the top
        assert any("Loading weights took" in line for line in shown)
        assert shown[-1].startswith("a is ready after") and "Route:" not in "\n".join(shown)

        second = client.load("b", progress=False)
        track(daemon, [second.instance])
        assert second.changed and second.evicted == [] and second.instance.gpus == ["1"]
        both = running(client.instances())
        assert set(both) == {"a", "b"} and all(i.state is S.READY for i in both.values())
        assert both["a"].pinned and not both["b"].pinned

        for name, gpu in (("a", "0"), ("b", "1")):  # each request reaches its own instance
            served = answered_by(daemon.url, name)
            assert served["cuda_visible_devices"] == gpu and served["pid"] == str(both[name].pid)
        assert answered_by(daemon.url, "alpha")["pid"] == str(both["a"].pid)

        again = client.load("alpha", progress=False)  # an alias of a, which is loaded
        assert not again.changed and again.name == "a" and "already loaded" in again.message
        assert again.instance.started_at == first.instance.started_at and again.load_seconds is None
        assert client.logs(3, model="b").strip() and "org/b" in client.logs(model="b")

        unloaded = client.unload("b")
        assert unloaded.changed and unloaded.name == "b" and "b" not in running(unloaded.status.instances)
        assert set(running(client.instances())) == {"a"}
        assert not client.unload("b").changed  # no longer loaded
        assert answered_by(daemon.url, "a")["pid"] == str(both["a"].pid)  # a kept serving

        stopped = client.stop(model="a")
        assert "a" not in running(stopped.instances)
        assert running(client.instances()) == {}


def test_the_clients_switch_to_a_catalogue_entry(daemon: Daemon) -> None:
    """The client's ``switch("b")`` follows the spec the proxy launches for the entry, which
    answers to its name too (``--served-model-name org/b b``, added by the proxy): the 202's
    ``accepted_model_spec``. It used to compare ``/status`` with the entry's own spec and report
    a switch that worked as one that "did not happen"."""
    with VLLMProxyClient(daemon.url, progress=False, poll_interval=0.1) as client:
        switched = client.switch("b")
        track(daemon, [i for i in client.instances() if i.name == "b"])
        assert switched.changed and switched.status.state is S.READY, switched
        assert switched.status.model_spec is not None and "--served-model-name" in switched.status.model_spec
        assert answered_by(daemon.url, "b")["pid"] == str(switched.status.pid)
        again = client.switch("b")
        assert not again.changed and "already loaded" in again.message
        client.stop()
        assert running(client.instances()) == {}


def test_load_errors(daemon: Daemon) -> None:
    lines: list[str] = []
    with VLLMProxyClient(daemon.url, progress=lines.append) as client:
        track(daemon, [client.load("a", progress=False).instance])  # pinned on GPU 0, half of it
        with pytest.raises(NoRoomError) as no_room:
            client.load("big")  # 0.9 of GPU 0: a is pinned, nothing can go
        assert no_room.value.status_code == 503 and no_room.value.retry_after is not None
        assert "Cannot load big now" in str(no_room.value) and "a" in no_room.value.message
        assert lines[-1].split("] ", 1)[1].startswith("FAILED: Cannot load big now")
        assert set(running(client.instances())) == {"a"}

        with pytest.raises(UnknownModelError) as unknown:
            client.unload("nope")
        assert unknown.value.status_code == 404 and "'nope' does not exist" in str(unknown.value)
        known = str(unknown.value).split("can be used: ", 1)[1]
        assert "a" in re.findall(r"[\w-]+", known)  # the names that would work

        with pytest.raises(SwitchError) as failed:
            client.load("broken")
        assert failed.value.state == "failed" and "FAILED: " in lines[-1]
        assert any("CUDA out of memory" in line for line in failed.value.log_tail)
        assert "CUDA out of memory" in str(failed.value)
        track(daemon, client.instances())
        assert set(running(client.instances())) == {"a"}  # a kept running
        client.stop()
        assert running(client.instances()) == {}


async def test_the_async_client_and_a_load_in_the_background(daemon: Daemon) -> None:
    lines: list[str] = []
    async with AsyncVLLMProxyClient(daemon.url, progress=lines.append) as client:
        started = await client.load("slow", wait=False)  # answered at once, loads for 3 s
        assert started.changed and started.name == "slow"
        assert started.instance.state in (S.STOPPED, S.STARTING)
        with pytest.raises(WaitTimeout, match=r"load\('slow'\)"):
            await client.load("slow", timeout=0.0, progress=False)  # gives up at once; it goes on
        ready = await client.load("slow")  # waits for the load under way: starts nothing twice
        track(daemon, [ready.instance])
        assert ready.instance.state is S.READY and not ready.changed
        assert lines[-1].split("] ", 1)[1].startswith("slow is ready after")
        listed = running(await client.instances())
        assert set(listed) == {"slow"} and listed["slow"].gpus == ["1"]
        assert listed["slow"].started_at == ready.instance.started_at  # one launch only
        assert "org/slow" in await client.logs(model="slow")
        assert (await client.unload("slow", force=True)).changed
        assert running(await client.instances()) == {}
        assert "slow" not in running((await client.stop(model="slow")).instances)  # harmless


def test_ps_load_unload_and_stop_model_commands(group: click.Group, daemon: Daemon) -> None:
    url = daemon.url
    result = invoke(group, "load", "--url", url, "a")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "loading a" in out and "vLLM started (pid" in out and "Loading weights took" in out
    assert out.rstrip().splitlines()[-1].split("] ", 1)[1].startswith("a is ready after")

    result = invoke(group, "load", "--url", url, "--no-wait", "b")
    assert result.exit_code == 0 and result.stdout.startswith("b is "), result.output  # the answer at once
    result = invoke(group, "load", "--url", url, "--json", "--no-progress", "b")  # waits for it
    assert result.exit_code == 0, result.output
    loaded = json.loads(result.stdout)  # stdout is pure JSON
    assert loaded["name"] == "b" and loaded["instance"]["state"] == "ready"
    assert loaded["instance"]["gpus"] == ["1"]

    listed = json.loads(invoke(group, "ps", "--url", url, "--json").stdout)
    track(daemon, [InstanceStatus.model_validate(item) for item in listed])
    assert {i["name"] for i in listed if i["state"] == "ready"} == {"a", "b"}
    table = invoke(group, "ps", "--url", url).stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "STATE", "MODEL", "GPUS"]
    rows = {cells[0]: cells for cells in (line.replace(" * ", "   ").split() for line in table[1:])}
    model = {i["name"]: i["model"] for i in listed}  # the served name vLLM reports
    assert rows["a"][1:5] == ["ready", model["a"], "0", "0.5"] and rows["a"][-2] == "yes"  # pinned
    assert rows["b"][1:4] == ["ready", model["b"], "1"] and rows["b"][-2] == "-"
    assert " * " in next(line for line in table if line.startswith("b "))  # the last loaded: primary

    result = invoke(group, "unload", "--url", url, "nope")
    assert result.exit_code == 1 and "'nope' does not exist" in result.stderr

    assert invoke(group, "unload", "--url", url, "b").exit_code == 0
    result = invoke(group, "stop", "--url", url, "--model", "a")
    assert result.exit_code == 0 and result.stdout.startswith("Stopped a (")
    result = invoke(group, "stop", "--url", url, "--model", "a")
    assert result.exit_code == 0 and result.stdout.strip() == "a was not running."
    assert not [i for i in json.loads(invoke(group, "ps", "--url", url, "--json").stdout) if i["pid"]]


class RefuseB:
    """A plugin that refuses every load of the entry ``b``."""

    @hookimpl
    async def pre_switch(self, ctx: HookContext) -> None:
        if ctx.instance == "b":
            raise Veto("b is not allowed during the maintenance window")


async def test_a_refused_load_raises_and_the_others_keep_serving(make_proxy: Any) -> None:
    """A plugin's veto ends the load before any launch: the client says the load did not start
    (the proxy's 409 goes to the background load; /status does not carry the plugin's reason)."""
    models = {
        "a": {"model": "org/a", "args": FAST, "gpus": [0]},
        "b": {"model": "org/b", "args": FAST, "gpus": [1]},
    }
    proxy = await make_proxy(models=models, gpus=("0", "1"), extra_plugins=[("maintenance", RefuseB())])
    lines: list[str] = []
    async with AsyncVLLMProxyClient(proxy.url, progress=lines.append) as client:
        loaded = await client.load("a")
        assert loaded.instance.pid is not None
        proxy.groups.add(loaded.instance.pid)
        with pytest.raises(SwitchError) as refused:
            await client.load("b")
        assert refused.value.message.startswith("the load of b did not start")
        assert refused.value.state == "stopped" and refused.value.log_tail == []
        assert lines[-1].split("] ", 1)[1].startswith("FAILED: the load of b did not start")
        assert set(running(await client.instances())) == {"a"}
        await client.stop()
