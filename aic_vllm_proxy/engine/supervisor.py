"""The supervisor: the daemon's vLLM instances (``instance.py``), one object for the planes above.

Today it holds one instance, the primary: the slot that ``/switch`` changes, on ``--vllm-port``
and the GPUs the daemon sees. The fleet of issue 13 (several instances on their own ports and
GPU sets, placed by ``placement.py``) grows here; the web and relay planes talk to this class
only, so what they call keeps its meaning: everything below is the primary instance's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp

from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.engine.instance import Instance
from aic_vllm_proxy.engine.launch import Launch
from aic_vllm_proxy.engine.state import ProcessStateMachine
from aic_vllm_proxy.hooks.runner import HookRunner
from aic_vllm_proxy.schemas import Status, SwitchResult
from aic_vllm_proxy.spec import ModelSpec

#: The name of the instance ``/switch`` changes.
PRIMARY = "primary"


class Supervisor:
    """The daemon's instances. All public coroutines are safe to call concurrently."""

    def __init__(
        self,
        settings: Settings,
        session: Callable[[], aiohttp.ClientSession],
        hooks: HookRunner,
    ) -> None:
        self.settings = settings
        self.primary = Instance(settings, session, hooks, name=PRIMARY, port=settings.vllm_port)
        self.instances: dict[str, Instance] = {PRIMARY: self.primary}

    # ---------------------------------------------------------------- the primary's

    @property
    def machine(self) -> ProcessStateMachine:
        return self.primary.machine

    @property
    def launch(self) -> Launch | None:
        return self.primary.launch

    @property
    def serving(self) -> bool:
        return self.primary.serving

    @property
    def waiting(self) -> int:
        return self.primary.waiting

    def status(self) -> Status:
        return self.primary.status()

    def current_log(self) -> Path | None:
        return self.primary.current_log()

    def log_is_live(self, fd: int) -> bool:
        return self.primary.log_is_live(fd)

    # ------------------------------------------------------------------- control

    async def switch(self, spec: ModelSpec, *, force: bool = False) -> SwitchResult:
        return await self.primary.switch(spec, force=force)

    def switch_in_background(self, spec: ModelSpec, *, force: bool = False) -> None:
        self.primary.switch_in_background(spec, force=force)

    async def stop(self, *, drain: bool = True) -> Status:
        await self.primary.stop(drain=drain)
        return self.status()

    async def shutdown(self) -> None:
        """On proxy exit: stop every instance and wait for their process trees to go."""
        for instance in self.instances.values():
            await instance.shutdown()
