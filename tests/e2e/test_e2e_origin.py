"""Origin follows the Host mask, through the real CLI to the echo backend (tests/backends.py):
what the backend receives for same-origin, cross-origin and malformed Origin/Referer headers, on
plain requests and WebSocket upgrades, behind TLS and a trusted X-Forwarded-Proto, and with the
per-record and global switches. Browsers against real apps: tests/test_browser_apps.py."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
import trustme
from websockets.asyncio.client import connect

from support.process import wait_until
from support.raw_http import RawConn, header_value, header_values
from test_operations import client_context, write_cert

pytestmark = pytest.mark.timeout(60)

DOMAIN = "sbx.example.test"
MASK = "localhost:3000"


def records(backend_port: int) -> dict:
    masked = {"host": "127.0.0.1", "ports": {3000: backend_port, 3001: backend_port},
              "mask_request_host": "localhost:${PORT}"}
    return {
        "masked": masked,
        "kept": {**masked, "mask_origin": False},
        "forced": {**masked, "mask_origin": True},
        "plain": {"host": "127.0.0.1", "ports": {3000: backend_port}},
    }


def public(p, sandbox: str = "masked", port: int = 3000) -> str:
    """The Host a browser sends for the sandbox's URL on this proxy (the port included)."""
    return f"{port}-{sandbox}.{DOMAIN}:{p.port}"


async def echo(p, host: str, headers: list[tuple[str, str]]) -> dict:
    conn = await RawConn.open(p.port)
    try:
        r = await conn.request("GET", "/echo", host, headers=headers)
    finally:
        await conn.aclose()
    assert r.status == 200, r.body
    return r.json()


@pytest.fixture
def start(proxy, backend):
    def start_proxy(config: dict | None = None):
        return proxy(sandboxes=records(backend.port), config=config)
    return start_proxy


async def test_same_origin_origin_and_referer_follow_the_mask(start):
    p = start()
    host = public(p)
    seen = await echo(p, host, [("Origin", f"http://{host}"),
                                ("Referer", f"http://{host}/app/page?x=1&y=%2F")])
    assert header_value(seen, "Host") == MASK
    assert header_value(seen, "Origin") == f"http://{MASK}"
    assert header_value(seen, "Referer") == f"http://{MASK}/app/page?x=1&y=%2F"
    assert header_value(seen, "X-Forwarded-Host") == host  # the public name stays available
    # case of scheme and host does not matter; the header name's spelling is kept
    seen = await echo(p, host, [("origin", f"HTTP://{host.upper()}")])
    assert seen["headers"].count(["origin", f"http://{MASK}"]) == 1


@pytest.mark.parametrize("origin", [
    "http://3000-plain.sbx.example.test:{port}",   # another sandbox
    "http://3001-masked.sbx.example.test:{port}",  # another port of the same sandbox
    "http://3000-masked.sbx.example.test",         # the same name on another port
    "https://3000-masked.sbx.example.test:{port}",  # another scheme
    "http://evil.example",
    "null",
    "http://3000-masked.sbx.example.test:{port}/",  # not an origin
    "http://localhost:3000",                        # already the mask's: as it came
])
async def test_other_origins_reach_the_backend_unchanged(start, origin):
    p = start()
    origin = origin.format(port=p.port)
    headers = [("Origin", origin)]
    if not origin.endswith("/"):  # (a Referer with that prefix is same-origin)
        headers.append(("Referer", origin + "/from"))
    seen = await echo(p, public(p), headers)
    assert header_value(seen, "Host") == MASK
    assert header_value(seen, "Origin") == origin
    if len(headers) > 1:
        assert header_value(seen, "Referer") == origin + "/from"


async def test_two_origin_headers_are_left_alone(start):
    p = start()
    same = f"http://{public(p)}"
    seen = await echo(p, public(p), [("Origin", same), ("Origin", same)])
    assert header_values(seen, "Origin") == [same, same]


async def test_without_a_mask_nothing_changes(start):
    p = start()
    host = public(p, "plain")
    seen = await echo(p, host, [("Origin", f"http://{host}"), ("Referer", f"http://{host}/x")])
    assert header_value(seen, "Host") == host
    assert header_value(seen, "Origin") == f"http://{host}"
    assert header_value(seen, "Referer") == f"http://{host}/x"


async def test_record_and_global_switches(start):
    on = start()
    off = start({"upstream": {"mask_origin": False}})
    for p, sandbox, follows in [(on, "masked", True), (on, "kept", False), (on, "forced", True),
                                (off, "masked", False), (off, "kept", False),
                                (off, "forced", True)]:
        host = public(p, sandbox)
        seen = await echo(p, host, [("Origin", f"http://{host}")])
        assert header_value(seen, "Host") == MASK  # the Host mask itself is never switched off
        expected = f"http://{MASK}" if follows else f"http://{host}"
        assert header_value(seen, "Origin") == expected, (sandbox, p.config_path.read_text())


async def test_global_switch_follows_sighup(start):
    p = start()
    host = public(p)

    async def origin_seen() -> str | None:
        return header_value(await echo(p, host, [("Origin", f"http://{host}")]), "Origin")
    assert await origin_seen() == f"http://{MASK}"
    text = p.config_path.read_text().replace("[upstream]\n", "[upstream]\nmask_origin = false\n")
    p.config_path.write_text(text)
    p.proc.send_signal(signal.SIGHUP)

    async def switched_off() -> bool:
        return await origin_seen() == f"http://{host}"
    await wait_until(switched_off, timeout=5)


async def test_websocket_upgrade_follows_the_same_rule(start):
    p = start()
    host = public(p)
    for origin, expected in [(f"http://{host}", f"http://{MASK}"),
                             (f"http://{public(p, 'plain')}", f"http://{public(p, 'plain')}")]:
        async with connect(f"ws://{host}/ws", host="127.0.0.1", port=p.port, proxy=None,
                           origin=origin, open_timeout=10, close_timeout=3) as ws:
            await ws.send("cmd:info")
            info = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert info["host"] == MASK
        assert info["origin"] == expected


async def test_scheme_from_a_trusted_forwarded_proto_only(start):
    trusted = start({"server": {"trusted_proxies": ["127.0.0.1/32"]}})
    untrusted = start()
    for p, xfp, origin_scheme, follows in [
        (trusted, "https", "https", True),
        (trusted, "https", "http", False),   # the page was https: an http Origin is another site
        (trusted, "http", "http", True),
        (untrusted, "https", "https", False),  # forged: the client spoke http to the proxy
        (untrusted, "https", "http", True),
    ]:
        host = public(p)
        origin = f"{origin_scheme}://{host}"
        seen = await echo(p, host, [("X-Forwarded-Proto", xfp), ("Origin", origin)])
        expected = f"{origin_scheme}://{MASK}" if follows else origin
        assert header_value(seen, "Origin") == expected, (xfp, origin_scheme, p is trusted)


async def test_https_behind_the_proxys_own_tls(proxy, backend, tmp_path):
    ca = trustme.CA()
    cert_path, key_path = write_cert(ca, tmp_path)
    p = proxy(sandboxes=records(backend.port),
              config={"server": {"tls": {"cert": str(cert_path), "key": str(key_path)}}})
    host = public(p)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port, ssl=client_context(ca),
                                                   server_hostname=host.split(":")[0])
    conn = RawConn(reader, writer)
    try:
        for origin, expected in [(f"https://{host}", f"https://{MASK}"),
                                 (f"http://{host}", f"http://{host}")]:
            r = await conn.request("GET", "/echo", host, headers=[
                ("Origin", origin), ("Referer", f"{origin}/p")])
            assert r.status == 200
            assert header_value(r.json(), "Origin") == expected
            assert header_value(r.json(), "Referer") == f"{expected}/p"
    finally:
        await conn.aclose()


async def test_token_cookie_removed_before_origin_is_rewritten(proxy, backend):
    # the browser-token cookie is removed from the head first (a line fewer): the Origin line the
    # scanner noted has moved, and is still the one rewritten
    token = "tok-" + "x" * 20
    sandboxes = records(backend.port)
    sandboxes["masked"]["traffic_access_token"] = token
    p = proxy(sandboxes=sandboxes, config={"access": {"browser_cookie": True}})
    host = public(p)
    headers = [("Cookie", f"sandbox-access-token={token}"), ("Accept", "*/*"),
               ("Origin", f"http://{host}"), ("X-After", "1")]
    seen = await echo(p, host, headers)
    assert header_values(seen, "Cookie") == []
    assert header_value(seen, "Origin") == f"http://{MASK}"
    assert header_value(seen, "X-After") == "1"
    # the proxy's own answers are untouched: a wrong token is refused as before
    conn = await RawConn.open(p.port)
    try:
        r = await conn.request("GET", "/echo", host, headers=[
            ("Cookie", "sandbox-access-token=wrong"), ("Origin", f"http://{host}")])
    finally:
        await conn.aclose()
    assert r.status == 403, r.body
    assert r.header("Access-Control-Allow-Origin") == "*"
