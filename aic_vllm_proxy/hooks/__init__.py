"""Lifecycle hooks: what a site admin's plugin imports (``from aic_vllm_proxy.hooks import
hookimpl, Veto, HookContext``). The hooks are declared in :mod:`.specs`; :mod:`.runner` loads
plugins and calls them."""

from aic_vllm_proxy.hooks.specs import (
    ENTRY_POINT_GROUP,
    HOOK_NAMES,
    HookContext,
    HookSpecs,
    Veto,
    hookimpl,
    hookspec,
)

__all__ = ["ENTRY_POINT_GROUP", "HOOK_NAMES", "HookContext", "HookSpecs", "Veto", "hookimpl", "hookspec"]
