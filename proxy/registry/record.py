"""SandboxRecord: one sandbox's routing facts (backend host, port map, Host mask)."""

from __future__ import annotations

from typing import Any, Mapping

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


class SandboxRecord:
    """Where a sandbox's ports are served and what Host its backend expects."""

    __slots__ = ("sandbox_id", "host", "ports", "mask_request_host", "_masks")

    def __init__(self, sandbox_id: str, host: str, ports: Mapping[int, int] | None = None,
                 mask_request_host: str | None = None):
        self.sandbox_id = sandbox_id
        self.host = host
        self.ports = dict(ports or {})
        self.mask_request_host = mask_request_host
        self._masks: dict[int, bytes] = {}

    def backend_port(self, port: int) -> int:
        """The backend port behind sandbox port `port` (the same unless the record maps it)."""
        return self.ports.get(port, port)

    def masked_host(self, port: int) -> bytes | None:
        """The Host header the backend sees for `port`, or None to pass the client's Host."""
        mask = self.mask_request_host
        if mask is None:
            return None
        value = self._masks.get(port)
        if value is None:
            value = self._masks[port] = mask.replace("${PORT}", str(port)).encode("latin-1")
        return value

    def same_backend(self, other: "SandboxRecord") -> bool:
        """True when `other` routes to the same addresses (connections to it may stay open)."""
        return self.host == other.host and self.ports == other.ports

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SandboxRecord) and self.sandbox_id == other.sandbox_id
                and self.same_backend(other) and self.mask_request_host == other.mask_request_host)

    def __repr__(self) -> str:
        return f"SandboxRecord({self.sandbox_id!r}, host={self.host!r}, ports={self.ports!r})"


def record_from_mapping(sandbox_id: str, data: Any) -> SandboxRecord:
    """Validate one registry entry; raise ValueError('<key>: <problem>') when it is unusable."""
    if not sandbox_id or not _ID_CHARS.issuperset(sandbox_id):
        raise ValueError("sandbox id must match ^[a-z0-9]+$")
    if not isinstance(data, dict):
        raise ValueError("must be a table")
    unknown = sorted(set(data) - {"host", "ports", "mask_request_host"})
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
    return SandboxRecord(sandbox_id, host.strip(), ports, mask)
