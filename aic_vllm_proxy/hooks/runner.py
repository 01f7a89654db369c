"""Loading plugins and calling their hooks.

Loading is explicit: :func:`load_plugins` is called when the daemon starts, never at import
time. Calls go through :class:`HookRunner`, which awaits async hooks, runs plain ones in a
thread (so they cannot block the event loop), bounds each call with a timeout and turns the
outcome into :class:`~aic_vllm_proxy.schemas.HookReport` entries.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import time
from collections.abc import Iterable
from dataclasses import replace
from importlib.metadata import entry_points
from typing import Any

import pluggy

from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.events import UNHEARD, EventBus
from aic_vllm_proxy.hooks.specs import (
    ENTRY_POINT_GROUP,
    HOOK_NAMES,
    PROJECT,
    HookContext,
    HookSpecs,
    Veto,
)
from aic_vllm_proxy.schemas import HookReport, PluginInfo

log = logging.getLogger(__name__)


class PluginLoadError(RuntimeError):
    pass


def _hooks_of(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    return sorted(caller.name for caller in pm.get_hookcallers(plugin) or [] if caller.name in HOOK_NAMES)


def _unsupported(function: Any, wrapper: bool) -> str | None:
    """Why :class:`HookRunner` cannot call this implementation, or None. It calls each one
    on its own and awaits or runs what it returns, so a wrapper, which pluggy would run around
    the others, or a generator, whose body would never run, would be reported ok unrun."""
    if wrapper:
        return "is a hookwrapper/wrapper, which aic_vllm_proxy does not support"
    if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
        return "is a generator (it yields), so its body would never run"
    return None


def _register(pm: pluggy.PluginManager, name: str, plugin: object, source: str) -> list[str]:
    """Register ``plugin`` as ``name``; its hooks. Refused with :class:`PluginLoadError` when
    pluggy refuses it or a hook is one :class:`HookRunner` cannot call."""
    try:
        pm.register(plugin, name=name)
    except Exception as exc:
        raise PluginLoadError(f"plugin {name!r} ({source}) failed to load: {exc}") from exc
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            why = _unsupported(impl.function, impl.hookwrapper or impl.wrapper)
            if impl.plugin is plugin and why:
                raise PluginLoadError(
                    f"plugin {name!r} ({source}): its {caller.name} hook {why}; "
                    "write a plain function or an async def"
                )
    return _hooks_of(pm, plugin)


def load_plugins(
    settings: Settings, extra: Iterable[tuple[str, object]] = ()
) -> tuple[pluggy.PluginManager, list[PluginInfo]]:
    """Register the installed entry-point plugins (filtered by the enable/disable settings)
    and ``extra`` (name, plugin) pairs; return the manager and what was found."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(HookSpecs)
    infos: list[PluginInfo] = []
    enable, disable = set(settings.plugins_enable), set(settings.plugins_disable)
    # Sorted by name: the order (and so the hook order) must not depend on the file system.
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        version = ep.dist.version if ep.dist is not None else None
        wanted = (not enable or ep.name in enable) and ep.name not in disable
        if not wanted:
            infos.append(PluginInfo(name=ep.name, version=version, enabled=False, source=ep.value))
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginLoadError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        hooks = _register(pm, ep.name, plugin, ep.value)
        infos.append(PluginInfo(name=ep.name, version=version, hooks=hooks, source=ep.value))
    for name, plugin in extra:
        infos.append(
            PluginInfo(name=name, hooks=_register(pm, name, plugin, repr(plugin)), source=repr(plugin))
        )
    missing = enable - {info.name for info in infos}
    if missing:
        raise PluginLoadError(
            f"plugins to enable are not installed: {', '.join(sorted(missing))} "
            f"(installed: {', '.join(i.name for i in infos) or 'none'})"
        )
    return pm, infos


def import_plugin(spec: str) -> tuple[str, object]:
    """``module`` or ``module:attribute`` → (name, plugin), for ``--plugin`` on the command line."""
    module_name, _, attr = spec.partition(":")
    try:
        plugin: object = importlib.import_module(module_name)
        if attr:
            plugin = getattr(plugin, attr)
    except (ImportError, AttributeError) as exc:
        raise PluginLoadError(f"cannot import plugin {spec!r}: {exc}") from exc
    return spec, plugin


class HookRunner:
    """Calls one hook on every plugin that implements it, in pluggy's order."""

    def __init__(self, pm: pluggy.PluginManager, settings: Settings, events: EventBus = UNHEARD) -> None:
        self.pm = pm
        self.settings = settings
        self.events = events  # each call's report (the metrics count them by hook, plugin, outcome)

    async def call(self, ctx: HookContext) -> list[HookReport]:
        """Run ``ctx.event`` on each plugin. A :class:`Veto` or failure of ``pre_switch`` is
        raised (after reporting); every other outcome becomes a report."""
        caller = getattr(self.pm.hook, ctx.event)
        reports: list[HookReport] = []
        # pluggy calls the last registered first (tryfirst/trylast respected).
        for impl in reversed(caller.get_hookimpls()):
            own = replace(ctx, plugin_config=self.settings.plugin_config(impl.plugin_name))
            report = await self._call_one(impl.plugin_name, impl.function, own)
            reports.append(report)
        return reports

    async def _call_one(self, plugin: str, function: Any, ctx: HookContext) -> HookReport:
        started = time.monotonic()
        timeout = self.settings.hook_timeout
        try:
            if inspect.iscoroutinefunction(function):
                result = await asyncio.wait_for(function(ctx=ctx), timeout)
            else:
                result = await asyncio.wait_for(asyncio.to_thread(function, ctx=ctx), timeout)
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, timeout)
        except Veto as exc:
            report = HookReport(
                hook=ctx.event,
                plugin=plugin,
                ok=False,
                message=str(exc),
                seconds=time.monotonic() - started,
            )
            self._told(ctx, report, "veto")
            if ctx.event in VETOABLE:
                raise HookVeto(report) from exc
            log.warning("%s hook of %s: %s", ctx.event, plugin, exc)
            return report
        except Exception as exc:
            timed_out = isinstance(exc, asyncio.TimeoutError)
            message = f"timed out after {timeout:g} s" if timed_out else f"{type(exc).__name__}: {exc}"
            report = HookReport(
                hook=ctx.event,
                plugin=plugin,
                ok=False,
                message=message,
                seconds=time.monotonic() - started,
            )
            self._told(ctx, report, "timeout" if timed_out else "error")
            log.error("%s hook of %s failed: %s", ctx.event, plugin, message)
            if ctx.event == "pre_switch":
                raise HookFailed(report) from exc
            return report
        message = result if isinstance(result, str) else ""
        report = HookReport(
            hook=ctx.event,
            plugin=plugin,
            ok=True,
            message=message,
            seconds=time.monotonic() - started,
        )
        self._told(ctx, report, "ok")
        return report

    def _told(self, ctx: HookContext, report: HookReport, outcome: str) -> None:
        """Publish a call's report (a ``hook`` event): outcome ok, veto, error or timeout."""
        self.events.publish(
            "hook",
            ctx.instance or None,
            hook=report.hook,
            plugin=report.plugin,
            outcome=outcome,
            message=report.message,
            seconds=round(report.seconds, 3),
        )


#: The hooks whose :class:`Veto` refuses what is about to happen (a switch or load; a sleep,
#: which then becomes a stop).
VETOABLE = frozenset({"pre_switch", "pre_sleep"})


class HookVeto(Exception):
    """A pre_switch (or pre_sleep) hook refused what was about to happen."""

    def __init__(self, report: HookReport) -> None:
        super().__init__(report.message)
        self.report = report


class HookFailed(Exception):
    """A pre_switch hook crashed or timed out (the switch does not go on)."""

    def __init__(self, report: HookReport) -> None:
        super().__init__(report.message)
        self.report = report
