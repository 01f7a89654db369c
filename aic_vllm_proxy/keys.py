"""Typed keys for what the application shares between its parts (``app[KEY]``)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from aic_vllm_proxy.auth import KeyRing
from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.models import PluginInfo
from aic_vllm_proxy.plugins import HookRunner
from aic_vllm_proxy.proxy import Passthrough
from aic_vllm_proxy.supervisor import Supervisor
from aic_vllm_proxy.upstream import UpstreamPool

SETTINGS = web.AppKey("settings", Settings)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)  # probes, hooks
POOL = web.AppKey("pool", UpstreamPool)  # the proxied traffic (upstream.py)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
HOOKS = web.AppKey("hooks", HookRunner)
PLUGINS = web.AppKey("plugins", list[PluginInfo])
KEYS = web.AppKey("keys", KeyRing)
PASSTHROUGH = web.AppKey("passthrough", Passthrough)  # also served by the front door (front.py)
