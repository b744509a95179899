"""HTTP/2 exchange: an `Exchange` (proxy/exchange.py) whose client is an HTTP/2 stream.

Routing, admission, the backend connection and the accounting are the HTTP/1.1 exchange's own
code; what differs is written here: the response half goes out as HTTP/2 frames through the
stream (proxy/h2_stream.py) instead of HTTP/1.1 bytes (fields from the same response scan, the
body as DATA, a chunked backend's trailers as trailers, a backend's 101 to an RFC 8441 extended
CONNECT as the stream's 200), the proxy's own answers are HTTP/2 responses (trailers-only gRPC
responses for gRPC calls), and a native gRPC request goes to the sandbox over h2c
(proxy/grpc_upstream.py) instead of the HTTP/1.1 pool.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING

from proxy import errors
from proxy.connect_rpc import EnvelopeTracker, end_stream_unavailable
from proxy.exchange import (
    _RESPONSE_FROM,
    BODY,
    CHUNKED,
    LENGTH,
    NO_BODY,
    RECEIVED,
    STREAMING,
    TUNNEL,
    UNTIL_CLOSE,
    WAITING,
    Exchange,
)
from proxy.headers import (
    MalformedHeaders,
    fields_of_lines,
    scan_response_headers,
    trailer_fields,
)
from proxy.http1 import FramingError, response_framing

if TYPE_CHECKING:
    from proxy.grpc_call import GrpcCall
    from proxy.h2_stream import H2Stream
    from proxy.upstream import UpstreamConnection

Fields = list[tuple[bytes, bytes]]


class H2Exchange(Exchange):
    """An exchange whose client is an HTTP/2 stream: the response goes out as frames."""

    __slots__ = ("grpc", "call")
    conn: H2Stream

    def __init__(self, stream: H2Stream) -> None:
        super().__init__(stream)
        self.http = "h2"
        self.grpc = False
        self.call: GrpcCall | None = None  # the call to the sandbox (proxy/grpc_upstream.py)

    # the request goes to the sandbox over h2c when it is native gRPC
    def connect(self, fresh: bool) -> None:
        if self.grpc:
            from proxy.grpc_upstream import start_call
            start_call(self)
            return
        super().connect(fresh)

    def request_body(self, body: bytes) -> None:
        call = self.call
        if call is not None:
            if self.request == BODY:
                self.bytes_in += len(body)
                call.request_data(body)
            return
        super().request_body(body)

    def request_complete(self) -> None:
        super().request_complete()
        call = self.call
        if call is not None:
            call.request_ended(self.trailers)

    def client_lost(self) -> None:
        call = self.call
        if call is not None:
            call.cancel()
        super().client_lost()

    # -- the response (ResponseDestination), as frames ----------
    def response_head(self, up: UpstreamConnection, status: int) -> None:
        stream = self.conn
        try:
            scanned = scan_response_headers(
                up.headers, self.host if self.conn.ctx.isolate_cookies else None)
            if status >= 200 and status != 101:
                if scanned.codings:
                    raise FramingError("a transfer coding HTTP/2 cannot carry")
                self.backend, self.body, _ = response_framing(self.method, status, scanned, True)
        except (MalformedHeaders, FramingError, ValueError) as exc:
            self.response_invalid(up, str(exc))
            return
        fields = fields_of_lines(scanned.lines)
        if status < 200 and status != 101:
            stream.send_head(status, fields)  # interim (100, 103): relayed
            up.head_seen = False
            return
        up.deadline = 0.0
        self.status = status
        if status == 101:
            if self.upgrade is None or scanned.upgrade is None:
                self.upstream_lost(up)
                up.close()
                return
            self._response_to(STREAMING)
            # RFC 8441 5: the stream's 200 is the backend's 101; the accept key is HTTP/1.1's
            stream.send_head(200, [f for f in fields if f[0] != b"sec-websocket-accept"])
            self.record_response(101, "websocket")
            return
        if self.upgrade is not None and status < 300:
            # a 2xx would tell the client its WebSocket is open (RFC 8441 5): it is not
            self.response_invalid(up, "upgrade request answered without switching protocols")
            return
        if not _RESPONSE_FROM[STREAMING] >> self.response & 1:
            self._illegal_response(STREAMING)
        self.response = STREAMING
        self.upstream_reusable = self.upgrade is None and up.parser.should_keep_alive()
        if self.body == LENGTH:
            up.body_left = scanned.length
        if scanned.content_length and (self.body == LENGTH or (self.body == NO_BODY
                                       and status != 204)):
            fields.append((b"content-length", b"%d" % scanned.length))
        if scanned.connect_stream and self.backend == CHUNKED:
            self.envelopes = EnvelopeTracker()
        self.record_response(status, "sse" if scanned.event_stream else "http")
        if self.body == NO_BODY:
            stream.send_head(status, fields, end=True)
            if self.method == b"HEAD":
                up.skip_response_body()
            self.response_complete(up)
            return
        stream.send_head(status, fields)

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.envelopes is not None:
            self.envelopes.feed(data)
        self.conn.send_body(data)

    def response_complete(self, up: UpstreamConnection) -> None:
        if self.response != STREAMING or self.status == 101:
            return
        if self.body != NO_BODY:
            self.conn.send_end(trailer_fields(up.trailers) if up.trailers else None)
        self.unbind(up, reuse=self.upstream_reusable and self.request == RECEIVED)
        self.response_finished()

    def response_cut(self) -> None:
        stream = self.conn
        if self.backend == UNTIL_CLOSE:
            stream.send_end()
            stream.flush_out()
            self.response_finished()
        elif self.envelopes is not None and self.envelopes.at_boundary:
            self.outcome = "upstream_closed"
            if not self.envelopes.ended:
                stream.send_body(end_stream_unavailable("The sandbox closed the connection"))
            stream.send_end()
            stream.flush_out()
            self.response_finished()
        else:
            self.outcome = "upstream_closed"
            self.end()
            stream.abort_response(hard=True)

    def upstream_upgraded(self, up: UpstreamConnection, rest: bytes) -> None:
        if self.upstream is not up or self.status != 101:
            up.close()
            return
        self._response_to(TUNNEL)
        self.started = monotonic()
        self.conn.start_tunnel(self, up, rest)

    # -- answers the proxy makes itself ----------
    def answer(self, error: errors.ProxyError) -> None:
        stream = self.conn
        status = error.status
        head_only = self.method == b"HEAD"
        self.outcome = type(error).__name__
        self.record_response(204 if self.preflight(error) else status, "http", "proxy")
        if self.preflight(error):
            stream.send_head(204, [(n.lower(), v) for n, v in errors.preflight_fields(
                self.header(b"access-control-request-headers"))], end=True)
        elif self.grpc and status >= 400:
            stream.send_head(200, grpc_error_fields(error), end=True)
        else:
            content_type, body = errors.error_body(error, html_page=self.wants_html())
            fields = [(b"content-type", content_type),
                      (b"content-length", b"%d" % len(body)),
                      (b"access-control-allow-origin", b"*"),
                      (b"cache-control", b"no-store")]
            fields += fields_of_lines(error.headers)
            stream.send_head(status, fields, end=head_only)
            if not head_only:
                stream.send_body(body)
                stream.send_end()
        stream.flush_out()
        if self.response == WAITING:
            self.response_finished()


# gRPC status codes for the proxy's own answers (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)
_GRPC_STATUS = {400: 3, 401: 16, 403: 7, 404: 5, 409: 9, 429: 8, 431: 8, 502: 14, 503: 14,
                504: 4}


def grpc_error_fields(error: errors.ProxyError) -> Fields:
    """A trailers-only gRPC response carrying the proxy's error (HTTP 200, grpc-status)."""
    status = _GRPC_STATUS.get(error.status, 14 if error.status >= 500 else 2)
    message = error.message.encode("utf-8")
    return [(b"content-type", b"application/grpc"),
            (b"grpc-status", b"%d" % status),
            (b"grpc-message", _percent_encode(message))]


def _percent_encode(text: bytes) -> bytes:
    """grpc-message encoding: printable ASCII but '%' as is, the rest %XX."""
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c
                    for c in text)
