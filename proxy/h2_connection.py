"""The h2 library's connection object, with two deviations the proxy needs and one helper
both HTTP/2 sides use (`send_queued`: DATA within the flow-control windows).

RFC 9113 6.8: a GOAWAY with NO_ERROR is graceful; the streams it lets finish (up to its last
stream id) go on, and the connection closes once they are done. The `h2` library (checked
against 4.4) instead moves its connection state machine to CLOSED on any received GOAWAY and
drops what was queued to send (python-hyper/h2#1181), after which every frame either way raises
ProtocolError: a gRPC server shutting down or reaching max_connection_age (GOAWAY, then a PING)
would cut every call under way, and a client's graceful GOAWAY would lose the responses it is
still waiting for. `H2Connection` keeps the state and the queued bytes on a graceful GOAWAY; the
event (ConnectionTerminated) is still delivered, and the owner stops opening or accepting new
streams.

RFC 9113 5.1.2: a stream opened beyond SETTINGS_MAX_CONCURRENT_STREAMS is a stream error; the
library makes it a connection error, which would end every stream under way. Here that one stream
is refused with RST_STREAM REFUSED_STREAM (safe for the client to retry), its header block still
decoded so the HPACK context stays in step.

Both override private methods (the only hooks there are); pyproject.toml pins h2 below 5 so a
release that changes them is a deliberate upgrade.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import h2.connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamIDTooLowError, TooManyStreamsError
from h2.stream import StreamClosedBy
from hyperframe.frame import RstStreamFrame

if TYPE_CHECKING:
    from h2.events import Event
    from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame


class H2Connection(h2.connection.H2Connection):
    def send_queued(self, stream_id: int, queued: deque[bytes],
                    end: list[tuple[bytes, bytes]] | bool) -> tuple[int, int, bool]:
        """DATA frames for `queued` (consumed from the left) as far as the stream's and the
        connection's windows allow, then, once it is empty, the end the stream was given: with
        `end` True the frame holding the last bytes carries END_STREAM (an empty one if there
        are none); a list is sent as trailers. Returns (DATA frames, bytes, whether the stream
        was ended)."""
        frames = size = 0
        while queued:
            window = self.local_flow_control_window(stream_id)
            if window <= 0:
                return frames, size, False
            data = queued[0]
            most = min(window, self.max_outbound_frame_size)
            if len(data) > most:
                self.send_data(stream_id, data[:most])
                queued[0] = data[most:]
                frames += 1
                size += most
                continue
            queued.popleft()
            last = end is True and not queued
            self.send_data(stream_id, data, end_stream=last)
            frames += 1
            size += len(data)
            if last:
                return frames, size, True
        if end is False:
            return frames, size, False
        if end is True:
            self.end_stream(stream_id)
        else:
            self.send_headers(stream_id, end, end_stream=True)
        return frames, size, True

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        state = self.state_machine.state
        queued = self.data_to_send()
        frames, events = super()._receive_goaway_frame(frame)
        self.state_machine.state = state
        self._data_to_send += queued
        return frames, events

    # RFC 9113 5.1.2: a HEADERS frame beyond SETTINGS_MAX_CONCURRENT_STREAMS is a stream error
    # (PROTOCOL_ERROR or REFUSED_STREAM); the library makes it a connection error, which ends
    # every stream under way. Here the one stream is refused (REFUSED_STREAM: safe to retry).
    refused = 0  # streams refused and not yet counted by the owner

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[Event]]:
        try:
            return super()._receive_headers_frame(frame)
        except TooManyStreamsError:
            pass
        # the block was encoded against this connection's HPACK context: decode it anyway, or
        # every later block would be misread (RFC 9113 4.3)
        h2.connection._decode_headers(self.decoder, frame.data)
        sid = frame.stream_id
        if sid <= self.highest_inbound_stream_id:
            raise StreamIDTooLowError(sid, self.highest_inbound_stream_id)
        if sid % 2 == 0:
            raise ProtocolError("Invalid stream ID for peer.")
        self.highest_inbound_stream_id = sid
        # frames that still come on it are answered RST_STREAM STREAM_CLOSED, as on any stream
        # we reset
        self._closed_streams[sid] = StreamClosedBy.SEND_RST_STREAM
        self.refused += 1
        return [RstStreamFrame(sid, error_code=ErrorCodes.REFUSED_STREAM)], []
