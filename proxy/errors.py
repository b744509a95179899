"""Error responses: every answer the proxy makes itself is decided and rendered here.

Each error type carries its status and knows its body, as h11's protocol errors carry theirs. Bodies
are JSON for programs (the shapes SDKs rely on, shared/reference/behaviour.md), an HTML page for
browser navigations, and plain text for a malformed Host. Every response carries
`Access-Control-Allow-Origin: *` so browsers can read it.
"""

from __future__ import annotations

import html
import json
from http import HTTPStatus


class ProxyError(Exception):
    """An error the proxy answers itself. `close` means the client connection cannot be reused."""

    status = 502
    close = False
    text_only = False  # plain text even for browsers (malformed requests)
    headers: tuple[bytes, ...] = ()  # extra response header lines

    def __init__(self, message: str, sandbox_id: str | None = None, port: int | None = None,
                 **extra: object):
        super().__init__(message)
        self.message = message
        self.sandbox_id = sandbox_id
        self.port = port
        self.extra = extra

    def json_body(self) -> dict:
        body: dict = {}
        if self.sandbox_id is not None:
            body["sandboxId"] = self.sandbox_id
        body["message"] = self.message
        if self.port is not None:
            body["port"] = self.port
        body.update(self.extra)
        body["code"] = self.status
        return body


class BadRequest(ProxyError):
    """Malformed or forbidden request framing; the connection is closed after the answer."""
    status = 400
    close = True
    text_only = True


class BadHost(BadRequest):
    """The Host does not name `<port>-<sandboxId>.<served domain>`. The connection stays usable."""
    close = False


class RequestTimeout(BadRequest):
    status = 408


class MethodNotAllowed(BadRequest):
    status = 405


class UriTooLong(BadRequest):
    status = 414


class HeadersTooLarge(BadRequest):
    status = 431


class NotImplementedTransferCoding(BadRequest):
    status = 501


class TooManyConnections(ProxyError):
    """The process holds `limits.max_connections` client connections already."""
    status = 503
    close = True


class RegistryUnavailable(ProxyError):
    """The registry could not be asked; never a 502, which SDKs read as "sandbox gone"."""
    status = 503

    def __init__(self, sandbox_id: str):
        super().__init__("registry unavailable", sandbox_id)


class ResumeFailed(ProxyError):
    """A paused sandbox did not come back in time; 503 (worth retrying), never 502 (gone)."""
    status = 503

    def __init__(self, sandbox_id: str):
        super().__init__("The sandbox could not be resumed in time", sandbox_id)


class ResumeForbidden(ProxyError):
    """The control plane refused to resume the sandbox for this request (its webhook said 403)."""
    status = 403

    def __init__(self, sandbox_id: str):
        super().__init__("You do not have permission to resume this sandbox", sandbox_id)


class ResumeRateLimited(ProxyError):
    """The control plane asked to slow down (its webhook said 429); its Retry-After is passed on."""
    status = 429

    def __init__(self, sandbox_id: str, retry_after: str | None):
        super().__init__("Too many resume requests for this sandbox", sandbox_id)
        if retry_after and retry_after.strip().isdigit():
            self.headers = (b"Retry-After: " + retry_after.strip().encode() + b"\r\n",)


class AccessDenied(ProxyError):
    status = 403

    @classmethod
    def missing(cls, sandbox_id: str, header: str) -> AccessDenied:
        return cls(f"Sandbox is secured with traffic access token. Token header '{header}' "
                   "is missing", sandbox_id)

    @classmethod
    def share_invalid(cls, sandbox_id: str) -> AccessDenied:
        return cls("Sandbox is secured with traffic access token. The share link is invalid, "
                   "expired or revoked", sandbox_id)

    @classmethod
    def invalid(cls, sandbox_id: str, header: str) -> AccessDenied:
        return cls(f"Sandbox is secured with traffic access token. Provided token in header "
                   f"'{header}' is invalid", sandbox_id)


class SandboxBusy(ProxyError):
    status = 429

    def __init__(self, sandbox_id: str, limit: int):
        super().__init__("Too many concurrent requests to this sandbox", sandbox_id, limit=limit)


class TokenAccepted(ProxyError):
    """Not an error: the browser's ?access_token was valid; set the cookie and drop the token
    from the URL (so it is neither forwarded nor kept in history)."""
    status = 302

    def __init__(self, sandbox_id: str, location: bytes, cookie: bytes):
        super().__init__("Redirecting", sandbox_id)
        self.headers = (b"Location: " + location + b"\r\n", b"Set-Cookie: " + cookie + b"\r\n")


class BackendNotAllowed(ProxyError):
    """The registry points outside [upstream] allowed_networks (or at the proxy itself)."""
    status = 502

    def __init__(self, sandbox_id: str):
        super().__init__("The sandbox was not found", sandbox_id)  # the reason goes to the log


class SandboxPaused(ProxyError):
    """Paused, and no resume will be attempted for this request."""
    status = 409

    def __init__(self, sandbox_id: str):
        super().__init__("The sandbox is paused", sandbox_id, canAutoResume=False)


class SandboxTransitioning(ProxyError):
    """Pausing or resuming, and auto-resume is not waiting for it."""
    status = 409

    def __init__(self, sandbox_id: str):
        super().__init__("The sandbox is still transitioning. Try again in a moment.", sandbox_id)


class ClientNotAllowed(ProxyError):
    """The client's address is outside the sandbox's `allowed_clients` for this port."""
    status = 403

    def __init__(self, sandbox_id: str, client_ip: str, port: int):
        super().__init__(f"Access denied: client {client_ip} is not allowed to reach port {port} "
                         "on this sandbox", sandbox_id, port, clientIp=client_ip)

    def json_body(self) -> dict:  # the reference's field order
        return {"sandboxId": self.sandbox_id, "clientIp": self.extra["clientIp"],
                "port": self.port, "message": self.message, "code": self.status}


class PathBlocked(ProxyError):
    """The path is reserved for the control plane on this port (the record's blocked_paths)."""
    status = 404

    def __init__(self, path: str):
        super().__init__("This endpoint is reserved for the control plane and is not reachable "
                         "through the sandbox URL", path=path)


class SandboxNotFound(ProxyError):
    status = 502

    def __init__(self, sandbox_id: str):
        super().__init__("The sandbox was not found", sandbox_id)


class PortNotOpen(ProxyError):
    status = 502

    def __init__(self, sandbox_id: str, port: int):
        super().__init__("The sandbox is running but port is not open", sandbox_id, port)


class UpstreamClosed(ProxyError):
    """The backend closed or broke the connection before sending a complete response head."""
    status = 502

    def __init__(self, sandbox_id: str, port: int):
        super().__init__("The sandbox closed the connection before responding", sandbox_id, port)


class UpstreamInvalid(ProxyError):
    """The backend's response head cannot be relayed (malformed framing, a transfer coding an
    HTTP/1.0 client cannot receive)."""
    status = 502

    def __init__(self, sandbox_id: str, port: int):
        super().__init__("The sandbox sent an invalid response", sandbox_id, port)


class UpstreamTimeout(ProxyError):
    status = 504

    def __init__(self, sandbox_id: str, port: int):
        super().__init__("The sandbox did not respond in time", sandbox_id, port)


_BROWSER_FETCH_MODES = (b"cors", b"no-cors", b"same-origin", b"websocket")


def wants_html(user_agent: bytes | None, accept: bytes | None, fetch_mode: bytes | None,
               requested_with: bytes | None) -> bool:
    """True for a browser navigation: a browser User-Agent whose Accept prefers text/html."""
    if not user_agent or b"Mozilla/" not in user_agent or not accept:
        return False
    if requested_with is not None:
        return False
    if fetch_mode is not None and fetch_mode.strip().lower() in _BROWSER_FETCH_MODES:
        return False
    return _prefers_html(accept.decode("latin-1"))


def _prefers_html(accept: str) -> bool:
    best_html = best_json = -1.0
    for item in accept.split(","):
        kind, *params = item.strip().split(";")
        kind = kind.strip().lower()
        q = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if kind in ("text/html", "application/xhtml+xml"):
            best_html = max(best_html, q)
        elif kind in ("application/json", "*/*"):
            best_json = max(best_json, q)
    return best_html > 0 and best_html >= best_json


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{status} {phrase}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:15vh auto;padding:0 1rem;
color:#222}} h1{{font-size:1.4rem}}
code{{background:#f3f3f3;padding:.1rem .3rem;border-radius:3px}}</style></head>
<body><h1>{message}</h1><p>{detail}</p><p><small>{status} {phrase}</small></p></body></html>
"""


PREFLIGHT_MAX_AGE = 600  # seconds a browser may cache the proxy's own preflight answer


def preflight_fields(request_headers: bytes | None) -> list[tuple[bytes, bytes]]:
    """The proxy's answer to a CORS preflight it must answer itself (no sandbox can): 204 with the
    same open CORS policy as every error, so the browser goes on to send the real request and
    can read the proxy's JSON answer to it. `request_headers` is the preflight's
    Access-Control-Request-Headers, echoed (a field-value the client sent: only visible ASCII
    and spaces are kept)."""
    fields = [(b"Access-Control-Allow-Origin", b"*"), (b"Access-Control-Allow-Methods", b"*")]
    if request_headers:
        echoed = bytes(c for c in request_headers if 32 <= c < 127)
        if echoed.strip():
            fields.append((b"Access-Control-Allow-Headers", echoed.strip()))
    fields.append((b"Access-Control-Max-Age", b"%d" % PREFLIGHT_MAX_AGE))
    fields.append((b"Cache-Control", b"no-store"))
    return fields


def render_preflight(request_headers: bytes | None, *, close: bool) -> bytes:
    """preflight_fields as a complete HTTP/1.1 response."""
    head = [b"HTTP/1.1 204 No Content\r\n"]
    head += [name + b": " + value + b"\r\n" for name, value in preflight_fields(request_headers)]
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head)


def error_body(error: ProxyError, *, html_page: bool) -> tuple[bytes, bytes]:
    """(Content-Type, body) of the answer to `error`: JSON for programs, a page for people."""
    status = error.status
    if error.text_only:
        return b"text/plain; charset=utf-8", (error.message + "\n").encode()
    if html_page:
        detail = []
        if error.sandbox_id is not None:
            detail.append(f"Sandbox <code>{html.escape(error.sandbox_id)}</code>")
        if error.port is not None:
            detail.append(f"port <code>{error.port}</code>")
        return b"text/html; charset=utf-8", _HTML_PAGE.format(
            status=status, phrase=HTTPStatus(status).phrase, message=html.escape(error.message),
            detail=", ".join(detail)).encode()
    return b"application/json", json.dumps(error.json_body()).encode()


def render_error(error: ProxyError, *, html_page: bool, head_only: bool, close: bool) -> bytes:
    """The complete HTTP/1.1 response for `error`, ready to write to the client."""
    status = error.status
    content_type, body = error_body(error, html_page=html_page)
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()),
        b"Content-Type: " + content_type + b"\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Access-Control-Allow-Origin: *\r\n",
        b"Cache-Control: no-store\r\n",
        *error.headers,
    ]
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    if not head_only:
        head.append(body)
    return b"".join(head)
