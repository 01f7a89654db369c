"""Request parsing and validation, with vLLM 0.32's error bodies.

Two kinds of errors, as in vLLM:

* ``ValidationFailed``: what FastAPI's request validation rejects (bad JSON, wrong
  content type, wrong types, missing fields): 400, ``"type": "Bad Request"``, message
  ``"1 validation error:\\n  {'type': ..., 'loc': 'body.x', 'msg': ..., 'input': ...}"``,
  ``param`` the field path.
* ``ApiError``: what vLLM's serving layer rejects (unknown model: 404 ``NotFoundError``;
  sampling parameters, context length: 400 ``BadRequestError`` with a
  ``(parameter=..., value=...)`` suffix).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .generation import count_tokens

_MISSING = object()


def sanitize_message(message: str) -> str:
    """vLLM hides file system paths in error messages (``<path>``)."""
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    message = re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message)
    return message.strip()


class ApiError(Exception):
    def __init__(
        self,
        message: str,
        *,
        err_type: str = "BadRequestError",
        status: int = 400,
        param: str | None = None,
        value: Any = None,
    ) -> None:
        extras = [f"{k}={v}" for k, v in (("parameter", param), ("value", value)) if v is not None]
        if extras:
            message = f"{message} ({', '.join(extras)})"
        super().__init__(message)
        self.message = sanitize_message(message)
        self.err_type = err_type
        self.status = status
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.status,
            }
        }


class ValidationFailed(ApiError):
    def __init__(self, error: dict[str, Any] | str, param: str | None = None) -> None:
        super().__init__("1 validation error:\n  " + str(error), err_type="Bad Request")
        self.param = param


def _summarize(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + "...[truncated]"
    if isinstance(value, (list, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    return str(value)


def _fail(kind: str, loc: Sequence[Any], msg: str, value: Any = _MISSING) -> ValidationFailed:
    path = ".".join(str(p) for p in ("body", *loc))
    error: dict[str, Any] = {"type": kind, "loc": path, "msg": msg}
    if value is not _MISSING:
        error["input"] = _summarize(value)
    return ValidationFailed(error, path)


def model_not_found(model: str, served: Sequence[str]) -> ApiError:
    error = ApiError(
        f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.",
        err_type="NotFoundError",
        status=404,
    )
    error.param = "model"  # named in the body, but vLLM adds no "(parameter=model)" to this message
    return error


def check_content_type(content_type: str | None) -> None:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ValidationFailed("Unsupported Media Type: Only 'application/json' is allowed")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        pos = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        error = {
            "type": "json_invalid",
            "loc": f"body.{pos}",
            "msg": "JSON decode error",
            "input": "<dict of 0 items>",
            "ctx": {"error": msg},
        }
        raise ValidationFailed(error, f"body.{pos}") from None
    if not isinstance(body, dict):
        raise _fail(
            "model_attributes_type",
            (),
            "Input should be a valid dictionary or object to extract fields from",
            body,
        )
    return body


# -- typed field access (pydantic's lax mode) -----------------------------------------


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _fail(
                "int_parsing",
                (key,),
                "Input should be a valid integer, unable to parse string as an integer",
                value,
            ) from None
    raise _fail("int_type", (key,), "Input should be a valid integer", value)


def _opt_float(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _fail(
                "float_parsing",
                (key,),
                "Input should be a valid number, unable to parse string as a number",
                value,
            ) from None
    raise _fail("float_type", (key,), "Input should be a valid number", value)


def _opt_bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise _fail("bool_parsing", (key,), "Input should be a valid boolean", value)


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _fail("string_type", (key,), "Input should be a valid string", value)


def _stop_list(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise _fail("string_type", ("stop",), "Input should be a valid string", stop)


# -- generation requests ------------------------------------------------------------


@dataclass
class GenRequest:
    """A parsed /v1/completions or /v1/chat/completions request."""

    chat: bool
    model: str | None
    prompt_lens: list[int]
    max_tokens: int | None
    max_tokens_param: str = "max_tokens"
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    stop: list[str] = field(default_factory=list)
    include_stop_str: bool = False
    request_id: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lens)


def _common(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    stream = _opt_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = continuous = False
    if options is not None:
        if not isinstance(options, dict):
            raise _fail("model_type", ("stream_options",), "Input should be a valid dictionary")
        if not stream:
            raise ApiError("Stream options can only be defined when `stream=True`.", param="stream_options")
        include_usage = _opt_bool(options, "include_usage", True)
        continuous = include_usage and _opt_bool(options, "continuous_usage_stats", False)
    n = _opt_int(body, "n")
    n = 1 if n is None else n
    if n < 1:
        raise ApiError(f"n must be at least 1, got {n}.")
    temperature = _opt_float(body, "temperature")
    if temperature is not None and temperature < 0:
        raise ApiError(
            f"temperature must be non-negative, got {temperature}.",
            param="temperature",
            value=temperature,
        )
    if temperature is not None and temperature > 2:
        raise ApiError(
            f"temperature must be in [0, 2], got {temperature}.",
            param="temperature",
            value=temperature,
        )
    top_p = _opt_float(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(f"top_p must be in (0, 1], got {top_p}.", param="top_p", value=top_p)
    param = "max_tokens"
    max_tokens = None
    if chat:
        max_tokens = _opt_int(body, "max_completion_tokens")
        if max_tokens is not None:
            param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(
            f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens", value=max_tokens
        )
    return {
        "model": _opt_str(body, "model"),
        "stream": stream,
        "include_usage": include_usage,
        "continuous_usage": continuous,
        "n": n,
        "max_tokens": max_tokens,
        "max_tokens_param": param,
        "stop": _stop_list(body),
        "include_stop_str": _opt_bool(body, "include_stop_str_in_output"),
        "request_id": _opt_str(body, "request_id"),
    }


def content_tokens(content: Any, loc: tuple[Any, ...]) -> int:
    """Tokens of a message content: words of text parts, 1 per image/audio/video part
    (whose data, base64 data URLs included, is never decoded)."""
    if content is None:
        return 0
    if isinstance(content, str):
        return count_tokens(content)
    if not isinstance(content, list):
        raise _fail("string_type", loc, "Input should be a valid string", content)
    total = 0
    for i, part in enumerate(content):
        if isinstance(part, str):
            total += count_tokens(part)
        elif not isinstance(part, dict):
            raise _fail("model_type", (*loc, i), "Input should be a valid dictionary", part)
        elif part.get("type", "text") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _fail("missing", (*loc, i, "text"), "Field required", part)
            total += count_tokens(text)
        else:
            total += 1
    return total


def messages_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages", _MISSING)
    if messages is _MISSING:
        raise _fail("missing", ("messages",), "Field required", body)
    if not isinstance(messages, list):
        raise _fail("list_type", ("messages",), "Input should be a valid list", messages)
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _fail("model_type", ("messages", i), "Input should be a valid dictionary", message)
        if not isinstance(message.get("role"), str):
            raise _fail("missing", ("messages", i, "role"), "Field required", message)
        total += content_tokens(message.get("content"), ("messages", i, "content"))
    return total


def parse_chat(body: dict[str, Any]) -> GenRequest:
    prompt = messages_tokens(body)
    return GenRequest(chat=True, prompt_lens=[prompt], **_common(body, chat=True))


def prompt_lengths(prompt: Any) -> list[int]:
    """Token counts of a completion prompt: str, [str], [int] or [[int]]."""
    if isinstance(prompt, str) and prompt:
        return [count_tokens(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [count_tokens(p) for p in prompt]
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [len(prompt)]
        if all(isinstance(p, list) for p in prompt):
            return [len(p) for p in prompt]
    if prompt is None or prompt == [] or prompt == "":
        raise ApiError("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
    raise _fail("string_type", ("prompt",), "Input should be a valid string", prompt)


def parse_completion(body: dict[str, Any]) -> GenRequest:
    lens = prompt_lengths(body.get("prompt"))
    return GenRequest(chat=False, prompt_lens=lens, **_common(body, chat=False))


def effective_max_tokens(req: GenRequest, max_model_len: int, default: int) -> int:
    """vLLM's context checks, then ``min(max_tokens, max_model_len - prompt)``."""
    if req.max_tokens is not None and req.max_tokens > max_model_len:
        raise ApiError(
            f"{req.max_tokens_param}={req.max_tokens} cannot be greater than "
            f"max_model_len={max_model_len}. Please request fewer output tokens.",
            param=req.max_tokens_param,
            value=req.max_tokens,
        )
    longest = max(req.prompt_lens)
    if longest > max_model_len:
        raise ApiError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains {longest} input tokens, which exceeds this limit even without "
            "any output tokens. Please reduce the length of the input prompt.",
            param="input_tokens",
            value=longest,
        )
    wanted = default if req.max_tokens is None else req.max_tokens
    max_tokens = min(wanted, max_model_len - longest)
    if max_tokens < 1:
        raise ApiError(
            f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens", value=max_tokens
        )
    return max_tokens


# -- embeddings and tokenizer -------------------------------------------------------


@dataclass
class EmbedRequest:
    model: str | None
    texts: list[str]
    prompt_lens: list[int]
    encoding_format: str
    dimensions: int | None


def parse_embedding(body: dict[str, Any]) -> EmbedRequest:
    raw = body.get("input", _MISSING)
    texts: list[str]
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        texts = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        texts = [" ".join(str(x) for x in raw)]
    elif isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
        texts = [" ".join(str(t) for t in x) for x in raw]
    elif raw is _MISSING:
        raise _fail("missing", ("input",), "Field required", body)
    else:
        raise _fail("string_type", ("input",), "Input should be a valid string", raw)
    fmt = _opt_str(body, "encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _fail("literal_error", ("encoding_format",), "Input should be 'float' or 'base64'", fmt)
    return EmbedRequest(
        model=_opt_str(body, "model"),
        texts=texts,
        prompt_lens=[len(t.split()) for t in texts],
        encoding_format=fmt,
        dimensions=_opt_int(body, "dimensions"),
    )


def tokenize_text(body: dict[str, Any]) -> str:
    """The text /tokenize counts: ``prompt``, or the text of ``messages``."""
    if "messages" in body:
        messages_tokens(body)  # validates
        parts: list[str] = []
        for message in body["messages"]:
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [p if isinstance(p, str) else str(p.get("text", "")) for p in content]
        return " ".join(parts)
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING:
        raise _fail("missing", ("prompt",), "Field required", body)
    if not isinstance(prompt, str):
        raise _fail("string_type", ("prompt",), "Input should be a valid string", prompt)
    return prompt


def detokenize_ids(body: dict[str, Any]) -> list[int]:
    tokens = body.get("tokens", _MISSING)
    if tokens is _MISSING:
        raise _fail("missing", ("tokens",), "Field required", body)
    if not isinstance(tokens, list):
        raise _fail("list_type", ("tokens",), "Input should be a valid list", tokens)
    for i, token in enumerate(tokens):
        if not isinstance(token, int) or isinstance(token, bool):
            raise _fail("int_type", ("tokens", i), "Input should be a valid integer", token)
    return tokens


def served_name(requested: Any, served: Sequence[str]) -> str:
    """The model name in responses: the first served name whichever served name (or none) the
    request gives, as vLLM 0.32's ``OpenAIServingModels.model_name`` answers
    ``base_model_paths[0].name``; raises 404 for names not served."""
    if not requested or (isinstance(requested, str) and requested in served):
        return served[0]
    raise model_not_found(str(requested), served)
