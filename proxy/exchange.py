"""Exchange: one request/response pair as the client connection sees it, and the routing decision
made for it once its head is complete.

`route_request` runs the steps in order (request target, headers, Host or routing headers ->
sandbox address, registry look-up) and `admit` the per-sandbox ones (paused, traffic token, backend
head). Each step either passes or raises the ProxyError that answers the request. A registry that
must ask a remote store returns an awaitable; the client connection awaits it and calls `admit`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import urllib.parse
from typing import TYPE_CHECKING, Awaitable

from proxy import errors
from proxy.headers import (MalformedHeaders, RequestHeaders, UnsupportedTransferCoding,
                           build_request_head, cookie_value, forwarding_lines,
                           scan_request_headers, without_cookie)
from proxy.host import (BadHost, SandboxAddress, host_chars_valid, parse_sandbox_host,
                        strip_host_port)
from proxy.registry import SandboxRecord

if TYPE_CHECKING:
    from proxy.context import EdgeContext
    from proxy.upstream import UpstreamConnection

# How the response body is framed towards the client.
BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_UNTIL_CLOSE = range(4)
# Methods a request may be retried with on a fresh connection when a pooled one turned out dead
# (RFC 9110 9.2.2), provided it carried no body.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_COOKIE_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


class Exchange:
    __slots__ = (
        "method", "target", "headers", "head_size", "http11", "keep_alive", "upgrade",
        "error", "scanned", "host", "sandbox_id", "record", "port", "backend_port", "lookup",
        "upstream_head", "chunked", "has_body", "pending", "pending_size", "trailers",
        "request_done", "upstream", "retried", "response_started", "response_done", "status",
        "body_mode", "upstream_until_close", "upstream_reusable", "close_after", "discard",
        "started", "bytes_in", "bytes_out", "connect_time", "protocol", "outcome", "ended",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.http11 = True
        self.keep_alive = True
        self.upgrade: bytes | None = None  # the Upgrade value of a Connection: upgrade request
        self.error: errors.ProxyError | None = None
        self.scanned: RequestHeaders | None = None
        self.host = b""
        self.sandbox_id = ""
        self.record: SandboxRecord | None = None
        self.port = 0
        self.backend_port = 0
        self.lookup: Awaitable | None = None  # a registry answer still to come
        self.upstream_head = b""
        self.chunked = False
        self.has_body = False
        self.pending: list[bytes] | None = None  # body received before a backend was bound
        self.pending_size = 0
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.request_done = False
        self.upstream: UpstreamConnection | None = None
        self.retried = False
        self.response_started = False
        self.response_done = False
        self.status = 0
        self.body_mode = BODY_NONE
        self.upstream_until_close = False
        self.upstream_reusable = False
        self.close_after = False
        self.discard = False  # the response is done: drop the rest of the request body
        # for metrics and the access log
        self.started = 0.0      # time.monotonic() when the head was complete
        self.bytes_in = 0       # request body bytes
        self.bytes_out = 0      # response body bytes
        self.connect_time = 0.0  # seconds spent opening a backend connection (0: pooled)
        self.protocol = "http"  # http | sse | websocket | tunnel
        self.outcome = "ok"
        self.ended = False      # accounted for (metrics, access log)

    @property
    def retryable(self) -> bool:
        return not self.has_body and self.method in IDEMPOTENT

    def header(self, lname: bytes) -> bytes | None:
        for name, value in self.headers:
            if name.lower() == lname:
                return value
        return None

    def wants_html(self) -> bool:
        return errors.wants_html(self.header(b"user-agent"), self.header(b"accept"),
                                 self.header(b"sec-fetch-mode"), self.header(b"x-requested-with"))


def _split_absolute_form(target: bytes) -> tuple[bytes, bytes]:
    """`http://authority/path?q` -> (authority, `/path?q`) (RFC 9112 3.2.2)."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise errors.BadRequest("Malformed request target")
    cut = min(i for i in (rest.find(b"/"), rest.find(b"?"), len(rest)) if i >= 0)
    authority, path = rest[:cut], rest[cut:]
    if not authority or b"@" in authority:
        raise errors.BadRequest("Malformed request target")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


def _routing_headers(ctx: "EdgeContext", ex: Exchange, host: bytes) -> SandboxAddress | None:
    """The sandbox named by E2b-Sandbox-Id/-Port, honoured on stable hosts only."""
    try:
        name = strip_host_port(host.decode("latin-1").strip().lower()).rstrip(".")
    except BadHost:
        return None
    if name not in ctx.stable_hosts:
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return None
    sandbox_id = ex.header(ctx.sandbox_id_header)
    port = ex.header(ctx.sandbox_port_header)
    if sandbox_id is None and port is None:
        return None
    if sandbox_id is None or port is None:
        raise errors.BadHost(f"{ctx.config.routing.sandbox_id_header} and "
                             f"{ctx.config.routing.sandbox_port_header} must be sent together")
    try:
        return parse_sandbox_host(f"{port.decode('latin-1').strip()}-"
                                  f"{sandbox_id.decode('latin-1').strip()}.routed", ("routed",))
    except BadHost as exc:
        raise errors.BadHost(f"Invalid sandbox routing headers: {exc}") from None


def route_request(ctx: "EdgeContext", ex: Exchange, client_ip: bytes, trusted: bool,
                  host_cache: dict[bytes, SandboxAddress]) -> Awaitable | None:
    """Route `ex`; returns an awaitable when the registry must be asked remotely."""
    method = ex.method
    if method == b"CONNECT":
        raise errors.MethodNotAllowed("CONNECT is not supported")
    target = ex.target
    authority = None
    if not target.startswith(b"/"):
        if target != b"*" or method != b"OPTIONS":
            authority, target = _split_absolute_form(target)
            ex.target = target
    try:
        scanned = scan_request_headers(ex.headers, trusted, ctx.private_headers)
    except UnsupportedTransferCoding as exc:
        raise errors.NotImplementedTransferCoding(str(exc)) from None
    except MalformedHeaders as exc:
        raise errors.BadRequest(str(exc)) from None
    host = authority if authority is not None else scanned.host
    if not host:
        raise errors.BadHost("Missing Host header")
    ex.scanned = scanned
    ex.host = host
    ex.chunked = scanned.chunked
    ex.has_body = scanned.chunked or scanned.content_length
    if ex.upgrade is not None and ex.has_body:
        raise errors.BadRequest("An upgrade request must not carry a body")
    address = host_cache.get(host)
    if address is None:
        if not host_chars_valid(host):
            raise errors.BadHost("Invalid host: characters outside [A-Za-z0-9.:-]")
        address = ctx.header_routing and _routing_headers(ctx, ex, host)
        if not address:
            try:
                address = parse_sandbox_host(host.decode("latin-1"), ctx.domains)
            except BadHost as exc:
                raise errors.BadHost(f"Invalid host: {exc}") from None
            if len(host_cache) > 64:
                host_cache.clear()
            host_cache[host] = address
    ex.port, ex.sandbox_id = address
    found = ctx.registry.lookup(ex.sandbox_id, ex.port)
    if found is None:
        ctx.stats.lookups_not_found += 1
        raise errors.SandboxNotFound(ex.sandbox_id)
    if type(found) is SandboxRecord:
        ctx.stats.lookups_found += 1
        admit(ctx, ex, found, client_ip, trusted)
        return None
    return found


def admit(ctx: "EdgeContext", ex: Exchange, record: SandboxRecord, client_ip: bytes,
          trusted: bool) -> None:
    """The per-sandbox steps: running, token, then the head the backend will see."""
    if record.paused:
        raise errors.SandboxNotFound(ex.sandbox_id)
    if record.token_sha256 is not None and ex.port not in ctx.exempt_ports:
        check_token(ctx, ex, record, trusted)
    scanned = ex.scanned
    if ctx.strip_cookie is not None:  # the credential cookie never reaches a backend
        scanned = scanned._replace(lines=without_cookie(scanned.lines, ctx.strip_cookie))
    ex.record = record
    ex.backend_port = record.backend_port(ex.port)
    masked = record.masked_host(ex.port)
    host = ex.host
    ex.upstream_head = build_request_head(
        ex.method, ex.target, masked if masked is not None else host, scanned,
        forwarding_lines(scanned, client_ip, ctx.scheme, host, trusted), upgrade=ex.upgrade)


def _token_matches(token: bytes, record: SandboxRecord) -> bool:
    return hmac.compare_digest(hashlib.sha256(token).digest(), record.token_sha256)


def check_token(ctx: "EdgeContext", ex: Exchange, record: SandboxRecord, trusted: bool) -> None:
    """Raise unless the request carries the sandbox's traffic token.

    Every credential a request carries is looked at, whichever else it carries: the token header;
    with `[access] browser_cookie`, the `?access_token` parameter first (a valid one is answered
    with the cookie and a redirect without it, TokenAccepted, so it never reaches the backend) and
    then the cookie. No credential at all is AccessDenied.missing, never a pass.
    """
    header_name = ctx.token_header_name
    access = ctx.config.access
    if access.browser_cookie:
        _accept_query_token(ctx, ex, record, trusted)
    token = ex.header(ctx.token_header)
    if token is None and access.browser_cookie:
        token = cookie_value(ex.header(b"cookie"), access.cookie_name.encode())
    if token is None:
        raise errors.AccessDenied.missing(ex.sandbox_id, header_name)
    if not _token_matches(token, record):
        raise errors.AccessDenied.invalid(ex.sandbox_id, header_name)


def _percent_decoded(text: bytes) -> bytes:
    if b"%" not in text and b"+" not in text:
        return text
    return urllib.parse.unquote_to_bytes(text.replace(b"+", b" "))


def _same_site_path(path: bytes) -> bytes:
    """`path` as a Location that can only point at this host: a leading run of slashes or
    backslashes would make browsers read it as `//other.host/` (an open redirect)."""
    rest = path.lstrip(b"/\\")
    return b"/" + rest if len(rest) != len(path) or not path else path


def _accept_query_token(ctx: "EdgeContext", ex: Exchange, record: SandboxRecord,
                        trusted: bool) -> None:
    """`?access_token=T`: a valid T is answered with the cookie and a redirect without it.

    Parameter names are compared percent-decoded (`access%5Ftoken` is the same parameter to the
    backend's framework); every occurrence is removed from the redirect target."""
    path, question, query = ex.target.partition(b"?")
    if not question:
        return
    name = ctx.config.access.query_parameter.encode()
    kept, tokens = [], []
    for pair in query.split(b"&"):
        key, _, value = pair.partition(b"=")
        if _percent_decoded(key) == name:
            tokens.append(value)
        else:
            kept.append(pair)
    if not tokens:
        return
    token = tokens[0]
    if (any(t != token for t in tokens) or not token or not _COOKIE_SAFE.issuperset(token)
            or not _token_matches(token, record)):
        raise errors.AccessDenied.invalid(ex.sandbox_id, ctx.token_header_name)
    location = _same_site_path(path) + (b"?" + b"&".join(kept) if kept else b"")
    cookie = (ctx.config.access.cookie_name.encode() + b"=" + token
              + b"; Path=/; HttpOnly; SameSite=Lax")
    if ctx.scheme == b"https" or (trusted and ex.scanned.forwarded_proto == b"https"):
        cookie += b"; Secure"
    raise errors.TokenAccepted(ex.sandbox_id, location, cookie)
