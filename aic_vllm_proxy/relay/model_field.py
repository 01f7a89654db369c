"""The model a proxied request names: the top-level ``"model"`` string of its JSON body,
read without parsing the body when that is safe, so that routing costs a few µs.

:func:`requested_model` answers ``None`` for a body that names no model (no body, not a JSON
object, no ``"model"`` key, a ``"model"`` that is not a non-empty string): such a request goes
where a request without a model goes. vLLM itself serves a missing, ``null`` or empty ``model``
with its (first) served model, and answers 400 for a non-string one.

What it relies on: in valid JSON the bytes ``"model"`` are a whole string token (``model`` as
a key, or as a value: ``{"role": "model"}``) or the end of a string whose text ends in
``"model`` (``"say \\"model"``); never the inside of a longer string, where a quote is escaped
(``\\"model\\"``). An occurrence is a key when the byte before it, past whitespace, is ``{`` or
``,`` (a quote inside a string follows a backslash) and a ``:`` follows it. Its value is read
when it is a JSON string: a plain one (no backslash, no control byte) decoded as UTF-8, one
with escapes by ``json.loads`` of that string token alone.

How it reads the body:

1. The first byte after optional whitespace (and a UTF-8 byte order mark, which ``json.loads``
   also skips) must be ``{``; otherwise ``None``.
2. Near either end (:data:`WINDOW` bytes), without looking at the rest: the last ``"model"``
   key when all that follows its string value is ``}`` and brackets-free text (the ``openai``
   client writes ``messages`` first, then ``model``, then the scalar options), or the first
   ``"model"`` key when all before it is one ``{`` and brackets-free text (``curl`` examples
   write ``model`` first). Either way the key is at the top level: the brackets counted
   include any inside strings, so none counted means none there. Cost: at most 2 x WINDOW
   bytes searched, whatever the size of the body.
3. Otherwise, the whole body is searched. One occurrence, a key: its string value is taken
   (a nested key can be, see below). Several occurrences (a nested key too, ``"model"`` in a
   tool's schema, a value ``"model"``): ``json.loads`` of the whole body and its top-level
   ``"model"``; duplicate top-level keys give the last one, as ``json.loads`` (and so vLLM's
   FastAPI) reads them. Such a body over :data:`PARSE_LIMIT` bytes is not parsed (the event
   loop would stall for milliseconds): ``None``.

``python -m tests.benchmarks.model_field`` measures what each path costs.

What is not exact, and why that is acceptable:

- **A single ``"model"`` key that is nested, with no top-level one**, not settled by step 2
  (``{"messages": [{"role": "user", "content": "hi", "model": "x"}], "n": 1}``): its value
  ``x`` is taken. vLLM would serve such a request with its default model; the proxy routes it
  to the instance named ``x``, or answers 404 when no instance has that name. Telling it apart
  would need a parse of the body every time.
- **Invalid JSON**: ``None`` where this function sees it (the parse of step 3, a broken value
  after the key); steps 2 and 3 do not validate the rest of the body (that is the full parse
  they avoid), so a body broken elsewhere goes to the instance it names, whose vLLM answers
  the 400.
- **Duplicate top-level ``"model"`` keys** settled by step 2 from the start: the first one.
- **A key spelled with escapes** (``"mod\\u0065l"``) is not seen: ``None``. No client writes it.
- **Several occurrences in a body over** :data:`PARSE_LIMIT`, not settled by step 2: ``None``.
"""

from __future__ import annotations

import json
import re

#: The key searched, as bytes.
KEY = b'"model"'
#: How far from either end of the body step 2 looks for the key.
WINDOW = 1024
#: The largest body parsed in full when ``"model"`` occurs more than once (1 MiB).
PARSE_LIMIT = 1 << 20

# Whitespace is JSON's four bytes. A UTF-8 byte order mark may open the body.
_OBJECT = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*\{")
# After the key: a colon and a plain string (no quote, backslash or control byte in it).
_PLAIN = re.compile(rb'[ \t\r\n]*:[ \t\r\n]*"([^"\\\x00-\x1f]*)"')
# After the key: a colon and a string with escapes, decoded by json.loads.
_ESCAPED = re.compile(rb'[ \t\r\n]*:[ \t\r\n]*("(?:[^"\\\x00-\x1f]|\\.)*")')
_SPACE = b" \t\r\n"
_BRACE, _COMMA = b"{,"
# How far back the byte before the key is looked for first (past whitespace).
_LOOK_BACK = 64


def requested_model(body: bytes | None) -> str | None:
    """The top-level JSON ``"model"`` string of a request body, or ``None`` (see the module)."""
    if not body or (body[0] != _BRACE and _OBJECT.match(body) is None):
        return None
    # Step 2, near the end: the last "model" key, then its string value and "}" alone.
    last = body.rfind(KEY, max(0, len(body) - WINDOW))
    if last >= 0 and _is_key(body, last):
        value, end = _string_value(body, last)
        if end >= 0 and _closes_the_object(body[end:]):
            return value
    # Step 2, near the start: the first "model" key, after "{" alone.
    first = body.find(KEY, 0, WINDOW)
    if first >= 0 and _is_key(body, first) and _opens_the_object(body[:first]):
        return _string_value(body, first)[0]
    # Step 3: the whole body (what is left of it).
    if first < 0:
        first = body.find(KEY, WINDOW - len(KEY) + 1)
        if first < 0:
            return None
    if (last >= 0 and last != first) or body.find(KEY, first + len(KEY)) >= 0:
        return _parsed(body)
    return _string_value(body, first)[0] if _is_key(body, first) else None


def _closes_the_object(tail: bytes) -> bool:
    """Whether ``tail`` holds no bracket but one ``}`` at its end (strings included: so the
    key before it is at the top level)."""
    return (
        tail.count(b"}") == 1
        and tail.rstrip(_SPACE).endswith(b"}")
        and tail.count(b"{") + tail.count(b"[") + tail.count(b"]") == 0
    )


def _opens_the_object(head: bytes) -> bool:
    """Whether ``head`` holds no bracket but one ``{`` (strings included: so the key after it
    is at the top level)."""
    return head.count(b"{") == 1 and head.count(b"}") + head.count(b"[") + head.count(b"]") == 0


def _is_key(body: bytes, at: int) -> bool:
    """Whether the ``"model"`` at ``at`` follows ``{`` or ``,`` (past whitespace)."""
    before = body[at - 1]  # body[0] is "{" or whitespace, never the key's quote: at >= 1
    if before in _SPACE:  # past whitespace (all of it when the look-back holds only that)
        text = body[max(0, at - _LOOK_BACK) : at].rstrip(_SPACE) or body[:at].rstrip(_SPACE)
        before = text[-1] if text else 0
    return before in (_BRACE, _COMMA)


def _string_value(body: bytes, at: int) -> tuple[str | None, int]:
    """The string value of the key at ``at`` (``None`` when empty or not a valid string) and
    where it ends (-1 when no JSON string follows the colon)."""
    end = at + len(KEY)
    plain = _PLAIN.match(body, end)
    if plain is not None:
        try:
            name = plain.group(1).decode()
        except UnicodeDecodeError:
            return None, plain.end()
        return name or None, plain.end()
    escaped = _ESCAPED.match(body, end)
    if escaped is None:
        return None, -1
    try:
        value = json.loads(escaped.group(1))
    except ValueError:  # a bad escape or a lone surrogate's bytes (UnicodeDecodeError)
        return None, escaped.end()
    return (value if isinstance(value, str) and value else None), escaped.end()


def _parsed(body: bytes) -> str | None:
    """The top-level ``"model"`` of the whole body parsed (several occurrences)."""
    if len(body) > PARSE_LIMIT:
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # invalid JSON or UTF-8; nested too deep
        return None
    value = document.get("model") if isinstance(document, dict) else None
    return value if isinstance(value, str) and value else None
