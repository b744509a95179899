"""SandboxRecord: one sandbox's routing facts (backend host, port map, Host mask and whether Origin
follows it, access token, lifecycle state, ingress rules, public ports, blocked paths, share
epoch) and the validation every registry kind applies to them."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from proxy.host import SANDBOX_ID_CHARS

_HOST = re.compile(r"[^\s/]+")  # a host name or address: no whitespace, no slash
_PLAIN_MASK = re.compile(r"[!-~]+")  # a Host mask of visible ASCII (what the fast path takes)
_NO_PORTS: Mapping[int, int] = MappingProxyType({})  # shared: a million records, one empty map
STATES = ("running", "paused", "pausing", "resuming")
TRANSITIONS = frozenset({"pausing", "resuming"})
ALL_PORTS = 0  # the key of `allowed_clients` rules that apply to every port ("*")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RecordOptions:
    """The settings most records lack, kept apart so a registry of a million sandboxes does not
    pay a slot per setting per record: one shared NO_OPTIONS serves every record without any."""

    __slots__ = ("allowed_clients", "public_ports", "blocked_paths", "share_epoch",
                 "mask_origin")

    def __init__(self) -> None:
        # Client networks allowed to reach the sandbox, by port (ALL_PORTS: every port without
        # rules of its own); None: everyone.
        self.allowed_clients: Mapping[int, tuple[Network, ...]] | None = None
        # ports that need no traffic token (None: [access] exempt_ports decides)
        self.public_ports: frozenset[int] | None = None
        # port -> path prefixes answered 404 without reaching the sandbox (control plane only)
        self.blocked_paths: Mapping[int, tuple[str, ...]] | None = None
        self.share_epoch = 0  # share links minted under an older epoch are revoked
        # a same-origin Origin/Referer follows the Host mask (proxy/origin.py); None: as
        # [upstream] mask_origin says
        self.mask_origin: bool | None = None

    def key(self) -> tuple[object, ...]:
        return (self.allowed_clients, self.public_ports, self.blocked_paths, self.share_epoch,
                self.mask_origin)


NO_OPTIONS = RecordOptions()  # shared, never modified


class SandboxRecord:
    """Where a sandbox's ports are served and what Host its backend expects."""

    __slots__ = ("sandbox_id", "host", "ports", "mask_request_host", "token_sha256", "paused",
                 "state", "auto_resume", "options", "_masks")

    def __init__(self, sandbox_id: str, host: str, ports: Mapping[int, int] | None = None,
                 mask_request_host: str | None = None, token_sha256: bytes | None = None,
                 paused: bool = False, auto_resume: bool = False, state: str | None = None,
                 options: RecordOptions = NO_OPTIONS):
        self.sandbox_id = sandbox_id
        self.host = host
        self.ports = dict(ports) if ports else _NO_PORTS
        self.mask_request_host = mask_request_host
        self.token_sha256 = token_sha256  # SHA-256 digest of the traffic access token, if any
        # running | paused | pausing | resuming; anything but running is not served as it is
        self.state = state if state is not None else ("paused" if paused else "running")
        self.paused = self.state != "running"
        self.auto_resume = auto_resume
        self.options = options
        self._masks: dict[int, bytes] | None = None  # made on first use

    # the options, read as the record's own (the request path reads `options` once instead)
    @property
    def allowed_clients(self) -> Mapping[int, tuple[Network, ...]] | None:
        return self.options.allowed_clients

    @property
    def public_ports(self) -> frozenset[int] | None:
        return self.options.public_ports

    @property
    def blocked_paths(self) -> Mapping[int, tuple[str, ...]] | None:
        return self.options.blocked_paths

    @property
    def share_epoch(self) -> int:
        return self.options.share_epoch

    @property
    def mask_origin(self) -> bool | None:
        return self.options.mask_origin

    def client_allowed(self, port: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address
                       | None) -> bool:
        """Whether a client at `address` may reach `port` (an unknown address may not, where
        rules apply)."""
        rules = self.allowed_clients
        if rules is None:
            return True
        networks = rules.get(port)
        if networks is None:
            networks = rules.get(ALL_PORTS)
            if networks is None:
                return True
        if address is None:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in networks)

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

    def same_backend(self, other: SandboxRecord) -> bool:
        """True when `other` routes to the same addresses (connections to it may stay open)."""
        return self.host == other.host and self.ports == other.ports

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SandboxRecord) and self.sandbox_id == other.sandbox_id
                and self.same_backend(other) and self.mask_request_host == other.mask_request_host
                and self.token_sha256 == other.token_sha256 and self.state == other.state
                and self.auto_resume == other.auto_resume
                and self.options.key() == other.options.key()
                and self.mask_origin == other.mask_origin)

    def to_mapping(self) -> dict[str, Any]:
        """The JSON/TOML shape record_from_mapping accepts (the token only as its hash)."""
        data: dict[str, Any] = {"host": self.host}
        if self.ports:
            data["ports"] = {str(k): v for k, v in self.ports.items()}
        if self.mask_request_host is not None:
            data["mask_request_host"] = self.mask_request_host
        if self.mask_origin is not None:
            data["mask_origin"] = self.mask_origin
        if self.token_sha256 is not None:
            data["traffic_access_token_sha256"] = self.token_sha256.hex()
        if self.state != "running":
            data["state"] = self.state
        if self.auto_resume:
            data["auto_resume"] = True
        if self.allowed_clients is not None:
            rules = {("*" if port == ALL_PORTS else str(port)): [str(n) for n in networks]
                     for port, networks in sorted(self.allowed_clients.items())}
            data["allowed_clients"] = (rules["*"] if list(rules) == ["*"] else rules)
        if self.public_ports is not None:
            data["public_ports"] = sorted(self.public_ports)
        if self.blocked_paths is not None:
            data["blocked_paths"] = {str(port): list(prefixes)
                                     for port, prefixes in sorted(self.blocked_paths.items())}
        if self.share_epoch:
            data["share_epoch"] = self.share_epoch
        return data

    def __repr__(self) -> str:
        return f"SandboxRecord({self.sandbox_id!r}, host={self.host!r}, ports={self.ports!r})"


def record_from_mapping(sandbox_id: str, data: Any) -> SandboxRecord:
    """Validate one registry entry; raise ValueError('<key>: <problem>') when it is unusable."""
    if type(data) is dict and len(data) <= 2:
        # the common entries: a host, or a host and a Host mask (fast path; anything it does not
        # accept is judged below, which accepts all it accepts, with the same record)
        host = data.get("host")
        mask = data.get("mask_request_host")
        if (type(host) is str and _HOST.fullmatch(host) and sandbox_id
                and (len(data) == 1 or (type(mask) is str and _PLAIN_MASK.fullmatch(mask)))
                and SANDBOX_ID_CHARS.issuperset(sandbox_id)):
            return SandboxRecord(sandbox_id, host, None, mask)
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
    if state not in STATES:
        raise ValueError("state: must be one of " + ", ".join(f'"{s}"' for s in STATES))
    auto_resume = data.get("auto_resume", False)
    if not isinstance(auto_resume, bool):
        raise ValueError("auto_resume: must be true or false")
    record = SandboxRecord(sandbox_id, host.strip(), ports, mask, digest,
                           auto_resume=auto_resume, state=state)
    if not _COMMON_KEYS.issuperset(data):  # the rarer keys, looked at only when present
        _apply_options(record, data)
    return record


_COMMON_KEYS = frozenset({"host", "ports", "mask_request_host", "traffic_access_token",
                          "traffic_access_token_sha256", "state", "auto_resume"})


def _apply_options(record: SandboxRecord, data: dict[str, Any]) -> None:
    """The keys most records lack (a registry of a million sandboxes pays for them only where
    they are present)."""
    record.options = options = RecordOptions()
    allowed = data.get("allowed_clients")
    if allowed is not None:
        options.allowed_clients = _ingress_rules(allowed)
    public = data.get("public_ports")
    if public is not None:
        if not isinstance(public, list) or not all(_is_port(p) for p in public):
            raise ValueError("public_ports: must be a list of ports (1-65535)")
        options.public_ports = frozenset(public)
    blocked = data.get("blocked_paths")
    if blocked is not None:
        options.blocked_paths = _blocked_paths(blocked)
    epoch = data.get("share_epoch", 0)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError("share_epoch: must be an integer >= 0")
    options.share_epoch = epoch
    mask_origin = data.get("mask_origin")
    if mask_origin is not None and not isinstance(mask_origin, bool):
        raise ValueError("mask_origin: must be true or false")
    options.mask_origin = mask_origin


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def _blocked_paths(value: Any) -> dict[int, tuple[str, ...]]:
    """`blocked_paths`: a table of port -> list of path prefixes, each starting with `/`."""
    if not isinstance(value, dict):
        raise ValueError("blocked_paths: must be a table of port = list of path prefixes")
    rules = {}
    for key, prefixes in value.items():
        if not (isinstance(key, str) and key.isdigit() and 0 < int(key) < 65536):
            raise ValueError(f"blocked_paths: {key!r} is not a port (1-65535)")
        if not isinstance(prefixes, list) or not all(
                isinstance(p, str) and p.startswith("/") and p.isascii() and p.isprintable()
                for p in prefixes):
            raise ValueError(f"blocked_paths.{key}: must be a list of paths starting with /")
        rules[int(key)] = tuple(prefixes)
    return rules


def _networks(value: Any, where: str) -> tuple[Network, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: must be a list of CIDRs or addresses")
    networks: list[Network] = []
    for item in value:
        network = None
        if isinstance(item, str):
            try:
                network = ipaddress.ip_network(item, strict=False)
            except ValueError:
                pass
        if network is None:
            raise ValueError(f"{where}: {item!r} is not a CIDR or an IP address")
        networks.append(network)
    return tuple(networks)


def _ingress_rules(value: Any) -> dict[int, tuple[Network, ...]]:
    """`allowed_clients`: a list of CIDRs for every port, or a table of port (or "*") -> list."""
    if isinstance(value, list):
        return {ALL_PORTS: _networks(value, "allowed_clients")}
    if not isinstance(value, dict):
        raise ValueError("allowed_clients: must be a list of CIDRs or a table of port = list")
    rules = {}
    for key, networks in value.items():
        if key == "*":
            port = ALL_PORTS
        elif isinstance(key, str) and key.isdigit() and 0 < int(key) < 65536:
            port = int(key)
        else:
            raise ValueError(f"allowed_clients: {key!r} is not a port (1-65535) or \"*\"")
        rules[port] = _networks(networks, f"allowed_clients.{key}")
    return rules


RECORD_KEYS = frozenset({"host", "ports", "mask_request_host", "traffic_access_token",
                         "traffic_access_token_sha256", "state", "auto_resume",
                         "allowed_clients", "public_ports", "blocked_paths", "share_epoch",
                         "mask_origin"})
