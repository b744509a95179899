"""SandboxRecord: one sandbox's routing facts (backend host, port map, Host mask, access token,
paused state) and the validation every registry kind applies to them."""

from __future__ import annotations

import hashlib
import re
from types import MappingProxyType
from typing import Any, Mapping

from proxy.host import SANDBOX_ID_CHARS

_HOST = re.compile(r"[^\s/]+")  # a host name or address: no whitespace, no slash
_NO_PORTS: Mapping[int, int] = MappingProxyType({})  # shared: a million records, one empty map


class SandboxRecord:
    """Where a sandbox's ports are served and what Host its backend expects."""

    __slots__ = ("sandbox_id", "host", "ports", "mask_request_host", "token_sha256", "paused",
                 "auto_resume", "_masks")

    def __init__(self, sandbox_id: str, host: str, ports: Mapping[int, int] | None = None,
                 mask_request_host: str | None = None, token_sha256: bytes | None = None,
                 paused: bool = False, auto_resume: bool = False):
        self.sandbox_id = sandbox_id
        self.host = host
        self.ports = dict(ports) if ports else _NO_PORTS
        self.mask_request_host = mask_request_host
        self.token_sha256 = token_sha256  # SHA-256 digest of the traffic access token, if any
        self.paused = paused
        self.auto_resume = auto_resume
        self._masks: dict[int, bytes] | None = None  # made on first use

    def backend_port(self, port: int) -> int:
        """The backend port behind sandbox port `port` (the same unless the record maps it)."""
        return self.ports.get(port, port)

    def masked_host(self, port: int) -> bytes | None:
        """The Host header the backend sees for `port`, or None to pass the client's Host."""
        mask = self.mask_request_host
        if mask is None:
            return None
        masks = self._masks
        if masks is None:
            masks = self._masks = {}
        value = masks.get(port)
        if value is None:
            value = masks[port] = mask.replace("${PORT}", str(port)).encode("latin-1")
        return value

    def same_backend(self, other: "SandboxRecord") -> bool:
        """True when `other` routes to the same addresses (connections to it may stay open)."""
        return self.host == other.host and self.ports == other.ports

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SandboxRecord) and self.sandbox_id == other.sandbox_id
                and self.same_backend(other) and self.mask_request_host == other.mask_request_host
                and self.token_sha256 == other.token_sha256 and self.paused == other.paused
                and self.auto_resume == other.auto_resume)

    def to_mapping(self) -> dict[str, Any]:
        """The JSON/TOML shape record_from_mapping accepts (the token only as its hash)."""
        data: dict[str, Any] = {"host": self.host}
        if self.ports:
            data["ports"] = {str(k): v for k, v in self.ports.items()}
        if self.mask_request_host is not None:
            data["mask_request_host"] = self.mask_request_host
        if self.token_sha256 is not None:
            data["traffic_access_token_sha256"] = self.token_sha256.hex()
        if self.paused:
            data["state"] = "paused"
        if self.auto_resume:
            data["auto_resume"] = True
        return data

    def __repr__(self) -> str:
        return f"SandboxRecord({self.sandbox_id!r}, host={self.host!r}, ports={self.ports!r})"


def record_from_mapping(sandbox_id: str, data: Any) -> SandboxRecord:
    """Validate one registry entry; raise ValueError('<key>: <problem>') when it is unusable."""
    if type(data) is dict and len(data) == 1:  # the common entry: just a host (fast path)
        host = data.get("host")
        if (type(host) is str and _HOST.fullmatch(host) and sandbox_id
                and SANDBOX_ID_CHARS.issuperset(sandbox_id)):
            return SandboxRecord(sandbox_id, host)
    if not sandbox_id or not SANDBOX_ID_CHARS.issuperset(sandbox_id):
        raise ValueError("sandbox id must match ^[a-z0-9]+$")
    if not isinstance(data, dict):
        raise ValueError("must be a table")
    unknown = sorted(set(data) - RECORD_KEYS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key")
    host = data.get("host")
    if not isinstance(host, str) or not host.strip() or any(c in host for c in " /\r\n"):
        raise ValueError("host: required, a host name or IP address")
    mask = data.get("mask_request_host")
    if mask is not None:
        if not isinstance(mask, str) or not mask or any(c in mask for c in "\r\n\0 "):
            raise ValueError("mask_request_host: must be a non-empty Host value")
        try:
            mask.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("mask_request_host: must be ASCII (use punycode)") from None
    ports: dict[int, int] = {}
    raw_ports = data.get("ports", {})
    if not isinstance(raw_ports, dict):
        raise ValueError("ports: must be a table of sandbox port = backend port")
    for key, value in raw_ports.items():
        if not (isinstance(key, str) and key.isdigit() and 0 < int(key) < 65536):
            raise ValueError(f"ports: {key!r} is not a port (1-65535)")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ValueError(f"ports: {key} = {value!r} is not a port (1-65535)")
        ports[int(key)] = value
    token = data.get("traffic_access_token")
    token_hash = data.get("traffic_access_token_sha256")
    if token is not None and token_hash is not None:
        raise ValueError("traffic_access_token: give the token or its sha256, not both")
    digest = None
    if token is not None:
        if not isinstance(token, str) or not token:
            raise ValueError("traffic_access_token: must be a non-empty string")
        digest = hashlib.sha256(token.encode()).digest()
    elif token_hash is not None:
        try:
            digest = bytes.fromhex(token_hash) if isinstance(token_hash, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError("traffic_access_token_sha256: must be 64 hex digits")
    state = data.get("state", "running")
    if state not in ("running", "paused"):
        raise ValueError("state: must be \"running\" or \"paused\"")
    auto_resume = data.get("auto_resume", False)
    if not isinstance(auto_resume, bool):
        raise ValueError("auto_resume: must be true or false")
    return SandboxRecord(sandbox_id, host.strip(), ports, mask, digest, state == "paused",
                         auto_resume)


RECORD_KEYS = frozenset({"host", "ports", "mask_request_host", "traffic_access_token",
                         "traffic_access_token_sha256", "state", "auto_resume"})
