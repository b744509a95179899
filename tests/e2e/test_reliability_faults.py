"""Reliability under faults, with real processes: backends that die mid-response, never answer or
stop reading; clients that stop reading or vanish; the registry (Redis, DNS) killed and restarted
under load; a sandbox removed under 100 open WebSockets.

What every test here proves is the same two things: the client is told the truth (an aborted
response is never presented as complete, a silent backend is a 504, a registry outage is a 503,
never a hang), and afterwards the proxy holds nothing it should not (the connection gauges of
/metrics and its open file descriptors return to their baseline; `benchmarks/soak.py` owns that
check).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import struct
import sys
import time

import aiohttp
import pytest

from support.faulty_backends import (FIREHOSE_PIECE, BackendProcess, ThreadedFaultyBackend,
                                     det_bytes)
from support.fleet import dns_server, redis_server  # noqa: F401 - fixtures
from support.process import REPO_ROOT, standard_registry, wait_until
from support.raw_http import RawConn, build_request, fetch, metric_value, not_found_body

sys.path.insert(0, str(REPO_ROOT))
from benchmarks.soak import ProcessSample, ProxyProbe  # noqa: E402

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
RSS_BUDGET = 24 * MiB  # growth allowed while a peer holds a transfer back
# Bytes a stalled transfer may have moved before everything stops: the kernel's socket buffers
# on loopback (autotuned up to several MiB each, four sockets on the path) plus the proxy's own
# bounded buffers. A proxy that does not apply backpressure moves everything.
STALL_BUDGET = 64 * MiB


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def faulty():
    b = ThreadedFaultyBackend().start()
    yield b
    b.stop()


@pytest.fixture
def killable():
    """tests/faulty_backends.py in a process of its own."""
    b = BackendProcess("faulty_backends.py").start()
    yield b
    b.kill()


def registry_with(backend, refused_port, **backends) -> dict:
    """The standard registry plus one sandbox per keyword: name -> backend port."""
    reg = standard_registry(backend.port, refused_port)
    for name, port in backends.items():
        reg[name] = {"host": "127.0.0.1", "ports": {3000: port}}
    return reg


async def baseline_of(p) -> tuple[ProxyProbe, ProcessSample]:
    probe = ProxyProbe(p.pid, p.metrics_url)
    return probe, await probe.sample()


async def assert_back_to(probe: ProxyProbe, baseline: ProcessSample, within: float = 5.0,
                         rss_tolerance: int = RSS_BUDGET) -> float:
    """The proxy holds no more connections, fds or memory than at `baseline`; the time taken."""
    now, problems, took = await probe.settle(baseline, within, rss_tolerance)
    assert not problems, f"not back to the baseline after {took:.1f} s: {problems}"
    return took


async def read_until_closed(conn: RawConn, timeout: float) -> tuple[bytes, str]:
    """Everything the proxy sends until it closes: (bytes, "eof" or "reset"); a hang fails."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, (f"the connection was neither completed nor closed within "
                              f"{timeout} s ({len(received)} bytes received)")
            try:
                data = await asyncio.wait_for(conn.reader.read(1 << 20), left)
            except asyncio.TimeoutError:
                continue
            if not data:
                return bytes(received), "eof"
            received += data
    except (ConnectionResetError, BrokenPipeError):
        return bytes(received), "reset"


def chunked_is_complete(raw: bytes) -> bool:
    """True when `raw` (a chunked body as relayed) ends with its last chunk."""
    pos = 0
    while True:
        end = raw.find(b"\r\n", pos)
        if end < 0:
            return False
        size = int(raw[pos:end].split(b";")[0], 16)
        if size == 0:
            return raw.endswith(b"\r\n\r\n")
        pos = end + 2 + size + 2
        if pos > len(raw):
            return False


def rst_close(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed client or a dropped NAT entry."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --------------------------------------------------------------------------------------------
# A backend that dies mid-response
# --------------------------------------------------------------------------------------------

BODY = 4 * MiB
SENT = 1 * MiB


@pytest.mark.parametrize("client_version", ["HTTP/1.1", "HTTP/1.0"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("death", ["killed", "fin", "rst"])
async def test_backend_dying_mid_response_is_an_aborted_response(
        proxy, backend, refused_port, killable, death, framing, client_version):
    """SIGKILL of the backend process, or its connection closed or reset, after 1 of 4 MiB:
    the client must see an incomplete response (short Content-Length body, no last chunk, or a
    reset where the body is delimited by the close), promptly, and never a complete one."""
    p = proxy(sandboxes=registry_with(backend, refused_port, killable=killable.port))
    probe, baseline = await baseline_of(p)
    then = "hang" if death == "killed" else death
    chunked = int(framing == "chunked")
    conn = await RawConn.open(p.port)
    await conn.send(build_request(
        "GET", f"/partial?n={BODY}&send={SENT}&then={then}&chunked={chunked}",
        "3000-killable.localhost", version=client_version))
    head = await conn.read_head()
    assert head.status == 200
    got = bytearray()
    if death == "killed":
        while len(got) < SENT:  # the first MiB has crossed the proxy: now kill the backend
            got += await asyncio.wait_for(conn.reader.read(1 << 20), 10)
        killable.kill()
    killed_at = time.monotonic()
    rest, how = await read_until_closed(conn, timeout=10)
    closed_after = time.monotonic() - killed_at
    body = bytes(got) + rest
    print(f"backend {death} mid-response ({framing}, {client_version} client): the client saw "
          f"{len(body)} of {BODY} body bytes and a {how} {closed_after * 1000:.0f} ms later")
    assert closed_after < 3.0, f"the client waited {closed_after:.1f} s for the end"
    if head.header("Content-Length") is not None:
        assert int(head.header("Content-Length")) == BODY
        assert len(body) < BODY, "a truncated body was presented as complete"
    elif "chunked" in (head.header("Transfer-Encoding") or ""):
        assert not chunked_is_complete(body), "the last chunk was sent for a truncated body"
    else:  # delimited by the close (an HTTP/1.0 client): only a reset says "incomplete"
        assert how == "reset", (f"a body delimited by the close ended with a clean close "
                                f"after {len(body)} of {BODY} bytes: it looks complete")
    await conn.aclose()
    assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200
    await assert_back_to(probe, baseline)
    assert p.alive()


async def test_backend_killed_before_answering_is_502_at_once(proxy, backend, refused_port,
                                                             killable):
    p = proxy(sandboxes=registry_with(backend, refused_port, killable=killable.port))
    probe, baseline = await baseline_of(p)
    request = asyncio.ensure_future(fetch(p, "/never", host="3000-killable.localhost"))
    await asyncio.sleep(0.5)
    killable.kill()
    killed_at = time.monotonic()
    r = await request
    print(f"backend killed before answering: {r.status} after "
          f"{(time.monotonic() - killed_at) * 1000:.0f} ms")
    assert time.monotonic() - killed_at < 2.0
    assert r.status == 502, r.body
    assert r.json() == {"sandboxId": "killable", "message": "The sandbox closed the connection "
                        "before responding", "port": 3000, "code": 502}
    await assert_back_to(probe, baseline)


async def test_backend_restarted_on_the_same_port_is_served_again(proxy, backend, refused_port):
    """Kill -9 the backend under keep-alive traffic, restart it on the same port: while it is
    down the answer is a prompt 502 "port is not open", afterwards every request succeeds (no
    pooled connection to the dead process is ever used)."""
    server = BackendProcess("backends.py").start()
    try:
        p = proxy(sandboxes=registry_with(backend, refused_port, restarted=server.port),
                  config={"upstream": {"connect_attempts": 2, "connect_backoff": 0.05}})
        probe, baseline = await baseline_of(p)
        host = {"Host": "3000-restarted.localhost"}
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            async def get(i: int) -> tuple[int, dict | None]:
                async with s.get(p.url(f"/echo?i={i}"), headers=host) as r:
                    return r.status, await r.json(content_type=None)

            for batch in range(3):  # fill the pool with keep-alive connections
                assert {st for st, _ in await asyncio.gather(*(get(i) for i in range(16)))} \
                    == {200}
            server.kill()
            await asyncio.sleep(0.2)
            started = time.monotonic()
            down = await asyncio.gather(*(get(i) for i in range(16)))
            assert time.monotonic() - started < 3.0
            assert {st for st, _ in down} == {502}
            assert {b["message"] for _, b in down} == {
                "The sandbox is running but port is not open"}
            server.start()
            after = await asyncio.gather(*(get(i) for i in range(64)))
            assert [st for st, _ in after] == [200] * 64
            assert [b["raw_path"] for _, b in after] == [f"/echo?i={i}" for i in range(64)]
        await assert_back_to(probe, baseline)
    finally:
        server.kill()


async def test_backend_killed_under_open_websockets_closes_them(proxy, backend, refused_port):
    server = BackendProcess("backends.py").start()
    try:
        p = proxy(sandboxes=registry_with(backend, refused_port, wsbox=server.port))
        probe, baseline = await baseline_of(p)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=30)) as s:
            sockets = await asyncio.gather(*(
                s.ws_connect(p.url("/ws"), headers={"Host": "3000-wsbox.localhost"})
                for _ in range(50)))
            for ws in sockets:
                await ws.send_str("ping")
            assert {(await ws.receive(timeout=5)).data for ws in sockets} == {"ping"}
            server.kill()
            killed_at = time.monotonic()
            closed = await asyncio.gather(*(ws.receive(timeout=5) for ws in sockets))
            took = time.monotonic() - killed_at
            print(f"backend killed under 50 WebSockets: all closed within {took * 1000:.0f} ms")
            assert {m.type for m in closed} <= {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                               aiohttp.WSMsgType.ERROR}
            assert took < 2.0, f"the WebSockets were closed {took:.1f} s after the backend died"
            for ws in sockets:
                await ws.close()
        await assert_back_to(probe, baseline)
    finally:
        server.kill()


# --------------------------------------------------------------------------------------------
# A backend that accepts and never answers
# --------------------------------------------------------------------------------------------


async def test_backend_that_never_answers_is_504_after_the_header_timeout(
        proxy, backend, refused_port, faulty):
    p = proxy(sandboxes=registry_with(backend, refused_port, faulty=faulty.port),
              config={"timeouts": {"upstream_header": 1.0}})
    probe, baseline = await baseline_of(p)
    host = "3000-faulty.localhost"

    async def timed(method: str, data: bytes | None) -> tuple[float, object]:
        start = time.monotonic()
        r = await fetch(p, "/never", host=host, method=method, data=data, timeout=10)
        return time.monotonic() - start, r

    results = await asyncio.gather(*(timed("GET", None) for _ in range(20)),
                                   *(timed("POST", b"x" * 300_000) for _ in range(5)))
    print(f"never-answering backend: 25 requests answered 504 after "
          f"{min(t for t, _ in results):.2f}-{max(t for t, _ in results):.2f} s "
          f"(upstream_header 1.0 s)")
    for took, r in results:
        assert r.status == 504, r.body
        assert r.json() == {"sandboxId": "faulty", "message": "The sandbox did not respond in "
                            "time", "port": 3000, "code": 504}
        assert 0.9 <= took < 2.6, f"504 after {took:.2f} s with upstream_header = 1.0"
    # the silent backend's connections are closed, not pooled for someone else
    await wait_until(lambda: _true(faulty.state["connections_open"] == 0), 3)
    # the client connection stays usable after a 504
    conn = await RawConn.open(p.port)
    r = await conn.request("GET", "/never", host, timeout=5)
    assert r.status == 504 and r.header("Connection") != "close"
    r = await conn.request("GET", "/echo", host, timeout=5)
    assert r.status == 200 and r.header("X-Backend") == "faulty"
    await conn.aclose()
    await assert_back_to(probe, baseline)


async def _true(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------------------------
# A hostile backend: a response head or trailer section that never ends
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/endless-head", "/endless-trailers"])
async def test_backend_sending_endless_headers_is_cut_off_in_bounded_memory(
        proxy, backend, refused_port, faulty, path):
    """Sandboxes run untrusted code: one whose server never ends its response head (or its
    trailer section) must cost the proxy bounded memory; the client gets a 502 (or, once the
    response has started, an incomplete one), promptly."""
    p = proxy(sandboxes=registry_with(backend, refused_port, faulty=faulty.port))
    probe, baseline = await baseline_of(p)
    conn = await RawConn.open(p.port)
    await conn.send(build_request("GET", path, "3000-faulty.localhost"))
    if path == "/endless-head":  # a 502, after which the client connection may stay open
        ending = asyncio.ensure_future(conn.response(timeout=10))
    else:  # the response has started: it can only be aborted
        ending = asyncio.ensure_future(read_until_closed(conn, timeout=10))
    peak = baseline.rss
    while not ending.done() and peak - baseline.rss < RSS_BUDGET:
        peak = max(peak, p.rss())
        await asyncio.sleep(0.02)
    flooded = faulty.state["flood_sent"]
    if not ending.done():
        ending.cancel()
        with contextlib.suppress(asyncio.CancelledError, AssertionError):
            await ending
        await conn.aclose()
        raise AssertionError(f"{path}: the proxy's RSS grew by more than "
                             f"{RSS_BUDGET / MiB:.0f} MiB ({baseline.rss / MiB:.0f} -> "
                             f"{peak / MiB:.0f} MiB) while a backend sent "
                             f"{flooded / MiB:.0f} MiB of header lines")
    if path == "/endless-head":
        answer = ending.result()
        assert answer.status == 502 and answer.header("X-Backend") is None, answer.raw_head
        assert answer.json()["sandboxId"] == "faulty"
    else:
        raw, _ = ending.result()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and not chunked_is_complete(body), raw[:300]
    await conn.aclose()
    await wait_until(lambda: _true(faulty.state["connections_open"] == 0), 3)
    await assert_back_to(probe, baseline)


# --------------------------------------------------------------------------------------------
# Backpressure: a backend that stops reading an upload, a client that stops reading a download
# --------------------------------------------------------------------------------------------


async def write_until_stalled(writer: asyncio.StreamWriter, stall: float = 1.0,
                              limit: float = 20.0) -> int:
    """Write as fast as the proxy takes it until nothing moves for `stall` seconds; the bytes
    the proxy took (at most `limit` seconds)."""
    piece = det_bytes(256 * 1024)
    sent = 0
    started = time.monotonic()
    while time.monotonic() - started < limit:
        assert not writer.transport.is_closing(), (
            f"the proxy closed the connection of a stalled upload after {sent / MiB:.1f} MiB")
        writer.write(piece)
        try:
            await asyncio.wait_for(writer.drain(), stall)
        except asyncio.TimeoutError:
            return sent
        sent += len(piece)
    raise AssertionError(f"{sent / MiB:.0f} MiB of upload went into a backend that reads "
                         f"nothing: no backpressure")


async def test_backend_that_stops_reading_an_upload_holds_the_client_back(
        proxy, backend, refused_port, faulty):
    """The upload stalls within the kernel's buffers, the proxy's memory stays flat, and when
    the client gives up both connections are released."""
    p = proxy(sandboxes=registry_with(backend, refused_port, faulty=faulty.port))
    probe, baseline = await baseline_of(p)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"POST /no-read HTTP/1.1\r\nHost: 3000-faulty.localhost\r\n"
                 b"Content-Length: 1073741824\r\n\r\n")
    sent = await write_until_stalled(writer)
    rss = p.rss()
    assert sent < STALL_BUDGET, f"the proxy took {sent / MiB:.0f} MiB of a stalled upload"
    assert rss - baseline.rss < RSS_BUDGET, (
        f"the proxy's RSS grew by {(rss - baseline.rss) / MiB:.1f} MiB for a stalled upload")
    assert faulty.state["connections_open"] == 1
    print(f"stalled upload: client sent {sent / MiB:.1f} MiB, proxy RSS "
          f"+{(rss - baseline.rss) / MiB:.1f} MiB")
    # The client gives up with a reset. (A FIN would queue behind the unsent upload: a proxy
    # that is not reading cannot see it until the client's kernel gives up on the orphaned
    # socket, seconds to minutes depending on the kernel.)
    rst_close(writer)
    took = await assert_back_to(probe, baseline, within=5.0)
    print(f"stalled upload released {took:.1f} s after the client left")


async def test_client_that_stops_reading_a_download_holds_the_backend_back(
        proxy, backend, refused_port, faulty):
    """The backend is held back within the kernel's buffers, the proxy's memory stays flat,
    and when the client reads again it gets every byte, intact."""
    p = proxy(sandboxes=registry_with(backend, refused_port, faulty=faulty.port))
    probe, baseline = await baseline_of(p)
    n = 256 * MiB
    conn = await RawConn.open(p.port)
    await conn.send(build_request("GET", f"/firehose?n={n}", "3000-faulty.localhost"))
    head = await conn.read_head()
    assert head.status == 200 and head.header("Content-Length") == str(n)
    before = -1
    for _ in range(40):  # the client reads nothing until the backend has stopped moving
        await asyncio.sleep(0.5)
        if faulty.state["firehose_sent"] == before:
            break
        before = faulty.state["firehose_sent"]
    held = faulty.state["firehose_sent"]
    rss = p.rss()
    assert held < STALL_BUDGET, f"the backend could push {held / MiB:.0f} MiB to a client " \
                                f"that reads nothing"
    assert rss - baseline.rss < RSS_BUDGET, (
        f"the proxy's RSS grew by {(rss - baseline.rss) / MiB:.1f} MiB for a stalled download")
    piece = det_bytes(FIREHOSE_PIECE)
    expected = hashlib.sha256()
    for _ in range(n // FIREHOSE_PIECE):
        expected.update(piece)
    h = hashlib.sha256()
    received = 0
    while received < n:
        data = await asyncio.wait_for(conn.reader.read(1 << 20), 20)
        assert data, f"the download ended after {received} of {n} bytes"
        h.update(data)
        received += len(data)
    assert received == n and h.hexdigest() == expected.hexdigest()
    await conn.aclose()
    await assert_back_to(probe, baseline)
    print(f"stalled download: backend pushed {held / MiB:.1f} MiB, proxy RSS "
          f"+{(rss - baseline.rss) / MiB:.1f} MiB")


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_leaving_a_stalled_download_releases_the_backend(
        proxy, backend, refused_port, faulty, how):
    p = proxy(sandboxes=registry_with(backend, refused_port, faulty=faulty.port))
    probe, baseline = await baseline_of(p)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(build_request("GET", f"/firehose?n={1 << 30}", "3000-faulty.localhost"))
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(MiB)
    await asyncio.sleep(1.0)  # the transfer is now held back by the client
    if how == "rst":
        rst_close(writer)
    else:
        writer.close()
    await wait_until(lambda: _true(faulty.state["connections_open"] == 0), 2)
    await assert_back_to(probe, baseline)


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("sent", [100_000, 4 * MiB])
async def test_client_leaving_mid_upload_releases_the_backend(proxy, backend, refused_port,
                                                              faulty, how, sent):
    """A client that closes (or resets) its connection half way through a request body: the
    request can never complete, so the backend connection is closed and the client
    connection released, promptly."""
    p = proxy(sandboxes=registry_with(backend, refused_port, faulty=faulty.port))
    probe, baseline = await baseline_of(p)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: 3000-faulty.localhost\r\n"
                 b"Content-Length: 10485760\r\n\r\n" + det_bytes(sent))
    await writer.drain()
    await wait_until(lambda: _true(faulty.state["connections_open"] == 1), 3)
    await asyncio.sleep(0.3)
    if how == "rst":
        rst_close(writer)
    else:
        writer.close()
    await assert_back_to(probe, baseline, within=3.0)
    await wait_until(lambda: _true(faulty.state["connections_open"] == 0), 2)
    assert faulty.state["messages"] == 0  # the truncated request never completed upstream


async def test_half_closed_client_still_gets_its_answer(proxy, backend, refused_port, faulty):
    """The other side of the previous test: a client that sends a complete request and then
    shuts down its sending side (shutdown(SHUT_WR)) is still answered in full."""
    p = proxy(sandboxes=registry_with(backend, refused_port, faulty=faulty.port))
    body = det_bytes(3 * MiB)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(build_request("POST", "/echo", "3000-faulty.localhost", body=body))
    writer.write_eof()
    raw = await asyncio.wait_for(reader.read(), 10)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(payload)["body_sha256"] == hashlib.sha256(body).hexdigest()
    writer.close()


# --------------------------------------------------------------------------------------------
# The registry killed and restarted under load
# --------------------------------------------------------------------------------------------


class LoadRecorder:
    """Concurrent clients requesting one sandbox in a loop; every outcome is kept with its
    time, so a test can check each phase of an outage."""

    def __init__(self, p, sandbox: str = "demo", concurrency: int = 16):
        self.p = p
        self.host = f"3000-{sandbox}.localhost"
        self.concurrency = concurrency
        self.results: list[tuple[float, float, int | str, bytes]] = []  # start, took, status
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _client(self, session: aiohttp.ClientSession, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            start = time.monotonic()
            try:
                async with session.get(self.p.url(f"/echo?c={i}&n={n}"),
                                       headers={"Host": self.host}) as r:
                    body = await r.read()
                    status: int | str = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                status, body = type(exc).__name__, str(exc).encode()
            self.results.append((start, time.monotonic() - start, status, body))
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> "LoadRecorder":
        timeout = aiohttp.ClientTimeout(total=10)
        self.session = aiohttp.ClientSession(timeout=timeout)
        self._tasks = [asyncio.ensure_future(self._client(self.session, i))
                       for i in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.session.close()

    def between(self, start: float, end: float) -> list[tuple[float, float, int | str, bytes]]:
        return [r for r in self.results if start <= r[0] < end]


async def readyz(p) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        async with s.get(p.metrics_url + "/readyz") as r:
            return r.status


def check_outage(load: LoadRecorder, sandbox: str, t_down: float, t_up: float,
                 timeout: float) -> dict:
    """Every request answered (no errors, never slower than the registry timeout allows),
    only 200 or the 503 "registry unavailable", some 503 while down; figures for the report."""
    unavailable = {"sandboxId": sandbox, "message": "registry unavailable", "code": 503}
    statuses: dict = {}
    for start, took, status, body in load.results:
        statuses[status] = statuses.get(status, 0) + 1
        assert status in (200, 503), f"{status}: {body[:300]!r} (at {start - t_down:+.2f} s)"
        if status == 503:
            assert json.loads(body) == unavailable
        assert took < timeout + 1.5, f"a request took {took:.2f} s (registry timeout {timeout})"
    before = load.between(0, t_down)
    assert before and {r[2] for r in before} == {200}
    down = load.between(t_down, t_up)
    assert any(r[2] == 503 for r in down), "no 503 while the registry was down"
    ok_after = sorted(r[0] for r in load.between(t_up, float("inf")) if r[2] == 200)
    assert ok_after, "no request succeeded after the registry came back"
    recovered = ok_after[0]
    settled = load.between(recovered + 1.0, float("inf"))
    assert settled and {r[2] for r in settled} == {200}, "503s after the recovery"
    return {"requests": len(load.results), "statuses": statuses,
            "first_503_after_kill": min(r[0] for r in down if r[2] == 503) - t_down,
            "recovered_after_restart": recovered - t_up,
            "max_latency": max(r[1] for r in load.results)}


@pytest.mark.parametrize("fault", ["killed", "frozen"])
async def test_redis_outage_under_load_is_503_then_full_recovery(proxy, backend, redis_server,
                                                                  fault):
    """Redis SIGKILLed (then restarted from its snapshot) or SIGSTOPped (then continued) while
    16 clients hammer a sandbox and a WebSocket is open: only 200s and 503 "registry
    unavailable", none slower than the registry timeout allows, full recovery after, the same
    proxy process throughout, the WebSocket untouched."""
    redis_server.put("demo", {"host": "127.0.0.1", "ports": {"3000": backend.port}})
    with redis_server.client() as c:
        c.save()  # a restarted redis-server loads this snapshot, as a persistent one would
    timeout = 1.0
    p = proxy(sandboxes={}, config={"registry": {"kind": "redis", "url": redis_server.url,
                                                 "timeout": timeout}})
    pid = p.pid
    assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200
    probe, baseline = await baseline_of(p)  # with the registry's data connection open
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(p.url("/ws"), headers={"Host": "3000-demo.localhost"})
        async with LoadRecorder(p) as load:
            await asyncio.sleep(1.5)
            t_down = time.monotonic()
            if fault == "killed":
                redis_server.kill()
            else:
                redis_server.pause()
            # a frozen Redis is noticed when the subscription misses its PING (1 s + timeout);
            # until then the cache answers. Then 2 s of requests that must each get a 503.
            # The instance stays ready (/readyz) meanwhile: the metric is what says so.
            noticed = await wait_until(lambda: registry_lost(p), 5)
            assert await readyz(p) == 200
            await asyncio.sleep(2.0)
            await ws.send_str("during")
            assert (await ws.receive(timeout=5)).data == "during"
            t_up = time.monotonic()
            if fault == "killed":
                redis_server.start()
            else:
                redis_server.resume()
            await asyncio.sleep(4.0)
        figures = check_outage(load, "demo", t_down, t_up, timeout)
        figures["noticed_after"] = noticed
        await ws.send_str("after")
        assert (await ws.receive(timeout=5)).data == "after"
        await ws.close()
    assert await readyz(p) == 200
    assert p.alive() and p.pid == pid
    await assert_back_to(probe, baseline)
    print(f"redis {fault}: {figures}")


async def registry_lost(p) -> bool:
    try:
        return await metric_value(p, "sandbox_proxy_registry_ready") == 0
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def test_dns_outage_under_load_is_503_then_full_recovery(proxy, backend, dns_server):
    dns_server.start(hosts={"demo": "127.0.0.1"}, txt={"demo": [f"ports=3000:{backend.port}"]})
    timeout = 1.0
    p = proxy(sandboxes={}, config={"registry": {
        "kind": "dns", "nameservers": [dns_server.nameserver], "zone": "sandboxes.internal",
        "timeout": timeout}})
    pid = p.pid
    assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200
    probe, baseline = await baseline_of(p)
    async with LoadRecorder(p) as load:
        await asyncio.sleep(1.5)
        t_down = time.monotonic()
        dns_server.kill()
        await asyncio.sleep(4.0)  # answers are cached for their TTL (1 s), then 503
        t_up = time.monotonic()
        dns_server.start()
        await asyncio.sleep(4.0)
    figures = check_outage(load, "demo", t_down, t_up, timeout)
    assert p.alive() and p.pid == pid
    await assert_back_to(probe, baseline)
    print(f"dns killed: {figures}")


# --------------------------------------------------------------------------------------------
# A sandbox removed while 100 of its WebSockets are open
# --------------------------------------------------------------------------------------------


async def test_sandbox_removed_under_100_open_websockets_closes_them_all(proxy, backend,
                                                                        refused_port):
    reg = registry_with(backend, refused_port, doomed=backend.port)
    p = proxy(sandboxes=reg)
    probe, baseline = await baseline_of(p)
    ws_open_before = backend.state["ws_open"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as s:
        doomed = await asyncio.gather(*(
            s.ws_connect(p.url("/ws"), headers={"Host": "3000-doomed.localhost"})
            for _ in range(100)))
        kept = await asyncio.gather(*(
            s.ws_connect(p.url("/ws"), headers={"Host": "3000-demo.localhost"})
            for _ in range(5)))
        for ws in doomed + kept:
            await ws.send_str("hi")
        assert {(await ws.receive(timeout=5)).data for ws in doomed + kept} == {"hi"}
        assert (await probe.gauges())["open_streams"] == 105
        del reg["doomed"]
        p.write_registry(reg)
        removed_at = time.monotonic()
        ends = await asyncio.gather(*(ws.receive(timeout=10) for ws in doomed))
        took = time.monotonic() - removed_at
        assert {m.type for m in ends} <= {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                         aiohttp.WSMsgType.ERROR}
        # reload_interval is 0.2 s in the tests: all 100 closed within it and a little more
        assert took < 1.5, f"the last of 100 WebSockets closed {took:.2f} s after the removal"
        for ws in kept:
            await ws.send_str("still here")
            assert (await ws.receive(timeout=5)).data == "still here"
        assert (await probe.gauges())["open_streams"] == 5
        await wait_until(lambda: _true(backend.state["ws_open"] == ws_open_before + 5), 3)
        r = await fetch(p, "/echo", host="3000-doomed.localhost")
        assert r.status == 502 and r.json() == not_found_body("doomed")
        for ws in doomed + kept:
            await ws.close()
    await assert_back_to(probe, baseline)
    print(f"100 WebSockets of a removed sandbox closed within {took:.2f} s")
