"""Random HTTP/2 frame sequences against the proxy's HTTP/2 core (libnghttp2 under the proxy's own
C module, proxy/_h2session.c) from both hostile sides: clients on the edge listener, and a
sandbox's "gRPC server" answering the proxy's h2c connection to it with whatever it likes.

Frames are generated, not picked: every frame type (and unknown ones), random flags, stream ids
(0, odd, even, huge), lengths that lie, PADDED with padding longer than the frame, HPACK blocks that
are valid, truncated, garbage or split over CONTINUATIONs, requests that are valid, malformed or
routed to a live sandbox (so some reach a backend and are then reset, left unread or fed more
DATA), settings and window updates at their limits. Whatever the sequence does to one connection,
the proxy must stay up, keep serving HTTP/1.1 and HTTP/2, and return to its baseline: no client
connection, request or stream held, no file descriptor kept, memory bounded.

Deterministic (seeded); ``SANDBOX_PROXY_FUZZ_EXAMPLES`` sets the number of sequences per side
(``make fuzz`` runs many more).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct

import hpack
import pytest

from support.h2_client import RssPeak, serve_on
from support.h2_health import DEMO, assert_healthy, baseline_of
from support.process import free_port, standard_registry

pytestmark = pytest.mark.timeout(600)

MiB = 1 << 20
EXAMPLES = int(os.environ.get("SANDBOX_PROXY_FUZZ_EXAMPLES", "120"))
AT_ONCE = 8  # connections in flight together
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, sid: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack("!I", size & 0xFFFFFF)[1:] + bytes([kind, flags]) + \
        struct.pack("!I", sid & 0xFFFFFFFF) + payload


def request_fields(rng: random.Random, authority: str) -> list[tuple[bytes, bytes]]:
    fields = [(b":method", rng.choice([b"GET", b"POST", b"CONNECT", b"HEAD", b"get"])),
              (b":scheme", b"http"),
              (b":authority", rng.choice([authority.encode(), b"3000-nope.localhost", b""])),
              (b":path", rng.choice([b"/echo", b"/upload", b"/bytes?n=200000", b"", b"*"]))]
    if rng.random() < 0.3:
        rng.shuffle(fields)  # pseudo-headers out of order, or after regular ones below
    extra = [(b"content-length", str(rng.choice([0, 5, 10, 100000])).encode()),
             (b"content-type", rng.choice([b"application/grpc", b"text/plain"])),
             (b"te", rng.choice([b"trailers", b"gzip"])), (b"X-Upper", b"1"),
             (b"host", rng.choice([authority.encode(), b"other.example"])),
             (b":protocol", b"websocket"), (b"cookie", b"a=1"), (b"x-long", b"v" * 5000),
             (b"connection", b"close"), (b":path", b"/again")]
    fields += rng.sample(extra, rng.randrange(0, 4))
    if rng.random() < 0.1:
        fields = fields[: rng.randrange(len(fields))]  # a pseudo-header missing
    return fields


def header_block(rng: random.Random, encoder: hpack.Encoder, authority: str,
                 response: bool = False) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        return rng.randbytes(rng.randrange(1, 40))  # garbage
    if response:
        fields = [(b":status", rng.choice([b"200", b"100", b"103", b"abc", b"404"])),
                  (b"content-type", b"application/grpc")]
        fields += rng.sample([(b"grpc-status", b"0"), (b"set-cookie", b"a=1; Domain=localhost"),
                              (b"connection", b"close"), (b"Upper", b"1"),
                              (b"content-length", b"3")], rng.randrange(0, 3))
        if rng.random() < 0.2:
            fields = fields[1:]  # no :status
    else:
        fields = request_fields(rng, authority)
    block = encoder.encode(fields)
    if roll < 0.2:
        block = block[: rng.randrange(len(block) + 1)]  # truncated
    return block


def random_frame(rng: random.Random, encoder: hpack.Encoder, authority: str,
                 streams: list[int], response: bool = False) -> bytes:
    """One frame, of any type, shape and truthfulness."""
    sid = rng.choice([*streams, 0, 0, 2, 0x7FFFFFFF, rng.randrange(1 << 31)])
    kind = rng.choices([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, rng.randrange(10, 256)],
                       weights=[14, 14, 3, 6, 5, 2, 4, 2, 6, 5, 3])[0]
    flags = rng.choice([0, 1, 4, 5, 8, 9, 0x20, 0x24, 0x25, rng.randrange(256)])
    if kind == 0:  # DATA
        payload = rng.randbytes(rng.choice([0, 1, 5, 100, 3000]))
    elif kind in (1, 9):  # HEADERS, CONTINUATION
        payload = header_block(rng, encoder, authority, response)
        if kind == 1 and flags & 0x20:  # PRIORITY fields
            payload = struct.pack("!IB", rng.choice([0, sid, 1]), rng.randrange(256)) + payload
    elif kind == 2:  # PRIORITY
        payload = struct.pack("!IB", rng.choice([0, sid, 3]), rng.randrange(256))
    elif kind in (3, 8):  # RST_STREAM, WINDOW_UPDATE
        payload = struct.pack("!I", rng.choice([0, 1, 8, 0x7FFFFFFF, 0xFFFFFFFF,
                                                rng.randrange(1 << 32)]))
    elif kind == 4:  # SETTINGS
        payload = b"".join(struct.pack("!HI", rng.randrange(0, 12),
                                       rng.choice([0, 1, 100, 16383, 16384, 1 << 24, 0x7FFFFFFF,
                                                   0xFFFFFFFF]))
                           for _ in range(rng.randrange(0, 4)))
    elif kind == 6:  # PING
        payload = rng.randbytes(8)
    elif kind == 7:  # GOAWAY
        payload = struct.pack("!II", rng.randrange(1 << 31), rng.randrange(16)) + \
            rng.randbytes(rng.randrange(0, 10))
    else:
        payload = rng.randbytes(rng.randrange(0, 50))
    if flags & 0x8 and kind in (0, 1) and rng.random() < 0.7:  # PADDED
        pad = rng.choice([0, 3, 255])
        payload = bytes([pad]) + payload + b"\0" * rng.choice([pad, 0])
    length = None
    roll = rng.random()
    if roll < 0.05:
        length = len(payload) + rng.choice([-1, 1, 20000])  # a length that lies
    elif roll < 0.07:
        payload = payload + b"\0" * 17000  # beyond SETTINGS_MAX_FRAME_SIZE
    return frame(kind, flags, sid, payload, length)


PATHS = [b"/echo", b"/upload", b"/bytes?n=300000", b"/slow-head?delay=1", b"/sse?n=3"]


def valid_frame(rng: random.Random, encoder: hpack.Encoder, authority: str, state: dict,
                response: bool) -> list[bytes]:
    """A well-formed frame (or HEADERS + CONTINUATION) that moves some stream along: most of a
    sequence is these, so that the random ones hit streams in every state."""
    open_ = state["open"]
    roll = rng.random()
    if response:  # the sandbox's side, answering stream 1 (and whatever else it likes)
        sid = rng.choice([1, 1, 1, 3])
        if roll < 0.3:
            fields = [(b":status", b"200"), (b"content-type", b"application/grpc")]
            return [frame(1, 4 | rng.choice([0, 0, 1]), sid, encoder.encode(fields))]
        if roll < 0.6:
            message = b"\0" + struct.pack("!I", 5) + b"hello"
            return [frame(0, rng.choice([0, 0, 1]), sid, message * rng.randrange(1, 4))]
        if roll < 0.75:
            return [frame(1, 5, sid, encoder.encode([(b"grpc-status", b"0")]))]
        if roll < 0.85:
            return [frame(8, 0, rng.choice([0, sid]), struct.pack("!I", rng.randrange(1, 1 << 20)))]
        return [frame(6, 0, 0, rng.randbytes(8))]
    if roll < 0.3 or not open_:  # a new request, sometimes its block split over CONTINUATION
        sid = state["next"]
        state["next"] += 2
        end = rng.random() < 0.4
        fields = [(b":method", b"GET" if end else b"POST"), (b":scheme", b"http"),
                  (b":authority", authority.encode()), (b":path", rng.choice(PATHS))]
        if not end and rng.random() < 0.5:
            fields.append((b"content-length", str(rng.choice([0, 5, 20])).encode()))
        block = encoder.encode(fields)
        if not end:
            open_.append(sid)
        if rng.random() < 0.2 and len(block) > 2:
            cut = rng.randrange(1, len(block))
            return [frame(1, int(end), sid, block[:cut]), frame(9, 4, sid, block[cut:])]
        return [frame(1, 4 | int(end), sid, block)]
    sid = rng.choice(open_)
    if roll < 0.6:
        end = rng.random() < 0.3
        if end:
            open_.remove(sid)
        return [frame(0, int(end), sid, rng.randbytes(rng.choice([0, 5, 15, 5000])))]
    if roll < 0.7:
        open_.remove(sid)
        return [frame(3, 0, sid, struct.pack("!I", 8))]  # RST_STREAM CANCEL
    if roll < 0.8:
        open_.remove(sid)
        return [frame(1, 5, sid, encoder.encode([(b"x-trailer", b"1")]))]  # trailers
    if roll < 0.9:
        return [frame(8, 0, rng.choice([0, sid]), struct.pack("!I", rng.randrange(1, 1 << 20)))]
    if roll < 0.95:
        return [frame(4, 0, 0, struct.pack("!HI", 4, rng.choice([0, 1, 65535, 1 << 20])))]
    return [frame(6, 0, 0, rng.randbytes(8))]


def sequence(rng: random.Random, authority: str, response: bool = False) -> list[bytes]:
    """Writes: a (mostly proper) preface, then frames: mostly well-formed ones moving streams
    along, with random ones (any type, shape and truthfulness) among them."""
    encoder = hpack.Encoder()
    state: dict = {"next": 1, "open": []}
    chaos = rng.choice([0.0, 0.05, 0.15, 0.5])  # the share of random frames
    writes = []
    if not response:
        writes.append(PREFACE if rng.random() > 0.03 else PREFACE[:-3] + b"XYZ")
    writes.append(frame(4, 0, 0, b""))  # SETTINGS
    for _ in range(rng.randrange(1, 40)):
        if rng.random() < chaos:
            streams = [state["next"] - 2, *state["open"]] if state["next"] > 1 else [1]
            writes.append(random_frame(rng, encoder, authority, streams, response))
        else:
            writes += valid_frame(rng, encoder, authority, state, response)
    return writes


async def client_example(port: int, seed: int) -> None:
    rng = random.Random(seed)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        writes = sequence(rng, DEMO)
        for chunk in writes:
            writer.write(chunk)
            if rng.random() < 0.3:
                await writer.drain()
                await asyncio.sleep(0)
        await writer.drain()
        if rng.random() < 0.5:
            writer.write_eof()
        # read whatever comes (or nothing: a reader that never reads is another example)
        if rng.random() < 0.8:
            await asyncio.gather(asyncio.wait_for(reader.read(1 << 20), timeout=0.3),
                                 return_exceptions=True)
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        if rng.random() < 0.5:
            writer.transport.abort()
        else:
            writer.close()


async def run_examples(p, example) -> int:
    """`example(port, seed)` for every seed, AT_ONCE connections at a time, the proxy alive after
    each batch; returns the proxy's RSS growth meanwhile."""
    async with RssPeak(p.rss) as rss:
        for start in range(0, EXAMPLES, AT_ONCE):
            await asyncio.gather(*(example(p.port, seed)
                                   for seed in range(start, min(start + AT_ONCE, EXAMPLES))))
            assert p.alive(), f"died after seeds {start}..{start + AT_ONCE - 1}: " + \
                p.stderr()[-3000:]
    return rss.growth


async def settle(p, probe, base) -> None:
    await assert_healthy(p, probe, base, rss_tolerance=24 * MiB, within=15)


async def test_random_client_frames_never_hurt_the_proxy(proxy):
    """Random frame sequences from clients, eight connections at a time: the proxy stays up,
    serves both protocols, and returns to its baseline."""
    p = proxy(config={"limits": {"http2_max_streams": 8},
                      "timeouts": {"client_send": 1.0}})
    probe, base = await baseline_of(p)
    growth = await run_examples(p, client_example)
    assert growth < 48 * MiB, f"proxy RSS grew by {growth / MiB:.1f} MiB"
    await settle(p, probe, base)


class RandomGrpcServer:
    """A "sandbox" speaking h2c back with random frames (`handle`, served by serve_on): each
    connection gets the next seed's sequence, then is closed."""

    def __init__(self) -> None:
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        rng = random.Random(1_000_000 + self.connections)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(1 << 16), timeout=1.0)  # preface, request
            for chunk in sequence(rng, "", response=True):
                writer.write(chunk)
                if rng.random() < 0.3:
                    await writer.drain()
                    await asyncio.sleep(0.001)
            await writer.drain()
            await asyncio.sleep(rng.choice([0, 0.05]))


GRPC_CALL = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"3000-fuzz.localhost"),
             (b":path", b"/test.Echo/Unary"), (b"content-type", b"application/grpc"),
             (b"te", b"trailers")]


async def grpc_example(port: int, seed: int) -> None:
    """One well-formed gRPC call (its request ended on the head or after one message), read
    until the connection closes or 0.3 s pass: long enough for the sandbox to answer it."""
    rng = random.Random(seed)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        head = hpack.Encoder().encode(GRPC_CALL)
        if rng.random() < 0.2:
            call = frame(1, 4 | 1, 1, head)
        else:
            call = frame(1, 4, 1, head) + frame(0, 1, 1, b"\0" + struct.pack("!I", 5) + b"hello")
        writer.write(PREFACE + frame(4, 0, 0, b"") + call)
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                while await reader.read(1 << 20):
                    pass
    except OSError:
        pass
    finally:
        writer.transport.abort()


async def test_random_grpc_backend_frames_never_hurt_the_proxy(proxy, backend, refused_port):
    """A sandbox's gRPC server answering calls with random frames (a new connection each time it
    closes): the proxy stays up, serves, and returns to its baseline."""
    sandbox, port = RandomGrpcServer(), free_port()
    async with serve_on(port, sandbox.handle):
        registry = standard_registry(backend.port, refused_port)
        registry["fuzz"] = {"host": "127.0.0.1", "ports": {3000: port}}
        p = proxy(sandboxes=registry)
        probe, base = await baseline_of(p)
        growth = await run_examples(p, grpc_example)
        assert sandbox.connections > EXAMPLES // (4 * AT_ONCE), sandbox.connections
        assert growth < 48 * MiB, f"proxy RSS grew by {growth / MiB:.1f} MiB"
        await settle(p, probe, base)
