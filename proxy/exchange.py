"""Exchange: one request and its response, from the moment its head is parsed to its end.

Read top to bottom, an exchange does for one request what a reverse proxy does (the order of Go's
`ReverseProxy.ServeHTTP`): `start` answers it, waits for a remote registry or a resume, or binds a
backend connection (`connect`, `bind`); the request body follows (`request_body`,
`request_complete`); the response comes back as the backend sends it (`response_head`,
`response_body`, `response_complete`: the ResponseDestination of proxy/destination.py); the
backend may go away or stay silent (`upstream_lost`, `upstream_timed_out`) or switch protocols
(`upstream_upgraded`); the proxy may answer itself (`answer`). `end` accounts for the exchange
exactly once (metrics, access log), however it ended.

Each side has a small state whose legal transitions are written in one place (the
`_REQUEST_FROM` and `_RESPONSE_FROM` tables), checked on every transition (`_request_to`,
`_response_to`, or the same check inlined on the four per-request transitions). Routing and
admission decisions are proxy/admission.py's; framing rules are
proxy/http1.py's; the exchange reaches its client connection only through `ClientSide`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable
from time import monotonic
from typing import TYPE_CHECKING, NoReturn

from proxy import errors
from proxy.admission import admit
from proxy.connect_rpc import EnvelopeTracker, end_stream_unavailable
from proxy.flow import WAITING_UPSTREAM
from proxy.headers import MalformedHeaders, RequestHeaders, scan_response_headers, trailer_lines
from proxy.http1 import (
    LAST_CHUNK,
    Body,
    FramingError,
    chunk,
    last_chunk,
    response_framing,
    status_line,
)
from proxy.pools import BackendRefused, ConnectFailed
from proxy.registry import can_resume
from proxy.registry.resume import ResumeError, ResumeRefused

if TYPE_CHECKING:
    from proxy.destination import ClientSide
    from proxy.pools import UpstreamPool
    from proxy.registry import SandboxRecord
    from proxy.upstream import UpstreamConnection

log = logging.getLogger("sandbox_proxy.exchange")

# Methods a request may be retried with on a fresh connection when a pooled one turned out dead
# (RFC 9110 9.2.2), provided it carried no body.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
PENDING_LIMIT = 256 * 1024  # request bytes buffered while the backend connection opens


class RequestState(enum.IntEnum):
    HEAD = 0        # the head is being parsed
    BODY = 1        # the head is complete; body bytes may follow
    RECEIVED = 2    # the whole request was received
    DISCARDING = 3  # answered before its body ended: the rest is read and dropped


class ResponseState(enum.IntEnum):
    WAITING = 0    # nothing final sent (interim 1xx answers may have been relayed)
    STREAMING = 1  # the final head is out; body bytes follow
    SENT = 2       # the response is complete (or abandoned): nothing more is written
    TUNNEL = 3     # a 101 was relayed: the connections carry raw bytes


# Module-level names for the members: the request path compares states several times per
# request, and on Python 3.11 a global costs a fraction of an enum class attribute lookup.
HEAD, BODY, RECEIVED, DISCARDING = RequestState
WAITING, STREAMING, SENT, TUNNEL = ResponseState
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = Body

# The one place transitions are checked: for each state (by value), the set of states it may be
# entered from, as a bit mask.
_REQUEST_FROM = (0, 1 << HEAD, 1 << BODY | 1 << DISCARDING, 1 << BODY)
_RESPONSE_FROM = (0, 1 << WAITING, 1 << WAITING | 1 << STREAMING, 1 << STREAMING)


class StateError(RuntimeError):
    """A transition the state machine does not allow: a bug, never a peer's doing."""


class Exchange:
    __slots__ = (
        "conn", "request", "response",
        # the request as parsed and routed
        "method", "target", "headers", "head_size", "http11", "keep_alive", "upgrade", "error",
        "scanned", "host", "sandbox_id", "record", "port", "backend_port", "lookup", "resume",
        "upstream_head", "chunked", "has_body", "pending", "pending_size", "trailers",
        # the backend side
        "upstream", "retried", "waiting", "connecting", "slot",
        # the response
        "status", "body", "backend", "upstream_reusable", "close_after", "envelopes",
        # accounting
        "started", "bytes_in", "bytes_out", "connect_time", "protocol", "http", "outcome", "ended",
    )

    def __init__(self, conn: ClientSide) -> None:
        self.conn = conn
        self.request = HEAD
        self.response = WAITING
        self.method = b""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.http11 = True
        self.keep_alive = True
        self.upgrade: bytes | None = None  # the Upgrade value of a Connection: upgrade request
        self.error: errors.ProxyError | None = None  # decided while routing: answered by start
        self.scanned: RequestHeaders | None = None
        self.host = b""
        self.sandbox_id = ""
        self.record: SandboxRecord | None = None
        self.port = 0
        self.backend_port = 0
        self.lookup: Awaitable | None = None  # a remote registry's answer still to come
        self.resume = False  # admitted to a sandbox that must be woken before it is served
        self.upstream_head = b""
        self.chunked = False
        self.has_body = False
        self.pending: list[bytes] | None = None  # body received before a backend was bound
        self.pending_size = 0
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.upstream: UpstreamConnection | None = None
        self.retried = False
        self.waiting: asyncio.Task | None = None     # awaiting a remote registry or a resume
        self.connecting: asyncio.Task | None = None  # opening a backend connection
        self.slot = False  # holds one of the sandbox's [limits] sandbox_connections
        self.status = 0
        self.body = NO_BODY      # how the client's copy of the body is framed
        self.backend = NO_BODY   # how the backend's body ends
        self.upstream_reusable = False
        self.close_after = False   # the client connection closes after this response
        self.envelopes: EnvelopeTracker | None = None  # a Connect streaming response's framing
        self.started = 0.0      # time.monotonic() when the head was complete
        self.bytes_in = 0       # request body bytes
        self.bytes_out = 0      # response body bytes
        self.connect_time = 0.0  # seconds spent opening a backend connection (0: pooled)
        self.protocol = "http"  # http | sse | websocket | tunnel
        self.http = "h1"        # the client's protocol: h1 | h2 | grpc (native gRPC over h2)
        self.outcome = "ok"
        self.ended = False      # accounted for (metrics, access log)

    # -- state ------------------------------------------------------------------------------
    def _request_to(self, state: RequestState) -> None:
        if not _REQUEST_FROM[state] >> self.request & 1:
            self._illegal_request(state)
        self.request = state

    def _response_to(self, state: ResponseState) -> None:
        if not _RESPONSE_FROM[state] >> self.response & 1:
            self._illegal_response(state)
        self.response = state

    def _illegal_request(self, state: RequestState) -> NoReturn:
        raise StateError(f"request {self.request.name} -> {state.name}")

    def _illegal_response(self, state: ResponseState) -> NoReturn:
        raise StateError(f"response {self.response.name} -> {state.name}")

    @property
    def retryable(self) -> bool:
        return not self.has_body and self.method in IDEMPOTENT

    def header(self, lname: bytes) -> bytes | None:
        for name, value in self.headers:
            if name.lower() == lname:
                return value
        return None

    def wants_html(self) -> bool:
        return errors.wants_html(self.header(b"user-agent"), self.header(b"accept"),
                                 self.header(b"sec-fetch-mode"), self.header(b"x-requested-with"))

    def head_complete(self) -> None:
        # _request_to(BODY), inlined as on every hot-path transition: same table, no call
        if not _REQUEST_FROM[BODY] >> self.request & 1:
            self._illegal_request(BODY)
        self.request = BODY

    # -- 1. start: answer, await, or bind a backend -----------------------------------------
    def start(self) -> None:
        """Send the exchange on its way, once its head is parsed and routed."""
        if self.error is not None:
            self.answer(self.error)
            return
        conn = self.conn
        ctx = conn.ctx
        if self.lookup is not None:
            self.waiting = conn.loop.create_task(self.finish_routing())
            return
        if ctx.sandbox_limit and not self.slot:
            if not ctx.take_slot(self.sandbox_id):
                self.answer(errors.SandboxBusy(self.sandbox_id, ctx.sandbox_limit))
                return
            self.slot = True
        if self.resume:  # admitted; the sandbox must be woken first
            self.waiting = conn.loop.create_task(self.finish_resume())
            return
        self.connect(fresh=False)

    async def finish_routing(self) -> None:
        """The registry answers asynchronously (a remote store): await it, then admit."""
        try:
            record = await self.lookup if self.lookup is not None else None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            registry_warnings.warn("registry look-up of %s failed: %s", self.sandbox_id, exc)
            record = errors.RegistryUnavailable(self.sandbox_id)
        self.waiting = self.lookup = None
        if self.conn.closed:
            return
        try:
            if isinstance(record, errors.ProxyError):
                raise record
            if record is None:
                raise errors.SandboxNotFound(self.sandbox_id)
            admit(self.conn.ctx, self, record, self.conn.client_ip, self.conn.trusted)
        except errors.ProxyError as exc:
            self.error = exc.with_traceback(None)
        self.start()

    async def finish_resume(self) -> None:
        """Wake the admitted request's sandbox, then admit the request again (the running
        record may point elsewhere) and send it on."""
        conn = self.conn
        registry = conn.ctx.registry
        try:
            if not can_resume(registry) or self.record is None:  # admit set both, or no resume
                raise errors.ResumeFailed(self.sandbox_id)
            woken = await registry.resume(self.sandbox_id, self.port, self.record.state)
            if woken is None:
                raise errors.SandboxNotFound(self.sandbox_id)
            if not conn.closed:
                admit(conn.ctx, self, woken, conn.client_ip, conn.trusted)
            if self.resume:  # paused again already
                raise errors.ResumeFailed(self.sandbox_id)
        except asyncio.CancelledError:
            raise
        except errors.ProxyError as exc:
            self.error = exc.with_traceback(None)
        except ResumeRefused as exc:
            self.error = (errors.ResumeForbidden(self.sandbox_id) if exc.status == 403
                          else errors.ResumeRateLimited(self.sandbox_id, exc.retry_after))
        except ResumeError as exc:
            log.warning("%s", exc)
            self.error = errors.ResumeFailed(self.sandbox_id)
        except Exception as exc:
            registry_warnings.warn("resume of %s failed: %s", self.sandbox_id, exc)
            self.error = errors.RegistryUnavailable(self.sandbox_id)
        self.waiting = None
        if not conn.closed:
            self.start()

    def connect(self, fresh: bool) -> None:
        """Bind a pooled connection to the sandbox's backend, or open one (`fresh`: do not take
        a pooled one)."""
        record = self.record
        assert record is not None
        pool = self.conn.ctx.pools.pool(record.sandbox_id, record.host, self.backend_port)
        up = None if fresh else pool.take()
        if up is not None:
            self.bind(up)
        else:
            pool.connecting += 1  # the pool stays registered until this request has its answer
            self.connecting = self.conn.loop.create_task(self.open_connection(pool))

    async def open_connection(self, pool: UpstreamPool) -> None:
        started = monotonic()
        try:
            up = await pool.connect()
        except (ConnectFailed, BackendRefused) as exc:
            pool.connecting -= 1
            if not pool.members and not pool.connecting:
                pool.pools.drop(pool)
            self.connecting = None
            self.connect_failed(pool, exc)
            return
        pool.connecting -= 1
        self.connecting = None
        self.connect_time = monotonic() - started
        if self.conn.closed or self.response != WAITING:
            pool.release(up)  # a connection made just as the client left goes to the pool
            return
        self.bind(up)

    def connect_failed(self, pool: UpstreamPool, exc: ConnectFailed | BackendRefused) -> None:
        """No connection to the backend could be opened: answer, unless nobody waits for it."""
        if self.conn.closed or self.response != WAITING:
            return
        log.warning("backend %s:%s of sandbox %s: %s", pool.host, pool.port, pool.sandbox_id,
                    exc)
        if isinstance(exc, BackendRefused):
            self.answer(errors.BackendNotAllowed(self.sandbox_id))
        elif exc.timed_out:
            self.answer(errors.UpstreamTimeout(self.sandbox_id, self.port))
        else:
            self.answer(errors.PortNotOpen(self.sandbox_id, self.port))

    def bind(self, up: UpstreamConnection) -> None:
        """Send the head (and any body received meanwhile) on `up`."""
        conn = self.conn
        seen = conn.ctx.activity_seen
        if seen is not None:
            seen[self.sandbox_id] = conn.loop.time()
        up.client = self
        self.upstream = up
        if conn.writing_paused:
            up.pause_reading()
        transport = up.transport
        transport.write(self.upstream_head)
        if self.pending is not None:
            for body in self.pending:
                if self.chunked:
                    transport.writelines(chunk(body))
                else:
                    transport.write(body)
            self.pending = None
            conn.gate.resume(WAITING_UPSTREAM)
        if self.request == RECEIVED:
            self.request_sent(up)

    # -- 2. the request body -----------------------------------------------------------------
    def request_body(self, body: bytes) -> None:
        if self.request != BODY or self.error is not None:
            return  # answered already (or being answered): dropped
        self.bytes_in += len(body)
        up = self.upstream
        if up is not None:
            if self.chunked:
                up.transport.writelines(chunk(body))
            else:
                up.transport.write(body)
            return
        if self.pending is None:
            self.pending = []
        self.pending.append(body)
        self.pending_size += len(body)
        if self.pending_size > PENDING_LIMIT:
            self.conn.gate.pause(WAITING_UPSTREAM)

    def request_complete(self) -> None:
        """The whole request was received."""
        discarding = self.request == DISCARDING
        if not _REQUEST_FROM[RECEIVED] >> self.request & 1:  # _request_to(RECEIVED), inlined
            self._illegal_request(RECEIVED)
        self.request = RECEIVED
        if discarding:
            if self.response == SENT:
                self.conn.exchange_done(self)
        elif self.upstream is not None:
            self.request_sent(self.upstream)

    def request_sent(self, up: UpstreamConnection) -> None:
        """The whole request is on its way: end chunked framing and start the header clock."""
        if self.chunked:
            trailers = (trailer_lines(self.trailers, self.conn.ctx.private_headers)
                        if self.trailers else b"")
            up.transport.write(last_chunk(trailers))
        if self.response == WAITING:
            up.deadline = self.conn.loop.time() + self.conn.ctx.upstream_header_timeout

    # -- 3. the response (ResponseDestination) -----------------------------------------------
    def response_head(self, up: UpstreamConnection, status: int) -> None:
        conn = self.conn
        ctx = conn.ctx
        framing = b""
        try:
            scanned = scan_response_headers(
                up.headers, self.host if ctx.isolate_cookies else None)  # 1xx and 101 too
            if status >= 200 and status != 101:
                self.backend, self.body, framing = response_framing(
                    self.method, status, scanned, self.http11)
        except (MalformedHeaders, FramingError, ValueError) as exc:
            self.response_invalid(up, str(exc))
            return
        if status < 200 and status != 101:
            if self.http11:  # interim (100 Continue, 103 Early Hints): relay, keep waiting
                conn.out.append(status_line(status, up.status_reason)
                                + b"".join(scanned.lines) + b"\r\n")
            up.head_seen = False
            return
        up.deadline = 0.0
        self.status = status
        head = [b"HTTP/1.1 %d %s\r\n" % (status, up.status_reason)]
        head += scanned.lines
        if status == 101:
            if self.upgrade is None or scanned.upgrade is None:
                self.upstream_lost(up)  # a 101 nobody asked for: the backend is broken
                up.close()
                return
            self._response_to(STREAMING)
            head.append(b"Connection: Upgrade\r\nUpgrade: " + scanned.upgrade + b"\r\n\r\n")
            conn.out.append(b"".join(head))
            self.record_response(101, "websocket" if scanned.upgrade.strip().lower()
                                 == b"websocket" else "tunnel")
            return
        if not _RESPONSE_FROM[STREAMING] >> self.response & 1:  # _response_to, inlined
            self._illegal_response(STREAMING)
        self.response = STREAMING
        self.upstream_reusable = self.upgrade is None and up.parser.should_keep_alive()
        mode = self.body
        if mode == LENGTH:
            up.body_left = scanned.length  # the rest of the body bypasses the parser
        if scanned.connect_stream and mode == CHUNKED and self.backend == CHUNKED:
            self.envelopes = EnvelopeTracker()
        head.append(framing)
        if (not self.keep_alive or mode == UNTIL_CLOSE or self.close_after
                or ctx.draining):
            self.close_after = True
            head.append(b"Connection: close\r\n\r\n")
        elif not self.http11:
            head.append(b"Connection: keep-alive\r\n\r\n")
        else:
            head.append(b"\r\n")
        conn.out.append(b"".join(head))
        self.record_response(status, "sse" if scanned.event_stream else "http")
        if self.method == b"HEAD":
            up.skip_response_body()
            self.response_complete(up)

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.envelopes is not None:
            self.envelopes.feed(data)
        if self.body == CHUNKED:
            self.conn.out += chunk(data)
        else:
            self.conn.out.append(data)

    def response_complete(self, up: UpstreamConnection) -> None:
        if self.response != STREAMING or self.status == 101:
            return  # an interim response ended, or the tunnel takes over
        if self.body == CHUNKED:
            self.conn.out.append(last_chunk(trailer_lines(up.trailers)) if up.trailers
                                 else LAST_CHUNK)
        self.unbind(up, reuse=self.upstream_reusable and self.request == RECEIVED)
        self.response_finished()

    def flush(self) -> None:
        self.conn.flush_out()

    def upstream_full(self) -> None:
        self.conn.upstream_full()

    def upstream_drained(self) -> None:
        self.conn.upstream_drained()

    def response_finished(self) -> None:
        """The response is complete: the exchange is, too, once the request is."""
        if not _RESPONSE_FROM[SENT] >> self.response & 1:  # _response_to(SENT), inlined
            self._illegal_response(SENT)
        self.response = SENT
        if self.request == RECEIVED:
            self.conn.exchange_done(self)
        elif self.request == BODY:
            self._request_to(DISCARDING)  # answered early: drop the rest of the body

    def unbind(self, up: UpstreamConnection, reuse: bool) -> None:
        self.upstream = None
        self.conn.upstream_drained()  # a full backend no longer holds the client back
        if reuse:
            up.pool.release(up)
        else:
            up.client = None
            up.close()

    def response_invalid(self, up: UpstreamConnection, reason: str) -> None:
        """A response head the proxy will not relay: the client gets a 502, the backend
        connection is dropped."""
        log.info("invalid response from %s:%s of sandbox %s: %s", up.pool.host, up.pool.port,
                 up.pool.sandbox_id, reason)
        self.unbind(up, reuse=False)
        self.answer(errors.UpstreamInvalid(self.sandbox_id, self.port))  # outcome: its name

    # -- 4. the backend goes away, stays silent, or switches protocols -----------------------
    def upstream_lost(self, up: UpstreamConnection) -> None:
        """The backend connection closed (or broke) while bound to this exchange."""
        if self.upstream is not up:
            return
        self.upstream = None
        up.client = None
        if self.response == SENT:
            return
        if self.response == STREAMING:
            self.response_cut()
            return
        if up.reused and self.retryable and not self.retried:
            self.retried = True  # a pooled connection the backend had already closed
            self.conn.ctx.stats.retries += 1
            self.connect(fresh=True)
            return
        self.answer(errors.UpstreamClosed(self.sandbox_id, self.port))

    def response_cut(self) -> None:
        """The backend's connection ended during the response body."""
        conn = self.conn
        if self.backend == UNTIL_CLOSE:  # EOF is how this body ends
            if self.body == CHUNKED:
                conn.out.append(LAST_CHUNK)
            conn.flush_out()
            self.response_finished()
        elif self.envelopes is not None and self.envelopes.at_boundary:
            # A Connect stream cut between envelopes: end it as Connect clients expect (an
            # `unavailable` error they retry), then end the chunked body cleanly.
            self.outcome = "upstream_closed"
            if not self.envelopes.ended:
                conn.out += chunk(end_stream_unavailable("The sandbox closed the connection"))
            conn.out.append(LAST_CHUNK)
            conn.flush_out()
            self.response_finished()
        else:
            self.outcome = "upstream_closed"
            self.end()
            conn.flush_out()
            # fewer bytes than framed, or a body whose end is the close: never complete-looking
            conn.abort_response(hard=self.body == UNTIL_CLOSE)

    def upstream_timed_out(self, up: UpstreamConnection) -> None:
        if self.upstream is not up or self.response != WAITING:
            return
        self.unbind(up, reuse=False)
        self.answer(errors.UpstreamTimeout(self.sandbox_id, self.port))

    def upstream_upgraded(self, up: UpstreamConnection, rest: bytes) -> None:
        """The backend answered 101: from now on both sides are raw byte streams."""
        if self.upstream is not up or self.status != 101:
            up.close()
            return
        self._response_to(TUNNEL)
        self.started = monotonic()  # from here on it measures the stream's lifetime
        self.conn.start_tunnel(self, up, rest)

    # -- 5. answers the proxy makes itself ---------------------------------------------------
    def answer(self, error: errors.ProxyError) -> None:
        conn = self.conn
        ctx = conn.ctx
        # A body still coming is not waited for: answer, then linger-close.
        close = (error.close or not self.keep_alive or self.close_after or ctx.draining
                 or (self.has_body and self.request != RECEIVED))
        status = error.status
        if self.preflight(error):
            status = 204
            conn.out.append(errors.render_preflight(
                self.header(b"access-control-request-headers"), close=close))
        else:
            conn.out.append(errors.render_error(
                error, html_page=self.wants_html(), head_only=self.method == b"HEAD",
                close=close))
        conn.flush_out()
        self.record_response(status, "http", "proxy")
        self.outcome = type(error).__name__
        if close:
            self._response_to(SENT)
            self.end()
            conn.linger_close()
        else:
            self.response_finished()

    def preflight(self, error: errors.ProxyError) -> bool:
        """A CORS preflight nobody else can answer: the proxy answers 204, so the browser sends
        the real request, whose answer (ours, with CORS) it can then read. Preflights that reach
        a live sandbox are the sandbox's to answer."""
        return (self.method == b"OPTIONS" and error.status >= 400
                and not isinstance(error, errors.BadRequest)
                and self.header(b"access-control-request-method") is not None)

    # -- 6. the end --------------------------------------------------------------------------
    def record_response(self, status: int, protocol: str, origin: str = "backend") -> None:
        self.status = status
        self.protocol = protocol
        stats = self.conn.ctx.stats
        stats.response(status, self.method, protocol, origin, self.http)
        if self.started:
            stats.response_duration.observe(monotonic() - self.started)

    def client_lost(self) -> None:
        """The client connection is gone: stop waiting on its behalf, release the backend."""
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None
        # A connect under way is not cancelled: cancelling it just after the connection is made
        # would orphan that connection; it completes and goes to the pool (open_connection).
        self.connecting = None
        if self.response != TUNNEL:
            if self.upstream is not None:
                up, self.upstream = self.upstream, None
                up.client = None
                up.abort()
            if not self.ended:
                self.outcome = "client_closed"
        self.end()

    def end(self) -> None:
        """Account for the exchange once, however it ended: counters, access log, slot."""
        if self.ended:
            return
        self.ended = True
        conn = self.conn
        ctx = conn.ctx
        if self.slot:
            self.slot = False
            ctx.give_slot(self.sandbox_id)
        stats = ctx.stats
        stats.request_bytes += self.bytes_in
        stats.response_bytes += self.bytes_out
        duration = monotonic() - self.started if self.started else 0.0
        if self.protocol == "sse":
            stats.stream_duration["sse"].observe(duration)
        if ctx.access_log.enabled:
            ctx.access_log.record(conn.client_ip, self.method, self.host, self.sandbox_id,
                                  self.port, self.target, self.status, self.bytes_in,
                                  self.bytes_out, duration, self.connect_time, self.outcome,
                                  self.protocol, self.http)


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
