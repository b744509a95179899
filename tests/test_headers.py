"""Header rewriting as pure functions: hop-by-hop removal, forwarding headers, framing."""

from hypothesis import given, strategies as st

from proxy.headers import (HOP_BY_HOP, build_request_head, forwarding_lines,
                           scan_request_headers, scan_response_headers, trailer_lines)


def request_head(headers, trusted=False, client_ip=b"10.1.2.3", upgrade=None, host=None):
    scanned = scan_request_headers(headers, trusted)
    original = scanned.host
    fwd = forwarding_lines(scanned, client_ip, b"http", original, trusted)
    return build_request_head(b"GET", b"/a/../b//c?x=%2F&y", host or original, scanned, fwd,
                              chunked=scanned.chunked, upgrade=upgrade)


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
    assert scanned.content_length and scanned.upgrade == b"websocket"
    assert scanned.lines == [b"Content-Length: 13\r\n"]


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
