"""The request object both HTTP paths hand to the pipeline: each adapter (the front door's parsed
head, aiohttp's ``web.Request``) turns its input into one :class:`RelayRequest`, and the pipeline
builds vLLM's request head from it in one place (``headers.request_head``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass


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

    @property
    def is_head(self) -> bool:
        """A HEAD: vLLM's answer has no body, whatever its head says."""
        return self.method == b"HEAD"

    @property
    def chunked(self) -> bool:
        """The body goes to vLLM chunked (a stream of unknown length)."""
        return self.stream is not None and self.length is None
