"""Site policy for aic-vllm-proxy: only models on this site's allow-list may be loaded.

Settings, in the proxy's ``--config`` file::

    [plugins.site-hooks]
    allowed_models = ["meta-llama/*", "Qwen/Qwen3-8B"]   # shell-style patterns

or in the environment (comma-separated)::

    AIC_VLLM_PROXY_PLUGIN_SITE_HOOKS_ALLOWED_MODELS="meta-llama/*,Qwen/Qwen3-8B"

Without an allow-list every model is allowed.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from aic_vllm_proxy.hooks import HookContext, Veto, hookimpl
from aic_vllm_proxy.spec import ModelSpec


def allowed_models(config: dict[str, Any]) -> list[str]:
    """The allow-list: a TOML list, or a comma-separated string from the environment."""
    value = config.get("allowed_models") or []
    if isinstance(value, str):
        value = value.split(",")
    return [str(pattern).strip() for pattern in value if str(pattern).strip()]


@hookimpl
def pre_switch(ctx: HookContext) -> None:
    """Refuse the switch (the running model keeps running) unless the model is allowed.

    A plain function like this one runs in a worker thread; ``async def`` works too."""
    patterns = allowed_models(ctx.plugin_config)
    if not patterns or ctx.new_spec is None:
        return
    model = ModelSpec.parse(ctx.new_spec).model
    if not any(fnmatchcase(model, pattern) for pattern in patterns):
        raise Veto(
            f"{model} is not on this site's allow-list ({', '.join(patterns)}); "
            "ask the node's admins to add it to allowed_models in [plugins.site-hooks]"
        )
