"""Host parsing and routing: ``<port>-<sandboxId>.<domain>`` -> sandbox backend."""

from __future__ import annotations

import json as _json
import re as _re
import socket as _socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.raw_http import RawConn, fetch, not_found_body

pytestmark = pytest.mark.timeout(60)

# "{bp}" is replaced by the backend's real port (reached without a port mapping).
ROUTED = [
    pytest.param("3000-demo.localhost", id="mapped-port"),
    pytest.param("{bp}-demo.localhost", id="unmapped-port-same-number"),
    pytest.param("3000-DEMO.LOCALHOST", id="uppercase"),
    pytest.param("3000-Demo.LocalHost", id="mixed-case"),
    pytest.param("3000-demo.localhost.", id="trailing-dot"),
    pytest.param("3000-demo.localhost:8080", id="host-port-ignored"),
    pytest.param("3000-demo.localhost.:8080", id="trailing-dot-and-port"),
    pytest.param("3000-demo.sbx.example.test", id="second-domain"),
    pytest.param("3000-DEMO.SBX.Example.TEST.", id="second-domain-upper-dot"),
]

BAD_HOSTS = [
    pytest.param("localhost", id="no-dot"),
    pytest.param("3000-demo", id="no-domain"),
    pytest.param("3000demo.localhost", id="no-dash"),
    pytest.param("-demo.localhost", id="empty-port"),
    pytest.param("3000-.localhost", id="empty-id"),
    pytest.param("0-demo.localhost", id="port-0"),
    pytest.param("65536-demo.localhost", id="port-65536"),
    pytest.param("70000-demo.localhost", id="port-70000"),
    pytest.param("abc-demo.localhost", id="port-not-numeric"),
    pytest.param("+3000-demo.localhost", id="port-with-plus"),
    pytest.param("3_000-demo.localhost", id="port-with-underscore"),
    pytest.param("3000-de_mo.localhost", id="id-underscore"),
    # "3000-de-mo" is the older <port>-<id>-<clientId> form since issue 13 (tests/test_parity.py)
    pytest.param("3000-d%2d-mo.localhost", id="id-dash-encoded"),
    pytest.param("3000-dem%6f.localhost", id="id-percent"),
    pytest.param("3000-demo.other.test", id="unknown-domain"),
    pytest.param("3000-demo.xlocalhost", id="domain-suffix-only"),
    pytest.param("3000-demo.sub.localhost", id="extra-label"),
    pytest.param("3000-demo.localhost.evil.test", id="domain-as-prefix"),
    pytest.param("127.0.0.1:8080", id="ip-literal"),
    pytest.param("", id="empty-host"),
]


@pytest.mark.parametrize("host", ROUTED)
async def test_routed_hosts_reach_backend(shared_proxy, backend, host):
    host = host.replace("{bp}", str(backend.port))
    conn = await RawConn.open(shared_proxy.port)
    try:
        resp = await conn.request("GET", "/echo?routing=1", host)
    finally:
        await conn.aclose()
    assert resp.status == 200, resp.body
    echo = resp.json()
    assert echo["backend"] == "main"
    assert echo["raw_path"] == "/echo?routing=1"
    # not masked: the backend sees the Host exactly as the client sent it
    assert [v for k, v in echo["headers"] if k.lower() == "host"] == [host]


@pytest.mark.parametrize("host", BAD_HOSTS)
async def test_malformed_hosts_are_400_plain_text(shared_proxy, backend, host):
    before = backend.state["requests"]
    conn = await RawConn.open(shared_proxy.port)
    try:
        resp = await conn.request("GET", "/echo", host)
    finally:
        await conn.aclose()
    assert resp.status == 400, (host, resp.status, resp.body)
    assert (resp.header("Content-Type") or "").startswith("text/plain")
    assert resp.header("Access-Control-Allow-Origin") == "*"
    assert resp.body, "400 must carry a plain-text explanation"
    assert backend.state["requests"] == before, "a malformed host must not reach a backend"


async def test_missing_host_header_is_400(shared_proxy):
    conn = await RawConn.open(shared_proxy.port)
    try:
        resp = await conn.request("GET", "/echo", None)
    finally:
        await conn.aclose()
    assert resp.status == 400


async def test_duplicate_host_header_is_400(shared_proxy, backend):
    before = backend.state["requests"]
    conn = await RawConn.open(shared_proxy.port)
    try:
        resp = await conn.request(
            "GET", "/echo", "3000-demo.localhost", headers=[("Host", "3000-other.localhost")]
        )
    finally:
        await conn.aclose()
    assert resp.status == 400
    assert backend.state["requests"] == before


async def test_valid_host_unknown_sandbox_is_502_not_found(shared_proxy):
    r = await fetch(shared_proxy, "/echo", host="3000-nosuchbox.localhost")
    assert r.status == 502
    assert r.json() == not_found_body("nosuchbox")


async def test_uppercase_id_is_reported_lowercase(shared_proxy):
    r = await fetch(shared_proxy, "/", host="3000-NoSuchBox.LOCALHOST")
    assert r.status == 502
    assert r.json() == not_found_body("nosuchbox")


async def test_port_mapping_routes_sandbox_port_to_backend_port(shared_proxy, backend):
    # nothing listens on 127.0.0.1:3000; the registry maps sandbox port 3000 to the backend
    ok = await fetch(shared_proxy, "/echo", host="3000-demo.localhost")
    assert ok.status == 200
    assert ok.json()["backend"] == "main"
    assert ok.headers["X-Backend"] == "main"


async def test_highest_port_is_valid_syntax(shared_proxy):
    # 65535 parses (then nothing listens on it): a 502 from the proxy, not a 400
    r = await fetch(shared_proxy, "/", host="65535-nosuchbox.localhost")
    assert r.status == 502
    assert r.json() == not_found_body("nosuchbox")


async def test_same_client_connection_can_address_different_sandboxes(shared_proxy):
    conn = await RawConn.open(shared_proxy.port)
    try:
        a = await conn.request("GET", "/echo?n=1", "3000-demo.localhost")
        b = await conn.request("GET", "/echo?n=2", "3000-nosuchbox.localhost")
        c = await conn.request("GET", "/echo?n=3", "3000-masked.localhost")
    finally:
        await conn.aclose()
    assert a.status == 200 and a.json()["raw_path"] == "/echo?n=1"
    assert b.status == 502 and b.json() == not_found_body("nosuchbox")
    assert c.status == 200 and c.json()["raw_path"] == "/echo?n=3"
    assert [v for k, v in c.json()["headers"] if k.lower() == "host"] == ["localhost:3000"]


# ---------------------------------------------------------------------------
# Property: the proxy's verdict on any Host matches a small reference model
# ---------------------------------------------------------------------------

# <port>-<id>, or the older <port>-<id>-<clientId> whose client id is ignored (issue 13)
_LABEL = _re.compile(r"([0-9]+)-([a-z0-9]+)(?:-[a-z0-9-]*)?")


def model_verdict(host: str, domains: list[str]):
    """None for a malformed Host (400), else (port, sandbox id)."""
    h = host.lower()
    m = _re.fullmatch(r"(.*):[0-9]{1,5}", h)
    if m:
        h = m.group(1)
    if h.endswith("."):
        h = h[:-1]
    label, dot, rest = h.partition(".")
    if not dot or rest not in domains:
        return None
    m = _LABEL.fullmatch(label)
    if not m or not m.group(2).isascii() or not m.group(1).isascii():
        return None
    port = int(m.group(1))
    if not 1 <= port <= 65535:
        return None
    return port, m.group(2)


def _mixed_case(s: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c for c, f in zip(s, flips + [False] * len(s)))


ports = st.one_of(
    st.integers(1, 65535).map(str),
    st.sampled_from(["0", "65536", "70000", "99999", "", "abc", "+80", "8_0", "-1", "1e3",
                     "\u0663", "0x50"]),
)
ids = st.one_of(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12).map(lambda s: "zz" + s),
    st.text("abcxyzABCXYZ019_-.%~", min_size=0, max_size=8),
)
domains_st = st.sampled_from(["localhost", "LOCALHOST", "sbx.example.test", "Sbx.Example.Test",
                              "other.test", "xlocalhost", "local", "", "sbx.example"])


@st.composite
def hosts(draw):
    port = draw(ports)
    sep = draw(st.sampled_from(["-", "-", "-", "", "_", "--"]))
    sid = draw(ids)
    domain = draw(domains_st)
    flips = draw(st.lists(st.booleans(), max_size=40))
    host = _mixed_case(f"{port}{sep}{sid}", flips)
    if domain:
        host += "." + domain
    if draw(st.booleans()):
        host += "."
    if draw(st.booleans()):
        host += f":{draw(st.integers(1, 65535))}"
    return host


def _sync_get(port: int, host: str) -> tuple[int, bytes]:
    with _socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /prop HTTP/1.1\r\nHost: " + host.encode("utf-8")
                  + b"\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host=hosts())
def test_host_verdict_matches_model(shared_proxy, host):
    # no sandbox id starting with "zz" is registered: a well-formed Host is a 502 not found
    status, body = _sync_get(shared_proxy.port, host)
    verdict = model_verdict(host, ["localhost", "sbx.example.test"])
    if verdict is None or "\u0663" in host:
        assert status == 400, (host, status, body)
    else:
        port, sid = verdict
        if sid in ("demo", "masked", "refused"):
            assert status in (200, 502)
        else:
            assert status == 502, (host, status, body)
            assert _json.loads(body) == not_found_body(sid)
