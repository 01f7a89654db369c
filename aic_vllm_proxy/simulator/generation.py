"""Deterministic toy "model": tokenizer, generated text and vLLM's response shapes.

* Tokens are whitespace-separated words: a prompt's token count is its word count.
* Generated token ``i`` is the text ``" tok{i}"`` (so the output re-tokenizes to the
  same count); generation stops at ``max_tokens`` (``finish_reason: "length"``) or
  when a ``stop`` string appears (``"stop"``, text cut before the stop string).
* Streaming events are pre-built byte strings in vLLM's exact SSE framing
  (``data: {json}\\n\\n``), compact JSON as FastAPI/pydantic produce it.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

VOCAB_SIZE = 151936
DONE = b"data: [DONE]\n\n"
REQUEST_ID_HEX = 16  # vLLM 0.32: chatcmpl-<16 hex digits>


def count_tokens(text: str) -> int:
    return len(text.split())


def token_text(index: int) -> str:
    return f" tok{index}"


def word_id(word: str) -> int:
    return zlib.crc32(word.encode("utf-8", "replace")) % VOCAB_SIZE


_ID_TO_WORD: dict[int, str] = {}
_ID_TO_WORD_MAX = 100_000


def tokenize(text: str) -> list[int]:
    ids = []
    for word in text.split():
        token = word_id(word)
        if len(_ID_TO_WORD) < _ID_TO_WORD_MAX:
            _ID_TO_WORD.setdefault(token, word)
        ids.append(token)
    return ids


def detokenize(ids: Sequence[int]) -> str:
    return " ".join(_ID_TO_WORD.get(token, f"<|{token}|>") for token in ids)


@lru_cache(maxsize=65536)
def json_str(text: str) -> bytes:
    """A JSON string literal, as pydantic writes it (non-ASCII kept)."""
    return json.dumps(text, ensure_ascii=False).encode()


def dumps(obj: Any) -> bytes:
    """Compact JSON, as FastAPI's JSONResponse writes it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class OutputPlan:
    """What one choice generates: one text delta per token, then a finish reason."""

    deltas: list[str]
    finish_reason: str
    stop_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.deltas)

    @property
    def text(self) -> str:
        return "".join(self.deltas)


@lru_cache(maxsize=256)
def _plain_plan(max_tokens: int) -> OutputPlan:
    return OutputPlan([token_text(i) for i in range(max_tokens)], "length")


GARBAGE = " <garbage>"
"""The text of every token generated with uninitialised weights (after a level-2 wake,
before ``reload_weights``): vLLM generates from whatever the GPU memory holds."""


@lru_cache(maxsize=256)
def garbage_plan(max_tokens: int) -> OutputPlan:
    return OutputPlan([GARBAGE] * max_tokens, "length")


def plan_output(max_tokens: int, stop: Sequence[str] = (), include_stop_str: bool = False) -> OutputPlan:
    """The deltas for ``max_tokens`` tokens, honouring ``stop`` strings like vLLM.

    While streaming, vLLM holds back the last ``len(longest stop) - 1`` characters
    so that it never emits text that a stop string later removes.
    """
    stops = [s for s in stop if s]
    if not stops:
        return _plain_plan(max_tokens)
    hold = max(len(s) for s in stops) - 1
    text = ""
    emitted = 0
    deltas: list[str] = []
    for i in range(max_tokens):
        start = max(0, len(text) - hold)
        text += token_text(i)
        hit: tuple[int, str] | None = None
        for s in stops:
            pos = text.find(s, start)
            if pos >= 0 and (hit is None or pos < hit[0]):
                hit = (pos, s)
        if hit is not None:
            end = hit[0] + (len(hit[1]) if include_stop_str else 0)
            deltas.append(text[emitted:end] if end > emitted else "")
            return OutputPlan(deltas, "stop", hit[1])
        if i == max_tokens - 1:
            deltas.append(text[emitted:])
            break
        upto = max(emitted, len(text) - hold)
        deltas.append(text[emitted:upto])
        emitted = upto
    return OutputPlan(deltas, "length")


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def _usage_json(usage: tuple[int, int]) -> bytes:
    prompt, completion = usage
    return b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}' % (
        prompt,
        prompt + completion,
        completion,
    )


class StreamFormatter:
    """The SSE events of one streamed request, byte for byte as vLLM 0.32 writes them.

    Chat: a role event, one event per token, the last token's event carrying
    ``finish_reason`` (and ``system_fingerprint`` unless usage is included), an
    optional usage event (``choices: []``), then ``data: [DONE]``. Completions: the
    same without the role event. ``usage`` arguments are (prompt, completion) token
    counts for ``continuous_usage_stats``.
    """

    def __init__(self, chat: bool, request_id: str, created: int, model: str, fingerprint: str) -> None:
        self.chat = chat
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        self._head = b'data: {"id":%s,"object":"%s","created":%d,"model":%s,"choices":' % (
            json_str(request_id),
            obj,
            created,
            json_str(model),
        )
        self._choice = self._head + b'[{"index":'
        self._fingerprint = b',"system_fingerprint":%s' % json_str(fingerprint)
        if chat:
            self._open = b',"delta":{"content":'
            self._mid = b'},"logprobs":null,"finish_reason":'
            self._close = b',"token_ids":null}]'
        else:
            self._open = b',"text":'
            self._mid = b',"logprobs":null,"finish_reason":'
            self._close = b',"prompt_token_ids":null,"token_ids":null}]'
        self._token_tail = b"null" + (b"" if chat else b',"stop_reason":null') + self._close

    @staticmethod
    def _usage(usage: tuple[int, int] | None) -> bytes:
        return b"" if usage is None else b',"usage":' + _usage_json(usage)

    def role(self, index: int, usage: tuple[int, int] | None = None) -> bytes:
        return b"%s%d%s%s%s" % (
            self._choice,
            index,
            b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]',
            self._usage(usage),
            b',"prompt_token_ids":null,"prompt_text":null}\n\n',
        )

    def token(self, index: int, text: str, usage: tuple[int, int] | None = None) -> bytes:
        return b"%s%d%s%s%s%s%s}\n\n" % (
            self._choice,
            index,
            self._open,
            json_str(text),
            self._mid,
            self._token_tail,
            self._usage(usage),
        )

    def final(
        self,
        index: int,
        text: str,
        finish_reason: str,
        stop_reason: str | None,
        *,
        usage: tuple[int, int] | None = None,
        fingerprint: bool = True,
    ) -> bytes:
        stop = b"null" if stop_reason is None else json_str(stop_reason)
        return b'%s%d%s%s%s"%s","stop_reason":%s%s%s%s}\n\n' % (
            self._choice,
            index,
            self._open,
            json_str(text),
            self._mid,
            finish_reason.encode(),
            stop,
            self._close,
            self._usage(usage),
            self._fingerprint if fingerprint else b"",
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return b'%s[],"usage":%s%s}\n\n' % (
            self._head,
            _usage_json((prompt_tokens, completion_tokens)),
            self._fingerprint,
        )


def error_event(message: str, err_type: str = "InternalServerError", code: int = 500) -> bytes:
    """vLLM's in-stream error event (note: ``json.dumps`` spacing, not compact)."""
    body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def chat_response(
    request_id: str,
    created: int,
    model: str,
    plans: Sequence[OutputPlan],
    prompt_tokens: int,
    fingerprint: str,
) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {
                "role": "assistant",
                "content": plan.text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": plan.finish_reason,
            "stop_reason": plan.stop_reason,
            "token_ids": None,
            "routed_experts": None,
        }
        for i, plan in enumerate(plans)
    ]
    completion = sum(p.completion_tokens for p in plans)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": usage_dict(prompt_tokens, completion),
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def completion_response(
    request_id: str,
    created: int,
    model: str,
    plans: Sequence[OutputPlan],
    prompt_tokens: int,
    fingerprint: str,
) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "text": plan.text,
            "logprobs": None,
            "finish_reason": plan.finish_reason,
            "stop_reason": plan.stop_reason,
            "token_ids": None,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "routed_experts": None,
        }
        for i, plan in enumerate(plans)
    ]
    completion = sum(p.completion_tokens for p in plans)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": usage_dict(prompt_tokens, completion),
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    rng = random.Random(zlib.crc32(text.encode("utf-8", "replace")))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = sum(v * v for v in vec) ** 0.5 or 1.0
    return [v / norm for v in vec]


def encode_embedding(vec: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
    return vec
