"""Exchange: one request/response pair as the client connection sees it, and the routing decision
made for it once its head is complete (Host -> sandbox -> backend address -> the head to send).

`route_request` is the pipeline of RFC-ordered steps on a parsed head; it raises the ProxyError
that answers the request instead when any step refuses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy import errors
from proxy.headers import (MalformedHeaders, build_request_head, forwarding_lines,
                           scan_request_headers)
from proxy.host import BadHost, SandboxAddress, parse_sandbox_host
from proxy.registry import SandboxRecord

if TYPE_CHECKING:
    from proxy.edge import EdgeContext
    from proxy.upstream import UpstreamConnection

# How the response body is framed towards the client.
BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_UNTIL_CLOSE = range(4)
# Methods a request may be retried with on a fresh connection when a pooled one turned out dead
# (RFC 9110 9.2.2), provided it carried no body.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class Exchange:
    __slots__ = (
        "method", "target", "headers", "head_size", "http11", "keep_alive", "upgrade",
        "error", "record", "port", "backend_port", "upstream_head", "chunked", "has_body",
        "pending", "pending_size", "trailers", "request_done", "upstream", "retried",
        "response_started", "response_done", "status", "body_mode", "upstream_until_close",
        "upstream_reusable", "close_after", "discard",
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
        self.record: SandboxRecord | None = None
        self.port = 0
        self.backend_port = 0
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
    slash = rest.find(b"/")
    query = rest.find(b"?")
    cut = min(i for i in (slash, query, len(rest)) if i >= 0)
    authority, path = rest[:cut], rest[cut:]
    if not authority or b"@" in authority:
        raise errors.BadRequest("Malformed request target")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


def route_request(ctx: "EdgeContext", ex: Exchange, client_ip: bytes, trusted: bool,
                  host_cache: dict[bytes, SandboxAddress]) -> None:
    """Decide where `ex` goes and build the head for the backend (sets ex.upstream_head...)."""
    method = ex.method
    if method == b"CONNECT":
        raise errors.MethodNotAllowed("CONNECT is not supported")
    target = ex.target
    authority = None
    if not target.startswith(b"/"):
        if target == b"*" and method == b"OPTIONS":
            pass
        else:
            authority, target = _split_absolute_form(target)
    try:
        scanned = scan_request_headers(ex.headers, trusted)
    except MalformedHeaders as exc:
        if "Transfer-Encoding" in str(exc):
            raise errors.NotImplementedTransferCoding(str(exc)) from None
        raise errors.BadRequest(str(exc)) from None
    host = authority if authority is not None else scanned.host
    if not host:
        raise errors.BadHost("Missing Host header")
    ex.chunked = scanned.chunked
    ex.has_body = scanned.chunked or scanned.content_length
    if ex.upgrade is not None and ex.has_body:
        raise errors.BadRequest("An upgrade request must not carry a body")
    address = host_cache.get(host)
    if address is None:
        try:
            address = parse_sandbox_host(host.decode("latin-1"), ctx.domains)
        except BadHost as exc:
            raise errors.BadHost(f"Invalid host: {exc}") from None
        if len(host_cache) > 64:
            host_cache.clear()
        host_cache[host] = address
    port, sandbox_id = address
    record = ctx.registry.lookup(sandbox_id)
    if record is None:
        raise errors.SandboxNotFound(sandbox_id)
    ex.record = record
    ex.port = port
    ex.backend_port = record.backend_port(port)
    masked = record.masked_host(port)
    ex.upstream_head = build_request_head(
        method, target, masked if masked is not None else host, scanned,
        forwarding_lines(scanned, client_ip, ctx.scheme, host, trusted),
        chunked=scanned.chunked, upgrade=ex.upgrade)
