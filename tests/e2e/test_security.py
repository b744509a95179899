"""Access control and isolation (issue 5), end to end through the real CLI: traffic tokens,
browser cookie, header routing, limits, backend address policy, request smuggling."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
from dataclasses import dataclass

import aiohttp
import pytest

from support.process import launch_proxy
from support.raw_http import (IncompleteResponse, RawConn, build_request, fetch, header_value,
                              header_values, raw_backend)
from support.recording_backend import GZIP_PAYLOAD, RecordingBackend, RecordingFleet, ReceivedRequest

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


# =============================================================================================
# Request smuggling, credential bypass and cross-client leaks (issue 10)
#
# Every sandbox below has a recording backend of its own (tests/recording_backend.py): it keeps
# every byte the proxy sends and parses it with a strict HTTP/1.1 parser of its own, so each test
# compares what the client framed with what the backend received. Each test takes fresh sandboxes
# (fresh upstream pools, fresh backends) from a module-wide proxy, so a hostile backend in one
# test cannot poison another's.
# =============================================================================================

COOKIE = "sandbox-access-token"
_markers = itertools.count()


def new_marker(tag: str = "k") -> str:
    return f"{tag}{next(_markers)}x"


@dataclass
class Sandbox:
    sid: str
    backend: RecordingBackend
    locked: bool

    def host(self, port: int = 3000, domain: str = "localhost") -> str:
        return f"{port}-{self.sid}.{domain}"

    def received(self, marker: str | None = None) -> list[ReceivedRequest]:
        return [r for r in self.backend.requests() if marker is None or r.marker == marker]


class Edge:
    """A running proxy whose sandboxes each have a recording backend; `take` hands out unused
    ones."""

    def __init__(self, proxy, sandboxes: dict[str, list[Sandbox]]):
        self.proxy = proxy
        self.port = proxy.port
        self.free = sandboxes

    def take(self, locked: bool = False) -> Sandbox:
        pool = self.free["locked" if locked else "open"]
        assert pool, "no unused sandbox left: raise the counts in start_edge"
        return pool.pop(0)


def start_edge(tmp_path_factory, fleet: RecordingFleet, tag: str, config: dict,
               n_open: int = 320, n_locked: int = 50) -> Edge:
    sandboxes: dict[str, list[Sandbox]] = {"open": [], "locked": []}
    registry: dict[str, dict] = {}
    for kind, count in (("open", n_open), ("locked", n_locked)):
        for i in range(count):
            sid = f"{kind[:4]}{i}"
            backend = fleet.add(f"{tag}-{sid}")
            spec = {"host": "127.0.0.1", "ports": {3000: backend.port}}
            if kind == "locked":
                spec["traffic_access_token"] = TOKEN
            registry[sid] = spec
            sandboxes[kind].append(Sandbox(sid, backend, kind == "locked"))
    p = launch_proxy(tmp_path_factory.mktemp(f"edge-{tag}"), registry, config=config)
    return Edge(p, sandboxes)


@pytest.fixture(scope="module")
def edge(tmp_path_factory, fleet):
    """[access] browser_cookie = true."""
    e = start_edge(tmp_path_factory, fleet, "cookie", {"access": {"browser_cookie": True}})
    yield e
    e.proxy.stop()


@pytest.fixture(scope="module")
def edge_plain(tmp_path_factory, fleet):
    """[access] browser_cookie = false (the default)."""
    e = start_edge(tmp_path_factory, fleet, "plain", {}, n_open=80, n_locked=40)
    yield e
    e.proxy.stop()


async def settle() -> None:
    """Let the proxy deliver what it is going to deliver before the backends are inspected."""
    await asyncio.sleep(0.05)


async def responses_on(conn: RawConn, count: int, timeout: float = 3.0) -> list:
    """Up to `count` responses, stopping early (without failing) at EOF or after `timeout`;
    a response cut short is returned as an IncompleteResponse."""
    got: list = []
    for _ in range(count):
        try:
            got.append(await conn.response(timeout=timeout))
        except IncompleteResponse as exc:
            if exc.head is not None:
                got.append(exc)
            break
        except (asyncio.TimeoutError, ConnectionError):
            break
    return got


def describe(rs: list) -> list[str]:
    out = []
    for r in rs:
        if isinstance(r, IncompleteResponse):
            out.append(f"incomplete {r.head.status if r.head else '?'}")
        else:
            out.append(f"{r.status} {r.header('X-Test-Id') or 'proxy'} {r.body[:60]!r}")
    return out


def from_proxy(r) -> bool:
    return r.header("X-Backend") is None


def request_bytes(sbx_host: str, marker: str, method: str = "GET", headers=None,
                  body: bytes | None = None, query: str = "") -> bytes:
    return build_request(method, f"/m/{marker}/{query}", sbx_host, headers, body)


def upgrade_headers(extra=None) -> list[tuple[str, str]]:
    return [("Connection", "Upgrade"), ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13"),
            *(extra or [])]


# -- 1. the traffic token cannot be skipped --------------------------------------------------

# (name, credentials, outcome with browser_cookie on, outcome with it off)
# outcomes: "allow" (200 from the backend), "redirect" (302, token moved to the cookie),
# "deny" (403), "conflict" (a valid and a wrong credential at once: allow, redirect or deny
# are all acceptable, but the backend is reached iff the answer is 200)
CREDENTIALS = [
    ("none", {}, "deny", "deny"),
    ("unrelated cookie", {"cookie": "theme=dark"}, "deny", "deny"),
    ("unrelated query", {"query": "?a=1"}, "deny", "deny"),
    ("header valid", {"header": TOKEN}, "allow", "allow"),
    ("header wrong", {"header": "wrong"}, "deny", "deny"),
    ("header empty", {"header": ""}, "deny", "deny"),
    ("cookie valid", {"cookie": f"{COOKIE}={TOKEN}"}, "allow", "deny"),
    ("cookie valid among others", {"cookie": f"theme=dark; {COOKIE}={TOKEN}; x=y"}, "allow",
     "deny"),
    ("cookie wrong", {"cookie": f"{COOKIE}=wrong"}, "deny", "deny"),
    ("cookie empty", {"cookie": f"{COOKIE}="}, "deny", "deny"),
    ("query valid", {"query": f"?access_token={TOKEN}"}, "redirect", "deny"),
    ("query wrong", {"query": "?access_token=wrong"}, "deny", "deny"),
    ("query empty", {"query": "?access_token="}, "deny", "deny"),
    ("cookie valid + header wrong", {"cookie": f"{COOKIE}={TOKEN}", "header": "wrong"},
     "conflict", "deny"),
    ("header valid + cookie wrong", {"header": TOKEN, "cookie": f"{COOKIE}=wrong"},
     "conflict", "allow"),
    ("cookie valid + query wrong", {"cookie": f"{COOKIE}={TOKEN}", "query": "?access_token=no"},
     "conflict", "deny"),
    ("query valid + cookie wrong", {"query": f"?access_token={TOKEN}", "cookie": f"{COOKIE}=no"},
     "conflict", "deny"),
    ("header valid + query valid", {"header": TOKEN, "query": f"?access_token={TOKEN}"},
     "allow or redirect", "allow"),
    ("cookie valid + query valid", {"cookie": f"{COOKIE}={TOKEN}",
                                    "query": f"?access_token={TOKEN}"},
     "allow or redirect", "deny"),
]


def credential_headers(cred: dict) -> list[tuple[str, str]]:
    hdrs = []
    if "header" in cred:
        hdrs.append((TOKEN_HEADER, cred["header"]))
    if "cookie" in cred:
        hdrs.append(("Cookie", cred["cookie"]))
    return hdrs


def check_outcome(expected: str, r, reached: int, locked_sid: str) -> None:
    allowed = {"allow": {200}, "deny": {403}, "redirect": {302}, "allow or redirect": {200, 302},
               "conflict": {200, 302, 403}}[expected]
    assert r.status in allowed, f"expected {expected}, got {r.status} {r.body[:200]!r}"
    if r.status == 403:
        assert from_proxy(r)
        assert r.json()["sandboxId"] == locked_sid and r.json()["code"] == 403
    assert reached == (1 if r.status == 200 else 0), (
        f"status {r.status} but the backend received the request {reached} times")


@pytest.mark.parametrize("browser_cookie", [True, False], ids=["cookie-on", "cookie-off"])
@pytest.mark.parametrize("name, cred, on, off", CREDENTIALS, ids=[c[0] for c in CREDENTIALS])
async def test_token_cannot_be_skipped(edge, edge_plain, raw_conns, browser_cookie, name, cred,
                                       on, off):
    e = edge if browser_cookie else edge_plain
    expected = on if browser_cookie else off
    sbx = e.take(locked=True)
    mk = new_marker()
    conn = await raw_conns(e.port)
    await conn.send(request_bytes(sbx.host(), mk, headers=credential_headers(cred),
                                  query=cred.get("query", "")))
    r = (await responses_on(conn, 1))
    assert r and not isinstance(r[0], IncompleteResponse), f"no answer: {describe(r)}"
    await settle()
    check_outcome(expected, r[0], len(sbx.received(mk)), sbx.sid)
    if expected == "deny" and "header" not in cred and not (
            browser_cookie and (COOKIE in cred.get("cookie", "")
                                or "access_token" in cred.get("query", ""))):
        assert r[0].json() == missing(sbx.sid)


@pytest.mark.parametrize("browser_cookie", [True, False], ids=["cookie-on", "cookie-off"])
async def test_websocket_upgrade_without_token_is_refused(edge, edge_plain, raw_conns,
                                                          browser_cookie):
    e = edge if browser_cookie else edge_plain
    sbx = e.take(locked=True)
    mk = new_marker()
    conn = await raw_conns(e.port)
    await conn.send(request_bytes(sbx.host(), mk, headers=upgrade_headers(),
                                  query="?script=accept"))
    head = await conn.read_head(timeout=3)
    assert head.status == 403, f"an upgrade without any credential got {head.status}"
    await settle()
    assert sbx.received(mk) == [] and sbx.backend.bytes_received() == 0


# -- 2. Connection cannot remove the request's framing ---------------------------------------

def smuggled_request(sbx: Sandbox, marker: str, complete: bool) -> bytes:
    """A body that is itself a request: complete (with padding), or a head left open so that the
    next request on the backend connection completes it. If a backend ever parses it as a
    request, it shows up there under its own marker."""
    if complete:
        return (f"GET /m/{marker}/?script=echo HTTP/1.1\r\nHost: {sbx.host()}\r\nX-Pad: ".encode()
                + b"p" * 40 + b"\r\n\r\n")
    return f"GET /m/{marker}/?script=echo HTTP/1.1\r\nX-Ignore: ".encode()


def chunk(body: bytes, pieces: int = 3) -> bytes:
    step = max(1, len(body) // pieces)
    parts = [body[i:i + step] for i in range(0, len(body), step)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


CONNECTION_FRAMING = ["Content-Length", "content-length", "CONTENT-LENGTH", "Transfer-Encoding",
                      "Host", "content-length, x-foo", "keep-alive, Content-Length",
                      "X-Foo, Transfer-Encoding", "Content-Length, Transfer-Encoding, Host"]


@pytest.mark.parametrize("smuggled", ["complete", "prefix"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("option", CONNECTION_FRAMING)
async def test_connection_cannot_strip_request_framing(edge, raw_conns, option, framing,
                                                       smuggled):
    sbx = edge.take()
    mk, smug, victim = new_marker(), new_marker("smug"), new_marker("victim")
    body = smuggled_request(sbx, smug, smuggled == "complete")
    framed = chunk(body) if framing == "chunked" else body
    headers = [("Connection", option), ("X-Foo", "1")]
    headers.append(("Transfer-Encoding", "chunked") if framing == "chunked"
                   else ("Content-Length", str(len(body))))
    attacker = await raw_conns(edge.port)
    await attacker.send(request_bytes(sbx.host(), mk, "POST", headers) + framed)
    first = await responses_on(attacker, 1)
    assert [r.header("X-Test-Id") for r in first] == [mk], describe(first)
    # a second client's request to the same sandbox gets its own answer, and only it sees it
    other = await raw_conns(edge.port)
    await other.send(request_bytes(sbx.host(), victim, headers=[
        ("Cookie", "session=victim-secret"), ("Authorization", "Bearer victim-secret")],
        query="?script=echo"))
    second = await responses_on(other, 1)
    assert [r.header("X-Test-Id") for r in second] == [victim], describe(second)
    await attacker.closed(0.2)
    assert b"victim" not in attacker.last_bytes, attacker.last_bytes[:300]
    await settle()
    got = sbx.received()
    assert [r.marker for r in got] == [mk, victim], (
        f"the backend parsed {[r.marker for r in got]}: the body was read as a request")
    fwd = got[0]
    assert fwd.body == body, f"body {fwd.body[:80]!r} framed as {fwd.framing}"
    assert fwd.framing == ("chunked" if framing == "chunked" else "length") or (
        fwd.framing == "length" and int(fwd.header("content-length")) == len(body))
    if "x-foo" in option.lower():
        assert fwd.header("X-Foo") is None, "a header named by Connection was forwarded"
    else:
        assert fwd.header("X-Foo") == b"1"
    assert got[1].header("Cookie") == b"session=victim-secret"
    assert sbx.backend.errors() == []


async def test_connection_named_header_is_still_dropped(edge, raw_conns):
    sbx = edge.take()
    mk = new_marker()
    conn = await raw_conns(edge.port)
    r = await conn.request("GET", f"/m/{mk}/", sbx.host(), [("Connection", "X-Foo, keep-alive"),
                                                             ("X-Foo", "1"), ("X-Bar", "2")])
    assert r.status == 200
    await settle()
    [fwd] = sbx.received(mk)
    assert fwd.header("X-Foo") is None and fwd.header("X-Bar") == b"2"


async def test_connection_cannot_keep_a_forged_forwarded_for(edge, raw_conns):
    sbx = edge.take()
    mk = new_marker()
    conn = await raw_conns(edge.port)
    r = await conn.request("GET", f"/m/{mk}/", sbx.host(), [
        ("Connection", "X-Forwarded-For"), ("X-Forwarded-For", "6.6.6.6")])
    assert r.status == 200
    await settle()
    [fwd] = sbx.received(mk)
    assert fwd.header_all("X-Forwarded-For") == [b"127.0.0.1"]


# -- 3. a backend cannot desynchronise the client connection ----------------------------------

async def test_response_connection_cannot_strip_framing(edge, raw_conns):
    sbx = edge.take()
    mk, mk2 = new_marker(), new_marker()
    conn = await raw_conns(edge.port)
    await conn.send(request_bytes(sbx.host(), mk, query="?script=connopt"))
    head = await conn.read_head(timeout=3)
    assert head.header("Content-Length") == "5" or (
        head.header("Transfer-Encoding") or "").lower() == "chunked", (
        f"the response reached the client without framing: {head.raw_head!r}")
    await conn._read_body(head, "GET")
    assert head.body == b"hello"
    r = await conn.request("GET", f"/m/{mk2}/", sbx.host(), timeout=3)
    assert r.header("X-Test-Id") == mk2


EXTRA_SCRIPTS = ["extra1", "extra2", "extrachunked", "extrabig"]


@pytest.mark.parametrize("how", ["pipelined", "keep-alive", "second-client"])
@pytest.mark.parametrize("script", EXTRA_SCRIPTS)
async def test_unsolicited_response_never_reaches_the_next_request(edge, raw_conns, script, how):
    sbx = edge.take()
    mk, mk2 = new_marker(), new_marker()
    conn = await raw_conns(edge.port)
    first = request_bytes(sbx.host(), mk, query=f"?script={script}")
    second = request_bytes(sbx.host(), mk2)
    if how == "pipelined":
        await conn.send(first + second)
        got = await responses_on(conn, 2)
    else:
        await conn.send(first)
        got = await responses_on(conn, 1)
        if script == "extra2":
            # The unsolicited response's second write must reach the proxy before the next
            # request takes the pooled connection: the backend runs in a thread of this process,
            # so without a pause the GIL can hold that write back until after the proxy has
            # forwarded the next request, and then it is the next request's answer for any proxy
            # that reuses connections. What is checked: bytes arriving on an idle pooled
            # connection close it.
            await asyncio.sleep(0.2)
        if how == "keep-alive":
            await conn.send(second)
            got += await responses_on(conn, 1)
        else:
            other = await raw_conns(edge.port)
            await other.send(second)
            got += await responses_on(other, 1)
    assert [r.header("X-Test-Id") for r in got] == [mk, mk2], describe(got)
    assert [len(r.body) for r in got] == [65536 if script == "extrabig" else len(
        f"{sbx.backend.name}:{mk}"), len(f"{sbx.backend.name}:{mk2}")]
    assert all(b"smuggled" not in r.body for r in got)
    assert not await conn.closed(0.2) and b"smuggled" not in conn.last_bytes


# -- 4. pipelining around an upgrade ----------------------------------------------------------

UPGRADE_CASES = [(lead, outcome, follow)
                 for lead in ("lead", "nolead")
                 for outcome in ("refuse", "accept", "unknown", "denied")
                 for follow in ("same", "other")]


@pytest.mark.parametrize("lead, outcome, follow", UPGRADE_CASES,
                         ids=["-".join(c) for c in UPGRADE_CASES])
async def test_pipelining_around_an_upgrade(edge_plain, raw_conns, lead, outcome, follow):
    """`lead`: a GET before the upgrade request; `follow`: the GET after it goes to a sandbox
    already used on the connection, or to another one."""
    e = edge_plain  # browser_cookie off: no credential means 403
    a = e.take(locked=outcome == "denied")  # the upgrade's sandbox
    lead_sbx = a if outcome in ("refuse", "accept") else e.take()
    b = lead_sbx if follow == "same" else e.take()
    mk_lead, mk_up, mk_next = new_marker(), new_marker(), new_marker()
    up_host = "3000-nosuchsandbox.localhost" if outcome == "unknown" else a.host()
    data = b""
    if lead == "lead":
        data += request_bytes(lead_sbx.host(), mk_lead)
    data += request_bytes(up_host, mk_up, headers=upgrade_headers(),
                          query="?script=" + ("accept" if outcome == "accept" else "refuse"))
    tail = request_bytes(b.host(), mk_next)
    conn = await raw_conns(e.port)
    await conn.send(data + tail)
    expected_first = [mk_lead] if lead == "lead" else []
    got = await responses_on(conn, len(expected_first) + 1)
    assert [r.header("X-Test-Id") for r in got[:len(expected_first)]] == expected_first, \
        describe(got)
    assert len(got) == len(expected_first) + 1, f"no answer to the upgrade: {describe(got)}"
    up = got[-1]
    if outcome == "accept":
        assert up.status == 101, describe(got)
        echo = await asyncio.wait_for(conn.reader.readexactly(len(tail)), 3)
        assert echo == tail
        await settle()
        [conn_rec] = [c for c in a.backend.snapshot() if c.tunnel]
        assert bytes(conn_rec.tunnel) == tail, "the tunnel carried other bytes"
        for sbx in {a.sid: a, b.sid: b}.values():
            assert sbx.received(mk_next) == [], "bytes after an accepted upgrade were parsed"
        return
    assert up.status == {"refuse": 426, "unknown": 502, "denied": 403}[outcome], describe(got)
    nxt = await responses_on(conn, 1, timeout=1.5)
    assert [r.header("X-Test-Id") for r in nxt] == [mk_next], (
        f"the request after the upgrade was not answered: {describe(got)} then {describe(nxt)}")
    await settle()
    assert len(b.received(mk_next)) == 1


# -- 5. credentials never reach the backend ----------------------------------------------------

@pytest.mark.parametrize("cred", [
    {"header": TOKEN, "cookie": f"theme=dark; {COOKIE}={TOKEN}; lang=en"},
    {"cookie": f"theme=dark; {COOKIE}={TOKEN}", "query": f"?a=1&access_token={TOKEN}&b=2"},
    {"header": TOKEN, "query": f"?a=1&access_token={TOKEN}"},
    {"header": TOKEN, "cookie": f"{COOKIE}={TOKEN}", "query": f"?access_token={TOKEN}"},
], ids=["header+cookie", "cookie+query", "header+query", "all three"])
async def test_credentials_never_reach_the_backend(edge, raw_conns, cred):
    sbx = edge.take(locked=True)
    mk = new_marker()
    conn = await raw_conns(edge.port)
    await conn.send(request_bytes(sbx.host(), mk, headers=credential_headers(cred),
                                  query=cred.get("query", "")))
    [r] = await responses_on(conn, 1)
    assert r.status in (200, 302), describe([r])
    if r.status == 302:
        assert "access_token" not in r.header("Location")
    await settle()
    raw = sbx.backend.raw()
    assert TOKEN.encode() not in raw, f"the token reached the backend: {raw[:400]!r}"
    if r.status == 200:
        [fwd] = sbx.received(mk)
        assert b"access_token" not in fwd.target
        cookies = b"; ".join(fwd.header_all("cookie"))
        assert COOKIE.encode() not in cookies
        for kept in (b"theme=dark", b"lang=en"):
            if kept.decode() in cred.get("cookie", ""):
                assert kept in cookies


# -- 6. a rejected request's head is never forwarded --------------------------------------------

WS = {"SP": b" ", "HTAB": b"\t", "VT": b"\x0b", "FF": b"\x0c", "NBSP": b"\xa0"}


def _framing_mutations() -> list[tuple[str, list[bytes], bytes]]:
    """(name, framing header lines, body): what a client might send instead of a clean frame."""
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    te = [(f"TE {name} {where}", [b"Transfer-Encoding: " + (c + b"chunked" if where == "before"
                                                             else b"chunked" + c)], chunked)
          for name, c in WS.items() for where in ("before", "after")]
    cl = [(f"CL {name} {where}", [b"Content-Length: " + (c + b"5" if where == "before"
                                                          else b"5" + c)], b"hello")
          for name, c in WS.items() for where in ("before", "after")]
    te += [(f"TE {v!r}", [b"Transfer-Encoding: " + v], chunked) for v in (
        b"chunked ,", b"chunked,", b",chunked", b"chunked, chunked", b"xchunked", b"chunkedx",
        b"CHUNKED", b"Chunked", b"gzip, chunked", b"identity, chunked", b"chunked;q=1",
        b"\"chunked\"", b"chunked\x00", b"chunk\xe2\x80\x8bed")]
    cl += [(f"CL {v!r}", [b"Content-Length: " + v], b"hello") for v in (
        b"+5", b"5 5", b"0x5", b"5,5", b"5, 5", b"", b"05", b"5.0", b"-5", b"\xef\xbc\x95",
        b"5\x00")]
    names = [
        ("TE name lower", [b"transfer-encoding: chunked"], chunked),
        ("TE name upper", [b"TRANSFER-ENCODING: chunked"], chunked),
        ("TE name underscore", [b"Transfer_Encoding: chunked"], chunked),
        ("TE name space before colon", [b"Transfer-Encoding : chunked"], chunked),
        ("TE twice", [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], chunked),
        ("TE chunked then identity", [b"Transfer-Encoding: chunked",
                                      b"Transfer-Encoding: identity"], chunked),
        ("TE gzip then chunked lines", [b"Transfer-Encoding: gzip",
                                        b"Transfer-Encoding: chunked"], chunked),
        ("TE obs-fold", [b"Transfer-Encoding: gzip", b" chunked"], chunked),
        ("TE empty obs-fold", [b"Transfer-Encoding:", b" chunked"], chunked),
        ("CL name lower", [b"content-length: 5"], b"hello"),
        ("CL name underscore", [b"Content_Length: 5"], b"hello"),
        ("CL name underscore next to CL", [b"Content-Length: 5", b"Content_Length: 0"],
         b"hello"),
        ("TE underscore next to CL", [b"Content-Length: 5", b"Transfer_Encoding: chunked"],
         b"hello"),
        ("CL twice same", [b"Content-Length: 5", b"Content-Length: 5"], b"hello"),
        ("CL twice different", [b"Content-Length: 5", b"Content-Length: 6"], b"hello!"),
        ("CL obs-fold", [b"Content-Length:", b" 5"], b"hello"),
        ("CL and TE", [b"Content-Length: 5", b"Transfer-Encoding: chunked"], chunked),
    ]
    return te + cl + names


FRAMING_MUTATIONS = _framing_mutations()
FRAMING_NAMES = {b"content-length", b"transfer-encoding"}


@pytest.mark.parametrize("name, lines, body", FRAMING_MUTATIONS,
                         ids=[m[0] for m in FRAMING_MUTATIONS])
async def test_framing_mutation_is_rejected_or_forwarded_cleanly(edge, raw_conns, name, lines,
                                                                 body):
    """Either the proxy answers 4xx/5xx and the backend received nothing, or the backend
    received one well-formed request whose single framing header carries exactly what the
    client framed. A look-alike such as Content_Length is not framing: it must not reach the
    backend (a backend that folds `_` into `-`, as CGI-style servers do, would frame by it), and
    a request framed only by one has no body."""
    sbx = edge.take()
    mk = new_marker()
    head = (f"POST /m/{mk}/ HTTP/1.1\r\nHost: {sbx.host()}\r\n".encode()
            + b"".join(line + b"\r\n" for line in lines) + b"\r\n")
    conn = await raw_conns(edge.port)
    await conn.send(head + body)
    got = await responses_on(conn, 1, timeout=2)
    await settle()
    records = sbx.backend.snapshot()
    if got and not isinstance(got[0], IncompleteResponse) and from_proxy(got[0]):
        assert got[0].status >= 400, describe(got)
        assert sum(len(c.raw) for c in records) == 0, (
            f"answered {got[0].status} yet the backend received "
            f"{b''.join(bytes(c.raw) for c in records)[:300]!r}")
        return
    assert got, "the proxy neither answered nor forwarded the request"
    assert sbx.backend.errors() == []
    reqs = [r for c in records for r in c.requests]
    assert [r.marker for r in reqs] == [mk], f"the backend parsed {[r.marker for r in reqs]}"
    fwd = reqs[0]
    look_alikes = [(k, v) for k, v in fwd.headers if k.lower() not in FRAMING_NAMES
                   and k.lower().replace(b"_", b"-") in FRAMING_NAMES]
    assert not look_alikes, f"framing look-alikes reached the backend: {look_alikes}"
    framed = any(line.split(b":")[0].lower() in FRAMING_NAMES for line in lines)
    if framed:
        assert fwd.framing != "none" and fwd.body == b"hello", (
            f"body {fwd.body!r} ({fwd.framing}), sent {body!r} under {lines}")
    else:
        assert fwd.body == b"", f"body {fwd.body!r} ({fwd.framing}) without any framing header"
    assert all(not c.pending for c in records), "bytes left over after the request"


# -- 7. smaller holes --------------------------------------------------------------------------

SPOOFED = [("X_Forwarded_For", "6.6.6.6"), ("X-Client-IP", "6.6.6.6"),
           ("True-Client-IP", "6.6.6.6"), ("X_Real_IP", "6.6.6.6"),
           ("CF-Connecting-IP", "6.6.6.6"), ("Forwarded", "for=6.6.6.6"),
           ("X-Forwarded-Host", "evil.example"), ("x_forwarded_proto", "https"),
           ("X-Cluster-Client-IP", "6.6.6.6"), ("e2b_traffic_access_token", TOKEN),
           ("E2B_Traffic_Access_Token", TOKEN)]


@pytest.mark.parametrize("name, value", SPOOFED, ids=[s[0] for s in SPOOFED])
async def test_client_cannot_smuggle_forwarding_headers(edge, raw_conns, name, value):
    sbx = edge.take()
    mk = new_marker()
    conn = await raw_conns(edge.port)
    r = await conn.request("GET", f"/m/{mk}/", sbx.host(), [(name, value)], timeout=3)
    assert r.status == 200
    await settle()
    [fwd] = sbx.received(mk)
    sent = [(k, v) for k, v in fwd.headers if k.lower() == name.lower().encode()
            and v == value.encode()]
    assert not sent, f"{name}: {value} reached the backend as sent"
    assert TOKEN.encode() not in sbx.backend.raw()


HOST_BYTES = [b"\xa0", b"\x85", b"\x1c", b"\x1d", b"\x1e", b"\x1f", b"\x0b", b"\x0c",
              b"\xe2\x80\x8b", b"\xc2\xa0", b"\x00", b"\x7f", b"\x80", b"\xff", b"_", b"!",
              b"%", b"@", b",", b";", b"/", b"\\", b"#", b"?", b"*", b"+", b"=", b"~", b"'",
              b"\""]
HOST_CASES = [(byte, where) for byte in HOST_BYTES for where in ("prefix", "suffix", "label")]


@pytest.mark.parametrize("byte, where", HOST_CASES,
                         ids=[f"{b!r}-{w}" for b, w in HOST_CASES])
async def test_host_with_foreign_bytes_is_refused(edge, raw_conns, byte, where):
    sbx = edge.take()
    mk = new_marker()
    port_label, domain = f"3000-{sbx.sid}".encode(), b".localhost"
    host = {"prefix": byte + port_label + domain, "suffix": port_label + domain + byte,
            "label": port_label + byte + domain}[where]
    conn = await raw_conns(edge.port)
    await conn.send(f"GET /m/{mk}/ HTTP/1.1\r\n".encode() + b"Host: " + host + b"\r\n\r\n")
    got = await responses_on(conn, 1, timeout=2)
    await settle()
    assert sbx.received(mk) == [], f"Host {host!r} was routed to {sbx.sid}"
    assert got and got[0].status == 400, describe(got)


@pytest.mark.parametrize("line", [b"GET /m/{mk}/", b"POST /m/{mk}/", b"GET /m/{mk}/ ",
                                  b"GET /m/{mk}/ HTTP/", b"GET /m/{mk}/ HTTP/1.1 x"])
async def test_request_line_without_version_is_never_forwarded(edge, raw_conns, line):
    sbx = edge.take()
    mk = new_marker()
    conn = await raw_conns(edge.port)
    await conn.send(line.replace(b"{mk}", mk.encode()) + b"\r\nHost: " + sbx.host().encode()
                    + b"\r\n\r\n")
    got = await responses_on(conn, 1, timeout=2)
    await settle()
    assert sbx.backend.bytes_received() == 0, sbx.backend.raw()[:200]
    assert not got or got[0].status == 400, describe(got)


@pytest.mark.parametrize("path", ["//evil.example/", "///evil.example/", "/\\evil.example/",
                                  "/\\\\evil.example/", "//\\evil.example/", "/%2F%2Fevil.example/",
                                  "/%5Cevil.example/", "//evil.example"])
async def test_token_redirect_stays_on_the_sandbox(edge, raw_conns, path):
    sbx = edge.take(locked=True)
    conn = await raw_conns(edge.port)
    r = await conn.request("GET", f"{path}?access_token={TOKEN}", sbx.host(), timeout=3)
    if r.status != 302:
        assert r.status == 400, describe([r])
        return
    location = r.header("Location")
    assert location == "/" or (location.startswith("/") and location[1:2] not in ("/", "\\", "")),\
        f"redirect to {location!r} leaves the sandbox"


async def test_gzip_transfer_coding_reaches_the_client(edge, raw_conns):
    sbx = edge.take()
    mk = new_marker()
    conn = await raw_conns(edge.port)
    r = await conn.request("GET", f"/m/{mk}/?script=gzipchunked", sbx.host(), timeout=3)
    codings = [c.strip().lower() for v in r.header_all("Transfer-Encoding") for c in v.split(",")]
    assert codings[-2:] == ["gzip", "chunked"], f"Transfer-Encoding {codings}"
    assert gzip.decompress(r.body) == GZIP_PAYLOAD


# -- 8. a sandbox cannot set cookies for other sandboxes ----------------------------------------

def cookie_attrs(value: str) -> list[str]:
    return [a.strip() for a in value.split(";") if a.strip()]


SET_COOKIES = [
    ("base domain", "a=1; Domain=localhost; Path=/", "a=1; Path=/"),
    ("dotted base domain", "a=1; Domain=.localhost; Path=/", "a=1; Path=/"),
    ("lower-case attribute", "a=1; domain=localhost; path=/; HttpOnly", "a=1; path=/; HttpOnly"),
    ("upper-case domain", "a=1; Path=/; DOMAIN=LOCALHOST; Secure", "a=1; Path=/; Secure"),
    ("another sandbox", "a=1; Domain=3000-othersandbox.localhost; Path=/", "a=1; Path=/"),
    ("its own host", "a=1; Domain={own}; Path=/", "a=1; Domain={own}; Path=/"),
    ("no domain", "a=1; Path=/; Max-Age=60", "a=1; Path=/; Max-Age=60"),
]


@pytest.mark.parametrize("name, sent, expected", SET_COOKIES, ids=[c[0] for c in SET_COOKIES])
async def test_set_cookie_domain_is_confined_to_the_sandbox(edge, raw_conns, name, sent,
                                                            expected):
    sbx = edge.take()
    mk = new_marker()
    own = sbx.host()
    conn = await raw_conns(edge.port)
    r = await conn.request("GET", f"/m/{mk}/?script=setcookie", own + ":8080",
                           [("X-Set-Cookie", sent.format(own=own))], timeout=3)
    assert r.status == 200
    assert [cookie_attrs(v) for v in r.header_all("Set-Cookie")] == [
        cookie_attrs(expected.format(own=own))]


async def test_set_cookie_passes_unchanged_without_isolation(proxy, raw_conns):
    fleet = RecordingFleet()
    try:
        backend = fleet.add("plain")
        p = proxy({"plain": {"host": "127.0.0.1", "ports": {3000: backend.port}}},
                  config={"access": {"isolate_cookies": False}})
        conn = await raw_conns(p.port)
        sent = "a=1; Domain=localhost; Path=/"
        r = await conn.request("GET", "/m/x/?script=setcookie", p.host("plain"),
                               [("X-Set-Cookie", sent)], timeout=3)
        assert r.header_all("Set-Cookie") == [sent]
    finally:
        fleet.stop()


# -- 9. found while writing these tests ---------------------------------------------------------

TRAILER_FIELDS = [("X-Forwarded-For", "6.6.6.6"), ("X-Real-IP", "6.6.6.6"),
                  ("Forwarded", "for=6.6.6.6"), (TOKEN_HEADER, TOKEN),
                  ("Cookie", f"{COOKIE}={TOKEN}"), ("Host", "3000-other.localhost")]


@pytest.mark.parametrize("name, value", TRAILER_FIELDS, ids=[t[0] for t in TRAILER_FIELDS])
async def test_request_trailers_cannot_carry_what_headers_may_not(edge, raw_conns, name, value):
    """A field the proxy removes or rewrites in the head (forwarding headers, credentials, Host)
    must not reach the backend through the trailer section instead (RFC 9110 6.5.1: routing and
    authentication fields are not trailers)."""
    sbx = edge.take(locked=True)
    mk = new_marker()
    conn = await raw_conns(edge.port)
    await conn.send(request_bytes(sbx.host(), mk, "POST", [
        (TOKEN_HEADER, TOKEN), ("Transfer-Encoding", "chunked")])
        + f"3\r\nabc\r\n0\r\n{name}: {value}\r\nX-Fine: 1\r\n\r\n".encode())
    [r] = await responses_on(conn, 1)
    assert r.status == 200, describe([r])
    await settle()
    [fwd] = sbx.received(mk)
    assert fwd.body == b"abc"
    sent_again = [(k, v) for k, v in fwd.headers + fwd.trailers
                  if k.lower() == name.lower().encode() and v == value.encode()]
    assert not sent_again, f"the trailer {name}: {value} reached the backend: {fwd.trailers}"
    assert TOKEN.encode() not in sbx.backend.raw()


@pytest.mark.parametrize("how", ["pipelined", "keep-alive"])
async def test_body_after_a_head_response_never_reaches_the_next_request(edge, raw_conns, how):
    """A HEAD response has no body whatever its Content-Length says (RFC 9110 9.3.2): bytes a
    backend sends after its head are not the next request's answer."""
    sbx = edge.take()
    mk, mk2 = new_marker(), new_marker()
    conn = await raw_conns(edge.port)
    first = request_bytes(sbx.host(), mk, "HEAD", query="?script=headbody")
    second = request_bytes(sbx.host(), mk2)
    if how == "pipelined":
        await conn.send(first + second)
        r1 = await conn.response(method="HEAD", timeout=3)
    else:
        await conn.send(first)
        r1 = await conn.response(method="HEAD", timeout=3)
        await asyncio.sleep(0.05)
        await conn.send(second)
    got = [r1] + await responses_on(conn, 1)
    assert [r.header("X-Test-Id") for r in got] == [mk, mk2], describe(got)
    assert got[1].body == f"{sbx.backend.name}:{mk2}".encode()


# -- found by the outside attack on the fixes (second round) --------------------------------------

SHARE_KEY_FOR_TESTS = "share-key-0123456789abcdef"
QUERY_SPELLINGS = ["access_token", "ACCESS_TOKEN", "access%5Ftoken", "access_token[]",
                   "access.token", "access%2etoken", "access+token", "access%20token"]


@pytest.mark.parametrize("spelling", QUERY_SPELLINGS)
@pytest.mark.parametrize("host", ["49983-locked.localhost", "3000-open.localhost"])
@pytest.mark.parametrize("separator", ["&", ";"])
async def test_query_credentials_never_reach_a_backend_on_any_port(proxy, backend, spelling,
                                                                   host, separator):
    """Ports without a token check (exempt ports, open sandboxes) still never see the
    credential parameters, under spellings frameworks read as them."""
    p = proxy(secured(backend.port), config={"access": {"browser_cookie": True,
                                                        "share_key": SHARE_KEY_FOR_TESTS}})
    target = f"/echo?a=1{separator}{spelling}={TOKEN}{separator}share=x.1.2.3.sig&b=2"
    conn = await RawConn.open(p.port)
    try:
        r = await conn.request("GET", target, host)
    finally:
        await conn.aclose()
    assert r.status == 200, r.body
    forwarded = r.json()["raw_path"]
    assert TOKEN not in forwarded and "share=" not in forwarded, forwarded
    assert "a=1" in forwarded and "b=2" in forwarded


@pytest.mark.parametrize("name", ["sandbox-access-token", "Sandbox-Access-Token",
                                  "SANDBOX-ACCESS-TOKEN", "sandbox-share", "Sandbox-Share"])
async def test_credential_cookies_are_removed_in_any_case(proxy, backend, name):
    p = proxy(secured(backend.port), config={"access": {"browser_cookie": True,
                                                        "share_key": SHARE_KEY_FOR_TESTS}})
    r = await fetch(p, "/echo", host="3000-open.localhost",
                    headers={"Cookie": f"keep=1; {name}=secret-value"})
    assert r.status == 200
    assert header_value(r.json(), "Cookie") == "keep=1"


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
    b"Set-Cookie: planted=1; Domain=localhost; Path=/\r\n\r\n",
    b""])
async def test_cookie_isolation_covers_interim_and_switching_responses(proxy, interim):
    """A sandbox cannot plant parent-domain cookies through a 1xx or a 101 either."""
    async def handler(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if b"upgrade: websocket" in head.lower():
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\nSet-Cookie: planted=1; Domain=localhost\r\n\r\n")
        else:
            writer.write(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                         b"Set-Cookie: planted=2; Domain=.localhost\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()
    async with raw_backend(handler) as port:
        p = proxy({"open": {"host": "127.0.0.1", "ports": {3000: port}}})
        for upgrade in (False, True):
            extra = ("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n") if upgrade else ""
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
            writer.write(f"GET / HTTP/1.1\r\nHost: 3000-open.localhost\r\n{extra}\r\n".encode())
            await writer.drain()
            received = b""
            try:
                while b"planted" not in received or not received.endswith((b"ok", b"\r\n\r\n")):
                    chunk = await asyncio.wait_for(reader.read(4096), 2)
                    if not chunk:
                        break
                    received += chunk
            except TimeoutError:
                pass
            writer.close()
            assert b"planted" in received, received
            assert b"Domain" not in received, received
