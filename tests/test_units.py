"""Pure unit tests: model specs, the state machine, log tails, settings, header filtering.

No process and no socket here: these run in milliseconds.
"""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path
from typing import Any

import click.testing
import pytest
from multidict import CIMultiDict

from aic_vllm_proxy import cli as cli_module
from aic_vllm_proxy.config import ConfigError, Settings, build_settings, read_config_file, simulator_command
from aic_vllm_proxy.engine.logs import (
    CHUNK,
    MAX_TAIL_LINES,
    _tail_offset,
    follow,
    iter_file,
    link_with_pid,
    open_launch_log,
    parse_lines_param,
    tail_lines,
)
from aic_vllm_proxy.engine.state import TRANSITIONS, InvalidTransition, ProcessStateMachine
from aic_vllm_proxy.relay.headers import HOP_BY_HOP
from aic_vllm_proxy.relay.headers import filtered as _filtered
from aic_vllm_proxy.schemas import ProcessState, SwitchRequest
from aic_vllm_proxy.spec import PROXY_OWNED_FLAGS, ModelSpec, SpecError

S = ProcessState


# --------------------------------------------------------------------------- ModelSpec


class TestModelSpec:
    def test_model_only(self) -> None:
        spec = ModelSpec.parse("Qwen/Qwen3-0.6B")
        assert spec.model == "Qwen/Qwen3-0.6B"
        assert spec.args == ()
        assert spec.served_name == "Qwen/Qwen3-0.6B"
        assert spec.raw == "Qwen/Qwen3-0.6B"

    def test_args_quotes_and_newlines(self) -> None:
        text = "  m1 --max-model-len 4096\n  --chat-template 'a b\tc'\n--x=\"y z\"\n"
        spec = ModelSpec.parse(text)
        assert spec.model == "m1"
        assert spec.args == ("--max-model-len", "4096", "--chat-template", "a b\tc", "--x=y z")
        assert spec.raw == text  # /status shows what the user sent

    def test_json_argument_survives(self) -> None:
        spec = ModelSpec.parse("""m --hf-overrides '{"a": [1, 2], "b": "c d"}'""")
        assert spec.flag_value("--hf-overrides") == '{"a": [1, 2], "b": "c d"}'

    def test_shell_metacharacters_stay_literal(self) -> None:
        # (not "-rf": vLLM reads that as "--node-rank f", a flag the proxy owns)
        spec = ModelSpec.parse("m --a $(touch /tmp/pwned) ; rm -Rf / | cat > out && `id` $HOME *")
        assert spec.args == (
            "--a", "$(touch", "/tmp/pwned)", ";", "rm", "-Rf", "/", "|", "cat", ">", "out",
            "&&", "`id`", "$HOME", "*",
        )  # fmt: skip

    def test_hash_is_not_a_comment(self) -> None:
        assert ModelSpec.parse("m --name a#b #c").args == ("--name", "a#b", "#c")

    @pytest.mark.parametrize("text", ["", "   ", "\n\t\n"])
    def test_empty(self, text: str) -> None:
        with pytest.raises(SpecError, match="empty"):
            ModelSpec.parse(text)

    @pytest.mark.parametrize("text", ["m --a 'unclosed", 'm --a "x', "m \\"])
    def test_unbalanced_quotes(self, text: str) -> None:
        with pytest.raises(SpecError, match=r"quote|split"):
            ModelSpec.parse(text)

    def test_flag_first_is_refused(self) -> None:
        with pytest.raises(SpecError, match="must start with the model"):
            ModelSpec.parse("--model m")

    @pytest.mark.parametrize(
        "text",
        [
            "m --host 0.0.0.0",
            "m --port 1",
            "m --port=1",
            "m --host=::",
            "m --uds /tmp/x.sock",
            "m --uds=/tmp/x.sock",
            "m --dtype half\n--port\n9000",
        ],
    )
    def test_proxy_owned_flags(self, text: str) -> None:
        with pytest.raises(SpecError, match="proxy owns") as info:
            ModelSpec.parse(text)
        assert any(flag in str(info.value) for flag in PROXY_OWNED_FLAGS)
        assert "--vllm-host/--vllm-port" in str(info.value)

    def test_similar_flags_are_not_proxy_owned(self) -> None:
        spec = ModelSpec.parse("m --hostname x --port-range 1 --uds-path y --served-model-name --portal")
        assert spec.model == "m"

    def test_served_name(self) -> None:
        assert ModelSpec.parse("org/m --served-model-name short").served_name == "short"
        assert ModelSpec.parse("org/m --served-model-name=eq").served_name == "eq"
        # vLLM takes several names (nargs='+'); clients use the first.
        assert ModelSpec.parse("org/m --served-model-name a b --dtype half").served_name == "a"
        # A dangling flag does not crash, the model name is used.
        assert ModelSpec.parse("org/m --served-model-name").served_name == "org/m"

    def test_flag_value_and_has_flag(self) -> None:
        spec = ModelSpec.parse("m --api-key one --x --api-key=two --flag")
        assert spec.flag_value("--api-key") == "two"  # the last one wins, like argparse
        assert spec.flag_value("--missing") is None
        assert spec.flag_value("--flag") is None  # no value after it
        assert spec.has_flag("--flag")
        assert spec.has_flag("--api-key")
        assert not spec.has_flag("--api")

    def test_key_ignores_formatting(self) -> None:
        a = ModelSpec.parse("m --a 1 --b 'x y'")
        b = ModelSpec.parse('m\n   --a   1\n--b "x y"')
        c = ModelSpec.parse("m --a 1 --b x y")
        assert a.key == b.key
        assert a.key != c.key
        assert a.raw != b.raw

    def test_argv(self) -> None:
        spec = ModelSpec.parse("m --dtype half")
        argv = spec.argv(["python", "-m", "sim", "serve"], "127.0.0.1", 8225)
        assert argv == ["python", "-m", "sim", "serve", "m", "--dtype", "half", "--host", "127.0.0.1",
                        "--port", "8225"]  # fmt: skip


class TestSwitchRequest:
    def test_defaults(self) -> None:
        req = SwitchRequest.model_validate({"model_spec": "m"})
        assert req.wait is True and req.force is False

    @pytest.mark.parametrize("body", [{}, {"model_spec": ""}, {"model_spec": " \n "}, {"model_spec": 3},
                                      {"model_spec": "m", "bogus": 1}])  # fmt: skip
    def test_invalid(self, body: dict[str, Any]) -> None:
        with pytest.raises(ValueError):
            SwitchRequest.model_validate(body)


# ------------------------------------------------------------------------- state machine


ALL_STATES = list(ProcessState)
ALLOWED = [(a, b) for a in ALL_STATES for b in ALL_STATES if b in TRANSITIONS[a]]
REFUSED = [(a, b) for a in ALL_STATES for b in ALL_STATES if b not in TRANSITIONS[a]]

# How to reach each state from STOPPED along allowed transitions.
PATHS = {
    S.STOPPED: [],
    S.STARTING: [S.STARTING],
    S.READY: [S.STARTING, S.READY],
    S.DRAINING: [S.STARTING, S.READY, S.DRAINING],
    S.STOPPING: [S.STARTING, S.READY, S.STOPPING],
    S.FAILED: [S.STARTING, S.FAILED],
    S.PARKING: [S.STARTING, S.READY, S.PARKING],
    S.SLEEPING: [S.STARTING, S.READY, S.PARKING, S.SLEEPING],
    S.WAKING: [S.STARTING, S.READY, S.PARKING, S.SLEEPING, S.WAKING],
}


async def _machine_in(state: ProcessState) -> ProcessStateMachine:
    machine = ProcessStateMachine()
    for step in PATHS[state]:
        await machine.transition(step)
    assert machine.state is state
    return machine


class TestStateMachine:
    def test_transition_table(self) -> None:
        assert set(TRANSITIONS) == set(ProcessState)
        # The life cycle described in the issue.
        assert S.STARTING in TRANSITIONS[S.STOPPED]
        assert TRANSITIONS[S.STOPPED] == {S.STARTING}
        assert S.READY not in TRANSITIONS[S.STOPPED]
        assert S.STOPPED not in TRANSITIONS[S.READY]  # always through STOPPING
        assert S.READY not in TRANSITIONS[S.STOPPING]
        assert S.READY not in TRANSITIONS[S.FAILED]

    @pytest.mark.parametrize(("start", "to"), ALLOWED, ids=[f"{a.value}->{b.value}" for a, b in ALLOWED])
    async def test_allowed(self, start: ProcessState, to: ProcessState) -> None:
        machine = await _machine_in(start)
        snap = await machine.transition(to)
        assert snap.state is to
        assert machine.state is to

    @pytest.mark.parametrize(("start", "to"), REFUSED, ids=[f"{a.value}->{b.value}" for a, b in REFUSED])
    async def test_refused(self, start: ProcessState, to: ProcessState) -> None:
        machine = await _machine_in(start)
        before = machine.snapshot
        with pytest.raises(InvalidTransition, match=f"from {start.value} to {to.value}"):
            await machine.transition(to)
        assert machine.snapshot is before  # nothing changed

    async def test_fields_across_a_life(self) -> None:
        machine = ProcessStateMachine()
        assert machine.snapshot.state is S.STOPPED and machine.snapshot.pid is None
        snap = await machine.transition(S.STARTING, model_spec="m --a", model="m", log_path="/l")
        assert snap.started_at is not None and snap.ready_at is None
        assert snap.launched_monotonic is not None
        snap = await machine.update(pid=123)
        assert snap.state is S.STARTING and snap.pid == 123 and snap.model_spec == "m --a"
        snap = await machine.transition(S.READY, model="served")
        assert snap.ready_at is not None and snap.ready_at >= snap.started_at  # type: ignore[operator]
        assert snap.model == "served" and snap.pid == 123 and snap.error is None
        snap = await machine.transition(S.FAILED, exit_code=0, error="died", pid=None)
        assert (snap.exit_code, snap.error, snap.pid) == (0, "died", None)
        assert snap.model_spec == "m --a"  # /status still says what failed
        snap = await machine.transition(S.STOPPING)
        snap = await machine.transition(S.STOPPED, exit_code=0)
        assert snap.pid is None and snap.model_spec == "m --a"

    async def test_starting_clears_the_previous_launch(self) -> None:
        machine = await _machine_in(S.FAILED)
        await machine.update(pid=5, exit_code=1, error="boom", model_spec="old", ready_at=None)
        snap = await machine.transition(S.STARTING, model_spec="new")
        assert snap.model_spec == "new"
        assert snap.exit_code is None and snap.error is None and snap.pid is None

    async def test_ready_clears_error(self) -> None:
        machine = await _machine_in(S.STARTING)
        await machine.update(error="transient")
        assert (await machine.transition(S.READY)).error is None

    async def test_transition_if(self) -> None:
        machine = await _machine_in(S.STOPPING)
        assert await machine.transition_if(frozenset({S.READY}), S.FAILED) is None
        assert machine.state is S.STOPPING
        snap = await machine.transition_if(frozenset({S.STOPPING}), S.FAILED, error="x")
        assert snap is not None and snap.state is S.FAILED and snap.error == "x"
        with pytest.raises(InvalidTransition):
            await machine.transition_if(frozenset({S.FAILED}), S.READY)

    async def test_wait_for(self) -> None:
        machine = ProcessStateMachine()
        waiter = asyncio.ensure_future(machine.wait_for(lambda s: s.state is S.READY, 5))
        await asyncio.sleep(0)
        await machine.transition(S.STARTING)
        await asyncio.sleep(0)
        assert not waiter.done()
        await machine.transition(S.READY, model="x")
        snap = await waiter
        assert snap.state is S.READY and snap.model == "x"

    async def test_wait_for_times_out(self) -> None:
        machine = ProcessStateMachine()
        with pytest.raises(asyncio.TimeoutError):
            await machine.wait_for(lambda s: s.state is S.READY, 0.05)

    async def test_wait_for_already_true(self) -> None:
        machine = ProcessStateMachine()
        snap = await machine.wait_for(lambda s: s.state is S.STOPPED, 0.5)
        assert snap.state is S.STOPPED


# ---------------------------------------------------------------------------------- logs


def _write(tmp_path: Path, data: bytes, name: str = "x.log") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _tail_by_offset(path: Path, n: int) -> list[str]:
    """The lines `follow` would start with: what `tail -n` prints."""
    data = path.read_bytes()[_tail_offset(path, n) :]
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


class TestLogs:
    def test_tail_empty_file(self, tmp_path: Path) -> None:
        path = _write(tmp_path, b"")
        assert tail_lines(path, 1) == []
        assert tail_lines(path, 200) == []
        assert _tail_offset(path, 5) == 0

    def test_tail_exact(self, tmp_path: Path) -> None:
        path = _write(tmp_path, b"".join(b"line %d\n" % i for i in range(1, 11)))
        assert tail_lines(path, 3) == ["line 8", "line 9", "line 10"]
        assert tail_lines(path, 1) == ["line 10"]
        assert tail_lines(path, 10) == [f"line {i}" for i in range(1, 11)]
        assert _tail_by_offset(path, 3) == ["line 8", "line 9", "line 10"]

    def test_tail_no_trailing_newline(self, tmp_path: Path) -> None:
        path = _write(tmp_path, b"a\nb\nc")
        assert tail_lines(path, 1) == ["c"]
        assert tail_lines(path, 2) == ["b", "c"]
        assert _tail_offset(path, 1) == 4
        assert _tail_offset(path, 2) == 2
        assert _tail_offset(path, 3) == 0

    def test_tail_more_than_the_file(self, tmp_path: Path) -> None:
        path = _write(tmp_path, b"a\nb\n")
        assert tail_lines(path, 100) == ["a", "b"]
        assert tail_lines(path, MAX_TAIL_LINES) == ["a", "b"]
        assert _tail_offset(path, 100) == 0

    def test_tail_blank_lines_count(self, tmp_path: Path) -> None:
        path = _write(tmp_path, b"x\n\n\ny\n\n")
        assert tail_lines(path, 2) == ["y", ""]
        assert tail_lines(path, 4) == ["", "", "y", ""]

    def test_tail_huge_line(self, tmp_path: Path) -> None:
        big = b"H" * (3 * CHUNK + 17)
        path = _write(tmp_path, b"first\n" + big + b"\nlast\n")
        assert tail_lines(path, 1) == ["last"]
        lines = tail_lines(path, 2)
        assert lines == [big.decode(), "last"]
        assert tail_lines(path, 3) == ["first", big.decode(), "last"]
        assert _tail_offset(path, 2) == len(b"first\n")

    def test_tail_huge_last_line_without_newline(self, tmp_path: Path) -> None:
        big = b"Z" * (2 * CHUNK + 5)
        path = _write(tmp_path, b"a\n" + big)
        assert tail_lines(path, 1) == [big.decode()]
        assert tail_lines(path, 2) == ["a", big.decode()]

    def test_tail_across_chunks(self, tmp_path: Path) -> None:
        count = 50_000  # ~ 0.6 MiB: many 64 KiB blocks are read backwards
        path = _write(tmp_path, b"".join(b"entry %06d\n" % i for i in range(count)))
        for n in (1, 5000, 12345, count):
            lines = tail_lines(path, n)
            assert len(lines) == n
            assert lines[0] == f"entry {count - n:06d}"
            assert lines[-1] == f"entry {count - 1:06d}"
            assert _tail_offset(path, n) == (count - n) * len(b"entry 000000\n")

    def test_tail_utf8_split_across_blocks(self, tmp_path: Path) -> None:
        # A multi-byte character straddles a block boundary: the lines returned are intact.
        line = ("é" * 1000 + "\n").encode()
        path = _write(tmp_path, line * 200)
        assert tail_lines(path, 100) == ["é" * 1000] * 100

    def test_tail_keeps_carriage_returns_inside_a_line(self, tmp_path: Path) -> None:
        # vLLM's progress bars (tqdm) redraw with "\r" on one line: a line is what ends in "\n",
        # as for `tail -n` (and as /logs/stream starts): the tail must not split at "\r".
        data = (
            b"INFO loading\n"
            b"Loading safetensors checkpoint shards:   0% Completed | 0/2\r"
            b"Loading safetensors checkpoint shards:  50% Completed | 1/2\r"
            b"Loading safetensors checkpoint shards: 100% Completed | 2/2\n"
            b"INFO ready\n"
        )
        path = _write(tmp_path, data)
        assert _tail_by_offset(path, 2)[1] == "INFO ready"
        assert tail_lines(path, 2) == _tail_by_offset(path, 2)
        assert tail_lines(path, 3)[0] == "INFO loading"

    def test_tail_replaces_invalid_utf8(self, tmp_path: Path) -> None:
        path = _write(tmp_path, b"ok\n\xff\xfe bad\n")
        assert tail_lines(path, 1) == ["\ufffd\ufffd bad"]

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [(None, 200), ("", 200), ("1", 1), ("200", 200), ("100000", 100_000), (" 7 ", 7), ("+3", 3)],
    )
    def test_parse_lines_ok(self, raw: str | None, expected: int) -> None:
        assert parse_lines_param(raw) == expected

    def test_parse_lines_default(self) -> None:
        assert parse_lines_param(None, default=50) == 50
        assert MAX_TAIL_LINES == 100_000

    @pytest.mark.parametrize("raw", ["abc", "0", "-1", "10000000", "100001", "1.5", "1e3", "0x10", "ten"])
    def test_parse_lines_refused(self, raw: str) -> None:
        with pytest.raises(ValueError, match="lines must"):
            parse_lines_param(raw)

    def test_launch_log_header_and_rename(self, tmp_path: Path) -> None:
        argv = ["python", "-m", "sim", "serve", "m", "--chat-template", "a b", "--host", "h"]
        path, handle = open_launch_log(tmp_path / "new" / "dir", argv)
        try:
            handle.write(b"child output\n")
        finally:
            handle.close()
        assert path.parent == tmp_path / "new" / "dir"
        header, rest = path.read_text().split("\n", 1)
        assert header.startswith("# aic-vllm-proxy ")
        assert header.endswith("launching: " + shlex.join(argv))
        assert rest == "child output\n"
        renamed = link_with_pid(path, 4242)
        assert path.exists() and path.samefile(renamed)  # both names until the first one goes
        path.unlink()
        assert not path.exists()
        assert renamed.name == path.name.split("_", 1)[0] + "_pid-4242.log"
        assert renamed.read_text().startswith("# aic-vllm-proxy ")

    async def test_iter_file(self, tmp_path: Path) -> None:
        data = bytes(range(256)) * (CHUNK // 64)  # 4 chunks
        path = _write(tmp_path, data)
        chunks = [c async for c in iter_file(path)]
        assert b"".join(chunks) == data
        assert max(len(c) for c in chunks) <= CHUNK
        assert b"".join([c async for c in iter_file(path, start=10)]) == data[10:]
        assert [c async for c in iter_file(_write(tmp_path, b"", "e.log"))] == []

    async def test_follow_until_the_writer_ends(self, tmp_path: Path) -> None:
        path = _write(tmp_path, b"one\ntwo\nthree\n")
        live = {"on": True}
        got: list[bytes] = []

        async def reader() -> None:
            async for chunk in follow(path, 2, lambda: live["on"], poll=0.01):
                got.append(chunk)

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0.05)
        with open(path, "ab") as handle:
            handle.write(b"four\n")
        await asyncio.sleep(0.05)
        with open(path, "ab") as handle:
            handle.write(b"five\n")
        live["on"] = False
        await asyncio.wait_for(task, 5)
        assert b"".join(got) == b"two\nthree\nfour\nfive\n"


# ------------------------------------------------------------------------------ settings


class TestSettings:
    def test_defaults(self) -> None:
        s = Settings()
        assert (s.host, s.port, s.vllm_host, s.vllm_port) == ("0.0.0.0", 8224, "127.0.0.1", 8225)
        assert s.vllm_argv == ["vllm", "serve"]
        assert s.vllm_base == "http://127.0.0.1:8225"

    def test_ipv6_base(self) -> None:
        assert Settings(vllm_host="::1", vllm_port=9).vllm_base == "http://[::1]:9"

    def test_command_is_split_like_a_shell(self) -> None:
        s = Settings(vllm_command="'/opt/my venv/bin/vllm' serve")
        assert s.vllm_argv == ["/opt/my venv/bin/vllm", "serve"]
        assert shlex.split(simulator_command())[1:] == ["-m", "aic_vllm_proxy.simulator", "serve"]

    @pytest.mark.parametrize(
        ("field", "value", "match"),
        [
            ("vllm_command", "", "empty"),
            ("vllm_command", "'unclosed", "cannot split"),
            ("port", 70000, "port"),
            ("vllm_port", 0, "vllm_port"),
            ("ready_timeout", 0, "ready_timeout"),
            ("stop_timeout", -1, "stop_timeout"),
            ("log_level", "loud", "log_level"),
            ("no_such_setting", 1, "no_such_setting"),
        ],
    )
    def test_invalid(self, field: str, value: object, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            build_settings(None, {field: value})

    def test_log_level_case(self) -> None:
        assert build_settings(None, {"log_level": "DEBUG"}).log_level == "debug"

    def test_file_then_overrides(self, tmp_path: Path) -> None:
        config = tmp_path / "c.toml"
        config.write_text(
            '[proxy]\nport = 9100\nvllm-port = 9101\nready_timeout = 12.5\nvllm_command = "x serve"\n'
            '[plugins.warmup]\nprompt = "hi"\n'
        )
        s = build_settings(config, {"port": None, "vllm_port": 9200, "plugins_enable": ()})
        assert s.port == 9100  # from the file (None means "not given")
        assert s.vllm_port == 9200  # the option wins over the file
        assert s.ready_timeout == 12.5
        assert s.vllm_command == "x serve"
        assert s.config_file == config
        assert s.plugin_config("warmup") == {"prompt": "hi"}
        assert s.plugin_config("other") == {}

    def test_plugin_config_env(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        config = tmp_path / "c.toml"
        config.write_text('[plugins.my-plug]\nprompt = "file"\nkeep = 1\n')
        monkeypatch.setenv("AIC_VLLM_PROXY_PLUGIN_MY_PLUG_PROMPT", "env")
        s = build_settings(config, {})
        assert s.plugin_config("my-plug") == {"prompt": "env", "keep": 1}

    def test_bad_files(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="does not exist"):
            read_config_file(tmp_path / "missing.toml")
        bad = tmp_path / "bad.toml"
        bad.write_text("[proxy\nport = 1\n")
        with pytest.raises(ConfigError, match="not valid TOML"):
            read_config_file(bad)
        notable = tmp_path / "notable.toml"
        notable.write_text('proxy = "x"\n')
        with pytest.raises(ConfigError, match=r"\[proxy\] must be a table"):
            read_config_file(notable)
        wrong = tmp_path / "wrong.toml"
        wrong.write_text("[proxy]\nport = 'abc'\n")
        with pytest.raises(ConfigError, match="port"):
            build_settings(wrong, {})
        unknown = tmp_path / "unknown.toml"
        unknown.write_text("[proxy]\nprot = 1\n")
        with pytest.raises(ConfigError, match="prot"):
            build_settings(unknown, {})


class TestCommandLinePrecedence:
    """file < environment < command line, through the real click command (run_server replaced
    by a function that records the settings it would run with)."""

    @pytest.fixture
    def seen(self, monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
        got: list[Settings] = []
        monkeypatch.setattr(cli_module, "run_server", lambda settings, extra: got.append(settings))
        for name in ("PORT", "VLLM_PORT", "READY_TIMEOUT", "VLLM_COMMAND", "CONFIG", "HOST", "LOG_DIR"):
            monkeypatch.delenv(f"AIC_VLLM_PROXY_{name}", raising=False)
        return got

    def _run(self, args: list[str], env: dict[str, str] | None = None) -> click.testing.Result:
        return click.testing.CliRunner().invoke(cli_module.cli, args, env=env, catch_exceptions=False)

    def test_precedence(self, tmp_path: Path, seen: list[Settings]) -> None:
        config = tmp_path / "c.toml"
        config.write_text("[proxy]\nport = 1001\nvllm_port = 1002\nready_timeout = 3\n")
        env = {"AIC_VLLM_PROXY_VLLM_PORT": "2002", "AIC_VLLM_PROXY_READY_TIMEOUT": "4"}
        result = self._run(["serve", "--config", str(config), "--ready-timeout", "5"], env)
        assert result.exit_code == 0, result.output
        (s,) = seen
        assert s.port == 1001  # file only
        assert s.vllm_port == 2002  # environment over file
        assert s.ready_timeout == 5  # command line over environment

    def test_config_from_env_and_group_form(self, tmp_path: Path, seen: list[Settings]) -> None:
        config = tmp_path / "c.toml"
        config.write_text("[proxy]\nport = 1011\n")
        result = self._run(["--vllm-port", "1012"], {"AIC_VLLM_PROXY_CONFIG": str(config)})
        assert result.exit_code == 0, result.output
        assert (seen[0].port, seen[0].vllm_port) == (1011, 1012)

    def test_simulator_flag(self, seen: list[Settings]) -> None:
        assert self._run(["serve", "--simulator"]).exit_code == 0
        assert seen[0].vllm_command == simulator_command()
        # An explicit command wins over --simulator.
        assert self._run(["serve", "--simulator", "--vllm-command", "my-vllm serve"]).exit_code == 0
        assert seen[1].vllm_command == "my-vllm serve"

    def test_invalid_config_is_a_clean_error(self, tmp_path: Path, seen: list[Settings]) -> None:
        config = tmp_path / "c.toml"
        config.write_text("[proxy]\nstop_timeout = -3\n")
        result = self._run(["serve", "--config", str(config)])
        assert result.exit_code == 1
        assert "stop_timeout" in result.output and "Traceback" not in result.output
        assert seen == []


# ------------------------------------------------------------------------------- headers


class TestFilteredHeaders:
    def test_hop_by_hop_dropped_case_insensitively(self) -> None:
        headers = CIMultiDict(
            [
                ("Host", "proxy:8224"),
                ("CONNECTION", "keep-alive"),
                ("Keep-Alive", "timeout=5"),
                ("Transfer-Encoding", "chunked"),
                ("TE", "trailers"),
                ("Trailer", "X-Sum"),
                ("Upgrade", "h2c"),
                ("Proxy-Authorization", "Basic x"),
                ("Proxy-Connection", "keep-alive"),
                ("Expect", "100-continue"),
                ("Authorization", "Bearer k"),
                ("Content-Type", "application/json"),
                ("Content-Length", "12"),
                ("X-Request-Id", "abc"),
            ]
        )
        out = _filtered(headers)
        assert dict(out) == {
            "Authorization": "Bearer k",
            "Content-Type": "application/json",
            "Content-Length": "12",
            "X-Request-Id": "abc",
        }

    def test_tokens_named_in_connection(self) -> None:
        headers = CIMultiDict(
            [
                ("Connection", "close, X-Secret ,x-other"),
                ("Connection", "X-Third"),
                ("x-secret", "1"),
                ("X-Other", "2"),
                ("X-Third", "3"),
                ("X-Kept", "4"),
            ]
        )
        out = _filtered(headers)
        assert list(out.items()) == [("X-Kept", "4")]

    def test_repeated_headers_kept_in_order(self) -> None:
        headers = CIMultiDict([("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Vary", "x")])
        assert _filtered(headers).getall("Set-Cookie") == ["a=1", "b=2"]

    def test_extra_drop(self) -> None:
        headers = CIMultiDict([("Content-Length", "3"), ("X-A", "1")])
        assert list(_filtered(headers, frozenset({"content-length"})).items()) == [("X-A", "1")]

    def test_hop_by_hop_set(self) -> None:
        assert {"connection", "keep-alive", "transfer-encoding", "upgrade", "te"} <= HOP_BY_HOP
        assert all(name == name.lower() for name in HOP_BY_HOP)
