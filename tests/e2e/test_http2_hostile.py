"""Hostile HTTP/2 clients against the real proxy process: rapid reset, CONTINUATION flood, HPACK
bomb, oversized header lists, floods of control frames, a PING flood from a client that never
reads, more streams than allowed, a client that never opens its window.

Each attack is written frame by frame (tests/support/h2_client.py's FrameConn, hyperframe and
hpack on a raw socket) and must end in the answer README's "Bounds on a hostile HTTP/2 client"
promises: GOAWAY or RST_STREAM with the right error code (or the proxy's 431), nothing of it
reaching a backend, and the proxy healthy afterwards: a normal HTTP/2 and HTTP/1.1 request are
served, its RSS did not grow with the attack, and its open fds and connection gauges return to
the baseline taken before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import sys

import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack.hpack import encode_integer
from hyperframe.frame import HeadersFrame, PingFrame, PriorityFrame

from support.backends import det_bytes
from support.h2_client import (
    FrameConn,
    GoAwayFrame,
    H2Client,
    RssPeak,
    request_fields,
)
from support.h2_health import assert_healthy, baseline_of
from support.process import REPO_ROOT, launch_proxy, wait_until
from support.raw_http import metric_value
from support.recording_backend import RecordingFleet

sys.path.insert(0, str(REPO_ROOT))

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
MAX_STREAMS = 32       # [limits] http2_max_streams of the module's proxy
CONTROL_LIMIT = 1000   # [limits] http2_max_control_frames (the default)
CLIENT_SEND = 1.0      # [timeouts] client_send of the module's proxy
ATTACK_RSS = 24 * MiB  # what the proxy's RSS may grow by while an attack runs
DEMO = "3000-demo.localhost"
REC = "3000-rec.localhost"


@pytest.fixture(scope="module")
def rec(fleet):
    """A recording backend (every byte kept): proof that an attack reached no sandbox."""
    return fleet.add("h2hostile")


@pytest.fixture(scope="module")
def edge(tmp_path_factory, backend, rec):
    p = launch_proxy(
        tmp_path_factory.mktemp("h2-hostile"),
        {"demo": {"host": "127.0.0.1", "ports": {3000: backend.port}},
         "rec": {"host": "127.0.0.1", "ports": {3000: rec.port}}},
        config={"timeouts": {"client_send": CLIENT_SEND},
                "limits": {"http2_max_streams": MAX_STREAMS}})
    yield p
    p.stop()


async def goaways(p, reason: str) -> float:
    return await metric_value(p, "sandbox_proxy_h2_goaways_total", reason=reason) or 0.0


def nothing_reached(fleet: RecordingFleet, rec) -> None:
    fleet.quiet()
    assert rec.bytes_received() == 0, rec.raw()[:300]


@contextlib.asynccontextmanager
async def frames(port: int, **kw):
    f = await FrameConn.open(port, **kw)
    try:
        yield f
    finally:
        await f.aclose()


# --------------------------------------------------------------------------------------------
# Resets and header blocks
# --------------------------------------------------------------------------------------------


async def test_rapid_reset_gets_enhance_your_calm(edge):
    """Rapid reset (CVE-2023-44487): streams opened and reset before their answer, far more than
    2 x http2_max_streams in a second, end the connection with GOAWAY ENHANCE_YOUR_CALM. A
    client cancelling a few requests is not punished."""
    probe, base = await baseline_of(edge)
    before = await goaways(edge, "rapid_reset")
    async with RssPeak(edge.rss) as rss, frames(edge.port) as f:
        for _ in range(10):  # a few cancellations: an ordinary client
            sid = f.new_stream()
            f.send(f.headers(sid, request_fields(DEMO, "/slow-head?delay=5")), f.rst(sid))
        sid = f.new_stream()
        f.send(f.headers(sid, request_fields(DEMO, "/echo?after-cancels")))
        await f.until(lambda fr: f.status(sid) is not None or isinstance(fr, GoAwayFrame))
        assert f.status(sid) == 200 and not f.goaways()
        # in several writes: the backend connections these requests open complete while the
        # next ones arrive (connections made for a request already gone must still be pooled
        # where later requests find them, or released: the fd check below)
        for _ in range(2):
            attack = []
            for _ in range(3 * MAX_STREAMS // 2):
                sid = f.new_stream()
                attack += [f.headers(sid, request_fields(DEMO, "/slow-head?delay=5")),
                           f.rst(sid)]
            f.send(*attack)
            await f.drain()
        g = await f.goaway()
        assert g is not None, "no GOAWAY after a rapid reset"
        assert g.error_code == ErrorCodes.ENHANCE_YOUR_CALM and g.additional_data == b"rapid_reset"
        assert await f.closed(5)
    assert await goaways(edge, "rapid_reset") == before + 1
    assert rss.growth < ATTACK_RSS
    await assert_healthy(edge, probe, base)


async def test_continuation_flood_is_cut(edge, fleet, rec):
    """A HEADERS frame without END_HEADERS followed by endless CONTINUATION frames is cut after
    a bounded number of frames with GOAWAY PROTOCOL_ERROR; no request reaches the backend."""
    probe, base = await baseline_of(edge)
    fleet.reset()
    filler = b"\x00" * 1024  # never decoded: the block never ends
    async with RssPeak(edge.rss) as rss, frames(edge.port) as f:
        sid = f.new_stream()
        f.send(f.headers(sid, request_fields(REC, "/m/cont1x/"), end_headers=False))
        closed = asyncio.ensure_future(f.closed(30))
        sent = 0
        while not closed.done() and sent < 20_000:
            f.send(*[f.continuation(sid, filler) for _ in range(20)])
            sent += 20
            if not await f.drain():
                break
            await asyncio.sleep(0)
        assert await asyncio.wait_for(closed, 30), "the connection was never closed"
    assert sent < 2_000, f"{sent} CONTINUATION frames were taken before the cut"
    [g] = f.goaways()
    assert g.error_code == ErrorCodes.PROTOCOL_ERROR
    assert rss.growth < ATTACK_RSS
    nothing_reached(fleet, rec)
    await assert_healthy(edge, probe, base)


def bomb_block(f: FrameConn, value_size: int, references: int) -> bytes:
    """A request whose header block adds one big field to the HPACK dynamic table (literal with
    incremental indexing) and then refers to it `references` times (one byte each)."""
    name, value = b"x-bomb", b"v" * value_size
    literal = (b"\x40" + bytes(encode_integer(len(name), 7)) + name
               + bytes(encode_integer(len(value), 7)) + value)
    # the new entry is dynamic index 62 (the static table has 61): 0x80 | 62
    return f.header_block(request_fields(REC, "/m/bomb1x/")) + literal + b"\xbe" * references


def header_frames(sid: int, block: bytes, end_stream: bool = True) -> list:
    """A header block as HEADERS plus CONTINUATION frames of at most 16 KiB."""
    pieces = [block[i:i + 16384] for i in range(0, len(block), 16384)] or [b""]
    first = HeadersFrame(sid, data=pieces[0])
    if end_stream:
        first.flags.add("END_STREAM")
    out = [first]
    out += [FrameConn.continuation(sid, piece) for piece in pieces[1:]]
    out[-1].flags.add("END_HEADERS")
    return out


async def test_hpack_bomb_is_refused(edge, fleet, rec):
    """An HPACK bomb (a 4 KB field put in the dynamic table, then referenced 16,000 times: 64 MB
    of headers from a 20 KB block) is refused once the decoded list passes max_header_bytes:
    GOAWAY ENHANCE_YOUR_CALM, no memory spent on it, nothing sent to the backend."""
    probe, base = await baseline_of(edge)
    fleet.reset()
    async with RssPeak(edge.rss) as rss, frames(edge.port) as f:
        sid = f.new_stream()
        f.send(*header_frames(sid, bomb_block(f, 4000, 16_000)))
        g = await f.goaway()
        assert g is not None and g.error_code == ErrorCodes.ENHANCE_YOUR_CALM, f.received
        assert f.status(sid) is None
        assert await f.closed(5)
    assert rss.growth < ATTACK_RSS, f"proxy RSS grew by {rss.growth / MiB:.1f} MiB"
    nothing_reached(fleet, rec)
    await assert_healthy(edge, probe, base)


async def test_oversized_header_lists(edge, fleet, rec):
    """A header list over max_header_bytes (100 KB across HEADERS and CONTINUATION frames) ends
    the connection with GOAWAY ENHANCE_YOUR_CALM and reaches no backend; one within it (60 KB)
    is served; more fields than max_header_count get 431 on their stream alone, the connection
    goes on."""
    probe, base = await baseline_of(edge)
    fleet.reset()
    big = [(f"x-big-{i}", "v" * 1000) for i in range(100)]
    async with frames(edge.port) as f:
        sid = f.new_stream()
        f.send(*header_frames(sid, f.header_block(request_fields(REC, "/m/big1x/", extra=big))))
        g = await f.goaway()
        assert g is not None and g.error_code == ErrorCodes.ENHANCE_YOUR_CALM, f.received
        assert f.status(sid) is None
    nothing_reached(fleet, rec)
    async with frames(edge.port) as f:
        fits = f.new_stream()
        f.send(*header_frames(fits, f.header_block(request_fields(REC, "/m/fits1x/",
                                                                  extra=big[:60]))))
        many = f.new_stream()
        f.send(*header_frames(many, f.header_block(request_fields(
            REC, "/m/many1x/", extra=[(f"x-n{i}", "1") for i in range(201)]))))
        after = f.new_stream()
        f.send(f.headers(after, request_fields(DEMO, "/echo?after-431")))
        await f.until(lambda fr: all(f.status(s) is not None for s in (fits, many, after))
                      or isinstance(fr, GoAwayFrame))
        assert (f.status(fits), f.status(many), f.status(after)) == (200, 431, 200)
        assert not f.goaways()
    fleet.quiet()
    assert [r.marker for r in rec.requests()] == ["fits1x"]
    await assert_healthy(edge, probe, base)


# --------------------------------------------------------------------------------------------
# Floods of frames that ask for work without carrying a request
# --------------------------------------------------------------------------------------------


def unknown_frame(i: int) -> bytes:
    payload = struct.pack("!Q", i)
    return struct.pack("!I", len(payload))[1:] + b"\xf0\x00" + struct.pack("!I", 0) + payload


FLOODS = ["ping", "settings", "window_update", "priority", "empty_data", "unknown"]


@pytest.mark.parametrize("kind", FLOODS)
async def test_control_frame_flood_gets_enhance_your_calm(edge, kind):
    """More than http2_max_control_frames PING / SETTINGS / WINDOW_UPDATE / PRIORITY / empty
    DATA / unknown frames in a second end the connection with GOAWAY ENHANCE_YOUR_CALM
    (control_flood)."""
    probe, base = await baseline_of(edge)
    before = await goaways(edge, "control_flood")
    n = CONTROL_LIMIT * 3 // 2
    async with RssPeak(edge.rss) as rss, frames(edge.port) as f:
        if kind == "ping":
            f.send(*[f.ping(struct.pack("!Q", i)) for i in range(n)])
        elif kind == "settings":
            f.send(*[f.settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535}) for _ in range(n)])
        elif kind == "window_update":
            f.send(*[f.window_update(0, 1) for _ in range(n)])
        elif kind == "priority":
            f.send(*[PriorityFrame(1, depends_on=0, stream_weight=i % 256)
                     for i in range(n)])
        elif kind == "empty_data":
            sid = f.new_stream()
            f.send(f.headers(sid, request_fields(DEMO, "/upload", "POST"), end_stream=False))
            f.send(*[f.data(sid, b"") for _ in range(n)])
        else:
            f.write(b"".join(unknown_frame(i) for i in range(n)))
        g = await f.goaway()
        assert g is not None, f"no GOAWAY after {n} {kind} frames"
        assert g.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert g.additional_data == b"control_flood"
        assert await f.closed(5)
    assert await goaways(edge, "control_flood") == before + 1
    assert rss.growth < ATTACK_RSS
    await assert_healthy(edge, probe, base)


async def test_pings_under_the_limit_are_answered(edge):
    """The control-frame bound is a rate, not a ban: half the limit of PINGs in a burst are all
    acknowledged (with their payloads) and the connection still serves a request."""
    async with frames(edge.port) as f:
        n = CONTROL_LIMIT // 2
        f.send(*[f.ping(struct.pack("!Q", i)) for i in range(n)])
        acks: list[bytes] = []
        while len(acks) < n:
            fr = await f.read_frame()
            assert fr is not None and not isinstance(fr, GoAwayFrame), fr
            if isinstance(fr, PingFrame) and "ACK" in fr.flags:
                acks.append(fr.opaque_data)
        assert acks == [struct.pack("!Q", i) for i in range(n)]
        sid = f.new_stream()
        f.send(f.headers(sid, request_fields(DEMO, "/echo?after-pings")))
        await f.until(lambda fr: f.status(sid) is not None or isinstance(fr, GoAwayFrame))
        assert f.status(sid) == 200 and not f.goaways()


async def test_ping_flood_from_a_client_that_never_reads(proxy, backend):
    """A client that floods PINGs and never reads their acknowledgements (the control-frame rate
    raised to its maximum, so only the output bound can stop it; one stream open, so the idle
    timeout cannot either) is cut once the unread acknowledgements pass the output bound
    (4 MiB): the proxy neither keeps queueing them nor grows its memory."""
    p = proxy(config={"limits": {"http2_max_control_frames": 1_000_000}})
    probe, base = await baseline_of(p)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # we will not read
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", p.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    f = FrameConn(reader, writer)
    f.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + f.settings().serialize())
    sid = f.new_stream()
    f.send(f.headers(sid, request_fields(DEMO, "/slow-head?delay=60")))
    batch = f.ping().serialize() * 4096  # 68 KiB of PINGs
    sent = 0
    cut = False
    async with RssPeak(p.rss) as rss:
        while sent < 64 * MiB:
            try:
                f.write(batch)
                cut = not await f.drain(30)
            except TimeoutError:
                pytest.fail(f"the proxy stopped reading after {sent / MiB:.1f} MiB of PINGs "
                            "without cutting the connection")
            if cut:
                break
            sent += len(batch)
    await f.aclose()
    assert cut, (f"{sent / MiB:.0f} MiB of PINGs sent without reading a byte, and the "
                 f"connection was not cut (proxy RSS +{rss.growth / MiB:.1f} MiB)")
    assert rss.growth < ATTACK_RSS, f"proxy RSS grew by {rss.growth / MiB:.1f} MiB"

    async def counted() -> bool:
        return await goaways(p, "not_reading") >= 1
    await wait_until(counted, timeout=5)
    await assert_healthy(p, probe, base)


# --------------------------------------------------------------------------------------------
# Streams: too many at once, and a response nobody reads
# --------------------------------------------------------------------------------------------


async def test_streams_beyond_the_limit_are_refused_alone(edge):
    """A stream opened beyond SETTINGS_MAX_CONCURRENT_STREAMS (the client has our SETTINGS) is
    refused on its own, RST_STREAM REFUSED_STREAM (config/proxy.toml; RFC 9113 5.1.2: a stream
    error), while the streams within the limit are answered and the connection goes on."""
    probe, base = await baseline_of(edge)
    async with frames(edge.port) as f:
        assert f.server_settings[SettingCodes.MAX_CONCURRENT_STREAMS] == MAX_STREAMS
        within = [f.new_stream() for _ in range(MAX_STREAMS)]
        f.send(*[f.headers(s, request_fields(DEMO, "/slow-head?delay=1")) for s in within])
        extra = [f.new_stream() for _ in range(3)]
        f.send(*[f.headers(s, request_fields(DEMO, "/echo?extra")) for s in extra])
        await f.until(lambda fr: all(s in f.resets() for s in extra)
                      or isinstance(fr, GoAwayFrame), timeout=10)
        assert not f.goaways(), (f"GOAWAY {f.goaways()[0].error_code}: one stream too many "
                                 f"ended the connection and its {MAX_STREAMS} streams")
        assert {s: f.resets()[s] for s in extra} == {s: ErrorCodes.REFUSED_STREAM
                                                     for s in extra}
        await f.until(lambda fr: all(f.status(s) is not None for s in within), timeout=15)
        assert [f.status(s) for s in within] == [200] * MAX_STREAMS
        again = f.new_stream()
        f.send(f.headers(again, request_fields(DEMO, "/echo?again")))
        await f.until(lambda fr: f.status(again) is not None or isinstance(fr, GoAwayFrame))
        assert f.status(again) == 200
    await assert_healthy(edge, probe, base)


@pytest.mark.parametrize("kind", ["http", "grpc"])
async def test_request_bodies_held_for_a_backend_never_reached_give_their_window_back(proxy,
                                                                                       kind):
    """Body bytes that arrive while the backend connection is still being made are held (not
    acknowledged). When the request then ends without them (the port refuses every connect
    attempt: 502, or gRPC UNAVAILABLE), they are given back to the connection's window: six such
    requests of 200 KiB each (more than the 1 MiB connection window), and an upload on the same
    connection still goes through."""
    p = proxy()
    extra = [("content-type", "application/grpc")] if kind == "grpc" else []
    async with await H2Client.open(p.port) as c:
        for i in range(6):
            sid = c.start(request_fields("3000-refused.localhost", f"/upload?n={i}", "POST",
                                         extra=extra), end_stream=False)
            await c.send_data(sid, b"x" * 200 * 1024, end_stream=True, timeout=5)
            r = await c.response(sid, timeout=10)
            assert r.status == (200 if kind == "grpc" else 502), r.describe()
        body = det_bytes(2 * MiB, seed=3)
        sid = c.start(request_fields(DEMO, "/upload", "POST"), end_stream=False)
        await c.send_data(sid, body, end_stream=True, timeout=5)
        r = await c.response(sid, timeout=10)
        assert r.status == 200, r.describe()


# Requests only the protocol library can find malformed, after the proxy admitted their head and
# started their exchange: each must end that exchange (and release its backend connection) at
# once, not when the client's connection closes.
LATE_MALFORMED = {
    # Content-Length against the DATA that follows (RFC 9113 8.1.1)
    "body_longer_than_content_length": ([("content-length", "5")], [b"0123456789"], None),
    "body_shorter_than_content_length": ([("content-length", "10")], [b"01234"], None),
    # trailers may not hold pseudo-headers or upper-case names (RFC 9113 8.1, 8.2.1)
    "pseudo_header_in_trailers": ([], [b"01234"], [(":path", "/x")]),
    "upper_case_trailer_name": ([], [b"01234"], [("X-Upper", "1")]),
}


@pytest.mark.parametrize("case", sorted(LATE_MALFORMED))
async def test_requests_malformed_after_their_head_end_alone(edge, case):
    """A request the library finds malformed only after its head was admitted (its body against
    its Content-Length, its trailers) gets RST_STREAM PROTOCOL_ERROR; its exchange ends then,
    while the client's connection is still open (requests_in_flight back to the baseline), and
    the connection's other streams go on."""
    extra, chunks, trailers = LATE_MALFORMED[case]
    probe, base = await baseline_of(edge)
    async with frames(edge.port) as f:
        sid = f.new_stream()
        f.send(f.headers(sid, request_fields(DEMO, "/upload", "POST", extra=extra),
                         end_stream=False))
        for i, chunk in enumerate(chunks):
            f.send(f.data(sid, chunk, end_stream=trailers is None and i == len(chunks) - 1))
        if trailers is not None:
            f.send(f.headers(sid, [(n.encode(), v.encode()) for n, v in trailers]))
        await f.until(lambda fr: sid in f.resets() or isinstance(fr, GoAwayFrame))
        assert f.resets().get(sid) == ErrorCodes.PROTOCOL_ERROR, (f.resets(), f.goaways())

        async def exchange_ended() -> bool:
            gauges = await probe.gauges()
            return gauges.get("requests_in_flight", 0) <= base.gauges.get("requests_in_flight", 0)
        await wait_until(exchange_ended, timeout=5)
        after = f.new_stream()
        f.send(f.headers(after, request_fields(DEMO, "/echo?after-malformed")))
        await f.until(lambda fr: f.status(after) is not None or isinstance(fr, GoAwayFrame))
        assert f.status(after) == 200 and not f.goaways()
    await assert_healthy(edge, probe, base)


@pytest.mark.parametrize("case", sorted(LATE_MALFORMED))
async def test_a_request_reset_after_its_head_never_shares_its_backend_connection(edge, fleet,
                                                                                  rec, case):
    """The backend connection that carried the head (and part of the body) of a request the
    library reset is never used again: it is closed with that request incomplete, and a later
    request to the same sandbox arrives on a connection of its own, whole, its bytes nowhere
    else (no later request can be read as the rest of the reset one's body)."""
    extra, chunks, trailers = LATE_MALFORMED[case]
    fleet.reset()
    async with frames(edge.port) as f:
        sid = f.new_stream()
        f.send(f.headers(sid, request_fields(REC, "/m/reset1x/", "POST", extra=extra),
                         end_stream=False))
        for i, chunk in enumerate(chunks):
            f.send(f.data(sid, chunk, end_stream=trailers is None and i == len(chunks) - 1))
        if trailers is not None:
            f.send(f.headers(sid, [(n.encode(), v.encode()) for n, v in trailers]))
        await f.until(lambda fr: sid in f.resets() or isinstance(fr, GoAwayFrame))
        assert f.resets().get(sid) == ErrorCodes.PROTOCOL_ERROR, (f.resets(), f.goaways())

        async def reset_connection_closed() -> bool:  # while the client's connection is open
            return all(c.closed for c in rec.snapshot() if b"/m/reset1x/" in c.raw)
        await wait_until(reset_connection_closed, timeout=5)
        after = f.new_stream()
        f.send(f.headers(after, request_fields(REC, "/m/after1x/", "POST",
                                               extra=[("content-length", "10")]),
                         end_stream=False), f.data(after, b"after-body", end_stream=True))
        await f.until(lambda fr: f.status(after) is not None or isinstance(fr, GoAwayFrame))
        assert f.status(after) == 200, f.resets()
    fleet.quiet()
    [later] = [r for r in rec.requests() if r.marker == "after1x"]
    assert later.body == b"after-body"
    for conn in rec.snapshot():
        if b"/m/reset1x/" in conn.raw:
            assert b"after1x" not in conn.raw and b"after-body" not in conn.raw, conn.raw
            assert all(r.marker == "reset1x" for r in conn.requests), conn.requests


async def test_response_never_given_a_window_is_reset_after_client_send(edge):
    """A client that never opens its window (SETTINGS_INITIAL_WINDOW_SIZE = 0) gets the head of
    its response and then, after [timeouts] client_send, RST_STREAM CANCEL; the connection and
    its other streams go on, the backend connection is released, and the access log says
    client_stalled."""
    probe, base = await baseline_of(edge)
    async with RssPeak(edge.rss) as rss:
        c = await H2Client.open(edge.port, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
        try:
            sid = c.start(request_fields(DEMO, "/bytes?n=4194304"))
            r = await c.response(sid, timeout=10 * CLIENT_SEND + 5)
            assert r.status == 200 and r.body == b"", r.describe()
            assert r.reset == ErrorCodes.CANCEL and not r.ended, r.describe()
            head = await c.request(DEMO, "/echo?still-open", "HEAD")
            assert head.status == 200 and head.ended and c.terminated is None
        finally:
            await c.close()
    assert rss.growth < ATTACK_RSS

    def stalled() -> list[dict]:
        return [json.loads(line) for line in edge.stdout().splitlines()
                if line.startswith("{") and json.loads(line).get("outcome") == "client_stalled"]

    async def logged() -> bool:
        return len(stalled()) == 1
    await wait_until(logged, timeout=5)
    assert stalled()[0]["http"] == "h2" and stalled()[0]["path"] == "/bytes"
    await assert_healthy(edge, probe, base)
