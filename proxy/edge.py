"""Edge: the client-facing HTTP/1.1 connection, from request bytes to the exchange's end.

`ClientConnection` is an asyncio Protocol. llhttp (via httptools) parses requests and calls back;
each request becomes an `Exchange` that is routed (proxy/exchange.py), bound to a pooled backend
connection (proxy/upstream.py) and answered by the response relay (proxy/relay.py). No task or
future is created per request unless a backend connection must be opened or the registry asked
remotely. Pipelined requests are served in order. How exchanges and the connection end (the
proxy's own answers, the next pipelined request, lingering close, timeouts, drain, accounting) is
proxy/lifecycle.py; every error answer's content comes from proxy/errors.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import monotonic

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from proxy import errors
from proxy.context import EdgeContext
from proxy.exchange import Exchange, admit, route_request
from proxy.flow import PEER_FULL, WAITING_TURN, WAITING_UPSTREAM, ReadGate, reset
from proxy.headers import trailer_lines
from proxy.registry.resume import ResumeFailed, ResumeRefused
from proxy.lifecycle import PROBE_SECONDS, ExchangeLifecycle
from proxy.relay import ResponseRelay
from proxy.tunnel import Tunnel
from proxy.upstream import BackendRefused, ConnectFailed, UpstreamConnection

log = logging.getLogger("sandbox_proxy.edge")

class RateLimitedWarning:
    """At most one log line per `interval` for a repeated failure (a registry outage would
    otherwise log once per request); the lines in between are counted, not lost."""

    def __init__(self, interval: float):
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0

    def warn(self, message: str, *args: object) -> None:
        now = monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        if self.suppressed:
            message += f" ({self.suppressed} more since the last report)"
        self.suppressed = 0
        self.next_at = now + self.interval
        log.warning(message, *args)


registry_warnings = RateLimitedWarning(5.0)
PENDING_LIMIT = 256 * 1024  # request bytes buffered while the backend connection opens


class ClientConnection(ExchangeLifecycle, ResponseRelay, asyncio.Protocol):
    __slots__ = (
        "ctx", "proxied_ip", "loop", "transport", "gate", "parser", "client_ip", "trusted",
        "host_cache", "parsing", "active", "queued", "upstream", "connecting", "slot",
        "tunnel", "tunnel_peer", "tunnel_in", "out", "held", "upgrading", "feeding", "ready",
        "in_head",
        "head_bytes", "head_error", "writing_paused", "closing", "lingering", "closed",
        "deadline", "probing", "routing", "quiet_bytes", "pending_error", "body_left",
    )

    def __init__(self, ctx: EdgeContext, client_ip: str | None = None):
        """`client_ip` overrides the socket's peer (the PROXY protocol header's source)."""
        self.ctx = ctx
        self.proxied_ip = client_ip
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
        self.connecting: asyncio.Task | None = None  # opening a backend connection
        self.routing: asyncio.Task | None = None     # awaiting a remote registry
        self.slot: str | None = None  # sandbox whose connection slot the active exchange holds
        self.tunnel: Tunnel | None = None
        self.tunnel_peer: asyncio.Transport | None = None
        self.tunnel_in = 0  # bytes relayed to the backend after a 101
        self.out: list[bytes] = []  # response bytes waiting for flush_out (see relay.py)
        # Nothing after an upgrade request is parsed until its answer is known: a 101 makes those
        # bytes the tunnel's, anything else makes them HTTP again (RFC 9110 7.8).
        self.upgrading: Exchange | None = None  # the upgrade request whose answer is awaited
        self.held: list[bytes] | None = None    # bytes received after its head, unparsed
        # An exchange is dispatched (and so its head sent upstream) only once llhttp has returned
        # from the read that completed the head: llhttp validates the framing after our
        # on_headers_complete (`Transfer-Encoding: chunked\t` is refused there), and nothing it
        # refuses may have reached a backend.
        self.feeding = False
        self.ready: Exchange | None = None
        self.in_head = True
        self.head_bytes = 0
        self.head_error: errors.ProxyError | None = None
        self.writing_paused = False
        self.closing = False
        self.lingering = False
        self.closed = False
        self.deadline = 0.0
        self.probing = False  # the deadline is a liveness probe while reading is paused
        # Bytes received since the request last made progress (head complete, body bytes,
        # message complete): bounds heads and trailer sections, however they are split.
        self.quiet_bytes = 0
        # A malformed request that follows complete ones: answered once those are served.
        self.pending_error: errors.ProxyError | None = None
        # Content-Length body bytes still to come once the body has started: relayed as they
        # arrive, without parsing or copying them (see relay_request_body).
        self.body_left = 0

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gate = ReadGate(self.transport)
        ctx = self.ctx
        ip = self.proxied_ip
        if ip is None:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else "-"
        self.client_ip = ip.encode()
        self.trusted = ctx.is_trusted(ip)
        self.deadline = self.loop.time() + ctx.client_header_timeout
        ctx.sweeper.watched.add(self)
        ctx.connections.add(self)
        ctx.stats.connections_opened += 1
        if ctx.max_connections and len(ctx.connections) > ctx.max_connections:
            self.answer(Exchange(), errors.TooManyConnections("Too many connections"))

    def data_received(self, data: bytes) -> None:
        if self.tunnel_peer is not None:
            self.tunnel_in += len(data)
            self.tunnel_peer.write(data)
            return
        if self.closing or self.pending_error is not None:
            return  # lingering after a final answer, or past a malformed request: discard
        if self.held is not None:
            self.held.append(data)
            return
        if self.body_left:
            self.relay_request_body(data)
            return
        if self.in_head:
            if not self.head_bytes:
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
            failed = self.parsing
            if self.ready is failed:
                self.ready = None  # refused by the parser: never dispatched
            self.request_malformed(exc)
        else:
            self.feeding = False
            if self.quiet_bytes > self.ctx.max_header_bytes:
                self.request_malformed(None, errors.HeadersTooLarge("Request header is too large"))
        ready = self.ready
        if ready is not None:
            self.ready = None
            if ready is self.active and not self.closing:
                self.dispatch(ready)

    def hold_after_upgrade(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request: keep what follows unparsed until the request
        is answered (see release_held and upstream_upgraded)."""
        if self.upgrading is None:  # cannot happen: llhttp stops only after an upgrade head
            self.request_malformed(None, errors.BadRequest("Unexpected protocol upgrade"))
            return
        self.held = [rest]
        self.gate.pause(WAITING_UPSTREAM)

    def release_held(self) -> None:
        """The upgrade request was answered without a 101: what followed it is HTTP again."""
        held, self.held = self.held, None
        self.upgrading = None
        self.parser = HttpRequestParser(self)
        self.gate.resume(WAITING_UPSTREAM)
        if held:
            data = b"".join(held)
            if data:
                self.data_received(data)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.client_eof()
        ex = self.active
        if ex is not None and ex.request_done and not ex.response_done:
            ex.close_after = True  # a half-closed client still reads the answer
            return True
        return False  # idle, or a request that can never be completed now: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closing = True
        self.ctx.sweeper.watched.discard(self)
        self.ctx.connections.discard(self)
        self.release_slot()
        if self.routing is not None:
            self.routing.cancel()
            self.routing = None
        # A connect under way is not cancelled: cancelling it just after the connection is made
        # would orphan that connection; it completes and goes to the pool (see connect()).
        self.connecting = None
        ex = self.active
        if self.tunnel is not None:
            self.tunnel.client_lost()
            if ex is not None:
                seen = self.ctx.activity_seen
                if seen is not None:  # the report after a stream ends still names it
                    seen[ex.sandbox_id] = self.loop.time()
                ex.bytes_in, ex.bytes_out = self.tunnel_in, self.tunnel.upstream.tunnel_out
                self.ctx.stats.stream_duration[ex.protocol].observe(monotonic() - ex.started)
                self.exchange_ended(ex)
        elif ex is not None and not ex.ended:
            ex.outcome = "client_closed"
            self.exchange_ended(ex)
        if self.tunnel is None and self.upstream is not None:
            up, self.upstream = self.upstream, None
            up.client = None
            up.abort()
        # Break the reference cycles (parser <-> protocol, tunnel, errors' tracebacks) so a
        # closed connection is freed at once, not at the next full garbage collection.
        self.active = self.parsing = self.queued = None
        self.parser = self.tunnel = self.head_error = self.pending_error = None

    def upstream_full(self) -> None:
        """The backend's send buffer is full: stop reading the client, and check from time to
        time that the client is still there (a paused socket is not watched)."""
        self.gate.pause(PEER_FULL)
        if not self.deadline:
            self.probing = True
            self.deadline = self.loop.time() + PROBE_SECONDS

    def upstream_drained(self) -> None:
        self.gate.resume(PEER_FULL)
        if self.probing:
            self.probing = False
            self.deadline = 0.0

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- llhttp callbacks ---------------------------------------------------------------------
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
        if ex.head_size > self.ctx.max_request_line:
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
        else:  # chunked trailer section: bounded like a head
            if ex.trailers is None:
                ex.trailers = []
            ex.trailers.append((name, value))
            ex.head_size += len(name) + len(value) + 4
            if ex.head_size > self.ctx.max_header_bytes or len(ex.trailers) > self.ctx.max_header_count:
                self.head_error = errors.HeadersTooLarge("Request trailers are too large")
                raise self.head_error

    def on_headers_complete(self) -> None:
        ex = self.parsing
        parser = self.parser
        self.in_head = False
        self.head_bytes = self.quiet_bytes = 0
        self.deadline = 0.0
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
            self.ready = ex  # dispatched once llhttp returns (see data_received)

    def on_body(self, body: bytes) -> None:
        if self.body_left:
            self.body_left -= len(body)
        self.request_body(body)

    def relay_request_body(self, data: bytes) -> None:
        """Content-Length body bytes after the first read: no llhttp, no copy. The parser,
        which still expects them, is replaced when the body ends."""
        left = self.body_left
        self.quiet_bytes = 0
        if len(data) < left:
            self.body_left = left - len(data)
            self.request_body(data)
            return
        self.body_left = 0
        self.request_body(data if len(data) == left else data[:left])
        self.parser = HttpRequestParser(self)
        self.on_message_complete()
        if len(data) > left:  # the next (pipelined) request
            self.data_received(data[left:])

    def request_body(self, body: bytes) -> None:
        ex = self.parsing
        self.quiet_bytes = 0
        if ex is None or ex.discard or ex.error is not None:
            return
        ex.bytes_in += len(body)
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
        self.quiet_bytes = 0
        ex.request_done = True
        if ex.discard:
            if ex.response_done:
                self.finish(ex)
        elif ex.upstream is not None:
            self.request_sent(ex, ex.upstream)

    # -- request side -------------------------------------------------------------------------
    def dispatch(self, ex: Exchange) -> None:
        """Send the active exchange on its way: answer it, look it up, or bind a backend."""
        if ex.error is not None:
            self.answer(ex, ex.error)
            return
        if ex.lookup is not None:
            self.routing = self.loop.create_task(self.finish_routing(ex))
            return
        if self.ctx.sandbox_limit and self.slot is None:
            if not self.ctx.take_slot(ex.sandbox_id):
                self.answer(ex, errors.SandboxBusy(ex.sandbox_id, self.ctx.sandbox_limit))
                return
            self.slot = ex.sandbox_id
        if ex.resume:  # admitted; the sandbox must be woken first
            self.routing = self.loop.create_task(self.finish_resume(ex))
            return
        self.connect_to_backend(ex, fresh=False)

    def connect_to_backend(self, ex: Exchange, fresh: bool) -> None:
        record = ex.record
        pool = self.ctx.pools.pool(record.sandbox_id, record.host, ex.backend_port)
        conn = None if fresh else pool.take()
        if conn is not None:
            self.bind(ex, conn)
        else:
            self.connecting = self.loop.create_task(self.connect(ex, pool))

    async def finish_routing(self, ex: Exchange) -> None:
        """The registry answers asynchronously (a remote store): await it, then admit."""
        try:
            record = await ex.lookup
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            registry_warnings.warn("registry look-up of %s failed: %s", ex.sandbox_id, exc)
            record = errors.RegistryUnavailable(ex.sandbox_id)
        self.routing = None
        ex.lookup = None
        if self.closed or self.active is not ex:
            return
        try:
            if isinstance(record, errors.ProxyError):
                raise record
            if record is None:
                raise errors.SandboxNotFound(ex.sandbox_id)
            admit(self.ctx, ex, record, self.client_ip, self.trusted)
        except errors.ProxyError as exc:
            ex.error = exc.with_traceback(None)
        self.dispatch(ex)

    async def finish_resume(self, ex: Exchange) -> None:
        """Wake the admitted request's sandbox, then admit the request again (the running
        record may point elsewhere) and send it on."""
        record = ex.record
        try:
            woken = await self.ctx.registry.resume(ex.sandbox_id, ex.port, record.state)
            if woken is None:
                raise errors.SandboxNotFound(ex.sandbox_id)
            if not self.closed and self.active is ex:
                admit(self.ctx, ex, woken, self.client_ip, self.trusted)
            if ex.resume:  # paused again already
                raise errors.ResumeFailed(ex.sandbox_id)
        except asyncio.CancelledError:
            raise
        except errors.ProxyError as exc:
            ex.error = exc.with_traceback(None)
        except ResumeRefused as exc:
            ex.error = (errors.ResumeForbidden(ex.sandbox_id) if exc.status == 403
                        else errors.ResumeRateLimited(ex.sandbox_id, exc.retry_after))
        except ResumeFailed as exc:
            log.warning("%s", exc)
            ex.error = errors.ResumeFailed(ex.sandbox_id)
        except Exception as exc:
            registry_warnings.warn("resume of %s failed: %s", ex.sandbox_id, exc)
            ex.error = errors.RegistryUnavailable(ex.sandbox_id)
        self.routing = None
        if self.closed or self.active is not ex:
            return
        self.dispatch(ex)

    async def connect(self, ex: Exchange, pool) -> None:
        started = monotonic()
        try:
            conn = await pool.connect()
        except (ConnectFailed, BackendRefused) as exc:
            self.connecting = None
            if self.active is ex:
                log.warning("backend %s:%s of sandbox %s: %s", pool.host, pool.port,
                            pool.sandbox_id, exc)
                if isinstance(exc, BackendRefused):
                    self.answer(ex, errors.BackendNotAllowed(ex.sandbox_id))
                elif exc.timed_out:
                    self.answer(ex, errors.UpstreamTimeout(ex.sandbox_id, ex.port))
                else:
                    self.answer(ex, errors.PortNotOpen(ex.sandbox_id, ex.port))
            return
        self.connecting = None
        ex.connect_time = monotonic() - started
        if self.closed or self.active is not ex:
            pool.release(conn)
            return
        self.bind(ex, conn)

    def bind(self, ex: Exchange, conn: UpstreamConnection) -> None:
        seen = self.ctx.activity_seen
        if seen is not None:
            seen[ex.sandbox_id] = self.loop.time()
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
            trailers = (trailer_lines(ex.trailers, self.ctx.private_headers) if ex.trailers
                        else b"")
            conn.transport.write(b"0\r\n" + trailers + b"\r\n")
        if not ex.response_started:
            conn.deadline = self.loop.time() + self.ctx.upstream_header_timeout

    def request_malformed(self, exc: HttpParserError | None,
                          error: errors.ProxyError | None = None) -> None:
        if self.closing:
            return
        error = error or self.head_error or errors.BadRequest(f"Malformed request: {exc}")
        self.head_error = None
        error.__traceback__ = error.__context__ = None
        ex = self.active
        if ex is not None and ex.request_done and self.parsing is not ex:
            # The bad bytes follow complete requests: serve those, then answer this (or, after
            # a Connection: close request, just close).
            if self.parsing is not None and self.queued and self.queued[-1] is self.parsing:
                self.queued.pop()
            self.parsing = None
            self.pending_error = error
            self.gate.pause(WAITING_TURN)
            return
        if ex is not None and ex.response_started:
            reset(self.transport)  # mid-response: nothing sane can follow
            return
        if ex is not None and ex.upstream is not None:
            up, self.upstream, ex.upstream = ex.upstream, None, None
            up.client = None
            up.abort()
        if ex is None:
            ex = Exchange()
        self.queued = None
        self.answer(ex, error)  # parse errors are BadRequests: they close
