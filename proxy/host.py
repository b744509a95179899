"""Host parsing: turns a request's Host header into the sandbox port and id it names.

The rules are those users already rely on (shared/reference/behaviour.md): the first label is
`<port>-<sandboxId>` (or the older `<port>-<sandboxId>-<clientId>`, whose client id is ignored),
the port a decimal TCP port, the id `^[a-z0-9]+$`; comparison is
case-insensitive, the Host's own `:port` and a trailing dot are ignored, and what follows the first
label must be one of the configured base domains. Pure functions only: no I/O, no config objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class InvalidHost(ValueError):
    """The Host header does not name a sandbox under a served domain (answered with 400)."""


class SandboxAddress(NamedTuple):
    port: int
    sandbox_id: str


SANDBOX_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")  # ^[a-z0-9]+$
# What a Host may contain here: DNS names, a :port, bracketed IPv6 literals. Anything else
# (non-ASCII such as \xa0, which str.strip() and str.lower() would quietly fold away,
# percent-encoding, `@`)
# is refused before any other rule looks at it.
HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]")
_HOST_BYTES = "".join(sorted(HOST_CHARS)).encode()


def host_chars_valid(raw_host: bytes) -> bool:
    """Whether a Host value (spaces or tabs around it allowed) uses only HOST_CHARS."""
    return not raw_host.strip(b" \t").translate(None, _HOST_BYTES)


def normalize_domain(domain: str) -> str:
    """The form in which base domains are compared: lower case, no trailing dot."""
    return domain.strip().lower().rstrip(".")


def strip_host_port(host: str) -> str:
    """Drop the `:port` a Host header may carry (IPv6 literals keep their brackets)."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise InvalidHost("unterminated IPv6 literal")
        rest = host[end + 1 :]
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            raise InvalidHost("malformed port")
        return host[: end + 1]
    name, colon, port = host.rpartition(":")
    if not colon:
        return host
    if not port.isascii() or not port.isdigit():
        raise InvalidHost("malformed port")
    return name


def parse_sandbox_host(raw_host: str, domains: Iterable[str]) -> SandboxAddress:
    """Return the sandbox port and id that `raw_host` names, or raise InvalidHost.

    `domains` must already be normalized (see normalize_domain); a set makes the check O(1).
    """
    host = raw_host.strip(" \t")
    if not HOST_CHARS.issuperset(host):
        raise InvalidHost("host has characters outside [A-Za-z0-9.:-]")
    host = strip_host_port(host.lower())
    if host.endswith("."):
        host = host[:-1]
    label, dot, domain = host.partition(".")
    if not dot:
        raise InvalidHost("host has no domain")
    if domain not in domains:
        raise InvalidHost("domain is not served here")
    port_text, dash, rest = label.partition("-")
    # `<port>-<sandboxId>-<clientId>`, the older form: what follows the second `-` is ignored
    sandbox_id = rest.partition("-")[0]
    if not dash:
        raise InvalidHost("first label is not <port>-<sandboxId>")
    if not (0 < len(port_text) <= 5 and port_text.isascii() and port_text.isdigit()):
        raise InvalidHost("port is not a decimal number")
    port = int(port_text)
    if not 0 < port < 65536:
        raise InvalidHost("port is out of range")
    if not sandbox_id or not SANDBOX_ID_CHARS.issuperset(sandbox_id):
        raise InvalidHost("sandbox id is not [a-z0-9]+")
    return SandboxAddress(port, sandbox_id)
