"""Edge: the client-facing HTTP/1.1 connection, from request bytes to the response written back.

`ClientConnection` is an asyncio Protocol. llhttp (via httptools) parses requests and calls back;
each request becomes an `Exchange` that is routed (proxy/exchange.py), bound to a pooled backend
connection (proxy/upstream.py) and answered with the backend's response relayed as it arrives.
No task or future is created per request unless a new backend connection must be opened.
Pipelined requests are served in order; a 101 answer turns both connections into a raw tunnel
(proxy/tunnel.py). Every error answer is made by proxy/errors.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import deque
from dataclasses import dataclass, field

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from proxy import errors
from proxy.exchange import (BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, Exchange,
                            route_request)
from proxy.flow import PEER_FULL, WAITING_TURN, WAITING_UPSTREAM, ReadGate
from proxy.headers import scan_response_headers, trailer_lines
from proxy.registry import Registry
from proxy.timeouts import DeadlineSweeper
from proxy.tunnel import Tunnel
from proxy.upstream import ConnectFailed, UpstreamConnection, UpstreamPool, UpstreamPools

log = logging.getLogger("sandbox_proxy.edge")

PENDING_LIMIT = 256 * 1024  # request bytes buffered while the backend connection opens
LINGER_SECONDS = 2.0        # reading (and discarding) after our answer before a hard close


@dataclass
class EdgeContext:
    """What every client connection of one process shares."""
    loop: asyncio.AbstractEventLoop
    domains: frozenset[str]
    registry: Registry
    pools: UpstreamPools
    sweeper: DeadlineSweeper
    trusted_proxies: tuple = ()
    scheme: bytes = b"http"
    client_header_timeout: float = 10.0
    client_idle_timeout: float = 620.0
    upstream_header_timeout: float = 60.0
    max_header_bytes: int = 65536
    max_header_count: int = 200
    draining: bool = False
    connections: set = field(default_factory=set)
    requests: int = 0
    tunnels_opened: int = 0
    responses: dict = field(default_factory=lambda: {1: 0, 2: 0, 3: 0, 4: 0, 5: 0})

    def is_trusted(self, ip: str) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)


class ClientConnection(asyncio.Protocol):
    def __init__(self, ctx: EdgeContext):
        self.ctx = ctx
        self.loop = ctx.loop
        self.transport: asyncio.Transport | None = None
        self.gate: ReadGate | None = None
        self.parser = HttpRequestParser(self)
        self.client_ip = b"-"
        self.trusted = False
        self.host_cache: dict = {}
        self.parsing: Exchange | None = None   # the request llhttp is reading
        self.active: Exchange | None = None    # the request being served
        self.queued: deque[Exchange] | None = None  # pipelined requests behind it
        self.upstream: UpstreamConnection | None = None
        self.connecting: asyncio.Task | None = None
        self.tunnel: Tunnel | None = None
        self.tunnel_peer: asyncio.Transport | None = None
        self.upgrade_rest: list[bytes] | None = None  # bytes after an upgrade request's head
        self.in_head = True
        self.head_bytes = 0
        self.head_error: errors.ProxyError | None = None
        self.writing_paused = False
        self.closing = False
        self.lingering = False
        self.closed = False
        self.deadline = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gate = ReadGate(self.transport)
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "-"
        self.client_ip = ip.encode()
        self.trusted = self.ctx.is_trusted(ip)
        self.deadline = self.loop.time() + self.ctx.client_header_timeout
        self.ctx.sweeper.watched.add(self)
        self.ctx.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel_peer is not None:
            self.tunnel_peer.write(data)
            return
        if self.closing:
            return  # lingering after a final answer: discard
        if self.upgrade_rest is not None:
            self.upgrade_rest.append(data)
            return
        if self.in_head:
            if not self.head_bytes:
                self.deadline = self.loop.time() + self.ctx.client_header_timeout
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.upgrade_rest = [data[exc.args[0]:]]
            self.gate.pause(WAITING_UPSTREAM)
        except HttpParserError as exc:
            self.request_malformed(exc)
        else:
            if self.in_head and self.head_bytes > self.ctx.max_header_bytes:
                self.request_malformed(None, errors.HeadersTooLarge("Request header is too large"))

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.client_eof()
        if self.active is not None:
            self.active.close_after = True  # half-closed client still reads the answer
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closing = True
        self.ctx.sweeper.watched.discard(self)
        self.ctx.connections.discard(self)
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.tunnel is not None:
            self.tunnel.client_lost()
        elif self.upstream is not None:
            up, self.upstream = self.upstream, None
            up.client = None
            up.abort()
        self.active = self.parsing = self.queued = None

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- llhttp callbacks (request) -----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.closing:
            raise ConnectionAbortedError("no further requests on a closing connection")
        ex = self.parsing = Exchange()
        if self.active is None:
            self.active = ex
        else:
            if self.queued is None:
                self.queued = deque()
            self.queued.append(ex)
            self.gate.pause(WAITING_TURN)

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        ex.target += url
        ex.head_size += len(url)
        if ex.head_size > self.ctx.max_header_bytes:
            self.head_error = errors.UriTooLong("Request URI is too long")
            raise self.head_error

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        if self.in_head:
            ex.headers.append((name, value))
            ex.head_size += len(name) + len(value) + 4
            if ex.head_size > self.ctx.max_header_bytes:
                self.head_error = errors.HeadersTooLarge("Request header is too large")
                raise self.head_error
            if len(ex.headers) > self.ctx.max_header_count:
                self.head_error = errors.HeadersTooLarge("Too many request headers")
                raise self.head_error
        else:  # chunked trailer section
            if ex.trailers is None:
                ex.trailers = []
            ex.trailers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.parsing
        parser = self.parser
        self.in_head = False
        self.head_bytes = 0
        self.deadline = 0.0
        self.ctx.requests += 1
        ex.method = parser.get_method()
        ex.http11 = parser.get_http_version() == "1.1"
        ex.keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():
            ex.upgrade = ex.header(b"upgrade") or b""
        try:
            route_request(self.ctx, ex, self.client_ip, self.trusted, self.host_cache)
        except errors.ProxyError as exc:
            ex.error = exc
        if ex is self.active and not self.closing:
            self.dispatch(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None or ex.discard or ex.error is not None:
            return
        up = ex.upstream
        if up is not None:
            if ex.chunked:
                up.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
            else:
                up.transport.write(body)
            return
        if ex.pending is None:
            ex.pending = []
        ex.pending.append(body)
        ex.pending_size += len(body)
        if ex.pending_size > PENDING_LIMIT:
            self.gate.pause(WAITING_UPSTREAM)

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None or self.closing:
            return
        self.parsing = None
        self.in_head = True
        ex.request_done = True
        if ex.discard:
            if ex.response_done:
                self.finish(ex)
        elif ex.upstream is not None:
            self.request_sent(ex, ex.upstream)

    # -- request side -------------------------------------------------------------------------
    def dispatch(self, ex: Exchange) -> None:
        if ex.error is not None:
            self.answer(ex, ex.error)
            return
        record = ex.record
        pool = self.ctx.pools.pool(record.sandbox_id, record.host, ex.backend_port)
        conn = pool.take()
        if conn is not None:
            self.bind(ex, conn)
        else:
            self.connecting = self.loop.create_task(self.connect(ex, pool))

    async def connect(self, ex: Exchange, pool: UpstreamPool) -> None:
        try:
            conn = await pool.connect()
        except ConnectFailed as exc:
            self.connecting = None
            if self.active is ex:
                log.info("connect to %s:%s for %s failed: %s",
                         pool.host, pool.port, pool.sandbox_id, exc)
                if exc.timed_out:
                    self.answer(ex, errors.UpstreamTimeout(pool.sandbox_id, ex.port))
                else:
                    self.answer(ex, errors.PortNotOpen(pool.sandbox_id, ex.port))
            return
        self.connecting = None
        if self.closed or self.active is not ex:
            pool.release(conn)
            return
        self.bind(ex, conn)

    def bind(self, ex: Exchange, conn: UpstreamConnection) -> None:
        conn.client = self
        ex.upstream = self.upstream = conn
        if self.writing_paused:
            conn.pause_reading()
        transport = conn.transport
        transport.write(ex.upstream_head)
        if ex.pending is not None:
            for body in ex.pending:
                if ex.chunked:
                    transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
                else:
                    transport.write(body)
            ex.pending = None
            self.gate.resume(WAITING_UPSTREAM)
        if ex.request_done:
            self.request_sent(ex, conn)

    def request_sent(self, ex: Exchange, conn: UpstreamConnection) -> None:
        """The whole request is on its way: end chunked framing and start the header clock."""
        if ex.chunked:
            trailers = trailer_lines(ex.trailers) if ex.trailers else b""
            conn.transport.write(b"0\r\n" + trailers + b"\r\n")
        if not ex.response_started:
            conn.deadline = self.loop.time() + self.ctx.upstream_header_timeout

    def request_malformed(self, exc: HttpParserError | None,
                          error: errors.ProxyError | None = None) -> None:
        if self.closing:
            return
        error = error or self.head_error or errors.BadRequest(f"Malformed request: {exc}")
        ex = self.active
        if ex is not None and ex.response_started:
            self.transport.abort()  # mid-stream: nothing sane can follow
            return
        if ex is not None and ex.upstream is not None:
            up, self.upstream, ex.upstream = ex.upstream, None, None
            up.client = None
            up.abort()
        if ex is None:
            ex = Exchange()
        self.queued = None
        error.close = True
        self.answer(ex, error)

    # -- response side (called by the bound UpstreamConnection) -------------------------------
    def response_head(self, up: UpstreamConnection, status: int) -> None:
        ex = self.active
        if status < 200 and status != 101:
            if ex.http11:  # interim (100 Continue, 103 Early Hints): relay, keep waiting
                lines = scan_response_headers(up.headers).lines
                self.transport.write(b"HTTP/1.1 %d %s\r\n%s\r\n"
                                     % (status, up.status_reason, b"".join(lines)))
            up.head_seen = False
            return
        up.deadline = 0.0
        ex.response_started = True
        ex.status = status
        scanned = scan_response_headers(up.headers)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, up.status_reason)]
        head += scanned.lines
        if status == 101:
            if ex.upgrade is None or scanned.upgrade is None:
                self.upstream_lost(up)  # 101 to a request that asked for no upgrade
                up.close()
                return
            head.append(b"Connection: Upgrade\r\nUpgrade: " + scanned.upgrade + b"\r\n\r\n")
            self.transport.write(b"".join(head))
            return
        ex.upstream_reusable = ex.upgrade is None and up.parser.should_keep_alive()
        if ex.method == b"HEAD" or status == 204 or status == 304:
            mode = BODY_NONE
        elif scanned.content_length and not scanned.chunked:
            mode = BODY_LENGTH
        else:
            ex.upstream_until_close = not scanned.chunked
            mode = BODY_CHUNKED if ex.http11 else BODY_UNTIL_CLOSE
        ex.body_mode = mode
        if mode == BODY_CHUNKED:
            head.append(b"Transfer-Encoding: chunked\r\n")
        if not ex.keep_alive or mode == BODY_UNTIL_CLOSE or ex.close_after or self.ctx.draining:
            ex.close_after = True
            head.append(b"Connection: close\r\n\r\n")
        elif not ex.http11:
            head.append(b"Connection: keep-alive\r\n\r\n")
        else:
            head.append(b"\r\n")
        self.transport.write(b"".join(head))
        self.ctx.responses[status // 100] += 1
        if ex.method == b"HEAD":
            up.skip_response_body()
            self.response_complete(up)

    def response_body(self, body: bytes) -> None:
        if self.active.body_mode == BODY_CHUNKED:
            self.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            self.transport.write(body)

    def response_complete(self, up: UpstreamConnection) -> None:
        ex = self.active
        if ex is None or not ex.response_started or ex.status == 101 or ex.response_done:
            return  # an interim response ended, or the tunnel takes over
        if ex.body_mode == BODY_CHUNKED:
            trailers = trailer_lines(up.trailers) if up.trailers else b""
            self.transport.write(b"0\r\n" + trailers + b"\r\n")
        ex.response_done = True
        self.unbind(ex, up, reuse=ex.upstream_reusable and ex.request_done)
        if ex.request_done:
            self.finish(ex)
        else:
            ex.discard = True  # answered early: read and drop the rest of the request body

    def unbind(self, ex: Exchange, up: UpstreamConnection, reuse: bool) -> None:
        ex.upstream = None
        if self.upstream is up:
            self.upstream = None
        if reuse:
            up.pool.release(up)
        else:
            up.client = None
            up.close()

    def upstream_lost(self, up: UpstreamConnection) -> None:
        """The backend connection closed (or broke) while bound to the active exchange."""
        if self.tunnel is not None:
            self.tunnel.upstream_lost()
            return
        ex = self.active
        if ex is None or ex.upstream is not up:
            return
        ex.upstream = None
        self.upstream = None
        up.client = None
        if ex.response_done:
            return
        if ex.response_started:
            if ex.upstream_until_close:
                self.response_complete_at_eof(ex)
            elif ex.body_mode == BODY_UNTIL_CLOSE:
                self.transport.abort()  # a FIN would look like a complete body
            else:
                self.closing = True
                self.transport.close()  # the client sees fewer bytes than framed: incomplete
            return
        if up.reused and ex.retryable and not ex.retried:
            ex.retried = True  # a pooled connection the backend had already closed
            pool = self.ctx.pools.pool(ex.record.sandbox_id, ex.record.host, ex.backend_port)
            self.connecting = self.loop.create_task(self.connect(ex, pool))
            return
        self.answer(ex, errors.UpstreamClosed(ex.record.sandbox_id, ex.port))

    def response_complete_at_eof(self, ex: Exchange) -> None:
        if ex.body_mode == BODY_CHUNKED:
            self.transport.write(b"0\r\n\r\n")
        ex.response_done = True
        if ex.request_done:
            self.finish(ex)
        else:
            ex.discard = True

    def upstream_timed_out(self, up: UpstreamConnection) -> None:
        ex = self.active
        if ex is None or ex.upstream is not up or ex.response_started:
            return
        self.unbind(ex, up, reuse=False)
        self.answer(ex, errors.UpstreamTimeout(ex.record.sandbox_id, ex.port))

    def upstream_upgraded(self, up: UpstreamConnection, rest: bytes) -> None:
        """The backend answered 101: from now on both sides are raw byte streams."""
        ex = self.active
        if ex is None or ex.upstream is not up or ex.status != 101:
            up.close()
            return
        ex.response_done = True
        self.ctx.responses[1] += 1
        self.tunnel = up_tunnel = Tunnel(self, up)
        self.tunnel_peer = up.transport
        up.tunnel_peer = self.transport
        self.deadline = up.deadline = 0.0
        if rest:
            self.transport.write(rest)
        early, self.upgrade_rest = self.upgrade_rest, None
        for data in early or ():
            if data:
                up.transport.write(data)
        self.gate.resume(WAITING_UPSTREAM)
        up_tunnel.started()

    def tunnel_eof_from_upstream(self) -> bool | None:
        return self.tunnel.upstream_eof() if self.tunnel is not None else False

    # -- answers the proxy makes itself -------------------------------------------------------
    def answer(self, ex: Exchange, error: errors.ProxyError) -> None:
        # A body still coming is not waited for: answer, then linger-close.
        close = (error.close or not ex.keep_alive or ex.close_after or self.ctx.draining
                 or (ex.has_body and not ex.request_done))
        self.transport.write(errors.render_error(
            error, html_page=ex.wants_html(), head_only=ex.method == b"HEAD", close=close))
        self.ctx.responses[error.status // 100] += 1
        ex.response_started = ex.response_done = True
        if close:
            self.linger_close()
        elif ex.request_done:
            self.finish(ex)
        else:
            ex.discard = True

    def linger_close(self) -> None:
        """Send FIN after the answer, keep reading (and dropping) briefly, then close.

        Closing a socket with unread input makes the kernel send RST, which can destroy the
        answer before the client reads it.
        """
        self.closing = self.lingering = True
        self.active = self.queued = None
        self.gate.reasons = 0
        if not self.transport.is_closing():
            self.transport.resume_reading()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()
        self.deadline = self.loop.time() + LINGER_SECONDS

    def finish(self, ex: Exchange) -> None:
        """The exchange is complete both ways: serve the next pipelined request or wait."""
        self.active = None
        if ex.close_after or self.closing:
            self.linger_close()
            return
        if self.upgrade_rest is not None:  # an upgrade was refused: what followed is HTTP again
            early, self.upgrade_rest = b"".join(self.upgrade_rest), None
            self.gate.resume(WAITING_UPSTREAM)
            if early:
                self.data_received(early)
                return
        queued = self.queued
        if queued:
            nxt = self.active = queued.popleft()
            if not queued:
                self.gate.resume(WAITING_TURN)
            if nxt.method:  # its head is complete
                self.dispatch(nxt)
        elif self.in_head and not self.head_bytes:
            self.deadline = self.loop.time() + self.ctx.client_idle_timeout

    # -- timeouts and shutdown ----------------------------------------------------------------
    def on_deadline(self) -> None:
        if self.lingering or self.active is None and not self.head_bytes:
            self.transport.close()  # linger over, or idle keep-alive / silent new connection
            self.closing = True
        elif self.in_head:
            ex = self.active or Exchange()
            ex.close_after = True
            self.answer(ex, errors.RequestTimeout("Request header timed out"))

    def drain(self) -> None:
        """Shutting down: finish the exchange under way, then close; close idle ones now."""
        if self.tunnel is not None:
            return  # tunnels get until the drain timeout
        if self.active is None and not self.head_bytes:
            self.closing = True
            self.transport.close()
        elif self.active is not None:
            self.active.close_after = True
