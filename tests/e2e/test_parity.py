"""Parity with the reference sandbox proxy (issue 13), end to end through the real CLI: the URL
with a client id, paused and transitioning sandboxes, per-sandbox ingress rules, CORS preflights
the proxy answers itself, and Connect streams that lose their backend."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest

from support.fleet import ControlPlane, control_plane  # noqa: F401 - fixture
from support.raw_http import RawConn, fetch, header_value, raw_backend
from test_operations import v2_header

pytestmark = pytest.mark.timeout(60)

BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0",
           "Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def box(backend_port: int, **extra) -> dict:
    return {"host": "127.0.0.1", "ports": {3000: backend_port, 8080: backend_port}, **extra}


# -- 1. the URL with a client id ----------------------------------------------------------------

async def test_client_id_url_routes_to_the_sandbox(proxy, backend):
    p = proxy({"ip3nfrvajtqu5ktoxugc7": box(backend.port)})
    for host in ("3000-ip3nfrvajtqu5ktoxugc7-b0b684e9.localhost",
                 "3000-ip3nfrvajtqu5ktoxugc7-b0b684e9.localhost:8080",
                 "3000-IP3NFRVAJTQU5KTOXUGC7-B0B684E9.localhost"):
        r = await fetch(p, "/echo", host=host)
        assert r.status == 200, (host, r.body)
        assert header_value(r.json(), "X-Forwarded-Host") == host
    r = await fetch(p, "/echo", host="3000-nosuchbox-b0b684e9.localhost")
    assert r.status == 502 and r.json()["sandboxId"] == "nosuchbox"
    # the id rule still applies to the id part
    r = await fetch(p, "/echo", host="3000-ip3_nfr-b0b684e9.localhost")
    assert r.status == 400


# -- 2. paused and transitioning sandboxes ------------------------------------------------------

PAUSED = {"sandboxId": "sleepy", "message": "The sandbox is paused", "code": 409,
          "canAutoResume": False}
TRANSITIONING = {"sandboxId": "sleepy", "code": 409,
                 "message": "The sandbox is still transitioning. Try again in a moment."}


@pytest.mark.parametrize("state, expected", [
    ("paused", PAUSED), ("pausing", TRANSITIONING), ("resuming", TRANSITIONING)])
async def test_not_running_sandboxes_get_409(proxy, backend, state, expected):
    p = proxy({"sleepy": box(backend.port, state=state)})
    r = await fetch(p, "/echo", host="3000-sleepy.localhost")
    assert r.status == 409 and r.json() == expected
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = await fetch(p, "/", host="3000-sleepy.localhost", headers=BROWSER)
    assert r.status == 409 and r.headers["Content-Type"].startswith("text/html")
    assert expected["message"] in r.body.decode()


async def test_paused_sandbox_never_reaches_the_backend(proxy):
    seen = []

    async def handler(reader, writer):
        seen.append(await reader.read(1000))
        writer.close()
    async with raw_backend(handler) as port:
        p = proxy({"sleepy": box(port, state="paused")})
        r = await fetch(p, "/x", host="3000-sleepy.localhost")
        assert r.status == 409
        await asyncio.sleep(0.2)
        assert seen == []


async def test_resuming_sandbox_with_auto_resume_is_waited_for_without_a_webhook_call(
        proxy, backend, control_plane):
    p = proxy({"sleepy": box(backend.port, state="resuming", auto_resume=True)},
              config={"registry": {"resume_url": control_plane.url, "resume_timeout": 5}})

    async def finish_resuming():
        await asyncio.sleep(0.5)
        p.write_registry({"sleepy": box(backend.port, state="running", auto_resume=True)})
    flip = asyncio.create_task(finish_resuming())
    r = await fetch(p, "/echo", host="3000-sleepy.localhost")
    await flip
    assert r.status == 200
    assert control_plane.calls == []


async def test_pausing_sandbox_with_auto_resume_is_resumed_once_paused(
        proxy, backend, control_plane):
    p = proxy({"sleepy": box(backend.port, state="pausing", auto_resume=True)},
              config={"registry": {"resume_url": control_plane.url, "resume_timeout": 5}})
    control_plane.on_resume = lambda body: p.write_registry(
        {"sleepy": box(backend.port, state="running", auto_resume=True)})

    async def finish_pausing():
        await asyncio.sleep(0.5)
        assert control_plane.calls == []  # not while it is still pausing
        p.write_registry({"sleepy": box(backend.port, state="paused", auto_resume=True)})
    flip = asyncio.create_task(finish_pausing())
    r = await fetch(p, "/echo", host="3000-sleepy.localhost")
    await flip
    assert r.status == 200
    assert len(control_plane.calls) == 1


# -- 3. per-sandbox ingress rules -----------------------------------------------------------------

def denied(ip: str, port: int = 3000, sid: str = "fenced") -> dict:
    return {"sandboxId": sid, "clientIp": ip, "port": port, "code": 403,
            "message": f"Access denied: client {ip} is not allowed to reach port {port} on this "
                       "sandbox"}


async def test_ingress_rules_for_every_port(proxy, backend):
    p = proxy({"fenced": box(backend.port, allowed_clients=["10.0.0.0/8", "192.0.2.7"]),
               "open": box(backend.port, allowed_clients=["127.0.0.0/8"])})
    r = await fetch(p, "/echo", host="3000-fenced.localhost")
    assert r.status == 403 and r.json() == denied("127.0.0.1")
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = await fetch(p, "/echo", host="8080-fenced.localhost")
    assert r.status == 403 and r.json() == denied("127.0.0.1", 8080)
    assert (await fetch(p, "/echo", host="3000-open.localhost")).status == 200


async def test_ingress_rules_per_port(proxy, backend):
    rules = {"3000": ["10.0.0.0/8"], "*": ["127.0.0.1/32"]}
    p = proxy({"fenced": box(backend.port, allowed_clients=rules)})
    r = await fetch(p, "/echo", host="3000-fenced.localhost")
    assert r.status == 403 and r.json() == denied("127.0.0.1")
    assert (await fetch(p, "/echo", host="8080-fenced.localhost")).status == 200


async def test_ingress_uses_the_trusted_forwarded_address(proxy, backend):
    p = proxy({"fenced": box(backend.port, allowed_clients=["203.0.113.0/24"])},
              config={"server": {"trusted_proxies": ["127.0.0.1/32"]}})
    ok = await fetch(p, "/echo", host="3000-fenced.localhost",
                     headers={"X-Forwarded-For": "203.0.113.9"})
    assert ok.status == 200
    r = await fetch(p, "/echo", host="3000-fenced.localhost",
                    headers={"X-Forwarded-For": "198.51.100.1"})
    assert r.status == 403 and r.json() == denied("198.51.100.1")
    # the right-most untrusted entry decides: a client cannot prepend an allowed address
    r = await fetch(p, "/echo", host="3000-fenced.localhost",
                    headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.1"})
    assert r.status == 403 and r.json() == denied("198.51.100.1")


async def test_ingress_ignores_forwarded_for_from_untrusted_peers(proxy, backend):
    p = proxy({"fenced": box(backend.port, allowed_clients=["203.0.113.0/24"])})
    r = await fetch(p, "/echo", host="3000-fenced.localhost",
                    headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.status == 403 and r.json() == denied("127.0.0.1")


async def test_ingress_uses_the_proxy_protocol_address(proxy, backend):
    p = proxy({"fenced": box(backend.port, allowed_clients=["198.51.100.0/24"])},
              config={"server": {"proxy_protocol": True}})
    for source, status in (("198.51.100.9", 200), ("203.0.113.5", 403)):
        conn = await RawConn.open(p.port)
        try:
            await conn.send(v2_header(source) + b"GET /echo HTTP/1.1\r\n"
                            b"Host: 3000-fenced.localhost\r\n\r\n")
            r = await conn.response()
            assert r.status == status
            if status == 403:
                assert r.json() == denied(source)
        finally:
            await conn.aclose()


async def test_ingress_rules_are_checked_before_the_token(proxy, backend):
    p = proxy({"fenced": box(backend.port, allowed_clients=["10.0.0.0/8"],
                             traffic_access_token="tok")})
    r = await fetch(p, "/echo", host="3000-fenced.localhost")
    assert r.status == 403 and r.json() == denied("127.0.0.1")


@pytest.mark.parametrize("rules, problem", [
    (["10.0.0.0/33"], "allowed_clients: '10.0.0.0/33' is not a CIDR"),
    ("10.0.0.0/8", "allowed_clients: must be a list"),
    ({"x": ["10.0.0.0/8"]}, "allowed_clients: 'x' is not a port"),
    ({"3000": "10.0.0.0/8"}, "allowed_clients.3000: must be a list"),
])
def test_bad_ingress_rules_name_the_key(rules, problem):
    from proxy.registry.record import record_from_mapping
    with pytest.raises(ValueError) as info:
        record_from_mapping("fenced", {"host": "10.1.1.1", "allowed_clients": rules})
    assert problem in str(info.value)


def test_ingress_rules_round_trip_through_the_record_shape():
    from proxy.registry.record import record_from_mapping
    for rules in (["10.0.0.0/8", "2001:db8::/32"], {"3000": ["10.0.0.0/8"], "*": []}):
        record = record_from_mapping("fenced", {"host": "10.1.1.1", "allowed_clients": rules})
        assert record_from_mapping("fenced", record.to_mapping()) == record


# -- 4. CORS preflight on answers the proxy makes itself -----------------------------------------

PREFLIGHT = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "PUT",
             "Access-Control-Request-Headers": "content-type, x-custom"}


async def test_preflight_the_proxy_must_answer_gets_204(proxy, backend):
    p = proxy({"locked": box(backend.port, traffic_access_token="tok"),
               "sleepy": box(backend.port, state="paused")})
    for host in ("3000-nosuchbox.localhost", "3000-locked.localhost", "3000-sleepy.localhost"):
        r = await fetch(p, "/api", host=host, method="OPTIONS", headers=PREFLIGHT)
        assert r.status == 204, (host, r.status, r.body)
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert r.headers["Access-Control-Allow-Headers"] == "content-type, x-custom"
        assert r.headers["Access-Control-Allow-Methods"]
        assert int(r.headers["Access-Control-Max-Age"]) > 0
        assert "Vary" not in r.headers and r.body == b""
    # a bare OPTIONS is an ordinary request: the usual answer
    r = await fetch(p, "/api", host="3000-nosuchbox.localhost", method="OPTIONS")
    assert r.status == 502 and r.json()["message"] == "The sandbox was not found"


async def test_preflight_to_a_live_sandbox_goes_to_the_sandbox(proxy, backend):
    p = proxy({"live": box(backend.port)})
    r = await fetch(p, "/echo", host="3000-live.localhost", method="OPTIONS", headers=PREFLIGHT)
    assert r.status == 200
    echo = r.json()
    assert echo["method"] == "OPTIONS"
    assert header_value(echo, "Access-Control-Request-Method") == "PUT"


async def test_preflight_on_a_kept_alive_connection_then_a_request(proxy, backend):
    p = proxy({"live": box(backend.port)})
    conn = await RawConn.open(p.port)
    try:
        await conn.send(b"OPTIONS /x HTTP/1.1\r\nHost: 3000-ghost.localhost\r\n"
                        b"Access-Control-Request-Method: GET\r\n\r\n"
                        b"GET /echo HTTP/1.1\r\nHost: 3000-live.localhost\r\n\r\n")
        first = await conn.response(method="OPTIONS")
        second = await conn.response()
        assert first.status == 204 and second.status == 200
    finally:
        await conn.aclose()


# -- 5. Connect-RPC streams that lose their backend ------------------------------------------------

def envelope(payload: bytes, flags: int = 0) -> bytes:
    return bytes([flags]) + struct.pack(">I", len(payload)) + payload


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def connect_backend(body_chunks: list[bytes]):
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/connect+json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for data in body_chunks:
            writer.write(chunk(data))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.transport.abort()  # the sandbox dies mid-stream
    return handler


def envelopes_of(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    while body:
        flags, length = body[0], struct.unpack(">I", body[1:5])[0]
        out.append((flags, body[5:5 + length]))
        body = body[5 + length:]
    return out


async def test_connect_stream_cut_between_envelopes_ends_with_unavailable(proxy):
    frames = [envelope(b'{"n":1}'), envelope(b'{"n":2}')]
    async with raw_backend(connect_backend(frames)) as port:
        p = proxy({"rpc": box(port)})
        conn = await RawConn.open(p.port)
        try:
            await conn.send(b"POST /svc/Stream HTTP/1.1\r\nHost: 3000-rpc.localhost\r\n"
                            b"Content-Type: application/connect+json\r\nContent-Length: 0\r\n\r\n")
            r = await conn.response()
            assert r.status == 200
            got = envelopes_of(r.body)
            assert got[:2] == [(0, b'{"n":1}'), (0, b'{"n":2}')]
            flags, payload = got[2]
            assert flags == 0x02 and json.loads(payload)["error"]["code"] == "unavailable"
            assert len(got) == 3
            # the response ended cleanly: the connection serves the next request
            await conn.send(b"GET /x HTTP/1.1\r\nHost: 3000-ghost.localhost\r\n\r\n")
            assert (await conn.response()).status == 502
        finally:
            await conn.aclose()


async def test_connect_stream_cut_inside_an_envelope_is_aborted(proxy):
    whole = envelope(b'{"n":1}')
    async with raw_backend(connect_backend([whole, envelope(b'{"n":2}')[:6]])) as port:
        p = proxy({"rpc": box(port)})
        conn = await RawConn.open(p.port)
        try:
            await conn.send(b"POST /svc/Stream HTTP/1.1\r\nHost: 3000-rpc.localhost\r\n"
                            b"Content-Length: 0\r\n\r\n")
            with pytest.raises(AssertionError):  # IncompleteResponse: no clean end
                await conn.response()
        finally:
            await conn.aclose()


async def test_a_plain_chunked_stream_is_not_given_an_envelope(proxy):
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"partial"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()
    async with raw_backend(handler) as port:
        p = proxy({"rpc": box(port)})
        conn = await RawConn.open(p.port)
        try:
            await conn.send(b"GET / HTTP/1.1\r\nHost: 3000-rpc.localhost\r\n\r\n")
            with pytest.raises(AssertionError):
                await conn.response()
        finally:
            await conn.aclose()
