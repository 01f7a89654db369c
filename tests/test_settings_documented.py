"""README's option table is held to the options built from ``Settings`` (datasette's
``test_settings_are_documented`` habit): every option has a row, every row is an option, and a
default the table shows is the field's default."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner
from plugin_env import REPO

from aic_vllm_proxy import cli as cli_module
from aic_vllm_proxy.cli import default_text, option_name, serve
from aic_vllm_proxy.config import NOT_OPTIONS, OPTION_FIELDS, Settings


def _readme_rows() -> list[tuple[list[str], str]]:
    """The Configuration table's rows: (options, default cell)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `--"):
            options_cell, default_cell = (cell.strip() for cell in line.strip("|").split("|")[:2])
            rows.append((re.findall(r"`(--[a-z0-9-]+)", options_cell), default_cell))
    assert len(rows) > 10, "README's Configuration table not found"
    return rows


def _options() -> dict[str, str | None]:
    """Each option of ``serve`` (its first spelling) -> its settings field (None: command line only)."""
    fields = {option_name(name): name for name in Settings.model_fields if name not in NOT_OPTIONS}
    found = {}
    for param in serve.params:
        if isinstance(param, click.Option) and param.opts[0] != "--help":
            found[param.opts[0]] = fields.get(param.opts[0])
    return found


def test_every_option_is_in_the_readme_and_every_row_is_an_option() -> None:
    documented = [option for options, _ in _readme_rows() for option in options]
    assert sorted(documented) == sorted(set(documented)), "an option has two rows"
    assert set(documented) == set(_options())


def test_readme_defaults_are_the_settings_defaults() -> None:
    """A default shown as code (`1800`) is the field's default as ``--help`` shows it; words
    (off, none, all installed) or nothing are for a field whose default is no value."""
    options = _options()
    for names, cell in _readme_rows():
        parts = cell.split(" / ")
        if len(parts) == 1:
            parts *= len(names)
        assert len(parts) == len(names), f"{names}: {cell!r} is not one default per option"
        for name, part in zip(names, parts, strict=True):
            field = options.get(name)
            if field is None:
                continue
            shown = re.match(r"`([^`]*)`", part)
            expected = default_text(Settings.model_fields[field])
            assert (shown.group(1) if shown else None) == expected, f"README's default of {name}: {part!r}"


def test_every_setting_is_an_option_or_marked_as_none() -> None:
    assert set(Settings.model_fields) >= NOT_OPTIONS
    assert set(Settings.model_fields) >= set(OPTION_FIELDS.values())
    options = {field for field in _options().values() if field is not None}
    assert options == set(Settings.model_fields) - NOT_OPTIONS
    assert [name for name in options if not Settings.model_fields[name].description] == []


@pytest.mark.parametrize("name", sorted(set(Settings.model_fields) - NOT_OPTIONS))
def test_option_help_shows_the_setting(name: str) -> None:
    option = next(p for p in serve.params if isinstance(p, click.Option) and p.name == name)
    field = Settings.model_fields[name]
    assert option.help and option.help.startswith(field.description or "?")
    assert option.envvar == "AIC_VLLM_PROXY_" + option_name(name)[2:].upper().replace("-", "_")
    shown = default_text(field)
    assert (f"[default: {shown}]" in option.help) == (shown is not None)


def test_list_options_repeat_and_split_like_their_environment_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every list option (``--allow-flag``, ``--admin-key``, ...) may be repeated and takes
    comma-separated values, as its environment variable and ``[proxy]`` key do; a choice is
    taken in any case, as the file takes it."""
    seen: list[Settings] = []
    monkeypatch.setattr(cli_module, "run_server", lambda settings, extra: seen.append(settings))
    for name in ("ALLOW_FLAG", "ADMIN_KEY", "API_KEY", "ENABLE_PLUGIN", "DISABLE_PLUGIN", "CONFIG"):
        monkeypatch.delenv(f"AIC_VLLM_PROXY_{name}", raising=False)
    args = [
        "serve",
        "--allow-flag",
        "--a, --b",
        "--allow-flag=--c",
        "--admin-key",
        "k1",
        "--restart",
        "On-Failure",
    ]
    env = {"AIC_VLLM_PROXY_API_KEY": "u1, u2,", "AIC_VLLM_PROXY_ADMIN_KEY": "ignored"}
    result = CliRunner().invoke(cli_module.cli, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (settings,) = seen
    assert settings.allowed_flags == ("--a", "--b", "--c")
    assert settings.admin_keys == ("k1",)  # the command line wins over the environment
    assert settings.api_keys == ("u1", "u2")
    assert settings.restart == "on-failure"
