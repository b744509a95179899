"""Header rewriting as pure functions: hop-by-hop removal, forwarding headers, framing."""

from hypothesis import given
from hypothesis import strategies as st

from proxy.headers import (
    HOP_BY_HOP,
    build_request_head,
    forwarding_lines,
    scan_request_headers,
    scan_response_headers,
    trailer_lines,
)


def request_head(headers, trusted=False, client_ip=b"10.1.2.3", upgrade=None, host=None):
    scanned = scan_request_headers(headers, trusted)
    original = scanned.host
    fwd = forwarding_lines(scanned, client_ip, b"http", original, trusted)
    return build_request_head(b"GET", b"/a/../b//c?x=%2F&y", host or original, scanned, fwd,
                              upgrade=upgrade)


def test_hop_by_hop_and_connection_named_headers_are_removed():
    head = request_head([
        (b"Host", b"3000-demo.localhost"), (b"Connection", b"keep-alive, X-Secret, Foo"),
        (b"Keep-Alive", b"timeout=5"), (b"X-Secret", b"s"), (b"Foo", b"f"),
        (b"Proxy-Authorization", b"Basic x"), (b"TE", b"gzip"), (b"Upgrade", b"h2c"),
        (b"Proxy-Connection", b"keep-alive"), (b"Trailer", b"X"), (b"X-Kept", b"yes"),
    ])
    text = head.decode()
    assert text.startswith("GET /a/../b//c?x=%2F&y HTTP/1.1\r\nHost: 3000-demo.localhost\r\n")
    for gone in ("Connection", "Keep-Alive", "X-Secret", "Foo:", "Proxy-Authorization", "TE:",
                 "Upgrade", "Proxy-Connection", "Trailer"):
        assert gone not in text
    assert "X-Kept: yes\r\n" in text
    assert text.endswith("\r\n\r\n")


def test_untrusted_forwarding_headers_are_replaced():
    text = request_head([
        (b"Host", b"3000-demo.localhost"), (b"X-Forwarded-For", b"6.6.6.6"),
        (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"evil"),
        (b"Forwarded", b"for=6.6.6.6"), (b"X-Real-IP", b"6.6.6.6"),
    ]).decode()
    assert "6.6.6.6" not in text and "evil" not in text and "https" not in text
    assert "X-Forwarded-For: 10.1.2.3\r\n" in text
    assert "X-Forwarded-Proto: http\r\n" in text
    assert "X-Forwarded-Host: 3000-demo.localhost\r\n" in text


def test_trusted_forwarding_headers_are_appended_to():
    text = request_head([
        (b"Host", b"3000-demo.localhost"), (b"X-Forwarded-For", b"1.1.1.1"),
        (b"X-Forwarded-For", b"2.2.2.2"), (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"3000-demo.example.app"), (b"X-Real-IP", b"1.1.1.1"),
    ], trusted=True).decode()
    assert "X-Forwarded-For: 1.1.1.1, 2.2.2.2, 10.1.2.3\r\n" in text
    assert "X-Forwarded-Proto: https\r\n" in text
    assert "X-Forwarded-Host: 3000-demo.example.app\r\n" in text
    assert "X-Real-IP: 1.1.1.1\r\n" in text


def test_mask_replaces_host_and_keeps_original_in_forwarded_host():
    text = request_head([(b"Host", b"3000-demo.localhost:8080")], host=b"localhost:3000").decode()
    assert "\r\nHost: localhost:3000\r\n" in text
    assert "X-Forwarded-Host: 3000-demo.localhost:8080\r\n" in text


def test_upgrade_is_forwarded_explicitly():
    text = request_head([(b"Host", b"h"), (b"Connection", b"Upgrade"),
                         (b"Upgrade", b"websocket")], upgrade=b"websocket").decode()
    assert text.count("Upgrade") == 2
    assert "Connection: Upgrade\r\nUpgrade: websocket\r\n" in text


def test_te_trailers_is_kept_and_chunked_is_the_only_transfer_coding():
    scanned = scan_request_headers([(b"Host", b"h"), (b"TE", b"trailers"),
                                    (b"Transfer-Encoding", b"chunked")], False)
    assert scanned.trailers_accepted and scanned.chunked
    import pytest

    from proxy.headers import MalformedHeaders
    for value in (b"gzip, chunked", b"identity", b"chunked, chunked"):
        with pytest.raises(MalformedHeaders):
            scan_request_headers([(b"Host", b"h"), (b"Transfer-Encoding", value)], False)
    with pytest.raises(MalformedHeaders):
        scan_request_headers([(b"Host", b"a"), (b"Host", b"b")], False)


def test_response_framing_facts():
    scanned = scan_response_headers([
        (b"Content-Type", b"text/plain"), (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"close, X-Drop"), (b"X-Drop", b"1"), (b"Keep-Alive", b"t=1"),
    ])
    assert scanned.chunked and not scanned.content_length
    assert scanned.lines == [b"Content-Type: text/plain\r\n"]
    scanned = scan_response_headers([(b"Content-Length", b"13"), (b"Upgrade", b"websocket")])
    assert scanned.content_length and scanned.length == 13 and scanned.upgrade == b"websocket"
    assert scanned.lines == []  # framing is written by the relay, never copied


def test_trailers_drop_hop_by_hop_fields():
    assert trailer_lines([(b"X-Checksum", b"abc"), (b"Connection", b"close"),
                          (b"Content-Length", b"1")]) == b"X-Checksum: abc\r\n"


token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)
# Host and Transfer-Encoding have their own rules (one Host; only "chunked"), tested above.
field_name = token.filter(lambda n: n not in (b"host", b"transfer-encoding"))


@given(st.lists(st.tuples(field_name, token), max_size=12), st.lists(token, max_size=4))
def test_no_hop_by_hop_or_named_header_survives(headers, named):
    headers = [(b"Host", b"h")] + headers
    if named:
        headers.append((b"Connection", b", ".join(named)))
    scanned = scan_request_headers(headers, False)
    kept = {line.split(b":", 1)[0].lower() for line in scanned.lines}
    assert not kept & HOP_BY_HOP
    assert not kept & ({n.lower() for n in named} - {b"close", b"keep-alive", b"upgrade"})
    assert b"host" not in kept


# -- the forwarding rule (issue 10): what a backend may receive ----------------------------------

import httptools  # noqa: E402
import pytest  # noqa: E402

from proxy.headers import (  # noqa: E402
    FORWARDING,
    MalformedHeaders,
    host_without_port,
    is_chunked_request_coding,
    isolate_cookie,
    response_transfer_codings,
)
from proxy.host import host_chars_valid  # noqa: E402


class _Recorder:
    """Collects what llhttp makes of a message: the head's fields (as it hands them to the
    proxy's callbacks) and the body it frames."""

    def __init__(self):
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = 0

    def on_header(self, name, value):
        self.headers.append((name.lower(), value))

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        self.complete += 1


def _llhttp(message: bytes, response: bool = False) -> _Recorder:
    recorder = _Recorder()
    parser = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(recorder)
    parser.feed_data(message)
    return recorder


special_name = st.sampled_from([
    b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Transfer-Encoding", b"Host",
    b"X-Forwarded-For", b"X_Forwarded_For", b"x-client-ip", b"True-Client-IP", b"Forwarded",
    b"X-Real-IP", b"Connection", b"Upgrade", b"Keep-Alive", b"TE", b"Trailer", b"Cookie",
    b"E2b-Traffic-Access-Token", b"e2b_traffic_access_token", b"X-Kept", b"Content_Length",
])
connection_option = st.sampled_from([
    b"content-length", b"Content-Length", b"transfer-encoding", b"host", b"x-forwarded-for",
    b"close", b"keep-alive", b"upgrade", b"x-kept", b"cookie", b"te",
])


@given(st.lists(st.tuples(special_name, token), max_size=8),
       st.lists(connection_option, max_size=4), st.booleans(),
       st.sampled_from([None, 0, 5, 95]), st.booleans())
def test_backend_head_is_built_not_copied(headers, named, chunked, length, trusted):
    """Whatever the client's fields and Connection options: the head has exactly the proxy's
    Host, framing and forwarding fields, and llhttp reads back exactly the framing scanned."""
    fields = [(b"Host", b"3000-demo.localhost")]
    fields += [(n, v) for n, v in headers
               if n.lower() not in (b"host", b"content-length", b"transfer-encoding")]
    if named:
        fields.append((b"Connection", b", ".join(named)))
    if chunked:
        fields.append((b"Transfer-Encoding", b"chunked"))
    elif length is not None:
        fields.append((b"Content-Length", str(length).encode()))
    private = frozenset({b"e2b-traffic-access-token"})
    scanned = scan_request_headers(fields, trusted, private)
    head = build_request_head(b"POST", b"/p", b"localhost:3000", scanned,
                              forwarding_lines(scanned, b"10.0.0.9", b"http",
                                               b"3000-demo.localhost", trusted), upgrade=None)
    body = b"hello" if chunked else b"x" * (length or 0)
    message = head + (b"5\r\nhello\r\n0\r\n\r\n" if chunked else body)
    parsed = _llhttp(message)
    names = [n for n, _ in parsed.headers]
    assert parsed.complete == 1
    assert names.count(b"host") == 1 and dict(parsed.headers)[b"host"] == b"localhost:3000"
    if chunked:
        assert names.count(b"transfer-encoding") == 1 and b"content-length" not in names
        assert parsed.body == body
    elif length is not None:
        assert names.count(b"content-length") == 1 and b"transfer-encoding" not in names
        assert dict(parsed.headers)[b"content-length"] == str(length).encode()
        assert parsed.body == body
    else:
        assert b"content-length" not in names and b"transfer-encoding" not in names
    assert names.count(b"x-forwarded-for") == 1
    for name in names:
        assert b"_" not in name or name.replace(b"_", b"-") not in (
            FORWARDING | HOP_BY_HOP | private | {b"host", b"content-length"})
        assert name not in private
        if not trusted:
            assert name not in FORWARDING - {b"x-forwarded-for", b"x-forwarded-proto",
                                             b"x-forwarded-host"}
    if b"x-kept" in [n.lower() for n in named]:
        assert b"x-kept" not in names


def test_connection_naming_framing_cannot_unframe_a_request():
    scanned = scan_request_headers([(b"Host", b"h"), (b"Connection", b"Content-Length, Host"),
                                    (b"Content-Length", b"95")], False)
    head = build_request_head(b"POST", b"/", b"h", scanned, b"", upgrade=None)
    assert b"\r\nContent-Length: 95\r\n" in head and head.count(b"Host:") == 1


@pytest.mark.parametrize("fields", [
    [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")],
    [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
    [(b"Content-Length", b"5"), (b"Content-Length", b"5")],
])
def test_conflicting_framing_is_refused(fields):
    with pytest.raises(MalformedHeaders):
        scan_request_headers([(b"Host", b"h")] + fields, False)


# Transfer-Encoding values as hostile clients and backends write them.
coding_value = st.lists(
    st.sampled_from([b"chunked", b"Chunked", b"gzip", b"identity", b"xchunked", b"chunked\t",
                     b"chunked ", b" chunked", b"\tchunked", b"chunked\x0b", b"", b"deflate",
                     b"chunkedx", b"chunked\xa0"]),
    min_size=1, max_size=3).map(lambda parts: b",".join(parts) if len(parts) % 2
                                else b", ".join(parts))


@given(st.lists(coding_value, min_size=1, max_size=2))
def test_response_chunked_decision_agrees_with_llhttp(values):
    """The relay frames the client's copy by what llhttp did with the backend's: they must agree
    on whether the body is chunked, or the client would get a re-framed body of the wrong shape."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"Transfer-Encoding: " + v + b"\r\n"
                                             for v in values) + b"\r\n"
    try:
        parsed = _llhttp(head + b"5\r\nhello\r\n0\r\n\r\n", response=True)
    except httptools.HttpParserError:
        return  # llhttp refuses it: the exchange ends as a 502, whatever the scan says
    llhttp_chunked = parsed.complete == 1 and parsed.body == b"hello"
    try:
        _, chunked = response_transfer_codings([v for _, v in parsed.headers])
    except MalformedHeaders:
        return  # refused as a 502 (chunked applied twice, or not last): stricter is allowed
    assert chunked == llhttp_chunked


@given(coding_value)
def test_request_chunked_is_narrower_than_llhttp(value):
    """A request Transfer-Encoding the scan accepts is one llhttp frames as chunked: the proxy
    never forwards a head whose body the parser then refuses."""
    message = (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " + value
               + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    recorder = _Recorder()
    try:
        httptools.HttpRequestParser(recorder).feed_data(message)
    except httptools.HttpParserError:
        pass
    seen = [v for n, v in recorder.headers if n == b"transfer-encoding"]
    if not seen or not is_chunked_request_coding(seen[0]):
        return  # refused by the scan (501) before anything is forwarded
    assert recorder.body == b"hello" and recorder.complete == 1


def test_response_codings_before_chunked_are_kept():
    assert response_transfer_codings([b"gzip, chunked"]) == (b"gzip", True)
    assert response_transfer_codings([b"gzip"]) == (b"gzip", False)
    with pytest.raises(MalformedHeaders):
        response_transfer_codings([b"chunked, gzip"])


cookie_domain = st.sampled_from([b"localhost", b".localhost", b"LOCALHOST", b"example.app",
                                 b"3000-other.localhost", b"3000-demo.localhost",
                                 b".3000-demo.localhost", b"3000-DEMO.localhost", b""])


@given(st.lists(cookie_domain, max_size=3), st.booleans())
def test_isolated_cookie_keeps_only_its_own_host(domains, secure):
    value = b"a=1" + b"".join(b"; Domain=" + d for d in domains) + (b"; Secure" if secure else b"")
    out = isolate_cookie(value, b"3000-demo.localhost")
    assert out.startswith(b"a=1")
    assert (b"; Secure" in out) == secure
    for attribute in out.split(b";")[1:]:
        name, _, domain = attribute.partition(b"=")
        if name.strip().lower() == b"domain":
            assert domain.strip().lstrip(b".").lower() == b"3000-demo.localhost"


def test_isolation_uses_the_host_the_client_sent():
    assert host_without_port(b"3000-Demo.LOCALHOST:8080") == b"3000-demo.localhost"
    assert host_without_port(b"[::1]:80") == b"[::1]"
    scanned = scan_response_headers([(b"Set-Cookie", b"s=1; Domain=localhost; Path=/")],
                                    b"3000-demo.localhost:8080")
    assert scanned.lines == [b"Set-Cookie: s=1; Path=/\r\n"]
    scanned = scan_response_headers([(b"Set-Cookie", b"s=1; Domain=localhost")], None)
    assert scanned.lines == [b"Set-Cookie: s=1; Domain=localhost\r\n"]


@given(st.binary(max_size=24))
def test_host_characters_are_ascii_dns_only(raw):
    if host_chars_valid(raw):
        assert all(c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[] \t"
                   for c in raw)
    assert not host_chars_valid(b"3000-abc.localhost\xa0")


def test_request_trailers_carry_nothing_the_proxy_decides():
    assert trailer_lines([(b"X-Checksum", b"1"), (b"X-Forwarded-For", b"6.6.6.6"),
                          (b"X_Forwarded_For", b"6.6.6.6"), (b"Host", b"evil"),
                          (b"E2b-Traffic-Access-Token", b"t")],
                         frozenset({b"e2b-traffic-access-token"})) == b"X-Checksum: 1\r\n"
