"""HTTP/2 stream: one request on an HTTP/2 client connection, from its HEADERS to its end.

An `H2Stream` is to its exchange what proxy/edge.py's ClientConnection is to an HTTP/1.1 one:
the `ClientSide` (proxy/destination.py). The exchange is an `H2Exchange` (proxy/h2_exchange.py),
the HTTP/1.1 `Exchange` with the response half written as HTTP/2 frames: routing,
admission, the backend connection (pooled HTTP/1.1, proxy/upstream.py, which does not know it
serves a stream) and the accounting are the same code, so a stream is routed, refused, masked
and counted exactly like an HTTP/1.1 request. Native gRPC calls go to the sandbox over h2c
instead (proxy/grpc_upstream.py).

Flow control is the backpressure both ways:
- request body: the client's window for the stream is reopened (WINDOW_UPDATE) only for bytes
  the backend has taken; while the backend's socket is full, or no backend connection exists
  yet, the bytes received are not acknowledged (`StreamGate`), so a client can have at most its
  window of body in the proxy;
- response body: what the client's window does not admit waits in `pending`, and the backend
  connection stops being read until the window reopens (WINDOW_UPDATE) and `pending` is out.

RFC 8441 extended CONNECT (`:protocol websocket`) becomes an HTTP/1.1 upgrade to the sandbox;
after its 101 the stream's DATA frames and the backend connection are the two ends of a tunnel.
"""

from __future__ import annotations

import base64
import os
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING

from proxy import errors
from proxy.admission import route_request
from proxy.exchange import BODY, RECEIVED, TUNNEL, Exchange
from proxy.flow import PEER_FULL
from proxy.h2_connection import ErrorCodes, send_queued
from proxy.h2_exchange import H2Exchange
from proxy.headers import request_line_valid
from proxy.tunnel import Tunnel

if TYPE_CHECKING:
    from proxy.h2_edge import Http2Connection
    from proxy.upstream import UpstreamConnection

Fields = list[tuple[bytes, bytes]]


class StreamGate:
    """The ReadGate of one stream: instead of pausing a socket (which would stop every stream),
    it withholds the stream's flow-control credit while any reason is set."""

    __slots__ = ("stream", "reasons")

    def __init__(self, stream: H2Stream):
        self.stream = stream
        self.reasons = 0

    def pause(self, reason: int) -> None:
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                self.stream.acknowledge()


class StreamTransport:
    """The client end of a tunnel on a stream, as the backend connection's relay sees it: bytes
    written become DATA frames (within the stream's window), EOF ends the stream."""

    __slots__ = ("stream",)

    def __init__(self, stream: H2Stream):
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.send_body(data)
        self.stream.flush_out()

    def write_eof(self) -> None:
        self.stream.send_end()
        self.stream.connection.flush()

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.stream.closed

    def close(self) -> None:
        """END_STREAM once what is pending is out (H2Stream.finished then ends the stream)."""
        if not self.stream.closed:
            self.stream.send_end()
            self.stream.connection.flush()

    def abort(self) -> None:
        self.stream.reset(ErrorCodes.CANCEL)


class H2Stream:
    """One stream of an Http2Connection, and the ClientSide of its exchange."""

    __slots__ = ("connection", "stream_id", "ctx", "loop", "gate", "out", "client_ip",
                 "trusted", "writing_paused", "closed", "exchange", "pending", "pending_end",
                 "blocked_since", "answered", "unacked", "ended", "tunnel", "transport",
                 "tunnel_in", "tunnel_up")

    def __init__(self, connection: Http2Connection, stream_id: int):
        self.connection = connection
        self.stream_id = stream_id
        self.ctx = connection.ctx
        self.loop = connection.loop
        self.gate = StreamGate(self)
        self.out: list[bytes] = []  # unused: an HTTP/2 exchange writes frames
        self.client_ip = connection.client_ip
        self.trusted = connection.trusted
        self.writing_paused = connection.writing_paused
        self.closed = False
        self.exchange: H2Exchange | None = None
        self.pending: deque[bytes] = deque()  # response bytes the client's window has no room for
        self.pending_end: Fields | bool = False  # after them: END_STREAM (with these trailers)
        self.blocked_since = 0.0
        self.answered = False   # a final response head went out
        self.unacked = 0        # request bytes received whose window is not yet given back
        self.ended = False      # the client ended its side (END_STREAM)
        self.tunnel: Tunnel | None = None
        self.transport: StreamTransport | None = None  # the tunnel's client end
        self.tunnel_in = 0
        self.tunnel_up: UpstreamConnection | None = None

    # -- the request, from the connection ----------
    def request_received(self, headers: Fields, ended: bool) -> None:
        ex = self.exchange = H2Exchange(self)
        ex.head_complete()
        ex.started = monotonic()
        method = target = authority = protocol = None
        fields: Fields = []
        cookies: list[bytes] = []
        content_length = grpc = host_differs = False
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 32
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    target = value
                elif name == b":authority":
                    authority = value
                elif name == b":protocol":
                    protocol = value
                continue  # :scheme: the proxy says how it was reached (X-Forwarded-Proto)
            if name == b"cookie":  # crumbs are one field again for HTTP/1.1 (RFC 9113 8.2.3)
                cookies.append(value)
                continue
            if name == b"host":
                if authority is None:
                    authority = value
                elif value.lower() != authority.lower():
                    host_differs = True  # RFC 9113 8.3.1: malformed
                continue
            if name == b"content-length":
                content_length = True
            elif name == b"content-type":
                kind = value[:20].lower()
                grpc = kind == b"application/grpc" or kind[:17] in (b"application/grpc+",
                                                                    b"application/grpc;")
            fields.append((name, value))
        if authority is not None:
            fields.insert(0, (b"host", authority))
        if cookies:
            fields.append((b"cookie", b"; ".join(cookies)))
        ex.headers = fields
        ex.head_size = size
        ex.method = method or b""
        ex.target = target or b""
        if grpc:
            ex.grpc = True
            ex.http = "grpc"
        if method == b"CONNECT" and protocol is not None:
            # RFC 8441: a WebSocket over this stream is an HTTP/1.1 upgrade to the sandbox
            if protocol.lower() != b"websocket":
                ex.error = errors.NotImplementedTransferCoding(
                    f"Extended CONNECT for {protocol.decode('latin-1')!r} is not supported")
            ex.method = b"GET"
            ex.upgrade = b"websocket"
            if ex.header(b"sec-websocket-key") is None:
                key = base64.b64encode(os.urandom(16))
                fields.append((b"sec-websocket-key", key))
        elif not ended and not content_length:
            # a body of unknown length: chunked to the HTTP/1.1 backend
            fields.append((b"transfer-encoding", b"chunked"))
        self.ctx.stats.h2_streams += 1
        if (ex.error is None and ex.method != b"CONNECT"  # CONNECT: refused by route_request
                and not request_line_valid(ex.method, ex.target)):
            ex.error = errors.BadRequest("Malformed :method or :path")
        if host_differs and ex.error is None:
            # one request naming two sandboxes: routed by neither
            ex.error = errors.BadRequest("Host differs from :authority")
        if ex.error is None:
            try:
                if size > self.ctx.max_header_bytes or len(fields) > self.ctx.max_header_count:
                    raise errors.HeadersTooLarge("Request header is too large")
                ex.lookup = route_request(self.ctx, ex, self.client_ip, self.trusted,
                                          self.connection.host_cache)
            except errors.ProxyError as exc:
                ex.error = exc.with_traceback(None)
        if ended:
            self.ended = True
            ex.request_complete()
        ex.start()

    def data_received(self, data: bytes, flow_controlled: int) -> None:
        self.unacked += flow_controlled
        ex = self.exchange
        if self.tunnel_up is not None:
            self.tunnel_in += len(data)
            self.tunnel_up.transport.write(data)
        elif ex is not None and data:
            ex.request_body(data)
        if not self.gate.reasons:
            self.acknowledge()

    def acknowledge(self) -> None:
        """Give the client back the window of the bytes the backend has taken."""
        n, self.unacked = self.unacked, 0
        if n and not self.closed:
            self.connection.h2.consume(self.stream_id, n)
            self.connection.flush()

    def release_window(self) -> None:
        """The stream is done: what it received and never acknowledged (held while its backend
        was full or not yet there) is given back to the connection's window, or those bytes
        would shrink it for good."""
        n, self.unacked = self.unacked, 0
        if n:
            self.connection.give_back(n, self.stream_id)

    def request_ended(self) -> None:
        self.ended = True
        if self.tunnel is not None:
            self.tunnel.client_eof()
            return
        ex = self.exchange
        if ex is not None and ex.request == BODY:
            ex.request_complete()

    def trailers_received(self, headers: Fields) -> None:
        ex = self.exchange
        if ex is not None:
            ex.trailers = list(headers)

    def client_lost(self) -> None:
        """The client reset the stream, or the connection is gone."""
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.release_window()
        tunnel, self.tunnel = self.tunnel, None
        ex = self.exchange
        if tunnel is not None:
            tunnel.client_lost()
        if ex is not None and self.tunnel_up is not None:
            self.account_tunnel(ex)
        if ex is not None:
            ex.client_lost()

    def account_tunnel(self, ex: Exchange) -> None:
        up = self.tunnel_up
        self.tunnel_up = None
        if up is not None:
            ex.bytes_in, ex.bytes_out = self.tunnel_in, up.tunnel_out
        self.ctx.stats.stream_duration[ex.protocol].observe(monotonic() - ex.started)

    # -- the response, written as frames ----------
    def send_head(self, status: int, fields: Fields, end: bool = False) -> None:
        if self.closed:
            return
        if status >= 200:
            self.answered = True
        if not self.connection.h2.respond(self.stream_id, status, fields, end):
            self.client_lost()  # the stream is gone
            return
        if end:
            self.finished()

    def send_body(self, data: bytes) -> None:
        """Queue response bytes: they are framed at flush_out (the end of the backend's read)
        or with the end of the stream, so a body that ends in the read it came in is one DATA
        frame that also carries END_STREAM."""
        if not self.closed and data:
            self.pending.append(data)

    def send_end(self, trailers: Fields | None = None) -> None:
        """END_STREAM after what is pending (with `trailers`, a final HEADERS frame)."""
        if self.closed:
            return
        self.pending_end = trailers or True
        if not self.pending:
            self.pump()

    def pump(self) -> None:
        """Send what the client's windows admit; pause the backend for the rest."""
        connection = self.connection
        pending = self.pending
        frames, size, ended = send_queued(connection.h2, self.stream_id, pending,
                                          self.pending_end)
        if frames:
            connection.sent_data(frames, size)
        if ended:
            self.pending_end = False
            self.blocked_since = 0.0
            self.finished()
            return
        if pending:
            if not self.blocked_since:
                self.blocked_since = self.loop.time()
                connection.stream_blocked()
            self.set_writing_paused(True)
            return
        self.blocked_since = 0.0
        self.set_writing_paused(connection.writing_paused)

    def window_opened(self) -> None:
        if self.pending or self.pending_end is not False:
            self.pump()

    def set_writing_paused(self, paused: bool) -> None:
        if paused != self.writing_paused:
            self.writing_paused = paused
            ex = self.exchange
            if ex is not None and ex.call is not None:
                ex.call.set_paused(paused)
                return
            up = self.backend()
            if up is not None:
                if paused:
                    up.pause_reading()
                else:
                    up.resume_reading()

    def backend(self) -> UpstreamConnection | None:
        if self.tunnel_up is not None:
            return self.tunnel_up
        ex = self.exchange
        return ex.upstream if ex is not None else None

    def pause_backend(self) -> None:
        self.set_writing_paused(True)

    def resume_backend(self) -> None:
        self.set_writing_paused(bool(self.pending))

    def reset(self, code: ErrorCodes) -> None:
        if self.closed:
            return
        self.connection.h2.reset(self.stream_id, code)
        self.connection.flush()
        self.client_lost()
        self.connection.stream_done(self)

    def stalled(self) -> None:
        """The client gave no window for `[timeouts] client_send`."""
        ex = self.exchange
        if ex is not None:
            ex.outcome = "client_stalled"
            ex.end()  # accounted now: the reset below would make it a client that left
        self.reset(ErrorCodes.CANCEL)

    def finished(self) -> None:
        """Our side of the stream is closed (END_STREAM sent): the stream is done. A request
        still being sent is stopped (RST_STREAM NO_ERROR, RFC 9113 8.1) and its exchange ends
        here, as does a tunnel (its backend connection is closed)."""
        if self.closed:
            return
        self.closed = True
        # a request still being sent is stopped with RST_STREAM NO_ERROR once END_STREAM is
        # out (proxy/_h2session.c)
        self.ended = True
        self.release_window()
        ex = self.exchange
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.client_lost()
        if ex is not None and not ex.ended and (ex.request != RECEIVED or ex.response == TUNNEL):
            if self.tunnel_up is not None:
                self.account_tunnel(ex)
            ex.end()
        self.connection.stream_done(self)

    # -- ClientSide ----------
    def flush_out(self) -> None:
        if self.pending:
            self.pump()
        self.connection.flush()

    def exchange_done(self, ex: Exchange) -> None:
        ex.end()

    def linger_close(self) -> None:
        pass  # an HTTP/2 answer never closes the connection: send_head ended the stream

    def abort_response(self, hard: bool) -> None:
        self.reset(ErrorCodes.INTERNAL_ERROR)  # the client sees the response incomplete

    def upstream_full(self) -> None:
        self.gate.pause(PEER_FULL)

    def upstream_drained(self) -> None:
        self.gate.resume(PEER_FULL)

    def start_tunnel(self, ex: Exchange, up: UpstreamConnection, rest: bytes) -> None:
        self.tunnel = up.tunnel = Tunnel(self, up)  # type: ignore[arg-type]
        self.transport = StreamTransport(self)
        self.tunnel_up = up
        up.tunnel_peer = self.transport  # type: ignore[assignment]
        up.deadline = 0.0
        if self.writing_paused:
            up.pause_reading()
        if rest:
            self.transport.write(rest)
        if self.ended:
            self.tunnel.client_eof()
        self.acknowledge()

    def tunnel_lost(self) -> None:
        """The backend side of the tunnel is gone: end the stream after what was sent."""
        self.tunnel = None
        if not self.closed:
            self.send_end()
            self.connection.flush()

    @property
    def tunneling(self) -> bool:
        return self.tunnel is not None
