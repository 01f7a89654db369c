"""Flow control towards the client, the same on both HTTP paths: one pair of water marks.

Every client transport pauses writing when more than :data:`HIGH_WATER` bytes wait for the
client and resumes below :data:`LOW_WATER` (:func:`set_water_marks`, from the connection's
``connection_made``). While it is paused, reading from vLLM is held (``UpstreamConnection.hold``):
a slow client holds at most about this much of an answer in the proxy, whichever path serves it.
"""

from __future__ import annotations

import asyncio

#: Pause writing to a client (and reading from vLLM) above this many bytes waiting for it.
HIGH_WATER = 64 * 1024
#: Resume below this many.
LOW_WATER = HIGH_WATER // 4


def set_water_marks(transport: asyncio.BaseTransport) -> None:
    """Give a client transport the water marks above (uvloop's own default low mark is 16
    bytes, asyncio's 16 KiB: the same on every loop)."""
    set_limits = getattr(transport, "set_write_buffer_limits", None)  # uvloop's is not a WriteTransport
    if set_limits is not None:
        set_limits(high=HIGH_WATER, low=LOW_WATER)


def over_high_water(transport: asyncio.WriteTransport) -> bool:
    """Whether ``transport`` has more waiting than :data:`HIGH_WATER` (it has paused writing)."""
    return transport.get_write_buffer_size() > HIGH_WATER
