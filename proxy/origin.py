"""Origin follows the Host mask: what a browser sent as a same-origin request stays one for a
backend that sees a masked Host.

Servers guard WebSockets and state-changing requests by comparing `Origin` (or `Referer`) with
`Host`: Tornado's and Jupyter Server's `check_origin`, Streamlit's WebSocket, Django's CSRF check.
When the proxy rewrites Host to a record's mask (`localhost:3000`) but forwards the browser's
`Origin: https://3000-<id>.example.app` as it came, every same-origin request looks cross-origin
to them, and they refuse it.

The rule, on origins as RFC 6454 defines them (scheme, host, port; scheme and host compared
without case, a missing port meaning the scheme's default):

- the request's *public origin* is the scheme the client used (`https` behind TLS or a trusted
  `X-Forwarded-Proto`) with the Host it sent, port included;
- an `Origin` equal to the public origin becomes `<scheme>://<mask>`;
- a `Referer` whose origin equals the public origin gets the same replacement; the rest of it
  (path and query) is kept;
- nothing else changes: another sandbox, another site, `null`, a value that is not a serialized
  origin, or a request carrying two `Origin` (or two `Referer`) headers pass as they came.

Why it is safe: exactly one origin, the request's own, is mapped, and it is mapped onto the origin
the backend believes is its own. A request the browser marked cross-origin keeps its `Origin`, so
the backend still sees it cross-origin; the rule never turns a cross-origin request into a
same-origin one. Pure functions, bytes in and bytes out; proxy/exchange.py calls
`origin_follows_mask` while it builds the backend's head.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_AUTHORITY_ENDS = (b"", b"/", b"?", b"#")  # RFC 3986 3.2: what may follow an authority
_ORIGIN = b"origin:"
_REFERER = b"referer:"


def _host_port(authority: bytes, scheme: bytes) -> tuple[bytes, int] | None:
    """(host in lower case, port) of `host[:port]`, the scheme's port when none is given; None
    for anything that is not a plain authority (userinfo, empty host, bad or 0-led port)."""
    if authority[:1] == b"[":  # IPv6 literal
        end = authority.find(b"]")
        if end < 0:
            return None
        host, rest = authority[:end + 1], authority[end + 1:]
        if rest[:1] not in (b"", b":"):
            return None
        colon, port = rest[:1], rest[1:]
    else:
        host, colon, port = authority.partition(b":")
    if not host or b"@" in host or b"/" in host:
        return None
    if not colon:
        return host.lower(), _DEFAULT_PORTS[scheme]
    if not (0 < len(port) <= 5 and port.isdigit()) or (port[0] == 48 and len(port) > 1):
        return None  # 48: "0"; browsers never send leading zeros, and neither should anyone
    number = int(port)
    return (host.lower(), number) if number <= 65535 else None


def client_scheme(proto: bytes) -> bytes | None:
    """`http` or `https`: the proxy's own scheme, or a trusted X-Forwarded-Proto (whose first
    element names the client's hop); None for anything else."""
    if proto in _DEFAULT_PORTS:
        return proto
    scheme = proto.split(b",", 1)[0].strip().lower()
    return scheme if scheme in _DEFAULT_PORTS else None


@lru_cache(maxsize=4096)  # a few public hosts take nearly all requests; a hit costs ~0.1 µs
def public_origins(scheme: bytes, host: bytes) -> tuple[bytes, ...] | None:
    """The spellings of the origin a request was sent to, lower case: `scheme://host:port`, and
    `scheme://host` as well when the port is the scheme's default. `scheme` is client_scheme's;
    `host` the Host the client sent. None if `host` is not a plain authority."""
    key = _host_port(host.strip(), scheme)
    if key is None:
        return None
    name, port = key
    bare = scheme + b"://" + name
    with_port = bare + b":%d" % port
    return (with_port, bare) if port == _DEFAULT_PORTS[scheme] else (with_port,)


def _after_origin(value: bytes, spellings: tuple[bytes, ...]) -> bytes | None:
    """What follows the origin in `value` (b"" for a bare origin, else its path, query...) when
    `value` starts with one of `spellings` (case aside) and the authority ends there; else None."""
    for spelling in spellings:
        n = len(spelling)
        if value[:n].lower() == spelling and value[n:n + 1] in _AUTHORITY_ENDS:
            return value[n:]
    return None


def _line_index(lines: list[bytes], names: Sequence[bytes], name: bytes, prefix: bytes) -> int:
    """The index in `lines` of the one `name` line (`prefix` is `name:`); -1 if there is none or
    more than one. `names` are the scanner's, parallel to `lines` unless a filter (Connection
    options, a removed cookie) has dropped lines since: then the lines are searched."""
    if names.count(name) != 1:  # C speed; the usual answer for a request without one
        return -1
    at = names.index(name)
    if at < len(lines) and lines[at][:len(prefix)].lower() == prefix:
        return at
    found = [i for i, line in enumerate(lines) if line[:len(prefix)].lower() == prefix]
    return found[0] if len(found) == 1 else -1


def origin_follows_mask(lines: list[bytes], names: Sequence[bytes], scheme: bytes, host: bytes,
                        mask: bytes) -> list[bytes] | None:
    """Header `lines` (each `Name: value\\r\\n`) with a same-origin Origin and Referer rewritten to
    the mask's origin; None when nothing changes.

    `names` are the lower-case names scan_request_headers saw. `scheme` and `host` make the public
    origin (public_origins); `mask` is the Host the backend sees, with ${PORT} already expanded.
    """
    origin_at = _line_index(lines, names, b"origin", _ORIGIN)
    referer_at = _line_index(lines, names, b"referer", _REFERER)
    if origin_at < 0 and referer_at < 0:
        return None
    used = client_scheme(scheme)
    public = public_origins(used, host) if used is not None else None
    if used is None or public is None:
        return None
    masked = used + b"://" + mask
    out = None
    for i, prefix, whole in ((origin_at, _ORIGIN, True), (referer_at, _REFERER, False)):
        if i < 0:
            continue
        line = lines[i]
        colon = len(prefix) - 1
        rest = _after_origin(line[colon + 1:-2].strip(b" \t"), public)
        if rest is None or (whole and rest):  # an Origin is a bare scheme://host[:port]
            continue
        if out is None:
            out = list(lines)
        out[i] = line[:colon] + b": " + masked + rest + b"\r\n"
    return out
