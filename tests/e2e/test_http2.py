"""HTTP/2 at the edge, end to end: real HTTP/2 clients (curl, httpx, nghttp, h2load, and a
client on the h2 library's state machine, tests/support/h2_client.py) against the real
`sandbox-proxy` process, with HTTP/1.1 backends behind it.

What these tests hold the proxy to: an HTTP/2 stream is routed, refused, masked and forwarded
exactly as an HTTP/1.1 request is; connection-specific fields never cross in either direction
(RFC 9113 8.2.2); bodies stream both ways within the flow-control windows, in bounded memory,
and a slow reader stops the backend instead of filling the proxy; trailers, SSE, HEAD, 204/304
and a backend dying mid-body keep their meaning; WebSockets ride RFC 8441 extended CONNECT to
an HTTP/1.1 upgrade; HTTP/1.1 clients on the same listener are unaffected; and h2 traffic is
counted and logged as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass

import httpx
import pytest
import trustme
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve

from support.backends import det_bytes, det_chunks, det_digest
from support.h2_client import (
    PREFACE,
    TLS_DOMAIN,
    WS_BINARY,
    WS_CLOSE,
    WS_TEXT,
    FrameConn,
    GoAwayFrame,
    H2Client,
    RssPeak,
    RstStreamFrame,
    fields,
    request_fields,
    serve_on,
    tls_client_context,
    write_tls_cert,
    ws_frame,
    ws_parse,
)
from support.process import (
    ProxyProcess,
    free_port,
    launch_proxy,
    standard_registry,
    wait_until,
)
from support.raw_http import (
    RawConn,
    fetch,
    header_value,
    header_values,
    metric_value,
    not_found_body,
)
from support.recording_backend import RecordingBackend

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
GiB = 1 << 30
TOKEN = "h2-s3cret-Token_7"
TOKEN_HEADER = "e2b-traffic-access-token"
N_RECORDING = 6
CONNECTION_SPECIFIC = ("connection", "keep-alive", "proxy-connection", "transfer-encoding",
                       "upgrade")


# --------------------------------------------------------------------------------------------
# The proxies of this module
# --------------------------------------------------------------------------------------------


@dataclass
class Edge:
    """A running proxy and the backends behind its sandboxes.

    demo / masked / refused: the standard registry (the aiohttp backend); locked: the same
    backend behind a traffic access token; rec0..rec5: recording backends (strict HTTP/1.1
    parsers that keep every byte); raw and ws: ports the tests serve by hand (``serve_on``)."""

    proxy: ProxyProcess
    recs: list[RecordingBackend]
    raw_port: int
    ws_port: int

    @property
    def port(self) -> int:
        return self.proxy.port

    def authority(self, sid: str = "demo", domain: str = "localhost") -> str:
        return f"3000-{sid}.{domain}"


def module_registry(backend_port: int, refused_port: int, recs: list[RecordingBackend],
                    raw_port: int, ws_port: int) -> dict:
    reg = standard_registry(backend_port, refused_port)
    reg["locked"] = {"host": "127.0.0.1", "ports": {3000: backend_port},
                     "traffic_access_token": TOKEN}
    reg["raw"] = {"host": "127.0.0.1", "ports": {3000: raw_port}}
    reg["ws"] = {"host": "127.0.0.1", "ports": {3000: ws_port}}
    for i, b in enumerate(recs):
        reg[f"rec{i}"] = {"host": "127.0.0.1", "ports": {3000: b.port}}
    return reg


@pytest.fixture(scope="module")
def recs(fleet):
    return [fleet.add(f"h2rec{i}") for i in range(N_RECORDING)]


@pytest.fixture(scope="module")
def hand_ports():
    return free_port(), free_port()


@pytest.fixture(scope="module")
def edge(tmp_path_factory, backend, refused_port, recs, hand_ports):
    """One plain-listener proxy (h2c by prior knowledge, HTTP/1.1 beside it)."""
    raw_port, ws_port = hand_ports
    p = launch_proxy(tmp_path_factory.mktemp("h2-edge"),
                     module_registry(backend.port, refused_port, recs, raw_port, ws_port))
    yield Edge(p, recs, raw_port, ws_port)
    p.stop()


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_edge(tmp_path_factory, backend, refused_port, recs, hand_ports, ca):
    """The same proxy behind its own TLS (ALPN h2 and http/1.1)."""
    raw_port, ws_port = hand_ports
    workdir = tmp_path_factory.mktemp("h2-tls-edge")
    cert_path, key_path = write_tls_cert(ca, workdir)
    p = launch_proxy(workdir, module_registry(backend.port, refused_port, recs, raw_port, ws_port),
                     config={"server": {"tls": {"cert": str(cert_path), "key": str(key_path)}}})
    yield Edge(p, recs, raw_port, ws_port)
    p.stop()


@pytest.fixture(scope="module")
def ca_file(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("h2-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@contextlib.asynccontextmanager
async def h2(port: int, **kw):
    client = await H2Client.open(port, **kw)
    try:
        yield client
    finally:
        await client.close()


async def run(*cmd: str, timeout: float = 60.0, stdin: bytes | None = None
              ) -> tuple[int, bytes, bytes]:
    """Run a command to completion on the event loop (the hand-written backends share it)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out, err


def echo_of(r) -> dict:
    assert r.status == 200, r.describe()
    return r.json()


# --------------------------------------------------------------------------------------------
# 1. Real clients: curl, httpx, nghttp, h2load; HTTP/1.1 beside them; http2 = false
# --------------------------------------------------------------------------------------------


async def test_curl_h2c_prior_knowledge(edge):
    """curl speaking HTTP/2 by prior knowledge on the plain listener gets an HTTP/2 answer from
    the sandbox's HTTP/1.1 backend, which sees a request the proxy framed (HTTP/1.1, its own
    X-Forwarded-*), and a POST body arrives intact."""
    url = f"http://{edge.authority()}:{edge.port}/echo?q=1"
    rc, out, err = await run("curl", "-sS", "--http2-prior-knowledge", "--connect-to",
                             f"::127.0.0.1:{edge.port}", "-w", "%{stderr}%{http_version} "
                             "%{http_code}", url)
    assert rc == 0, err
    assert err.decode().split() == ["2", "200"]
    echo = json.loads(out)
    assert echo["version"] == "1.1" and echo["raw_path"] == "/echo?q=1"
    assert header_value(echo, "X-Forwarded-Proto") == "http"
    assert header_value(echo, "X-Forwarded-For") == "127.0.0.1"
    body = det_bytes(300_000, seed=11)
    rc, out, err = await run("curl", "-sS", "--http2-prior-knowledge", "--connect-to",
                             f"::127.0.0.1:{edge.port}", "--data-binary", "@-", "-w",
                             "%{stderr}%{http_version} %{http_code}", url, stdin=body)
    assert rc == 0, err
    assert err.decode().split() == ["2", "200"]
    echo = json.loads(out)
    assert echo["method"] == "POST" and echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_curl_http2_over_tls_by_alpn(tls_edge, ca, ca_file):
    """Over the proxy's own TLS, ALPN offers h2 and curl --http2 gets HTTP/2; the backend sees
    X-Forwarded-Proto https. A client offering only http/1.1 is served HTTP/1.1 on the same
    port."""
    host = tls_edge.authority(domain=TLS_DOMAIN)
    rc, out, err = await run("curl", "-sS", "--http2", "--cacert", ca_file, "--resolve",
                             f"{host}:{tls_edge.port}:127.0.0.1", "-w",
                             "%{stderr}%{http_version} %{http_code}",
                             f"https://{host}:{tls_edge.port}/echo")
    assert rc == 0, err
    assert err.decode().split() == ["2", "200"]
    assert header_value(json.loads(out), "X-Forwarded-Proto") == "https"
    # the ALPN choice itself, and HTTP/1.1 for a client that does not offer h2
    for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", tls_edge.port, ssl=tls_client_context(ca, offered),
            server_hostname=host)
        try:
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == chosen
            if chosen == "http/1.1":
                r = await RawConn(reader, writer).request("GET", "/echo", host)
                assert r.status == 200 and r.version == "HTTP/1.1"
                assert header_value(r.json(), "X-Forwarded-Proto") == "https"
        finally:
            writer.close()


async def test_httpx_http2_over_tls_and_h2c(edge, tls_edge, ca):
    """httpx with http2=True negotiates HTTP/2 over TLS (ALPN) and speaks it by prior
    knowledge on the plain listener; both get the backend's answer."""
    host = tls_edge.authority(domain=TLS_DOMAIN)
    async with httpx.AsyncClient(http2=True, verify=tls_client_context(ca), trust_env=False,
                                 timeout=20) as client:
        r = await client.get(f"https://127.0.0.1:{tls_edge.port}/echo?via=tls",
                             headers={"Host": host}, extensions={"sni_hostname": host})
    assert r.http_version == "HTTP/2" and r.status_code == 200
    assert r.json()["raw_path"] == "/echo?via=tls"
    assert header_value(r.json(), "Host") == host
    async with httpx.AsyncClient(http1=False, http2=True, trust_env=False, timeout=20) as client:
        r = await client.post(f"http://127.0.0.1:{edge.port}/echo?via=h2c",
                              headers={"Host": edge.authority()}, content=b"x" * 100_000)
    assert r.http_version == "HTTP/2" and r.status_code == 200
    assert r.json()["raw_path"] == "/echo?via=h2c" and r.json()["body_length"] == 100_000


async def test_nghttp_client(edge, tmp_path):
    """nghttp (nghttp2's client) completes the handshake, sees the proxy's SETTINGS (extended
    CONNECT offered), and gets the backend's answers to a GET and an upload."""
    rc, out, err = await run("nghttp", "-nv", f"http://127.0.0.1:{edge.port}/echo",
                             "-H", f":authority: {edge.authority()}")
    text = out.decode()
    assert rc == 0, text + err.decode()
    assert "SETTINGS_ENABLE_CONNECT_PROTOCOL(0x08):1" in text, text
    assert ":status: 200" in text, text
    body = det_bytes(200_000, seed=3)
    data = tmp_path / "upload.bin"
    data.write_bytes(body)
    rc, out, err = await run("nghttp", "-d", str(data), f"http://127.0.0.1:{edge.port}/upload",
                             "-H", f":authority: {edge.authority()}")
    assert rc == 0, err
    echo = json.loads(out)
    assert echo["method"] == "POST" and echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_h2load_short_run_all_2xx(edge):
    """h2load: 300 requests on 3 connections, 10 streams at a time each: every one is a 2xx."""
    rc, out, err = await run("h2load", "-n", "300", "-c", "3", "-m", "10",
                             f"http://127.0.0.1:{edge.port}/echo",
                             "-H", f":authority: {edge.authority()}")
    text = out.decode()
    assert rc == 0, text + err.decode()
    assert "300 total, 300 started, 300 done, 300 succeeded, 0 failed, 0 errored" in text, text
    assert "status codes: 300 2xx, 0 3xx, 0 4xx, 0 5xx" in text, text


async def test_http1_clients_share_the_listener(edge):
    """HTTP/1.1 is untouched by HTTP/2 on the same plain port: aiohttp, a keep-alive raw
    client, and requests whose first bytes look like the start of the HTTP/2 preface ("P" of
    POST/PUT arriving alone) are all served as HTTP/1.1."""
    r = await fetch(edge.proxy, "/echo", host=edge.authority())
    assert r.status == 200 and r.json()["version"] == "1.1"
    conn = await RawConn.open(edge.port)
    try:
        for method in ("POST", "PUT", "PATCH"):
            head = (f"{method} /echo HTTP/1.1\r\nHost: {edge.authority()}\r\n"
                    f"Content-Length: 5\r\n\r\nhello").encode()
            await conn.send(head[:1])  # "P": also the first byte of "PRI * HTTP/2.0"
            await asyncio.sleep(0.05)  # not synchronisation: so that "P" likely arrives alone
            await conn.send(head[1:])
            r = await conn.response()
            assert r.status == 200 and r.version == "HTTP/1.1", r.body
            assert r.json()["method"] == method and r.json()["body_length"] == 5
    finally:
        await conn.aclose()
    # an HTTP/1.0 client too
    conn = await RawConn.open(edge.port)
    try:
        r = await conn.request("GET", "/echo", edge.authority(), version="HTTP/1.0")
        assert r.status == 200
    finally:
        await conn.aclose()


async def test_http2_off_refuses_h2c_and_offers_only_http11(proxy, tmp_path, ca, ca_file):
    """With [server] http2 = false the preface is not HTTP/2 to the proxy (no SETTINGS come
    back, curl's prior knowledge fails), TLS offers only http/1.1 by ALPN (curl --http2 falls
    back to 1.1), and HTTP/1.1 is served as before."""
    p = proxy(config={"server": {"http2": False}})
    conn = await RawConn.open(p.port)
    try:
        await conn.send(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        assert await conn.closed(5)
        got = conn.last_bytes
    finally:
        await conn.aclose()
    # read as an HTTP/1.1 request line ("PRI * HTTP/2.0"), refused as one: no SETTINGS frame
    assert got.startswith(b"HTTP/1.1 400 "), got[:200]
    rc, _, _ = await run("curl", "-sS", "--http2-prior-knowledge", "--max-time", "10",
                         "--connect-to", f"::127.0.0.1:{p.port}",
                         f"http://3000-demo.localhost:{p.port}/echo")
    assert rc != 0
    assert (await fetch(p, "/echo")).status == 200

    cert_path, key_path = write_tls_cert(ca, tmp_path, "off")
    t = proxy(config={"server": {"http2": False, "tls": {"cert": str(cert_path),
                                                         "key": str(key_path)}}})
    host = f"3000-demo.{TLS_DOMAIN}"
    _, writer = await asyncio.open_connection(
        "127.0.0.1", t.port, ssl=tls_client_context(ca, ["h2", "http/1.1"]), server_hostname=host)
    try:
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    finally:
        writer.close()
    rc, _, err = await run("curl", "-sS", "--http2", "--cacert", ca_file, "--resolve",
                           f"{host}:{t.port}:127.0.0.1", "-w",
                           "%{stderr}%{http_version} %{http_code}",
                           f"https://{host}:{t.port}/echo")
    assert rc == 0, err
    assert err.decode().split() == ["1.1", "200"]


# --------------------------------------------------------------------------------------------
# 2. Per-stream routing, exactly like HTTP/1.1
# --------------------------------------------------------------------------------------------


async def h1_answer(port: int, host: str, headers=None) -> tuple[int, str | None, bytes]:
    conn = await RawConn.open(port)
    try:
        r = await conn.request("GET", "/echo", host, headers)
    finally:
        await conn.aclose()
    return r.status, r.header("Content-Type"), r.body


@pytest.mark.parametrize("host", ["3000-nope.localhost", "3000-refused.localhost",
                                  "nodash.localhost", "3000-demo.unserved.example",
                                  "3000-locked.localhost"])
async def test_proxy_answers_match_http1(edge, host):
    """Every answer the proxy makes itself (unknown sandbox, port not open, malformed Host,
    unserved domain, missing token) is the same on an HTTP/2 stream as on HTTP/1.1: status,
    Content-Type, body byte for byte, and CORS open."""
    status, ctype, body = await h1_answer(edge.port, host)
    assert status >= 400
    async with h2(edge.port) as c:
        r = await c.request(host, "/echo")
    assert r.ended, r.describe()
    assert (r.status, r.header("content-type"), r.body) == (status, ctype, body)
    assert r.header("access-control-allow-origin") == "*"
    if host == "3000-nope.localhost":
        assert r.json() == not_found_body("nope")


async def test_traffic_token_checked_per_stream(edge):
    """A locked sandbox needs its token on HTTP/2 too: missing and wrong tokens get the 403
    JSON users know (identical to HTTP/1.1's), the right one passes and is not forwarded."""
    host = edge.authority("locked")
    async with h2(edge.port) as c:
        missing = await c.request(host)
        wrong = await c.request(host, headers=[(TOKEN_HEADER, "wrong")])
        right = await c.request(host, headers=[(TOKEN_HEADER, TOKEN)])
    assert missing.status == 403 and missing.json() == {
        "sandboxId": "locked", "code": 403, "message": "Sandbox is secured with traffic access "
        f"token. Token header '{TOKEN_HEADER}' is missing"}
    assert (403, missing.body) == (await h1_answer(edge.port, host))[::2]
    assert wrong.status == 403 and "is invalid" in wrong.json()["message"]
    assert (403, wrong.body) == (await h1_answer(edge.port, host, [(TOKEN_HEADER, "wrong")]))[::2]
    echo = echo_of(right)
    assert header_value(echo, TOKEN_HEADER) is None


async def test_host_mask_and_forwarding_headers(edge):
    """The Host mask applies per stream (the backend sees localhost:3000), X-Forwarded-For/
    -Proto/-Host are the proxy's own, and forged client-address fields never reach the
    backend, whatever their spelling."""
    forged = [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-host", "evil.example"),
              ("x-forwarded-proto", "https"), ("forwarded", "for=6.6.6.6"),
              ("x-real-ip", "6.6.6.6"), ("x_forwarded_for", "6.6.6.6"),
              ("true-client-ip", "6.6.6.6")]
    async with h2(edge.port) as c:
        masked = echo_of(await c.request(edge.authority("masked"), headers=forged))
        plain = echo_of(await c.request(edge.authority("demo"), headers=forged))
    assert header_value(masked, "Host") == "localhost:3000"
    assert header_value(plain, "Host") == edge.authority("demo")
    for echo, sid in ((masked, "masked"), (plain, "demo")):
        assert header_value(echo, "X-Forwarded-For") == "127.0.0.1"
        assert header_value(echo, "X-Forwarded-Proto") == "http"
        assert header_value(echo, "X-Forwarded-Host") == edge.authority(sid)
        for name in ("forwarded", "x-real-ip", "x_forwarded_for", "true-client-ip"):
            assert header_values(echo, name) == [], name
        assert "6.6.6.6" not in json.dumps(echo["headers"]) and "evil" not in json.dumps(echo)


async def test_many_streams_to_different_sandboxes_never_cross(edge, fleet):
    """96 concurrent streams on one connection, spread over six sandboxes (GETs and POSTs):
    each answer is its own sandbox's answer to its own request, and each backend received
    exactly the requests addressed to it, as well-formed HTTP/1.1."""
    fleet.reset()
    async with h2(edge.port) as c:
        plan = []
        for i in range(96):
            k = i % N_RECORDING
            marker = f"s{i}x"
            body = det_bytes(1000 + i * 37, seed=i) if i % 3 == 0 else None
            sid = c.start(request_fields(edge.authority(f"rec{k}"), f"/m/{marker}/",
                                         "POST" if body else "GET"), end_stream=body is None)
            plan.append((sid, k, marker, body))
        for sid, _, _, body in plan:
            if body is not None:
                await c.send_data(sid, body, end_stream=True)
        results = [await c.response(sid) for sid, *_ in plan]
    for (_, k, marker, _), r in zip(plan, results):
        assert r.status == 200 and r.ended, r.describe()
        assert r.body == f"h2rec{k}:{marker}".encode()
        assert r.header("x-test-id") == marker
    fleet.quiet()
    for k, rec in enumerate(edge.recs):
        assert rec.errors() == []
        got = {req.marker: req for req in rec.requests()}
        want = {marker: body for _, kk, marker, body in plan if kk == k}
        assert set(got) == set(want)
        for marker, body in want.items():
            assert got[marker].body == (body or b"")
            assert got[marker].header("host") == edge.authority(f"rec{k}").encode()


# --------------------------------------------------------------------------------------------
# 3. Connection-specific fields (RFC 9113 8.2.2) and cookie crumbs
# --------------------------------------------------------------------------------------------


def response_with(head_fields: list[tuple[str, str]], body: bytes, chunked: bool,
                  trailers: bytes = b"") -> bytes:
    head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head_fields)
    if chunked:
        half = len(body) // 2
        payload = (b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n%s\r\n"
                   % (half, body[:half], len(body) - half, body[half:], trailers))
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + payload
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_backend_connection_fields_never_reach_the_h2_client(edge, chunked):
    """A backend's Connection, Keep-Alive, Transfer-Encoding, Upgrade and Proxy-Connection, and
    the fields its Connection names, never appear in the HTTP/2 response (a client that does
    not validate is used, to see what was really sent); the other fields and the body do."""
    body = b"the body stays" * 100

    async def handler(reader, writer):
        await read_request_head(reader)
        writer.write(response_with([("Connection", "keep-alive, X-Private"),
                                    ("Keep-Alive", "timeout=5"), ("Upgrade", "h2c"),
                                    ("Proxy-Connection", "keep-alive"),
                                    ("X-Private", "hop secret"), ("X-Kept", "yes")],
                                   body, chunked))
        await writer.drain()
        writer.close()

    async with serve_on(edge.raw_port, handler), h2(edge.port, validate=False) as c:
        r = await c.request(edge.authority("raw"), "/")
    assert r.status == 200 and r.ended and r.body == body, r.describe()
    names = {k.decode() for k, _ in r.headers}
    assert names.isdisjoint({*CONNECTION_SPECIFIC, "x-private", "te"}), r.headers
    assert r.header("x-kept") == "yes"
    assert r.header("content-length") == (None if chunked else str(len(body)))


async def test_te_trailers_is_accepted(edge, fleet):
    """`te: trailers` is the one connection-specific field HTTP/2 allows: the stream is served,
    and the backend is told trailers are welcome (TE: trailers with Connection: TE)."""
    fleet.reset()
    async with h2(edge.port) as c:
        r = await c.request(edge.authority("rec0"), "/m/te1x/", headers=[("te", "trailers")])
    assert r.status == 200, r.describe()
    fleet.quiet()
    [req] = [q for q in edge.recs[0].requests() if q.marker == "te1x"]
    assert req.header_all("te") == [b"trailers"]
    assert b"te" in req.connection_tokens()


@pytest.mark.parametrize("name, value", [
    ("connection", "keep-alive"), ("keep-alive", "timeout=5"),
    ("proxy-connection", "keep-alive"), ("transfer-encoding", "chunked"),
    ("upgrade", "websocket"), ("te", "gzip"), ("te", "trailers, deflate"),
])
async def test_connection_specific_request_fields_are_refused(edge, fleet, name, value):
    """A request carrying a connection-specific field is malformed in HTTP/2 (RFC 9113 8.2.2):
    the client gets a PROTOCOL_ERROR (GOAWAY or RST_STREAM) and nothing reaches the backend."""
    fleet.reset()
    rec = edge.recs[1]
    f = await FrameConn.open(edge.port)
    try:
        sid = f.new_stream()
        f.send(f.headers(sid, request_fields(edge.authority("rec1"), "/m/bad1x/",
                                             extra=[(name, value)])))
        end = await f.until(lambda fr: isinstance(fr, (GoAwayFrame, RstStreamFrame))
                            or f.status(sid) is not None)
    finally:
        await f.aclose()
    assert isinstance(end, (GoAwayFrame, RstStreamFrame)), (
        f"{name}: {value} was answered {f.status(sid)}, not refused")
    assert end.error_code == ErrorCodes.PROTOCOL_ERROR
    fleet.quiet()
    assert rec.bytes_received() == 0, rec.raw()[:300]


@pytest.mark.parametrize("host", ["3000-rec1.localhost", "other.example", "3000-REC0.localhost"])
async def test_host_differing_from_authority_is_refused(edge, fleet, host):
    """A request whose Host names another entity than its :authority is malformed (RFC 9113
    8.3.1): 400, and it reaches neither sandbox (one request naming two sandboxes must not be
    routed by one and read by the other). Case alone does not make them differ."""
    fleet.reset()
    f = await FrameConn.open(edge.port)
    try:
        sid = f.new_stream()
        f.send(f.headers(sid, request_fields(edge.authority("rec0"), "/m/twohost1x/",
                                             extra=[("host", host)])))
        await f.until(lambda fr: f.status(sid) is not None
                      or isinstance(fr, (GoAwayFrame, RstStreamFrame)))
    finally:
        await f.aclose()
    fleet.quiet()
    if host.lower() == edge.authority("rec0").lower():
        assert f.status(sid) == 200
        assert [r.marker for r in edge.recs[0].requests()] == ["twohost1x"]
        return
    assert f.status(sid) == 400, (f.status(sid), f.resets(), f.goaways())
    for rec in edge.recs:
        assert rec.bytes_received() == 0, rec.raw()[:300]


# Every byte that could re-split the HTTP/1.1 head the backend parses, in every place an HTTP/2
# request carries text that ends up in that head: field values and names (CR, LF, NUL) and the
# request line (:method, :path: controls, space, tab, DEL).
_SPLITTERS = [b"\r", b"\n", b"\r\n", b"\x00"]
_LINE_BREAKERS = [*_SPLITTERS, b" ", b"\t", b"\x7f", b"\x01", b"\x1f"]
_SMUGGLE = b"X-Smuggled: 1"
_INJECTIONS = (
    [("value", ch) for ch in _SPLITTERS]
    + [("name", ch) for ch in _SPLITTERS]
    + [(":path", ch) for ch in _LINE_BREAKERS]
    + [(":method", ch) for ch in _LINE_BREAKERS]
)


@pytest.mark.parametrize("where, ch", _INJECTIONS,
                         ids=[f"{w}-{c!r}" for w, c in _INJECTIONS])
async def test_bytes_that_would_split_the_backend_head_never_reach_it(edge, fleet, where, ch):
    """No byte an HTTP/2 client puts in a field or the request line can re-split the HTTP/1.1
    head the backend reads: such a request is refused (PROTOCOL_ERROR, or 400 for a request
    line HTTP/1.1 could not carry) and nothing of it reaches the backend."""
    fleet.reset()
    rec = edge.recs[1]
    path, method, extra = b"/m/inj1x/", b"GET", [(b"x-probe", b"ok")]
    if where == "value":
        extra = [(b"x-probe", b"a" + ch + _SMUGGLE)]
    elif where == "name":
        extra = [(b"x-pro" + ch + b"be", b"ok")]
    elif where == ":path":
        path = b"/m/inj1x/a" + ch + b"HTTP/1.1"
    else:
        method = b"GET" + ch + b"/"
    f = await FrameConn.open(edge.port)
    try:
        sid = f.new_stream()
        f.send(f.headers(sid, [(b":method", method), (b":scheme", b"http"),
                               (b":authority", edge.authority("rec1").encode()),
                               (b":path", path), *extra]))
        end = await f.until(lambda fr: isinstance(fr, (GoAwayFrame, RstStreamFrame))
                            or f.status(sid) is not None)
    finally:
        await f.aclose()
    if isinstance(end, (GoAwayFrame, RstStreamFrame)):
        assert end.error_code == ErrorCodes.PROTOCOL_ERROR
    else:
        assert f.status(sid) == 400, f"{where} {ch!r} was answered {f.status(sid)}"
    fleet.quiet()
    assert rec.bytes_received() == 0, rec.raw()[:300]


async def test_cookie_crumbs_are_joined(edge, fleet):
    """Cookie crumbs (several `cookie` fields, RFC 9113 8.2.3) reach the HTTP/1.1 backend as one
    Cookie header joined by "; ", in order."""
    fleet.reset()
    async with h2(edge.port) as c:
        r = await c.request(edge.authority("rec2"), "/m/ck1x/", headers=[
            ("cookie", "a=1"), ("accept", "*/*"), ("cookie", "b=2; c=3"), ("cookie", "d=4")])
    assert r.status == 200, r.describe()
    fleet.quiet()
    [req] = [q for q in edge.recs[2].requests() if q.marker == "ck1x"]
    assert req.header_all("cookie") == [b"a=1; b=2; c=3; d=4"]


# --------------------------------------------------------------------------------------------
# 4. Request and response bodies, flow control, memory
# --------------------------------------------------------------------------------------------


async def test_post_with_content_length(edge):
    """A POST with content-length reaches the backend with that Content-Length (no chunked),
    every byte intact, although it crosses many DATA frames and window updates."""
    n = 3 * MiB + 17
    body = det_bytes(n, seed=5)
    async with h2(edge.port) as c:
        echo = echo_of(await c.request(edge.authority(), "/upload", "POST", body=body,
                                       headers=[("content-length", str(n))]))
    assert echo["body_length"] == n and echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert header_value(echo, "Content-Length") == str(n)
    assert header_values(echo, "Transfer-Encoding") == []


async def test_post_without_content_length_is_chunked_with_trailers(edge, fleet):
    """A body of unknown length (no content-length, uneven DATA frames, request trailers) goes
    to the HTTP/1.1 backend chunked: every byte, and the trailer field, arrive."""
    fleet.reset()
    body = det_bytes(700_001, seed=9)
    async with h2(edge.port) as c:
        sid = c.start(request_fields(edge.authority("rec3"), "/m/ch1x/", "POST"),
                      end_stream=False)
        for size in (1, 4095, 16384, 100_000, 250_000):
            piece, body_left = body[:size], body[size:]
            await c.send_data(sid, piece)
            body = body_left
        await c.send_data(sid, body)
        c.end(sid, trailers=fields([("x-checksum", "abc123")]))
        r = await c.response(sid)
    assert r.status == 200 and r.body == b"h2rec3:ch1x", r.describe()
    fleet.quiet()
    [req] = [q for q in edge.recs[3].requests() if q.marker == "ch1x"]
    assert req.framing == "chunked" and req.header("content-length") is None
    assert req.body == det_bytes(700_001, seed=9)
    assert (b"x-checksum", b"abc123") in [(k.lower(), v) for k, v in req.trailers]


RSS_BUDGET = 64 * MiB  # a GiB through the proxy may cost its buffers, never the GiB


async def warm_up(p: ProxyProcess) -> None:
    # imports and first allocations of a streamed h2 exchange, before the baseline
    rc, _, err = await run("curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null",
                           "--connect-to", f"::127.0.0.1:{p.port}",
                           f"http://3000-demo.localhost:{p.port}/bytes?n={8 * MiB}")
    assert rc == 0, err


@pytest.mark.timeout(180)
async def test_1gib_download_on_one_stream_in_bounded_memory(proxy):
    """1 GiB from the backend to curl on one HTTP/2 stream arrives intact (SHA-256) while the
    proxy's RSS grows by less than RSS_BUDGET."""
    p = proxy()
    await warm_up(p)
    expected = det_digest(GiB)
    script = ("set -o pipefail; curl -sS --http2-prior-knowledge --max-time 150 "
              f"--connect-to ::127.0.0.1:{p.port} -w '%{{stderr}}%{{http_version}} "
              f"%{{http_code}} %{{size_download}}' "
              f"'http://3000-demo.localhost:{p.port}/bytes?n={GiB}' | sha256sum")
    async with RssPeak(p.rss) as rss:
        rc, out, err = await run("bash", "-c", script, timeout=170)
    assert rc == 0, err
    assert err.decode().split() == ["2", "200", str(GiB)]
    assert out.split()[0].decode() == expected
    print(f"rss baseline={rss.baseline / MiB:.1f} MiB peak={rss.peak / MiB:.1f} MiB")
    assert rss.growth < RSS_BUDGET, f"proxy RSS grew by {rss.growth / MiB:.1f} MiB"


@pytest.mark.timeout(180)
async def test_1gib_upload_on_one_stream_in_bounded_memory(proxy):
    """1 GiB from curl to the backend on one HTTP/2 stream, the backend pausing for a second
    after 64 MiB (so the client must be held back by the stream's window, not buffered for):
    every byte arrives (SHA-256) and the proxy's RSS grows by less than RSS_BUDGET."""
    p = proxy()
    await warm_up(p)
    expected = det_digest(GiB, seed=7)
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--http2-prior-knowledge", "--max-time", "150", "-X", "POST", "-T", "-",
        "-H", f"Content-Length: {GiB}", "--connect-to", f"::127.0.0.1:{p.port}",
        "-w", "%{stderr}%{http_version} %{http_code}",
        f"http://3000-demo.localhost:{p.port}/upload?stall_after={64 * MiB}&stall=1",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)

    async def feed() -> None:
        assert proc.stdin is not None
        for piece in det_chunks(GiB, seed=7):
            proc.stdin.write(piece)
            await proc.stdin.drain()
        proc.stdin.close()

    async with RssPeak(p.rss) as rss:
        feeding = asyncio.ensure_future(feed())
        out, err = await asyncio.wait_for(proc.communicate(), 170)
        await feeding
    assert proc.returncode == 0, err
    assert err.decode().split() == ["2", "200"]
    echo = json.loads(out)
    assert echo["body_length"] == GiB and echo["body_sha256"] == expected
    assert header_value(echo, "Content-Length") == str(GiB)
    print(f"rss baseline={rss.baseline / MiB:.1f} MiB peak={rss.peak / MiB:.1f} MiB")
    assert rss.growth < RSS_BUDGET, f"proxy RSS grew by {rss.growth / MiB:.1f} MiB"


async def test_client_slower_than_the_backend_gets_the_whole_body(edge):
    """A client that reads steadily but slower than the backend writes (curl limited to 64 MB/s,
    as a browser on a slow link) makes the proxy pause and resume the backend many times; it
    still receives every byte of a 64 MiB body and the stream ends cleanly: pausing for a slow
    reader is never mistaken for a client that does not read."""
    n = 64 * MiB
    script = ("set -o pipefail; curl -sS --http2-prior-knowledge --limit-rate 64M --max-time 60 "
              f"--connect-to ::127.0.0.1:{edge.port} -w '%{{stderr}}%{{http_version}} "
              f"%{{http_code}} %{{size_download}}' "
              f"'http://{edge.authority()}:{edge.port}/bytes?n={n}&seed=8' | sha256sum")
    rc, out, err = await run("bash", "-c", script, timeout=90)
    assert rc == 0, err
    assert err.decode().split() == ["2", "200", str(n)]
    assert out.split()[0].decode() == det_digest(n, seed=8)


async def test_slow_reader_stops_the_backend(edge):
    """A client that gives no window (reads nothing) makes the proxy stop reading the backend:
    the backend's writes block after a bounded amount, far short of the response, and the
    proxy's memory does not grow. When the client reads again, every byte arrives, in order."""
    n = 64 * MiB
    written = 0
    finished = asyncio.Event()

    async def handler(reader, writer):
        nonlocal written
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
        for piece in det_chunks(n, seed=4, chunk=64 * 1024):
            writer.write(piece)
            await writer.drain()
            written += len(piece)
        finished.set()

    async with serve_on(edge.raw_port, handler), h2(edge.port, auto_window=False) as c:
        async with RssPeak(edge.proxy.rss) as rss:
            sid = c.start(request_fields(edge.authority("raw"), "/slow"))
            head = await c.head(sid)
            assert head.status == 200

            seen = []

            async def stalled() -> bool:
                seen.append(written)
                return len(seen) > 5 and seen[-1] == seen[-6] and written > 0
            await wait_until(stalled, timeout=20, interval=0.1)
        held = written
        print(f"backend held after {held / MiB:.1f} MiB; proxy RSS +{rss.growth / MiB:.1f} MiB")
        assert held < 32 * MiB, f"the backend wrote {held / MiB:.1f} MiB to a client reading none"
        assert rss.growth < 16 * MiB, f"proxy RSS grew by {rss.growth / MiB:.1f} MiB"
        assert len(c.streams[sid].response.received) <= 65535  # the client's initial window
        c.auto_window = True
        c.open_window(sid)
        r = await c.response(sid, timeout=60)
        await asyncio.wait_for(finished.wait(), 10)
    assert r.ended and len(r.body) == n, r.describe()
    assert hashlib.sha256(r.body).hexdigest() == det_digest(n, seed=4)


# --------------------------------------------------------------------------------------------
# 5. SSE, HEAD, 204/304, trailers, a backend that dies mid-body
# --------------------------------------------------------------------------------------------


async def test_sse_events_arrive_as_they_are_sent(edge):
    """Each Server-Sent Event reaches the HTTP/2 client while the backend is still waiting to
    send the next one: the backend writes event i+1 only after the client has received event i,
    so a proxy that buffered would never get past the first."""
    received = [asyncio.Event() for _ in range(5)]

    async def handler(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(5):
            event = f"id: {i}\ndata: event {i}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.wait_for(received[i].wait(), 10)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with serve_on(edge.raw_port, handler), h2(edge.port) as c:
        sid = c.start(request_fields(edge.authority("raw"), "/events",
                                     extra=[("accept", "text/event-stream")]))
        head = await c.head(sid)
        assert head.status == 200 and head.header("content-type") == "text/event-stream"
        buf = b""
        for i in range(5):
            while b"\n\n" not in buf:
                chunk = await c.chunk(sid)
                assert chunk is not None, f"stream ended before event {i}"
                buf += chunk
            event, buf = buf.split(b"\n\n", 1)
            assert event == f"id: {i}\ndata: event {i}".encode()
            received[i].set()
        r = await c.response(sid)
    assert r.ended and r.reset is None


async def test_head_204_and_304_have_no_body(edge):
    """HEAD keeps the Content-Length of the body it does not carry; 204 and 304 end with their
    HEADERS frame; a request after them on the same connection is served."""
    async with h2(edge.port) as c:
        head = await c.request(edge.authority(), "/bytes?n=54321", "HEAD")
        s204 = await c.request(edge.authority(), "/status/204")
        s304 = await c.request(edge.authority(), "/status/304")
        after = await c.request(edge.authority(), "/echo?after")
    assert head.status == 200 and head.ended and head.body == b""
    assert head.header("content-length") == "54321"
    for r, code in ((s204, 204), (s304, 304)):
        assert r.status == code and r.ended and r.body == b"", r.describe()
        assert r.header("etag") == '"v1"'
    assert s204.header("content-length") is None
    assert echo_of(after)["raw_path"] == "/echo?after"


async def test_chunked_response_trailers_reach_the_h2_client(edge):
    """Trailers of a chunked backend response arrive as an HTTP/2 trailing HEADERS frame (with
    END_STREAM), minus the fields a trailer may not carry; the body is intact."""
    body = det_bytes(100_000, seed=2)

    async def handler(reader, writer):
        await read_request_head(reader)
        writer.write(response_with([("Trailer", "X-Checksum, Grpc-Status")], body, True,
                                   b"X-Checksum: abc\r\nGrpc-Status: 0\r\nSet-Cookie: a=b\r\n"
                                   b"Cache-Control: no-store\r\n"))
        await writer.drain()

    async with serve_on(edge.raw_port, handler), h2(edge.port) as c:
        r = await c.request(edge.authority("raw"), "/t", headers=[("te", "trailers")])
    assert r.status == 200 and r.ended and r.body == body, r.describe()
    assert r.trailers == [(b"x-checksum", b"abc"), (b"grpc-status", b"0")]


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_backend_death_mid_body_resets_the_stream(edge, chunked):
    """A backend that dies 1 MiB into a 4 MiB body makes the proxy reset the stream
    (RST_STREAM), never end it cleanly; the connection's other streams go on."""
    first = det_bytes(MiB, seed=6)

    async def handler(reader, writer):
        await read_request_head(reader)
        if chunked:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n" % len(first) + first + b"\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * MiB) + first)
        await writer.drain()
        writer.transport.abort()

    async with serve_on(edge.raw_port, handler), h2(edge.port) as c:
        r = await c.request(edge.authority("raw"), "/dies")
        after = await c.request(edge.authority(), "/echo?after-death")
    assert r.status == 200
    assert not r.ended and r.reset is not None, r.describe()
    assert r.reset != ErrorCodes.NO_ERROR
    assert len(r.body) <= MiB and first.startswith(r.body)
    assert echo_of(after)["raw_path"] == "/echo?after-death"


# --------------------------------------------------------------------------------------------
# 6. WebSocket over HTTP/2 (RFC 8441), and the HTTP/1.1 fallback
# --------------------------------------------------------------------------------------------


async def test_settings_offer_extended_connect_and_the_limits(proxy):
    """The proxy's SETTINGS offer SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 and carry the configured
    stream limit, stream window and header list size; the connection window is opened to
    http2_connection_window."""
    p = proxy(config={"limits": {"http2_max_streams": 37, "http2_stream_window": 100_000,
                                 "http2_connection_window": 3 * MiB,
                                 "max_header_bytes": 40_000}})
    async with h2(p.port) as c:
        s = c.remote_settings
        assert s[SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
        assert s[SettingCodes.MAX_CONCURRENT_STREAMS] == 37
        assert s[SettingCodes.INITIAL_WINDOW_SIZE] == 100_000
        assert s[SettingCodes.MAX_HEADER_LIST_SIZE] == 40_000
        assert s.get(SettingCodes.ENABLE_PUSH, 0) == 0

        async def window() -> bool:
            return c.conn.outbound_flow_control_window == 3 * MiB
        await wait_until(window, timeout=5)


class WsEcho:
    """A `websockets` echo server recording the HTTP/1.1 upgrade requests it receives."""

    def __init__(self):
        self.requests: list = []

    async def handler(self, ws) -> None:
        async for message in ws:
            await ws.send(message)

    def process_request(self, connection, request):
        self.requests.append(request)
        return None


@contextlib.asynccontextmanager
async def ws_echo(port: int):
    echo = WsEcho()
    server = await ws_serve(echo.handler, "127.0.0.1", port, process_request=echo.process_request,
                            compression=None, max_size=None, ping_interval=None)
    try:
        yield echo
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


async def ws_messages(c: H2Client, sid: int, count: int, buf: bytes = b""
                      ) -> tuple[list[tuple[int, bool, bytes]], bytes]:
    got: list[tuple[int, bool, bytes]] = []
    while len(got) < count:
        frames, buf = ws_parse(buf)
        got += frames
        if len(got) >= count:
            break
        chunk = await c.chunk(sid)
        assert chunk is not None, f"stream ended after {len(got)} WebSocket frames"
        buf += chunk
    return got, buf


async def test_websocket_over_h2_extended_connect(edge):
    """RFC 8441: a CONNECT stream with :protocol websocket becomes a proper HTTP/1.1 upgrade to
    the sandbox (GET, Upgrade: websocket, a fresh Sec-WebSocket-Key, version 13, the Host and
    path of the stream); the stream's 200 stands for the 101; masked frames written in DATA
    frames are echoed back unmasked, large ones too; a close frame is answered and the stream
    ends."""
    async with ws_echo(edge.ws_port) as echo, h2(edge.port) as c:
        sid = c.start(fields([(":method", "CONNECT"), (":protocol", "websocket"),
                              (":scheme", "http"), (":path", "/chat?room=1"),
                              (":authority", edge.authority("ws")),
                              ("sec-websocket-version", "13"),
                              ("origin", f"http://{edge.authority('ws')}")]),
                      end_stream=False)
        head = await c.head(sid)
        assert head.status == 200, head.describe()
        assert head.header("sec-websocket-accept") is None
        names = {k for k, _ in head.headers}
        assert names.isdisjoint({b"connection", b"upgrade"}), head.headers
        big = os.urandom(300_000)
        await c.send_data(sid, ws_frame(WS_TEXT, b"hello over h2")
                          + ws_frame(WS_BINARY, b"\x00\x01\x02"))
        await c.send_data(sid, ws_frame(WS_BINARY, big))
        got, buf = await ws_messages(c, sid, 3)
        assert got == [(WS_TEXT, False, b"hello over h2"), (WS_BINARY, False, b"\x00\x01\x02"),
                       (WS_BINARY, False, big)]
        await c.send_data(sid, ws_frame(WS_CLOSE, b"\x03\xe8bye"))
        got, buf = await ws_messages(c, sid, 1, buf)
        assert got[0][0] == WS_CLOSE and got[0][2][:2] == b"\x03\xe8"
        c.end(sid)
        r = await c.response(sid)
        assert r.ended or r.reset in (ErrorCodes.NO_ERROR, ErrorCodes.CANCEL), r.describe()
    [req] = echo.requests
    assert req.path == "/chat?room=1"
    h = req.headers
    assert h["Upgrade"].lower() == "websocket"
    assert "upgrade" in h["Connection"].lower()
    assert h["Sec-WebSocket-Version"] == "13"
    assert len(h["Sec-WebSocket-Key"]) == 24
    assert h["Host"] == edge.authority("ws")
    assert h["X-Forwarded-For"] == "127.0.0.1"


async def test_websocket_http1_fallback_on_the_same_listener(edge):
    """A browser without RFC 8441 opens its WebSocket with an HTTP/1.1 upgrade on the same
    listener: it is relayed as before."""
    async with ws_echo(edge.ws_port) as echo, ws_connect(
            f"ws://{edge.authority('ws')}:{edge.port}/legacy", host="127.0.0.1", port=edge.port,
            proxy=None, open_timeout=10, ping_interval=None) as ws:
        await ws.send("over http/1.1")
        assert await asyncio.wait_for(ws.recv(), 5) == "over http/1.1"
    assert [r.path for r in echo.requests] == ["/legacy"]


# --------------------------------------------------------------------------------------------
# 7. Metrics and the access log
# --------------------------------------------------------------------------------------------


async def test_h2_traffic_is_counted_and_logged_as_h2(proxy):
    """/metrics counts HTTP/2 responses with http="h2" apart from HTTP/1.1's http="h1", counts
    the connections and streams, and every access log line says which one it was."""
    p = proxy()
    async with h2(p.port) as c:
        for _ in range(3):
            assert (await c.request("3000-demo.localhost", "/echo")).status == 200
        assert (await c.request("3000-nope.localhost", "/echo")).status == 502
        assert (await c.request("3000-demo.localhost", "/upload", "POST",
                                body=b"x" * 5000)).status == 200
    for _ in range(2):
        assert (await fetch(p, "/echo")).status == 200

    def lines() -> list[dict]:
        return [json.loads(line) for line in p.stdout().splitlines() if line.startswith("{")]

    async def logged() -> bool:
        return len(lines()) == 7
    await wait_until(logged, timeout=5)
    https = sorted(line["http"] for line in lines())
    assert https == ["h1", "h1", "h2", "h2", "h2", "h2", "h2"]
    nope = [line for line in lines() if line["sandbox_id"] == "nope"]
    assert nope[0]["http"] == "h2" and nope[0]["status"] == 502

    name = "sandbox_proxy_requests_total"
    base = {"protocol": "http"}
    assert await metric_value(p, name, code_class="2xx", method="GET", origin="backend",
                              http="h2", **base) == 3
    assert await metric_value(p, name, code_class="2xx", method="POST", origin="backend",
                              http="h2", **base) == 1
    assert await metric_value(p, name, code_class="5xx", method="GET", origin="proxy",
                              http="h2", **base) == 1
    assert await metric_value(p, name, code_class="2xx", method="GET", origin="backend",
                              http="h1", **base) == 2
    assert await metric_value(p, "sandbox_proxy_h2_connections_total") == 1
    assert await metric_value(p, "sandbox_proxy_h2_streams_total") == 5
    assert await metric_value(p, "sandbox_proxy_request_bytes_total") >= 5000
