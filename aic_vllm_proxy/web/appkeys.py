"""Typed keys for what the application shares between its parts (``app[KEY]``)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.engine.supervisor import Supervisor
from aic_vllm_proxy.events import EventBus
from aic_vllm_proxy.hooks.runner import HookRunner
from aic_vllm_proxy.metrics import Metrics
from aic_vllm_proxy.relay.auth import KeyRing
from aic_vllm_proxy.relay.passthrough import Passthrough
from aic_vllm_proxy.relay.upstream import UpstreamPool
from aic_vllm_proxy.schemas import PluginInfo

SETTINGS = web.AppKey("settings", Settings)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)  # probes, hooks
POOL = web.AppKey("pool", UpstreamPool)  # the proxied traffic (upstream.py)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
HOOKS = web.AppKey("hooks", HookRunner)
PLUGINS = web.AppKey("plugins", list[PluginInfo])
KEYS = web.AppKey("keys", KeyRing)
PASSTHROUGH = web.AppKey("passthrough", Passthrough)  # also served by the front door (front.py)
METRICS = web.AppKey("metrics", Metrics)  # GET /proxy/metrics (the application's own registry)
AGENTS = web.AppKey("agents", set[web.WebSocketResponse])  # the agents' sockets (web/nodes.py)
EVENTS = web.AppKey("events", EventBus)  # GET /events, and what the metrics count
