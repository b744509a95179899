"""Operations (issue 6) on the real process: metrics after real traffic, access log, health,
drain on SIGTERM, reload on SIGHUP, TLS with certificate reload, PROXY protocol, workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import struct
import time

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from support.process import _children, wait_until
from support.raw_http import RawConn, fetch, header_value


async def scrape(p) -> dict:
    """{(name, frozenset(labels)): value} from the real /metrics text."""
    async with aiohttp.ClientSession() as session:
        async with session.get(p.metrics_url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


async def status(url: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            return resp.status


# -- metrics ----------------------------------------------------------------------------------

async def test_metrics_count_real_traffic(proxy):
    p = proxy()
    for _ in range(5):
        assert (await fetch(p, "/echo")).status == 200
    for _ in range(3):
        assert (await fetch(p, "/echo", host=p.host("nope"))).status == 502
    r = await fetch(p, "/echo", method="POST", data=b"x" * 1000)
    assert r.status == 200
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(p.url("/ws"), headers={"Host": p.host()})
        await ws.send_str("hello")
        assert (await ws.receive()).data == "hello"
        await ws.close()
        async with session.get(p.url("/sse?n=2&interval=0.05"),
                               headers={"Host": p.host()}) as resp:
            await resp.read()
    await asyncio.sleep(0.2)
    s = await scrape(p)
    requests = "sandbox_proxy_requests_total"
    assert value(s, requests, code_class="2xx", method="GET", protocol="http",
                 origin="backend", http="h1") == 5
    assert value(s, requests, code_class="5xx", method="GET", protocol="http",
                 origin="proxy", http="h1") == 3
    assert value(s, requests, code_class="2xx", method="POST", protocol="http",
                 origin="backend", http="h1") == 1
    assert value(s, requests, code_class="1xx", method="GET", protocol="websocket",
                 origin="backend", http="h1") == 1
    assert value(s, requests, code_class="2xx", method="GET", protocol="sse",
                 origin="backend", http="h1") == 1
    assert value(s, "sandbox_proxy_request_duration_seconds_count") == 11
    assert value(s, "sandbox_proxy_stream_duration_seconds_count", protocol="websocket") == 1
    assert value(s, "sandbox_proxy_stream_duration_seconds_count", protocol="sse") == 1
    assert value(s, "sandbox_proxy_request_bytes_total") >= 1000
    assert value(s, "sandbox_proxy_registry_lookups_total", kind="static", outcome="found") == 8
    assert value(s, "sandbox_proxy_registry_lookups_total", kind="static",
                 outcome="not_found") == 3
    assert value(s, "sandbox_proxy_upstream_connect_duration_seconds_count") >= 1
    assert value(s, "sandbox_proxy_registry_ready") == 1
    assert value(s, "sandbox_proxy_draining") == 0
    assert value(s, "sandbox_proxy_open_streams") == 0
    # never a label with the sandbox id, the host or the path
    for (_, labels), _ in s.items():
        for _, v in labels:
            assert "demo" not in v and "localhost" not in v and "/" not in v


async def test_connect_failures_by_reason(proxy):
    p = proxy(config={"upstream": {"connect_attempts": 2, "connect_backoff": 0.01}})
    assert (await fetch(p, "/", host=p.host("refused"))).status == 502
    s = await scrape(p)
    assert value(s, "sandbox_proxy_upstream_connect_failures_total", reason="refused") == 2


async def test_metrics_are_summed_across_workers(proxy):
    p = proxy(config={"server": {"workers": 2}})
    total = 40
    await asyncio.sleep(1.2)  # the readiness probe's own connection reaches the snapshots
    opened_before = value(await scrape(p), "sandbox_proxy_connections_opened_total")
    for _ in range(total):  # a new connection each time: SO_REUSEPORT spreads them
        assert (await fetch(p, "/echo")).status == 200

    async def counted() -> bool:
        s = await scrape(p)
        return value(s, "sandbox_proxy_requests_total", code_class="2xx", method="GET",
                     protocol="http", origin="backend", http="h1") == total
    await wait_until(counted, timeout=5)
    s = await scrape(p)
    assert value(s, "sandbox_proxy_workers") == 2
    assert value(s, "sandbox_proxy_connections_opened_total") - opened_before == total
    assert await status(p.metrics_url + "/readyz") == 200


async def test_dead_worker_is_replaced(proxy):
    p = proxy(config={"server": {"workers": 2}})
    await asyncio.sleep(1.2)
    workers = _children(p.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)

    async def replaced() -> bool:
        kids = _children(p.pid)
        return len(kids) == 2 and workers[0] not in kids
    await wait_until(replaced, timeout=10)
    for _ in range(10):
        assert (await fetch(p, "/echo")).status == 200
    await asyncio.sleep(1.2)
    s = await scrape(p)
    assert value(s, "sandbox_proxy_workers") == 2
    assert value(s, "sandbox_proxy_registry_ready") == 2
    assert value(s, "sandbox_proxy_registry_sandboxes") == 3  # the registry's size, not a sum
    assert await status(p.metrics_url + "/readyz") == 200
    assert "starting a new one" in p.stderr()
    assert p.stop() == 0


# -- access log -------------------------------------------------------------------------------

async def test_access_log_json_lines(proxy):
    p = proxy(config={"access": {"forward_token": False}})
    await fetch(p, "/echo/a?secret=123&token=abc", headers={"e2b-traffic-access-token": "tkn"})
    await fetch(p, "/x", host=p.host("nope"))
    await asyncio.sleep(0.3)
    lines = [json.loads(line) for line in p.stdout().splitlines() if line.startswith("{")]
    assert len(lines) == 2, p.stdout()
    ok, missing = lines
    assert ok["method"] == "GET" and ok["status"] == 200 and ok["path"] == "/echo/a"
    assert ok["sandbox_id"] == "demo" and ok["port"] == 3000 and ok["outcome"] == "ok"
    assert ok["client_ip"] == "127.0.0.1" and ok["host"] == p.host()
    assert ok["bytes_out"] > 0 and ok["duration"] > 0 and ok["protocol"] == "http"
    assert missing["status"] == 502 and missing["outcome"] == "SandboxNotFound"
    text = p.stdout()
    assert "secret" not in text and "tkn" not in text
    # the query's value in no logged text (numbers such as a duration may hold those digits)
    assert not [v for line in lines for v in line.values() if isinstance(v, str) and "123" in v]


async def test_access_log_text_and_off(proxy):
    p = proxy(config={"log": {"access": "text"}})
    await fetch(p, "/echo/t?q=1")
    await asyncio.sleep(0.3)
    line = p.stdout().strip()
    assert '"GET /echo/t" 200' in line and "q=1" not in line and "sandbox=demo" in line
    p = proxy(config={"log": {"access": "off"}})
    await fetch(p, "/echo")
    await asyncio.sleep(0.3)
    assert p.stdout().strip() == ""


# -- drain and reload -------------------------------------------------------------------------

async def test_sigterm_drains(proxy):
    p = proxy(config={"server": {"drain_delay": 1.0, "drain_timeout": 2.0}})
    assert await status(p.metrics_url + "/readyz") == 200
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(p.url("/ws"), headers={"Host": p.host()})
        slow = asyncio.create_task(fetch(p, "/slow-head?delay=1.5"))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        assert await status(p.metrics_url + "/readyz") == 503
        r = await fetch(p, "/echo")  # still served during drain_delay, told to reconnect
        assert r.status == 200 and r.headers.get("Connection") == "close"
        await ws.send_str("still open")
        assert (await ws.receive(timeout=2)).data == "still open"
        assert (await slow).status == 200  # in flight: finishes
        await asyncio.sleep(max(0.0, 1.3 - (time.monotonic() - started)))
        with pytest.raises((aiohttp.ClientConnectionError, OSError)):
            await fetch(p, "/echo", timeout=2)  # no longer accepting
        msg = await ws.receive(timeout=4)  # closed after drain_timeout
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE,
                            aiohttp.WSMsgType.ERROR)
    code = await asyncio.get_running_loop().run_in_executor(None, p.proc.wait, 5)
    assert code == 0
    assert time.monotonic() - started < 1.0 + 2.0 + 2.0


async def test_sighup_reloads_config(proxy):
    p = proxy()
    assert (await fetch(p, "/echo", host="3000-demo.other.test")).status == 400
    text = p.config_path.read_text().replace('"sbx.example.test"]', '"sbx.example.test", "other.test"]')
    p.config_path.write_text(text)
    p.proc.send_signal(signal.SIGHUP)

    async def served() -> bool:
        return (await fetch(p, "/echo", host="3000-demo.other.test")).status == 200
    await wait_until(served, timeout=5)
    p.config_path.write_text(text + "\n[timeouts]\nconnect = -1\n")
    p.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert p.alive()
    assert (await fetch(p, "/echo", host="3000-demo.other.test")).status == 200
    s = await scrape(p)
    assert value(s, "sandbox_proxy_reloads_total", what="config", result="ok") == 1
    assert value(s, "sandbox_proxy_reloads_total", what="config", result="error") == 1
    assert "[timeouts] connect" in p.stderr()


# -- TLS --------------------------------------------------------------------------------------

def write_cert(ca: trustme.CA, directory, name="edge"):
    cert = ca.issue_cert("*.sbx.example.test")
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def https_echo(p, ca, host="3000-demo.sbx.example.test"):
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port, ssl=client_context(ca),
                                                   server_hostname=host)
    cert = writer.get_extra_info("peercert")
    conn = RawConn(reader, writer)
    try:
        r = await conn.request("GET", "/echo", host)
        return r, cert
    finally:
        await conn.aclose()


async def test_tls_termination_and_certificate_reload(proxy, tmp_path):
    ca = trustme.CA()
    cert_path, key_path = write_cert(ca, tmp_path)
    p = proxy(config={"server": {"tls": {"cert": str(cert_path), "key": str(key_path),
                                         "reload_interval": 0.2}}})
    r, cert = await https_echo(p, ca)
    assert r.status == 200
    assert header_value(r.json(), "X-Forwarded-Proto") == "https"
    first_serial = cert["serialNumber"]
    # plain HTTP on the TLS port is refused
    conn = await RawConn.open(p.port)
    await conn.send(b"GET / HTTP/1.1\r\nHost: 3000-demo.localhost\r\n\r\n")
    assert await conn.closed(5)
    await conn.aclose()
    # replace the pair: new handshakes get the new certificate, without a restart
    new_cert, new_key = write_cert(ca, tmp_path, "next")
    cert_path.write_bytes(new_cert.read_bytes())
    key_path.write_bytes(new_key.read_bytes())

    async def reloaded() -> bool:
        _, cert = await https_echo(p, ca)
        return cert["serialNumber"] != first_serial
    await wait_until(reloaded, timeout=5)
    # a broken pair is ignored: the last good one keeps serving
    key_path.write_text("not a key")
    await asyncio.sleep(0.6)
    r, _ = await https_echo(p, ca)
    assert r.status == 200
    assert "certificate reload failed" in p.stderr()


# -- PROXY protocol ---------------------------------------------------------------------------

def v2_header(source: str, dest: str = "10.0.0.2", sport: int = 4242, dport: int = 443) -> bytes:
    body = socket.inet_aton(source) + socket.inet_aton(dest) + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize("header, client", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.2 51000 443\r\n", "203.0.113.7"),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n", "2001:db8::7"),
    (v2_header("198.51.100.9"), "198.51.100.9"),
    (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
])
async def test_proxy_protocol_client_address(proxy, header, client):
    p = proxy(config={"server": {"proxy_protocol": True}})
    conn = await RawConn.open(p.port)
    try:
        request = b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\n\r\n"
        await conn.send(header + request)  # header and request in one segment
        r = await conn.response()
        assert r.status == 200
        assert header_value(r.json(), "X-Forwarded-For") == client
    finally:
        await conn.aclose()
    await asyncio.sleep(0.3)
    assert json.loads(p.stdout().splitlines()[-1])["client_ip"] == client


async def test_proxy_protocol_required_when_enabled(proxy):
    p = proxy(config={"server": {"proxy_protocol": True}})
    conn = await RawConn.open(p.port)
    await conn.send(b"GET /echo HTTP/1.1\r\nHost: 3000-demo.localhost\r\n\r\n")
    assert await conn.closed(5) and conn.last_bytes == b""
    await conn.aclose()
    conn = await RawConn.open(p.port)
    await conn.send(b"PROXY TCP4 1.2.3.4\r\n")
    assert await conn.closed(5) and conn.last_bytes == b""
    await conn.aclose()


async def test_proxy_protocol_with_tls_passthrough(proxy, tmp_path):
    ca = trustme.CA()
    cert_path, key_path = write_cert(ca, tmp_path)
    p = proxy(config={"server": {"proxy_protocol": True,
                                 "tls": {"cert": str(cert_path), "key": str(key_path)}}})
    sock = socket.create_connection(("127.0.0.1", p.port))
    sock.sendall(v2_header("192.0.2.50"))
    host = "3000-demo.sbx.example.test"  # OpenSSL refuses a wildcard directly under .localhost
    reader, writer = await asyncio.open_connection(sock=sock, ssl=client_context(ca),
                                                   server_hostname=host)
    conn = RawConn(reader, writer)
    try:
        r = await conn.request("GET", "/echo", host)
        assert r.status == 200
        echo = r.json()
        assert header_value(echo, "X-Forwarded-For") == "192.0.2.50"
        assert header_value(echo, "X-Forwarded-Proto") == "https"
    finally:
        await conn.aclose()
