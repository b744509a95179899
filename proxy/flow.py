"""Flow control: one small mechanism that decides when a connection stops reading.

A client connection stops reading for several independent reasons (the backend's send buffer is
full, a pipelined request waits its turn, a body arrives before the backend connection exists).
`ReadGate` keeps them as bits and pauses the transport while any is set, so one reason clearing
never resumes reading that another still needs paused. Memory per connection stays bounded by the
transports' write-buffer high-water marks whatever the peers' speeds.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct

PEER_FULL = 1        # the other side's write buffer is above its high-water mark
WAITING_TURN = 2     # a pipelined request is queued behind the one being served
WAITING_UPSTREAM = 4  # request bytes are buffered until the backend connection is ready


def reset(transport: asyncio.WriteTransport) -> None:
    """Close with RST instead of FIN: the only way to tell a client reading a body delimited by
    the connection's end (HTTP/1.0) that the body is incomplete (SO_LINGER 0, then close)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def peer_closed(transport: asyncio.BaseTransport, half_close_counts: bool) -> bool:
    """Whether the peer of a connection whose reading is paused has gone away.

    A paused socket is not watched by the event loop, so a client that resets (or leaves
    mid-upload) while the backend is not reading would otherwise hold both connections forever.
    A half-close (FIN) counts when the caller knows no complete request can follow."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    events = 0
    for _, mask in poller.poll(0):
        events |= mask
    if events & (select.POLLHUP | select.POLLERR):
        return True
    return half_close_counts and bool(events & select.POLLRDHUP)


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
