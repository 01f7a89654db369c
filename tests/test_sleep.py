"""Sleep mode in the fleet (issue 14's proof) against the simulator: the real daemon (``serve``)
with a catalogue whose entries say ``sleep = 1`` or ``sleep = 2`` and share GPU 0, so that
loading one evicts, that is parks, the other (``tests/test_fleet.py``'s ``fleet`` fixture).

- park and wake by a request, by ``POST /load`` and by ``POST /switch``: the parked instance
  keeps its process, port and log, ``/status`` and ``GET /v1/models`` say ``sleeping``; waking
  takes far less than the model's (slow) cold start;
- requests in flight on the model being parked finish whole first;
- level 2: after the wake the weights were reloaded (the simulator answers ``<garbage>``
  tokens until ``reload_weights``);
- a wake that fails or hangs ends with the model started cold; a ``pre_sleep`` veto stops it;
- ``--host-memory-budget``: parking past it stops the least recently used sleeper;
- only an instance with sleep mode gets ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``;
- a SIGKILLed proxy leaves no process, sleeping ones included; clients never reach the
  development routes, even while models sleep.

``/switch`` to a sleep entry loads it beside the slot (a parked model keeps its port; the
slot's ``--vllm-port`` is for models that stop), so switching back and forth parks and wakes.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import test_fleet
from helpers import (
    CHAT,
    chat_request,
    free_port_run,
    group_members,
    process_exists,
    sse_data,
    sse_text,
    wait_until,
)
from plugin_env import Dist, write_site
from test_fleet import Fleet, StartFleet, port_of

from aic_vllm_proxy.client import SwitchError, VLLMProxyClient
from aic_vllm_proxy.simulator.server import INSTANCE_HEADER, parse_instance_header

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

fleet = test_fleet.fleet  # the fixture: a daemon with a catalogue on --gpus 0,1

#: Quick simulator start-up (import and load) for the entries whose cold start is not measured.
QUICK = "--sim-import-delay 0.05 --sim-load-delay 0.2"
#: A cold start slow enough to tell from a wake (the simulator's wake takes 0.05 s).
SLOW_LOAD = 6.0
SLOW_START = f"--sim-import-delay 0.05 --sim-load-delay {SLOW_LOAD:g}"
#: 0.2 s per streamed token: a stream of 15 tokens lasts 3 s.
SLOW_TOKENS = "--sim-token-delay 0.2"


def entry(name: str, *, sleep: int, args: str = QUICK, gpus: str = "[0]", share: float = 0.6) -> str:
    """One ``[models.NAME]`` table (model ``org/NAME``); two entries of share 0.6 on one GPU
    cannot run together: loading one evicts the other."""
    return (
        f"[models.{name}]\n"
        f'model = "org/{name}"\n'
        f"args = {json.dumps(args)}\n"
        f"gpus = {gpus}\n"
        f"gpu_memory_utilization = {share}\n"
        f"sleep = {sleep}\n"
    )


def catalogue(*entries: str) -> str:
    return "\n".join(entries)


def ask(daemon: Fleet, model: str, max_tokens: int = 4) -> tuple[str, dict[str, str]]:
    """A chat completion by the ``openai`` client naming ``model``: its text and which
    simulator answered."""
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with client:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=max_tokens
        )
    content = raw.parse().choices[0].message.content or ""
    return content, parse_instance_header(raw.headers[INSTANCE_HEADER])


def cards(daemon: Fleet) -> dict[str, dict[str, Any]]:
    listed = httpx.get(daemon.url + "/v1/models", timeout=30).json()
    return {card["id"]: card for card in listed["data"]}


def post(daemon: Fleet, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(daemon.url + path, json=body, timeout=120)
    assert response.status_code == 200, (response.text, daemon.proxy.read_output()[-4000:])
    answer: dict[str, Any] = response.json()
    return answer


def asleep(daemon: Fleet, name: str, awake: dict[str, Any], level: int = 1) -> dict[str, Any]:
    """``name`` is parked: sleeping in ``/status`` with the process, port and log it had awake
    (``awake``: its entry then), and ``sleeping`` in ``GET /v1/models``."""
    item = daemon.wait_for(name, "sleeping", timeout=60)
    assert item["pid"] == awake["pid"] and process_exists(item["pid"]), (item, awake)
    assert port_of(item) == port_of(awake) and item["log_path"] == awake["log_path"], (item, awake)
    assert item["sleep_level"] == level and item["slept_at"], item
    assert cards(daemon)[name]["status"] == "sleeping"
    return item


def daemon_log(daemon: Fleet) -> str:
    return str(daemon.proxy.read_output())


# ------------------------------------------------------------------ 1: park and wake


def test_park_and_wake_by_request(fleet: StartFleet) -> None:
    """``a`` (a slow cold start) is parked when ``b`` is loaded on its GPU; a request naming
    ``a`` wakes the same process, much faster than its cold start, and parks ``b``."""
    daemon = fleet(catalogue(entry("a", sleep=1, args=SLOW_START), entry("b", sleep=1)))
    started = time.monotonic()
    a = daemon.load("a")["instance"]
    cold = time.monotonic() - started
    assert cold >= SLOW_LOAD, cold
    b = daemon.load("b")["instance"]
    asleep(daemon, "a", a)
    assert daemon.instances()["b"]["state"] == "ready"

    started = time.monotonic()
    text, served = ask(daemon, "a")
    woke = time.monotonic() - started
    assert text and "<garbage>" not in text, text
    assert served == {"pid": str(a["pid"]), "port": port_of(a), "cuda_visible_devices": "0"}
    assert woke < SLOW_LOAD / 2, (woke, cold)  # a wake (0.05 s here), not a cold start (6 s)
    item = daemon.instances()["a"]
    assert (item["state"], item["pid"], item["slept_at"]) == ("ready", a["pid"], None), item
    asleep(daemon, "b", b)
    assert cards(daemon)["a"]["status"] == "ready"
    logs = sorted(path.name for path in Path(a["log_path"]).parent.glob("*_pid-*.log"))
    assert len(logs) == 2, logs  # one launch each: nothing was started again


def test_park_and_wake_by_load(fleet: StartFleet) -> None:
    daemon = fleet(catalogue(entry("a", sleep=1), entry("b", sleep=1)))
    a = daemon.load("a")["instance"]
    b = daemon.load("b")
    asleep(daemon, "a", a)
    woken = daemon.load("a")
    assert woken["woke"] is True and woken["changed"] is True, woken
    assert woken["instance"]["pid"] == a["pid"] and woken["instance"]["state"] == "ready", woken
    asleep(daemon, "b", b["instance"])
    _, served = ask(daemon, "a")
    assert served["pid"] == str(a["pid"])


def test_park_and_wake_by_switch(fleet: StartFleet) -> None:
    """``/switch a`` while ``a`` sleeps beside the slot: it is woken, not started again (the
    same process), and ``b``, the model on its GPU, is parked rather than stopped."""
    daemon = fleet(catalogue(entry("a", sleep=1), entry("b", sleep=1)))
    a = daemon.load("a")["instance"]
    b = daemon.load("b")["instance"]
    asleep(daemon, "a", a)
    switched = daemon.switch("a")
    assert switched["woke"] is True, switched
    assert switched["status"]["pid"] == a["pid"] and switched["status"]["state"] == "ready", switched
    _, served = ask(daemon, "a")
    assert served["pid"] == str(a["pid"])
    asleep(daemon, "b", b)  # switched away from: parked


def test_park_and_wake_by_switch_of_free_form_specs(fleet: StartFleet) -> None:
    """The same with free-form specs parked by ``--default-sleep-level 1`` (each takes the whole
    node): ``/switch`` to the sleeping one wakes it, and the other, switched away from, is
    parked, not stopped."""
    daemon = fleet("", "--default-sleep-level", "1")
    x = post(daemon, "/load", {"model": f"org/x {QUICK}", "wait": True})["instance"]
    y = post(daemon, "/load", {"model": f"org/y {QUICK}", "wait": True})["instance"]
    daemon.groups.update((x["pid"], y["pid"]))
    asleep(daemon, x["name"], x)
    switched = daemon.switch(f"org/x {QUICK}")
    assert switched["woke"] is True and switched["status"]["pid"] == x["pid"], switched
    _, served = ask(daemon, "org/x")
    assert served["pid"] == str(x["pid"])
    asleep(daemon, y["name"], y)


def test_an_idle_instance_is_parked_after_its_ttl(fleet: StartFleet) -> None:
    """TTL expiry parks a sleep entry instead of stopping it; a request wakes it."""
    daemon = fleet(catalogue(entry("a", sleep=1) + "ttl = 2\n"))
    a = daemon.load("a")["instance"]
    item = asleep(daemon, "a", a)
    assert item["expires_at"] is None, item
    assert "parking a: idle for 2 s (its ttl)" in daemon_log(daemon)
    _, served = ask(daemon, "a")
    assert served["pid"] == str(a["pid"])
    assert daemon.instances()["a"]["state"] == "ready"


# -------------------------------------------------------------- 2: drained, never cut


def test_requests_in_flight_finish_before_the_sleep(fleet: StartFleet) -> None:
    """``b`` streams (3 s) when loading ``a`` parks it: the park waits for the stream, which
    ends whole, then ``b`` sleeps. (``--min-residency 0``: a busy instance young as ``b`` is
    evicted at once rather than waited for.)"""
    config = catalogue(entry("a", sleep=1), entry("b", sleep=1, args=f"{QUICK} {SLOW_TOKENS}"))
    daemon = fleet(config, "--min-residency", "0")
    b = daemon.load("b")["instance"]
    begun = threading.Event()

    def stream_b() -> bytes:
        body = chat_request("b", stream=True, max_tokens=15)
        with httpx.stream("POST", daemon.url + CHAT, json=body, timeout=120) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            received = next(chunks)
            begun.set()
            return received + b"".join(chunks)

    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream_b)
        assert begun.wait(60)
        loading = pool.submit(daemon.load, "a")
        parking = daemon.wait_for("b", "parking", timeout=30)  # the park waits for the stream
        assert parking["in_flight"] == 1, parking
        events = sse_data(streamed.result(60))
        a = loading.result(120)["instance"]
    assert events[-1] == "[DONE]" and len(sse_text(events).split()) == 15, events
    assert '"finish_reason":"length"' in "".join(events).replace(" ", ""), events
    asleep(daemon, "b", b)
    assert a["state"] == "ready"


# ------------------------------------------------------------------------ 3: level 2


def test_level_2_wake_reloads_the_weights(fleet: StartFleet) -> None:
    """Level 2 drops the weights: the daemon wakes with ``/wake_up``, ``reload_weights`` and a
    reset of the prefix cache, so the answers are text again, not the simulator's garbage."""
    daemon = fleet(catalogue(entry("a", sleep=2), entry("b", sleep=1)))
    a = daemon.load("a")["instance"]
    daemon.load("b")
    asleep(daemon, "a", a, level=2)
    for _ in range(2):
        text, served = ask(daemon, "a", max_tokens=6)
        assert served["pid"] == str(a["pid"])
        assert "<garbage>" not in text and "tok" in text, text
    vllm_log = Path(a["log_path"]).read_text(errors="replace")
    woke = vllm_log.index("wake up the engine with tags")
    reloaded = vllm_log.index("Reloading weights inplace", woke)
    assert vllm_log.index("Resetting prefix cache", reloaded) > reloaded


# -------------------------------------------------------------------- 4: failures


@pytest.mark.parametrize(
    ("flag", "extra", "reason"),
    [
        ("--sim-wake-fails", (), "CUDA Error: out of memory"),
        ("--sim-wake-hangs", ("--ready-timeout", "8"), "within 8 s"),
    ],
    ids=["fails", "hangs"],
)
def test_a_wake_that_fails_or_hangs_starts_the_model_cold(
    fleet: StartFleet, flag: str, extra: tuple[str, ...], reason: str
) -> None:
    daemon = fleet(catalogue(entry("a", sleep=1, args=f"{QUICK} {flag}"), entry("b", sleep=1)), *extra)
    a = daemon.load("a")["instance"]
    daemon.load("b")
    asleep(daemon, "a", a)
    text, served = ask(daemon, "a")
    assert text and served["pid"] != str(a["pid"]), served  # a new process: started cold
    item = daemon.instances()["a"]
    assert item["state"] == "ready" and str(item["pid"]) == served["pid"], item
    daemon.groups.add(item["pid"])
    assert wait_until(lambda: not group_members(a["pid"]), 30), group_members(a["pid"])
    output = daemon_log(daemon)
    assert "waking a failed" in output and "starting it cold" in output, output[-4000:]
    line = next(line for line in output.splitlines() if "waking a failed" in line)
    assert reason in line, line


#: An entry-point plugin whose pre_sleep refuses every sleep.
NO_SLEEP = """
from aic_vllm_proxy.hooks import HookContext, Veto, hookimpl


class NoSleep:
    @hookimpl
    def pre_sleep(self, ctx: HookContext) -> None:
        raise Veto("no sleeping on this node")


plugin = NoSleep()
"""


def test_a_pre_sleep_veto_stops_the_instance(spawn_proxy: Any, vllm_groups: set[int], tmp_path: Path) -> None:
    """An entry-point plugin vetoes ``pre_sleep``: ``a`` is stopped instead of parked."""
    module = tmp_path / "no_sleep_plugin.py"
    module.write_text(NO_SLEEP)
    dist = Dist("no-sleep", "0.1.0", {"no-sleep": "no_sleep_plugin:plugin"}, {"no_sleep_plugin": module})
    site = write_site(tmp_path / "site", dist)
    config = tmp_path / "fleet-veto.toml"
    config.write_text(catalogue(entry("a", sleep=1), entry("b", sleep=1)))
    # As the fleet fixture starts a daemon, with the plugin on its PYTHONPATH.
    vllm_port = free_port_run(4)
    proxy = spawn_proxy(
        "--config", str(config), "--gpus", "0,1", "--vllm-port", str(vllm_port), env={"PYTHONPATH": str(site)}
    )
    daemon = Fleet(proxy, vllm_port, vllm_groups)
    a = daemon.load("a")["instance"]
    daemon.load("b")
    item = daemon.wait_for("a", "stopped", timeout=60)
    assert item["pid"] is None, item
    assert wait_until(lambda: not group_members(a["pid"]), 30), group_members(a["pid"])
    assert cards(daemon)["a"]["status"] == "stopped"
    output = daemon_log(daemon)
    assert "a is stopped, not parked: plugin no-sleep refused the sleep" in output, output[-4000:]
    assert daemon.instances()["b"]["state"] == "ready"


# ---------------------------------------------------------------------- 5: host RAM


def test_parking_past_the_host_budget_stops_the_least_recently_used_sleeper(fleet: StartFleet) -> None:
    """Weights of 2 GiB each (vLLM's log says so), a budget of 3 GiB: ``a`` parks, then parking
    ``b`` would hold 4 GiB, so ``a``, the least recently used sleeper, is stopped first."""
    weights = f"{QUICK} --sim-weights-gib 2"
    config = catalogue(*(entry(name, sleep=1, args=weights) for name in ("a", "b", "c")))
    daemon = fleet(config, "--host-memory-budget", "3GiB")
    a = daemon.load("a")["instance"]
    b = daemon.load("b")["instance"]
    asleep(daemon, "a", a)
    daemon.load("c")
    asleep(daemon, "b", b)
    item = daemon.wait_for("a", "stopped", timeout=60)
    assert item["pid"] is None, item
    assert wait_until(lambda: not group_members(a["pid"]), 30), group_members(a["pid"])
    assert "stopping a, asleep: host RAM for b" in daemon_log(daemon), daemon_log(daemon)[-4000:]
    assert daemon.instances()["c"]["state"] == "ready"


# --------------------------------------------------------------- 6: what vLLM is given


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def command_line(pid: int) -> list[str]:
    return [arg.decode(errors="replace") for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]


def test_only_a_sleeping_instance_gets_sleep_mode_and_dev_mode(fleet: StartFleet) -> None:
    daemon = fleet(catalogue(entry("a", sleep=1), entry("c", sleep=0, gpus="[1]")))
    a = daemon.load("a")["instance"]
    c = daemon.load("c")["instance"]
    assert environ(a["pid"]).get("VLLM_SERVER_DEV_MODE") == "1"
    assert "--enable-sleep-mode" in command_line(a["pid"])
    assert "VLLM_SERVER_DEV_MODE" not in environ(c["pid"])
    assert "--enable-sleep-mode" not in command_line(c["pid"])
    assert "VLLM_SERVER_DEV_MODE" not in environ(daemon.proxy.process.pid)  # its own environment only


def test_switching_back_and_forth_parks_and_wakes(fleet: StartFleet) -> None:
    """``/switch a``, ``/switch b``, ``/switch a`` with sleep entries on one GPU (the notebook
    user's switch): each switch parks the model it leaves and the last one wakes ``a`` (the same
    process, far faster than its cold start); the slot (``--vllm-port``) is never used, since a
    parked model keeps its port; each answer says how long the start or the wake took."""
    daemon = fleet(catalogue(entry("a", sleep=1, args=SLOW_START), entry("b", sleep=1)))
    first = daemon.switch("a")
    a = daemon.instances()["a"]
    assert (first["changed"], first["woke"], first["wake_seconds"]) == (True, False, None), first
    assert first["load_seconds"] >= SLOW_LOAD and first["status"]["pid"] == a["pid"], first
    assert port_of(a) != str(daemon.vllm_port) and "--enable-sleep-mode" in command_line(a["pid"])
    assert environ(a["pid"]).get("VLLM_SERVER_DEV_MODE") == "1"

    second = daemon.switch("b")
    assert second["changed"] is True and second["woke"] is False, second
    asleep(daemon, "a", a)
    b = daemon.instances()["b"]
    assert second["status"]["pid"] == b["pid"] and second["status"]["model_spec"].startswith("org/b")

    started = time.monotonic()
    third = daemon.switch("a")
    took = time.monotonic() - started
    assert third["woke"] is True and third["load_seconds"] is None, third
    assert 0 < third["wake_seconds"] <= third["total_seconds"] < SLOW_LOAD / 2, third
    assert took < SLOW_LOAD / 2, took  # a wake, not a cold start
    assert third["status"]["pid"] == a["pid"] and third["status"]["state"] == "ready", third
    asleep(daemon, "b", b)
    _, served = ask(daemon, "a")
    assert served["pid"] == str(a["pid"])
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}  # no "model"
    unnamed = httpx.post(daemon.url + "/v1/chat/completions", json=body, timeout=60)
    assert unnamed.status_code == 200, unnamed.text  # the primary, a, takes a request naming none
    assert parse_instance_header(unnamed.headers[INSTANCE_HEADER])["pid"] == str(a["pid"])
    again = daemon.switch("a")
    assert (again["changed"], again["woke"]) == (False, False), again
    assert "already loaded" in again["message"]
    assert daemon.instances().get("primary") is None  # the slot never loaded anything


def test_switching_between_a_sleep_entry_and_one_without(fleet: StartFleet) -> None:
    """``c`` (no sleep level) loads in the slot, on ``--vllm-port``; ``/switch a`` (sleep 1)
    stops it and loads ``a`` beside; ``/switch c`` starts ``c`` in the slot again and parks ``a``;
    ``/switch a`` wakes ``a`` and stops ``c``."""
    daemon = fleet(catalogue(entry("a", sleep=1), entry("c", sleep=0)))
    c = daemon.switch("c")["status"]
    assert c["vllm_base"].endswith(f":{daemon.vllm_port}") and c["state"] == "ready", c
    a = daemon.switch("a")["status"]
    assert not a["vllm_base"].endswith(f":{daemon.vllm_port}") and a["state"] == "ready", a
    assert daemon.wait_for("c", "stopped")["pid"] is None
    again = daemon.switch("c")
    assert again["changed"] is True and again["status"]["pid"] != c["pid"], again
    asleep(daemon, "a", daemon.instances()["a"])
    woken = daemon.switch("a")
    assert woken["woke"] is True and woken["status"]["pid"] == a["pid"], woken
    assert daemon.wait_for("c", "stopped")["pid"] is None
    _, served = ask(daemon, "a")
    assert served["pid"] == str(a["pid"])


def test_a_background_switch_to_a_sleep_entry_is_followed_by_the_client(fleet: StartFleet) -> None:
    """The client's ``switch`` (``"wait": false``, then ``/status``): the switch beside the slot
    is pending in ``/status`` from the 202 on, so the client follows it to the end: the cold
    start of ``b``, then the wake of ``a``; a failed one ends with the root cause."""
    daemon = fleet(
        catalogue(
            entry("a", sleep=1),
            entry("b", sleep=1, args=f"{QUICK} --sim-load-delay 2"),
            entry("broken", sleep=1, args=f"{QUICK} --sim-fail-during-load"),
        )
    )
    proxy = VLLMProxyClient(daemon.url, poll_interval=0.1)
    lines: list[str] = []
    a = proxy.switch("a", progress=lines.append)
    assert a["changed"] is True and a["status"]["model_spec"].startswith("org/a"), a
    accepted = httpx.post(daemon.url + "/switch", json={"model_spec": "b", "wait": False}, timeout=30)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["switching"] is True and accepted.json()["target_model_spec"].startswith("org/b")
    b = proxy.wait_until_ready(timeout=60)
    assert b["model_spec"].startswith("org/b") and b["state"] == "ready", b
    asleep(daemon, "a", daemon.instances()["a"])
    woken = proxy.switch("a", progress=lines.append)
    assert woken["woke"] is True and woken["status"]["state"] == "ready", woken
    assert woken["load_seconds"] is None and "a woke after" in woken["message"], woken
    shown = [line.split("] ", 1)[1] for line in lines]
    assert f"waking org/a (pid {a['status']['pid']})" in shown, shown  # not its start-up log again
    assert shown[-1].startswith("org/a woke after"), shown
    assert sum(line.startswith("vLLM started") for line in shown) == 1, shown  # a's cold start only
    loaded = proxy.load("b", progress=lines.append)  # the client's load follows a wake too
    assert loaded["woke"] is True and loaded["instance"]["state"] == "ready", loaded
    asleep(daemon, "a", daemon.instances()["a"])
    with pytest.raises(SwitchError) as failed:
        proxy.switch("broken", progress=lines.append)
    assert "out of memory" in failed.value.message.lower(), failed.value.message
    status = daemon.status()
    assert status["switching"] is False and status["last_switch_error"], status


# ------------------------------------------------------------------ 7: proxy SIGKILL


def test_proxy_sigkill_while_models_sleep_leaves_no_process(fleet: StartFleet) -> None:
    daemon = fleet(catalogue(*(entry(name, sleep=1) for name in ("a", "b", "c"))))
    instances = [daemon.load(name)["instance"] for name in ("a", "b", "c")]
    for item in instances[:2]:
        asleep(daemon, item["name"], item)
    pids = [item["pid"] for item in instances]
    trees = {pgid: group_members(pgid) for pgid in pids}
    assert all(len(tree) >= 2 for tree in trees.values()), trees  # API server and EngineCore each
    daemon.proxy.process.kill()
    daemon.proxy.process.wait(10)
    assert wait_until(lambda: not any(group_members(pgid) for pgid in pids), 20), {
        pgid: group_members(pgid) for pgid in pids
    }
    assert not any(process_exists(pid) for tree in trees.values() for pid in tree)


# ------------------------------------------------------------- 8: dev routes refused


def test_dev_routes_are_refused_while_models_sleep(fleet: StartFleet) -> None:
    """A client cannot wake (or put to sleep, or call into) a sleeping vLLM through the proxy:
    404 of the proxy's, and the sleeper still sleeps."""
    daemon = fleet(catalogue(entry("a", sleep=1), entry("b", sleep=1)))
    a = daemon.load("a")["instance"]
    b = daemon.load("b")["instance"]
    asleep(daemon, "a", a)
    for method, path, body in (
        ("POST", "/wake_up", None),
        ("POST", "/sleep?level=1&mode=abort", None),
        ("GET", "/is_sleeping", None),
        ("POST", "/collective_rpc", {"method": "reload_weights"}),
        ("POST", "/reset_prefix_cache", None),
    ):
        response = httpx.request(method, daemon.url + path, json=body, timeout=30)
        assert response.status_code == 404, (path, response.status_code, response.text)
        assert INSTANCE_HEADER not in response.headers, (path, response.headers)
    still = httpx.get(f"http://127.0.0.1:{port_of(a)}/is_sleeping", timeout=30).json()
    assert still == {"is_sleeping": True}  # asked of vLLM itself, not through the proxy
    assert daemon.instances()["a"]["state"] == "sleeping"
    item = daemon.instances()["b"]
    assert (item["state"], item["pid"]) == ("ready", b["pid"])
