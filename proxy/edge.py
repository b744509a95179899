"""Edge: the client-facing HTTP/1.1 connection, one per socket.

`ClientConnection` is an asyncio Protocol. What it owns lives as long as the socket: the llhttp
parser (via httptools), the read gate (proxy/flow.py), the queue of pipelined exchanges, the
deadline and its kind, lingering close and drain. Each request becomes an `Exchange`
(proxy/exchange.py), which owns everything about that request and reaches back only through the
ClientSide interface (proxy/destination.py).

The connection's mode is one field, `feed`, the method incoming bytes go to:
- None: HTTP parsed by llhttp (heads, chunked bodies, the first read of a body), in
  `data_received` itself, which is the hot path;
- `feed_body`: the rest of a Content-Length body, relayed without parsing or copying;
- `feed_held`: bytes after an upgrade request, kept unparsed until its answer is known;
- `feed_tunnel`: after a 101, raw bytes to the backend;
- `feed_nothing`: lingering after a final answer, or past a malformed request: dropped.

Order is guaranteed by construction: only the front exchange (`active`) is ever started, the
next one when it is done (RFC 9112 9.3.2); an exchange is started only after llhttp has returned
from the read that completed its head (llhttp validates framing after on_headers_complete, and
nothing it refuses may reach a backend); nothing after an upgrade request is parsed until its
answer is known. No task or future is created per request unless a backend connection must be
opened, the registry asked remotely, or a sandbox resumed.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import cast

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from proxy import errors
from proxy.admission import route_request
from proxy.context import EdgeContext
from proxy.exchange import RECEIVED, SENT, WAITING, Exchange
from proxy.flow import PEER_FULL, WAITING_TURN, WAITING_UPSTREAM, ReadGate, peer_closed, reset
from proxy.h2_edge import PREFACE, Http2Connection
from proxy.tunnel import Tunnel
from proxy.upstream import UpstreamConnection

LINGER_SECONDS = 2.0        # reading (and discarding) after our answer before a hard close
PROBE_SECONDS = 1.0         # how often a client paused by a full backend is checked for life


class Deadline(enum.Enum):
    """What the connection's one deadline means when it passes."""
    NONE = 0
    HEADER = 1  # a request head must be complete by then (408)
    IDLE = 2    # a kept-alive connection may stay idle until then
    LINGER = 3  # the lingering close is over
    PROBE = 4   # reading is paused by a full backend: check the client is still there


# What a lost connection's `parser` becomes: the real one refers back to the protocol.
_CLOSED_PARSER = HttpRequestParser(object())

# Module-level names for the members: global lookups are cheaper than enum attributes (3.11).
NO_DEADLINE, HEADER_DUE, IDLE_DUE, LINGER_DUE, PROBE_DUE = Deadline


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "ctx", "proxied_ip", "loop", "transport", "gate", "parser", "client_ip", "trusted",
        "host_cache", "feed", "parsing", "active", "queued", "ready", "feeding", "upgrading",
        "held", "pending_error", "body_left", "in_head", "head_bytes", "quiet_bytes",
        "head_error", "out", "writing_paused", "closing", "closed", "deadline", "deadline_kind",
        "tunnel", "tunnel_peer", "tunnel_in", "preface",
    )

    def __init__(self, ctx: EdgeContext, client_ip: str | None = None):
        """`client_ip` overrides the socket's peer (the PROXY protocol header's source)."""
        self.ctx = ctx
        self.proxied_ip = client_ip
        self.loop = ctx.loop
        # Both set by connection_made, before any other callback: the loop makes a protocol and
        # connects it in one step, so they are never None when used.
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.gate: ReadGate = None  # type: ignore[assignment]
        self.parser = HttpRequestParser(self)
        self.client_ip = b"-"
        self.trusted = False
        self.host_cache: dict = {}
        self.feed: Callable[[bytes], None] | None = None  # None: parse (see the docstring)
        self.parsing: Exchange | None = None   # the request llhttp is reading
        self.active: Exchange | None = None    # the request being served (the front)
        self.queued: deque[Exchange] | None = None  # pipelined requests behind it
        self.ready: Exchange | None = None     # head complete in the current read: start after
        self.feeding = False                   # inside llhttp's feed_data
        self.upgrading: Exchange | None = None  # the upgrade request whose answer is awaited
        self.held: list[bytes] | None = None    # bytes received after its head, unparsed
        # A malformed request that follows complete ones: answered once those are served.
        self.pending_error: errors.ProxyError | None = None
        # Content-Length body bytes still to come once the body has started (feed_body).
        self.body_left = 0
        self.in_head = True
        self.head_bytes = 0
        # Bytes received since the request last made progress (head complete, body bytes,
        # message complete): bounds heads and trailer sections, however they are split.
        self.quiet_bytes = 0
        self.head_error: errors.ProxyError | None = None
        self.out: list[bytes] = []  # response bytes waiting for flush_out
        self.writing_paused = False
        self.closing = False
        self.closed = False
        self.deadline = 0.0
        self.deadline_kind = NO_DEADLINE
        self.tunnel: Tunnel | None = None
        self.tunnel_peer: asyncio.Transport | None = None
        self.tunnel_in = 0  # bytes relayed to the backend after a 101
        self.preface = b""  # the start of an HTTP/2 client preface, still incomplete

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.gate = ReadGate(self.transport)
        ctx = self.ctx
        ip = self.proxied_ip
        if ip is None:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else "-"
        self.client_ip = ip.encode()
        self.trusted = ctx.is_trusted(ip)
        if ctx.http2:
            tls = transport.get_extra_info("ssl_object")
            if tls is None:
                self.feed = self.feed_first  # h2c with prior knowledge starts with the preface
            elif tls.selected_alpn_protocol() == "h2":
                ctx.stats.connections_opened += 1
                self.become_http2(b"")
                return
        self.set_deadline(HEADER_DUE, ctx.client_header_timeout)
        ctx.sweeper.watched.add(self)
        ctx.connections.add(self)
        ctx.stats.connections_opened += 1
        if ctx.max_connections and len(ctx.connections) > ctx.max_connections:
            Exchange(self).answer(errors.TooManyConnections("Too many connections"))

    def data_received(self, data: bytes) -> None:
        feed = self.feed
        if feed is not None:  # any mode but parsing
            feed(data)
            return
        if self.in_head:
            # A head's clock starts with its first byte, for the request in front only: a head
            # pipelined behind one still being served gets its clock when it reaches the front
            # (exchange_done), or its timeout would answer the request in front.
            if not self.head_bytes and self.active is None:  # set_deadline, inlined
                self.deadline_kind = HEADER_DUE
                self.deadline = self.loop.time() + self.ctx.client_header_timeout
            self.head_bytes += len(data)
        self.quiet_bytes += len(data)
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.feeding = False
            self.hold_after_upgrade(data[exc.args[0]:])
        except HttpParserError as exc:
            self.feeding = False
            if self.ready is self.parsing:
                self.ready = None  # refused by the parser: never started
            self.request_malformed(exc)
        else:
            self.feeding = False
            if self.quiet_bytes > self.ctx.max_header_bytes:
                self.request_malformed(None, errors.HeadersTooLarge("Request header is too large"))
        ready = self.ready
        if ready is not None:
            self.ready = None
            if ready is self.active and not self.closing:
                ready.start()

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.client_eof()
        ex = self.active
        if ex is not None and ex.request == RECEIVED and ex.response != SENT:
            ex.close_after = True  # a half-closed client still reads the answer
            return True
        return False  # idle, or a request that can never be completed now: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closing = True
        self.feed = self.feed_nothing
        ctx = self.ctx
        ctx.sweeper.watched.discard(self)
        ctx.connections.discard(self)
        ex = self.active
        if self.tunnel is not None:
            self.tunnel.client_lost()
            if ex is not None:
                seen = ctx.activity_seen
                if seen is not None:  # the report after a stream ends still names it
                    seen[ex.sandbox_id] = self.loop.time()
                ex.bytes_in, ex.bytes_out = self.tunnel_in, self.tunnel.upstream.tunnel_out
                ctx.stats.stream_duration[ex.protocol].observe(monotonic() - ex.started)
        if ex is not None:
            ex.client_lost()
        # Break the reference cycles (parser <-> protocol, tunnel, errors' tracebacks) so a
        # closed connection is freed at once, not at the next full garbage collection.
        self.active = self.parsing = self.queued = self.ready = self.upgrading = None
        self.parser = _CLOSED_PARSER
        self.tunnel = self.head_error = self.pending_error = None

    def pause_writing(self) -> None:
        self.writing_paused = True
        up = self.active.upstream if self.active is not None else None
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        up = self.active.upstream if self.active is not None else None
        if up is not None:
            up.resume_reading()

    # -- the other modes ----------------------------------------------------------------------
    def feed_body(self, data: bytes) -> None:
        """Content-Length body bytes after the first read: no llhttp, no copy. The parser,
        which still expects them, is replaced when the body ends."""
        left = self.body_left
        self.quiet_bytes = 0
        ex = self.parsing
        if len(data) < left:
            self.body_left = left - len(data)
            if ex is not None:
                ex.request_body(data)
            return
        self.body_left = 0
        self.feed = None
        if ex is not None:
            ex.request_body(data if len(data) == left else data[:left])
        self.parser = HttpRequestParser(self)
        self.on_message_complete()
        if len(data) > left:  # the next (pipelined) request
            self.data_received(data[left:])

    def feed_held(self, data: bytes) -> None:
        held = self.held
        assert held is not None  # this mode is entered with a list (hold_after_upgrade)
        held.append(data)

    def feed_tunnel(self, data: bytes) -> None:
        peer = self.tunnel_peer
        assert peer is not None  # this mode is entered with a peer (start_tunnel)
        self.tunnel_in += len(data)
        peer.write(data)

    def feed_nothing(self, data: bytes) -> None:
        pass

    def feed_first(self, data: bytes) -> None:
        """The first bytes of a plain connection: the HTTP/2 client preface (RFC 9113 3.4) hands
        the socket to proxy/h2_edge.py; anything else is HTTP/1.1."""
        data = self.preface + data
        if data[:len(PREFACE)] == PREFACE[:len(data)]:
            if len(data) < len(PREFACE):
                self.preface = data  # a preface split across reads
                return
            self.become_http2(data)
            return
        self.preface = b""
        self.feed = None
        self.data_received(data)

    def become_http2(self, data: bytes) -> None:
        """From now on the socket speaks HTTP/2: an Http2Connection takes it over."""
        ctx = self.ctx
        ctx.sweeper.watched.discard(self)
        ctx.connections.discard(self)
        self.closed = self.closing = True
        self.feed = self.feed_nothing
        self.parser = _CLOSED_PARSER
        h2 = Http2Connection(ctx, self.client_ip, self.trusted)
        self.transport.set_protocol(h2)
        h2.connection_made(self.transport)
        if data:
            h2.data_received(data)

    def hold_after_upgrade(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request: keep what follows unparsed until the request
        is answered (release_held, or start_tunnel)."""
        if self.upgrading is None:  # cannot happen: llhttp stops only after an upgrade head
            self.request_malformed(None, errors.BadRequest("Unexpected protocol upgrade"))
            return
        self.held = [rest]
        self.feed = self.feed_held
        self.gate.pause(WAITING_UPSTREAM)

    def release_held(self) -> None:
        """The upgrade request was answered without a 101: what followed it is HTTP again."""
        held, self.held = self.held, None
        self.upgrading = None
        self.feed = None
        self.parser = HttpRequestParser(self)
        self.gate.resume(WAITING_UPSTREAM)
        data = b"".join(held) if held else b""
        if data:
            self.data_received(data)

    # -- llhttp callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.closing:
            raise ConnectionAbortedError("no further requests on a closing connection")
        ex = self.parsing = Exchange(self)
        if self.active is None:
            self.active = ex
        else:
            if self.queued is None:
                self.queued = deque()
            self.queued.append(ex)
            self.gate.pause(WAITING_TURN)

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        assert ex is not None  # llhttp calls on_message_begin first
        ex.target += url
        ex.head_size += len(url)
        if ex.head_size > self.ctx.max_request_line:
            self.head_error = errors.UriTooLong("Request URI is too long")
            raise self.head_error

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.head_size += len(name) + len(value) + 4
        if self.in_head:
            ex.headers.append((name, value))
            if ex.head_size > self.ctx.max_header_bytes:
                self.head_error = errors.HeadersTooLarge("Request header is too large")
                raise self.head_error
            if len(ex.headers) > self.ctx.max_header_count:
                self.head_error = errors.HeadersTooLarge("Too many request headers")
                raise self.head_error
        else:  # chunked trailer section: bounded like a head
            if ex.trailers is None:
                ex.trailers = []
            ex.trailers.append((name, value))
            if (ex.head_size > self.ctx.max_header_bytes
                    or len(ex.trailers) > self.ctx.max_header_count):
                self.head_error = errors.HeadersTooLarge("Request trailers are too large")
                raise self.head_error

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        parser = self.parser
        self.in_head = False
        self.head_bytes = self.quiet_bytes = 0
        self.deadline_kind = NO_DEADLINE  # clear_deadline, inlined: once per request
        self.deadline = 0.0
        ex.head_complete()
        ex.started = monotonic()
        ex.method = parser.get_method()
        version = parser.get_http_version()
        ex.http11 = version == "1.1"
        ex.keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():
            ex.upgrade = ex.header(b"upgrade") or b""
            self.upgrading = ex
        try:
            if not ex.http11 and version != "1.0":  # HTTP/0.9: no version on the request line
                raise errors.BadRequest("Unsupported HTTP version")
            ex.lookup = route_request(self.ctx, ex, self.client_ip, self.trusted, self.host_cache)
        except errors.ProxyError as exc:
            ex.error = exc.with_traceback(None)  # no frame (and no cycle) kept alive
        if ex.scanned is not None and ex.scanned.length > 0 and ex.upgrade is None:
            self.body_left = ex.scanned.length
        if ex is self.active and not self.closing:
            self.ready = ex  # started once llhttp returns (data_received)

    def on_body(self, body: bytes) -> None:
        self.quiet_bytes = 0
        if self.body_left:
            self.body_left -= len(body)
            if self.body_left:
                self.feed = self.feed_body  # the rest bypasses llhttp
        ex = self.parsing
        if ex is not None:
            ex.request_body(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None or self.closing:
            return
        self.parsing = None
        self.in_head = True
        self.quiet_bytes = 0
        ex.request_complete()

    # -- the exchanges' ends (ClientSide) ------------------------------------------------------
    def exchange_done(self, ex: Exchange) -> None:
        """`ex` is complete both ways: serve the next pipelined request or wait for one."""
        ex.end()
        self.active = None
        if ex.close_after or self.closing:
            self.linger_close()
            return
        if ex is self.upgrading:  # refused: what followed the upgrade request is HTTP again
            self.release_held()
            return
        queued = self.queued
        if queued:
            nxt = self.active = queued.popleft()
            if not queued and self.pending_error is None:
                self.gate.resume(WAITING_TURN)
            if nxt.method:  # its head is complete
                if self.feeding:
                    self.ready = nxt  # llhttp has not finished with this read yet
                else:
                    nxt.start()
            else:  # its head is still coming: its clock starts now
                self.set_deadline(HEADER_DUE, self.ctx.client_header_timeout)
        elif self.pending_error is not None:
            error, self.pending_error = self.pending_error, None
            Exchange(self).answer(error)  # a BadRequest: it closes
        elif self.in_head and not self.head_bytes:  # set_deadline, inlined: once per request
            self.deadline_kind = IDLE_DUE
            self.deadline = self.loop.time() + self.ctx.client_idle_timeout

    def flush_out(self) -> None:
        out = self.out
        if out:
            self.out = []
            if not self.transport.is_closing():
                self.transport.writelines(out)

    def linger_close(self) -> None:
        """Send FIN after the answer, keep reading (and dropping) briefly, then close.

        Closing a socket with unread input makes the kernel send RST, which can destroy the
        answer before the client reads it.
        """
        self.flush_out()
        self.closing = True
        self.feed = self.feed_nothing
        if self.active is not None:
            self.active.end()
        self.active = self.queued = None
        self.gate.reasons = 0
        if not self.transport.is_closing():
            self.transport.resume_reading()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()
        self.set_deadline(LINGER_DUE, LINGER_SECONDS)

    def abort_response(self, hard: bool) -> None:
        self.closing = True
        self.feed = self.feed_nothing
        if hard:
            reset(self.transport)  # a FIN would look like a complete body
        else:
            self.transport.close()  # fewer bytes than framed: the client sees it

    def upstream_full(self) -> None:
        """The backend's send buffer is full: stop reading the client, and check from time to
        time that the client is still there (a paused socket is not watched)."""
        self.gate.pause(PEER_FULL)
        if self.deadline_kind == NO_DEADLINE:
            self.set_deadline(PROBE_DUE, PROBE_SECONDS)

    def upstream_drained(self) -> None:
        self.gate.resume(PEER_FULL)
        if self.deadline_kind == PROBE_DUE:
            self.clear_deadline()

    def start_tunnel(self, ex: Exchange, up: UpstreamConnection, rest: bytes) -> None:
        """The backend answered 101: relay raw bytes both ways from now on."""
        self.tunnel = up.tunnel = Tunnel(self, up)
        self.tunnel_peer = up.transport
        up.tunnel_peer = self.transport
        self.clear_deadline()
        up.deadline = 0.0
        if rest:
            self.out.append(rest)
        self.flush_out()
        early, self.held = self.held, None
        self.upgrading = None
        self.feed = self.feed_tunnel
        for data in early or ():
            if data:
                self.tunnel_in += len(data)
                up.transport.write(data)
        self.gate.resume(WAITING_UPSTREAM)

    # -- malformed requests --------------------------------------------------------------------
    def request_malformed(self, exc: HttpParserError | None,
                          error: errors.ProxyError | None = None) -> None:
        if self.closing:
            return
        error = error or self.head_error or errors.BadRequest(f"Malformed request: {exc}")
        self.head_error = None
        error.__traceback__ = error.__context__ = None
        ex = self.active
        if ex is not None and ex.request == RECEIVED and self.parsing is not ex:
            # The bad bytes follow complete requests: serve those, then answer this (or, after
            # a Connection: close request, just close).
            if self.parsing is not None and self.queued and self.queued[-1] is self.parsing:
                self.queued.pop()
            self.parsing = None
            self.pending_error = error
            self.feed = self.feed_nothing
            self.gate.pause(WAITING_TURN)
            return
        if ex is not None and ex.response != WAITING:
            ex.outcome = "client_malformed"
            reset(self.transport)  # mid-response: nothing sane can follow
            return
        if ex is not None and ex.upstream is not None:
            up, ex.upstream = ex.upstream, None
            up.client = None
            up.abort()
        if ex is None:
            ex = Exchange(self)
        self.queued = None
        ex.answer(error)  # parse errors are BadRequests: they close

    # -- deadlines and drain --------------------------------------------------------------------
    def set_deadline(self, kind: Deadline, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.loop.time() + seconds

    def clear_deadline(self) -> None:
        self.deadline_kind = NO_DEADLINE
        self.deadline = 0.0

    def on_deadline(self) -> None:
        kind, self.deadline_kind = self.deadline_kind, NO_DEADLINE
        if kind == PROBE_DUE:
            if not self.gate.reasons & PEER_FULL:
                return
            ex = self.active
            mid_request = self.tunnel is None and ex is not None and ex.request != RECEIVED
            if peer_closed(self.transport, half_close_counts=mid_request):
                self.transport.abort()  # connection_lost releases the backend connection
            else:
                self.set_deadline(PROBE_DUE, PROBE_SECONDS)
        elif kind in (LINGER_DUE, IDLE_DUE):
            self.closing = True
            self.transport.close()  # linger over, or idle keep-alive
        elif kind == HEADER_DUE:
            if self.active is None and not self.head_bytes:
                self.closing = True
                self.transport.close()  # a new connection that never sent a byte
                return
            ex = self.active or Exchange(self)
            ex.close_after = True
            ex.answer(errors.RequestTimeout("Request header timed out"))

    def tunnel_lost(self) -> None:
        """The backend side of the tunnel is gone: close this side after what was written."""
        self.tunnel_peer = None
        self.feed = self.feed_nothing
        if not self.closed:
            self.closing = True
            self.transport.close()

    # what the gauges count (proxy/context.py)
    @property
    def requests_in_flight(self) -> int:
        return self.active is not None and self.tunnel is None

    @property
    def open_streams(self) -> int:
        return self.tunnel is not None

    def drain(self) -> None:
        """Shutting down: finish the exchange under way, then close; close idle ones now."""
        if self.tunnel is not None:
            return  # tunnels get until the drain timeout
        if self.active is None and not self.head_bytes:
            self.closing = True
            self.transport.close()
        elif self.active is not None:
            self.active.close_after = True
