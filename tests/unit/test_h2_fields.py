"""The pure parts of HTTP/2 and gRPC forwarding: how header lines become HTTP/2 fields, what a
gRPC backend is sent, and how the proxy's own errors read to a gRPC client."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy import errors
from proxy.grpc_call import request_fields
from proxy.h2_exchange import _percent_encode, grpc_error_fields
from proxy.headers import (
    HOP_BY_HOP,
    build_request_head,
    fields_of_lines,
    forwarding_lines,
    scan_request_headers,
    trailer_fields,
    trailer_lines,
)

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                min_size=1, max_size=12)
VALUE = st.text(alphabet="".join(chr(c) for c in range(0x21, 0x7F)), max_size=20)


@given(st.lists(st.tuples(TOKEN, VALUE), max_size=8))
def test_fields_of_lines_reads_back_what_lines_hold(pairs):
    """Every scanned line becomes one field with a lower-case name and the same value."""
    lines = [f"{n}: {v}\r\n".encode() for n, v in pairs]
    assert fields_of_lines(lines) == [(n.lower().encode(), v.encode()) for n, v in pairs]


@given(st.lists(st.tuples(TOKEN, VALUE), max_size=8))
def test_trailer_fields_keep_what_trailer_lines_keep(pairs):
    """The HTTP/2 trailer filter and the HTTP/1.1 one agree on every field."""
    raw = [(n.encode(), v.encode()) for n, v in pairs]
    kept = trailer_fields(raw, frozenset({b"e2b-traffic-access-token"}))
    lines = trailer_lines(raw, frozenset({b"e2b-traffic-access-token"}))
    assert fields_of_lines(lines.splitlines(keepends=True)) == kept


def test_grpc_request_fields_come_from_the_admitted_head():
    """A gRPC backend sees the head the HTTP/1.1 path would build: Host as :authority,
    forwarding written by the proxy, connection-specific fields never, te: trailers."""
    headers = [(b"host", b"50051-abc.localhost"), (b"content-type", b"application/grpc"),
               (b"te", b"trailers"), (b"x-forwarded-for", b"6.6.6.6"),
               (b"e2b-traffic-access-token", b"secret"), (b"grpc-timeout", b"5S"),
               (b"transfer-encoding", b"chunked")]
    scanned = scan_request_headers(headers, trusted=False,
                                   private=frozenset({b"e2b-traffic-access-token"}))
    head = build_request_head(b"POST", b"/pkg.Svc/Call", b"localhost:50051", scanned,
                              forwarding_lines(scanned, b"10.1.2.3", b"http",
                                               b"50051-abc.localhost", False), upgrade=None)
    fields = request_fields(b"POST", b"/pkg.Svc/Call", head)
    assert fields[:4] == [(b":method", b"POST"), (b":scheme", b"http"),
                          (b":path", b"/pkg.Svc/Call"), (b":authority", b"localhost:50051")]
    names = [n for n, _ in fields]
    assert not set(names) & (HOP_BY_HOP - {b"te"})
    assert b"host" not in names and b"e2b-traffic-access-token" not in names
    assert names.count(b"te") == 1 and (b"te", b"trailers") in fields
    assert (b"x-forwarded-for", b"10.1.2.3") in fields
    assert (b"grpc-timeout", b"5S") in fields
    assert all(n == n.lower() for n in names)


def test_proxy_errors_read_as_grpc_statuses():
    """The proxy's answers map onto the gRPC codes clients act on (UNAVAILABLE is retried)."""
    cases = [(errors.SandboxNotFound("x"), b"14"), (errors.PortNotOpen("x", 1), b"14"),
             (errors.AccessDenied.missing("x", "h"), b"7"), (errors.SandboxBusy("x", 1), b"8"),
             (errors.SandboxPaused("x"), b"9"), (errors.UpstreamTimeout("x", 1), b"4"),
             (errors.BadRequest("bad"), b"3")]
    for error, code in cases:
        fields = dict(grpc_error_fields(error))
        assert fields[b"grpc-status"] == code, error
        assert fields[b"content-type"] == b"application/grpc"


@given(st.binary(max_size=40))
def test_grpc_message_is_percent_encoded(text):
    """grpc-message carries only printable ASCII; '%' and everything else is %XX, reversibly."""
    encoded = _percent_encode(text)
    assert all(0x20 <= c <= 0x7E for c in encoded)
    import urllib.parse
    assert urllib.parse.unquote_to_bytes(encoded) == text
