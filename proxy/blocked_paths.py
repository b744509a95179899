"""Blocked paths: whether a request target reaches a path a record reserves for the control plane.

A record's `blocked_paths` (port -> path prefixes, such as `/init` on the in-sandbox daemon's
port) are answered 404 by the proxy. A prefix is blocked under every spelling a backend could
normalize to it, since frameworks differ in what they decode: percent-encoding (also applied
twice), `\\` for `/`, repeated slashes, dot segments (RFC 3986 5.2.4), `;parameters` on a segment,
and letter case; and the path as sent, dot segments kept, since routers that match the raw
path send `/init/../x` to `/init`'s handler. Matching is by whole segments: `/init` blocks
`/init` and `/init/x`, not `/initial`. Pure functions; no I/O.
"""

from __future__ import annotations

import urllib.parse


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if path.endswith(("/.", "/..")):
        out.append("")
    return "/" + "/".join(out)


def _collapsed(path: str) -> str:
    path = path.replace("\\", "/")
    if not path.startswith("/"):
        path = "/" + path
    while "//" in path:
        path = path.replace("//", "/")
    return path.lower()


def _canonical(path: str) -> str:
    return _remove_dot_segments(_collapsed(path))


def path_spellings(target: bytes) -> set[str]:
    """Every canonical path a backend might route `target` to."""
    raw = target.partition(b"?")[0].partition(b"#")[0]
    spellings = set()
    for _ in range(3):  # encoded, decoded, decoded twice
        text = raw.decode("latin-1")
        unparamed = "/".join(s.partition(";")[0] for s in text.split("/"))
        for spelling in (text, unparamed):
            spellings.add(_canonical(spelling))
            # As sent, dot segments kept: a router matching the raw path sends `/init/../x`
            # to its `/init` route; also with only the `.` segments dropped (`/./init/../x`).
            collapsed = _collapsed(spelling)
            spellings.add(collapsed)
            spellings.add("/".join(s for s in collapsed.split("/") if s != ".") or "/")
        decoded = urllib.parse.unquote_to_bytes(raw)
        if decoded == raw:
            break
        raw = decoded
    return spellings


def blocked_prefix(target: bytes, prefixes: tuple[str, ...]) -> str | None:
    """The prefix `target` reaches, or None."""
    spellings = path_spellings(target)
    for prefix in prefixes:
        wanted = _canonical(prefix).rstrip("/")
        if not wanted:
            return prefix  # "/" blocks the whole port
        for path in spellings:
            if path == wanted or path.startswith(wanted + "/"):
                return prefix
    return None
