"""The request object both HTTP paths hand to the pipeline: each adapter (the front door's parsed
head, aiohttp's ``web.Request``) turns its input into one :class:`RelayRequest`, and the pipeline
builds vLLM's request head from it in one place (``headers.request_head``).

Each request has an id (:func:`request_id`): the client's ``X-Request-Id`` when it is a sane
one, else one made here. It goes to vLLM and back to the client in ``X-Request-Id`` (both
paths, ``headers.py``), and into the daemon's log lines about the request."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass

#: The request id's header, both ways (to vLLM and to the client).
REQUEST_ID = "X-Request-Id"
#: What a client's id may be: 1 to 128 characters of visible ASCII (it is logged and sent on).
_SANE_ID = re.compile(rb"[\x21-\x7e]{1,128}")


def request_id(sent: bytes | None) -> str:
    """The id of a request whose client sent ``sent`` as its ``X-Request-Id`` (None: none, or
    more than one): kept when sane (:data:`_SANE_ID`), else a new one, 16 random bytes in hex
    (a counter would tell clients how many requests the daemon serves)."""
    if sent is not None and _SANE_ID.fullmatch(sent) is not None:
        return sent.decode("ascii")
    return os.urandom(16).hex()


@dataclass(slots=True)
class RelayRequest:
    """One client request for vLLM, as the client sent it."""

    method: bytes
    target: bytes  # the request target, raw
    #: Every header line as the client sent it, in order, each with its CRLF (what goes to vLLM
    #: is decided by ``headers.request_head``).
    lines: list[bytes]
    names: list[bytes]  # each line's header name, lower case (read once, by the adapter)
    #: The header names (lower case) its ``Connection`` headers list: hop-by-hop too.
    connection: Collection[bytes]
    #: The body's length: ``len(body)``, or the announced length of ``stream`` (None: unknown,
    #: sent chunked); None without a body.
    length: int | None = None
    body: bytes | None = None  # the body, in memory
    stream: AsyncIterator[bytes] | None = None  # or the body as it arrives (aiohttp path)
    #: Its id (:func:`request_id`), which vLLM and the client get in X-Request-Id ("": none).
    request_id: str = ""
    #: vLLM's answer status, and when its head came (monotonic), once sent (for the metrics).
    status: int | None = None
    answered_at: float | None = None

    @property
    def is_head(self) -> bool:
        """A HEAD: vLLM's answer has no body, whatever its head says."""
        return self.method == b"HEAD"

    @property
    def chunked(self) -> bool:
        """The body goes to vLLM chunked (a stream of unknown length)."""
        return self.stream is not None and self.length is None
