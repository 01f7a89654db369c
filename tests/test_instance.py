"""An instance is a slot of its own: its port and its GPUs (``CUDA_VISIBLE_DEVICES``), beside
the primary instance that ``/switch`` changes (engine/instance.py; the fleet of issue 13 holds
several). Real simulator processes, read through ``/proc``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import FAST, free_port, group_members, wait_until

from aic_vllm_proxy.engine.instance import Instance
from aic_vllm_proxy.schemas import ProcessState
from aic_vllm_proxy.spec import ModelSpec
from aic_vllm_proxy.web.appkeys import HOOKS, UPSTREAM


def _environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in items if b"=" in item)


async def test_an_instance_runs_on_its_own_port_and_gpus(make_proxy: Any) -> None:
    proxy = await make_proxy()
    app = proxy.app
    port = free_port()
    second = Instance(
        proxy.settings, lambda: app[UPSTREAM], app[HOOKS], name="second", port=port, gpus=("1", "GPU-3f2a")
    )
    try:
        result = await second.switch(ModelSpec.parse(f"m {FAST}"))
        launch = second.launch
        assert launch is not None and result.changed
        proxy.groups.add(launch.pgid)
        assert second.status().vllm_base == f"http://127.0.0.1:{port}"
        members = group_members(launch.pgid)
        assert len(members) >= 2, members  # the API server and its EngineCore
        for pid in members:  # the whole tree sees the instance's GPUs, and only them
            assert _environ(pid)["CUDA_VISIBLE_DEVICES"] == "1,GPU-3f2a", pid
        async with proxy.session.get(f"http://127.0.0.1:{port}/v1/models") as resp:
            assert resp.status == 200
            assert [m["id"] for m in (await resp.json())["data"]] == ["m"]
        # The primary is another slot: untouched, and its environment is the daemon's.
        assert proxy.supervisor.status().state is ProcessState.STOPPED
    finally:
        await second.shutdown()
    assert second.status().state is ProcessState.STOPPED
    assert wait_until(lambda: group_members(launch.pgid) == [], 15)


async def test_the_primary_leaves_cuda_visible_devices_as_the_daemon_has_it(
    make_proxy: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    proxy = await make_proxy()
    code, body = await proxy.switch(f"m {FAST}")
    assert code == 200, body
    assert _environ(body["status"]["pid"])["CUDA_VISIBLE_DEVICES"] == "2,5"
