"""HTTP/2 connection lifecycle, end to end: the real `sandbox-proxy` process, real sockets, raw
HTTP/2 frames (tests/support/h2_client.py's FrameConn: the `h2` library's own client state
machine goes CLOSED on any GOAWAY it receives, python-hyper/h2#1181, so it could neither open a
stream after the proxy's GOAWAY nor keep reading after sending its own).

What these tests hold the proxy to:
- shutting down (SIGTERM) an HTTP/2 connection gets a graceful GOAWAY (NO_ERROR) naming the
  stream under way, that stream is answered in full, a stream opened after the GOAWAY is refused
  with REFUSED_STREAM (never reaches the sandbox), then the connection closes and the process
  exits 0 (proxy/h2_edge.py: drain, announce_goaway, request_received; proxy/server.py: drain);
- a PROXY protocol header in front of an HTTP/2 connection (prior-knowledge h2c, or TLS with ALPN
  h2) gives the streams its source address: that is the X-Forwarded-For the sandbox sees, and a
  client-written X-Forwarded-For from an untrusted peer is dropped (proxy/listener.py);
- a client's own graceful GOAWAY (NO_ERROR) does not cut the response it is still reading: the
  stream is finished, then the connection closes (proxy/h2_connection.py, proxy/h2_edge.py).

The sandbox behind the drain and GOAWAY tests is a hand-written HTTP/1.1 backend whose answer
the test releases, so the ordering (GOAWAY before the answer) is fixed by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import Callable

import pytest
import trustme
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, Frame, HeadersFrame, PingFrame, SettingsFrame

from support.backends import det_bytes
from support.h2_client import (
    PREFACE,
    TLS_DOMAIN,
    FrameConn,
    GoAwayFrame,
    RstStreamFrame,
    request_fields,
    serve_on,
    tls_client_context,
    write_tls_cert,
)
from support.process import ProxyProcess, free_port, standard_registry, wait_until
from support.raw_http import header_value, header_values

pytestmark = pytest.mark.timeout(90)

PROXY_V1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n"
PROXIED_CLIENT = "203.0.113.7"
FORGED_XFF = "198.51.100.66"  # what a client writes itself; not from a trusted proxy: dropped
BODY = det_bytes(40_000, seed=11)  # under the 65,535-byte default windows: no WINDOW_UPDATE needed
SPLIT = 10_000  # bytes sent before the backend waits for the test's release


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class HeldBackend:
    """A hand-written HTTP/1.1 sandbox that answers each request with 200 and ``BODY``, holding
    back part of the answer until ``release`` is set: all of it (``head_first=False``: the
    stream has no response yet), or all but the head and the first ``SPLIT`` body bytes
    (``head_first=True``: the response is mid-body). ``heads`` keeps every request head it read;
    ``arrived`` is set once the first request's head is read (and its early part written)."""

    def __init__(self, head_first: bool):
        self.head_first = head_first
        self.heads: list[bytes] = []
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY
        early = response[:len(response) - len(BODY) + SPLIT] if self.head_first else b""
        if early:
            writer.write(early)
            await writer.drain()
        self.arrived.set()
        await asyncio.wait_for(self.release.wait(), 30)
        writer.write(response[len(early):])
        await writer.drain()


def held_registry(backend_port: int, refused_port: int, held_port: int) -> dict:
    reg = standard_registry(backend_port, refused_port)
    reg["held"] = {"host": "127.0.0.1", "ports": {3000: held_port}}
    return reg


def stream_over(sid: int) -> Callable[[Frame], bool]:
    """A frame that ends stream ``sid``: END_STREAM on its HEADERS or DATA, or RST_STREAM."""
    def over(frame: Frame) -> bool:
        if frame.stream_id != sid:
            return False
        if isinstance(frame, RstStreamFrame):
            return True
        return isinstance(frame, (HeadersFrame, DataFrame)) and "END_STREAM" in frame.flags
    return over


def body_of(f: FrameConn, sid: int) -> bytes:
    return b"".join(fr.data for fr in f.received
                    if isinstance(fr, DataFrame) and fr.stream_id == sid)


def describe(f: FrameConn) -> str:
    return ", ".join(f"{type(fr).__name__}(sid={fr.stream_id}, flags={sorted(fr.flags)})"
                     for fr in f.received[-20:])


async def exit_code(p: ProxyProcess, timeout: float) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, p.proc.wait, timeout)


async def proxied_frame_conn(port: int, header: bytes, ca: trustme.CA | None = None,
                             server_hostname: str | None = None) -> FrameConn:
    """An HTTP/2 connection that starts with a PROXY protocol ``header``: on a plain listener
    the header, the client preface and SETTINGS go out in one write (h2c by prior knowledge);
    with ``ca`` the header goes first on the bare socket, then TLS, which must select h2 by
    ALPN. Returns once the server's SETTINGS are read (and acknowledged)."""
    settings = SettingsFrame(0).serialize()
    if ca is None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, limit=1 << 20), 5)
        f = FrameConn(reader, writer)
        f.write(header + PREFACE + settings)
    else:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(header)
        sock.setblocking(False)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            sock=sock, ssl=tls_client_context(ca, ["h2", "http/1.1"]),
            server_hostname=server_hostname, limit=1 << 20), 5)
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        assert alpn == "h2", f"ALPN selected {alpn!r} after the PROXY header, not h2"
        f = FrameConn(reader, writer)
        f.write(PREFACE + settings)
    first = await f.read_frame(5)
    assert isinstance(first, SettingsFrame), f"first frame from the proxy: {first!r}"
    return f


# --------------------------------------------------------------------------------------------
# 1. SIGTERM: graceful drain of an HTTP/2 connection
# --------------------------------------------------------------------------------------------


async def test_sigterm_drains_h2_connection(proxy, backend, refused_port):
    """On SIGTERM an HTTP/2 connection with a stream under way is drained, not cut: after
    drain_delay the client gets GOAWAY NO_ERROR whose last_stream_id covers that stream; a
    stream opened after the GOAWAY is refused with RST_STREAM REFUSED_STREAM and never reaches
    the sandbox; the stream under way is then answered in full (200, every body byte,
    END_STREAM); the proxy closes the connection and exits with status 0."""
    held_port = free_port()
    held = HeldBackend(head_first=False)
    async with serve_on(held_port, held.handler):
        p = proxy(sandboxes=held_registry(backend.port, refused_port, held_port),
                  config={"server": {"drain_delay": 0.5, "drain_timeout": 15.0}})
        authority = p.host("held")
        f = await FrameConn.open(p.port)
        try:
            s1 = f.new_stream()
            f.send(f.headers(s1, request_fields(authority, "/in-flight")))
            await asyncio.wait_for(held.arrived.wait(), 10)  # the sandbox has the request

            p.proc.send_signal(signal.SIGTERM)
            g = await f.goaway(timeout=15)
            assert g is not None, f"connection ended without a GOAWAY: {describe(f)}"
            assert g.error_code == ErrorCodes.NO_ERROR, ErrorCodes(g.error_code)
            assert g.last_stream_id >= s1, (
                f"GOAWAY last_stream_id {g.last_stream_id} does not cover stream {s1}")
            assert f.status(s1) is None and not f.resets(), describe(f)  # still under way

            s3 = f.new_stream()
            f.send(f.headers(s3, request_fields(authority, "/after-goaway")))
            try:
                end3 = await f.until(stream_over(s3), timeout=10)
            except TimeoutError:
                pytest.fail(f"stream {s3}, opened after GOAWAY, was neither refused nor "
                            f"answered; the sandbox got {len(held.heads)} requests")
            assert isinstance(end3, RstStreamFrame), (
                f"stream {s3}, opened after GOAWAY: {end3!r}; frames: {describe(f)}")
            assert end3.error_code == ErrorCodes.REFUSED_STREAM, ErrorCodes(end3.error_code)
            assert f.status(s3) is None

            held.release.set()
            end1 = await f.until(stream_over(s1), timeout=10)
            assert end1 is not None and not isinstance(end1, RstStreamFrame), (
                f"in-flight stream {s1} not completed: {end1!r}; frames: {describe(f)}")
            assert f.status(s1) == 200
            assert body_of(f, s1) == BODY
            assert await f.closed(timeout=15), "the proxy kept the drained connection open"
        finally:
            await f.aclose()
        code = await exit_code(p, 20)
    assert code == 0, p.stderr()
    assert len(held.heads) == 1 and b"/in-flight" in held.heads[0], held.heads


# --------------------------------------------------------------------------------------------
# 2. PROXY protocol in front of HTTP/2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls-alpn-h2"])
async def test_proxy_protocol_source_reaches_h2_streams(proxy, tmp_path, tls):
    """With `proxy_protocol = true` and a `trusted_proxies` list that includes neither the test
    client nor the PROXY source, an HTTP/2 connection (prior-knowledge h2c sent in the same write
    as the PROXY v1 header, or TLS negotiating h2 by ALPN after it) is served: the stream gets
    200 over HTTP/2, and the sandbox sees X-Forwarded-For equal to the PROXY header's source
    address, exactly once (the client's own X-Forwarded-For is dropped), and the scheme of the
    connection in X-Forwarded-Proto. The access log records that address for an `h2` request."""
    config: dict = {"server": {"proxy_protocol": True, "trusted_proxies": ["192.0.2.0/24"]}}
    ca = None
    domain = "localhost"
    if tls:
        ca = trustme.CA()
        cert_path, key_path = write_tls_cert(ca, tmp_path)
        config["server"]["tls"] = {"cert": str(cert_path), "key": str(key_path)}
        domain = TLS_DOMAIN
    p = proxy(config=config)
    authority = p.host("demo", domain=domain)
    f = await proxied_frame_conn(p.port, PROXY_V1, ca, server_hostname=authority)
    try:
        sid = f.new_stream()
        f.send(f.headers(sid, request_fields(
            authority, "/echo/proxied", scheme="https" if tls else "http",
            extra=[("x-forwarded-for", FORGED_XFF)])))
        end = await f.until(stream_over(sid), timeout=10)
        assert end is not None and not isinstance(end, RstStreamFrame), (
            f"stream {sid} not completed: {end!r}; frames: {describe(f)}")
        assert f.status(sid) == 200, describe(f)
        echo = json.loads(body_of(f, sid))
    finally:
        await f.aclose()
    assert echo["raw_path"] == "/echo/proxied"
    assert header_values(echo, "X-Forwarded-For") == [PROXIED_CLIENT], echo["headers"]
    assert header_value(echo, "X-Forwarded-Proto") == ("https" if tls else "http")

    def logged() -> list[dict]:
        return [json.loads(line) for line in p.stdout().splitlines() if line.startswith("{")]

    async def has_line() -> bool:
        return any(line.get("path") == "/echo/proxied" for line in logged())
    await wait_until(has_line, timeout=5)
    [line] = [line for line in logged() if line.get("path") == "/echo/proxied"]
    assert line["client_ip"] == PROXIED_CLIENT and line["http"] == "h2", line


# --------------------------------------------------------------------------------------------
# 3. The client's graceful GOAWAY
# --------------------------------------------------------------------------------------------


async def test_client_goaway_no_error_lets_response_finish(proxy, backend, refused_port):
    """A client that sends GOAWAY NO_ERROR while a response is mid-body still gets the rest of
    it: the proxy keeps the stream going (no RST_STREAM, no GOAWAY with an error), delivers every
    body byte with END_STREAM and a 200 head, and closes the connection once that stream is
    done. The backend sends its second part only after the proxy has processed the GOAWAY (a
    PING sent behind the GOAWAY has been acknowledged)."""
    held_port = free_port()
    held = HeldBackend(head_first=True)
    async with serve_on(held_port, held.handler):
        p = proxy(sandboxes=held_registry(backend.port, refused_port, held_port))
        f = await FrameConn.open(p.port)
        try:
            sid = f.new_stream()
            f.send(f.headers(sid, request_fields(p.host("held"), "/mid-body")))
            await asyncio.wait_for(held.arrived.wait(), 10)
            first = await f.until(lambda fr: isinstance(fr, DataFrame) and fr.stream_id == sid,
                                  timeout=10)
            assert first is not None and f.status(sid) == 200, describe(f)

            f.send(GoAwayFrame(0, last_stream_id=0, error_code=ErrorCodes.NO_ERROR),
                   f.ping(b"after-ga"))
            ack = await f.until(lambda fr: isinstance(fr, PingFrame) and "ACK" in fr.flags,
                                timeout=10)
            assert ack is not None and ack.opaque_data == b"after-ga", (
                f"connection ended after the client's GOAWAY: {describe(f)}")
            assert not f.resets() and not f.goaways(), describe(f)

            held.release.set()
            end = await f.until(stream_over(sid), timeout=10)
            assert end is not None and not isinstance(end, RstStreamFrame), (
                f"stream {sid} not completed after the client's GOAWAY: {end!r}; "
                f"frames: {describe(f)}")
            assert body_of(f, sid) == BODY
            assert await f.closed(timeout=10), "connection left open after its last stream"
            assert all(g.error_code == ErrorCodes.NO_ERROR for g in f.goaways()), f.goaways()
        finally:
            await f.aclose()
    assert p.alive()
