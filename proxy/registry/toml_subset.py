"""A fast reader for the shape registry files almost always have, so a million sandboxes load in
seconds (tomllib, pure Python, needs ~18 s for that).

It accepts only: blank lines, comment lines, `[sandboxes.<bare id>]` headers, and `key = value`
lines whose value is a basic string without escapes, a decimal integer, a boolean, or an inline
table of decimal integers (`{ 3000 = 32768 }`), each optionally followed by a comment. Anything
else (escapes, quoted keys, arrays, dotted keys, duplicates, other tables...) returns None and the
caller uses tomllib, so every file still means exactly what TOML says and every error message is
tomllib's. tests/unit/test_toml_subset.py checks both readers agree.
"""

from __future__ import annotations

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_PREFIX = "[sandboxes."


def _rest_is_comment(rest: str) -> bool:
    rest = rest.strip(" \t")
    return not rest or rest[0] == "#"


def _value(text: str) -> str | bool | int | dict[str, int]:
    """The TOML value at the start of `text` (the rest may only be a comment); raise ValueError
    for anything outside the subset."""
    first = text[:1]
    if first == '"':
        end = text.find('"', 1)
        if end < 0:
            raise ValueError
        body = text[1:end]
        if "\\" in body or not body.isprintable() or not _rest_is_comment(text[end + 1:]):
            raise ValueError
        return body
    if first == "{":
        end = text.find("}")
        if end < 0 or not _rest_is_comment(text[end + 1:]):
            raise ValueError
        table: dict[str, int] = {}
        inner = text[1:end].strip(" \t")
        if not inner:
            return table
        for item in inner.split(","):
            key, eq, number = item.partition("=")
            key, number = key.strip(" \t"), number.strip(" \t")
            if (not eq or not key or not _BARE.issuperset(key) or key in table
                    or not _is_int(number)):
                raise ValueError
            table[key] = int(number)
        return table
    token, _, rest = text.partition("#")
    token = token.strip(" \t")
    if not _rest_is_comment("#" + rest if rest else ""):
        raise ValueError
    if token == "true":
        return True
    if token == "false":
        return False
    if _is_int(token):
        return int(token)
    raise ValueError


def _is_int(token: str) -> bool:
    digits = token[1:] if token[:1] in "+-" else token
    return (digits.isascii() and digits.isdigit()
            and (digits == "0" or not digits.startswith("0")))


def parse_registry_subset(text: str) -> dict | None:
    """{"sandboxes": {id: {key: value}}} for a file in the subset, else None."""
    sandboxes: dict[str, dict] = {}
    current: dict | None = None
    try:
        for line in text.splitlines():
            line = line.strip(" \t")
            if not line or line[0] == "#":
                continue
            if line[0] == "[":
                end = line.find("]")
                if (end < 0 or not line.startswith(_PREFIX) or line[1:2] == "["
                        or not _rest_is_comment(line[end + 1:])):
                    return None
                sandbox_id = line[len(_PREFIX):end]
                if not sandbox_id or not _BARE.issuperset(sandbox_id) or sandbox_id in sandboxes:
                    return None
                current = sandboxes[sandbox_id] = {}
                continue
            if current is None:
                return None  # a key outside any table
            key, eq, value = line.partition("=")
            key = key.rstrip(" \t")
            if not eq or not key or not _BARE.issuperset(key) or key in current:
                return None
            value = value.lstrip(" \t")
            if value[-1:] == '"' and value.count('"') == 2 and "\\" not in value:
                body = value[1:-1]  # the common line, `host = "10.0.0.7"`, inline
                if value[0] != '"' or not body.isprintable():
                    return None
                current[key] = body
            else:
                current[key] = _value(value)
    except ValueError:
        return None
    return {"sandboxes": sandboxes} if sandboxes else None
