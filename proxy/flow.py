"""Flow control: one small mechanism that decides when a connection stops reading.

A client connection stops reading for several independent reasons (the backend's send buffer is
full, a pipelined request waits its turn, a body arrives before the backend connection exists).
`ReadGate` keeps them as bits and pauses the transport while any is set, so one reason clearing
never resumes reading that another still needs paused. Memory per connection stays bounded by the
transports' write-buffer high-water marks whatever the peers' speeds.
"""

from __future__ import annotations

import asyncio

PEER_FULL = 1        # the other side's write buffer is above its high-water mark
WAITING_TURN = 2     # a pipelined request is queued behind the one being served
WAITING_UPSTREAM = 4  # request bytes are buffered until the backend connection is ready


class ReadGate:
    __slots__ = ("transport", "reasons")

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            self.transport.pause_reading()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons and not self.transport.is_closing():
                self.transport.resume_reading()
