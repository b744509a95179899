"""Admission: the decisions made for a request once its head is parsed, before any byte of it
goes anywhere. Pure functions of the request, the shared context and the sandbox's record; each
step passes or raises the ProxyError that answers the request (proxy/errors.py).

`route_request` runs the steps that need no record, in order: request target (absolute form),
header scan (proxy/headers.py: what may be forwarded), Host or routing headers -> sandbox address
(proxy/host.py), registry look-up. `admit` runs the per-sandbox steps, in order: lifecycle state,
ingress rules, blocked paths, credential (token, cookie, query token, share link), and only then,
for a request that passed everything, either marks a sandbox to be woken or builds the head the
backend will see (Host mask, Origin following it, forwarding headers, credentials removed). A
registry that must ask a remote store returns an awaitable from `route_request`; the exchange
awaits it and calls `admit`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
import urllib.parse
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from proxy import errors, share
from proxy.blocked_paths import blocked_prefix
from proxy.headers import (
    MalformedHeaders,
    UnsupportedTransferCoding,
    build_request_head,
    cookie_value,
    forwarding_lines,
    scan_request_headers,
    without_cookie,
)
from proxy.host import (
    InvalidHost,
    SandboxAddress,
    host_chars_valid,
    parse_sandbox_host,
    strip_host_port,
)
from proxy.origin import origin_follows_mask
from proxy.registry import SandboxRecord
from proxy.registry.record import TRANSITIONS

if TYPE_CHECKING:
    from proxy.context import EdgeContext
    from proxy.exchange import Exchange

_COOKIE_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


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


def _routing_headers(ctx: EdgeContext, ex: Exchange, host: bytes) -> SandboxAddress | None:
    """The sandbox named by E2b-Sandbox-Id/-Port, honoured on stable hosts only."""
    try:
        name = strip_host_port(host.decode("latin-1").strip().lower()).rstrip(".")
    except InvalidHost:
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
    except InvalidHost as exc:
        raise errors.BadHost(f"Invalid sandbox routing headers: {exc}") from None


def route_request(ctx: EdgeContext, ex: Exchange, client_ip: bytes, trusted: bool,
                  host_cache: dict[bytes, SandboxAddress]) -> Awaitable | None:
    """Route `ex`; returns an awaitable when the registry must be asked remotely."""
    method = ex.method
    if method == b"CONNECT":
        raise errors.MethodNotAllowed("CONNECT is not supported")
    target = ex.target
    authority = None
    if not target.startswith(b"/") and (target != b"*" or method != b"OPTIONS"):
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
        address = _routing_headers(ctx, ex, host) if ctx.header_routing else None
        if address is None:
            try:
                address = parse_sandbox_host(host.decode("latin-1"), ctx.domains)
            except InvalidHost as exc:
                raise errors.BadHost(f"Invalid host: {exc}") from None
            if len(host_cache) > 64:
                host_cache.clear()
            host_cache[host] = address
    ex.port, ex.sandbox_id = address
    found = ctx.registry.lookup(ex.sandbox_id, ex.port)
    if found is None:
        ctx.stats.lookups_not_found += 1
        raise errors.SandboxNotFound(ex.sandbox_id)
    if isinstance(found, SandboxRecord):
        ctx.stats.lookups_found += 1
        admit(ctx, ex, found, client_ip, trusted)
        return None
    return found


def admit(ctx: EdgeContext, ex: Exchange, record: SandboxRecord, client_ip: bytes,
          trusted: bool) -> None:
    """The per-sandbox steps: running, ingress rules, token, then the head the backend sees.

    Every step that can refuse the request runs before a sandbox that is not running is woken:
    such a record is admitted with `ex.resume` set, and admitted again once it runs."""
    if record.paused and not (record.auto_resume and ctx.can_resume):
        if record.state in TRANSITIONS:
            raise errors.SandboxTransitioning(ex.sandbox_id)
        raise errors.SandboxPaused(ex.sandbox_id)
    options = record.options
    if options.allowed_clients is not None:
        address = real_client_address(ctx, ex, client_ip, trusted)
        if not record.client_allowed(ex.port, address):
            raise errors.ClientNotAllowed(ex.sandbox_id, str(address or client_ip.decode()),
                                          ex.port)
    if options.blocked_paths is not None:
        prefixes = options.blocked_paths.get(ex.port)
        if prefixes and blocked_prefix(ex.target, prefixes) is not None:
            raise errors.PathBlocked(ex.target.partition(b"?")[0].decode("latin-1"))
    if record.token_sha256 is not None and ex.port not in (
            ctx.exempt_ports if options.public_ports is None else options.public_ports):
        check_token(ctx, ex, record, trusted)
    if record.paused:
        ex.resume = True
        ex.record = record
        return
    ex.resume = False
    if ctx.query_credentials and b"?" in ex.target:  # ports without a token check too
        ex.target = _query_credential(ex.target, ctx.query_credentials)[2]
    scanned = ex.scanned
    assert scanned is not None  # route_request scanned the head
    if ctx.strip_cookies:  # credential cookies never reach a backend
        scanned = scanned._replace(lines=without_cookie(scanned.lines, ctx.strip_cookies))
    ex.record = record
    ex.backend_port = record.backend_port(ex.port)
    masked = record.masked_host(ex.port)
    host = ex.host
    if masked is not None and (ctx.mask_origin if options.mask_origin is None
                               else options.mask_origin):
        # the scheme the client used, decided as forwarding_lines decides X-Forwarded-Proto
        scheme = scanned.forwarded_proto if trusted and scanned.forwarded_proto else ctx.scheme
        lines = origin_follows_mask(scanned.lines, scanned.names, scheme, host, masked)
        if lines is not None:
            scanned = scanned._replace(lines=lines)
    ex.upstream_head = build_request_head(
        ex.method, ex.target, masked if masked is not None else host, scanned,
        forwarding_lines(scanned, client_ip, ctx.scheme, host, trusted), upgrade=ex.upgrade)


def real_client_address(ctx: EdgeContext, ex: Exchange, client_ip: bytes, trusted: bool,
                        ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's own address: the connection's peer (or its PROXY protocol source), or, when
    that peer is a trusted proxy, the right-most X-Forwarded-For entry that is not one of ours
    (entries to its left could be written by anyone)."""
    try:
        address = ipaddress.ip_address(client_ip.decode())
    except ValueError:
        return None
    forwarded = ex.scanned.forwarded_for if trusted and ex.scanned is not None else None
    if forwarded is None:
        return address
    for entry in reversed(forwarded.split(b",")):
        text = entry.strip().decode("latin-1")
        if text.startswith("[") and "]" in text:
            text = text[1:text.index("]")]
        elif text.count(":") == 1:  # IPv4 with a port
            text = text.partition(":")[0]
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return None  # an entry we cannot read: no address to grant anything to
        if not ctx.is_trusted(str(address)):
            return address
    return address


def _token_matches(token: bytes, record: SandboxRecord) -> bool:
    expected = record.token_sha256
    return expected is not None and hmac.compare_digest(hashlib.sha256(token).digest(), expected)


def check_token(ctx: EdgeContext, ex: Exchange, record: SandboxRecord, trusted: bool) -> None:
    """Raise unless the request carries a credential for the sandbox.

    Every credential a request carries is looked at, whichever else it carries. Query parameters
    first, since they must never reach the backend: with `[access] browser_cookie`,
    `?access_token=` and, with a `share_key`, `?share=`; a valid one is answered with a cookie and
    a redirect without it (TokenAccepted), a wrong one is a 403. Then the token header, the token
    cookie, the share cookie (checked again on every request: expiry, port, epoch). No credential
    at all is AccessDenied.missing, never a pass.
    """
    header_name = ctx.token_header_name
    access = ctx.config.access
    if access.browser_cookie:
        values, location, _ = _query_credential(ex.target, (ctx.query_parameter,))
        if values:
            given = values[0]
            if (any(v != given for v in values) or not given
                    or not _COOKIE_SAFE.issuperset(given) or not _token_matches(given, record)):
                raise errors.AccessDenied.invalid(ex.sandbox_id, header_name)
            raise _accepted(ctx, ex, trusted, location, ctx.cookie_name, given)
    share_key = ctx.share_key
    if share_key is not None:
        values, location, _ = _query_credential(ex.target, (share.QUERY_PARAMETER,))
        if values:
            link = values[0]
            if any(v != link for v in values) or not share.valid(
                    share_key, link, ex.sandbox_id, ex.port, record.share_epoch, time.time()):
                raise errors.AccessDenied.share_invalid(ex.sandbox_id)
            raise _accepted(ctx, ex, trusted, location, share.COOKIE_NAME, link,
                            max_age=max(0, share.expiry_of(link) - int(time.time())))
    token = ex.header(ctx.token_header)
    if token is None and access.browser_cookie:
        token = cookie_value(ex.header(b"cookie"), ctx.cookie_name)
    if token is None and share_key is not None:
        shared = cookie_value(ex.header(b"cookie"), share.COOKIE_NAME)
        if shared is not None:
            if share.valid(share_key, shared, ex.sandbox_id, ex.port, record.share_epoch,
                           time.time()):
                return
            raise errors.AccessDenied.share_invalid(ex.sandbox_id)
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


def _query_name(key: bytes) -> bytes:
    """A query parameter's name as the backend's framework may read it: percent-decoded, any
    case, `[]` dropped (Express `qs`, PHP), `.` and space read as `_` (PHP)."""
    name = _percent_decoded(key).lower()
    if name.endswith(b"[]"):
        name = name[:-2]
    return name.replace(b".", b"_").replace(b" ", b"_")


def _query_credential(target: bytes, names: tuple[bytes, ...],
                      ) -> tuple[list[bytes], bytes, bytes]:
    """The values of the query parameters `names` (lower case), the target without them as a
    same-site Location, and the target without them as it is forwarded.

    Names are compared as `_query_name` reads them; pairs split on `&` and on `;` (which older
    parsers also treat as a separator); every occurrence is removed."""
    path, question, query = target.partition(b"?")
    if not question:
        return [], target, target
    kept, values = [], []
    for pair in query.replace(b";", b"&").split(b"&"):
        key, _, value = pair.partition(b"=")
        if _query_name(key) in names:
            values.append(value)
        else:
            kept.append(pair)
    if not values:
        return [], target, target
    rest = b"?" + b"&".join(kept) if kept else b""
    return values, _same_site_path(path) + rest, path + rest


def _accepted(ctx: EdgeContext, ex: Exchange, trusted: bool, location: bytes, name: bytes,
              value: bytes, max_age: int | None = None) -> errors.TokenAccepted:
    """The redirect that trades a query credential for a host-only HttpOnly cookie."""
    cookie = name + b"=" + value + b"; Path=/; HttpOnly; SameSite=Lax"
    if max_age is not None:
        cookie += b"; Max-Age=%d" % max_age
    if ctx.scheme == b"https" or (trusted and ex.scanned is not None
                                  and ex.scanned.forwarded_proto == b"https"):
        cookie += b"; Secure"
    return errors.TokenAccepted(ex.sandbox_id, location, cookie)
