"""gRPC to sandboxes: native gRPC calls go to the backend over cleartext HTTP/2 (h2c).

gRPC needs HTTP/2 end to end (trailers carry its status), so a request from an HTTP/2 client
whose Content-Type is `application/grpc` or `application/grpc+...` (not gRPC-Web, which is
HTTP/1.1-compatible and takes the ordinary path) is admitted like any other request
(proxy/admission.py builds the head the backend may see) and then sent as one stream of a
`GrpcBackend`: one multiplexed h2c connection per backend address, kept in that address's
`UpstreamPool` (proxy/pools.py) and closed with it when the sandbox is removed.

Each call is a `GrpcCall` (proxy/grpc_call.py), which joins the client's stream and the
backend's; this module owns the connection (its frames, GOAWAY, idle close) and starting calls
on it. The sandbox is as hostile as any client: frames that ask for work without carrying a
call's data (PING, SETTINGS, PRIORITY, unknown, empty DATA, GOAWAY, interim heads) are counted
per second against `[limits] http2_max_control_frames`, and a backend that does not read what
it asked for (acknowledgements) is cut once OUTPUT_LIMIT bytes wait for it. A backend
connection that dies ends every call on it with `grpc-status: 14` (UNAVAILABLE), which gRPC
clients know how to retry, instead of a bare reset.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.flow import WAITING_UPSTREAM
from proxy.grpc_call import GrpcCall
from proxy.h2_connection import (
    CLOSED,
    DATA,
    EMPTY,
    END,
    FATAL,
    GOAWAY,
    HEADERS,
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

if TYPE_CHECKING:
    from proxy.h2_exchange import H2Exchange
    from proxy.pools import UpstreamPool

log = logging.getLogger("sandbox_proxy.grpc")

CALL_WINDOW = 1 << 20  # what the backend may send ahead, per call and (x16) per connection
OUTPUT_LIMIT = 4 * 1024 * 1024  # bytes queued for a backend that does not read: then it is cut


class GrpcBackend(asyncio.Protocol):
    """One h2c connection to a sandbox backend, shared by the gRPC calls to it."""

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.calls: dict[int, GrpcCall] = {}
        self.closed = False
        self.goaway = False  # the backend said GOAWAY: no new calls here
        self.deadline = 0.0  # without calls, closed after [timeouts] upstream_idle
        self.write_due = False  # a write of what h2 produced is scheduled for this loop turn
        self.writing_paused = False
        self.window_start = 0.0  # the control-frame count's current second
        self.control_frames = 0
        self.h2 = Session(False, [
            (Setting.INITIAL_WINDOW_SIZE, CALL_WINDOW),
            (Setting.MAX_HEADER_LIST_SIZE, pool.pools.max_head_bytes),
            (Setting.ENABLE_PUSH, 0),
        ], 16 * CALL_WINDOW, pool.pools.max_head_bytes)

    @property
    def usable(self) -> bool:
        return (not self.closed and not self.goaway
                and len(self.calls) < self.h2.remote_max_streams())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.members.add(self)
        self.pool.pools.register(self.pool)
        self.pool.pools.sweeper.watched.add(self)
        self.flush()

    def data_received(self, data: bytes) -> None:
        h2 = self.h2
        calls = self.calls
        pump_all = False
        for event in h2.receive(data):
            kind = event[0]
            call = calls.get(event[1])
            if kind == DATA:
                if call is not None:
                    call.response_data(event[2], len(event[2]))
                else:
                    h2.consume(event[1], len(event[2]))
            elif kind == HEADERS:
                fields = event[2]
                if fields and fields[0][0] == b":status" and fields[0][1][:1] == b"1":
                    self.count_control()  # an interim head: relayed nowhere, asks for work
                elif call is not None:  # END_STREAM on the head: a trailers-only response
                    call.headers_received(fields, event[3])
            elif kind == END:
                if call is not None:
                    call.finish(None)
            elif kind == RESET:
                if call is not None:
                    call.backend_lost("the sandbox reset the call")
            elif kind == CLOSED:
                self.library_closed(event[1])
            elif kind == WINDOW:
                if event[1]:
                    if call is not None:
                        call.pump()
                else:
                    pump_all = True  # once, after the batch: not once per frame
            elif kind in (PING, SETTINGS, PRIORITY, UNKNOWN, EMPTY):
                self.count_control()
            elif kind == GOAWAY:  # graceful or not: no new calls here
                self.count_control()
                self.goaway = True
                if self.pool.multiplexed is self:
                    self.pool.multiplexed = None
                last = event[1]
                for stream_id, each in list(calls.items()):
                    if stream_id > last:  # never processed by the backend
                        each.backend_lost("the sandbox is going away")
                if event[2] != ErrorCodes.NO_ERROR:
                    self.write_now()
                    self.abort()
                    return
            elif kind == FATAL:
                log.info("HTTP/2 protocol error from backend %s:%s of %s: %s", self.pool.host,
                         self.pool.port, self.pool.sandbox_id, event[3])
                h2.goaway(event[2])
                self.write_now()
                self.abort()
                return
            if self.closed:
                return
        if pump_all:
            for each in list(calls.values()):
                each.pump()
        self.flush()

    def library_closed(self, stream_id: int) -> None:
        """The library closed a stream. A call still on it was reset by the library itself (a
        malformed response)."""
        call = self.calls.get(stream_id)
        if call is not None:
            call.backend_lost("the sandbox sent an invalid response")

    def count_control(self) -> None:
        now = self.pool.pools.loop.time()
        if now - self.window_start >= 1.0:
            self.window_start = now
            self.control_frames = 0
        self.control_frames += 1
        if self.control_frames > self.pool.pools.max_control_frames and not self.closed:
            log.warning("gRPC backend %s:%s of %s: control frame flood; GOAWAY ENHANCE_YOUR_CALM",
                        self.pool.host, self.pool.port, self.pool.sandbox_id)
            self.h2.goaway(ErrorCodes.ENHANCE_YOUR_CALM, -1, b"control_flood")
            self.write_now()
            self.abort()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.transport.get_write_buffer_size() > OUTPUT_LIMIT:
            self.not_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False

    def not_reading(self) -> None:
        """What the backend asked for (PING and SETTINGS acknowledgements) piles up unread."""
        if not self.closed:
            log.warning("gRPC backend %s:%s of %s does not read what it asks for; cut",
                        self.pool.host, self.pool.port, self.pool.sandbox_id)
            self.abort()

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
        """Write what the calls produced at the end of this turn of the event loop: every call
        started, fed or acknowledged in one turn goes out in one write."""
        if not self.write_due:
            self.write_due = True
            self.pool.pools.loop.call_soon(self.write_now)

    def write_now(self) -> None:
        self.write_due = False
        if self.closed:
            return
        h2 = self.h2
        data = h2.send()
        if data:
            self.transport.write(data)
            if self.writing_paused and self.transport.get_write_buffer_size() > OUTPUT_LIMIT:
                self.not_reading()
                return
        later = h2.later()
        if later is not None:  # streams the library closed while sending
            for event in later:
                self.library_closed(event[1])
        if not h2.want():  # a protocol error the library answered with GOAWAY, or all done
            self.closed = True
            self.transport.close()

    def call_done(self, call: GrpcCall) -> None:
        if call.unacked:  # received while the client's window was shut: the connection's window
            self.h2.consume(call.stream_id, call.unacked)  # gets them back, or shrinks for good
            call.unacked = 0
            self.flush()
        if self.calls.get(call.stream_id) is call:
            del self.calls[call.stream_id]
            if not self.calls:
                if self.goaway:  # the backend's graceful GOAWAY: its last call is done
                    self.write_now()
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
