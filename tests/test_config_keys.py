"""Every daemon option has a ``[proxy]`` key spelled like the option (README, issue 16 #18)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from aic_vllm_proxy.cli import serve
from aic_vllm_proxy.config import OPTION_FIELDS, ConfigError, Settings, build_settings

#: Options that are not settings: they choose the file, a preset of ``vllm_command``, or modules.
COMMAND_LINE_ONLY = {"config", "simulator", "plugin_modules"}


def _option_names() -> list[str]:
    return [p.name for p in serve.params if isinstance(p, click.Option) and p.name]


def test_every_option_names_a_setting() -> None:
    names = [n for n in _option_names() if n not in COMMAND_LINE_ONLY]
    assert len(names) > 25
    missing = [n for n in names if OPTION_FIELDS.get(n, n) not in Settings.model_fields]
    assert missing == []


def test_option_spellings_in_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        "[proxy]\n"
        'allow-flag = "--trust-remote-code, --enforce-eager"\n'
        'admin_key = ["a1", "a2"]\n'
        'api_key = "u1"\n'
        'enable_plugin = "warmup"\n'
        'disable-plugin = ["notify"]\n'
    )
    s = build_settings(config, {})
    assert s.allowed_flags == ("--trust-remote-code", "--enforce-eager")
    assert s.admin_keys == ("a1", "a2")
    assert s.api_keys == ("u1",)
    assert s.plugins_enable == ("warmup",)
    assert s.plugins_disable == ("notify",)
    # The field spelling keeps working.
    config.write_text('[proxy]\nallowed_flags = ["--trust-remote-code"]\n')
    assert build_settings(config, {}).allowed_flags == ("--trust-remote-code",)


def test_both_spellings_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[proxy]\nadmin_key = "a"\nadmin_keys = ["b"]\n')
    with pytest.raises(ConfigError, match="given twice"):
        build_settings(config, {})


def test_wrong_key_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[proxy]\nallow_flags = '--x'\nport = 'abc'\n")
    with pytest.raises(ConfigError) as info:
        build_settings(config, {})
    message = str(info.value)
    assert "\n" not in message and "pydantic" not in message
    assert "allow_flags: no such setting" in message
    assert "port:" in message and "'abc'" in message


def test_allowed_flag_in_any_spelling() -> None:
    """``--allow-flag`` names a flag as vLLM would read it, like the deny-list it edits."""
    for spelling in ("--trust-remote-code", "--trust_remote_code"):
        assert (
            "--trust-remote-code"
            not in build_settings(None, {"allowed_flags": (spelling,)}).effective_denied_flags
        )
    assert "--trust-remote-code" in build_settings(None, {}).effective_denied_flags
