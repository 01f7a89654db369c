"""Reading ``GET /events``: its Server-Sent Events, one line at a time, as :class:`ProxyEvent`.

The daemon sends each event as ``id: N`` and one ``data:`` line of JSON, then a blank line, and a
``: keep-alive`` comment now and then (docs/events.md). :class:`EventParser` reads any valid
Server-Sent Events stream (the WHATWG rules: ``data:`` lines joined by newlines, comments and
unknown fields ignored, one leading space of a value dropped) and keeps the messages whose data
is an event object; anything else is passed over, so a daemon that adds fields or types later
does not break the client. No I/O here: the sync and the async client feed it the lines they read.
"""

from __future__ import annotations

from pydantic import ValidationError

from aic_vllm_proxy.schemas import ProxyEvent

#: What ``GET /events`` answers with (its ``Content-Type``, without parameters).
EVENT_STREAM = "text/event-stream"


class EventParser:
    """Feed it the stream's lines (without their line ends); it returns each complete event."""

    def __init__(self) -> None:
        self._data: list[str] = []
        #: The ``id:`` of the last message (what a reconnection would send as ``Last-Event-ID``).
        self.last_id: str | None = None

    def feed(self, line: str) -> ProxyEvent | None:
        """One line: the event it completes (a blank line ends a message), else None."""
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None

    def _dispatch(self) -> ProxyEvent | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        try:
            return ProxyEvent.model_validate_json(data)
        except ValidationError:
            return None  # not an event this client can read: passed over
