"""gRPC call: one native gRPC call, the client's HTTP/2 stream and the backend's joined.

Started by proxy/grpc_upstream.py on the sandbox's shared h2c connection (`GrpcBackend`), a
`GrpcCall` relays headers, messages (DATA) and trailers both ways as they come. Each side's
flow-control window is given back only for bytes the other side has taken, so neither a slow
client nor a slow sandbox makes the proxy buffer more than one window per call. A backend that
dies or resets the stream mid-call ends it with `grpc-status: 14` (UNAVAILABLE) in trailers, or a
trailers-only response if nothing was sent yet; a client that leaves cancels the backend's stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING

from proxy import errors
from proxy.exchange import RECEIVED, SENT, STREAMING, WAITING
from proxy.flow import PEER_FULL, WAITING_UPSTREAM
from proxy.h2_connection import ErrorCodes, send_queued
from proxy.headers import HOP_BY_HOP, fields_of_lines, scan_response_headers, trailer_fields
from proxy.pools import BackendRefused, ConnectFailed

if TYPE_CHECKING:
    from proxy.grpc_upstream import GrpcBackend
    from proxy.h2_exchange import H2Exchange
    from proxy.pools import UpstreamPool

log = logging.getLogger("sandbox_proxy.grpc")

Fields = list[tuple[bytes, bytes]]
# Request fields never forwarded to a gRPC backend: connection-specific ones (RFC 9113 8.2.2),
# and a length HTTP/2 frames itself.
_NOT_RELAYED = HOP_BY_HOP | frozenset({b"content-length"})


class GrpcCall:
    """One gRPC call: the client's stream and the backend's, joined."""

    __slots__ = ("ex", "stream", "backend", "stream_id", "pending", "pending_end", "unacked",
                 "paused", "head_sent", "ended", "started")

    def __init__(self, ex: H2Exchange):
        self.ex = ex
        self.stream = ex.conn
        self.backend: GrpcBackend | None = None
        self.stream_id = 0
        self.pending: deque[bytes] = deque()  # request bytes the backend's window has no room for
        self.pending_end: Fields | bool = False
        self.unacked = 0       # response bytes relayed whose backend window is not given back
        self.paused = False    # the client's window is shut: give the backend no more credit
        self.head_sent = False
        self.ended = False
        self.started = monotonic()
        self.stream.gate.pause(WAITING_UPSTREAM)  # no credit for the client until bound

    async def wait_for(self, opening: asyncio.Future, pool: UpstreamPool) -> None:
        ex = self.ex
        try:
            backend = await asyncio.shield(opening)
        except (ConnectFailed, BackendRefused) as exc:
            if pool.multiplexed is opening:
                pool.multiplexed = None
            ex.connecting = None
            ex.connect_failed(pool, exc)
            return
        ex.connecting = None
        ex.connect_time = monotonic() - self.started
        if self.stream.closed or ex.response != WAITING:
            return
        if not backend.usable:
            ex.answer(errors.UpstreamClosed(ex.sandbox_id, ex.port))
            return
        self.bind(backend)

    def bind(self, backend: GrpcBackend) -> None:
        ex = self.ex
        ctx = self.stream.ctx
        if ctx.activity_seen is not None:
            ctx.activity_seen[ex.sandbox_id] = ctx.loop.time()
        self.backend = backend
        sid = backend.h2.request(request_fields(ex.method, ex.target, ex.upstream_head), False)
        if sid <= 0:
            log.info("gRPC call to %s refused locally (%d)", ex.sandbox_id, sid)
            self.backend = None
            ex.answer(errors.UpstreamClosed(ex.sandbox_id, ex.port))
            return
        self.stream_id = sid
        backend.calls[sid] = self
        backend.deadline = 0.0
        if ex.request == RECEIVED and self.pending_end is False:  # it ended before the call
            self.request_ended(ex.trailers)
        self.pump()
        backend.flush()
        self.stream.gate.resume(WAITING_UPSTREAM)

    # -- client -> backend -------------------------------------------------------------------------
    def request_data(self, data: bytes) -> None:
        self.pending.append(data)
        if self.backend is not None and len(self.pending) == 1:
            self.pump()
            self.backend.flush()

    def request_ended(self, trailers: Fields | None) -> None:
        private = self.stream.ctx.private_headers  # the token never reaches a backend
        self.pending_end = (trailer_fields(trailers, private) or True) if trailers else True
        if self.backend is not None and not self.pending:
            self.pump()
            self.backend.flush()

    def pump(self) -> None:
        """Send what the backend's windows admit; withhold the client's credit for the rest."""
        backend = self.backend
        if backend is None or backend.closed:
            return
        pending = self.pending
        if send_queued(backend.h2, self.stream_id, pending, self.pending_end)[2]:
            self.pending_end = False
        if pending:
            self.stream.gate.pause(PEER_FULL)
        else:
            self.stream.gate.resume(PEER_FULL)

    # -- backend -> client -------------------------------------------------------------------------
    def headers_received(self, headers: Fields, ended: bool) -> None:
        """A final head from the backend: the response's, or, after it, the trailers (interim
        heads are dropped by the connection)."""
        if self.head_sent:
            self.response_trailers(headers)
        else:
            self.response_head(headers, ended)

    def response_head(self, headers: Fields, ended: bool) -> None:
        ex = self.ex
        status = 200
        regular = []
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif name[:1] != b":":
                regular.append((name, value))
        if ex.response != WAITING:
            return
        # the one rule for what a client may receive (proxy/headers.py): connection-specific
        # fields and framing dropped, Set-Cookie confined to the sandbox's own host
        isolate = ex.host if self.stream.ctx.isolate_cookies else None
        try:
            fields = fields_of_lines(scan_response_headers(regular, isolate).lines)
        except ValueError as exc:  # MalformedHeaders too
            log.info("invalid gRPC response from sandbox %s: %s", ex.sandbox_id, exc)
            self.cancel()
            self.backend_lost("the sandbox sent an invalid response")
            return
        ex.status = status
        ex._response_to(STREAMING)
        ex.record_response(status, "http")
        self.head_sent = True
        self.stream.flush_out()  # written at the end of this loop turn, with the rest
        if ended:
            self.ended = True
            if self.backend is not None:
                self.backend.call_done(self)
            self.stream.send_head(status, fields, end=True)
            ex.response_finished()
            return
        self.stream.send_head(status, fields)

    def response_data(self, data: bytes, flow_controlled: int) -> None:
        self.ex.bytes_out += len(data)
        self.stream.send_body(data)
        self.stream.flush_out()
        self.unacked += flow_controlled
        if not self.paused:
            self.acknowledge()

    def acknowledge(self) -> None:
        n, self.unacked = self.unacked, 0
        backend = self.backend
        if n and backend is not None and not backend.closed:
            backend.h2.consume(self.stream_id, n)
            backend.flush()

    def set_paused(self, paused: bool) -> None:
        """The client's window for this stream shut (or reopened)."""
        self.paused = paused
        if not paused:
            self.acknowledge()

    def response_trailers(self, headers: Fields) -> None:
        self.finish(trailer_fields(headers))

    def finish(self, trailers: Fields | None) -> None:
        if self.ended:
            return
        self.ended = True
        ex = self.ex
        if self.backend is not None:
            self.backend.call_done(self)
        if ex.response == WAITING:  # a response without a head: the backend is broken
            self.backend_lost("the sandbox ended the call without a response")
            return
        self.stream.send_end(trailers)
        self.stream.flush_out()
        if ex.response == STREAMING:
            ex.response_finished()

    def backend_lost(self, reason: str) -> None:
        """The backend's connection or stream is gone mid-call: UNAVAILABLE, in trailers."""
        ex = self.ex
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.call_done(self)
        self.ended = True
        if self.stream.closed or ex.response == SENT:
            return
        ex.outcome = "upstream_closed"
        status = [(b"grpc-status", b"14"), (b"grpc-message", reason.encode())]
        if ex.response == WAITING:
            ex.status = 200
            ex._response_to(STREAMING)
            ex.record_response(200, "http")
            self.stream.send_head(200, [(b"content-type", b"application/grpc"), *status],
                                  end=True)
        else:
            self.stream.send_end(status)
        self.stream.flush_out()
        if ex.response == STREAMING:
            ex.response_finished()

    def cancel(self) -> None:
        """The client went away: cancel the backend's stream."""
        backend, self.backend = self.backend, None
        self.ended = True
        if backend is not None and not backend.closed:
            backend.call_done(self)
            backend.h2.reset(self.stream_id, ErrorCodes.CANCEL)
            backend.flush()


def request_fields(method: bytes, target: bytes, head: bytes) -> Fields:
    """The HTTP/2 request fields of a call, from the HTTP/1.1 head admission built for it (so what
    a gRPC backend sees is filtered exactly as any backend's request): Host becomes :authority,
    connection-specific fields are dropped (RFC 9113 8.2.2), `te: trailers` is what gRPC asks."""
    authority = b""
    rest: Fields = []
    for name, value in fields_of_lines(line for line in head.split(b"\r\n")[1:] if line):
        if name == b"host":
            authority = value
        elif name not in _NOT_RELAYED:
            rest.append((name, value))
    return [(b":method", method), (b":scheme", b"http"), (b":path", target),
            (b":authority", authority), *rest, (b"te", b"trailers")]
