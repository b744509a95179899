"""The WebSocket backend of the benchmarks: a minimal RFC 6455 echo and sink server on uvloop.

Run as `python -m benchmarks.wsbackend --port P`. Paths:
  /echo  every data frame comes back unmasked with the same opcode and payload;
  /sink  binary payload is counted and dropped; a text frame "end" is answered with a text
         frame holding the byte count since the previous "end" (the bulk test's receipt).
  /upload  (plain HTTP POST, Content-Length or chunked) the body is read and dropped, then
         200 "ok"; keep-alive. nginx cannot be the upload backend: it answers before reading.
Ping gets pong, close gets close. Also owns the small framing helpers the client shares.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import struct

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16384
MAX_FRAME = 64 * 1024 * 1024


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest())


def frame(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    """One final frame. With mask=True the key is zero (valid, and the payload stays as is)."""
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, mbit | 127, n)
    return head + (b"\0\0\0\0" if mask else b"") + payload


def parse_header(buf) -> tuple[int, int, int, bytes] | None:
    """(opcode, header length, payload length, mask key) of the frame at buf[0], or None."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack_from("!H", buf, 2)[0]
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack_from("!Q", buf, 2)[0]
        pos = 10
    key = b""
    if b1 & 0x80:
        if len(buf) < pos + 4:
            return None
        key = bytes(buf[pos:pos + 4])
        pos += 4
    return b0 & 0x0F, pos, n, key


def unmask(payload: bytes, key: bytes) -> bytes:
    if not key or key == b"\0\0\0\0":
        return bytes(payload)
    n = len(payload)
    full = (key * (n // 4 + 1))[:n]
    mixed = int.from_bytes(payload, "little") ^ int.from_bytes(full, "little")
    return mixed.to_bytes(n, "little")


class WsServer(asyncio.Protocol):
    def __init__(self) -> None:
        self.t: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = "head"  # head | ws | body (Content-Length upload) | chunked (upload)
        self.sink = False
        self.skip = 0      # payload bytes (sink frame / upload body / chunk) still to drop
        self.count = 0     # sink: payload bytes received since the last "end"

    def connection_made(self, transport) -> None:
        self.t = transport

    def pause_writing(self) -> None:
        self.t.pause_reading()

    def resume_writing(self) -> None:
        self.t.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.skip:
            take = min(self.skip, len(data))
            self.skip -= take
            self.count += take
            if take == len(data):
                if self.skip == 0 and self.state == "body":
                    self._uploaded()
                return
            data = data[take:]
        self.buf += data
        for _ in range(100_000):  # bounded: one pass per request head / chunk / frame batch
            before = (self.state, len(self.buf), self.skip)
            if self.state == "head":
                self._head()
            elif self.state == "body":
                if self.skip == 0:
                    self._uploaded()
            elif self.state in ("chunked", "trailers"):
                self._chunks()
            else:
                self._frames()
                return
            if self.t.is_closing() or (self.state, len(self.buf), self.skip) == before:
                return

    def _head(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self.t.close()
            return
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[:end + 4]
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        path = parts[1] if len(parts) > 1 else ""
        if path == "/upload":
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.state = "chunked"
            else:
                self.state = "body"
                self._drop(int(headers.get("content-length", "0") or 0))
            return
        key = headers.get("sec-websocket-key", "")
        if path not in ("/echo", "/sink") or "websocket" not in headers.get("upgrade", "").lower() \
                or not key:
            self.t.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            self.t.close()
            return
        self.sink = path == "/sink"
        self.state = "ws"
        self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                     + accept_key(key.encode()) + b"\r\n\r\n")

    def _drop(self, n: int) -> None:
        """Drop n bytes: what is buffered now, the rest as it arrives (self.skip)."""
        take = min(n, len(self.buf))
        del self.buf[:take]
        self.count += take
        self.skip = n - take

    def _uploaded(self) -> None:
        self.state = "head"
        self.count = 0
        self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")

    def _chunks(self) -> None:
        """Chunked upload: drop chunk data; answer after the last chunk and the trailers."""
        for _ in range(100_000):
            if self.skip:
                return
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buf[:end])
            del self.buf[:end + 2]
            if self.state == "trailers":
                if line == b"":
                    self._uploaded()
                    return
                continue
            if line == b"":
                continue  # the CRLF that ends a chunk's data
            size = int(line.split(b";")[0], 16)
            if size == 0:
                self.state = "trailers"
                continue
            self._drop(size)

    def _frames(self) -> None:
        buf = self.buf
        for _ in range(1_000_000):  # bounded: one iteration per complete frame in the buffer
            hdr = parse_header(buf)
            if hdr is None:
                return
            opcode, hlen, plen, key = hdr
            if plen > MAX_FRAME:
                self.t.close()
                return
            if self.sink and opcode in (0, 2):
                take = min(len(buf) - hlen, plen)
                self.count += take
                del buf[:hlen + take]
                if take < plen:
                    self.skip = plen - take
                    return
                continue
            if len(buf) < hlen + plen:
                return
            payload = unmask(buf[hlen:hlen + plen], key)
            del buf[:hlen + plen]
            self._message(opcode, payload)
            if self.t.is_closing():
                return

    def _message(self, opcode: int, payload: bytes) -> None:
        if opcode == 8:
            self.t.write(frame(8, payload[:2]))
            self.t.close()
        elif opcode == 9:
            self.t.write(frame(10, payload))
        elif opcode == 10:
            pass
        elif self.sink:
            if opcode == 1 and payload == b"end":
                self.t.write(frame(1, str(self.count).encode()))
                self.count = 0
        else:
            self.t.write(frame(opcode, payload))


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(WsServer, host, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    try:
        run_loop(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


def run_loop(coro):
    """Run coro on uvloop when it is installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    main()
