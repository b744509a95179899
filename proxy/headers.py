"""Header rewriting: the pure functions that turn a client's request head into the backend's, and
the backend's response head into the client's. No I/O; bytes in, bytes out.

Order follows RFC 9110/9112 as a proxy must apply it: strip hop-by-hop headers (the fixed list of
RFC 9110 7.6.1 *and* every header the Connection header names), then add the forwarding headers
(X-Forwarded-For/-Proto/-Host), then re-add the framing the proxy itself chose.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

# RFC 9110 7.6.1 plus the de-facto ones (Keep-Alive, Proxy-Connection).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Headers that claim facts about the client. From an untrusted peer they are dropped and the
# proxy writes its own; from a trusted proxy they are kept (X-Forwarded-For is appended to).
FORWARDING = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"forwarded", b"x-real-ip",
})
_CONNECTION_OPTIONS_WITHOUT_HEADERS = frozenset({b"close", b"keep-alive", b"upgrade"})


class MalformedHeaders(ValueError):
    """The head cannot be forwarded safely (answered with 400 and a closed connection)."""


class RequestHeaders(NamedTuple):
    host: bytes | None       # the single Host value (None if absent)
    lines: list[bytes]       # forwardable header lines, each b"Name: value\r\n"
    forwarded_for: bytes | None
    forwarded_proto: bytes | None
    forwarded_host: bytes | None
    trailers_accepted: bool  # the client sent TE: trailers
    content_length: bool     # a Content-Length header is present
    chunked: bool            # Transfer-Encoding: chunked (the only transfer coding accepted)
    length: int              # its value (llhttp has checked it), -1 without one


def _named_by_connection(values: list[bytes]) -> frozenset[bytes]:
    names = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token and token not in _CONNECTION_OPTIONS_WITHOUT_HEADERS:
                names.add(token)
    return frozenset(names)


def scan_request_headers(headers: Iterable[tuple[bytes, bytes]], trusted: bool,
                         private: frozenset[bytes] = frozenset()) -> RequestHeaders:
    """Split a request's headers into what is forwarded and what the proxy decides itself.

    X-Forwarded-For/-Proto/-Host are never copied as they are: forwarding_lines() rebuilds them.
    The other forwarding headers pass only from a `trusted` peer; `private` names (lower case,
    e.g. the traffic access token header) never pass.
    """
    host = xff = xfp = xfh = None
    lines: list[bytes] = []
    names: list[bytes] = []
    connection: list[bytes] = []
    trailers = content_length = chunked = False
    length = -1
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                connection.append(value)
            elif lname == b"transfer-encoding":
                if value.strip().lower() != b"chunked" or chunked:
                    raise MalformedHeaders("unsupported Transfer-Encoding")
                chunked = True
            elif lname == b"te":
                trailers = trailers or b"trailers" in value.lower()
            continue
        if lname == b"host":
            if host is not None:
                raise MalformedHeaders("more than one Host header")
            host = value
            continue
        if lname in FORWARDING:
            if lname == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
                continue
            if lname == b"x-forwarded-proto":
                xfp = value
                continue
            if lname == b"x-forwarded-host":
                xfh = value
                continue
            if not trusted:
                continue
        elif lname == b"content-length":
            content_length = True
            length = int(value)
        elif lname in private:
            continue
        names.append(lname)
        lines.append(name + b": " + value + b"\r\n")
    if connection:
        drop = _named_by_connection(connection)
        if drop:
            lines = [line for lname, line in zip(names, lines) if lname not in drop]
    return RequestHeaders(host, lines, xff, xfp, xfh, trailers, content_length, chunked, length)


def cookie_value(cookie_header: bytes | None, name: bytes) -> bytes | None:
    """The value of cookie `name` in a Cookie header (RFC 6265 5.4 form), or None."""
    if not cookie_header:
        return None
    for pair in cookie_header.split(b";"):
        key, eq, value = pair.strip().partition(b"=")
        if eq and key == name:
            return value.strip().strip(b'"')
    return None


def without_cookie(lines: list[bytes], name: bytes) -> list[bytes]:
    """Header lines with cookie `name` removed from every Cookie header (dropped when empty)."""
    out = []
    for line in lines:
        if line[:7].lower() != b"cookie:":
            out.append(line)
            continue
        pairs = [p.strip() for p in line[7:-2].split(b";")]
        kept = [p for p in pairs if p and p.partition(b"=")[0] != name]
        if kept:
            out.append(b"Cookie: " + b"; ".join(kept) + b"\r\n")
    return out


def build_request_head(method: bytes, target: bytes, host: bytes, scanned: RequestHeaders,
                       forwarding: bytes, *, chunked: bool, upgrade: bytes | None) -> bytes:
    """The head sent to the backend. `forwarding` holds the X-Forwarded-* lines already made."""
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    parts += scanned.lines
    parts.append(forwarding)
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    # The client's TE is hop-by-hop; "trailers" is re-sent because the proxy relays trailers to
    # the client (RFC 9110 10.1.4), with the TE connection option that must accompany it.
    if upgrade is not None:
        parts.append(b"Connection: TE, Upgrade\r\nTE: trailers\r\nUpgrade: " + upgrade + b"\r\n"
                     if scanned.trailers_accepted else
                     b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n")
    elif scanned.trailers_accepted:
        parts.append(b"Connection: TE\r\nTE: trailers\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def forwarding_lines(scanned: RequestHeaders, client_ip: bytes, proto: bytes, host: bytes,
                     trusted: bool) -> bytes:
    """X-Forwarded-For/-Proto/-Host lines: appended to a trusted peer's, replacing anyone else's."""
    if trusted:
        xff = client_ip if scanned.forwarded_for is None else scanned.forwarded_for + b", " + client_ip
        return (b"X-Forwarded-For: " + xff + b"\r\nX-Forwarded-Proto: "
                + (scanned.forwarded_proto or proto) + b"\r\nX-Forwarded-Host: "
                + (scanned.forwarded_host or host) + b"\r\n")
    return (b"X-Forwarded-For: " + client_ip + b"\r\nX-Forwarded-Proto: " + proto
            + b"\r\nX-Forwarded-Host: " + host + b"\r\n")


class ResponseHeaders(NamedTuple):
    lines: list[bytes]
    content_length: bool
    chunked: bool
    upgrade: bytes | None
    event_stream: bool  # Content-Type: text/event-stream (Server-Sent Events)
    length: int         # Content-Length (llhttp has checked it), -1 without one


def scan_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> ResponseHeaders:
    """Forwardable response header lines plus the framing facts the proxy needs."""
    lines: list[bytes] = []
    names: list[bytes] = []
    connection: list[bytes] = []
    content_length = chunked = event_stream = False
    upgrade = None
    length = -1
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                connection.append(value)
            elif lname == b"transfer-encoding":
                chunked = chunked or value.strip().lower().endswith(b"chunked")
            elif lname == b"upgrade":
                upgrade = value
            continue
        if lname == b"content-length":
            content_length = True
            length = int(value)
        elif lname == b"content-type":
            event_stream = value[:17].lower() == b"text/event-stream"
        names.append(lname)
        lines.append(name + b": " + value + b"\r\n")
    if connection:
        drop = _named_by_connection(connection)
        if drop:
            lines = [line for lname, line in zip(names, lines) if lname not in drop]
    return ResponseHeaders(lines, content_length, chunked, upgrade, event_stream, length)


def trailer_lines(trailers: list[tuple[bytes, bytes]]) -> bytes:
    """Chunked trailer section (forwardable fields only), ending the message."""
    kept = [name + b": " + value + b"\r\n" for name, value in trailers
            if name.lower() not in HOP_BY_HOP and name.lower() != b"content-length"]
    return b"".join(kept)
