"""The hook runner's contract with plugins: each hook implementation is called on its own (a
plain function in a thread, an ``async def`` awaited), so pluggy wrappers and generators, which
it would call and report ok without running their body, are refused when the plugin is loaded,
whether it is installed (entry point) or given with ``--plugin``. The hook names come from the
specs in hooks.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers import SIM
from plugin_env import Dist, on_sys_path, top_level_modules, write_site

from aic_vllm_proxy.config import Settings
from aic_vllm_proxy.hooks import HookContext, HookSpecs, hookimpl
from aic_vllm_proxy.hooks import specs as hooks
from aic_vllm_proxy.hooks.runner import PluginLoadError, load_plugins

WRAPPING_MODULE = """
from aic_vllm_proxy.hooks import hookimpl

@hookimpl
def pre_switch(ctx):
    return "plain hooks are fine"

@hookimpl(hookwrapper=True)
def post_switch(ctx):
    yield
"""


class OldStyleWrapper:
    @hookimpl(hookwrapper=True)
    def pre_switch(self, ctx: HookContext) -> Iterator[None]:
        yield


class NewStyleWrapper:
    @hookimpl(wrapper=True, tryfirst=True)
    def post_stop(self, ctx: HookContext) -> Iterator[None]:
        return (yield)


class Generator:
    @hookimpl
    def on_failure(self, ctx: HookContext) -> Iterator[str]:
        yield "never run"


class AsyncGenerator:
    @hookimpl
    async def pre_stop(self, ctx: HookContext) -> AsyncIterator[str]:
        yield "never run"


class Fine:
    @hookimpl
    def pre_switch(self, ctx: HookContext) -> None:
        pass

    @hookimpl
    async def on_failure(self, ctx: HookContext) -> str:
        return "ok"


@pytest.mark.parametrize(
    ("plugin", "hook", "words"),
    [
        (OldStyleWrapper(), "pre_switch", "is a hookwrapper/wrapper"),
        (NewStyleWrapper(), "post_stop", "is a hookwrapper/wrapper"),
        (Generator(), "on_failure", "is a generator"),
        (AsyncGenerator(), "pre_stop", "is a generator"),
    ],
)
def test_wrappers_and_generators_are_refused_at_load_time(plugin: object, hook: str, words: str) -> None:
    with pytest.raises(PluginLoadError) as info:
        load_plugins(Settings(), [("fine", Fine()), ("odd", plugin)])
    message = str(info.value)
    assert message.startswith("plugin 'odd' (") and f"its {hook} hook {words}" in message, message
    assert "\n" not in message


def test_plain_and_async_hooks_load_and_are_listed() -> None:
    _, infos = load_plugins(Settings(), [("fine", Fine())])
    (info,) = [i for i in infos if i.name == "fine"]
    assert info.hooks == ["on_failure", "pre_switch"]


def test_an_installed_wrapper_is_refused(tmp_path: Path) -> None:
    module = tmp_path / "src" / "wrapping_plugin.py"
    module.parent.mkdir()
    module.write_text(WRAPPING_MODULE)
    dist = Dist("wrapping", "1.0", {"wrapping": "wrapping_plugin"}, {"wrapping_plugin": module})
    with on_sys_path(write_site(tmp_path / "site", dist), top_level_modules(dist)):
        with pytest.raises(
            PluginLoadError, match=r"'wrapping' \(wrapping_plugin\): its post_switch hook is a"
        ):
            load_plugins(Settings())
        # Disabled, it is not even imported: the daemon can start without it.
        _, infos = load_plugins(Settings(plugins_disable=("wrapping",)))
        assert [(i.name, i.enabled) for i in infos if i.name == "wrapping"] == [("wrapping", False)]


def test_the_daemon_does_not_start_with_a_wrapper(tmp_path: Path) -> None:
    """``--plugin`` with a wrapper: one line on stderr and exit 1, instead of a daemon that
    would report the wrapper's hook ok on every switch without running it."""
    (tmp_path / "wrapping_plugin.py").write_text(textwrap.dedent(WRAPPING_MODULE))
    result = subprocess.run(
        [sys.executable, "-m", "aic_vllm_proxy", "serve", "--host", "127.0.0.1", "--port", "0",
         "--vllm-command", SIM, "--plugin", "wrapping_plugin"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_env_with_path(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "its post_switch hook is a hookwrapper/wrapper" in result.stderr
    assert "Traceback" not in result.stderr


def _env_with_path(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    return env


def test_hook_names_are_the_specs() -> None:
    declared = [
        name for name, value in vars(HookSpecs).items() if callable(value) and not name.startswith("_")
    ]
    assert (
        list(hooks.HOOK_NAMES)
        == declared
        == [
            "pre_switch",
            "post_switch",
            "pre_stop",
            "post_stop",
            "pre_sleep",
            "post_sleep",
            "pre_wake",
            "post_wake",
            "on_failure",
        ]
    )
