"""HTTP/2 protocol state for one connection, both sides of the proxy: libnghttp2 through the
proxy's C module `proxy._h2session` (proxy/_h2session.c), and what the Python code needs to
speak to it: error codes, settings, the event kinds it reports, and `send_queued` (DATA within
the flow-control windows, then the stream's end).

The C module makes no policy. `Session.receive(bytes)` returns events as tuples
`(kind, stream_id, ...)`; the owners (proxy/h2_edge.py for clients, proxy/grpc_upstream.py for
gRPC backends) decide what each costs and what it means. Two behaviours differ from the
library's defaults, both in the C module:

- RFC 9113 6.8: a GOAWAY with NO_ERROR is graceful: the streams it lets finish go on (the
  library does this natively);
- RFC 9113 5.1.2: a stream opened beyond SETTINGS_MAX_CONCURRENT_STREAMS is a stream error.
  The library makes it a connection error once the client has acknowledged the setting, so a
  server session is told a higher limit while the advertised one is what the client sees; the
  edge refuses the surplus streams itself (RST_STREAM REFUSED_STREAM).
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum

from proxy._h2session import Session

__all__ = ["ErrorCodes", "Session", "Setting", "send_queued"]

# what Session.receive reports (proxy/_h2session.c)
HEADERS = 1   # (1, sid, fields, end_stream): a request, a response, an interim head or trailers
DATA = 2      # (2, sid, bytes)
END = 3       # (3, sid): the peer ended its side of the stream
RESET = 4     # (4, sid, error code)
WINDOW = 5    # (5, sid): WINDOW_UPDATE; 0 is the connection's
SETTINGS = 6  # (6, 0)
GOAWAY = 7    # (7, last stream id, error code)
PING = 8      # (8, 0)
PRIORITY = 9  # (9, sid)
UNKNOWN = 10  # (10, 0): an extension frame the proxy does not use
EMPTY = 11    # (11, sid): DATA without payload or END_STREAM
FATAL = 12    # (12, 0, error code, reason): the connection cannot go on
LATE = 13     # (13, sid): a stream opened after our graceful GOAWAY
CLOSED = 14   # (14, sid, error code): the library closed the stream (also from later()); one
#               the owner still holds was reset by the library: a malformed request or response

MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE's default: the DATA frames the library writes


class ErrorCodes(IntEnum):
    """RFC 9113 7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(IntEnum):
    """RFC 9113 6.5.2, RFC 8441 3."""

    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6
    ENABLE_CONNECT_PROTOCOL = 0x8


def send_queued(session: Session, stream_id: int, queued: deque[bytes],
                end: list[tuple[bytes, bytes]] | bool) -> tuple[int, int, bool]:
    """Hand the session the bytes of `queued` (consumed from the left) its windows admit for
    the stream, then, once `queued` is empty, the end the stream was given: True is END_STREAM
    on the last DATA frame (an empty one if there are none), a list is sent as trailers.
    Returns (DATA frames, bytes, whether the stream was ended)."""
    size = 0
    while queued:
        room = session.room(stream_id)
        if room <= 0:
            break
        data = queued[0]
        if len(data) > room:
            session.data(stream_id, data[:room])
            queued[0] = data[room:]
            size += room
            break
        queued.popleft()
        session.data(stream_id, data)
        size += len(data)
    frames = -(-size // MAX_FRAME)
    if queued or end is False:
        return frames, size, False
    session.end(stream_id, None if end is True else end)
    return frames or 1, size, True
