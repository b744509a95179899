"""Header rewriting: the pure functions that turn a client's request head into the backend's, and
the backend's response head into the client's. No I/O; bytes in, bytes out.

The rule for what a backend may receive (and, mirrored, what a client may receive) lives here:
- the head is *built* by the proxy, never copied: request line, `Host`, forwarding headers and
  message framing (`Content-Length` or `Transfer-Encoding: chunked`, exactly one, RFC 9112 6) are
  written from what the proxy parsed and validated, so nothing the peer sent can alter them;
- the peer's other fields are copied, minus the hop-by-hop ones: the fixed list of RFC 9110 7.6.1
  *and* every field the `Connection` header names. Framing, `Host` and forwarding fields are never
  among the copied lines, so a `Connection` option naming them cannot remove what frames the
  message (the smuggling class of `Connection: Content-Length`);
- fields that claim facts about the client are dropped from untrusted peers, under any spelling
  that a backend framework could map onto them (`X_Forwarded_For`: CGI-style servers turn `_` into
  `-`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

# RFC 9110 7.6.1 plus the de-facto ones (Keep-Alive, Proxy-Connection).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Headers that claim facts about the client. From an untrusted peer they are dropped and the
# proxy writes its own; from a trusted proxy they are kept (X-Forwarded-For is appended to).
FORWARDING = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"x-forwarded-server", b"x-forwarded-scheme", b"x-forwarded-ssl", b"x-forwarded-prefix",
    b"forwarded", b"x-real-ip", b"x-client-ip", b"true-client-ip", b"client-ip",
    b"cf-connecting-ip", b"fastly-client-ip", b"x-cluster-client-ip", b"x-original-forwarded-for",
    b"x-proxyuser-ip", b"front-end-https",
})
# Fields the proxy writes itself on every forwarded head (RFC 9112 6.1-6.3 framing, RFC 9110 7.2
# Host): never copied from the peer.
WRITTEN_BY_PROXY = frozenset({b"host", b"content-length", b"transfer-encoding"})
_SPECIAL = HOP_BY_HOP | FORWARDING | WRITTEN_BY_PROXY
_CONNECTION_OPTIONS_WITHOUT_HEADERS = frozenset({b"close", b"keep-alive", b"upgrade"})


# RFC 9110 5.6.2 tchar: what a method (and a field name) may be made of
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                   b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# a request target as a request line can carry it: no controls, no whitespace (RFC 9112 3.2)
_TARGET_BYTES = frozenset(range(0x21, 0x7F)) | frozenset(range(0x80, 0x100))


def request_line_valid(method: bytes, target: bytes) -> bool:
    """Whether `method` and `target` can be written into an HTTP/1.1 request line as they are.

    llhttp enforces this for HTTP/1.1 clients; HTTP/2 carries them as field values (which only
    exclude CR, LF and NUL), so a space or a control byte there would re-split the line the
    backend parses (RFC 9113 8.3.1 makes such a request malformed)."""
    return (bool(method) and _TCHAR.issuperset(method)
            and bool(target) and _TARGET_BYTES.issuperset(target))


class MalformedHeaders(ValueError):
    """The head cannot be forwarded safely (answered with 400 and a closed connection)."""


class UnsupportedTransferCoding(MalformedHeaders):
    """A request transfer coding other than chunked (answered with 501, RFC 9112 6.1)."""


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
    # the lower-case name of each line as scanned (before Connection options removed any):
    # proxy/origin.py finds Origin and Referer by it at C speed, so the walk costs nothing more
    names: Sequence[bytes] = ()


def _named_by_connection(values: list[bytes]) -> frozenset[bytes]:
    names = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token and token not in _CONNECTION_OPTIONS_WITHOUT_HEADERS:
                names.add(token)
    return frozenset(names)


def is_chunked_request_coding(value: bytes) -> bool:
    """The only request Transfer-Encoding accepted: `chunked` alone (RFC 9112 6.1, 7.1).

    Strictly narrower than what llhttp frames as chunked (it allows trailing spaces, not tabs), so
    the proxy never forwards a head whose body the parser then refuses."""
    return value.rstrip(b" ").lower() == b"chunked"


def scan_request_headers(headers: Iterable[tuple[bytes, bytes]], trusted: bool,
                         private: frozenset[bytes] = frozenset()) -> RequestHeaders:
    """Split a request's headers into what is forwarded and what the proxy decides itself.

    Raises MalformedHeaders for a head that must not be forwarded at all. X-Forwarded-For/-Proto/
    -Host are never copied as they are: forwarding_lines() rebuilds them. The other forwarding
    headers pass only from a `trusted` peer; `private` names (lower case, e.g. the traffic access
    token header) never pass, under any spelling.
    """
    host = xff = xfp = xfh = None
    lines: list[bytes] = []
    names: list[bytes] = []
    connection: list[bytes] = []
    trailers = content_length = chunked = False
    length = -1
    for name, value in headers:
        lname = name.lower()
        if lname in _SPECIAL:
            if lname in HOP_BY_HOP:
                if lname == b"connection":
                    connection.append(value)
                elif lname == b"transfer-encoding":
                    if chunked:
                        raise MalformedHeaders("more than one Transfer-Encoding")
                    if not is_chunked_request_coding(value):
                        raise UnsupportedTransferCoding("unsupported Transfer-Encoding")
                    chunked = True
                elif lname == b"te":
                    trailers = trailers or b"trailers" in value.lower()
                continue
            if lname == b"host":
                if host is not None:
                    raise MalformedHeaders("more than one Host header")
                host = value
                continue
            if lname == b"content-length":
                if content_length:
                    raise MalformedHeaders("more than one Content-Length")
                content_length = True
                length = int(value)
                continue
            # a forwarding header
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
        elif lname in private:
            continue
        elif b"_" in lname:
            alias = lname.replace(b"_", b"-")
            if alias in _SPECIAL or alias in private:
                continue  # a spelling a backend may read as the real field
        names.append(lname)
        lines.append(name + b": " + value + b"\r\n")
    if chunked and content_length:
        raise MalformedHeaders("both Content-Length and Transfer-Encoding")  # RFC 9112 6.3
    if connection:
        drop = _named_by_connection(connection)
        if drop:
            lines = [line for lname, line in zip(names, lines) if lname not in drop]
    return RequestHeaders(host, lines, xff, xfp, xfh, trailers, content_length, chunked, length,
                          names)


def cookie_value(cookie_header: bytes | None, name: bytes) -> bytes | None:
    """The value of cookie `name` in a Cookie header (RFC 6265 5.4 form), or None."""
    if not cookie_header:
        return None
    for pair in cookie_header.split(b";"):
        key, eq, value = pair.strip().partition(b"=")
        if eq and key == name:
            return value.strip().strip(b'"')
    return None


def without_cookie(lines: list[bytes], names: tuple[bytes, ...]) -> list[bytes]:
    """Header lines with the cookies `names` removed from every Cookie header (dropped when
    empty)."""
    out = []
    for line in lines:
        if line[:7].lower() != b"cookie:":
            out.append(line)
            continue
        pairs = [p.strip() for p in line[7:-2].split(b";")]
        # names compared in any case: a backend that reads cookie names case-insensitively
        # must not find the credential under another spelling either
        kept = [p for p in pairs if p and p.partition(b"=")[0].strip().lower() not in names]
        if kept:
            out.append(b"Cookie: " + b"; ".join(kept) + b"\r\n")
    return out


def build_request_head(method: bytes, target: bytes, host: bytes, scanned: RequestHeaders,
                       forwarding: bytes, *, upgrade: bytes | None) -> bytes:
    """The head sent to the backend, built from a request `scan_request_headers` accepted.

    `forwarding` holds the X-Forwarded-* lines already made. The framing is the one the proxy
    parsed and will relay: chunked, or the Content-Length it counts the body by, or none (RFC 9112
    6.3: a request without either has no body). Never both, never a copied value.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    parts += scanned.lines
    parts.append(forwarding)
    if scanned.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif scanned.content_length:
        parts.append(b"Content-Length: %d\r\n" % scanned.length)
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
        xff = (client_ip if scanned.forwarded_for is None
               else scanned.forwarded_for + b", " + client_ip)
        return (b"X-Forwarded-For: " + xff + b"\r\nX-Forwarded-Proto: "
                + (scanned.forwarded_proto or proto) + b"\r\nX-Forwarded-Host: "
                + (scanned.forwarded_host or host) + b"\r\n")
    return (b"X-Forwarded-For: " + client_ip + b"\r\nX-Forwarded-Proto: " + proto
            + b"\r\nX-Forwarded-Host: " + host + b"\r\n")


class ResponseHeaders(NamedTuple):
    lines: list[bytes]  # forwardable lines; framing is written by the relay (see response_framing)
    content_length: bool
    chunked: bool       # the last transfer coding is chunked (RFC 9112 6.3 item 4)
    codings: bytes      # transfer codings applied before chunked (b"gzip"), b"" for none
    upgrade: bytes | None
    event_stream: bool  # Content-Type: text/event-stream (Server-Sent Events)
    length: int         # Content-Length (llhttp has checked it), -1 without one
    connect_stream: bool  # Content-Type: application/connect+... (Connect streaming RPC)


def response_transfer_codings(values: list[bytes]) -> tuple[bytes, bool]:
    """(codings before chunked, whether chunked is the final coding) for Transfer-Encoding values.

    Chunked is final exactly when llhttp frames the body as chunked: the last comma-separated
    token of the last field, spaces trimmed, is `chunked` (tests/unit/test_headers.py checks the two
    agree). Raises MalformedHeaders when chunked appears anywhere but last: such a body (RFC 9112
    6.3 item 4, read until close) cannot be re-framed for the client without applying chunked
    twice, which RFC 9112 7 forbids.
    """
    tokens = [t.strip(b" \t").lower() for value in values for t in value.split(b",")]
    tokens = [t for t in tokens if t]
    chunked = bool(values) and values[-1].split(b",")[-1].strip(b" ").lower() == b"chunked"
    codings = tokens[:-1] if chunked else tokens
    if b"chunked" in codings:
        raise MalformedHeaders("chunked is not the final transfer coding")
    return b", ".join(codings), chunked


def isolate_cookie(value: bytes, own_host: bytes) -> bytes:
    """A Set-Cookie value whose Domain attribute is removed unless it names `own_host` itself.

    Without a Domain attribute a cookie is host-only (RFC 6265 5.3 step 6), so a sandbox cannot
    plant cookies for its siblings under the shared parent domain (cookie tossing). The last
    Domain attribute is the one a user agent applies (RFC 6265 5.3 step 4); every one that does not
    name the request's own host is removed.
    """
    parts = value.split(b";")
    kept = [parts[0]]
    changed = False
    for attribute in parts[1:]:
        name, _, domain = attribute.partition(b"=")
        if (name.strip().lower() == b"domain"
                and domain.strip().lstrip(b".").lower() != own_host):
            changed = True
            continue
        kept.append(attribute)
    return b";".join(kept) if changed else value


def host_without_port(host: bytes) -> bytes:
    """A Host value as a cookie domain compares with it: lower case, no port, no final dot."""
    host = host.strip(b" \t").lower()
    if host.startswith(b"["):
        return host[:host.find(b"]") + 1]
    name, colon, _ = host.rpartition(b":")
    return (name if colon else host).rstrip(b".")


def scan_response_headers(headers: Iterable[tuple[bytes, bytes]],
                          request_host: bytes | None = None) -> ResponseHeaders:
    """Forwardable response header lines plus the framing facts the proxy needs.

    Content-Length and Transfer-Encoding are never among the lines: the relay writes the framing
    it uses towards the client. With `request_host` (the Host the client sent), Set-Cookie Domain
    attributes naming anything but that host are removed (see isolate_cookie).
    """
    own_host = None
    lines: list[bytes] = []
    names: list[bytes] = []
    connection: list[bytes] = []
    codings: list[bytes] = []
    content_length = event_stream = connect_stream = False
    upgrade = None
    length = -1
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                connection.append(value)
            elif lname == b"transfer-encoding":
                codings.append(value)
            elif lname == b"upgrade":
                upgrade = value
            continue
        if lname == b"content-length":
            content_length = True
            length = int(value)
            continue
        if lname == b"content-type":
            kind = value[:20].lower()
            event_stream = kind[:17] == b"text/event-stream"
            connect_stream = kind == b"application/connect+"
        elif lname == b"set-cookie" and request_host is not None:
            if own_host is None:
                own_host = host_without_port(request_host)
            value = isolate_cookie(value, own_host)
        names.append(lname)
        lines.append(name + b": " + value + b"\r\n")
    if connection:
        drop = _named_by_connection(connection)
        if drop:
            lines = [line for lname, line in zip(names, lines) if lname not in drop]
    coding_list, chunked = response_transfer_codings(codings) if codings else (b"", False)
    return ResponseHeaders(lines, content_length, chunked, coding_list, upgrade, event_stream,
                           length, connect_stream)


# Fields that RFC 9110 6.5.1 says a trailer must not carry (framing, routing, request modifiers,
# authentication, response control, content handling): a recipient may apply trailer fields as
# if they were header fields, so these never pass in a trailer section either way.
NOT_IN_TRAILERS = _SPECIAL | frozenset({
    b"authorization", b"cookie", b"set-cookie", b"www-authenticate", b"authentication-info",
    b"expect", b"max-forwards", b"range", b"if-match", b"if-none-match", b"if-modified-since",
    b"if-unmodified-since", b"if-range", b"cache-control", b"age", b"expires", b"date",
    b"location", b"retry-after", b"vary", b"content-encoding", b"content-type", b"content-range",
})


def _trailer_allowed(lname: bytes, private: frozenset[bytes]) -> bool:
    lname = lname.replace(b"_", b"-")
    return lname not in NOT_IN_TRAILERS and lname not in private


def trailer_lines(trailers: list[tuple[bytes, bytes]],
                  private: frozenset[bytes] = frozenset()) -> bytes:
    """Chunked trailer section, ending the message: fields a trailer may not carry (NOT_IN_TRAILERS)
    and `private` ones are dropped, under any spelling."""
    return b"".join(name + b": " + value + b"\r\n" for name, value in trailers
                    if _trailer_allowed(name.lower(), private))


def trailer_fields(trailers: Iterable[tuple[bytes, bytes]],
                   private: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """The same filter as trailer_lines, as HTTP/2 fields (lower-case names)."""
    kept = []
    for name, value in trailers:
        lname = name.lower()
        if _trailer_allowed(lname, private):
            kept.append((lname, value))
    return kept


def fields_of_lines(lines: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    """Header lines (b"Name: value\\r\\n", as the scans produce them) as HTTP/2 fields: lower-case
    names (RFC 9113 8.2.1)."""
    fields = []
    for line in lines:
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(b" \t\r\n")))
    return fields
