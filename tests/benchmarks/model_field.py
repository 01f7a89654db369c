"""``python -m tests.benchmarks.model_field``: the CPU cost of reading a request's ``model`` for
routing (``relay.model_field.requested_model``), in ns per call, for the bodies a proxy sees:
chat bodies of 1 KB, 10 KB and 1 MB as the ``openai`` client writes them (``messages`` first,
``model`` after them: read near the end), a 10 KB one with tools after ``model`` (the whole
body is searched), and one whose tool schema has a ``"model"`` property too (parsed in full).
``json.loads`` of the 10 KB body is measured beside them for scale. Also the ``routing``
section of ``python -m tests.benchmarks``.

Issue 13's target: at most 10 µs per request for typical bodies (the 1 KB and 10 KB ones here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

from aic_vllm_proxy.relay.model_field import requested_model

TARGET_US = 10.0
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
_TEXT = (
    "Explain how a reverse proxy decides which backend model should answer a request, "
    "and what it costs to read the JSON body before forwarding it. "
)
_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather at a place.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
_PICK = {
    "type": "function",
    "function": {
        "name": "pick_model",
        "description": "Choose a model for a sub-task.",
        "parameters": {
            "type": "object",
            "properties": {"model": {"type": "string"}, "reason": {"type": "string"}},
            "required": ["model"],
        },
    },
}


def chat_body(size: int, **extra: Any) -> bytes:
    """A chat request of at least ``size`` bytes: a conversation of alternating turns."""
    turn = len(json.dumps({"role": "assistant", "content": _TEXT * 3}))
    turns = max(1, size // turn - 1)
    while True:
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        messages += [{"role": ("user", "assistant")[i % 2], "content": _TEXT * 3} for i in range(turns)]
        body = {"messages": messages, "model": MODEL, "max_tokens": 256, "stream": True, **extra}
        raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) >= size:
            return raw
        turns += 1


def bodies() -> list[tuple[str, bytes, bool]]:
    """(name, body, typical: the 10 µs target applies)."""
    return [
        ("1 KB chat", chat_body(1000), True),
        ("10 KB chat", chat_body(10_000), True),
        ("1 MB chat", chat_body(1 << 20), False),
        ("10 KB chat, tools after model", chat_body(10_000, tools=[_WEATHER] * 4), True),
        ('2 KB chat, "model" in a tool too', chat_body(2000, tools=[_PICK]), False),
    ]


def ns_per_call(call: Callable[[], object], repeats: int, seconds: float) -> tuple[float, float]:
    """(median, min) ns per call over ``repeats`` timings of about ``seconds`` each."""
    once = timeit.timeit(call, number=1)
    number = max(1, int(seconds / max(once, 1e-7)))
    times = [t / number * 1e9 for t in timeit.repeat(call, number=number, repeat=repeats)]
    return statistics.median(times), min(times)


def measure(quick: bool = False) -> dict[str, Any]:
    repeats, seconds = (3, 0.01) if quick else (7, 0.1)
    out: dict[str, Any] = {"target_us": TARGET_US, "bodies": {}}
    for name, raw, typical in bodies():
        assert requested_model(raw) == MODEL, name
        median, best = ns_per_call(partial(requested_model, raw), repeats, seconds)
        out["bodies"][name] = {"bytes": len(raw), "ns_per_call": median, "ns_min": best, "typical": typical}
    ten = bodies()[1][1]
    median, best = ns_per_call(partial(json.loads, ten), repeats, seconds)
    out["json_loads_10kb"] = {"bytes": len(ten), "ns_per_call": median, "ns_min": best}
    return out


def report(result: dict[str, Any]) -> str:
    def line(name: str, row: dict[str, Any], verdict: str = "") -> str:
        return f"{name:<30} {row['bytes']:>9} {row['ns_per_call']:>10.0f} {row['ns_min']:>10.0f}  {verdict}"

    lines = [f"{'body':<30} {'bytes':>9} {'ns/call':>10} {'min':>10}  target"]
    for name, row in result["bodies"].items():
        verdict = ""
        if row["typical"]:
            verdict = "ok" if row["ns_per_call"] <= TARGET_US * 1000 else "FAIL"
            verdict = f"<= {TARGET_US:g} us  {verdict}"
        lines.append(line(name, row, verdict).rstrip())
    lines.append(line("(json.loads of the 10 KB body)", result["json_loads_10kb"]).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.model_field", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short timings (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    args = parser.parse_args(argv)
    result = measure(quick=args.quick)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
