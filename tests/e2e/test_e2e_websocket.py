"""Upgrade / WebSocket tunnelling, end to end, with `websockets` and aiohttp's client."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from support.process import wait_until
from support.raw_http import RawConn, build_request, not_found_body, raw_backend

pytestmark = pytest.mark.timeout(60)


def ws_connect(p, path: str = "/ws", sid: str = "demo", sandbox_port: int = 3000, **kw):
    kw.setdefault("open_timeout", 10)
    kw.setdefault("close_timeout", 5)
    kw.setdefault("ping_interval", None)
    return connect(
        f"ws://{sandbox_port}-{sid}.localhost:{p.port}{path}",
        host="127.0.0.1",
        port=p.port,
        proxy=None,
        **kw,
    )


async def recv(ws, timeout: float = 5.0):
    return await asyncio.wait_for(ws.recv(), timeout)


async def info(ws) -> dict:
    await ws.send("cmd:info")
    return json.loads(await recv(ws))


async def test_text_and_binary_echo(shared_proxy):
    async with ws_connect(shared_proxy, max_size=None) as ws:
        await ws.send("hello ✓ — ünïcode")
        assert await recv(ws) == "hello ✓ — ünïcode"
        payload = bytes(range(256)) * 64
        await ws.send(payload)
        assert await recv(ws) == payload
        big = bytes(range(251)) * (4 * 1024 * 1024 // 251)
        await ws.send(big)
        assert await recv(ws, 20) == big
        for i in range(100):
            await ws.send(f"m{i}")
        assert [await recv(ws) for _ in range(100)] == [f"m{i}" for i in range(100)]


async def test_subprotocol_negotiated_end_to_end(shared_proxy):
    async with ws_connect(shared_proxy, subprotocols=["x.unknown", "chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v1"
        i = await info(ws)
    assert i["protocol"] == "chat.v1"
    assert [t.strip() for t in i["request_protocols"].split(",")] == ["x.unknown", "chat.v1"]


async def test_permessage_deflate_negotiated(shared_proxy):
    async with ws_connect(shared_proxy, compression="deflate") as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert "permessage-deflate" in ext, ws.response.headers
        i = await info(ws)
        assert "permessage-deflate" in (i["request_extensions"] or "")
        assert i["compress"], i
        text = "compress me please " * 10000
        await ws.send(text)
        assert await recv(ws) == text


async def test_no_compression_when_not_offered(shared_proxy):
    async with ws_connect(shared_proxy, compression=None) as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        i = await info(ws)
        assert i["request_extensions"] is None
        assert not i["compress"]


async def test_ping_pong_both_directions(shared_proxy):
    async with ws_connect(shared_proxy) as ws:
        pong = await ws.ping(b"client-ping")
        await asyncio.wait_for(pong, 5)  # answered by the backend, by hand
        assert await recv(ws) == "got-ping:client-ping"
        await ws.send("cmd:ping:server-ping")  # backend pings; websockets answers
        assert await recv(ws) == "pong:server-ping"


async def test_client_close_code_and_reason_reach_backend(shared_proxy, backend):
    async with ws_connect(shared_proxy) as ws:
        await ws.send("before close")
        assert await recv(ws) == "before close"
        await ws.close(4001, "client bye")
        assert ws.close_code == 4001, (ws.close_code, ws.close_reason)

    async def recorded():
        return ("client", 4001, "client bye") in backend.state["ws_closes"]

    await wait_until(recorded, 5)


async def test_server_close_code_and_reason_reach_client(shared_proxy):
    async with ws_connect(shared_proxy) as ws:
        await ws.send("cmd:close:4001:server bye")
        with pytest.raises(ConnectionClosed) as exc:
            await recv(ws)
    assert exc.value.rcvd is not None, "no close frame reached the client (1006)"
    assert exc.value.rcvd.code == 4001
    assert exc.value.rcvd.reason == "server bye"


async def test_backend_abort_closes_client(shared_proxy):
    async with ws_connect(shared_proxy) as ws:
        await ws.send("cmd:abort")
        with pytest.raises(ConnectionClosed):
            await recv(ws, 10)


async def test_client_abort_closes_backend_side(shared_proxy, backend):
    base = backend.state["ws_open"]
    conn = await RawConn.open(shared_proxy.port)
    await conn.send(build_request("GET", "/ws", "3000-demo.localhost", [
        ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]))
    head = await conn.read_head()
    assert head.status == 101
    assert head.header("Sec-WebSocket-Accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

    async def opened():
        return backend.state["ws_open"] > base

    await wait_until(opened, 5)
    conn.writer.transport.abort()

    async def gone():
        return backend.state["ws_open"] <= base

    await wait_until(gone, 10)


async def test_many_concurrent_websockets_and_no_leak(shared_proxy, backend):
    base = backend.state["ws_open"]
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(ws_connect(shared_proxy)) for _ in range(40)]
        await asyncio.gather(*(ws.send(f"from {i}") for i, ws in enumerate(sockets)))
        answers = await asyncio.gather(*(recv(ws) for ws in sockets))
        assert answers == [f"from {i}" for i in range(40)]

    async def all_closed():
        return backend.state["ws_open"] <= base

    await wait_until(all_closed, 10)


async def test_masked_sandbox_websocket_host(shared_proxy):
    async with ws_connect(shared_proxy, sid="masked") as ws:
        i = await info(ws)
    assert i["host"] == "localhost:3000"


async def test_non_101_answer_relayed_to_websockets_client(shared_proxy):
    with pytest.raises(InvalidStatus) as exc:
        async with ws_connect(shared_proxy, path="/ws-reject"):
            pass
    response = exc.value.response
    assert response.status_code == 403
    assert response.headers["X-Rejected"] == "yes"
    assert json.loads(response.body) == {"denied": True}


async def test_non_101_answer_relayed_raw(shared_proxy):
    conn = await RawConn.open(shared_proxy.port)
    try:
        resp = await conn.request("GET", "/ws-reject", "3000-demo.localhost", headers=[
            ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ])
    finally:
        await conn.aclose()
    assert resp.status == 403
    assert resp.json() == {"denied": True}
    assert resp.header("X-Rejected") == "yes"


async def test_upgrade_to_unknown_sandbox_is_502_json(shared_proxy):
    with pytest.raises(InvalidStatus) as exc:
        async with ws_connect(shared_proxy, sid="ghostws",
                              additional_headers={"Sec-Fetch-Mode": "websocket"}):
            pass
    response = exc.value.response
    assert response.status_code == 502
    assert json.loads(response.body) == not_found_body("ghostws")
    assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_aiohttp_client_websocket(shared_proxy, backend):
    p = shared_proxy
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.ws_connect(p.url("/ws"), headers={"Host": p.host()},
                                protocols=("chat.v2",), compress=15, autoping=False) as ws:
            assert ws.protocol == "chat.v2"
            assert ws.compress == 15
            await ws.send_str("aio text")
            assert (await ws.receive(timeout=5)).data == "aio text"
            await ws.send_bytes(b"\x00\xff" * 1000)
            assert (await ws.receive(timeout=5)).data == b"\x00\xff" * 1000
            await ws.ping(b"aio-ping")
            pong = await ws.receive(timeout=5)
            assert pong.type == aiohttp.WSMsgType.PONG and pong.data == b"aio-ping"
            assert (await ws.receive(timeout=5)).data == "got-ping:aio-ping"
            await ws.send_str("cmd:info")
            i = json.loads((await ws.receive(timeout=5)).data)
            assert i["protocol"] == "chat.v2"
            assert "permessage-deflate" in i["request_extensions"]
            await ws.close(code=4001, message=b"aio bye")
            assert ws.close_code == 4001

        async def recorded():
            return ("client", 4001, "aio bye") in backend.state["ws_closes"]

        await wait_until(recorded, 5)

        async with s.ws_connect(p.url("/ws"), headers={"Host": p.host()}) as ws:
            await ws.send_str("cmd:close:4002:aio server bye")
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert msg.data == 4002
            assert msg.extra == "aio server bye"


async def test_generic_upgrade_tunnels_raw_bytes(shared_proxy):
    seen_heads: list[bytes] = []
    backend_done = asyncio.Event()

    async def handler(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            seen_heads.append(head)
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\n"
                         b"Connection: Upgrade\r\nUpgrade: rawecho/1\r\n\r\nBANNER\n")
            await writer.drain()
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data.upper())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            backend_done.set()
            writer.close()

    async with raw_backend(handler) as port:
        conn = await RawConn.open(shared_proxy.port)
        try:
            await conn.send(build_request("GET", "/tunnel?x=1", f"{port}-demo.localhost", [
                ("Connection", "keep-alive, Upgrade"), ("Upgrade", "rawecho/1"),
            ]))
            head = await conn.read_head()
            assert head.status == 101
            assert head.header("Upgrade") == "rawecho/1"
            assert "upgrade" in head.connection_tokens()
            assert await asyncio.wait_for(conn.reader.readexactly(7), 5) == b"BANNER\n"
            await conn.send(b"hello tunnel\n")
            assert await asyncio.wait_for(conn.reader.readexactly(13), 5) == b"HELLO TUNNEL\n"
            blob = bytes(range(97, 123)) * 40000  # ~1 MiB of lowercase letters
            await conn.send(blob)
            got = await asyncio.wait_for(conn.reader.readexactly(len(blob)), 10)
            assert got == blob.upper()
        finally:
            await conn.aclose()
        # the client went away: the proxy closes the backend side of the tunnel
        await asyncio.wait_for(backend_done.wait(), 5)

    head = seen_heads[0].decode("latin-1").lower()
    assert head.startswith("get /tunnel?x=1 http/1.1\r\n")
    assert "\r\nupgrade: rawecho/1\r\n" in head
    conn_lines = [l for l in head.split("\r\n") if l.startswith("connection:")]
    assert conn_lines and any("upgrade" in l for l in conn_lines), head
