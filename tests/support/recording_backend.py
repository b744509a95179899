"""Recording backends for differential tests: what a client sent against what a backend received.

A `RecordingBackend` is a raw asyncio server that keeps every byte the proxy sends it, connection
by connection, and reads them with `parse_request`: a strict HTTP/1.1 request parser written for
these tests alone (no llhttp, so it does not share the proxy's blind spots). Whatever the proxy
forwards must be RFC 9112 to the letter: one request line `METHOD SP target SP HTTP/1.1`, header
lines `name: value` with token names and no obs-fold, bare CR or LF, exactly one Host, at most one
framing (a single `Content-Length: 1*DIGIT` or a single `Transfer-Encoding: chunked`, never both).
A connection the parser rejects is answered `400` (``X-Test-Id: backend-parse-error``) and closed,
and `ReceivedConnection.error` says why.

Each complete request is answered by a script. The default one (`scripted_reply`) reads the
request target: the marker is the path segment after `/m/` (echoed in `X-Test-Id`, so a client
can tell which request an answer belongs to, whatever the proxy did to the headers) and the
behaviour is the `script=` query parameter, some of it hostile on purpose:

``ok`` (default)       200, Content-Length, body ``<backend name>:<marker>``
``chunked``            the same body chunked in two pieces, with a trailer
``refuse``             426 Upgrade Required (any request)
``accept``             for an upgrade request, 101 and then echo every byte (a tunnel); else ``ok``
``extra1``             ``ok`` followed by a complete response nobody asked for, in the same write
``extra2``             the same in two writes (two send calls back to back, so a proxy that looks
                       for bytes after a response before reusing the connection sees them)
``extrachunked``       ``chunked`` followed by the unsolicited response
``extrabig``           a 64 KiB Content-Length body followed by the unsolicited response
``connopt``            ``Connection: Content-Length`` with ``Content-Length: 5`` and ``hello``
``gzipchunked``        ``Transfer-Encoding: gzip, chunked`` carrying GZIP_PAYLOAD gzipped
``setcookie``          ``Set-Cookie`` lines taken from the request's ``X-Set-Cookie`` headers
``echo``               200 whose body is the request head as received
``headbody``           a Content-Length body (itself a response) even for HEAD; any other
                       script answers HEAD with ``ok``'s head alone
``closemid``           Content-Length: 100, 10 bytes of body, then a close

The unsolicited response says ``smuggled`` (body and ``X-Test-Id``); the backend keeps serving
the connection afterwards, as a hostile sandbox would. All backends of a `RecordingFleet` share
one event loop in a daemon thread; records are read from the test's thread under a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import parse_qsl

TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
HEXDIG = frozenset(b"0123456789abcdefABCDEF")
DIGIT = frozenset(b"0123456789")
TARGET_CHARS = frozenset(range(0x21, 0x7F))  # visible ASCII: no SP, no CTL, no obs-text
MAX_HEAD = 1 << 20

SMUGGLED = (b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Test-Id: smuggled\r\nX-Backend: hostile\r\n"
            b"\r\nsmuggled")
GZIP_PAYLOAD = b"the gzip transfer coding must reach the client as such\n" * 20


class StrictParseError(ValueError):
    """What the proxy sent is not a well-formed HTTP/1.1 request."""


@dataclass
class ReceivedRequest:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    framing: str  # "none" | "length" | "chunked"
    trailers: list[tuple[bytes, bytes]]
    raw: bytes
    connection: int = -1  # index of the backend connection it arrived on
    backend: str = ""

    def header_all(self, name: str | bytes) -> list[bytes]:
        lname = (name.encode() if isinstance(name, str) else name).lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def header(self, name: str | bytes) -> bytes | None:
        values = self.header_all(name)
        return values[0] if values else None

    @property
    def marker(self) -> str:
        return marker_of(self.target)

    def connection_tokens(self) -> set[bytes]:
        return {t.strip().lower() for v in self.header_all("connection") for t in v.split(b",")
                if t.strip()}


@dataclass
class ReceivedConnection:
    index: int
    backend: str
    raw: bytearray = field(default_factory=bytearray)     # every byte, in order
    tunnel: bytearray = field(default_factory=bytearray)  # the bytes after a 101
    requests: list[ReceivedRequest] = field(default_factory=list)
    error: str | None = None  # why the strict parser rejected what arrived
    pending: bytes = b""      # bytes not (yet) parsed as a complete request
    closed: bool = False


def marker_of(target: bytes) -> str:
    """The marker a test put in the path: `/m/<marker>/...` (empty when there is none)."""
    path = target.split(b"?", 1)[0]
    if not path.startswith(b"/m/"):
        return ""
    return path[3:].split(b"/", 1)[0].decode("latin-1")


def query_of(target: bytes) -> dict[str, str]:
    _, _, query = target.partition(b"?")
    return dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))


def _check_field_line(line: bytes, what: str) -> tuple[bytes, bytes]:
    if line[:1] in (b" ", b"\t"):
        raise StrictParseError(f"obs-fold in the {what}: {line[:80]!r}")
    name, colon, value = line.partition(b":")
    if not colon or not name or not TCHAR.issuperset(name):
        raise StrictParseError(f"malformed {what} line {line[:80]!r}")
    value = value.strip(b" \t")
    for c in value:
        if c < 0x20 and c != 0x09 or c == 0x7F:
            raise StrictParseError(f"control byte {c:#x} in {what} {name!r}: {value[:80]!r}")
    return name, value


def parse_request(buf: bytes) -> tuple[ReceivedRequest, int] | None:
    """The first request in `buf` and how many bytes it used; None while it is incomplete.

    Raises StrictParseError at the first byte that is not strict HTTP/1.1.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise StrictParseError("request head without end")
        probe = buf.replace(b"\r\n", b"")
        if b"\n" in probe or b"\r" in probe[:-1]:
            raise StrictParseError(f"bare CR or LF in a request head: {bytes(buf[:120])!r}")
        return None
    head = bytes(buf[:end])
    flat = head.replace(b"\r\n", b"")
    if b"\n" in flat or b"\r" in flat:
        raise StrictParseError(f"bare CR or LF in a request head: {head[:120]!r}")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise StrictParseError(f"malformed request line {lines[0][:120]!r}")
    method, target, version = parts
    if not method or not TCHAR.issuperset(method):
        raise StrictParseError(f"malformed method {method[:40]!r}")
    if not target or not TARGET_CHARS.issuperset(target):
        raise StrictParseError(f"malformed request target {target[:120]!r}")
    if version != b"HTTP/1.1":
        raise StrictParseError(f"request version {version[:20]!r}, not HTTP/1.1")
    headers = [_check_field_line(line, "header") for line in lines[1:]]
    names = [k.lower() for k, _ in headers]
    if names.count(b"host") != 1:
        raise StrictParseError(f"{names.count(b'host')} Host headers")
    lengths = [v for k, v in headers if k.lower() == b"content-length"]
    codings = [v for k, v in headers if k.lower() == b"transfer-encoding"]
    if lengths and codings:
        raise StrictParseError(f"Content-Length {lengths} and Transfer-Encoding {codings}")
    if len(lengths) > 1:
        raise StrictParseError(f"{len(lengths)} Content-Length headers: {lengths}")
    if len(codings) > 1 or codings and codings[0].lower() != b"chunked":
        raise StrictParseError(f"Transfer-Encoding {codings}")
    pos = end + 4
    trailers: list[tuple[bytes, bytes]] = []
    if codings:
        framing = "chunked"
        body = bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if len(buf) - pos > 4096:
                    raise StrictParseError("chunk size line without end")
                return None
            size_line = bytes(buf[pos:eol])
            size_text, _, ext = size_line.partition(b";")
            if not size_text or not HEXDIG.issuperset(size_text):
                raise StrictParseError(f"malformed chunk size line {size_line[:60]!r}")
            if b"\r" in ext or b"\n" in ext:
                raise StrictParseError(f"malformed chunk extension {ext[:60]!r}")
            size = int(size_text, 16)
            pos = eol + 2
            if size == 0:
                while True:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        return None
                    line = bytes(buf[pos:eol])
                    pos = eol + 2
                    if not line:
                        break
                    trailers.append(_check_field_line(line, "trailer"))
                break
            if len(buf) < pos + size + 2:
                return None
            body += buf[pos:pos + size]
            if buf[pos + size:pos + size + 2] != b"\r\n":
                raise StrictParseError(f"chunk of {size} bytes not followed by CRLF")
            pos += size + 2
        body = bytes(body)
    elif lengths:
        if not lengths[0] or not DIGIT.issuperset(lengths[0]):
            raise StrictParseError(f"malformed Content-Length {lengths[0]!r}")
        n = int(lengths[0])
        if len(buf) < pos + n:
            return None
        framing = "length"
        body = bytes(buf[pos:pos + n])
        pos += n
    else:
        framing = "none"
        body = b""
    return ReceivedRequest(method, target, version, headers, body, framing, trailers,
                           bytes(buf[:pos])), pos


# -- replies --------------------------------------------------------------------------------

CLOSE = object()   # step: close the connection
TUNNEL = object()  # step: from now on echo every byte (after a 101)
Step = object      # bytes (write), float (sleep seconds), CLOSE or TUNNEL


def ok_response(name: str, marker: str, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    body = f"{name}:{marker}".encode()
    return (b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\nX-Test-Id: %s\r\n"
            b"X-Backend: %s\r\n" % (len(body), marker.encode(), name.encode()) + extra
            + b"\r\n" + body)


def chunked_response(name: str, marker: str) -> bytes:
    body = f"{name}:{marker}".encode()
    half = len(body) // 2 or 1
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Test-Id: %s\r\nX-Backend: %s"
            b"\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n"
            % (marker.encode(), name.encode(), half, body[:half], len(body) - half, body[half:]))


def expected_body(name: str, marker: str, script: str) -> bytes | None:
    """The body a client should receive for `script` (None: not a plain body)."""
    if script in ("ok", "chunked", "refuse", "extra1", "extra2", "extrachunked", "setcookie",
                  "accept"):
        return f"{name}:{marker}".encode()
    if script == "extrabig":
        return big_body(marker)
    if script == "connopt":
        return b"hello"
    if script == "gzipchunked":
        return GZIP_PAYLOAD
    return None


def big_body(marker: str) -> bytes:
    seed = marker.encode() or b"-"
    return (seed * (65536 // len(seed) + 1))[:65536]


def scripted_reply(name: str, req: ReceivedRequest) -> list:
    marker = req.marker
    script = query_of(req.target).get("script", "ok")
    mk, nm = marker.encode(), name.encode()
    if req.method == b"HEAD" and script != "headbody":
        full = ok_response(name, marker)
        return [full[:full.find(b"\r\n\r\n") + 4]]  # the head alone, as RFC 9110 9.3.2 says
    if script == "chunked":
        return [chunked_response(name, marker)]
    if script == "refuse":
        return [ok_response(name, marker, b"426 Upgrade Required")]
    if script == "accept" and req.header("upgrade") is not None:
        return [b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "
                + req.header("upgrade") + b"\r\nX-Test-Id: " + mk + b"\r\nX-Backend: " + nm
                + b"\r\n\r\n", TUNNEL]
    if script == "extra1":
        return [ok_response(name, marker) + SMUGGLED]
    if script == "extra2":
        return [ok_response(name, marker), SMUGGLED]
    if script == "extrachunked":
        return [chunked_response(name, marker) + SMUGGLED]
    if script == "extrabig":
        body = big_body(marker)
        return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Test-Id: %s\r\nX-Backend: %s\r\n"
                b"\r\n" % (len(body), mk, nm) + body + SMUGGLED]
    if script == "connopt":
        return [b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n"
                b"X-Test-Id: " + mk + b"\r\nX-Backend: " + nm + b"\r\n\r\nhello"]
    if script == "gzipchunked":
        packed = gzip.compress(GZIP_PAYLOAD, mtime=0)
        third = len(packed) // 3
        pieces = [packed[:third], packed[third:2 * third], packed[2 * third:]]
        return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Type: "
                b"text/plain\r\nX-Test-Id: " + mk + b"\r\nX-Backend: " + nm + b"\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"]
    if script == "setcookie":
        lines = b"".join(b"Set-Cookie: " + v + b"\r\n" for v in req.header_all("x-set-cookie"))
        return [ok_response(name, marker, extra=lines)]
    if script == "headbody":  # a body after the head of a HEAD response (a hostile backend)
        return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Test-Id: %s\r\nX-Backend: %s\r\n"
                b"\r\n%s" % (len(SMUGGLED), mk, nm, SMUGGLED)]
    if script == "echo":
        head = req.raw[:req.raw.find(b"\r\n\r\n") + 4]
        return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Test-Id: %s\r\nX-Backend: %s\r\n"
                b"\r\n%s" % (len(head), mk, nm, head)]
    if script == "closemid":
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Test-Id: " + mk + b"\r\nX-Backend: "
                + nm + b"\r\n\r\n0123456789", 0.01, CLOSE]
    return [ok_response(name, marker)]


# -- the servers ------------------------------------------------------------------------------

class RecordingBackend:
    """One backend (one sandbox's port): records every connection and answers by script."""

    def __init__(self, fleet: "RecordingFleet", name: str,
                 script: Callable[[str, ReceivedRequest], list] | None = None):
        self.fleet = fleet
        self.name = name
        self.script = script or scripted_reply
        self.port = 0
        self.connections: list[ReceivedConnection] = []
        self.last_activity = 0.0
        self._server: asyncio.AbstractServer | None = None
        self._count = 0

    # read from the test's thread
    def snapshot(self) -> list[ReceivedConnection]:
        with self.fleet.lock:
            return [ReceivedConnection(c.index, c.backend, bytearray(c.raw), bytearray(c.tunnel),
                                       list(c.requests), c.error, c.pending, c.closed)
                    for c in self.connections]

    def requests(self) -> list[ReceivedRequest]:
        return [r for c in self.snapshot() for r in c.requests]

    def raw(self) -> bytes:
        return b"".join(bytes(c.raw) for c in self.snapshot())

    def bytes_received(self) -> int:
        with self.fleet.lock:
            return sum(len(c.raw) for c in self.connections)

    def errors(self) -> list[str]:
        return [f"{self.name} connection {c.index}: {c.error}" for c in self.snapshot()
                if c.error]

    def reset(self) -> None:
        """Forget what was recorded; connections still open keep being recorded afresh."""
        with self.fleet.lock:
            live = [c for c in self.connections if not c.closed]
            for c in live:
                c.raw.clear()
                c.tunnel.clear()
                c.requests.clear()
                c.error = None
                c.pending = b""
            self.connections = live

    # on the fleet's loop
    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]

    def _touch(self) -> None:
        self.last_activity = time.monotonic()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lock = self.fleet.lock
        with lock:
            conn = ReceivedConnection(self._count, self.name)
            self._count += 1
            self.connections.append(conn)
        self._touch()
        buf = bytearray()
        tunnel = False
        try:
            while True:
                if not tunnel and buf:
                    try:
                        parsed = parse_request(buf)
                    except StrictParseError as exc:
                        with lock:
                            conn.error = str(exc)
                        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                     b"X-Test-Id: backend-parse-error\r\n"
                                     b"X-Backend: " + self.name.encode() + b"\r\n"
                                     b"Connection: close\r\n\r\n")
                        break
                    if parsed is not None:
                        req, used = parsed
                        del buf[:used]
                        req.connection, req.backend = conn.index, self.name
                        with lock:
                            conn.requests.append(req)
                            conn.pending = bytes(buf)
                        stop = False
                        for step in self.script(self.name, req):
                            if step is CLOSE:
                                stop = True
                                break
                            if step is TUNNEL:
                                tunnel = True
                                if buf:
                                    with lock:
                                        conn.tunnel += buf
                                        conn.pending = b""
                                    writer.write(bytes(buf))
                                    buf.clear()
                                break
                            if isinstance(step, float):
                                await writer.drain()
                                self._touch()
                                await asyncio.sleep(step)
                            else:
                                writer.write(step)
                            self._touch()
                        await writer.drain()
                        self._touch()
                        if stop:
                            break
                        continue
                data = await reader.read(65536)
                self._touch()
                if not data:
                    break
                with lock:
                    conn.raw += data
                    if tunnel:
                        conn.tunnel += data
                if tunnel:
                    writer.write(data)
                    await writer.drain()
                else:
                    buf += data
                    with lock:
                        conn.pending = bytes(buf)
        except (ConnectionError, OSError):
            pass
        finally:
            with lock:
                conn.closed = True
            self._touch()
            with contextlib.suppress(Exception):
                writer.close()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()


class RecordingFleet:
    """Any number of RecordingBackends on one event loop in a daemon thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.backends: dict[str, RecordingBackend] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="recording-fleet",
                                        daemon=True)
        self._thread.start()

    def _run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, name: str, script: Callable[[str, ReceivedRequest], list] | None = None
            ) -> RecordingBackend:
        backend = RecordingBackend(self, name, script)
        self._run(backend._start())
        self.backends[name] = backend
        return backend

    def reset(self) -> None:
        for b in self.backends.values():
            b.reset()

    def quiet(self, seconds: float = 0.05, timeout: float = 3.0) -> None:
        """Wait until no backend has received or sent anything for `seconds`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = max((b.last_activity for b in self.backends.values()), default=0.0)
            idle = time.monotonic() - last
            if idle >= seconds:
                return
            time.sleep(seconds - idle)

    def stop(self) -> None:
        async def stop_all() -> None:
            for b in self.backends.values():
                await b._stop()
        with contextlib.suppress(Exception):
            self._run(stop_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
