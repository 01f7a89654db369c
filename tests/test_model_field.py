"""relay.model_field.requested_model: the top-level JSON ``"model"`` of a request body, read
without a full parse where that is safe. Pure unit tests (no process, no socket)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from aic_vllm_proxy.relay.model_field import PARSE_LIMIT, requested_model


def body(obj: Any, **dumps: Any) -> bytes:
    return json.dumps(obj, **dumps).encode()


def chat(model: Any = "m", size: int = 1000, **extra: Any) -> dict[str, Any]:
    """An OpenAI chat body of about ``size`` bytes, ``messages`` first as the openai client sends."""
    text = "word " * max(1, size // 5)
    return {"messages": [{"role": "user", "content": text}], "model": model, **extra}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"m","messages":[]}',  # compact, model first
        b'{"messages":[],"model":"m"}',  # model last
        b'{"messages": [], "model": "m", "stream": true}',  # json.dumps' separators
        b'{\n  "messages": [],\n  "model" :\t"m"\n}',  # pretty-printed, tab before the value
        b' \r\n\t{"model":"m"}',  # whitespace before the object
        b'\xef\xbb\xbf{"model":"m"}',  # a UTF-8 byte order mark (json.loads accepts it)
        b"{" + b" " * 200 + b'"model":"m"}',  # more whitespace than the look-back
        b'{"messages":[],\n\n    "model":"m"}',
    ],
)
def test_whitespace_and_layout(raw: bytes) -> None:
    assert json.loads(raw)["model"] == "m"
    assert requested_model(raw) == "m"


@pytest.mark.parametrize(
    ("name", "ensure_ascii"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", True),
        ("a/b", True),
        ('quote"inside', True),  # \" escape
        ("back\\slash", True),
        ("modèle-ü", True),  # \u00e8 escapes
        ("modèle-ü", False),  # raw UTF-8
        ("emoji-😀", True),  # a surrogate pair \ud83d\ude00
        ("emoji-😀", False),
        ("tab\there", True),  # \t escape
    ],
)
def test_escapes_and_unicode(name: str, ensure_ascii: bool) -> None:
    raw = body(chat(name), ensure_ascii=ensure_ascii)
    assert requested_model(raw) == name


def test_escapes_written_by_hand() -> None:
    assert requested_model(b'{"model": "a\\/b"}') == "a/b"
    assert requested_model(b'{"model": "\\u006d"}') == "m"
    assert requested_model(b'{"model": "bad \\x escape"}') is None
    assert requested_model(b'{"model": "lone \\ud83d surrogate"}') == "lone \ud83d surrogate"  # as json.loads


def test_model_as_a_value_is_not_the_name() -> None:
    """``"model"`` as a string value (Gemini's role, a stop string) is not a key."""
    assert requested_model(body({"messages": [{"role": "model", "content": "hi"}]})) is None
    assert requested_model(body({"stop": ["a", "model"]})) is None
    assert requested_model(body({"stop": ["model", "a"]})) is None
    assert requested_model(body({"messages": [{"role": "model"}], "model": "g"})) == "g"
    assert requested_model(body({"model": "model"})) == "model"


def test_model_inside_a_string_is_escaped() -> None:
    """Inside a string value the quotes are escaped (\\"model\\"), so no occurrence is seen."""
    text = 'use {"model": "x"} in your request'
    assert requested_model(body({"messages": [{"role": "user", "content": text}]})) is None
    assert requested_model(body({"messages": [{"role": "user", "content": text}], "model": "m"})) == "m"
    assert requested_model(body({"model": "m", "prompt": text})) == "m"


def test_a_string_that_ends_in_quote_model() -> None:
    """``"say \\"model"``: the bytes ``"model"`` end a string (its quote follows a backslash)."""
    assert requested_model(body({"a": 'say "model', "b": "c"})) is None
    assert requested_model(body({'say "model': "x"})) is None  # a key named say"model
    assert requested_model(body({'say "model': "x", "model": "m"})) == "m"


def test_nested_and_top_level() -> None:
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"properties": {"model": {"type": "string"}}}},
    }
    assert requested_model(body(chat("top", tools=[tool]))) == "top"  # nested after
    assert requested_model(body({"metadata": {"model": "inner"}, "model": "top"})) == "top"  # before
    assert requested_model(body({"model": "top", "metadata": {"model": "inner"}})) == "top"
    assert requested_model(body({"tools": [tool]})) is None  # nested ones only, not a string
    assert requested_model(body({"a": {"model": "x"}, "b": {"model": "y"}})) is None


def test_near_an_end_only_when_surely_top_level() -> None:
    """Brackets next to the key near an end, even inside strings, send it to the other steps."""
    assert requested_model(b'{"messages": [], "model": "m", "stop": "}"}') == "m"
    assert requested_model(b'{"note": "{", "model": "m", "x": [{"model": "n"}]}') == "m"
    assert requested_model(b'{"note": "[", "model": "m", "x": {"model": "n"}}') == "m"
    assert requested_model(b'{"a": ["x", {"model": "n"}], "model": "m"}') == "m"
    assert requested_model(b'{"model": "m", "a": ["x", {"model": "n"}]}') == "m"
    assert requested_model(b'{"a": {"model": "n"}, "b": {"model": "o"}, "model": "m"}') == "m"
    assert requested_model(b'{"a": {"model": "n"}, "model": "m", "b": {"model": "o"}}') == "m"


def test_the_residual_case_a_single_nested_key() -> None:
    """Documented: one nested ``"model"`` key and no top-level one: the nested value is taken."""
    assert requested_model(body({"metadata": {"model": "inner"}, "messages": []})) == "inner"


def test_duplicate_top_level_keys() -> None:
    """The last one, as json.loads reads them, unless the first one settles it from the start
    (documented: a non-string last value does not settle it from the end)."""
    assert requested_model(b'{"model": "a", "model": "b"}') == "b"
    assert requested_model(b'{"x": [], "model": "a", "model": 5, "y": []}') is None  # parsed
    assert requested_model(b'{"model": "a", "model": 5}') == "a"


@pytest.mark.parametrize("value", [5, 1.5, None, True, False, [], ["m"], {"id": "m"}, ""])
def test_not_a_non_empty_string(value: Any) -> None:
    assert requested_model(body(chat(value))) is None
    assert requested_model(body({"model": value, "x": {"model": "nested"}})) is None  # parsed path


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"   ",
        b"model",
        b'"model"',
        b'["model", "m"]',
        b'[{"model": "m"}]',
        b"5",
        b"null",
        b'x{"model": "m"}',
        b'{"messages": []}',
        b"{}",
    ],
)
def test_no_model(raw: bytes | None) -> None:
    assert requested_model(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m',  # cut in the value
        b'{"model": ',
        b'{"model"',
        b'{"model": m}',
        b'{"model"; "m"}',
        b'{"model": "a\nb"}',  # a raw control byte in a string
        b'{"model": "\xff\xfe"}',  # not UTF-8
        b'{"model": "\xff\\n"}',  # not UTF-8, with an escape
        b'{"x": {"model": "a"}, "model": "b", ]',  # several occurrences, invalid: the parse fails
        b'{"x": {"model": "a"}, "model": "b"',
    ],
)
def test_invalid_json(raw: bytes) -> None:
    assert requested_model(raw) is None


def test_too_deep_to_parse() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    raw = b'{"x": ' + deep + b', "model": "a", "y": {"model": "b"}}'
    assert len(raw) < PARSE_LIMIT
    assert requested_model(raw) is None


def test_large_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    """One occurrence: read without json.loads whatever the size; several: parsed up to
    PARSE_LIMIT, beyond it None."""
    big = body(chat("big", size=2 * PARSE_LIMIT))
    tool = {"type": "function", "function": {"parameters": {"properties": {"model": {}}}}}
    # "model" twice, but settled near an end: the openai client's order, and model first.
    big_tools_first = body({"tools": [tool], **chat("end", size=2 * PARSE_LIMIT), "stream": True})
    messages = chat(size=2 * PARSE_LIMIT)["messages"]
    big_model_first = body({"model": "start", "messages": messages, "tools": [tool]})
    # "model" twice and not settled near an end: parsed up to PARSE_LIMIT.
    near = body({"pad": "p" * (PARSE_LIMIT - 100), "x": {"model": "n"}, "model": "top", "y": {}})
    assert len(near) <= PARSE_LIMIT
    over = body({"pad": "p" * PARSE_LIMIT, "x": {"model": "n"}, "model": "top", "y": {}})
    assert requested_model(near) == "top"
    assert requested_model(over) is None

    def no_parse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("json.loads of the body")

    monkeypatch.setattr(json, "loads", no_parse)  # the json module model_field uses
    assert requested_model(big) == "big"
    assert requested_model(big_tools_first) == "end"
    assert requested_model(big_model_first) == "start"
    assert requested_model(over) is None  # not parsed either
    assert requested_model(body(chat("small"))) == "small"


def test_agrees_with_json_loads_on_random_documents() -> None:
    """Differential: random JSON objects (brackets, quotes, backslashes, "model" in keys and
    strings and values, nested "model" keys, padding past the windows, two layouts) read as
    json.loads reads them, the documented single-nested-key case aside."""
    rng = random.Random(13)
    pieces = ["model", "a", "b}", "{x", "[", "]", '"q"', "\\", "é", "😀", " ", 'model"', ":", ","]

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))

    def value(depth: int) -> Any:
        pick = rng.random()
        if depth > 3 or pick < 0.4:
            return rng.choice([text(), 1, None, True, 2.5])
        if pick < 0.7:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(["model", "messages", text()]): value(depth + 1) for _ in range(rng.randint(0, 3))}

    def has_model_key(node: Any) -> bool:
        if isinstance(node, dict):
            return "model" in node or any(has_model_key(v) for v in node.values())
        return isinstance(node, list) and any(has_model_key(v) for v in node)

    for _ in range(3000):
        items = [(rng.choice(["messages", "x", text()]), value(0)) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.6:
            items.insert(rng.randint(0, len(items)), ("model", rng.choice([text(), "m", 5, None, ""])))
        if rng.random() < 0.5:
            items.insert(rng.randint(0, len(items)), ("pad", "p" * rng.choice([500, 1100, 3000])))
        doc = dict(items)
        layout: dict[str, Any] = rng.choice([{"separators": (",", ":")}, {"indent": 2}, {}])
        raw = json.dumps(doc, ensure_ascii=rng.random() < 0.5, **layout).encode()
        wanted = doc.get("model")
        wanted = wanted if isinstance(wanted, str) and wanted else None
        got = requested_model(raw)
        if got != wanted:
            assert "model" not in doc and has_model_key(doc), raw  # the documented case
