"""The flag scanner (``spec.scan_flags``): a flag in a model spec is found in every spelling vLLM's
parser accepts, by everything that looks for one (vLLM's API key, the served model names, the
flags the proxy owns, the deny-list, ``--shutdown-timeout``).

The expectations below are what vLLM 0.32's own parser (``vllm serve``'s FlexibleArgumentParser)
makes of each command line; the simulator parses them the same way (checked here too)."""

from __future__ import annotations

import shlex
import time
from typing import Any

import pytest
from helpers import FAST

from aic_vllm_proxy.catalog import PolicyError, resolve
from aic_vllm_proxy.simulator.cli import parse_args
from aic_vllm_proxy.spec import ModelSpec, SpecError, flag_name, scan_flags


def spec(args: str) -> ModelSpec:
    return ModelSpec.parse(f"org/m {args}")


# ------------------------------------------------------------------------------- one value


@pytest.mark.parametrize(
    "args",
    [
        "--api-key K",
        "--api-key=K",
        "--api_key K",
        "--api_key=K",
        "--api-k K",  # an unambiguous prefix of --api-key
        "--api_k=K",
        "--api-ke K --dtype half",
        "--enforce-eager --api-key K --max-model-len 4096",
        "--hf-token --api-key K",  # --hf-token takes zero or one value: --api-key is not its value
    ],
)
def test_api_key_in_every_spelling(args: str) -> None:
    assert spec(args).flag_value("--api-key") == "K"
    assert spec(args).has_flag("--api-key")


def test_the_last_occurrence_wins() -> None:
    assert spec("--api-key A --api_key=B").flag_value("--api-key") == "B"
    assert spec("--api-key=A --api-k B --dtype half").flag_value("--api-key") == "B"
    assert spec("--seed=3 --seed 4").flag_value("--seed") == "4"
    # --served-model-name takes several names: the last occurrence replaces them all.
    assert spec("--served-model-name a b --served_model_name c").served_names == ("c",)


def test_a_list_flag_takes_the_words_up_to_the_next_option() -> None:
    assert spec("--api-key A B --dtype half").flag_values("--api-key") == ("A", "B")
    assert spec("--api-key A B").flag_value("--api-key") == "A"  # any of them opens vLLM
    assert spec("--served_model_name a b --enforce-eager").served_names == ("a", "b")
    assert spec("--served a").served_names == ("a",)
    assert spec("--served-model-name=a").served_names == ("a",)
    assert spec("--served-model-name").served_names == ()  # vLLM refuses it; the model's name is used
    assert spec("--served-model-name").served_name == "org/m"


def test_values_that_look_like_flags() -> None:
    # After "=" anything is the value, even a flag the proxy owns.
    assert spec("--api-key=--port").flag_value("--api-key") == "--port"
    # A negative number or a word with a space is a value; another "-x" is an option.
    assert spec("--api-key -1").flag_value("--api-key") == "-1"
    assert spec("--max-model-len -1").flag_value("--max-model-len") == "-1"
    assert spec("--api-key '-x y'").flag_value("--api-key") == "-x y"
    assert spec("--api-key -x").flag_values("--api-key") == ()  # vLLM: expected at least one argument
    assert spec("--served-model-name 'my --port name'").served_names == ("my --port name",)


def test_double_dash_ends_the_options() -> None:
    assert spec("-- --api-key K").flag_value("--api-key") is None
    assert not spec("-- --api-key K").has_flag("--api-key")
    assert spec("--api-key -- K").flag_values("--api-key") == ()  # argparse gives it nothing
    assert spec("--dtype half -- --port 1").args[-2:] == ("--port", "1")  # not a flag: not refused


def test_ambiguous_abbreviations_name_no_value() -> None:
    # vLLM: "ambiguous option: --api could match --api-server-count, --api-key" (and exits).
    (use,) = scan_flags(["--api", "K"])
    assert use.flags == ("--api-server-count", "--api-key") and use.values == ()
    assert spec("--api K").flag_value("--api-key") is None
    # A policy check errs on the safe side: the word may be the flag.
    assert spec("--api K").has_flag("--api-key")


def test_dotted_keys_and_short_aliases() -> None:
    # vLLM merges dotted keys into one JSON value, applied after the other arguments.
    assert spec('--hf-overrides.a 1 --hf_overrides.b "x y"').flag_value("--hf-overrides") == (
        '{"a": 1, "b": "x y"}'
    )
    assert spec("--api-key.x 1 --api-key K").flag_value("--api-key") == '{"x": 1}'
    assert spec("-tp 2").flag_value("--tensor-parallel-size") == "2"
    assert spec("--tensor-parallel-size 2 -tp=4").flag_value("-tp") == "4"
    assert spec("-asc 2").flag_value("--api-server-count") == "2"
    assert spec("-O3").flag_value("--optimization-level") == "3"
    assert flag_name("--tensor_parallel_size") == flag_name("-tp") == "--tensor-parallel-size"


def test_shutdown_timeout_in_any_spelling() -> None:
    for args in ("--shutdown-timeout 5", "--shutdown_timeout=5", "--shutdown 5"):
        assert spec(args).has_flag("--shutdown-timeout"), args
        assert spec(args).flag_value("--shutdown-timeout") == "5", args
    assert not spec("--dtype half").has_flag("--shutdown-timeout")


def test_a_flag_the_table_does_not_know_is_still_found() -> None:
    """A deny-list may name a flag of a newer vLLM than the table's."""
    assert spec("--future_flag=1").has_flag("--future-flag")
    assert spec("--future-flag x --api-key K").flag_value("--future_flag") == "x"
    assert spec("--api-key K --flag").flag_value("--flag") is None
    assert not spec("--api-key K").has_flag("--api")  # --api-key is a flag of its own


# ------------------------------------------------------------------------------- policies


@pytest.mark.parametrize(
    "args",
    [
        "--port 1",
        "--port=1",
        "--por 9000",  # the only flag that starts with --por
        "--ho 0.0.0.0",
        "--host=::",
        "--ud /tmp/x.sock",
        "--ud=/tmp/x.sock",
        "--host.a 1",  # a dotted key sets --host too (vLLM: host='{"a": 1}')
        "--dtype half --po 9000",  # ambiguous (--port, --pooler-config): vLLM refuses it; so do we
    ],
)
def test_proxy_owned_flags_in_every_spelling(args: str) -> None:
    with pytest.raises(SpecError, match="which the proxy owns") as info:
        spec(args)
    assert any(flag in str(info.value) for flag in ("--host", "--port", "--uds"))


def test_similar_words_are_not_proxy_owned() -> None:
    spec("--hostname x --port-range 1 --pooler-config '{}' --served-model-name n --api-key=--port")


DENIED = ("--trust-remote-code", "--enable-lora")


@pytest.mark.parametrize(
    "args",
    [
        "--trust-remote-code",
        "--trust_remote_code",
        "--trust-remote",
        "--trust_remote=1",  # vLLM refuses a value for it, but it names the flag
        "--trust-remote=1",
        "--trust",  # ambiguous (two --trust-request-* flags too): vLLM refuses it; so do we
        "--dtype half --enable_lora",
    ],
)
def test_denied_flags_in_every_spelling(args: str) -> None:
    with pytest.raises(PolicyError, match="not allowed"):
        resolve(f"m {args}", {}, policy="open", denied_flags=DENIED)


@pytest.mark.parametrize(
    "args",
    ["--no-trust-remote-code", "--trust-request-chat-template", "--trust-rem.x 1 -- --trust-remote-code"],
)
def test_other_flags_pass_the_deny_list(args: str) -> None:
    spec_, name = resolve(f"m {args}", {}, policy="open", denied_flags=DENIED)
    assert spec_.model == "m" and name is None


def test_a_denied_short_alias() -> None:
    with pytest.raises(PolicyError, match="--tensor-parallel-size"):
        resolve("m -tp 2", {}, policy="open", denied_flags=("--tensor-parallel-size",))


# ------------------------------------------------------------------------------- the simulator


@pytest.mark.parametrize(
    "args",
    [
        "--api_key K",
        "--api-k=K",
        "--api-key A --api_key B C",
        "--served_model_name a b --api-ke K",
        "--served m1 --served-model-name=m2",
        "--api-key=--port --seed=3",
    ],
)
def test_the_simulator_reads_each_spelling_as_the_scanner_does(args: str) -> None:
    parsed = spec(args)
    namespace = parse_args(["serve", parsed.model, *parsed.args])
    assert namespace.api_key == (list(parsed.flag_values("--api-key") or []) or None)
    assert namespace.served_model_name == (list(parsed.served_names) or None)


# ------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("spelling", ["--api_key", "--api-k"])
async def test_switch_with_vllm_key_in_another_spelling_is_ready(make_proxy: Any, spelling: str) -> None:
    """vLLM started with ``--api_key K`` (or ``--api-k K``) wants K on every request: the proxy
    must find it to probe readiness and to proxy requests. Before the scanner it did not, so
    the probes got 401 until the ready timeout (here 20 s) ended the switch with a 504."""
    proxy = await make_proxy(ready_timeout=20.0)
    started = time.monotonic()
    status, body = await proxy.switch(f"m {spelling} {shlex.quote('vllm-secret')} {FAST}")
    took = time.monotonic() - started
    assert status == 200, body
    assert took < proxy.settings.ready_timeout  # ready, not timed out (the simulator loads in < 1 s)
    assert (await proxy.status())["state"] == "ready"
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with proxy.session.post(f"{proxy.url}/v1/chat/completions", json=payload) as resp:
        answer = await resp.json()
        assert resp.status == 200 and answer["choices"], answer
