"""The model a proxied request names: the top-level ``"model"`` string of its JSON body,
read without parsing the body when that is safe, so that routing costs a few µs.

:func:`requested_model` answers ``None`` for a body that names no model (no body, not a JSON
object, no ``"model"`` key, a ``"model"`` that is not a non-empty string): such a request goes
where a request without a model goes. vLLM itself serves a missing, ``null`` or empty ``model``
with its (first) served model, and answers 400 for a non-string one.

How it reads the body:

1. The first byte after optional whitespace (and a UTF-8 byte order mark, which ``json.loads``
   also skips) must be ``{``; otherwise ``None``.
2. The bytes ``"model"`` are searched. In valid JSON they are a whole string token, ``model``
   as a key or as a value (``{"role": "model"}``), or the end of a string whose content ends in
   ``"model`` (the escaped quote: ``"say \\"model"``). An occurrence inside a longer string
   never matches: a quote inside a string is escaped, so ``\\"model\\"`` is not ``"model"``.
3. Exactly one occurrence (the common case: one bytes search finds it, a second one finds no
   other): it is taken when it is a key, i.e. the byte before it (past whitespace) is ``{`` or
   ``,`` (which also rules out the escaped-quote case, whose quote follows a backslash) and
   ``:`` follows it; the value after the colon must be a JSON string. A plain string (no
   backslash, no control character) is decoded as UTF-8; one with escapes is decoded by
   ``json.loads`` of that string token alone. So a ``"model"`` that is a value is never
   taken for the name; a nested ``"model"`` key can be (below).
4. Several occurrences (a nested key too, ``"model"`` in a tool's schema, a value ``"model"``):
   ``json.loads`` of the whole body, and the top-level ``"model"`` if it is a string. Duplicate
   top-level keys: the last one, as ``json.loads`` (and so vLLM's FastAPI) takes it. Such a body
   over :data:`PARSE_LIMIT` bytes is not parsed (the event loop would stall for milliseconds):
   ``None``.

What is not exact, and why that is acceptable:

- **A single ``"model"`` key that is nested, with no top-level one** (``{"messages": [...],
  "metadata": {"model": "x"}}``): its value ``x`` is taken. vLLM would serve such a request
  with its default model; the proxy routes it to the instance named ``x``, or answers 404 when
  no instance has that name. Telling it apart would need a parse of the body every time.
- **Invalid JSON**: ``None`` where this function sees it (the parse of step 4, a broken value
  after the key); the single-occurrence path does not validate the rest of the body (that is
  the full parse it avoids), so a body broken elsewhere goes to the instance it names, whose
  vLLM answers the 400.
- **A key spelled with escapes** (``"mod\\u0065l"``) is not seen: ``None``. No client writes it.
- **Several occurrences in a body over** :data:`PARSE_LIMIT`: ``None``.
"""

from __future__ import annotations

import json
import re

#: The key searched, as bytes.
KEY = b'"model"'
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
    first = body.find(KEY)
    if first < 0:
        return None
    end = first + len(KEY)
    if body.find(KEY, end) >= 0:
        return _parsed(body)
    before = body[first - 1]  # body[0] is not the key's quote: first >= 1
    if before in _SPACE:  # past whitespace (all of it when the look-back holds only that)
        text = body[max(0, first - _LOOK_BACK) : first].rstrip(_SPACE) or body[:first].rstrip(_SPACE)
        before = text[-1] if text else 0
    if before != _BRACE and before != _COMMA:
        return None
    plain = _PLAIN.match(body, end)
    if plain is not None:
        try:
            name = plain.group(1).decode()
        except UnicodeDecodeError:
            return None
        return name or None
    escaped = _ESCAPED.match(body, end)
    if escaped is None:
        return None
    try:
        value = json.loads(escaped.group(1))
    except ValueError:  # a bad escape or a lone surrogate's bytes (UnicodeDecodeError)
        return None
    return value if isinstance(value, str) and value else None


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
