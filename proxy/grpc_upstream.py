"""gRPC to sandboxes: native gRPC calls go to the backend over cleartext HTTP/2 (h2c).

gRPC needs HTTP/2 end to end (trailers carry its status), so a request from an HTTP/2 client
whose Content-Type is `application/grpc` or `application/grpc+...` (not gRPC-Web, which is
HTTP/1.1-compatible and takes the ordinary path) is admitted like any other request
(proxy/admission.py builds the head the backend may see) and then sent as one stream of a
`GrpcBackend`: one multiplexed h2c connection per backend address, kept in that address's
`UpstreamPool` (proxy/pools.py) and closed with it when the sandbox is removed.

Each call is a `GrpcCall` (proxy/grpc_call.py), which joins the client's stream and the
backend's; this module owns the connection (its frames, GOAWAY, idle close) and starting calls
on it. A backend connection that dies ends every call on it with `grpc-status: 14`
(UNAVAILABLE), which gRPC clients know how to retry, instead of a bare reset.
"""

from __future__ import annotations

import asyncio
import logging
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

from proxy.flow import WAITING_UPSTREAM
from proxy.grpc_call import GrpcCall
from proxy.h2_connection import H2Connection

if TYPE_CHECKING:
    from proxy.h2_exchange import H2Exchange
    from proxy.pools import UpstreamPool

log = logging.getLogger("sandbox_proxy.grpc")

WINDOW = 1 << 20  # what the backend may send ahead, per call and (x16) per connection


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
            self.write_now()
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
                    self.write_now()
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
        """Write what the calls produced at the end of this turn of the event loop: every call
        started, fed or acknowledged in one turn goes out in one write."""
        if not self.write_due:
            self.write_due = True
            self.pool.pools.loop.call_soon(self.write_now)

    def write_now(self) -> None:
        self.write_due = False
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def call_done(self, call: GrpcCall) -> None:
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
