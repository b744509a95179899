"""HTTP/2 clients for the end-to-end tests, and what they need around them.

Owns: ``H2Client``, an asyncio HTTP/2 client on the ``h2`` library's state machine (streams,
flow control, trailers, RFC 8441 extended CONNECT), which can hold back its receive window to
play a slow reader; ``FrameConn``, raw frames (``hyperframe``) and HPACK (``hpack``) on a socket,
for what no client library will send (floods, resets, bombs, connection-specific fields);
``ws_frame``/``ws_parse``, hand-built WebSocket frames (RFC 6455) to carry over a stream;
``tls_client_context``/``write_tls_cert``, the trustme certificate a TLS proxy serves; and around
them ``serve_on`` (a hand-written backend on a port a registry record names) and ``RssPeak`` (the
proxy's peak RSS while a transfer or an attack runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
Fields = list[tuple[bytes, bytes]]


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def fields(pairs: Iterable[tuple[str | bytes, str | bytes]]) -> Fields:
    return [(_b(k), _b(v)) for k, v in pairs]


def request_fields(authority: str, path: str = "/echo", method: str = "GET",
                   scheme: str = "http", extra: Iterable[tuple[str | bytes, str | bytes]] = (),
                   ) -> Fields:
    """Pseudo-headers first (RFC 9113 8.3), then ``extra``."""
    return fields([(":method", method), (":scheme", scheme), (":authority", authority),
                   (":path", path), *extra])


# --------------------------------------------------------------------------------------------
# TLS: the certificate the proxy serves, and a client that trusts it
# --------------------------------------------------------------------------------------------

TLS_DOMAIN = "sbx.example.test"  # OpenSSL refuses a wildcard directly under .localhost


def write_tls_cert(ca: Any, directory, name: str = "edge") -> tuple[Any, Any]:
    """A ``*.sbx.example.test`` certificate from ``ca`` (a trustme.CA): (cert path, key path)."""
    cert = ca.issue_cert(f"*.{TLS_DOMAIN}")
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def tls_client_context(ca: Any, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


# --------------------------------------------------------------------------------------------
# H2Client: a real HTTP/2 client (the h2 library's state machine)
# --------------------------------------------------------------------------------------------


@dataclass
class H2Response:
    """What one stream received."""

    stream_id: int
    headers: Fields = field(default_factory=list)  # the final response head, pseudo-headers too
    informational: list[Fields] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)  # the body so far
    trailers: Fields | None = None
    ended: bool = False       # END_STREAM received: a complete response
    reset: int | None = None  # the RST_STREAM error code, when the server reset the stream
    lost: bool = False        # the connection ended before the stream did

    @property
    def body(self) -> bytes:
        return bytes(self.received)

    @property
    def status(self) -> int | None:
        v = self.header(":status")
        return int(v) if v is not None else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == lname]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def describe(self) -> str:
        return (f"stream {self.stream_id}: status={self.status} ended={self.ended} "
                f"reset={self.reset} lost={self.lost} body={self.body[:200]!r}")


class _Stream:
    def __init__(self, stream_id: int):
        self.response = H2Response(stream_id)
        self.head = asyncio.Event()      # the final head (or the stream's end)
        self.done = asyncio.Event()      # END_STREAM, RST_STREAM or the connection's end
        self.window = asyncio.Event()    # our send window may have opened
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()  # body as it arrives
        self.unacked = 0                 # received bytes whose window we hold back


class H2Client:
    """One HTTP/2 connection to the proxy, speaking through the h2 library.

    ``auto_window=False`` makes a slow reader: received DATA is not acknowledged (no
    WINDOW_UPDATE) until ``open_window`` is called, so the server's send window stays shut.
    ``validate=False`` lets it receive (and send) fields a strict client would refuse, so a
    test can see what the server actually sent.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 validate: bool = True, auto_window: bool = True):
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None,
            validate_inbound_headers=validate, normalize_inbound_headers=validate,
            validate_outbound_headers=validate, normalize_outbound_headers=validate,
            split_outbound_cookies=False)
        self.conn = h2.connection.H2Connection(config=config)
        self.reader = reader
        self.writer = writer
        self.auto_window = auto_window
        self.streams: dict[int, _Stream] = {}
        self.remote_settings: dict[int, int] = {}
        self.settings_received = asyncio.Event()
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.closed = asyncio.Event()  # the server closed the socket (or broke the protocol)
        self.protocol_error: Exception | None = None
        self.pings: list[bytes] = []
        self.conn_window = asyncio.Event()
        self._task: asyncio.Task | None = None

    @classmethod
    async def open(cls, port: int, *, host: str = "127.0.0.1", ssl_context: ssl.SSLContext
                   | None = None, server_hostname: str | None = None,
                   settings: dict[int, int] | None = None, validate: bool = True,
                   auto_window: bool = True, timeout: float = 5.0) -> H2Client:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ssl_context, server_hostname=server_hostname,
            limit=1 << 20), timeout)
        if ssl_context is not None:
            alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            assert alpn == "h2", f"ALPN selected {alpn!r}, not h2"
        client = cls(reader, writer, validate=validate, auto_window=auto_window)
        if settings:
            client.conn.local_settings = h2.settings.Settings(client=True,
                                                              initial_values=settings)
        client.conn.initiate_connection()
        client.flush()
        client._task = asyncio.ensure_future(client._read_loop())
        await asyncio.wait_for(client.settings_received.wait(), timeout)
        return client

    # -- sending -----------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        self.flush()
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def start(self, headers: Fields, end_stream: bool = True) -> int:
        """Send a HEADERS frame opening a new stream; its id."""
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = _Stream(sid)
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        self.flush()
        return sid

    async def send_data(self, sid: int, data: bytes, end_stream: bool = False,
                        timeout: float = 30.0) -> None:
        """Send ``data`` on a stream as the server's windows allow."""
        stream = self.streams[sid]
        view = memoryview(data)
        while view:
            size = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size,
                       len(view))
            if size <= 0:
                stream.window.clear()
                self.conn_window.clear()
                waits = [asyncio.ensure_future(stream.window.wait()),
                         asyncio.ensure_future(self.conn_window.wait()),
                         asyncio.ensure_future(stream.done.wait())]
                done, pending = await asyncio.wait(waits, timeout=timeout,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
                if not done:
                    raise AssertionError(f"stream {sid}: no send window for {timeout} s")
                if stream.done.is_set():
                    raise ConnectionError(f"stream {sid} ended while sending: "
                                          f"{stream.response.describe()}")
                continue
            self.conn.send_data(sid, bytes(view[:size]))
            view = view[size:]
            await self.drain()
        if end_stream:
            self.conn.end_stream(sid)
            await self.drain()

    def end(self, sid: int, trailers: Fields | None = None) -> bool:
        """End our side of a stream (with trailers); False if the stream was already closed."""
        try:
            if trailers:
                self.conn.send_headers(sid, trailers, end_stream=True)
            else:
                self.conn.end_stream(sid)
        except h2.exceptions.StreamClosedError:
            return False
        self.flush()
        return True

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(sid, code)
        self.flush()

    def open_window(self, sid: int | None = None) -> None:
        """Acknowledge what was received and held back (a slow reader reading again)."""
        for s in ([self.streams[sid]] if sid is not None else list(self.streams.values())):
            n, s.unacked = s.unacked, 0
            if n:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(n, s.response.stream_id)
        self.flush()

    # -- receiving ---------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self.reader.read(1 << 20)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self.protocol_error = exc
                    self.flush()
                    break
                for event in events:
                    self._event(event)
                self.flush()
        finally:
            self.closed.set()
            for s in self.streams.values():
                if not s.done.is_set():
                    s.response.lost = True
                    self._finish(s)

    def _finish(self, s: _Stream) -> None:
        s.head.set()
        s.done.set()
        s.window.set()
        s.chunks.put_nowait(None)

    def _event(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", 0)
        s = self.streams.get(sid) if sid else None
        if isinstance(event, h2.events.RemoteSettingsChanged):
            for code, change in event.changed_settings.items():
                self.remote_settings[int(code)] = change.new_value
            self.settings_received.set()
            self.conn_window.set()
            for st in self.streams.values():
                st.window.set()
        elif isinstance(event, (h2.events.ResponseReceived,
                                h2.events.InformationalResponseReceived)):
            if s is None:
                return
            status = dict(event.headers).get(b":status", b"")
            if isinstance(event, h2.events.InformationalResponseReceived) or (
                    status.startswith(b"1") and status != b"101"):
                s.response.informational.append(list(event.headers))
            else:
                s.response.headers = list(event.headers)
                s.head.set()
        elif isinstance(event, h2.events.DataReceived):
            if s is None:
                self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                return
            s.response.received += event.data
            if event.data:
                s.chunks.put_nowait(event.data)
            if self.auto_window:
                if event.flow_controlled_length:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
            else:
                s.unacked += event.flow_controlled_length
        elif isinstance(event, h2.events.TrailersReceived):
            if s is not None:
                s.response.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            if s is not None:
                s.response.ended = True
                self._finish(s)
        elif isinstance(event, h2.events.StreamReset):
            if s is not None:
                s.response.reset = int(event.error_code)
                self._finish(s)
        elif isinstance(event, h2.events.WindowUpdated):
            if sid and s is not None:
                s.window.set()
            elif not sid:
                self.conn_window.set()
                for st in self.streams.values():
                    st.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event
            for st in self.streams.values():
                if not st.done.is_set() and (event.last_stream_id is None
                                             or st.response.stream_id > event.last_stream_id
                                             or event.error_code != 0):
                    st.response.lost = True
                    self._finish(st)
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings.append(event.ping_data)

    async def head(self, sid: int, timeout: float = 10.0) -> H2Response:
        """Wait for the final response head (or the stream's end)."""
        await asyncio.wait_for(self.streams[sid].head.wait(), timeout)
        return self.streams[sid].response

    async def chunk(self, sid: int, timeout: float = 10.0) -> bytes | None:
        """The next body bytes as they arrive; None once the stream is over."""
        return await asyncio.wait_for(self.streams[sid].chunks.get(), timeout)

    async def response(self, sid: int, timeout: float = 20.0) -> H2Response:
        """Wait for the stream to end (END_STREAM, RST_STREAM or the connection's end)."""
        await asyncio.wait_for(self.streams[sid].done.wait(), timeout)
        return self.streams[sid].response

    async def request(self, authority: str, path: str = "/echo", method: str = "GET",
                      headers: Iterable[tuple[str | bytes, str | bytes]] = (),
                      body: bytes | None = None, scheme: str = "http",
                      timeout: float = 20.0) -> H2Response:
        hdrs = request_fields(authority, path, method, scheme, headers)
        sid = self.start(hdrs, end_stream=body is None)
        if body is not None:
            await self.send_data(sid, body, end_stream=True, timeout=timeout)
        return await self.response(sid, timeout)

    async def close(self) -> None:
        if not self.closed.is_set() and self.terminated is None:
            with contextlib.suppress(Exception):
                self.conn.close_connection()
                self.flush()
        with contextlib.suppress(Exception):
            self.writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)

    async def __aenter__(self) -> H2Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --------------------------------------------------------------------------------------------
# FrameConn: raw frames, for hostile clients
# --------------------------------------------------------------------------------------------


class FrameConn:
    """An HTTP/2 connection spoken frame by frame: whatever a test writes is sent as it is.

    ``read_frame`` parses what the server sends; SETTINGS frames are acknowledged as they are
    read (``ack_settings``), nothing else is answered.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.block = b""  # a header block still waiting for its END_HEADERS
        self.heads: dict[int, list[Fields]] = {}  # decoded header blocks per stream
        self.buffer = b""
        self.eof = False
        self.received: list[Frame] = []
        self.server_settings: dict[int, int] = {}
        self.ack_settings = True
        self.next_stream = 1

    @classmethod
    async def open(cls, port: int, settings: dict[int, int] | None = None,
                   handshake: bool = True, timeout: float = 5.0) -> FrameConn:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, limit=1 << 20), timeout)
        c = cls(reader, writer)
        frame = SettingsFrame(0, settings=settings or {})
        c.writer.write(PREFACE + frame.serialize())
        if handshake:
            first = await c.read_frame(timeout)
            assert isinstance(first, SettingsFrame), f"first frame {first!r}"
        return c

    def new_stream(self) -> int:
        sid = self.next_stream
        self.next_stream += 2
        return sid

    # -- writing -----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def send(self, *frames: Frame) -> None:
        self.write(b"".join(f.serialize() for f in frames))

    async def drain(self, timeout: float = 10.0) -> bool:
        """Wait for the write buffer to drain: True when it did, False if the server closed or
        reset the connection; raises TimeoutError when the server just stops reading."""
        try:
            await asyncio.wait_for(self.writer.drain(), timeout)
            return True
        except TimeoutError:
            raise
        except (ConnectionError, OSError):
            return False

    def header_block(self, headers: Fields) -> bytes:
        return self.encoder.encode(headers)

    def headers(self, sid: int, headers: Fields, end_stream: bool = True,
                end_headers: bool = True) -> HeadersFrame:
        f = HeadersFrame(sid, data=self.header_block(headers))
        if end_stream:
            f.flags.add("END_STREAM")
        if end_headers:
            f.flags.add("END_HEADERS")
        return f

    @staticmethod
    def continuation(sid: int, block: bytes, end_headers: bool = False) -> ContinuationFrame:
        f = ContinuationFrame(sid, data=block)
        if end_headers:
            f.flags.add("END_HEADERS")
        return f

    @staticmethod
    def data(sid: int, payload: bytes, end_stream: bool = False) -> DataFrame:
        f = DataFrame(sid, data=payload)
        if end_stream:
            f.flags.add("END_STREAM")
        return f

    @staticmethod
    def rst(sid: int, code: int = ErrorCodes.CANCEL) -> RstStreamFrame:
        return RstStreamFrame(sid, error_code=code)

    @staticmethod
    def ping(payload: bytes = b"\0" * 8) -> PingFrame:
        return PingFrame(0, opaque_data=payload)

    @staticmethod
    def settings(values: dict[int, int] | None = None) -> SettingsFrame:
        return SettingsFrame(0, settings=values or {})

    @staticmethod
    def window_update(sid: int, increment: int) -> WindowUpdateFrame:
        return WindowUpdateFrame(sid, window_increment=increment)

    # -- reading -----------------------------------------------------------------------------
    async def read_frame(self, timeout: float = 5.0) -> Frame | None:
        """The next frame from the server; None at EOF (or reset). Raises TimeoutError."""
        while True:
            if len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) >= 9 + length:
                    frame.parse_body(memoryview(self.buffer[9:9 + length]))
                    self.buffer = self.buffer[9 + length:]
                    self.received.append(frame)
                    if isinstance(frame, (HeadersFrame, ContinuationFrame)):
                        self.block += frame.data
                        if "END_HEADERS" in frame.flags:
                            block, self.block = self.block, b""
                            decoded = self.decoder.decode(block, raw=True)
                            self.heads.setdefault(frame.stream_id, []).append(decoded)
                    if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                        self.server_settings.update(frame.settings)
                        if self.ack_settings:
                            self.send(SettingsFrame(0, flags=["ACK"]))
                    return frame
            if self.eof:
                return None
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
            except (ConnectionError, OSError) as exc:
                if isinstance(exc, TimeoutError):
                    raise
                data = b""
            if not data:
                self.eof = True
                if len(self.buffer) < 9:
                    return None
            self.buffer += data

    async def until(self, predicate, timeout: float = 5.0) -> Frame | None:
        """Read until a frame satisfies ``predicate``: that frame, or None at EOF."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no matching frame within {timeout} s "
                                   f"(got {[type(f).__name__ for f in self.received[-10:]]})")
            frame = await self.read_frame(left)
            if frame is None or predicate(frame):
                return frame

    async def goaway(self, timeout: float = 5.0) -> GoAwayFrame | None:
        """The server's GOAWAY (None if the connection ended without one)."""
        frame = await self.until(lambda f: isinstance(f, GoAwayFrame), timeout)
        return frame  # type: ignore[return-value]

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout`` (frames read on the
        way are kept in ``received``)."""
        try:
            await self.until(lambda f: False, timeout)
        except TimeoutError:
            return False
        return True

    def status(self, sid: int) -> int | None:
        """The :status of the first response head received on a stream."""
        for head in self.heads.get(sid, []):
            for name, value in head:
                if name == b":status":
                    return int(value)
        return None

    def goaways(self) -> list[GoAwayFrame]:
        return [f for f in self.received if isinstance(f, GoAwayFrame)]

    def resets(self) -> dict[int, int]:
        return {f.stream_id: f.error_code for f in self.received if isinstance(f, RstStreamFrame)}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


# --------------------------------------------------------------------------------------------
# WebSocket frames (RFC 6455 5.2), to carry over an HTTP/2 stream by hand
# --------------------------------------------------------------------------------------------

WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def ws_frame(opcode: int, payload: bytes, mask: bool = True, fin: bool = True) -> bytes:
    """One WebSocket frame; a client's frames are masked (RFC 6455 5.3)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def ws_parse(buffer: bytes) -> tuple[list[tuple[int, bool, bytes]], bytes]:
    """Complete frames at the start of ``buffer`` as (opcode, masked, payload), and the rest."""
    frames = []
    while len(buffer) >= 2:
        opcode = buffer[0] & 0x0F
        masked = bool(buffer[1] & 0x80)
        n = buffer[1] & 0x7F
        pos = 2
        if n == 126:
            if len(buffer) < 4:
                break
            n = struct.unpack("!H", buffer[2:4])[0]
            pos = 4
        elif n == 127:
            if len(buffer) < 10:
                break
            n = struct.unpack("!Q", buffer[2:10])[0]
            pos = 10
        key = b""
        if masked:
            key = buffer[pos:pos + 4]
            pos += 4
        if len(buffer) < pos + n:
            break
        payload = buffer[pos:pos + n]
        if masked:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        frames.append((opcode, masked, payload))
        buffer = buffer[pos + n:]
    return frames, buffer


# --------------------------------------------------------------------------------------------
# Around the clients: a hand-written backend on a chosen port, the proxy's peak RSS
# --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_on(port: int, handler):
    """A hand-written backend on 127.0.0.1:``port`` (a port a registry record already names):
    ``handler(reader, writer)`` per connection, on the test's event loop. Each connection is
    closed when its handler returns, so none is left open for the proxy to pool and reuse
    after the test."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, reuse_address=True,
                                        limit=1 << 20)
    try:
        yield server
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


class RssPeak:
    """The peak RSS of a process (``rss`` callable, e.g. ProxyProcess.rss) while a block runs,
    sampled every 20 ms."""

    def __init__(self, rss):
        self.rss = rss
        self.baseline = rss()
        self.peak = self.baseline
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.rss())
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> RssPeak:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, self.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline
