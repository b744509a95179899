"""HTTP/2 edge: the client-facing HTTP/2 connection, one per socket.

A client connection starts as HTTP/1.1 (proxy/edge.py). When TLS negotiated `h2` by ALPN, or a
plain connection opens with the HTTP/2 client preface (prior knowledge, h2c), the socket is
handed to an `Http2Connection`. Framing, HPACK and the stream state machine are libnghttp2's
(proxy/h2_connection.py); this module owns what lives as long as the socket: the library's
session, the streams (proxy/h2_stream.py: each is one request, served by an exchange
exactly as an HTTP/1.1 request is), writing, the deadline, and the bounds that keep a hostile
client cheap:

- what a client may send ahead is its flow-control window: per stream
  (`[limits] http2_stream_window`) and per connection (`http2_connection_window`); the window
  reopens only as the sandbox takes the bytes, so request bodies never pile up in the proxy;
- concurrent streams (`http2_max_streams`, SETTINGS_MAX_CONCURRENT_STREAMS); HEADERS plus
  CONTINUATION are bounded by the header list size (`max_header_bytes`, SETTINGS and the HPACK
  decoder) and by 64 CONTINUATION frames per block; the HPACK table stays at 4 KiB;
- frames that make the proxy work without carrying a request (PING, SETTINGS, PRIORITY,
  RST_STREAM, empty DATA, WINDOW_UPDATEs beyond the DATA frames sent) are counted per second:
  past `http2_max_control_frames` (or past twice the stream limit in resets: rapid reset,
  CVE-2023-44487) the client gets GOAWAY ENHANCE_YOUR_CALM and the connection closes;
- while the client does not read, nothing more is produced for it (backends pause), and if its
  socket buffer still grows past OUTPUT_LIMIT (acknowledgements of a PING flood) it is cut;
- a response the client never opens a window for is reset after `[timeouts] client_send`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.h2_connection import (
    CLOSED,
    DATA,
    EMPTY,
    END,
    FATAL,
    GOAWAY,
    HEADERS,
    LATE,
    PING,
    PRIORITY,
    RESET,
    SETTINGS,
    UNKNOWN,
    WINDOW,
    ErrorCodes,
    Session,
    Setting,
)
from proxy.h2_stream import H2Stream

if TYPE_CHECKING:
    from proxy.context import EdgeContext

log = logging.getLogger("sandbox_proxy.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
OUTPUT_LIMIT = 4 * 1024 * 1024  # bytes queued for a client that does not read: then it is cut
WRITE_BURST = 256 * 1024        # DATA bytes produced in one loop turn before they are written
GOAWAY_LINGER = 2.0             # seconds after GOAWAY before the socket closes


class Http2Connection(asyncio.Protocol):
    __slots__ = (
        "ctx", "loop", "transport", "h2", "client_ip", "trusted", "host_cache", "streams",
        "writing_paused", "closing", "closed", "deadline", "window_start", "control_frames",
        "resets", "data_frames", "goaway_sent", "last_stream", "write_due", "unwritten",
        "highest", "max_streams",
    )

    def __init__(self, ctx: EdgeContext, client_ip: bytes, trusted: bool):
        self.ctx = ctx
        self.loop = ctx.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.client_ip = client_ip
        self.trusted = trusted
        self.host_cache: dict = {}
        self.streams: dict[int, H2Stream] = {}
        self.writing_paused = False
        self.closing = False
        self.closed = False
        self.deadline = 0.0
        # the flood counters, for the current one-second window
        self.window_start = 0.0
        self.control_frames = 0
        self.resets = 0
        self.data_frames = 0
        self.goaway_sent = False  # the h2 connection is closed (an error, or the end)
        self.last_stream: int | None = None  # a graceful GOAWAY announced this last stream
        self.write_due = False  # a write of what h2 produced is scheduled for this loop turn
        self.unwritten = 0  # DATA bytes produced since the last write
        self.highest = 0  # the highest stream a request came on (ids only grow)
        limits = ctx.config.limits
        self.max_streams = limits.http2_max_streams
        # the library is told a higher stream limit than the client is (see h2_connection.py):
        # the surplus is refused here, one stream at a time
        self.h2 = Session(True, [
            (Setting.MAX_CONCURRENT_STREAMS, max(2 * self.max_streams, self.max_streams + 100)),
            (Setting.INITIAL_WINDOW_SIZE, limits.http2_stream_window),
            (Setting.MAX_HEADER_LIST_SIZE, limits.max_header_bytes),
            (Setting.HEADER_TABLE_SIZE, 4096),
            (Setting.ENABLE_CONNECT_PROTOCOL, 1),  # RFC 8441: WebSocket over a stream
        ], limits.http2_connection_window, limits.max_header_bytes, self.max_streams)

    # -- asyncio.Protocol ----------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ctx = self.ctx
        ctx.sweeper.watched.add(self)
        ctx.connections.add(self)
        ctx.stats.h2_connections += 1
        self.deadline = self.loop.time() + ctx.client_header_timeout  # the preface, at least
        if ctx.max_connections and len(ctx.connections) > ctx.max_connections:
            self.go_away(ErrorCodes.REFUSED_STREAM, b"too many connections")
            return
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        streams = self.streams
        for event in self.h2.receive(data):
            kind = event[0]
            if kind == DATA:
                stream = streams.get(event[1])
                if stream is not None:
                    stream.data_received(event[2], len(event[2]))
                else:  # for a stream already answered: give the window back
                    self.give_back(len(event[2]), event[1])
            elif kind == HEADERS:
                stream = streams.get(event[1])
                if stream is not None:
                    stream.trailers_received(event[2])
                else:
                    self.request_received(event[1], event[2], event[3])
            elif kind == END:
                stream = streams.get(event[1])
                if stream is not None:
                    stream.request_ended()
            elif kind == WINDOW:
                self.window_updated(event[1])
            elif kind == RESET:
                self.stream_reset(event[1])
            elif kind == SETTINGS:
                self.count_control()
                self.unwritten += 9  # its acknowledgement
                self.windows_opened(0)  # a new initial window may unblock streams
            elif kind == GOAWAY:
                self.count_control()
                if self.closing:
                    return
                if event[2] == ErrorCodes.NO_ERROR and streams:
                    # graceful: the streams under way are answered, then the socket closes
                    self.last_stream = self.h2.last_stream_id()
                else:
                    self.goaway_sent = True
                    self.close_soon()
                    return
            elif kind == FATAL:
                log.info("HTTP/2 protocol error from %s: %s", self.client_ip.decode(), event[3])
                self.ctx.stats.h2_goaway("protocol_error")
                self.go_away(ErrorCodes(event[2]))
                return
            elif kind == CLOSED:
                self.library_closed(event[1])
            elif kind == LATE:
                # opened after our GOAWAY: unprocessed, the client retries it (RFC 9113 8.7)
                self.h2.reset(event[1], ErrorCodes.REFUSED_STREAM)
                self.count_control()
            elif kind == PING:
                self.count_control()
                self.unwritten += 17  # its acknowledgement
            elif kind in (PRIORITY, UNKNOWN, EMPTY):
                self.count_control()
            if self.closing:
                return
        if self.unwritten >= WRITE_BURST:
            # libuv reads a client up to 32 times in one loop turn: what those reads asked for
            # (acknowledgements) is written now, so a client that does not read them is seen
            # (pause_writing, OUTPUT_LIMIT) before megabytes pile up for one write
            self.write_now()
        else:
            self.flush()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closing = True
        ctx = self.ctx
        ctx.sweeper.watched.discard(self)
        ctx.connections.discard(self)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.client_lost()

    def pause_writing(self) -> None:
        self.writing_paused = True
        for stream in self.streams.values():
            stream.pause_backend()
        if self.transport.get_write_buffer_size() > OUTPUT_LIMIT:
            self.not_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        for stream in list(self.streams.values()):
            stream.resume_backend()

    # -- events ----------
    def request_received(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                         ended: bool) -> None:
        if stream_id <= self.highest:
            return  # trailers of a stream already answered and done
        self.highest = stream_id
        if self.last_stream is not None and stream_id > self.last_stream:
            # opened after our GOAWAY: unprocessed, the client retries it (RFC 9113 8.7)
            self.h2.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.streams) >= self.max_streams:
            # beyond SETTINGS_MAX_CONCURRENT_STREAMS: refused alone (RFC 9113 5.1.2), and
            # counted like a PING: work asked for without a request served
            self.h2.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            self.count_control()
            return
        stream = H2Stream(self, stream_id)
        if not self.streams and not self.stalled_streams():
            self.deadline = 0.0  # no longer idle
        self.streams[stream_id] = stream
        stream.request_received(headers, ended)

    def library_closed(self, stream_id: int) -> None:
        """The library closed a stream. One still held here was reset by the library itself (a
        malformed request: Content-Length against DATA, a forbidden trailer field)."""
        if stream_id in self.streams:
            self.stream_reset(stream_id)

    def stream_reset(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self.count_control()
        if stream is not None:
            if not stream.answered:
                self.resets += 1  # a request cancelled before its answer: rapid reset's kind
                if self.resets > 2 * self.ctx.config.limits.http2_max_streams:
                    self.enhance_your_calm("rapid_reset")
            stream.client_lost()

    def window_updated(self, stream_id: int) -> None:
        self.windows_opened(stream_id)
        # WINDOW_UPDATEs beyond one per DATA frame sent are frames that ask nothing
        if self.data_frames > 0:
            self.data_frames -= 1
        else:
            self.count_control()

    def windows_opened(self, stream_id: int) -> None:
        """Send what waited for the client's window: one stream's, or (0) every stream's."""
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.window_opened()
        else:
            for stream in list(self.streams.values()):
                stream.window_opened()

    def count_control(self) -> None:
        now = self.loop.time()
        if now - self.window_start >= 1.0:
            self.window_start = now
            self.control_frames = self.resets = 0
            self.data_frames = min(self.data_frames, 1000)
        self.control_frames += 1
        if self.control_frames > self.ctx.config.limits.http2_max_control_frames:
            self.enhance_your_calm("control_flood")

    def enhance_your_calm(self, reason: str) -> None:
        if self.goaway_sent:
            return
        log.warning("HTTP/2 client %s: %s; GOAWAY ENHANCE_YOUR_CALM", self.client_ip.decode(),
                    reason.replace("_", " "))
        self.ctx.stats.h2_goaway(reason)
        self.go_away(ErrorCodes.ENHANCE_YOUR_CALM, reason.encode())

    # -- used by the streams ----------
    def flush(self) -> None:
        """Write what the streams produced at the end of this turn of the event loop: the
        responses of several streams whose backends answered in the same turn go out in one
        write."""
        if not self.write_due:
            self.write_due = True
            self.loop.call_soon(self.write_now)

    def write_now(self) -> None:
        self.write_due = False
        self.unwritten = 0
        h2 = self.h2
        data = h2.send()
        if data and not self.closed:
            self.transport.write(data)
            if self.writing_paused and self.transport.get_write_buffer_size() > OUTPUT_LIMIT:
                self.not_reading()
        if h2.queued > OUTPUT_LIMIT:
            # response bytes handed over within the windows, then stranded by a SETTINGS that
            # shrank them: a client that makes the proxy hold data it will not take
            self.not_reading()
        later = h2.later()
        if later is not None:  # streams the library closed while sending
            for event in later:
                self.library_closed(event[1])
        if not self.goaway_sent and not h2.want():
            # the library ended the connection itself: a protocol error (its GOAWAY is out),
            # or every stream done after a GOAWAY either way
            self.goaway_sent = True
            if h2.goaway_sent > 0:
                log.info("HTTP/2 protocol error from %s (GOAWAY %s)", self.client_ip.decode(),
                         ErrorCodes(h2.goaway_sent).name)
                self.ctx.stats.h2_goaway("protocol_error")
            self.close_soon()

    def not_reading(self) -> None:
        """Frames the client asked for (PING and SETTINGS acknowledgements) pile up unread."""
        if self.closed:
            return  # pause_writing and write_now both saw it: one cut, one count
        log.warning("HTTP/2 client %s does not read what it asks for; connection cut",
                    self.client_ip.decode())
        self.ctx.stats.h2_goaway("not_reading")
        self.closed = True
        self.transport.abort()

    def stream_done(self, stream: H2Stream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            if self.ctx.draining:
                self.announce_goaway()  # HTTP/1.1's Connection: close while draining
            if not self.streams:
                if self.goaway_sent or self.last_stream is not None:
                    self.close_soon()
                else:
                    self.idle()

    def give_back(self, size: int, stream_id: int) -> None:
        self.h2.consume(stream_id, size)

    def sent_data(self, frames: int, size: int) -> None:
        """A stream queued `frames` DATA frames holding `size` bytes."""
        self.data_frames += frames
        self.unwritten += size
        if self.unwritten >= WRITE_BURST:
            # libuv reads a fast backend up to 32 times in one loop turn: write now, so that a
            # full socket pauses the backends (pause_writing) before megabytes of DATA pile up
            # for one write and look like a client that does not read
            self.write_now()

    # -- the connection's end ----------
    def go_away(self, code: ErrorCodes, reason: bytes = b"") -> None:
        """No new streams; the ones under way are dropped (a hostile peer's) and the socket
        closes once the GOAWAY is written."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self.h2.goaway(code, -1, reason)
        self.close_soon()

    def close_soon(self) -> None:
        if self.closing:
            return
        self.write_now()
        self.closing = True
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.client_lost()
        if not self.transport.is_closing():
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.deadline = self.loop.time() + GOAWAY_LINGER
            else:
                self.transport.close()

    def drain(self) -> None:
        """Shutting down: GOAWAY now; the streams under way finish, then the socket closes."""
        self.announce_goaway()
        if not self.streams:
            self.close_soon()

    def announce_goaway(self) -> None:
        """A graceful GOAWAY (NO_ERROR, the last stream this connection will serve), while the
        streams under way go on."""
        if self.last_stream is not None or self.goaway_sent:
            return
        self.last_stream = self.h2.last_stream_id()
        self.h2.goaway(ErrorCodes.NO_ERROR, self.last_stream)
        self.write_now()

    def on_deadline(self) -> None:
        """Linger after GOAWAY over; idle (no stream) for `client_idle` (or no request within
        `client_header` of connecting); or a stream's response stalled for `client_send`."""
        if self.closing:
            self.transport.close()
            return
        if not self.streams:
            self.go_away(ErrorCodes.NO_ERROR, b"idle")
            return
        now = self.loop.time()
        stall = self.ctx.config.timeouts.client_send
        next_check = 0.0
        for stream in self.stalled_streams():
            if now - stream.blocked_since >= stall:
                stream.stalled()
            elif not next_check or stream.blocked_since + stall < next_check:
                next_check = stream.blocked_since + stall
        self.flush()
        if not self.streams:
            self.idle()
        elif not self.closing:
            self.deadline = next_check

    def stalled_streams(self) -> list[H2Stream]:
        return [s for s in self.streams.values() if s.blocked_since]

    def stream_blocked(self) -> None:
        """A stream waits for the client's window: make sure the stall clock is running."""
        if not self.deadline:
            self.deadline = self.loop.time() + self.ctx.config.timeouts.client_send

    def idle(self) -> None:
        """No stream is open: the keep-alive clock runs."""
        if not self.closing:
            self.deadline = self.loop.time() + self.ctx.client_idle_timeout

    # what the gauges count (proxy/context.py)
    @property
    def requests_in_flight(self) -> int:
        return sum(1 for s in self.streams.values() if not s.tunneling)

    @property
    def open_streams(self) -> int:
        return sum(1 for s in self.streams.values() if s.tunneling)
