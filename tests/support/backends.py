"""Backends that the end-to-end tests put behind the proxy.

``make_app()`` builds an aiohttp application with the routes the tests use.  The
fixtures run it either in-process, on an event loop of its own in a background
thread (``ThreadedBackend``), or as a separate process
(``python tests/support/backends.py --port N``) when a test needs to kill the backend.

Routes (every method is accepted unless noted):

``/echo`` and any path not listed here
    JSON description of the request as the backend received it: method, raw
    request target, HTTP version, headers as a list of pairs (order and
    duplicates kept), sha256 and length of the body, the peer address of the
    connection and the backend's name.
``/upload[?stall_after=N&stall=S]``
    The same JSON as ``/echo`` (the body is streamed and hashed, never held);
    optionally stops reading for ``S`` seconds once ``N`` body bytes arrived.
``/sse?n=5&interval=0.3``
    ``n`` Server-Sent Events, the first at once and one every ``interval`` s.
``/bytes?n=N[&seed=S][&chunk=C][&delay=D]``
    ``N`` deterministic pseudo-random bytes with Content-Length.
``/chunked?n=N[&seed=S][&chunk=C][&delay=D]``
    The same bytes with chunked transfer coding.
``/gzip``
    ``GZIP_BODY`` (pre-compressed) with ``Content-Encoding: gzip``.
``/status/{code}``
    That status; no body for 1xx/204/304, a short text body otherwise.
``/slow-head?delay=S``
    Starts the response only after ``S`` seconds.
``/set-cookies``
    Two separate ``Set-Cookie`` header lines.
``/ws``
    WebSocket echo; see ``ws_handler``.
``/ws-reject``
    Answers an upgrade request with a plain ``403`` JSON response.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import hashlib
import json
import random
import threading
import time
from typing import Iterator

from aiohttp import WSMsgType, web

# --------------------------------------------------------------------------
# Deterministic data
# --------------------------------------------------------------------------

PAGE = 256 * 1024
_SHIFT_SPAN = 65536
_BLOCK = random.Random(0x5A9D).randbytes(PAGE + _SHIFT_SPAN)


def det_chunks(n: int, seed: int = 0, chunk: int = PAGE) -> Iterator[memoryview]:
    """Yield ``n`` pseudo-random but deterministic bytes, at most ``chunk`` at a time.

    The data is a sequence of 256 KiB pages, each a different window of one
    random block, so a proxy that drops, repeats or reorders pieces changes
    the digest.  The bytes depend only on ``n`` and ``seed``, not on
    ``chunk``.  Nothing of size ``n`` is ever held in memory.
    """
    view = memoryview(_BLOCK)
    chunk = max(1, min(chunk, PAGE))
    page_no = 0
    remaining = n
    while remaining > 0:
        size = min(PAGE, remaining)
        off = ((page_no + 1) * 7919 + seed * 104729) % _SHIFT_SPAN
        page = view[off : off + size]
        for start in range(0, size, chunk):
            yield page[start : start + chunk]
        remaining -= size
        page_no += 1


@functools.lru_cache(maxsize=32)
def det_digest(n: int, seed: int = 0) -> str:
    """sha256 hex digest of the ``n`` bytes of ``det_chunks(n, seed)``."""
    h = hashlib.sha256()
    for piece in det_chunks(n, seed):
        h.update(piece)
    return h.hexdigest()


def det_bytes(n: int, seed: int = 0) -> bytes:
    """Small amounts of the same data as one bytes object."""
    return b"".join(bytes(c) for c in det_chunks(n, seed))


GZIP_PLAIN = ("sandbox-proxy must not touch encoded bodies. " * 200).encode()
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)

WS_PROTOCOLS = ("chat.v1", "chat.v2")

NAME_KEY = web.AppKey("name", str)
STATE_KEY = web.AppKey("state", dict)

# --------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------


def _peer(request: web.BaseRequest) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return "?"
    return f"{peer[0]}:{peer[1]}"


async def echo(request: web.Request) -> web.Response:
    # ?stall_after=N&stall=S: stop reading the body for S seconds after N bytes, so a
    # proxy that does not apply back-pressure has to buffer what the client sends meanwhile
    stall_after = int(request.query.get("stall_after", -1))
    stall = float(request.query.get("stall", 0))
    h = hashlib.sha256()
    length = 0
    while True:
        data = await request.content.read(1 << 20)
        if not data:
            break
        h.update(data)
        length += len(data)
        if stall_after >= 0 and length >= stall_after:
            stall_after = -1
            await asyncio.sleep(stall)
    state = request.app[STATE_KEY]
    state["requests"] += 1
    payload = {
        "backend": request.app[NAME_KEY],
        "method": request.method,
        "raw_path": request.raw_path,
        "version": f"{request.version.major}.{request.version.minor}",
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_sha256": h.hexdigest(),
        "body_length": length,
        "peer": _peer(request),
    }
    return web.json_response(payload, headers={"X-Backend": request.app[NAME_KEY]})


def _int_arg(request: web.Request, name: str, default: int) -> int:
    return int(request.query.get(name, default))


def _float_arg(request: web.Request, name: str, default: float) -> float:
    return float(request.query.get(name, default))


async def sse(request: web.Request) -> web.StreamResponse:
    n = _int_arg(request, "n", 5)
    interval = _float_arg(request, "interval", 0.3)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    start = time.monotonic()
    for i in range(n):
        target = start + i * interval
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await resp.write(f"id: {i}\nevent: tick\ndata: event {i}\n\n".encode())
    await resp.write_eof()
    return resp


async def _stream_bytes(request: web.Request, chunked: bool) -> web.StreamResponse:
    n = _int_arg(request, "n", 1024)
    seed = _int_arg(request, "seed", 0)
    chunk = _int_arg(request, "chunk", PAGE)
    delay = _float_arg(request, "delay", 0.0)
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if chunked:
        resp.enable_chunked_encoding()
    else:
        resp.content_length = n
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    for piece in det_chunks(n, seed, chunk):
        await resp.write(piece)
        if delay:
            await asyncio.sleep(delay)
    await resp.write_eof()
    return resp


async def bytes_route(request: web.Request) -> web.StreamResponse:
    return await _stream_bytes(request, chunked=False)


async def chunked_route(request: web.Request) -> web.StreamResponse:
    return await _stream_bytes(request, chunked=True)


async def gzip_route(request: web.Request) -> web.Response:
    return web.Response(
        body=GZIP_BODY,
        headers={"Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8",
                 "Vary": "Accept-Encoding"},
    )


async def status_route(request: web.Request) -> web.StreamResponse:
    code = int(request.match_info["code"])
    headers = {"X-Status": str(code), "ETag": '"v1"'}
    if code in (204, 304) or 100 <= code < 200:
        return web.Response(status=code, headers=headers)
    return web.Response(status=code, text=f"backend says {code}\n", headers=headers)


async def slow_head(request: web.Request) -> web.Response:
    await asyncio.sleep(_float_arg(request, "delay", 2.0))
    return web.Response(text="slow done\n")


async def set_cookies(request: web.Request) -> web.Response:
    resp = web.Response(text="cookies\n")
    resp.headers.add("Set-Cookie", "a=1; Path=/")
    resp.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
    return resp


async def ws_reject(request: web.Request) -> web.Response:
    return web.json_response({"denied": True}, status=403, headers={"X-Rejected": "yes"})


async def ws_handler(request: web.Request) -> web.StreamResponse:
    """WebSocket echo.

    Text and binary messages are echoed.  Text commands:
      ``cmd:info``                  -> JSON: negotiated subprotocol, the request's
                                       Sec-WebSocket-* headers, Host and Origin,
                                       compression
      ``cmd:close:<code>:<reason>`` -> the server closes with that code and reason
      ``cmd:abort``                 -> the server drops the TCP connection, no close frame
      ``cmd:ping:<payload>``        -> the server pings; when the pong comes back
                                       it sends ``pong:<payload of the pong>``
    A close frame from the client is answered with the same code and reason.
    Pings from the client are answered by hand (autoping is off) so the test
    sees that the ping crossed the proxy: the server also sends
    ``got-ping:<payload>`` after answering.  How the client closed is recorded
    in ``app["state"]["ws_closes"]`` as (code, reason).
    """
    state = request.app[STATE_KEY]
    ws = web.WebSocketResponse(protocols=WS_PROTOCOLS, autoping=False, autoclose=False,
                               compress=True, max_msg_size=64 * 1024 * 1024)
    await ws.prepare(request)
    state["ws_open"] += 1
    pings_sent = 0
    try:
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.TEXT:
                text = msg.data
                if text == "cmd:info":
                    await ws.send_str(json.dumps({
                        "protocol": ws.ws_protocol,
                        "compress": ws.compress,
                        "request_protocols": request.headers.get("Sec-WebSocket-Protocol"),
                        "request_extensions": request.headers.get("Sec-WebSocket-Extensions"),
                        "host": request.headers.get("Host"),
                        "origin": request.headers.get("Origin"),
                    }))
                elif text.startswith("cmd:close:"):
                    _, _, code, reason = text.split(":", 3)
                    state["ws_closes"].append(("server", int(code), reason))
                    await ws.close(code=int(code), message=reason.encode())
                    break
                elif text == "cmd:abort":
                    # drop the TCP connection without a close frame
                    if request.transport is not None:
                        request.transport.abort()
                    state["ws_closes"].append(("server", None, "abort"))
                    break
                elif text.startswith("cmd:ping:"):
                    pings_sent += 1
                    await ws.ping(text[len("cmd:ping:"):].encode())
                else:
                    await ws.send_str(text)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == WSMsgType.PING:
                await ws.pong(msg.data)
                await ws.send_str("got-ping:" + msg.data.decode("latin-1"))
            elif msg.type == WSMsgType.PONG:
                if pings_sent:
                    pings_sent -= 1
                    await ws.send_str("pong:" + msg.data.decode("latin-1"))
            elif msg.type == WSMsgType.CLOSE:
                # answer the client's close frame with the same code and reason
                state["ws_closes"].append(("client", msg.data, msg.extra or ""))
                await ws.close(code=msg.data, message=(msg.extra or "").encode())
                break
            else:  # CLOSING / CLOSED / ERROR: the connection went away
                state["ws_closes"].append(("gone", ws.close_code, repr(msg.data)))
                break
    finally:
        state["ws_open"] -= 1
    return ws


def make_app(name: str = "backend") -> web.Application:
    app = web.Application(client_max_size=1 << 40)
    app[NAME_KEY] = name
    app[STATE_KEY] = {"requests": 0, "ws_open": 0, "ws_closes": []}
    r = app.router
    r.add_route("*", "/sse", sse)
    r.add_route("*", "/bytes", bytes_route)
    r.add_route("*", "/chunked", chunked_route)
    r.add_route("*", "/gzip", gzip_route)
    r.add_route("*", "/status/{code:\\d+}", status_route)
    r.add_route("*", "/slow-head", slow_head)
    r.add_route("*", "/set-cookies", set_cookies)
    r.add_route("GET", "/ws", ws_handler)
    r.add_route("*", "/ws-reject", ws_reject)
    r.add_route("*", "/upload", echo)
    r.add_route("*", "/echo", echo)
    r.add_route("*", "/{tail:.*}", echo)
    return app


# Header limits generous enough that the backend never rejects what the proxy
# is supposed to let through (the proxy's own limit is 64 KiB).
HANDLER_ARGS = {
    "max_line_size": 256 * 1024,
    "max_field_size": 256 * 1024,
    "max_headers": 1000,
    "access_log": None,
    # bodies are hashed exactly as they arrive (no gzip decoding of requests)
    "auto_decompress": False,
}


class ThreadedBackend:
    """``make_app()`` served on its own event loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, name: str = "backend"):
        self.host = host
        self.requested_port = port
        self.name = name
        self.app = make_app(name)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def state(self) -> dict:
        return self.app[STATE_KEY]

    def start(self) -> "ThreadedBackend":
        self._thread = threading.Thread(target=self._run, name=f"backend-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("backend did not start")
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    async def _setup(self) -> None:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, **HANDLER_ARGS)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description="test backend for sandbox-proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="subprocess-backend")
    args = parser.parse_args()

    async def serve() -> None:
        runner = web.AppRunner(make_app(args.name), **HANDLER_ARGS)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"READY {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
