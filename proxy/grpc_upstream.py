"""gRPC to sandboxes: native gRPC calls go to the backend over cleartext HTTP/2 (h2c).

gRPC needs HTTP/2 end to end (trailers carry its status), so a request from an HTTP/2 client
whose Content-Type is `application/grpc` or `application/grpc+...` (not gRPC-Web, which is
HTTP/1.1-compatible and takes the ordinary path) is admitted like any other request
(proxy/admission.py builds the head the backend may see) and then sent as one stream of a
`GrpcBackend`: one multiplexed h2c connection per backend address, kept in that address's
`UpstreamPool` (proxy/pools.py) and closed with it when the sandbox is removed.

A `GrpcCall` joins the client's stream (proxy/h2_stream.py) and the backend's: headers, DATA
and trailers are relayed as they come; each side's flow-control window is given back only for
bytes the other side has taken, so neither a slow client nor a slow sandbox makes the proxy
buffer more than one window per call. If the backend connection dies or resets the stream
mid-call, the client gets `grpc-status: 14` (UNAVAILABLE) in trailers (or a trailers-only
response if nothing was sent yet), which gRPC clients know how to retry, instead of a bare
reset.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

from proxy import errors
from proxy.exchange import RECEIVED, SENT, STREAMING, WAITING
from proxy.flow import PEER_FULL, WAITING_UPSTREAM
from proxy.h2_connection import H2Connection
from proxy.headers import HOP_BY_HOP, trailer_fields
from proxy.pools import BackendRefused, ConnectFailed

if TYPE_CHECKING:
    from proxy.h2_stream import H2Exchange
    from proxy.pools import UpstreamPool

log = logging.getLogger("sandbox_proxy.grpc")

Fields = list[tuple[bytes, bytes]]
WINDOW = 1 << 20  # what the backend may send ahead, per call and (x16) per connection
# Response fields never relayed: connection-specific ones (RFC 9113 8.2.2), pseudo-headers the
# proxy writes itself.
_NOT_RELAYED = HOP_BY_HOP | frozenset({b"content-length"})


class GrpcBackend(asyncio.Protocol):
    """One h2c connection to a sandbox backend, shared by the gRPC calls to it."""

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.calls: dict[int, GrpcCall] = {}
        self.closed = False
        self.goaway = False  # the backend said GOAWAY: no new calls here
        self.deadline = 0.0  # without calls, closed after [timeouts] upstream_idle
        self.h2 = H2Connection(config=H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=True))
        self.h2.local_settings = Settings(client=True, initial_values={
            SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: pool.pools.max_head_bytes,
            SettingCodes.ENABLE_PUSH: 0,
        })

    @property
    def usable(self) -> bool:
        return (not self.closed and not self.goaway
                and len(self.calls) < self.h2.remote_settings.max_concurrent_streams)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.members.add(self)
        self.pool.pools.register(self.pool)
        self.pool.pools.sweeper.watched.add(self)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(16 * WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            log.info("HTTP/2 protocol error from backend %s:%s of %s: %s", self.pool.host,
                     self.pool.port, self.pool.sandbox_id, exc)
            self.flush()
            self.abort()
            return
        for event in events:
            kind = type(event)
            call = self.calls.get(getattr(event, "stream_id", 0) or 0)
            if kind is DataReceived:
                if call is not None:
                    call.response_data(event.data, event.flow_controlled_length)  # type: ignore[attr-defined]
                else:
                    self.h2.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id)  # type: ignore[attr-defined]
            elif kind is ResponseReceived:
                if call is not None:  # END_STREAM on the head: a trailers-only response
                    call.response_head(event.headers or [],  # type: ignore[attr-defined]
                                       event.stream_ended is not None)  # type: ignore[attr-defined]
            elif kind is TrailersReceived:
                if call is not None:
                    call.response_trailers(event.headers or [])  # type: ignore[attr-defined]
            elif kind is StreamEnded:
                if call is not None:
                    call.finish(None)
            elif kind is StreamReset:
                if call is not None:
                    call.backend_lost("the sandbox reset the call")
            elif kind is WindowUpdated:
                if event.stream_id:  # type: ignore[attr-defined]
                    if call is not None:
                        call.pump()
                else:
                    for each in list(self.calls.values()):
                        each.pump()
            elif kind is ConnectionTerminated:  # graceful or not: no new calls here
                self.goaway = True
                if self.pool.multiplexed is self:
                    self.pool.multiplexed = None
                last = event.last_stream_id or 0  # type: ignore[attr-defined]
                for stream_id, each in list(self.calls.items()):
                    if stream_id > last:  # never processed by the backend
                        each.backend_lost("the sandbox is going away")
                if event.error_code != ErrorCodes.NO_ERROR:  # type: ignore[attr-defined]
                    self.flush()
                    self.abort()
                    return
            elif kind is InformationalResponseReceived:
                pass
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pool = self.pool
        pool.pools.sweeper.watched.discard(self)
        pool.members.discard(self)
        if pool.multiplexed is self:
            pool.multiplexed = None
        pool.forget(self)  # type: ignore[arg-type]
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.backend_lost("the sandbox closed the connection")

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def call_done(self, call: GrpcCall) -> None:
        if self.calls.get(call.stream_id) is call:
            del self.calls[call.stream_id]
            if not self.calls:
                if self.goaway:  # the backend's graceful GOAWAY: its last call is done
                    self.transport.close()
                    return
                pools = self.pool.pools
                self.deadline = pools.loop.time() + pools.idle_timeout

    def on_deadline(self) -> None:
        if not self.calls:
            if self.pool.multiplexed is self:
                self.pool.multiplexed = None
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


async def _open(pool: UpstreamPool) -> GrpcBackend:
    backend = await pool.open(lambda: GrpcBackend(pool))
    if pool.multiplexed is not None and not isinstance(pool.multiplexed, GrpcBackend):
        pool.multiplexed = backend
    return backend


def start_call(ex: H2Exchange) -> None:
    """Send the admitted gRPC request `ex` to its sandbox over the shared h2c connection, opening
    one if there is none."""
    ctx = ex.conn.ctx
    record = ex.record
    assert record is not None
    pool = ctx.pools.pool(record.sandbox_id, record.host, ex.backend_port)
    call = ex.call = GrpcCall(ex)
    if ex.pending is not None:  # body that came while the registry or a resume was awaited
        call.pending.extend(ex.pending)
        ex.pending = None
        ex.conn.gate.resume(WAITING_UPSTREAM)
    backend = pool.multiplexed
    if isinstance(backend, GrpcBackend) and backend.usable:
        call.bind(backend)
        return
    if not isinstance(backend, asyncio.Future):
        backend = pool.multiplexed = ctx.loop.create_task(_open(pool))
    ex.connecting = ctx.loop.create_task(call.wait_for(backend, pool))


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
            if not self.stream.closed and ex.response == WAITING:
                log.warning("gRPC backend %s:%s of sandbox %s: %s", pool.host, pool.port,
                            pool.sandbox_id, exc)
                if isinstance(exc, BackendRefused):
                    ex.answer(errors.BackendNotAllowed(ex.sandbox_id))
                else:
                    ex.answer(errors.PortNotOpen(ex.sandbox_id, ex.port))
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
        h2 = backend.h2
        self.stream_id = h2.get_next_available_stream_id()
        backend.calls[self.stream_id] = self
        backend.deadline = 0.0
        try:
            h2.send_headers(self.stream_id,
                            request_fields(ex.method, ex.target, ex.upstream_head))
        except ProtocolError as exc:
            log.info("gRPC call to %s refused locally: %s", ex.sandbox_id, exc)
            backend.call_done(self)
            self.backend = None
            ex.answer(errors.UpstreamClosed(ex.sandbox_id, ex.port))
            return
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
        self.pending_end = (trailer_fields(trailers) or True) if trailers else True
        if self.backend is not None and not self.pending:
            self.pump()
            self.backend.flush()

    def pump(self) -> None:
        """Send what the backend's windows admit; withhold the client's credit for the rest."""
        backend = self.backend
        if backend is None or backend.closed:
            return
        h2 = backend.h2
        sid = self.stream_id
        pending = self.pending
        try:
            while pending:
                window = h2.local_flow_control_window(sid)
                if window <= 0:
                    break
                data = pending[0]
                size = min(window, h2.max_outbound_frame_size)
                if len(data) > size:
                    h2.send_data(sid, data[:size])
                    pending[0] = data[size:]
                else:
                    h2.send_data(sid, data)
                    pending.popleft()
            if pending:
                self.stream.gate.pause(PEER_FULL)
                return
            self.stream.gate.resume(PEER_FULL)
            end = self.pending_end
            if end is not False:
                self.pending_end = False
                if end is True:
                    h2.end_stream(sid)
                else:
                    h2.send_headers(sid, end, end_stream=True)
        except ProtocolError:
            pending.clear()

    # -- backend -> client -------------------------------------------------------------------------
    def response_head(self, headers: Fields, ended: bool) -> None:
        ex = self.ex
        status = 200
        fields = []
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif name[:1] != b":" and name not in _NOT_RELAYED:
                fields.append((name, value))
        if ex.response != WAITING:
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
            try:
                backend.h2.acknowledge_received_data(n, self.stream_id)
            except ProtocolError:
                pass
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
            try:
                backend.h2.reset_stream(self.stream_id, ErrorCodes.CANCEL)
            except ProtocolError:
                pass
            backend.flush()


def request_fields(method: bytes, target: bytes, head: bytes) -> Fields:
    """The HTTP/2 request fields of a call, from the HTTP/1.1 head admission built for it (so what
    a gRPC backend sees is filtered exactly as any backend's request): Host becomes :authority,
    connection-specific fields are dropped (RFC 9113 8.2.2), `te: trailers` is what gRPC asks."""
    lines = head.split(b"\r\n")
    fields: Fields = [(b":method", method), (b":scheme", b"http"), (b":path", target)]
    authority = b""
    rest: Fields = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        lname = name.lower()
        value = value.strip()
        if lname == b"host":
            authority = value
        elif lname not in _NOT_RELAYED:
            rest.append((lname, value))
    fields.append((b":authority", authority))
    fields += rest
    fields.append((b"te", b"trailers"))
    return fields
