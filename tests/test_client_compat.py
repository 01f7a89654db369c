"""Notebooks written for the first client keep working: ``status()`` and ``switch()`` return the
JSON dict of the answer (``st["model_spec"]``, ``st.get("running")``, ``json.dumps(st)``,
``dict(st)``, ``st.keys()``) and, at the same time, the typed object (``st.state`` is a
``ProcessState``), and ``print()`` of either is a few readable lines (issue 16, item 11).

Against a real proxy and real simulator processes: the sync client with the proxy as a
subprocess (the test's own thread blocks, as a notebook cell does), the async client with the
proxy in this process.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import FAST

from aic_vllm_proxy.client import (
    AsyncVLLMProxyClient,
    ProcessState,
    StatusDict,
    SwitchError,
    SwitchResultDict,
    VLLMProxyClient,
)
from aic_vllm_proxy.schemas import Status, SwitchResult

S = ProcessState
pytestmark = pytest.mark.timeout(120)
#: What ``print()`` of the pydantic objects showed, and must not any more.
PYDANTIC_NOISE = re.compile(r"ProcessState\.|datetime\.datetime|TzInfo|\w+=<|\w+='")


def server_json(url: str) -> dict[str, Any]:
    """``GET /status`` as the proxy sends it."""
    body: dict[str, Any] = httpx.get(f"{url}/status", timeout=30).json()
    return body


def printed_rows(text: str) -> dict[str, str]:
    """``name: value`` lines as a dict."""
    rows = [line.split(":", 1) for line in text.strip().splitlines()]
    return {name.strip(): value.strip() for name, value in rows}


def assert_read_only(view: dict[str, Any]) -> None:
    before = dict(view)
    key = next(iter(view))
    for change in (
        lambda: view.__setitem__(key, "x"),
        lambda: view.__delitem__(key),
        lambda: view.update({key: "x"}),
        lambda: view.pop(key),
        lambda: view.popitem(),
        lambda: view.setdefault("new", 1),
        lambda: view.clear(),
        lambda: view.__ior__({key: "x"}),
    ):
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert dict(view) == before
    mine = view.copy()  # a plain dict, which may be changed
    mine[key] = "x"
    assert type(mine) is dict and view[key] == before[key]


def test_field_names_do_not_hide_dict_methods() -> None:
    """A field named like a dict method (``keys``, ``items``, ``get``...) would not be reachable
    as an attribute; the models have none."""
    for model in (Status, SwitchResult):
        assert not set(model.model_fields) & set(dir(dict)), model


def test_notebook_idioms_with_the_sync_client(spawn_proxy: Any, capsys: pytest.CaptureFixture[str]) -> None:
    daemon = spawn_proxy()
    proxy = VLLMProxyClient(proxy_url=daemon.url, model2spec={"m": f"{FAST} --served-model-name chat"})

    # --- as the first client's notebooks do
    st = proxy.status()
    print(st)
    assert st["model_spec"] is None and st.get("running") is False and st.get("no-such-field") is None
    assert json.loads(json.dumps(st)) == dict(st) == server_json(daemon.url)
    assert list(st.keys()) == list(server_json(daemon.url)) and "state" in st and len(st) == len(dict(st))
    # --- and the typed attributes
    assert isinstance(st, StatusDict) and isinstance(st, dict)
    assert st.state is S.STOPPED and st["state"] == "stopped" and st.running is False
    assert isinstance(st.as_model(), Status) and st.model_dump(mode="json") == dict(st)
    assert_read_only(st)
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "state: stopped" and len(printed.splitlines()) <= 3
    assert not PYDANTIC_NOISE.search(printed), printed

    result = proxy.switch("m", progress=False)
    print(result)
    assert isinstance(result, SwitchResultDict) and isinstance(result, dict)
    assert result["changed"] is True and result.changed is True
    assert result["status"]["state"] == "ready" and result.status.state is S.READY
    assert result["status"] is result.status and result.status["model"] == "chat"
    assert result.get("load_seconds") == result.load_seconds > 0
    dumped = json.loads(json.dumps(result))
    assert dumped["message"] == result.message and dumped["status"]["pid"] == result.status.pid
    assert set(result) == set(SwitchResult.model_fields) and dict(result)["status"] == dict(result.status)
    assert_read_only(result)
    assert capsys.readouterr().out.strip() == result.message  # print(result): the summary line

    st = proxy.status()
    print(st)
    assert json.loads(json.dumps(st)) == dict(st) == server_json(daemon.url)
    assert isinstance(st["started_at"], str) and isinstance(st.started_at, datetime)
    assert datetime.fromisoformat(st["started_at"].replace("Z", "+00:00")) == st.started_at
    rows = printed_rows(capsys.readouterr().out)
    assert rows["state"] == "ready" and rows["model"] == f"chat  (m {FAST} --served-model-name chat)"
    assert rows["pid"] == str(st.pid) and "ready after" in rows["started"]
    assert rows["log"] == st.log_path and Path(rows["log"]).exists()
    assert "error" not in rows and len(rows) <= 7
    assert not PYDANTIC_NOISE.search(str(st)) and not PYDANTIC_NOISE.search(str(result))

    # the other methods that return a status return the same kind of object
    stopped = proxy.stop()
    assert isinstance(stopped, StatusDict) and stopped["state"] == "stopped"
    assert pickle.loads(pickle.dumps(result)) == result and copy.deepcopy(st) == st
    assert copy.copy(st).state is st.state
    proxy.close()


async def test_notebook_idioms_with_the_async_client(make_proxy: Any) -> None:
    proxy = await make_proxy()
    async with AsyncVLLMProxyClient(proxy.url, {"m": FAST}, progress=False) as client:
        st = await client.status()
        assert isinstance(st, StatusDict) and st.get("running") is False and st.state is S.STOPPED
        assert json.loads(json.dumps(st)) == dict(st) == await proxy.status()

        started = await client.start_switch("m")
        assert isinstance(started, StatusDict) and started["switching"] is True
        ready = await client.wait_until_ready(timeout=60)
        assert isinstance(ready, StatusDict) and ready["state"] == "ready" and ready.state is S.READY

        result = await client.switch("m")  # already loaded
        assert isinstance(result, SwitchResultDict) and result["changed"] is False
        assert json.loads(json.dumps(result))["status"]["model_spec"] == f"m {FAST}"
        assert str(result) == result["message"] and "already loaded" in str(result)

        with pytest.raises(SwitchError):
            await client.switch("broken", f"{FAST} --sim-fail-during-load")
        failed = await client.status()
        assert failed["state"] == "failed" and failed.get("exit_code") == 1
        assert json.loads(json.dumps(failed)) == dict(failed) == await proxy.status()
        rows = printed_rows(str(failed))
        assert rows["state"] == "failed" and rows["exit code"] == "1"
        assert rows["error"].startswith("vLLM exited with status 1") and Path(rows["log"]).exists()
        assert not PYDANTIC_NOISE.search(str(failed))
        await client.stop()


def test_status_text_shows_the_log_only_once_it_has_its_final_name() -> None:
    starting = Status(
        vllm_base="http://127.0.0.1:8225",
        running=True,
        state=S.STARTING,
        model_spec="m",
        model="m",
        log_path="logs/vllm/2025-01-01T00-00-00_starting-1-ab.log",
    )
    assert "log" not in printed_rows(str(StatusDict(starting)))  # renamed once the pid is known
    with_pid = starting.model_copy(update={"pid": 42, "log_path": "logs/vllm/2025-01-01T00-00-00_pid-42.log"})
    assert printed_rows(str(StatusDict(with_pid)))["log"].endswith("_pid-42.log")


def test_status_text_labels_a_gone_process_error_as_the_last_one() -> None:
    failed = Status(vllm_base="v", running=False, state=S.FAILED, model_spec="m", error="boom", exit_code=1)
    rows = printed_rows(str(StatusDict(failed)))
    assert rows["error"] == "boom" and rows["exit code"] == "1"
    stopped = failed.model_copy(update={"state": S.STOPPED, "exit_code": -15})
    rows = printed_rows(str(StatusDict(stopped)))
    assert rows["last error"] == "boom" and rows["last exit code"] == "-15" and "error" not in rows
