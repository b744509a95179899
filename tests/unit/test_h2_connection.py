"""The HTTP/2 edge through fake transports: a real client-side h2 connection speaks to the real
Http2Connection (proxy/h2_edge.py), streams and exchanges, with real UpstreamConnections on
fake transports as the backends. Ordering and accounting bugs show here in milliseconds; what
only real sockets and clients show is in tests/e2e/test_http2*.py."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)

from proxy.h2_edge import Http2Connection

from .fakes import HOST, expire, open_edge, response, tick

AUTHORITY = HOST


class Client:
    """The client's side: an h2 client connection, fed what the proxy wrote."""

    def __init__(self, edge) -> None:
        self.edge = edge
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.seen = 0
        edge.send(self.h2.data_to_send())  # the preface hands the socket to Http2Connection
        assert isinstance(edge.transport.protocol, Http2Connection)
        self.conn: Http2Connection = edge.transport.protocol

    def send(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.conn.data_received(data)

    async def events(self) -> list:
        await tick()  # the proxy writes once per loop turn
        data = self.edge.transport.data[self.seen:]
        self.seen += len(data)
        events = self.h2.receive_data(data) if data else []
        self.send()  # acknowledgements
        return events

    def get(self, path: str = "/", end: bool = True, extra=()) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(b":method", b"GET" if end else b"POST"),
                                   (b":scheme", b"http"), (b":path", path.encode()),
                                   (b":authority", AUTHORITY), *extra], end_stream=end)
        self.send()
        return sid


async def test_preface_hands_over_and_a_stream_is_proxied(tmp_path):
    """A stream is an ordinary request to the HTTP/1.1 backend, and its answer comes back as
    HEADERS + DATA carrying END_STREAM; the exchange is accounted once, as h2."""
    e = open_edge(tmp_path)
    (b,) = e.seed()
    c = Client(e)
    await c.events()
    sid = c.get("/x")
    head = b.transport.data
    assert head.startswith(b"GET /x HTTP/1.1\r\nHost: 3000-demo.localhost\r\n"), head
    b.send(response(body=b"hello"))
    events = await c.events()
    kinds = [type(ev) for ev in events if getattr(ev, "stream_id", None) == sid]
    assert kinds[:1] == [ResponseReceived] and StreamEnded in kinds
    assert b"".join(ev.data for ev in events if isinstance(ev, DataReceived)) == b"hello"
    assert [r["http"] for r in e.records] == ["h2"]
    assert e.ctx.stats.h2_streams == 1


async def test_request_body_credit_waits_for_the_backend(tmp_path):
    """While the backend's socket is full, body bytes are not acknowledged (no WINDOW_UPDATE for
    the stream); once it drains, they are: the client can never have more than its window of
    body in the proxy."""
    e = open_edge(tmp_path, {"limits": {"http2_stream_window": 65535}})
    (b,) = e.seed()
    c = Client(e)
    await c.events()
    sid = c.get("/up", end=False, extra=[(b"content-length", b"100000")])
    b.transport.fill()  # the backend reads no more
    b.up.pause_writing()
    for _ in range(4):
        c.h2.send_data(sid, b"x" * 15000)
    c.send()
    updates = [ev for ev in await c.events()
               if isinstance(ev, WindowUpdated) and ev.stream_id == sid]
    assert updates == []
    b.transport.drain()
    b.up.resume_writing()
    updates = [ev for ev in await c.events()
               if isinstance(ev, WindowUpdated) and ev.stream_id == sid]
    assert updates and sum(u.delta for u in updates) >= 60000 - 32768


async def test_ping_flood_gets_enhance_your_calm(tmp_path):
    """More control frames in a second than [limits] http2_max_control_frames: GOAWAY
    ENHANCE_YOUR_CALM, and the connection is closing."""
    e = open_edge(tmp_path, {"limits": {"http2_max_control_frames": 20}})
    c = Client(e)
    await c.events()
    for i in range(30):
        c.h2.ping(b"%08d" % i)
    c.send()
    events = await c.events()
    goaway = [ev for ev in events if isinstance(ev, ConnectionTerminated)]
    assert goaway and goaway[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert {k: n for k, n in e.ctx.stats.h2_goaways.items() if n} == {"control_flood": 1}
    assert c.conn.closing


async def test_a_response_never_given_a_window_is_reset(tmp_path):
    """A client that never opens its window gets RST_STREAM CANCEL when the stall deadline
    passes; the backend connection still sending is closed, and the exchange is logged as
    stalled."""
    e = open_edge(tmp_path, {"timeouts": {"client_send": 5.0}})
    (b,) = e.seed()
    c = Client(e)
    c.h2.update_settings({4: 0})  # SETTINGS_INITIAL_WINDOW_SIZE = 0: nothing may be sent
    c.send()
    await c.events()
    sid = c.get("/")
    b.send(response(body=b"x" * 1000, length=False, headers=[("Content-Length", "100000")]))
    await c.events()
    stream = c.conn.streams[sid]
    assert stream.blocked_since and c.conn.deadline
    stream.blocked_since -= 10  # as if client_send had passed
    expire(c.conn)
    resets = [ev for ev in await c.events() if isinstance(ev, StreamReset)]
    assert [(r.stream_id, r.error_code) for r in resets] == [(sid, ErrorCodes.CANCEL)]
    assert [r["outcome"] for r in e.records] == ["client_stalled"]
    assert b.up.closed


async def test_drain_lets_the_stream_under_way_finish(tmp_path):
    """Draining: GOAWAY NO_ERROR naming the stream under way, which still gets its answer; a
    stream opened after it is refused; the socket closes after the last answer."""
    e = open_edge(tmp_path)
    (b,) = e.seed()
    c = Client(e)
    await c.events()
    sid = c.get("/slow")
    e.ctx.draining = True
    c.conn.drain()
    events = await c.events()
    goaway = [ev for ev in events if isinstance(ev, ConnectionTerminated)]
    assert goaway and goaway[0].error_code == ErrorCodes.NO_ERROR
    assert goaway[0].last_stream_id == sid
    b.send(response(body=b"done"))
    await tick()
    assert not c.conn.streams and c.conn.closing
    data = e.transport.data
    assert b"done" in data
