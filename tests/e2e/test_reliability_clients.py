"""Slow and hostile clients against one real proxy process: slowloris, 10,000 concurrent
connections, a flood of bad Hosts, oversized and endless headers and trailers, random garbage.

Each test checks that the hostile traffic is answered or closed within its bound, that normal
clients are served meanwhile, that nothing of it reached a backend, and that the proxy returns to
its baseline (connection gauges, open fds, RSS) afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import socket
import struct
import sys
import time

import aiohttp
import pytest

from support.process import REPO_ROOT
from support.raw_http import RawConn, fetch, not_found_body

sys.path.insert(0, str(REPO_ROOT))
from benchmarks.soak import ProcessSample, ProxyProbe  # noqa: E402

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024
HEADER_TIMEOUT = 1.0  # [timeouts] client_header in the slow-client tests
SWEEP_SLACK = 1.0     # deadlines fire within a quarter of the timeout (proxy/timeouts.py), plus
                      # scheduling on a loaded machine


async def baseline_of(p) -> tuple[ProxyProbe, ProcessSample]:
    probe = ProxyProbe(p.pid, p.metrics_url)
    return probe, await probe.sample()


async def assert_back_to(probe: ProxyProbe, baseline: ProcessSample, within: float = 10.0,
                         rss_tolerance: int = 16 * MiB) -> float:
    now, problems, took = await probe.settle(baseline, within, rss_tolerance)
    assert not problems, f"not back to the baseline after {took:.1f} s: {problems}"
    return took


class RssPeak:
    """The proxy's peak RSS, sampled every 20 ms while the block runs."""

    def __init__(self, p):
        self.p = p
        self.peak = p.rss()

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.p.rss())
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> "RssPeak":
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, self.p.rss())


class NormalClients:
    """Well-behaved clients making requests in a loop while a test misbehaves elsewhere."""

    def __init__(self, p, concurrency: int = 8):
        self.p = p
        self.concurrency = concurrency
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = asyncio.Event()

    async def _loop(self, session: aiohttp.ClientSession, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            start = time.monotonic()
            try:
                async with session.get(self.p.url(f"/echo?c={i}&n={n}"),
                                       headers={"Host": "3000-demo.localhost"}) as r:
                    body = await r.json(content_type=None)
                    if r.status != 200 or body["raw_path"] != f"/echo?c={i}&n={n}":
                        self.failures.append(f"{r.status} {body!r:.200}")
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.latencies.append(time.monotonic() - start)
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> "NormalClients":
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._tasks = [asyncio.ensure_future(self._loop(self.session, i))
                       for i in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.session.close()


# --------------------------------------------------------------------------------------------
# Slowloris
# --------------------------------------------------------------------------------------------


async def trickle_until_closed(port: int, first: bytes, limit: float) -> tuple[float, bytes]:
    """Send `first`, then one more header byte every 0.2 s until the proxy closes: (seconds
    from the first byte to the close, what the proxy sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first)
    started = time.monotonic()
    got = b""
    try:
        while time.monotonic() - started < limit:
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.2)
            except asyncio.TimeoutError:
                if not writer.is_closing():
                    writer.write(b"a")
                continue
            if not data:
                break
            got += data
        else:
            raise AssertionError(f"a slow client was still connected after {limit} s")
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started, got


async def silent_until_closed(port: int, limit: float) -> float:
    """Connect and send nothing: seconds until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(), limit)
    except ConnectionError:
        data = b""
    except asyncio.TimeoutError:
        raise AssertionError(f"a silent client was still connected after {limit} s") from None
    finally:
        writer.close()
    assert data in (b"",) or data.startswith(b"HTTP/1.1 408"), data[:200]
    return time.monotonic() - started


async def test_slowloris_is_cut_at_the_header_timeout_while_others_are_served(proxy, backend):
    """200 clients trickling header bytes, 50 trickling a request target and 100 silent ones,
    with client_header = 1 s: each
    is closed within the timeout (plus the sweep's slack), never earlier, while 8 normal clients
    keep being served quickly; nothing of the slow requests reaches the backend."""
    p = proxy(config={"timeouts": {"client_header": HEADER_TIMEOUT}})
    probe, baseline = await baseline_of(p)
    requests_before = backend.state["requests"]
    first = b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\nX-Slow: "
    limit = HEADER_TIMEOUT + SWEEP_SLACK + 3
    async with NormalClients(p) as normal:
        slow = await asyncio.gather(
            *(trickle_until_closed(p.port, first, limit) for _ in range(200)),
            *(trickle_until_closed(p.port, b"GET /", limit) for _ in range(50)))
        silent = await asyncio.gather(*(silent_until_closed(p.port, limit) for _ in range(100)))
        await asyncio.sleep(0.5)
    times = [t for t, _ in slow] + silent
    assert min(times) >= HEADER_TIMEOUT * 0.9, f"a slow client was cut after {min(times):.2f} s"
    assert max(times) < HEADER_TIMEOUT + SWEEP_SLACK, (
        f"a slow client was still connected {max(times):.2f} s after its first byte")
    for _, got in slow:
        assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert not normal.failures, normal.failures[:5]
    assert len(normal.latencies) > 50
    served = sorted(normal.latencies)
    assert served[-1] < 0.5, f"a normal request took {served[-1]:.2f} s during the slowloris"
    assert backend.state["requests"] - requests_before == len(normal.latencies)
    await assert_back_to(probe, baseline)
    print(f"slowloris: 350 slow connections closed {min(times):.2f}-{max(times):.2f} s after "
          f"their first byte (client_header {HEADER_TIMEOUT} s); {len(served)} normal requests, "
          f"p50 {served[len(served) // 2] * 1000:.1f} ms, max {served[-1] * 1000:.1f} ms")


# --------------------------------------------------------------------------------------------
# 10,000 concurrent connections
# --------------------------------------------------------------------------------------------


class Held(asyncio.Protocol):
    """One client connection of the crowd: keeps what it receives, notices its end."""

    def __init__(self):
        self.received = bytearray()
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE to its hard limit (the proxy it starts inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@pytest.mark.timeout(240)
async def test_10000_concurrent_connections(proxy, backend):
    """10,000 client connections held open at once (fewer only if RLIMIT_NOFILE's hard limit
    cannot fit them: the count is printed): the proxy accepts them all, serves requests on a
    sample of them and on new connections meanwhile, and returns to its baseline fds and
    memory when they close."""
    nofile = raise_nofile()
    n = min(10_000, nofile - 1_000)  # this process also holds the backend's sockets
    assert n >= 1_000, f"RLIMIT_NOFILE {nofile} is too low for this test (CI raises it)"
    p = proxy(config={"timeouts": {"client_header": 120.0}, "server": {"backlog": 4096}})
    probe, baseline = await baseline_of(p)
    loop = asyncio.get_running_loop()
    crowd: list[Held] = []
    started = time.monotonic()
    for offset in range(0, n, 500):
        batch = await asyncio.gather(*(
            loop.create_connection(Held, "127.0.0.1", p.port)
            for _ in range(min(500, n - offset))))
        crowd += [protocol for _, protocol in batch]
    opened = time.monotonic() - started

    async def all_accepted() -> bool:
        return (await probe.gauges())["client_connections"] >= n

    deadline = time.monotonic() + 30
    while not await all_accepted():
        assert time.monotonic() < deadline, "the proxy did not accept every connection"
        await asyncio.sleep(0.2)
    held = await probe.sample()
    try:
        # requests on a sample of the crowd, and on fresh connections, while all are open
        sample = crowd[:: n // 100]
        for i, member in enumerate(sample):
            member.transport.write(b"GET /echo?i=%d HTTP/1.1\r\nHost: 3000-demo.localhost\r\n"
                                   b"Connection: close\r\n\r\n" % i)
        await asyncio.wait_for(asyncio.gather(*(m.closed for m in sample)), 30)
        for i, member in enumerate(sample):
            assert member.received.startswith(b"HTTP/1.1 200 "), bytes(member.received[:200])
            assert b'"raw_path": "/echo?i=%d"' % i in member.received
        t = time.monotonic()
        r = await fetch(p, "/echo", host="3000-demo.localhost")
        fresh_latency = time.monotonic() - t
        assert r.status == 200
        assert not any(m.closed.done() for m in crowd if m not in sample), \
            "the proxy dropped idle connections of the crowd"
    finally:
        for member in crowd:
            member.transport.close()
    took = await assert_back_to(probe, baseline, within=20.0, rss_tolerance=64 * MiB)
    after = await probe.sample()
    per_connection = (held.rss - baseline.rss) / n
    print(f"{n} concurrent connections: opened in {opened:.1f} s; proxy fds {baseline.fds} -> "
          f"{held.fds} -> {after.fds}; RSS {baseline.rss / MiB:.1f} -> {held.rss / MiB:.1f} -> "
          f"{after.rss / MiB:.1f} MiB ({per_connection / 1024:.1f} KiB per connection); "
          f"a new request meanwhile took {fresh_latency * 1000:.1f} ms; back to the baseline "
          f"{took:.1f} s after closing")


# --------------------------------------------------------------------------------------------
# A flood of bad Hosts
# --------------------------------------------------------------------------------------------


def bad_hosts(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """(Host, what the proxy must answer: "400" or "502") pairs."""
    fixed = [
        ("localhost", "400"), ("3000-demo", "400"), ("demo.localhost", "400"),
        ("abc-demo.localhost", "400"), ("99999-demo.localhost", "400"),
        ("3000-de_mo.localhost", "400"), ("3000-demo.evil.example", "400"),
        ("3000-.localhost", "400"), ("-demo.localhost", "400"), (".localhost", "400"),
        ("3000-demo.localhost.evil.example", "400"), ("3000-dé.localhost", "400"),
        ("[::1]", "400"), ("127.0.0.1", "400"), ("3000-demo.localhost:abc", "400"),
    ]
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-._:[]@%!~"
    hosts = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            hosts.append(fixed[rng.randrange(len(fixed))])
        elif kind == 1:  # a well-formed address of a sandbox that does not exist
            sid = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                          for _ in range(rng.randrange(1, 30)))
            hosts.append((f"{rng.randrange(1, 65536)}-x{sid}.localhost", "502"))
        elif kind == 2:  # random characters that never form <port>-<id>.localhost
            name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
            hosts.append((f"{name}.example", "400"))
        else:  # a long label
            hosts.append(("3000-" + "a" * rng.randrange(64, 4000) + ".nowhere", "400"))
    return hosts


async def test_flood_of_bad_hosts_never_reaches_a_backend(proxy, backend):
    p = proxy()
    probe, baseline = await baseline_of(p)
    requests_before = backend.state["requests"]
    rng = random.Random(20240611)
    hosts = bad_hosts(rng, 6000)
    counts = {"400": 0, "502": 0}

    async def client(part: list[tuple[str, str]]) -> None:
        conn = await RawConn.open(p.port)
        try:
            for host, expected in part:
                r = await conn.request("GET", "/echo", host, timeout=10)
                assert str(r.status) == expected, (host, r.status, r.body[:200])
                if r.status == 502:
                    sid = host.split(".", 1)[0].split("-", 1)[1]
                    assert r.json() == not_found_body(sid)
                counts[expected] += 1
                if r.header("Connection") == "close":
                    await conn.aclose()
                    conn = await RawConn.open(p.port)
            r = await conn.request("GET", "/echo", "3000-demo.localhost", timeout=10)
            assert r.status == 200  # the same connection still serves a good request
        finally:
            await conn.aclose()

    started = time.monotonic()
    await asyncio.gather(*(client(hosts[i::20]) for i in range(20)))
    took = time.monotonic() - started
    assert backend.state["requests"] - requests_before == 20
    await assert_back_to(probe, baseline, rss_tolerance=8 * MiB)
    print(f"bad Host flood: {len(hosts)} requests ({counts['400']} x 400, {counts['502']} x 502) "
          f"in {took:.1f} s ({len(hosts) / took:.0f}/s) on 20 keep-alive connections; "
          f"none reached the backend; RSS {baseline.rss / MiB:.1f} -> {p.rss() / MiB:.1f} MiB")


# --------------------------------------------------------------------------------------------
# Oversized and endless headers, endless trailers
# --------------------------------------------------------------------------------------------


async def flood_until_closed(port: int, first: bytes, line: bytes, limit_bytes: int,
                             seconds: float = 10.0) -> tuple[int, bytes, float]:
    """Send `first`, then `line` over and over (up to `limit_bytes`) while reading: (bytes
    sent, what the proxy answered, seconds until it closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first)
    block = line * max(1, 65536 // len(line))
    sent = 0
    answer = bytearray()

    async def read() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                answer.extend(data)

    reading = asyncio.ensure_future(read())
    started = time.monotonic()
    try:
        while sent < limit_bytes and not reading.done():
            writer.write(block)
            sent += len(block)
            try:
                await asyncio.wait_for(writer.drain(), 2)
            except asyncio.TimeoutError:
                continue  # the proxy stopped reading: wait for its answer
        await asyncio.wait_for(reading, seconds)
    except ConnectionError:
        await asyncio.wait_for(reading, seconds)
    except asyncio.TimeoutError:
        raise AssertionError(f"still connected {seconds} s after {sent / MiB:.0f} MiB of "
                             f"header bytes ({bytes(answer[:100])!r})") from None
    finally:
        writer.transport.abort()
    return sent, bytes(answer), time.monotonic() - started


FLOOD_LINE = b"X-Flood: " + b"f" * 1000 + b"\r\n"


@pytest.mark.parametrize("case, first, line, status", [
    ("endless header lines", b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\n",
     FLOOD_LINE, 431),
    ("one endless header value", b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\nX-Big: ",
     b"v" * 1000, 431),
    ("endless request target", b"GET /echo?", b"q" * 1000, 414),
    ("endless tiny headers", b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\n",
     b"a:\r\n", 431),
    ("endless trailers", b"POST /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n", FLOOD_LINE, 431),
])
async def test_endless_head_is_refused_in_bounded_memory(proxy, backend, case, first, line,
                                                         status):
    """A client that never ends its header section (or request target, or trailer section):
    the proxy answers 414/431 (or closes) once the configured limit is passed, its memory stays
    flat, and nothing reaches the backend complete."""
    p = proxy()
    probe, baseline = await baseline_of(p)
    requests_before = backend.state["requests"]
    async with RssPeak(p) as rss:
        flood = asyncio.ensure_future(
            flood_until_closed(p.port, first, line, limit_bytes=256 * MiB))
        while not flood.done() and rss.peak - baseline.rss < 16 * MiB:
            await asyncio.sleep(0.05)
    if not flood.done():
        flood.cancel()
        with contextlib.suppress(asyncio.CancelledError, AssertionError):
            await flood
        raise AssertionError(f"{case}: the proxy's RSS grew by more than 16 MiB "
                             f"({baseline.rss / MiB:.0f} -> {rss.peak / MiB:.0f} MiB) while a "
                             f"client sent header bytes")
    sent, answer, took = flood.result()
    assert rss.peak - baseline.rss < 16 * MiB
    assert answer == b"" or answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert backend.state["requests"] == requests_before
    assert p.alive()
    await assert_back_to(probe, baseline)
    print(f"{case}: {answer[:12]!r} after {sent / MiB:.1f} MiB sent, closed in {took:.1f} s, "
          f"RSS +{(rss.peak - baseline.rss) / MiB:.1f} MiB")


async def test_bursts_of_oversized_requests_do_not_accumulate_memory(proxy, backend):
    """Bursts of 200 oversized heads at once: each is answered 414/431 and closed, nothing
    reaches the backend, and after the first burst (the warm-up, whose peak the allocator may
    keep) five more bursts leave the proxy's memory where it was."""
    p = proxy()
    heads = [
        (b"GET /echo?" + b"q" * 20000 + b" HTTP/1.1\r\nHost: 3000-demo.localhost\r\n\r\n", 414),
        (b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\nX-Big: " + b"v" * 70000
         + b"\r\n\r\n", 431),
        (b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\n" + b"a: b\r\n" * 300 + b"\r\n",
         431),
        (b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\nCookie: " + b"c=" * 40000
         + b"\r\n\r\n", 431),
    ]

    async def one(i: int) -> None:
        head, status = heads[i % len(heads)]
        conn = await RawConn.open(p.port)
        try:
            await conn.send(head)
            r = await conn.response(timeout=10)
            assert r.status == status, (i, r.status)
            assert await conn.closed(5)
        finally:
            await conn.aclose()

    await asyncio.gather(*(one(i) for i in range(200)))
    probe, baseline = await baseline_of(p)
    requests_before = backend.state["requests"]
    sizes = []
    for _ in range(5):
        await asyncio.gather(*(one(i) for i in range(200)))
        sizes.append(p.rss())
    assert backend.state["requests"] == requests_before
    print(f"oversized bursts: RSS after the warm-up burst {baseline.rss / MiB:.0f} MiB, after "
          f"each further burst {[round(s / MiB) for s in sizes]} MiB")
    await assert_back_to(probe, baseline)


# --------------------------------------------------------------------------------------------
# Clients that leave at the wrong moment, or say more than they should
# --------------------------------------------------------------------------------------------


def send_and_reset(port: int, data: bytes) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_clients_resetting_while_the_backend_connection_opens_leave_nothing(proxy):
    """100 clients that send a request and reset at once, while the proxy is still opening the
    backend connection for it (no idle pooled connection to take): the connection attempt is
    abandoned without a trace, and the backend connection gauges return to zero."""
    p = proxy(config={"upstream": {"max_idle_per_backend": 0}})
    probe, baseline = await baseline_of(p)
    request = b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\n\r\n"
    for _ in range(100):
        await asyncio.to_thread(send_and_reset, p.port, request)
    assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200
    await assert_back_to(probe, baseline, within=5.0)


async def test_bytes_after_a_last_request_do_not_cancel_its_answer(proxy, backend):
    """A request that ends the connection (Connection: close, or HTTP/1.0) followed by more
    bytes (a pipelined request, or garbage): the request is answered by the backend, the rest
    ignored, the connection closed. A 400 instead would hide the answer of a request the
    backend may already have executed."""
    p = proxy()
    # a pooled backend connection is ready, as on any busy proxy
    assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200
    before = backend.state["requests"]
    cases = 0
    for last in (b"HTTP/1.1\r\nConnection: close", b"HTTP/1.0"):
        for tail in (b"GET /echo?next HTTP/1.1\r\nHost: 3000-demo.localhost\r\n\r\n",
                     b"\x00\xffgarbage"):
            cases += 1
            conn = await RawConn.open(p.port)
            try:
                await conn.send(b"POST /echo?last " + last + b"\r\nHost: 3000-demo.localhost\r\n"
                                b"Content-Length: 5\r\n\r\nhello" + tail)
                r = await conn.response(method="POST", timeout=10)
                assert r.status == 200 and r.header("X-Backend") == "main", (
                    f"{last!r} + {tail[:20]!r}: {r.status} {r.body[:120]!r}")
                assert r.json()["raw_path"] == "/echo?last"
                assert await conn.closed(5)
            finally:
                await conn.aclose()
    assert backend.state["requests"] - before == cases


# --------------------------------------------------------------------------------------------
# Random garbage
# --------------------------------------------------------------------------------------------


async def send_garbage(port: int, data: bytes, limit: float) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), limit)
    except ConnectionError:
        return b""
    except asyncio.TimeoutError:
        raise AssertionError(f"no answer and no close {limit} s after {data[:60]!r}") from None
    finally:
        writer.transport.abort()


async def test_random_garbage_is_answered_or_closed(proxy, backend):
    """500 connections of seeded random bytes (some after a plausible request start): each gets
    a 4xx or is closed within the header timeout; the process lives on, serves normal requests
    and returns to its baseline."""
    p = proxy(config={"timeouts": {"client_header": HEADER_TIMEOUT}})
    probe, baseline = await baseline_of(p)
    requests_before = backend.state["requests"]
    rng = random.Random(7)
    prefixes = [b"", b"GET ", b"GET /echo HTTP/1.1\r\n", b"POST /echo HTTP/1.1\r\nHost: ",
                b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\n", b"\r\n\r\n",
                b"\x16\x03\x01"]
    payloads = [rng.choice(prefixes) + rng.randbytes(rng.randrange(1, 4096)) for _ in range(500)]
    limit = HEADER_TIMEOUT + SWEEP_SLACK + 2
    answers = []
    for start in range(0, len(payloads), 100):
        answers += await asyncio.gather(*(send_garbage(p.port, data, limit)
                                          for data in payloads[start:start + 100]))
    statuses: dict[str, int] = {}
    for data, answer in zip(payloads, answers):
        key = answer[:12].decode("latin-1") if answer else "closed"
        statuses[key] = statuses.get(key, 0) + 1
        assert answer == b"" or answer[:10] in (b"HTTP/1.1 4", b"HTTP/1.1 5"), (data[:80], answer)
        assert not answer.startswith(b"HTTP/1.1 5"), (data[:80], answer[:200])
    assert p.alive()
    assert backend.state["requests"] == requests_before
    assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200
    await assert_back_to(probe, baseline)
    print(f"random garbage: 500 connections -> {statuses}")
