"""Header handling: hop-by-hop, X-Forwarded-*, trusted proxies, Host masking, raw target."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from support.raw_http import RawConn, header_value, header_values, raw_backend

pytestmark = pytest.mark.timeout(60)

HOP_BY_HOP = ["Keep-Alive", "Proxy-Connection", "Trailer", "Proxy-Authorization",
              "X-Private-Hop", "X-Other-Hop"]


async def echo_via(p, target: str, host: str, headers=None, body: bytes | None = None,
                   method: str = "GET"):
    conn = await RawConn.open(p.port)
    try:
        resp = await conn.request(method, target, host, headers=headers, body=body)
    finally:
        await conn.aclose()
    assert resp.status == 200, resp.body
    return resp, resp.json()


async def test_request_hop_by_hop_headers_are_removed(shared_proxy):
    _, echo = await echo_via(shared_proxy, "/echo", "3000-demo.localhost", headers=[
        ("Connection", "keep-alive, X-Private-Hop"),
        ("Connection", "x-other-hop"),
        ("Keep-Alive", "timeout=99"),
        ("Proxy-Connection", "keep-alive"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic c2VjcmV0OnNlY3JldA=="),
        ("X-Private-Hop", "do-not-forward"),
        ("X-Other-Hop", "do-not-forward-either"),
        ("Upgrade", "h2c"),  # not listed in Connection: not an upgrade request, still hop-by-hop
        ("X-End-To-End", "forward-me"),
    ])
    names = {k.lower() for k, _ in echo["headers"]}
    for h in HOP_BY_HOP + ["Upgrade"]:
        assert h.lower() not in names, f"{h} reached the backend: {echo['headers']}"
    for v in header_values(echo, "Connection"):
        tokens = {t.strip().lower() for t in v.split(",")}
        assert not tokens & {"x-private-hop", "x-other-hop", "upgrade"}, v
    assert header_value(echo, "X-End-To-End") == "forward-me"
    assert header_values(echo, "Transfer-Encoding") == []


@pytest.mark.parametrize("te, forwarded", [("trailers", ["trailers"]), ("gzip;q=0.5", []),
                                           ("trailers, deflate", ["trailers"])])
async def test_te_header_is_hop_by_hop_except_trailers(shared_proxy, te, forwarded):
    # TE is hop-by-hop: the client's codings never reach the backend. "trailers" is re-sent
    # by the proxy itself, because it relays trailers to the client (as Go's proxy does), with
    # the "TE" connection option RFC 9110 10.1.4 requires beside it.
    _, echo = await echo_via(shared_proxy, "/echo", "3000-demo.localhost", headers=[
        ("TE", te), ("Connection", "TE")])
    assert header_values(echo, "TE") == forwarded, echo["headers"]
    connection = [t.strip().lower() for v in header_values(echo, "Connection")
                  for t in v.split(",")]
    assert ("te" in connection) == bool(forwarded), echo["headers"]


async def test_end_to_end_headers_kept_with_duplicates_in_order(shared_proxy):
    _, echo = await echo_via(shared_proxy, "/echo", "3000-demo.localhost", headers=[
        ("X-Dup", "first"),
        ("Authorization", "Bearer abc.def"),
        ("X-Dup", "second"),
        ("Cookie", "a=1; b=2"),
        ("X-Empty", ""),
        ("X-Spaces", "a  b   c"),
        ("X-Dup", "third"),
    ])
    assert header_values(echo, "X-Dup") == ["first", "second", "third"]
    assert header_value(echo, "Authorization") == "Bearer abc.def"
    assert header_value(echo, "Cookie") == "a=1; b=2"
    assert header_value(echo, "X-Empty") == ""
    assert header_value(echo, "X-Spaces") == "a  b   c"


async def test_large_cookie_header_passes(shared_proxy):
    cookie = "; ".join(f"c{i}={'v' * 200}" for i in range(100))  # ~20 KiB in one line
    assert len(cookie) > 16 * 1024
    _, echo = await echo_via(shared_proxy, "/echo", "3000-demo.localhost",
                             headers=[("Cookie", cookie)])
    assert header_value(echo, "Cookie") == cookie


async def test_request_body_and_content_length_forwarded(shared_proxy):
    body = bytes(range(256)) * 1000
    _, echo = await echo_via(shared_proxy, "/upload", "3000-demo.localhost", body=body,
                             method="POST", headers=[("Content-Type", "application/octet-stream")])
    assert echo["method"] == "POST"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert header_value(echo, "Content-Length") == str(len(body))
    assert header_value(echo, "Content-Type") == "application/octet-stream"


async def test_backend_sees_http11(shared_proxy):
    _, echo = await echo_via(shared_proxy, "/echo", "3000-demo.localhost")
    assert echo["version"] == "1.1"


@pytest.mark.parametrize("target", [
    "/a/../b//c?x=%2F&y",
    "/%2e%2e/%2F/x%20y?q=a+b&q=c%26d",
    "//double//slashes/?",
    "/path;matrix=1/..;/x?",
    "/~user/%7Euser/caf%C3%A9?emoji=%F0%9F%98%80",
    "/?a=1&a=2&=&&b",
    "/x?redirect=http://evil.example/%0d%0a",
    "/" + "seg/" * 200 + "?" + "k=v&" * 200,
])
async def test_request_target_passed_byte_for_byte(shared_proxy, target):
    _, echo = await echo_via(shared_proxy, target, "3000-demo.localhost")
    assert echo["raw_path"] == target


async def test_methods_passed_through(shared_proxy):
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"):
        body = b"payload" if method in ("POST", "PUT", "PATCH") else None
        _, echo = await echo_via(shared_proxy, "/echo", "3000-demo.localhost", method=method,
                                 body=body)
        assert echo["method"] == method


async def test_x_forwarded_set_for_direct_client(shared_proxy):
    _, echo = await echo_via(shared_proxy, "/echo", "3000-demo.localhost:7777")
    assert header_value(echo, "X-Forwarded-For") == "127.0.0.1"
    assert header_value(echo, "X-Forwarded-Proto") == "http"
    assert header_value(echo, "X-Forwarded-Host") == "3000-demo.localhost:7777"


async def test_untrusted_client_x_forwarded_replaced(shared_proxy):
    _, echo = await echo_via(shared_proxy, "/echo", "3000-demo.localhost", headers=[
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-For", "198.51.100.7"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "spoofed.example"),
    ])
    assert header_values(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(echo, "X-Forwarded-Proto") == ["http"]
    assert header_values(echo, "X-Forwarded-Host") == ["3000-demo.localhost"]


async def test_trusted_proxy_x_forwarded_for_appended(proxy):
    p = proxy(config={"server": {"trusted_proxies": ["127.0.0.0/8", "::1/128"]}})
    _, echo = await echo_via(p, "/echo", "3000-demo.localhost", headers=[
        ("X-Forwarded-For", "203.0.113.9, 10.1.2.3"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "3000-demo.public.example"),
    ])
    assert header_values(echo, "X-Forwarded-For") == ["203.0.113.9, 10.1.2.3, 127.0.0.1"]
    # config/proxy.toml: from trusted proxies X-Forwarded-Proto/-Host are kept
    assert header_values(echo, "X-Forwarded-Proto") == ["https"]
    assert header_values(echo, "X-Forwarded-Host") == ["3000-demo.public.example"]

    # several X-Forwarded-For lines are one list: the client IP goes at its end
    _, echo = await echo_via(p, "/echo", "3000-demo.localhost", headers=[
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-For", "10.1.2.3"),
    ])
    assert ", ".join(header_values(echo, "X-Forwarded-For")) == "203.0.113.9, 10.1.2.3, 127.0.0.1"

    # a trusted client that sends none gets the usual ones
    _, echo = await echo_via(p, "/echo", "3000-demo.localhost")
    assert header_values(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(echo, "X-Forwarded-Proto") == ["http"]
    assert header_values(echo, "X-Forwarded-Host") == ["3000-demo.localhost"]


async def test_trusted_proxies_not_matching_client_replace(proxy):
    p = proxy(config={"server": {"trusted_proxies": ["10.0.0.0/8"]}})
    _, echo = await echo_via(p, "/echo", "3000-demo.localhost", headers=[
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "spoofed.example"),
    ])
    assert header_values(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(echo, "X-Forwarded-Proto") == ["http"]
    assert header_values(echo, "X-Forwarded-Host") == ["3000-demo.localhost"]


async def test_mask_sets_host_to_requested_sandbox_port(shared_proxy, backend):
    _, echo = await echo_via(shared_proxy, "/echo", "3000-masked.localhost:4444")
    # ${PORT} is the sandbox port from the URL (3000), not the mapped backend port
    assert header_values(echo, "Host") == ["localhost:3000"]
    assert header_values(echo, "X-Forwarded-Host") == ["3000-masked.localhost:4444"]
    assert backend.port != 3000


async def test_mask_with_unmapped_port(shared_proxy, backend):
    _, echo = await echo_via(shared_proxy, "/echo", f"{backend.port}-MASKED.localhost")
    assert header_values(echo, "Host") == [f"localhost:{backend.port}"]
    assert header_values(echo, "X-Forwarded-Host") == [f"{backend.port}-MASKED.localhost"]


async def test_no_mask_passes_host_unchanged(shared_proxy):
    _, echo = await echo_via(shared_proxy, "/echo", "3000-demo.sbx.example.test:4444")
    assert header_values(echo, "Host") == ["3000-demo.sbx.example.test:4444"]
    assert header_values(echo, "X-Forwarded-Host") == ["3000-demo.sbx.example.test:4444"]


async def test_mask_without_port_placeholder(proxy, backend):
    p = proxy(sandboxes={
        "fixed": {"host": "127.0.0.1", "mask_request_host": "app.internal", "ports": {3000: backend.port}},
        "multi": {"host": "127.0.0.1", "mask_request_host": "${PORT}.svc:${PORT}",
                  "ports": {3000: backend.port}},
    })
    _, echo = await echo_via(p, "/echo", "3000-fixed.localhost")
    assert header_values(echo, "Host") == ["app.internal"]
    assert header_values(echo, "X-Forwarded-Host") == ["3000-fixed.localhost"]
    _, echo = await echo_via(p, "/echo", "3000-multi.localhost")
    assert header_values(echo, "Host") == ["3000.svc:3000"]


async def test_multiple_set_cookie_kept_separate(shared_proxy):
    conn = await RawConn.open(shared_proxy.port)
    try:
        resp = await conn.request("GET", "/set-cookies", "3000-demo.localhost")
    finally:
        await conn.aclose()
    assert resp.status == 200
    assert resp.header_all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]


async def test_response_hop_by_hop_headers_removed(shared_proxy):
    async def handler(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\n"
                b"Content-Length: 2\r\n"
                b"Connection: X-Resp-Hop\r\n"
                b"X-Resp-Hop: secret\r\n"
                b"Keep-Alive: timeout=5, max=7\r\n"
                b"Proxy-Connection: keep-alive\r\n"
                b"Proxy-Authenticate: Basic realm=x\r\n"
                b"X-Kept: yes\r\n"
                b"X-Kept: twice\r\n"
                b"\r\n"
                b"ok"
            )
            await writer.drain()
            await reader.read()
        finally:
            writer.close()

    async with raw_backend(handler) as port:
        conn = await RawConn.open(shared_proxy.port)
        try:
            resp = await conn.request("GET", "/", f"{port}-demo.localhost")
        finally:
            await conn.aclose()
    assert resp.status == 200
    assert resp.body == b"ok"
    assert resp.header_all("X-Kept") == ["yes", "twice"]
    assert resp.header_all("X-Resp-Hop") == []
    assert "x-resp-hop" not in resp.connection_tokens()
    assert resp.header_all("Proxy-Connection") == []
    assert "timeout=5, max=7" not in resp.header_all("Keep-Alive")
