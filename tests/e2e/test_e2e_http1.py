"""HTTP/1.1 on raw sockets: pipelining, limits, timeouts, malformed input, aborted
backends and connection reuse -- things client libraries refuse to do or hide."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.process import port_is_open
from support.raw_http import IncompleteResponse, RawConn, build_request, raw_backend

pytestmark = pytest.mark.timeout(60)

HOST = "3000-demo.localhost"


@contextlib.asynccontextmanager
async def connection(p):
    conn = await RawConn.open(p.port)
    try:
        yield conn
    finally:
        await conn.aclose()


# ---------------------------------------------------------------------------
# Pipelining and keep-alive
# ---------------------------------------------------------------------------


async def test_pipelined_requests_answered_in_order(shared_proxy):
    body = b"0123456789"
    batch = (
        build_request("GET", "/echo?i=1", HOST)
        + build_request("POST", "/upload?i=2", HOST, body=body)
        + build_request("GET", "/bytes?n=100&seed=1", HOST)
        + build_request("HEAD", "/bytes?n=777", HOST)
        + build_request("GET", "/echo?i=5", HOST)
    )
    async with connection(shared_proxy) as conn:
        await conn.send(batch)
        r1 = await conn.response()
        r2 = await conn.response()
        r3 = await conn.response()
        r4 = await conn.response(method="HEAD")
        r5 = await conn.response()
    assert r1.status == 200 and r1.json()["raw_path"] == "/echo?i=1"
    assert r2.status == 200 and r2.json()["raw_path"] == "/upload?i=2"
    assert r2.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert r3.status == 200 and len(r3.body) == 100
    assert r4.status == 200 and r4.header("Content-Length") == "777" and r4.body == b""
    assert r5.status == 200 and r5.json()["raw_path"] == "/echo?i=5"


async def test_pipelined_slow_first_response_keeps_order(shared_proxy):
    batch = (build_request("GET", "/slow-head?delay=0.5", HOST)
             + build_request("GET", "/echo?second", HOST))
    async with connection(shared_proxy) as conn:
        await conn.send(batch)
        r1 = await conn.response()
        r2 = await conn.response()
    assert r1.status == 200 and r1.body == b"slow done\n"
    assert r2.status == 200 and r2.json()["raw_path"] == "/echo?second"


async def test_keep_alive_one_client_connection_few_backend_connections(shared_proxy):
    peers = set()
    async with connection(shared_proxy) as conn:
        for i in range(50):
            r = await conn.request("GET", f"/echo?seq={i}", HOST)
            assert r.status == 200
            assert r.json()["raw_path"] == f"/echo?seq={i}"
            peers.add(r.json()["peer"])
    assert len(peers) <= 2, f"50 sequential requests used {len(peers)} backend connections"


async def test_backend_connections_pooled_across_client_connections(shared_proxy):
    peers = set()
    for i in range(30):
        async with connection(shared_proxy) as conn:
            r = await conn.request("GET", f"/echo?c={i}", HOST)
        assert r.status == 200
        peers.add(r.json()["peer"])
    assert len(peers) <= 3, f"30 sequential client connections used {len(peers)} backend connections"


async def test_pool_is_per_sandbox(shared_proxy):
    # demo and masked point at the same backend address; their connections must not mix
    demo_peers, masked_peers = set(), set()
    async with connection(shared_proxy) as conn:
        for i in range(10):
            a = await conn.request("GET", "/echo?a", "3000-demo.localhost")
            b = await conn.request("GET", "/echo?b", "3000-masked.localhost")
            demo_peers.add(a.json()["peer"])
            masked_peers.add(b.json()["peer"])
            assert [v for k, v in b.json()["headers"] if k.lower() == "host"] == ["localhost:3000"]
    assert not demo_peers & masked_peers, "a pooled backend connection crossed sandboxes"


async def test_concurrent_requests_no_crosstalk(shared_proxy):
    """120 concurrent requests over 30 client connections, each with its own body:
    every answer belongs to its own request."""
    import aiohttp

    async def one(session, i: int):
        body = f"request-{i}-".encode() * (i * 37 % 500 + 1)
        sid = "masked" if i % 3 == 0 else "demo"
        async with session.post(shared_proxy.url(f"/upload?i={i}"), data=body,
                                headers={"Host": f"3000-{sid}.localhost"}) as r:
            assert r.status == 200
            echo = await r.json()
        assert echo["raw_path"] == f"/upload?i={i}"
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        host = [v for k, v in echo["headers"] if k.lower() == "host"]
        assert host == (["localhost:3000"] if sid == "masked" else ["3000-demo.localhost"])

    conn = aiohttp.TCPConnector(limit=30)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(one(session, i) for i in range(120)))


async def test_stale_pooled_connection_is_not_an_error(shared_proxy):
    """The backend closes an idle keep-alive connection; the next request still works."""
    served = 0

    async def handler(reader, writer):
        nonlocal served
        try:
            await reader.readuntil(b"\r\n\r\n")
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.2)  # then close the idle connection
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async with raw_backend(handler) as port:
        host = f"{port}-demo.localhost"
        async with connection(shared_proxy) as conn:
            r1 = await conn.request("GET", "/one", host)
            await asyncio.sleep(0.6)
            r2 = await conn.request("GET", "/two", host)
    assert (r1.status, r1.body) == (200, b"ok")
    assert (r2.status, r2.body) == (200, b"ok"), r2.body
    assert served == 2


async def test_idle_keep_alive_longer_than_header_timeout_is_kept(proxy):
    p = proxy(config={"timeouts": {"client_header": 1.0}})
    async with connection(p) as conn:
        r1 = await conn.request("GET", "/echo?1", HOST)
        await asyncio.sleep(1.6)  # idle, well within client_idle
        r2 = await conn.request("GET", "/echo?2", HOST)
    assert r1.status == 200 and r2.status == 200
    assert r2.json()["raw_path"] == "/echo?2"


async def test_http10_client(shared_proxy):
    async with connection(shared_proxy) as conn:
        r = await conn.request("GET", "/echo?v10", HOST, version="HTTP/1.0")
        closed = await conn.closed(3)
    assert r.status == 200
    assert r.json()["raw_path"] == "/echo?v10"
    assert closed, "HTTP/1.0 without keep-alive: the proxy must close after the response"


async def test_connection_close_from_client(shared_proxy):
    async with connection(shared_proxy) as conn:
        r = await conn.request("GET", "/echo?bye", HOST, headers=[("Connection", "close")])
        closed = await conn.closed(3)
    assert r.status == 200 and r.json()["raw_path"] == "/echo?bye"
    assert closed


# ---------------------------------------------------------------------------
# Client header timeout
# ---------------------------------------------------------------------------


@pytest.fixture
def header_timeout_proxy(proxy):
    return proxy(config={"timeouts": {"client_header": 1.0}})


def assert_408_or_nothing(data: bytes) -> None:
    if data == b"":
        return
    assert data.startswith(b"HTTP/1.1 408") or data.startswith(b"HTTP/1.0 408"), data
    assert b"\r\naccess-control-allow-origin: *\r\n" in data.lower(), data


async def test_stalled_request_head_is_cut(header_timeout_proxy):
    async with connection(header_timeout_proxy) as conn:
        await conn.send(b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\nX-Partial: ")
        start = time.monotonic()
        closed = await conn.closed(4)
        elapsed = time.monotonic() - start
    assert closed, "a stalled request head must be cut after client_header"
    assert 0.7 <= elapsed <= 3.0, f"cut after {elapsed:.2f} s with client_header = 1.0"
    assert_408_or_nothing(conn.last_bytes)


async def test_trickled_request_head_is_cut(header_timeout_proxy):
    # config/proxy.toml: "a client must finish sending its request head within this"
    head = b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\n" + b"X-Slow: " + b"a" * 40
    async with connection(header_timeout_proxy) as conn:
        start = time.monotonic()
        watcher = asyncio.ensure_future(conn.closed(5))
        try:
            for b in head:
                if watcher.done() or time.monotonic() - start > 4:
                    break
                with contextlib.suppress(ConnectionError, OSError):
                    await conn.send(bytes([b]))
                await asyncio.sleep(0.1)
            cut = await watcher
        finally:
            watcher.cancel()
        elapsed = time.monotonic() - start
    assert cut, "trickling one header byte every 0.1 s kept the connection open"
    assert elapsed < 3.5


async def test_slow_body_is_not_cut_by_header_timeout(header_timeout_proxy):
    pieces = [bytes([65 + i]) * 1000 for i in range(10)]
    body = b"".join(pieces)
    async with connection(header_timeout_proxy) as conn:
        await conn.send(build_request("POST", "/upload", HOST,
                                      [("Content-Length", str(len(body)))]))
        for piece in pieces:
            await asyncio.sleep(0.25)
            await conn.send(piece)
        r = await conn.response()
    assert r.status == 200, r.body
    assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


# ---------------------------------------------------------------------------
# Limits and malformed requests
# ---------------------------------------------------------------------------


async def send_and_read(p, data: bytes):
    async with connection(p) as conn:
        await conn.send(data)
        r = await conn.response()
        closed_after = await conn.closed(3)
    return r, closed_after


async def test_oversized_header_is_431(shared_proxy, backend):
    before = backend.state["requests"]
    r, _ = await send_and_read(shared_proxy, build_request(
        "GET", "/echo", HOST, [("X-Big", "b" * 70_000)]))
    assert r.status == 431
    assert r.header("Access-Control-Allow-Origin") == "*"
    assert backend.state["requests"] == before


async def test_many_headers_over_byte_limit_is_431(shared_proxy):
    headers = [(f"X-H{i}", "v" * 700) for i in range(100)]  # ~71 KiB in all
    r, _ = await send_and_read(shared_proxy, build_request("GET", "/echo", HOST, headers))
    assert r.status == 431
    assert r.header("Access-Control-Allow-Origin") == "*"


async def test_too_many_headers_is_431(shared_proxy):
    headers = [(f"X-N{i}", "1") for i in range(210)]
    r, _ = await send_and_read(shared_proxy, build_request("GET", "/echo", HOST, headers))
    assert r.status == 431
    assert r.header("Access-Control-Allow-Origin") == "*"


async def test_head_just_under_limits_passes(shared_proxy):
    headers = [(f"X-H{i}", "v" * 300) for i in range(150)]  # ~48 KiB, 151 headers
    async with connection(shared_proxy) as conn:
        r = await conn.request("GET", "/echo?big-but-ok", HOST, headers=headers)
    assert r.status == 200
    assert len(r.json()["headers"]) >= 150


async def test_overlong_url_rejected(shared_proxy):
    target = "/echo?q=" + "u" * 70_000
    r, _ = await send_and_read(shared_proxy, build_request("GET", target, HOST))
    assert r.status in (414, 431)
    assert r.header("Access-Control-Allow-Origin") == "*"


@pytest.mark.parametrize("body", [
    pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="non-hex-size"),
    pytest.param(b"5\r\nhelloXX3\r\nabc\r\n0\r\n\r\n", id="missing-crlf-after-data"),
    pytest.param(b"ffffffffffffffffffffff\r\nabc\r\n0\r\n\r\n", id="size-overflow"),
    pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="negative-size"),
])
async def test_broken_chunked_body_is_400_and_closed(shared_proxy, body):
    data = build_request("POST", "/upload", HOST, [("Transfer-Encoding", "chunked")]) + body
    r, closed = await send_and_read(shared_proxy, data)
    assert r.status == 400, r.raw_head
    assert r.header("Access-Control-Allow-Origin") == "*"
    assert closed, "after a broken chunked body the connection must be closed"


async def test_invalid_content_length_is_400(shared_proxy, backend):
    before = backend.state["requests"]
    data = build_request("POST", "/upload", HOST, [("Content-Length", "abc")]) + b"abc"
    r, closed = await send_and_read(shared_proxy, data)
    assert r.status == 400
    assert r.header("Access-Control-Allow-Origin") == "*"
    assert closed
    assert backend.state["requests"] == before


async def test_garbage_request_line_is_400(shared_proxy):
    r, closed = await send_and_read(shared_proxy, b"HELLO\x01 WORLD\r\n\r\n")
    assert r.status == 400
    assert closed


# ---------------------------------------------------------------------------
# Backends that die
# ---------------------------------------------------------------------------


async def test_backend_abort_mid_content_length_body(shared_proxy):
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()

    async with raw_backend(handler) as port:
        async with connection(shared_proxy) as conn:
            await conn.send(build_request("GET", "/cl", f"{port}-demo.localhost"))
            with pytest.raises(IncompleteResponse) as exc:
                await conn.response(timeout=10)
    head = exc.value.head
    assert head is None or head.status == 200
    assert len(exc.value.received) < 1_000_000


async def test_backend_abort_mid_chunked_body(shared_proxy):
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3e8\r\n" + b"y" * 1000 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()

    async with raw_backend(handler) as port:
        async with connection(shared_proxy) as conn:
            await conn.send(build_request("GET", "/chunks", f"{port}-demo.localhost"))
            with pytest.raises(IncompleteResponse):
                # a complete response here would mean the proxy invented the last chunk
                await conn.response(timeout=10)


async def test_backend_closes_without_response_is_502(shared_proxy):
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with raw_backend(handler) as port:
        async with connection(shared_proxy) as conn:
            r = await conn.request("GET", "/nothing", f"{port}-demo.localhost")
    assert r.status == 502
    assert r.header("Access-Control-Allow-Origin") == "*"


@pytest.fixture
def killable_backend():
    """tests/support/backends.py in its own process, so it can be SIGKILLed."""
    script = Path(__file__).resolve().parent.parent / "support" / "backends.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--name", "killable"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), f"backend did not start: {line!r}"
        port = int(line.split()[1])
        assert port_is_open("127.0.0.1", port)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


@pytest.mark.parametrize("route", ["bytes", "chunked"])
async def test_backend_killed_mid_response(shared_proxy, killable_backend, route):
    proc, port = killable_backend
    n = 1 << 30
    async with connection(shared_proxy) as conn:
        await conn.send(build_request("GET", f"/{route}?n={n}", f"{port}-demo.localhost"))
        head = await conn.read_head(timeout=10)
        assert head.status == 200
        got = 0
        while got < 2 << 20:
            data = await asyncio.wait_for(conn.reader.read(1 << 20), 10)
            assert data, "closed before the backend was killed"
            got += len(data)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        # drain what was in flight; the connection must then end without completing
        tail = b""
        start = time.monotonic()
        while True:
            try:
                data = await asyncio.wait_for(conn.reader.read(1 << 20), 10)
            except (ConnectionError, OSError):
                break
            if not data:
                break
            got += len(data)
            tail = (tail + data)[-16:]
        assert time.monotonic() - start < 10
    assert got < n
    if route == "chunked":
        assert not tail.endswith(b"0\r\n\r\n"), "the proxy terminated a body the backend never finished"
