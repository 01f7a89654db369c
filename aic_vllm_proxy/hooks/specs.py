"""Lifecycle hooks: the one place where every hook is declared, with what it means.

A plugin is a module (or any object) with functions marked ``@hookimpl`` whose names are the
hooks below. Each receives one argument, ``ctx`` (a :class:`HookContext`). A hook may be a
plain function or an ``async def``: async hooks are awaited on the event loop, plain ones run
in a worker thread so that they never block proxied traffic. Every call is bounded by the
proxy's ``--hook-timeout``. A generator, and pluggy's ``hookwrapper=True`` / ``wrapper=True``
implementations, are refused when the plugin is loaded: each hook is called on its own.
Plugins are installed as entry points in the group ``aic_vllm_proxy.hooks`` and loaded when
the daemon starts (see :mod:`aic_vllm_proxy.hooks.runner`)::

    # pyproject.toml of a site package
    [project.entry-points."aic_vllm_proxy.hooks"]
    site-policy = "site_policy.hooks"

    # site_policy/hooks.py
    from aic_vllm_proxy.hooks import Veto, hookimpl

    @hookimpl
    def pre_switch(ctx):
        if not ctx.new_spec.startswith("meta-llama/"):
            raise Veto("only meta-llama models are allowed on this node")

What a hook's outcome means:

=============  ===============================  ==========================================
hook           raises :class:`Veto`             raises anything else / times out
=============  ===============================  ==========================================
pre_switch     switch refused (409), the        switch refused (500), the running model
               running model keeps running      keeps running
post_switch    reported in /status and the      same: the new model stays up
               switch response
pre_stop       reported, the stop goes on       same
post_stop      reported, the switch goes on     same
on_failure     reported                         same
=============  ===============================  ==========================================

Return values are ignored, except that a returned string is shown as the hook's message in
``/status`` and the switch response (e.g. "warm-up took 0.42 s").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import aiohttp

    from aic_vllm_proxy.config import Settings

PROJECT = "aic_vllm_proxy"
ENTRY_POINT_GROUP = "aic_vllm_proxy.hooks"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Veto(Exception):
    """Raised by a ``pre_switch`` hook to refuse a switch; the message is shown to the caller."""


@dataclass(frozen=True)
class HookContext:
    """What a hook is told about the event. Treat it as read-only."""

    #: The hook being called: "pre_switch", "post_switch", "pre_stop", "post_stop", "on_failure".
    event: str
    #: The spec loaded before this event (None when nothing was loaded).
    old_spec: str | None
    #: The spec being loaded (pre/post_switch, on_failure) or None (stops).
    new_spec: str | None
    #: The proxy's settings.
    settings: Settings
    #: Where vLLM listens, e.g. "http://127.0.0.1:8225".
    vllm_base: str
    #: The current launch's log file, if any.
    log_path: str | None
    #: The proxy's shared aiohttp session (use it for calls to vLLM or webhooks).
    session: aiohttp.ClientSession
    #: The vLLM main process id (and process group) this event is about: pre_switch, the one
    #: running now (None if none); pre/post_stop, the one stopped; post_switch, the new one;
    #: on_failure, the one that failed.
    pid: int | None = None
    #: on_failure: "start_failed" (exited while starting), "start_timeout" (not ready in time)
    #: or "crashed" (died after it was ready).
    failure: str | None = None
    #: The served model name clients use, for post_switch.
    model: str | None = None
    #: on_failure: what went wrong, the exit code and the last lines of the log.
    error: str | None = None
    exit_code: int | None = None
    log_tail: list[str] = field(default_factory=list)
    #: The instance this event is about (several models run side by side, each an instance):
    #: its name (the catalogue entry, or the served name of a free-form spec), its GPUs (the
    #: ``CUDA_VISIBLE_DEVICES`` it runs with; empty: every GPU the daemon sees) and vLLM's port.
    instance: str | None = None
    gpus: tuple[str, ...] = ()
    port: int | None = None
    #: A model across nodes (``--nnodes``): its ranks on the agents' nodes, one dict each
    #: (``rank``, ``node``, ``host``, ``pid``, ``gpus``); empty for a model on this node only
    #: and before its ranks are placed (pre_switch). Rank 0 is this daemon's (``pid``).
    ranks: tuple[dict[str, Any], ...] = ()
    #: This plugin's own settings: ``[plugins.<name>]`` in the config file plus
    #: ``AIC_VLLM_PROXY_PLUGIN_<NAME>_<KEY>`` environment variables.
    plugin_config: dict[str, Any] = field(default_factory=dict)


class HookSpecs:
    """The hook specifications. Implement any subset; names and the ``ctx`` argument must match."""

    @hookspec
    def pre_switch(self, ctx: HookContext) -> Any:
        """Before a switch stops anything, and before every load of a model beside the others
        (``POST /load``, a request that names a catalogue model, ``preload``; the instances in
        its way are already unloaded then). Raise :class:`Veto` to refuse it: the caller gets a
        409 with the reason and the running model keeps running. Typical uses: site
        allow-lists, checking that the instance's GPUs (``ctx.gpus``) have room."""

    @hookspec
    def post_switch(self, ctx: HookContext) -> Any:
        """After the new model answered ``/health`` and ``/v1/models`` (the state is ready).
        Typical uses: warm-up requests, notifications. A failure is reported, never fatal."""

    @hookspec
    def pre_stop(self, ctx: HookContext) -> Any:
        """Before SIGTERM is sent to a running vLLM: for a switch, ``/stop``, ``/unload``, an
        eviction to make room, a TTL expiry or shutdown (``ctx.instance`` says which)."""

    @hookspec
    def post_stop(self, ctx: HookContext) -> Any:
        """After vLLM's whole process group is gone. Typical use: wait until the GPU memory it
        held is released before the next model starts (bounded by the hook timeout)."""

    @hookspec
    def pre_sleep(self, ctx: HookContext) -> Any:
        """Before a parked model is put to sleep (sleep mode: an eviction, a TTL expiry or a
        switch away from it parks it instead of stopping it), after its requests in flight
        finished. Raise :class:`Veto` to refuse: the instance is stopped instead."""

    @hookspec
    def post_sleep(self, ctx: HookContext) -> Any:
        """After vLLM went to sleep: its process, port and log stay, its GPU memory is released."""

    @hookspec
    def pre_wake(self, ctx: HookContext) -> Any:
        """Before a sleeping model is woken for a request, ``/load`` or ``/switch`` (room on its
        GPUs has been made)."""

    @hookspec
    def post_wake(self, ctx: HookContext) -> Any:
        """After a sleeping model woke and takes requests again (not called when the wake failed
        and the model was started cold instead: post_switch is)."""

    @hookspec
    def on_failure(self, ctx: HookContext) -> Any:
        """vLLM failed to start, timed out, or died after it was ready. ``ctx.error``,
        ``ctx.exit_code`` and ``ctx.log_tail`` say what happened. Typical use: alerting."""


def _declared_hooks() -> tuple[str, ...]:
    specs = pluggy.PluginManager(PROJECT)
    return tuple(name for name in vars(HookSpecs) if specs.parse_hookspec_opts(HookSpecs, name) is not None)


#: The hooks, in the order :class:`HookSpecs` declares them.
HOOK_NAMES = _declared_hooks()
