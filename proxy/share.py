"""Share links: signed, expiring tokens that open one port of one sandbox.

A share token is `<sandbox id>.<port>.<expiry>.<epoch>.<signature>`: the expiry in Unix seconds,
the record's `share_epoch` at minting time, and the base64url HMAC-SHA256 of the first four
fields under `[access] share_key`. `https://<port>-<id>.<domain>/?share=<token>` is accepted like
the browser token flow (redirect without it, host-only HttpOnly cookie holding it; never
forwarded), but only for that sandbox and port, until the expiry, and while the record's
`share_epoch` is still the one it was minted under: raising the epoch revokes every older link.
Pure functions; the clock is passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

COOKIE_NAME = b"sandbox-share"
QUERY_PARAMETER = b"share"
MIN_KEY_BYTES = 16


def _signature(key: bytes, payload: bytes) -> bytes:
    digest = hmac.new(key, payload, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


def mint(key: bytes, sandbox_id: str, port: int, expiry: int, epoch: int) -> str:
    payload = f"{sandbox_id}.{port}.{expiry}.{epoch}".encode()
    return (payload + b"." + _signature(key, payload)).decode()


def valid(key: bytes, token: bytes, sandbox_id: str, port: int, epoch: int, now: float) -> bool:
    """Whether `token` opens `port` of `sandbox_id` at `now`, under the record's `epoch`."""
    payload, dot, signature = token.rpartition(b".")
    if not dot or not hmac.compare_digest(_signature(key, payload), signature):
        return False
    fields = payload.split(b".")
    if len(fields) != 4 or not all(f.isdigit() for f in fields[1:]):
        return False
    return (fields[0] == sandbox_id.encode() and int(fields[1]) == port
            and now < int(fields[2]) and int(fields[3]) == epoch)


def expiry_of(token: bytes) -> int:
    """The expiry a well-formed token carries (for the cookie's Max-Age)."""
    fields = token.rpartition(b".")[0].split(b".")
    return int(fields[2]) if len(fields) == 4 and fields[2].isdigit() else 0


MAX_TTL = 366 * 24 * 3600  # a year: a link meant to last longer is a token, not a share


def share_url(scheme: str, domain: str, sandbox_id: str, port: int, token: str) -> str:
    return f"{scheme}://{port}-{sandbox_id}.{domain}/?share={token}"


def check_request(port: object, ttl: object, scheme: object = "https") -> str | None:
    """The problem with a mint request's fields (CLI or admin API), or None."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return "port: must be a port (1-65535)"
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL:
        return f"ttl: must be a number of seconds from 1 to {MAX_TTL}"
    if scheme not in ("http", "https"):
        return "scheme: must be http or https"
    return None
