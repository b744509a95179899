"""HTTP clients for the tests, and the answers they are compared with.

Owns: the raw HTTP/1.1 client (``RawConn``, ``RawResponse``, ``IncompleteResponse``,
``build_request``, ``parse_head``), for what client libraries refuse to send or hide;
``raw_backend``, a hand-written backend on asyncio streams; the aiohttp shortcut through a
running proxy (``fetch``, ``Fetched``) and its metrics and health endpoints (``metric_value``,
``http_status``); header lookups in a backend's echo (``header_value``, ``header_values``); the
proxy's own error bodies (``not_found_body``, ``port_closed_body``) and a browser's request
headers (``BROWSER_UA``, ``BROWSER_ACCEPT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from support.process import ProxyProcess

# --------------------------------------------------------------------------
# Headers in a backend's echo, and a hand-written backend
# --------------------------------------------------------------------------


def header_values(echo: dict, name: str) -> list[str]:
    """All values of a header in a backend echo (case-insensitive name)."""
    lname = name.lower()
    return [v for k, v in echo["headers"] if k.lower() == lname]


def header_value(echo: dict, name: str) -> str | None:
    values = header_values(echo, name)
    assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
    return values[0] if values else None


@contextlib.asynccontextmanager
async def raw_backend(handler):
    """A hand-written backend: `handler(reader, writer)` per connection; yields its port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


# --------------------------------------------------------------------------
# A raw HTTP/1.1 client, for what client libraries refuse to send or hide
# --------------------------------------------------------------------------


class IncompleteResponse(AssertionError):
    def __init__(self, message: str, head: "RawResponse | None" = None, received: bytes = b""):
        super().__init__(message)
        self.head = head
        self.received = received


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    body: bytes = b""
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def json(self) -> Any:
        return json.loads(self.body)

    def connection_tokens(self) -> set[str]:
        tokens: set[str] = set()
        for v in self.header_all("Connection"):
            tokens.update(t.strip().lower() for t in v.split(",") if t.strip())
        return tokens


def build_request(
    method: str,
    target: str,
    host: str | None,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    hdrs = list(headers or [])
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in hdrs):
        hdrs.append(("Content-Length", str(len(body))))
    lines.extend(f"{k}: {v}" for k, v in hdrs)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def parse_head(raw: bytes) -> RawResponse:
    text = raw.decode("latin-1")
    lines = text.split("\r\n")
    status_line = lines[0]
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise AssertionError(f"not an HTTP status line: {status_line!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        k, sep, v = line.partition(":")
        assert sep, f"malformed header line {line!r}"
        headers.append((k.strip(), v.strip()))
    return RawResponse(
        version=parts[0],
        status=int(parts[1]),
        reason=parts[2] if len(parts) > 2 else "",
        headers=headers,
        raw_head=raw,
    )


class RawConn:
    """One client TCP connection to the proxy, speaking hand-written HTTP/1.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> "RawConn":
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 20), timeout
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, method: str, target: str, host: str | None, headers=None,
                      body: bytes | None = None, version: str = "HTTP/1.1",
                      timeout: float = 10.0) -> RawResponse:
        await self.send(build_request(method, target, host, headers, body, version))
        return await self.response(method=method, timeout=timeout)

    async def read_head(self, timeout: float = 10.0) -> RawResponse:
        try:
            raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as e:
            raise IncompleteResponse(
                f"connection closed before a complete response head (got {e.partial[:200]!r})",
                received=e.partial,
            ) from None
        return parse_head(raw)

    async def response(self, method: str = "GET", timeout: float = 10.0,
                       skip_interim: bool = True) -> RawResponse:
        """Read one response (by default skipping 100 Continue and other 1xx but 101)."""
        async def read() -> RawResponse:
            while True:
                head = await self.read_head(timeout)
                if skip_interim and 100 <= head.status < 200 and head.status != 101:
                    continue
                break
            await self._read_body(head, method)
            return head

        return await asyncio.wait_for(read(), timeout)

    async def _read_body(self, head: RawResponse, method: str) -> None:
        if method.upper() == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
            return
        te = ",".join(head.header_all("Transfer-Encoding")).lower()
        if te:
            assert te.split(",")[-1].strip() == "chunked", f"unexpected transfer-encoding {te!r}"
            head.chunked = True
            body = bytearray()
            while True:
                try:
                    size_line = await self.reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0].strip(), 16)
                    if size == 0:
                        while True:
                            line = await self.reader.readuntil(b"\r\n")
                            if line == b"\r\n":
                                break
                            k, _, v = line.decode("latin-1").partition(":")
                            head.trailers.append((k.strip(), v.strip()))
                        break
                    body += await self.reader.readexactly(size)
                    crlf = await self.reader.readexactly(2)
                    assert crlf == b"\r\n", f"bad chunk terminator {crlf!r}"
                except (asyncio.IncompleteReadError, ConnectionError) as e:
                    partial = getattr(e, "partial", b"")
                    head.body = bytes(body)
                    raise IncompleteResponse(
                        f"connection closed inside a chunked body after {len(body)} bytes",
                        head=head, received=bytes(body) + partial,
                    ) from None
            head.body = bytes(body)
            return
        cl = head.header("Content-Length")
        if cl is not None:
            n = int(cl)
            try:
                head.body = await self.reader.readexactly(n)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                partial = getattr(e, "partial", b"")
                head.body = partial
                raise IncompleteResponse(
                    f"connection closed after {len(partial)} of {n} body bytes",
                    head=head, received=partial,
                ) from None
            return
        # close-delimited
        head.body = await self.reader.read(-1)

    async def closed(self, timeout: float) -> bool:
        """True when the peer closes (EOF or reset) within ``timeout`` seconds.

        Anything the proxy still sends before closing is returned in
        ``self.last_bytes``."""
        self.last_bytes = b""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                data = await asyncio.wait_for(self.reader.read(65536), left)
                if not data:
                    return True
                self.last_bytes += data
        except asyncio.TimeoutError:  # first: since Python 3.11 it is an OSError too
            return False
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


# --------------------------------------------------------------------------
# Expected proxy error bodies
# --------------------------------------------------------------------------


def not_found_body(sid: str) -> dict:
    return {"sandboxId": sid, "message": "The sandbox was not found", "code": 502}


def port_closed_body(sid: str, port: int) -> dict:
    return {
        "sandboxId": sid,
        "message": "The sandbox is running but port is not open",
        "port": port,
        "code": 502,
    }


BROWSER_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0 Safari/537.36"
)
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"


# --------------------------------------------------------------------------
# aiohttp client shortcut
# --------------------------------------------------------------------------


@dataclass
class Fetched:
    status: int
    headers: Any  # CIMultiDictProxy
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(
    p: ProxyProcess,
    path: str,
    host: str | None = None,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: Any = None,
    timeout: float = 20.0,
) -> Fetched:
    """One request through the proxy with aiohttp (no decompression, no env proxies)."""
    import aiohttp

    hdrs = {"Host": host or p.host()}
    hdrs.update(headers or {})
    async with aiohttp.ClientSession(
        auto_decompress=False, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        async with session.request(method, p.url(path), headers=hdrs, data=data) as resp:
            body = await resp.read()
            return Fetched(resp.status, resp.headers, body)


async def metric_value(p: ProxyProcess, name: str, **labels: str) -> float | None:
    """One sample of the proxy's /metrics (None when it is not there)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(p.metrics_url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


async def http_status(url: str) -> int:
    """The status of a GET (for /readyz and /healthz)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(url) as resp:
            return resp.status
