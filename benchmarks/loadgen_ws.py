"""The harness's own uvloop load generator for what wrk cannot do.

  echo_rate    C WebSockets each doing 1 KiB echo round trips back to back -> round trips/s
  bulk_rate    one WebSocket streaming 64 KiB binary frames one way to the sink -> bytes/s
               (the sink's own count of received bytes, so nothing buffered in between counts)
  hold_idle    N idle connections held open: HTTP keep-alive after one completed GET, or
               WebSockets after the 101
Everything is asyncio Protocols (no streams), bounded by a deadline and a count, loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from dataclasses import dataclass, field

from benchmarks.wsbackend import accept_key, frame, parse_header

ECHO_SIZE = 1024
BULK_FRAME = 64 * 1024
MAX_ROUND_TRIPS = 50_000_000
MAX_BULK_BYTES = 1 << 40


class _Client(asyncio.Protocol):
    """A client connection: HTTP/1.1 request or WebSocket handshake first, then a mode."""

    def __init__(self, request: bytes, ws_key: bytes | None) -> None:
        self.request = request
        self.ws_key = ws_key
        self.t: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future = loop.create_future()   # set once the handshake/GET is done
        self.done: asyncio.Future = loop.create_future()    # set by a bench mode when finished
        self.buf = bytearray()
        self.mode = "head"
        self.closed = False
        # echo
        self.expect = 0
        self.got = 0
        self.count = 0
        self.deadline = 0.0
        self.msg = b""
        # bulk
        self.paused = False
        self.sent = 0

    def connection_made(self, transport) -> None:
        self.t = transport
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        self.closed = True
        for fut in (self.ready, self.done):
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection closed ({exc})"))
                fut.exception()  # mark retrieved: an idle connection has no one waiting on it

    def data_received(self, data: bytes) -> None:
        if self.mode == "echo":
            self.got += len(data)
            if self.got >= self.expect:
                self.got -= self.expect
                self.count += 1
                if self.count < MAX_ROUND_TRIPS and time.monotonic() < self.deadline:
                    self.t.write(self.msg)
                elif not self.done.done():
                    self.done.set_result(self.count)
            return
        self.buf += data
        if self.mode == "head":
            self._head()
        elif self.mode == "bulk":
            hdr = parse_header(self.buf)
            if hdr and len(self.buf) >= hdr[1] + hdr[2] and not self.done.done():
                self.done.set_result(int(self.buf[hdr[1]:hdr[1] + hdr[2]]))
        elif self.mode == "idle":
            self.buf.clear()

    def _head(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 65536 and not self.ready.done():
                self.ready.set_exception(ConnectionError("response head too large"))
            return
        head = bytes(self.buf[:end]).decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if self.ws_key is not None:
            ok = status == 101 and headers.get("sec-websocket-accept", "").encode() == \
                accept_key(self.ws_key)
            del self.buf[:end + 4]
            self.mode = "idle"
            if self.ready.done():
                return
            if ok:
                self.ready.set_result(status)
            else:
                self.ready.set_exception(ConnectionError(f"websocket handshake got {lines[0]!r}"))
            return
        length = int(headers.get("content-length", "0") or 0)
        if len(self.buf) < end + 4 + length:
            return
        del self.buf[:end + 4 + length]
        self.mode = "idle"
        if not self.ready.done():
            if 200 <= status < 300:
                self.ready.set_result(status)
            else:
                self.ready.set_exception(ConnectionError(f"GET got {lines[0]!r}"))

    # -- echo -------------------------------------------------------------------------------
    def start_echo(self, deadline: float) -> None:
        payload = os.urandom(ECHO_SIZE)
        self.msg = frame(2, payload, mask=True)
        self.expect = len(frame(2, payload))
        self.deadline = deadline
        self.mode = "echo"
        self.got = len(self.buf)
        self.buf.clear()
        self.t.write(self.msg)

    # -- bulk -------------------------------------------------------------------------------
    def start_bulk(self, deadline: float) -> None:
        self.msg = frame(2, os.urandom(BULK_FRAME), mask=True)
        self.deadline = deadline
        self.mode = "bulk"
        self.t.set_write_buffer_limits(high=1024 * 1024)
        self._pump()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == "bulk":
            self._pump()

    def _pump(self) -> None:
        if self.msg is None:
            return
        for _ in range(100_000):
            if self.paused or self.closed:
                return
            if time.monotonic() >= self.deadline or self.sent >= MAX_BULK_BYTES:
                self.t.write(frame(1, b"end", mask=True))
                self.msg = None
                return
            self.t.write(self.msg)
            self.sent += BULK_FRAME
        asyncio.get_running_loop().call_soon(self._pump)

    def close(self) -> None:
        """Reset the connection (SO_LINGER 0): no TIME_WAIT left behind on the client side,
        where thousands of them would eat the loopback's ephemeral ports."""
        if self.t is not None and not self.closed:
            sock = self.t.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.t.abort()


def _ws_request(host_header: str, path: str) -> tuple[bytes, bytes]:
    key = base64.b64encode(os.urandom(16))
    req = (f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
           f"Sec-WebSocket-Version: 13\r\n\r\n").encode()
    return req, key


async def connect(port: int, host_header: str, path: str, ws: bool, timeout: float) -> _Client:
    if ws:
        req, key = _ws_request(host_header, path)
    else:
        req, key = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode(), None
    loop = asyncio.get_running_loop()

    async def go():
        _, proto = await loop.create_connection(lambda: _Client(req, key), "127.0.0.1", port)
        await proto.ready
        return proto
    return await asyncio.wait_for(go(), timeout)


async def echo_rate(port: int, host_header: str, conns: int, duration: float) -> float:
    """Round trips/s of 1 KiB messages over `conns` WebSockets to /echo."""
    clients = await asyncio.gather(*(connect(port, host_header, "/echo", True, 10)
                                     for _ in range(conns)))
    try:
        t0 = time.monotonic()
        for c in clients:
            c.start_echo(t0 + duration)
        counts = await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)),
                                        duration + 20)
        return sum(counts) / (time.monotonic() - t0)
    finally:
        for c in clients:
            c.close()


async def bulk_rate(port: int, host_header: str, duration: float) -> float:
    """Bytes/s that reach the sink over one WebSocket streaming 64 KiB frames."""
    c = await connect(port, host_header, "/sink", True, 10)
    try:
        t0 = time.monotonic()
        c.start_bulk(t0 + duration)
        received = await asyncio.wait_for(c.done, duration + 60)
        return received / (time.monotonic() - t0)
    finally:
        c.close()


@dataclass
class Held:
    clients: list = field(default_factory=list)
    failures: int = 0
    first_error: str = ""
    seconds: float = 0.0

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()


async def hold_idle(port: int, host_header: str, n: int, ws: bool, timeout: float,
                    concurrency: int = 100) -> Held:
    """Open n connections (keep-alive after one GET, or WebSockets) and keep them open."""
    held = Held()
    sem = asyncio.Semaphore(concurrency)
    t0 = time.monotonic()
    deadline = t0 + timeout

    async def one():
        async with sem:
            left = deadline - time.monotonic()
            if left <= 0:
                held.failures += 1
                return
            try:
                held.clients.append(await connect(port, host_header, "/echo" if ws else "/",
                                                  ws, min(left, 15)))
            except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                held.failures += 1
                if not held.first_error:
                    held.first_error = f"{type(e).__name__}: {e}"
    await asyncio.gather(*(one() for _ in range(n)))
    held.seconds = time.monotonic() - t0
    return held
