"""Origin follows the Host mask (proxy/origin.py): the pure rule, with property-based tests that it
never makes a cross-origin request look same-origin."""

from hypothesis import assume, event, given
from hypothesis import strategies as st

from proxy.headers import scan_request_headers
from proxy.origin import client_scheme, origin_follows_mask, public_origins

HOST = b"3000-demo.example.test:8080"
MASK = b"localhost:3000"


def rewrite(headers, scheme=b"http", host=HOST, mask=MASK, private=frozenset()):
    """The forwarded header lines of `headers` after the rule (the scanner's lines if unchanged)."""
    scanned = scan_request_headers([(b"Host", host), *headers], False, private)
    out = origin_follows_mask(scanned.lines, scanned.names, scheme, host, mask)
    return scanned.lines if out is None else out


def value(lines, name):
    values = [line.split(b":", 1)[1][1:-2] for line in lines
              if line.split(b":", 1)[0].lower() == name.lower()]
    assert len(values) <= 1
    return values[0] if values else None


def test_same_origin_origin_becomes_the_mask_origin():
    lines = rewrite([(b"Origin", b"http://3000-demo.example.test:8080")])
    assert lines == [b"Origin: http://localhost:3000\r\n"]


def test_https_behind_tls_or_a_trusted_forwarded_proto():
    lines = rewrite([(b"Origin", b"https://3000-demo.example.test")], scheme=b"https",
                    host=b"3000-demo.example.test")
    assert value(lines, b"origin") == b"https://localhost:3000"
    # the scheme must match: an http page is another origin than the https one
    lines = rewrite([(b"Origin", b"http://3000-demo.example.test")], scheme=b"https",
                    host=b"3000-demo.example.test")
    assert value(lines, b"origin") == b"http://3000-demo.example.test"
    # X-Forwarded-Proto's first element is the client's hop
    lines = rewrite([(b"Origin", b"https://3000-demo.example.test")], scheme=b"HTTPS, http",
                    host=b"3000-demo.example.test")
    assert value(lines, b"origin") == b"https://localhost:3000"


def test_case_and_default_ports_do_not_matter():
    for origin, host, scheme in [
        (b"HTTP://3000-Demo.Example.TEST:8080", HOST, b"http"),
        (b"http://3000-demo.example.test:80", b"3000-demo.example.test", b"http"),
        (b"http://3000-demo.example.test", b"3000-demo.example.test:80", b"http"),
        (b"https://3000-demo.example.test:443", b"3000-demo.example.test", b"https"),
        (b"http://[::1]:8080", b"[::1]:8080", b"http"),
    ]:
        lines = rewrite([(b"Origin", origin)], scheme=scheme, host=host)
        assert value(lines, b"origin") == scheme.lower() + b"://localhost:3000", origin


def test_other_origins_pass_unchanged():
    for origin in [
        b"http://3001-demo.example.test:8080",   # another port of the same sandbox
        b"http://3000-other.example.test:8080",  # another sandbox
        b"http://3000-demo.example.test",        # the same host on another port
        b"http://3000-demo.example.test:8081",
        b"https://3000-demo.example.test:8080",  # another scheme
        b"http://evil.example:8080",
        b"null",
        b"",
        b"http://3000-demo.example.test:8080/",  # not a serialized origin
        b"http://user@3000-demo.example.test:8080",
        b"http://3000-demo.example.test:08080",
        b"http://3000-demo.example.test:8080:8080",
        b"ws://3000-demo.example.test:8080",
        b"http://3000-demo.example.test.:8080",
        b"http://localhost:3000",                # already the mask's origin: left as it came
    ]:
        lines = rewrite([(b"Origin", origin)])
        assert value(lines, b"origin") == origin, origin


def test_referer_keeps_path_and_query():
    lines = rewrite([(b"Referer", b"http://3000-demo.example.test:8080/a/b?x=1&y=%2F")])
    assert lines == [b"Referer: http://localhost:3000/a/b?x=1&y=%2F\r\n"]
    for referer, expected in [
        (b"http://3000-demo.example.test:8080", b"http://localhost:3000"),
        (b"http://3000-demo.example.test:8080?q", b"http://localhost:3000?q"),
        (b"http://3000-other.example.test:8080/a", b"http://3000-other.example.test:8080/a"),
        (b"http://user@3000-demo.example.test:8080/", b"http://user@3000-demo.example.test:8080/"),
        (b"/relative", b"/relative"),
    ]:
        assert value(rewrite([(b"Referer", referer)]), b"referer") == expected, referer


def test_both_headers_and_everything_else_untouched():
    lines = rewrite([
        (b"Accept", b"*/*"), (b"ORIGIN", b"http://3000-demo.example.test:8080"),
        (b"X-Origin", b"http://3000-demo.example.test:8080"),
        (b"referer", b"http://3000-demo.example.test:8080/page"),
        (b"Origin-Agent-Cluster", b"?1"),
    ])
    assert lines == [
        b"Accept: */*\r\n", b"ORIGIN: http://localhost:3000\r\n",
        b"X-Origin: http://3000-demo.example.test:8080\r\n",
        b"referer: http://localhost:3000/page\r\n", b"Origin-Agent-Cluster: ?1\r\n",
    ]


def test_two_origin_headers_are_left_alone():
    same = b"http://3000-demo.example.test:8080"
    lines = rewrite([(b"Origin", same), (b"Origin", same), (b"Referer", same + b"/x")])
    assert lines == [b"Origin: " + same + b"\r\n", b"Origin: " + same + b"\r\n",
                     b"Referer: http://localhost:3000/x\r\n"]
    lines = rewrite([(b"Referer", same), (b"Referer", same)])
    assert lines == [b"Referer: " + same + b"\r\n"] * 2


def test_index_shifted_by_a_filter_is_found_again():
    # Connection-named headers are filtered after the walk; the index by name is re-checked
    same = b"http://3000-demo.example.test:8080"
    lines = rewrite([(b"Connection", b"x-hop"), (b"X-Hop", b"1"), (b"Origin", same)])
    assert lines == [b"Origin: http://localhost:3000\r\n"]
    # and a Connection-named Origin is gone, not resurrected
    assert rewrite([(b"Connection", b"origin"), (b"Origin", same), (b"X", b"1")]) == [b"X: 1\r\n"]


def test_nothing_to_do_costs_nothing():
    scanned = scan_request_headers([(b"Host", HOST), (b"Accept", b"*/*")], False)
    assert origin_follows_mask(scanned.lines, scanned.names, b"http", HOST, MASK) is None
    # a Host that is not an authority, or a scheme that is not http(s): no public origin
    assert public_origins(b"http", b"a@b") is None
    assert public_origins(b"http", b"h:99999") is None
    assert public_origins(b"http", b"[::1") is None
    assert client_scheme(b"gopher") is None
    assert public_origins(b"https", b"H:443") == (b"https://h:443", b"https://h")


# -- properties -------------------------------------------------------------------------------

HOSTS = st.sampled_from([b"3000-demo.example.test", b"3000-demo.localhost", b"127.0.0.1",
                         b"[::1]", b"3000-demo.example.test."])
PORTS = st.sampled_from([None, 80, 443, 3000, 8080, 65535])
SCHEMES = st.sampled_from([b"http", b"https"])


def authority(host: bytes, port: int | None) -> bytes:
    return host if port is None else host + b":" + str(port).encode()


def recase(data, value: bytes) -> bytes:
    flips = data.draw(st.lists(st.booleans(), min_size=len(value), max_size=len(value)))
    return bytes(c ^ 32 if flip and 97 <= (c | 32) <= 122 else c for c, flip in zip(value, flips))


def same_origin(value: bytes, scheme: bytes, host: bytes) -> bool:
    """Independent oracle: `value` is one spelling of the public origin (scheme, host)."""
    default = {b"http": 80, b"https": 443}[scheme]
    name, _, port = host.rpartition(b":") if not host.endswith(b"]") else (host, b"", b"")
    if not name or (b":" in name and not name.startswith(b"[")):
        name, port = host, b""
    number = int(port) if port else default
    spellings = {scheme + b"://" + name + b":" + str(number).encode()}
    if number == default:
        spellings.add(scheme + b"://" + name)
    return value.lower() in {s.lower() for s in spellings}


ORIGIN_LIKE = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.builds(lambda s, sep, h, p: s + sep + authority(h, p),
              st.sampled_from([b"http", b"https", b"HTTP", b"ws", b"", b"http:"]),
              st.sampled_from([b"://", b"//", b":///"]), HOSTS, PORTS),
    st.builds(lambda s, h, junk: s + b"://" + h + junk, SCHEMES, HOSTS,
              st.sampled_from([b"/", b"@x", b":", b":0", b":080", b" ", b"#", b"?", b".",
                               b":80:80"])),
)


@given(st.data(), SCHEMES, HOSTS, PORTS, ORIGIN_LIKE)
def test_never_turns_another_origin_into_the_mask_origin(data, scheme, host, port, origin):
    public_host = authority(host, port)
    origin = data.draw(st.sampled_from([origin, recase(data, scheme + b"://" + public_host)]))
    assume(origin == origin.strip(b" \t"))
    lines = rewrite([(b"Origin", origin)], scheme=scheme, host=public_host)
    after = value(lines, b"origin")
    event(f"same origin: {same_origin(origin, scheme, public_host)}")
    if same_origin(origin, scheme, public_host):
        assert after == scheme + b"://" + MASK
    else:
        assert after == origin  # unchanged, byte for byte


@given(st.data(), SCHEMES, HOSTS, PORTS, ORIGIN_LIKE,
       st.sampled_from([b"", b"/", b"/a/b?c=d", b"?q", b"/p#f"]))
def test_referer_rewritten_exactly_when_its_origin_is_the_public_one(data, scheme, host, port,
                                                                     origin, rest):
    public_host = authority(host, port)
    origin = data.draw(st.sampled_from([origin, recase(data, scheme + b"://" + public_host)]))
    # `origin` is the whole authority: what follows it is `rest`
    assume(not any(c in origin.partition(b"://")[2] for c in b"/?#"))
    referer = origin + rest
    assume(referer == referer.strip(b" \t"))
    after = value(rewrite([(b"Referer", referer)], scheme=scheme, host=public_host), b"referer")
    event(f"same origin: {same_origin(origin, scheme, public_host)}")
    if same_origin(origin, scheme, public_host):
        assert after == scheme + b"://" + MASK + rest
    else:
        assert after == referer


@given(st.lists(st.tuples(st.sampled_from([b"Origin", b"Referer", b"X-A", b"Cookie", b"origin"]),
                          st.sampled_from([b"http://3000-demo.example.test:8080", b"null",
                                           b"http://3000-demo.example.test:8080/p", b"x"])),
                max_size=6))
def test_only_origin_and_referer_lines_ever_change(headers):
    before = scan_request_headers([(b"Host", HOST), *headers], False).lines
    after = rewrite(headers)
    assert len(after) == len(before)
    for old, new in zip(before, after):
        if old != new:
            assert old.split(b":", 1)[0].lower() in (b"origin", b"referer")
            assert b"localhost:3000" in new
