"""The proxy's h2c connection to a sandbox's gRPC server (proxy/grpc_upstream.py) against clients
that stop reading and servers that misbehave: whatever one call or one sandbox does, the shared
connection keeps its windows, its stream slots and its bounds, so later calls still go through.

Real grpcio servers where the behaviour is reachable with one (tests/support/grpc_backend.py);
raw h2c servers writing frames by hand where no well-behaved server would do it.
"""

from __future__ import annotations

import asyncio
import struct

import hpack
import pytest
from h2.settings import SettingCodes

from support.grpc_backend import GrpcBackend
from support.grpc_client import Echo, proxy_channel
from support.h2_client import H2Client, request_fields, serve_on
from support.process import free_port, standard_registry
from support.raw_http import fetch

pytestmark = pytest.mark.timeout(120)

PORT = 50051
AUTHORITY = f"{PORT}-grpc.localhost"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def message(payload: bytes) -> bytes:
    return b"\0" + struct.pack("!I", len(payload)) + payload


def grpc_fields(path: str) -> list:
    return request_fields(AUTHORITY, path, "POST", extra=[("content-type", "application/grpc"),
                                                          ("te", "trailers")])


def grpc_status(r) -> bytes | None:
    """grpc-status of a response: in its trailers, or in its head (trailers-only)."""
    for name, value in [*(r.trailers or []), *r.headers]:
        if name == b"grpc-status":
            return value
    return None


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack("!I", sid) + payload


def frames_of(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each whole frame in `data` (after the preface)."""
    out, i = [], 0
    while i + 9 <= len(data):
        size = int.from_bytes(data[i:i + 3], "big")
        out.append((data[i + 3], data[i + 4], int.from_bytes(data[i + 5:i + 9], "big") & 0x7FFFFFFF,
                    data[i + 9:i + 9 + size]))
        i += 9 + size
    return out


class RawH2Server:
    """An h2c "gRPC server" written by hand (`handle`, served by serve_on): `respond(sid)` gives
    the frames it writes for each request stream it sees. Everything the proxy sent it is kept in
    `received`."""

    def __init__(self, respond, max_streams: int = 100):
        self.respond = respond
        self.max_streams = max_streams
        self.received = b""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        settings = struct.pack("!HI", SettingCodes.MAX_CONCURRENT_STREAMS, self.max_streams)
        writer.write(frame(4, 0, 0, settings))
        buffered, answered = b"", set()
        while chunk := await reader.read(65536):
            self.received += chunk
            buffered += chunk
            start = len(PREFACE) if buffered.startswith(PREFACE) else 0
            for kind, flags, sid, _ in frames_of(buffered[start:]):
                if kind == 4 and not flags & 1:
                    writer.write(frame(4, 1, 0))  # SETTINGS ACK
                if kind == 1 and sid not in answered:
                    answered.add(sid)
                    writer.write(self.respond(sid))
            buffered = b""  # the proxy's frames arrive whole in these small tests
            await writer.drain()


def proxy_with(proxy, backend, refused_port, port: int):
    registry = standard_registry(backend.port, refused_port)
    registry["grpc"] = {"host": "127.0.0.1", "ports": {PORT: port}}
    return proxy(sandboxes=registry)


async def test_calls_cancelled_while_their_client_does_not_read_give_the_window_back(
        proxy, backend, refused_port):
    """Eighteen calls answered with 1.5 MB each, whose clients never read (their window is 1
    byte), fill the backend connection's 16 MiB window with bytes the proxy cannot deliver; the
    clients then cancel. Those bytes are given back to the shared connection's window, so a later
    call on it still receives its 3 MB."""
    grpc_backend = GrpcBackend().start()
    try:
        p = proxy_with(proxy, backend, refused_port, grpc_backend.port)
        clients = [await H2Client.open(p.port, settings={SettingCodes.INITIAL_WINDOW_SIZE: 1},
                                       auto_window=False) for _ in range(18)]
        sids = []
        for c in clients:
            sid = c.start(grpc_fields("/test.Echo/Unary"), end_stream=False)
            await c.send_data(sid, message(b"u" * 1_500_000), end_stream=True)
            sids.append(sid)
        await asyncio.sleep(2)  # the backend sends until the windows are full
        for c, sid in zip(clients, sids, strict=True):
            c.reset(sid)
            await c.close()

        def later_call() -> bytes:
            with proxy_channel(p.port, AUTHORITY) as channel:
                return Echo(channel).unary(b"v" * 3_000_000, timeout=20)
        assert await asyncio.to_thread(later_call) == b"v" * 3_000_000
    finally:
        grpc_backend.stop()


async def test_a_server_ending_calls_before_their_requests_does_not_use_up_its_streams(
        proxy, backend, refused_port):
    """A server that answers each call completely (trailers, END_STREAM) while the request is
    still open, and never resets it: the proxy closes its side of each such stream, so with the
    server's limit at 4 concurrent streams, 12 calls one after the other all get answered."""
    encoder = hpack.Encoder()

    def respond(sid: int) -> bytes:
        head = encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
        trailers = encoder.encode([("grpc-status", "0")])
        return (frame(1, 4, sid, head) + frame(0, 0, sid, message(b"early"))
                + frame(1, 5, sid, trailers))

    server, port = RawH2Server(respond, max_streams=4), free_port()
    async with serve_on(port, server.handle):
        p = proxy_with(proxy, backend, refused_port, port)
        async with await H2Client.open(p.port) as c:
            for i in range(12):
                sid = c.start(grpc_fields("/test.Echo/Chat"), end_stream=False)
                await c.send_data(sid, message(b"still sending %d" % i))  # no END_STREAM
                r = await c.response(sid, timeout=5)
                assert r.status == 200 and grpc_status(r) == b"0", (i, r.describe())
        resets = [(sid, payload) for kind, _, sid, payload in frames_of(
            server.received[len(PREFACE):]) if kind == 3]
        assert len(resets) >= 12, resets


async def test_a_server_flooding_control_frames_is_cut(proxy, backend, refused_port):
    """A server that answers a call's head and then sends PINGs without end: past
    http2_max_control_frames in a second its connection gets GOAWAY ENHANCE_YOUR_CALM and is
    closed; the call ends UNAVAILABLE, and the proxy goes on serving."""
    encoder = hpack.Encoder()

    def respond(sid: int) -> bytes:
        head = encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
        return frame(1, 4, sid, head) + b"".join(
            frame(6, 0, 0, struct.pack("!Q", i)) for i in range(3000))

    server, port = RawH2Server(respond), free_port()
    async with serve_on(port, server.handle):
        p = proxy_with(proxy, backend, refused_port, port)
        async with await H2Client.open(p.port) as c:
            sid = c.start(grpc_fields("/test.Echo/Unary"), end_stream=False)
            await c.send_data(sid, message(b"x"), end_stream=True)
            r = await c.response(sid, timeout=10)
            assert r.status == 200 and grpc_status(r) == b"14", r.describe()
        goaways = [payload for kind, _, _, payload in frames_of(server.received[len(PREFACE):])
                   if kind == 7]
        assert goaways, "no GOAWAY to the flooding server"
        code = int.from_bytes(goaways[-1][4:8], "big")
        assert code == 0xB and goaways[-1][8:] == b"control_flood", goaways[-1]
        assert p.alive(), p.stderr()[-2000:]
        assert (await fetch(p, "/echo?after-flood")).status == 200
