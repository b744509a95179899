"""Streaming: 1 GiB both ways in bounded memory, SSE latency, chunked, HEAD/204/304,
100-continue, encoded bodies untouched, Content-Length kept."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import time

import aiohttp
import pytest

from support.backends import GZIP_BODY, GZIP_PLAIN, det_bytes, det_chunks, det_digest
from support.raw_http import RawConn, build_request, fetch, header_value, header_values

GiB = 1 << 30
MiB = 1 << 20
RSS_BUDGET = 50 * MiB
STALL_AFTER = 64 * MiB  # the receiving side stops reading for STALL seconds after this
STALL = 1.5

pytestmark = pytest.mark.timeout(120)


class RssSampler:
    """Samples the proxy's RSS every 50 ms while a transfer runs."""

    def __init__(self, p):
        self.p = p
        self.baseline = p.rss()
        self.peak = self.baseline
        self._task: asyncio.Task | None = None

    async def _run(self):
        while True:
            self.peak = max(self.peak, self.p.rss())
            await asyncio.sleep(0.05)

    async def __aenter__(self):
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc):
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self.peak = max(self.peak, self.p.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


async def warm_up(p):
    # let the proxy import and allocate what it needs for a streamed exchange first
    r = await fetch(p, f"/bytes?n={4 * MiB}", host=p.host())
    assert r.status == 200 and len(r.body) == 4 * MiB
    r = await fetch(p, "/upload", host=p.host(), method="POST", data=b"w" * (4 * MiB))
    assert r.status == 200


@pytest.mark.timeout(180)
async def test_1gib_download_intact_in_bounded_memory(proxy):
    p = proxy()
    await warm_up(p)
    n = GiB
    expected = det_digest(n)
    h = hashlib.sha256()
    received = 0
    timeout = aiohttp.ClientTimeout(total=150, sock_read=30)
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as s:
        async with RssSampler(p) as rss:
            async with s.get(p.url(f"/bytes?n={n}"), headers={"Host": p.host()}) as r:
                assert r.status == 200
                assert r.headers["Content-Length"] == str(n)
                assert "Transfer-Encoding" not in r.headers
                stalled = False
                async for piece in r.content.iter_chunked(MiB):
                    h.update(piece)
                    received += len(piece)
                    if not stalled and received >= STALL_AFTER:
                        # a slow reader: the backend must be held back, not buffered for
                        stalled = True
                        await asyncio.sleep(STALL)
    assert received == n
    assert h.hexdigest() == expected
    print(f"rss baseline={rss.baseline / MiB:.1f} MiB peak={rss.peak / MiB:.1f} MiB")
    assert rss.growth < RSS_BUDGET, (
        f"proxy RSS grew by {rss.growth / MiB:.1f} MiB (from {rss.baseline / MiB:.1f} MiB)"
    )


async def _gen(n: int, chunk: int = 256 * 1024):
    for piece in det_chunks(n, seed=7, chunk=chunk):
        yield bytes(piece)


@pytest.mark.timeout(180)
async def test_1gib_upload_intact_in_bounded_memory(proxy):
    p = proxy()
    await warm_up(p)
    n = GiB
    expected = det_digest(n, seed=7)
    timeout = aiohttp.ClientTimeout(total=150, sock_read=60)
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as s:
        async with RssSampler(p) as rss:
            async with s.post(p.url(f"/upload?stall_after={STALL_AFTER}&stall={STALL}"),
                              data=_gen(n),
                              headers={"Host": p.host(), "Content-Length": str(n),
                                       "Content-Type": "application/octet-stream"}) as r:
                assert r.status == 200
                echo = await r.json()
    assert echo["body_length"] == n
    assert echo["body_sha256"] == expected
    assert header_value(echo, "Content-Length") == str(n)
    assert header_values(echo, "Transfer-Encoding") == []
    print(f"rss baseline={rss.baseline / MiB:.1f} MiB peak={rss.peak / MiB:.1f} MiB")
    assert rss.growth < RSS_BUDGET, (
        f"proxy RSS grew by {rss.growth / MiB:.1f} MiB (from {rss.baseline / MiB:.1f} MiB)"
    )


async def test_chunked_upload_streamed(shared_proxy):
    n = 64 * MiB + 12345
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as s:
        # no Content-Length: aiohttp sends the generator chunked
        async with s.post(shared_proxy.url("/upload"), data=_gen(n, chunk=100_000),
                          headers={"Host": shared_proxy.host()}) as r:
            assert r.status == 200
            echo = await r.json()
    assert echo["body_length"] == n
    assert echo["body_sha256"] == det_digest(n, seed=7)


async def test_chunked_upload_raw_with_extensions_and_trailer(shared_proxy):
    data = det_bytes(300_000, seed=3)
    sizes = [1, 2, 4093, 65536, 100_000]
    body = bytearray()
    pos = 0
    for size in sizes:
        piece = data[pos : pos + size]
        body += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
        pos += size
    rest = data[pos:]
    body += f"{len(rest):X}\r\n".encode() + rest + b"\r\n"
    body += b"0\r\nX-Trailer: t\r\n\r\n"
    conn = await RawConn.open(shared_proxy.port)
    try:
        await conn.send(build_request("POST", "/upload", "3000-demo.localhost",
                                      [("Transfer-Encoding", "chunked")]) + bytes(body))
        resp = await conn.response(timeout=15)
        # the connection stays usable after a chunked request
        again = await conn.request("GET", "/echo?again", "3000-demo.localhost")
    finally:
        await conn.aclose()
    assert resp.status == 200, resp.body
    echo = resp.json()
    assert echo["body_length"] == len(data)
    assert echo["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert again.status == 200 and again.json()["raw_path"] == "/echo?again"


async def test_chunked_download_stays_chunked_and_connection_reusable(shared_proxy):
    n = 10 * MiB + 7
    conn = await RawConn.open(shared_proxy.port)
    try:
        resp = await conn.request("GET", f"/chunked?n={n}&seed=5", "3000-demo.localhost", timeout=30)
        again = await conn.request("GET", "/echo?after-chunked", "3000-demo.localhost")
    finally:
        await conn.aclose()
    assert resp.status == 200
    assert resp.chunked, resp.headers
    assert resp.header("Content-Length") is None
    assert len(resp.body) == n
    assert hashlib.sha256(resp.body).hexdigest() == det_digest(n, seed=5)
    assert again.status == 200 and again.json()["raw_path"] == "/echo?after-chunked"


async def test_content_length_preserved(shared_proxy):
    conn = await RawConn.open(shared_proxy.port)
    try:
        resp = await conn.request("GET", "/bytes?n=123457&seed=2", "3000-demo.localhost")
    finally:
        await conn.aclose()
    assert resp.status == 200
    assert resp.header_all("Content-Length") == ["123457"]
    assert resp.header("Transfer-Encoding") is None
    assert resp.body == det_bytes(123457, seed=2)


async def test_sse_events_arrive_as_written(shared_proxy):
    interval = 0.3
    n = 5
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as s:
        start = time.monotonic()
        async with s.get(shared_proxy.url(f"/sse?n={n}&interval={interval}"),
                         headers={"Host": shared_proxy.host(), "Accept": "text/event-stream"}) as r:
            t_head = time.monotonic()
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert "Content-Length" not in r.headers
            buf = b""
            arrivals: list[tuple[float, bytes]] = []
            async for data in r.content.iter_any():
                now = time.monotonic()
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    arrivals.append((now, event))
    assert [e for _, e in arrivals] == [
        f"id: {i}\nevent: tick\ndata: event {i}".encode() for i in range(n)
    ]
    assert t_head - start < 1.0, "response head was held back"
    assert arrivals[0][0] - start < 1.0, "first event was held back"
    first = arrivals[0][0]
    for i, (t, _) in enumerate(arrivals):
        offset = t - first
        assert abs(offset - i * interval) < 0.15, (
            f"event {i} arrived {offset:.3f} s after the first, expected ~{i * interval:.1f} s: "
            f"{[round(a - first, 3) for a, _ in arrivals]}"
        )


async def test_sse_long_gap_not_buffered(shared_proxy):
    # two events 1.2 s apart: the first must be readable long before the second is written
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.get(shared_proxy.url("/sse?n=2&interval=1.2"),
                         headers={"Host": shared_proxy.host()}) as r:
            start = time.monotonic()
            line = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            first = time.monotonic() - start
            assert line.startswith(b"id: 0\n")
            rest = await asyncio.wait_for(r.content.read(), 5)
    assert first < 0.6, f"first event took {first:.2f} s"
    assert rest.startswith(b"id: 1\n")


async def test_head_request(shared_proxy):
    conn = await RawConn.open(shared_proxy.port)
    try:
        head = await conn.request("HEAD", "/bytes?n=54321", "3000-demo.localhost")
        follow = await conn.request("GET", "/echo?after-head", "3000-demo.localhost")
    finally:
        await conn.aclose()
    assert head.status == 200
    assert head.header("Content-Length") == "54321"
    assert head.body == b""
    assert follow.status == 200 and follow.json()["raw_path"] == "/echo?after-head", follow.body


@pytest.mark.parametrize("code", [204, 304])
async def test_bodiless_statuses(shared_proxy, code):
    conn = await RawConn.open(shared_proxy.port)
    try:
        resp = await conn.request("GET", f"/status/{code}", "3000-demo.localhost",
                                  headers=[("If-None-Match", '"v1"')])
        follow = await conn.request("GET", f"/echo?after={code}", "3000-demo.localhost")
    finally:
        await conn.aclose()
    assert resp.status == code
    assert resp.header("ETag") == '"v1"'
    assert resp.header("X-Status") == str(code)
    assert resp.header("Transfer-Encoding") is None
    assert resp.body == b""
    assert follow.status == 200, follow.raw_head
    assert follow.json()["raw_path"] == f"/echo?after={code}"


async def test_expect_100_continue(shared_proxy):
    body = det_bytes(200_000, seed=9)
    conn = await RawConn.open(shared_proxy.port)
    try:
        await conn.send(build_request("POST", "/upload", "3000-demo.localhost", [
            ("Content-Length", str(len(body))),
            ("Expect", "100-continue"),
        ]))
        interim = await conn.read_head(timeout=5)
        assert interim.status == 100, f"expected 100 Continue before the body, got {interim.raw_head!r}"
        await conn.send(body)
        resp = await conn.response(timeout=10)
    finally:
        await conn.aclose()
    assert resp.status == 200, resp.body
    echo = resp.json()
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_gzip_body_untouched(shared_proxy):
    for accept in ("gzip, deflate, br", None, "identity"):
        headers = [("Accept-Encoding", accept)] if accept else []
        conn = await RawConn.open(shared_proxy.port)
        try:
            resp = await conn.request("GET", "/gzip", "3000-demo.localhost", headers=headers)
        finally:
            await conn.aclose()
        assert resp.status == 200
        assert resp.header("Content-Encoding") == "gzip"
        assert resp.header("Content-Length") == str(len(GZIP_BODY))
        assert resp.body == GZIP_BODY, f"body changed (Accept-Encoding: {accept})"
        assert gzip.decompress(resp.body) == GZIP_PLAIN


async def test_gzip_request_body_untouched(shared_proxy):
    r = await fetch(shared_proxy, "/upload", method="POST", data=GZIP_BODY,
                    headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
    assert r.status == 200
    echo = r.json()
    assert echo["body_sha256"] == hashlib.sha256(GZIP_BODY).hexdigest()
    assert header_value(echo, "Content-Encoding") == "gzip"
