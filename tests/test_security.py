"""Access control and isolation (issue 5), end to end through the real CLI: traffic tokens,
browser cookie, header routing, limits, backend address policy, request smuggling."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest

from conftest import RawConn, fetch, header_value, header_values

TOKEN = "s3cret-Token_1"
TOKEN_HEADER = "e2b-traffic-access-token"


def secured(backend_port: int, **extra) -> dict:
    return {
        "open": {"host": "127.0.0.1", "ports": {3000: backend_port}},
        "locked": {"host": "127.0.0.1", "ports": {3000: backend_port, 49983: backend_port},
                   "traffic_access_token": TOKEN, **extra},
        "hashed": {"host": "127.0.0.1", "ports": {3000: backend_port},
                   "traffic_access_token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()},
    }


def missing(sid: str, header: str = TOKEN_HEADER) -> dict:
    return {"sandboxId": sid, "code": 403, "message": "Sandbox is secured with traffic access "
            f"token. Token header '{header}' is missing"}


def invalid(sid: str, header: str = TOKEN_HEADER) -> dict:
    return {"sandboxId": sid, "code": 403, "message": "Sandbox is secured with traffic access "
            f"token. Provided token in header '{header}' is invalid"}


# -- traffic access tokens ------------------------------------------------------------------

async def test_token_missing_invalid_valid_and_not_forwarded(proxy, backend):
    p = proxy(secured(backend.port))
    r = await fetch(p, "/echo", host=p.host("locked"))
    assert r.status == 403 and r.json() == missing("locked")
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = await fetch(p, "/echo", host=p.host("locked"), headers={TOKEN_HEADER: "wrong"})
    assert r.status == 403 and r.json() == invalid("locked")
    r = await fetch(p, "/echo", host=p.host("locked"), headers={TOKEN_HEADER: TOKEN[:-1]})
    assert r.status == 403 and r.json() == invalid("locked")
    for sid in ("locked", "hashed"):
        r = await fetch(p, "/echo", host=p.host(sid), headers={TOKEN_HEADER: TOKEN})
        assert r.status == 200, r.body
        assert header_value(r.json(), TOKEN_HEADER) is None
    r = await fetch(p, "/echo", host=p.host("open"))
    assert r.status == 200


async def test_exempt_port_needs_no_token(proxy, backend):
    p = proxy(secured(backend.port))
    r = await fetch(p, "/echo", host=p.host("locked", 49983))
    assert r.status == 200


async def test_forward_token_and_custom_header_name(proxy, backend):
    p = proxy(secured(backend.port),
              config={"access": {"token_header": "X-Sandbox-Token", "forward_token": True}})
    r = await fetch(p, "/echo", host=p.host("locked"), headers={TOKEN_HEADER: TOKEN})
    assert r.status == 403 and r.json() == missing("locked", "x-sandbox-token")
    r = await fetch(p, "/echo", host=p.host("locked"), headers={"X-Sandbox-Token": TOKEN})
    assert r.status == 200 and header_value(r.json(), "X-Sandbox-Token") == TOKEN


async def test_browser_cookie_flow(proxy, backend):
    p = proxy(secured(backend.port), config={"access": {"browser_cookie": True}})
    conn = await RawConn.open(p.port)
    try:
        r = await conn.request("GET", f"/page?a=1&access_token={TOKEN}&b=2", p.host("locked"))
        assert r.status == 302
        assert r.header("Location") == "/page?a=1&b=2"
        cookie = r.header("Set-Cookie")
        assert cookie.startswith(f"sandbox-access-token={TOKEN};")
        assert "HttpOnly" in cookie and "Domain" not in cookie and "Secure" not in cookie
        r = await conn.request("GET", "/page?a=1&b=2", p.host("locked"),
                               [("Cookie", f"theme=dark; sandbox-access-token={TOKEN}")])
        assert r.status == 200
        echo = r.json()
        assert header_values(echo, "Cookie") == ["theme=dark"]
        assert echo["raw_path"] == "/page?a=1&b=2"
        r = await conn.request("GET", "/", p.host("locked"),
                               [("Cookie", "sandbox-access-token=nope")])
        assert r.status == 403 and r.json() == invalid("locked")
        r = await conn.request("GET", "/?access_token=nope", p.host("locked"))
        assert r.status == 403 and r.json() == invalid("locked")
    finally:
        await conn.aclose()


async def test_query_token_ignored_without_browser_cookie(proxy, backend):
    p = proxy(secured(backend.port))
    r = await fetch(p, f"/?access_token={TOKEN}", host=p.host("locked"))
    assert r.status == 403 and r.json() == missing("locked")


async def test_secure_cookie_behind_trusted_tls_proxy(proxy, backend):
    p = proxy(secured(backend.port), config={
        "access": {"browser_cookie": True}, "server": {"trusted_proxies": ["127.0.0.1/32"]}})
    conn = await RawConn.open(p.port)
    try:
        r = await conn.request("GET", f"/?access_token={TOKEN}", p.host("locked"),
                               [("X-Forwarded-Proto", "https")])
        assert r.status == 302 and "; Secure" in r.header("Set-Cookie")
    finally:
        await conn.aclose()


# -- header routing ---------------------------------------------------------------------------

ROUTE = {"E2b-Sandbox-Id": "demo", "E2b-Sandbox-Port": "3000"}


async def test_header_routing_off_by_default(proxy):
    p = proxy()
    r = await fetch(p, "/echo", host="localhost", headers=ROUTE)
    assert r.status == 400


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:8080", "[::1]", "sandbox.localhost",
                                  "SANDBOX.sbx.example.test"])
async def test_header_routing_on_stable_hosts(proxy, host):
    p = proxy(config={"routing": {"header_routing": True}})
    r = await fetch(p, "/echo?q", host=host, headers=ROUTE)
    assert r.status == 200, r.body
    assert r.json()["raw_path"] == "/echo?q"


async def test_header_routing_rules(proxy):
    p = proxy(config={"routing": {"header_routing": True}})
    r = await fetch(p, "/", host="localhost", headers={"E2b-Sandbox-Id": "demo"})
    assert r.status == 400 and b"must be sent together" in r.body
    r = await fetch(p, "/", host="localhost", headers={"E2b-Sandbox-Port": "3000"})
    assert r.status == 400
    r = await fetch(p, "/", host="localhost",
                    headers={"E2b-Sandbox-Id": "De_mo", "E2b-Sandbox-Port": "3000"})
    assert r.status == 400
    r = await fetch(p, "/", host="localhost",
                    headers={"E2b-Sandbox-Id": "nope", "E2b-Sandbox-Port": "3000"})
    assert r.status == 502 and r.json()["sandboxId"] == "nope"
    # not a stable host: the headers are ignored and the Host decides
    r = await fetch(p, "/", host=p.host("nope"), headers=ROUTE)
    assert r.status == 502 and r.json()["sandboxId"] == "nope"
    r = await fetch(p, "/", host="other.localhost", headers=ROUTE)
    assert r.status == 400


# -- limits -----------------------------------------------------------------------------------

async def test_sandbox_connection_limit(proxy, backend):
    p = proxy(config={"limits": {"sandbox_connections": 2}})
    slow = [asyncio.create_task(fetch(p, "/slow-head?delay=1.5")) for _ in range(2)]
    await asyncio.sleep(0.5)
    r = await fetch(p, "/echo")
    assert r.status == 429
    assert r.json() == {"sandboxId": "demo", "limit": 2, "code": 429,
                        "message": "Too many concurrent requests to this sandbox"}
    r = await fetch(p, "/echo", host=p.host("masked"))  # other sandboxes are not affected
    assert r.status == 200
    assert [t.status for t in await asyncio.gather(*slow)] == [200, 200]
    assert (await fetch(p, "/echo")).status == 200


async def test_websocket_holds_its_slot(proxy):
    p = proxy(config={"limits": {"sandbox_connections": 1}})
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(p.url("/ws"), headers={"Host": p.host()})
        assert (await fetch(p, "/echo")).status == 429
        await ws.close()
    await asyncio.sleep(0.3)
    assert (await fetch(p, "/echo")).status == 200


async def test_global_connection_cap(proxy):
    p = proxy(config={"limits": {"max_connections": 2}})
    held = [await RawConn.open(p.port) for _ in range(2)]
    try:
        await asyncio.sleep(0.2)
        extra = await RawConn.open(p.port)
        head = await extra.read_head(timeout=5)
        assert head.status == 503
        assert await extra.closed(5)
        await extra.aclose()
        r = await held[0].request("GET", "/echo", p.host())
        assert r.status == 200
    finally:
        for conn in held:
            await conn.aclose()


async def test_header_size_limits(proxy, raw_conns):
    p = proxy()
    conn = await raw_conns(p.port)
    big_cookie = "c=" + "x" * 60_000  # big cookies pass under the 64 KiB default
    r = await conn.request("GET", "/echo", p.host(), [("Cookie", big_cookie)])
    assert r.status == 200
    conn = await raw_conns(p.port)
    r = await conn.request("GET", "/echo", p.host(), [("Cookie", "c=" + "x" * 70_000)])
    assert r.status == 431 and await conn.closed(5)
    conn = await raw_conns(p.port)
    r = await conn.request("GET", "/echo", p.host(), [(f"X-{i}", "v") for i in range(201)])
    assert r.status == 431
    conn = await raw_conns(p.port)
    r = await conn.request("GET", "/" + "a" * 17_000, p.host())
    assert r.status == 414


# -- backend address policy -------------------------------------------------------------------

async def test_backend_outside_allowed_networks_is_refused(proxy, backend):
    p = proxy({
        "meta": {"host": "169.254.169.254"},
        "loop": {"host": "127.0.0.1", "ports": {3000: backend.port}},
        "named": {"host": "localhost", "ports": {3000: backend.port}},
    }, config={"upstream": {"allowed_networks": ["10.0.0.0/8"], "connect_attempts": 1}})
    for sid in ("meta", "loop", "named"):
        r = await fetch(p, "/echo", host=p.host(sid, 80 if sid == "meta" else 3000))
        assert r.status == 502, sid
        assert r.json() == {"sandboxId": sid, "message": "The sandbox was not found",
                            "code": 502}
    assert "outside [upstream] allowed_networks" in p.stderr()


async def test_backend_may_not_be_the_proxy_itself(proxy):
    p = proxy({"self": {"host": "127.0.0.1"}})
    r = await fetch(p, "/metrics", host=p.host("self", p.metrics_port))
    assert r.status == 502
    r = await fetch(p, "/", host=p.host("self", p.port))
    assert r.status == 502
    assert "the proxy's own listeners" in p.stderr()


async def test_names_are_resolved_and_checked(proxy, backend):
    p = proxy({"named": {"host": "localhost", "ports": {3000: backend.port}}})
    r = await fetch(p, "/echo", host=p.host("named"))
    assert r.status == 200


# -- request smuggling ------------------------------------------------------------------------

SMUGGLING = [
    ("CL and TE", b"POST /echo HTTP/1.1\r\nHost: {h}\r\nContent-Length: 4\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("two CL", b"POST /echo HTTP/1.1\r\nHost: {h}\r\nContent-Length: 3\r\n"
               b"Content-Length: 4\r\n\r\nabcd", 400),
    ("bad chunk size", b"POST /echo HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nabc\r\n0\r\n\r\n", 400),
    ("obs-fold", b"GET /echo HTTP/1.1\r\nHost: {h}\r\nX-A: a\r\n b\r\n\r\n", 400),
    ("bare CR", b"GET /echo HTTP/1.1\r\nHost: {h}\r\nX-A: a\rb\r\n\r\n", 400),
    ("bare LF in value", b"GET /echo HTTP/1.1\r\nHost: {h}\r\nX-A: a\nX-B: b\r\n\r\n", 400),
    ("upgrade with body", b"POST /ws HTTP/1.1\r\nHost: {h}\r\nConnection: Upgrade\r\n"
                          b"Upgrade: websocket\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("gzip transfer coding", b"POST /echo HTTP/1.1\r\nHost: {h}\r\n"
                             b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("space before colon", b"GET /echo HTTP/1.1\r\nHost: {h}\r\nX-A : a\r\n\r\n", 400),
    ("two Hosts", b"GET /echo HTTP/1.1\r\nHost: {h}\r\nHost: 3000-other.localhost\r\n\r\n", 400),
]


@pytest.mark.parametrize("name, raw, status", SMUGGLING, ids=[c[0] for c in SMUGGLING])
async def test_smuggling_attempts_are_rejected_and_never_forwarded(shared_proxy, backend,
                                                                   raw_conns, name, raw, status):
    before = backend.state["requests"]
    conn = await raw_conns(shared_proxy.port)
    await conn.send(raw.replace(b"{h}", shared_proxy.host().encode()))
    head = await conn.read_head(timeout=5)
    assert head.status == status, name
    assert "close" in head.connection_tokens()
    assert await conn.closed(5)
    await asyncio.sleep(0.1)
    assert backend.state["requests"] == before, "a rejected request reached the backend"


async def test_client_cannot_override_proxy_headers(shared_proxy):
    r = await fetch(shared_proxy, "/echo", host=shared_proxy.host("masked"), headers={
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil", "X-Forwarded-Proto": "https",
        "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6"})
    echo = r.json()
    assert header_value(echo, "X-Forwarded-For") == "127.0.0.1"
    assert header_value(echo, "X-Forwarded-Host") == shared_proxy.host("masked")
    assert header_value(echo, "X-Forwarded-Proto") == "http"
    assert header_value(echo, "Host") == "localhost:3000"
    assert header_value(echo, "Forwarded") is None and header_value(echo, "X-Real-IP") is None
