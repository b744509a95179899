"""Configuration: the typed settings of one proxy, read from TOML and validated once at start-up.

Every key is documented in config/proxy.toml. Anything wrong (unknown section or key, wrong type,
value out of range) raises ConfigError naming the file, the key and the problem; the CLI turns that
into exit status 2. SANDBOX_PROXY_* environment variables (ENVIRONMENT_KEYS) and the command line
override single keys, validated the same way. proxy/config_schema.py derives the file's JSON Schema
from the dataclasses below.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, overload

from proxy.host import normalize_domain
from proxy.share import MIN_KEY_BYTES as MIN_SHARE_KEY_BYTES


class ConfigError(Exception):
    """A configuration or registry file is unusable; the message names file, key and problem."""


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    reload_interval: float = 10.0  # seconds between checks of the files; 0 = never


@dataclass(frozen=True)
class ServerConfig:
    listen: ListenAddress = ListenAddress("127.0.0.1", 8080)
    domains: frozenset[str] = frozenset({"localhost"})
    workers: int = 1  # 0 = one per CPU
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    backlog: int = 2048
    drain_delay: float = 5.0     # after SIGTERM: /readyz 503 while still accepting
    drain_timeout: float = 30.0  # then in-flight requests and streams get this long
    proxy_protocol: bool = False
    # HTTP/2: ALPN h2 on the TLS listener, prior-knowledge h2c on a plain one (proxy/h2_edge.py)
    http2: bool = True
    tls: TlsConfig | None = None


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class LogConfig:
    access: str = "json"  # json | text | off
    level: str = "info"
    format: str = "text"  # the diagnostic log on stderr: text | json (one object per line)


REGISTRY_KINDS = ("static", "dns", "redis")
REDIS_URL_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel",
                     "redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class RegistryConfig:
    kind: str = "static"  # static | dns | redis
    # static
    path: Path = Path("sandboxes.toml")
    reload_interval: float = 1.0  # 0 = never re-read the file
    # dns and redis: each remote look-up is bounded by this many seconds (then 503)
    timeout: float = 2.0
    # dns: <sandboxId>.<zone> A/AAAA (+ optional TXT) asked of these servers
    nameservers: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 53),)
    zone: str = "sandboxes.internal"
    negative_ttl: float = 5.0  # cap on how long an NXDOMAIN is remembered
    # redis: records as JSON under <prefix><sandboxId>
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "sandbox:"
    # auto-resume of paused sandboxes (record state = "paused", auto_resume = true)
    resume_url: str | None = None  # None = paused sandboxes are answered 502 not found
    resume_timeout: float = 30.0   # how long a request waits for the sandbox to run again


@dataclass(frozen=True)
class AdminConfig:
    listen: ListenAddress | None = None  # None = no admin listener
    token: str | None = field(default=None, repr=False)  # bearer token; never logged


@dataclass(frozen=True)
class MetricsConfig:
    listen: ListenAddress | None = ListenAddress("127.0.0.1", 9091)  # None = no listener
    # False: /readyz is 200 once the registry has loaded (answered once) until the drain.
    # True: also 503 whenever the registry's store is unreachable.
    ready_requires_registry: bool = False


@dataclass(frozen=True)
class TimeoutsConfig:
    connect: float = 5.0
    upstream_header: float = 60.0
    client_header: float = 10.0
    client_idle: float = 620.0
    upstream_idle: float = 610.0
    # an HTTP/2 response that cannot move (the client keeps its window shut) is reset after this
    client_send: float = 120.0


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Where sandboxes may live unless the operator says otherwise: private address space only.
# Loopback, link-local (cloud metadata 169.254.169.254) and public addresses must be allowed
# explicitly.
DEFAULT_ALLOWED_NETWORKS: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))


@dataclass(frozen=True)
class UpstreamConfig:
    connect_attempts: int = 4
    connect_backoff: float = 0.1
    max_idle_per_backend: int = 128
    allowed_networks: tuple[Network, ...] = DEFAULT_ALLOWED_NETWORKS
    # with a Host mask, a same-origin Origin/Referer follows it (proxy/origin.py); a record's
    # mask_origin overrides this
    mask_origin: bool = True


@dataclass(frozen=True)
class LimitsConfig:
    max_header_bytes: int = 65536
    max_header_count: int = 200
    max_request_line: int = 16384
    sandbox_connections: int = 0  # 0 = unlimited
    max_connections: int = 0      # 0 = unlimited
    # HTTP/2 (proxy/h2_edge.py): streams a client may have open, the request-body bytes it may
    # send ahead per stream and per connection (what the proxy buffers at most), and how many
    # frames that carry no request (PING, SETTINGS, PRIORITY, RST_STREAM, empty DATA, surplus
    # WINDOW_UPDATE) it may send per second before it is told to calm down (GOAWAY)
    http2_max_streams: int = 100
    http2_stream_window: int = 262144
    http2_connection_window: int = 1048576
    http2_max_control_frames: int = 1000


@dataclass(frozen=True)
class AccessConfig:
    token_header: str = "e2b-traffic-access-token"
    exempt_ports: frozenset[int] = frozenset({49983})
    forward_token: bool = False
    browser_cookie: bool = False
    cookie_name: str = "sandbox-access-token"
    query_parameter: str = "access_token"
    isolate_cookies: bool = True
    share_key: str = ""  # signs share links (proxy/share.py); "" = share links off


@dataclass(frozen=True)
class ActivityConfig:
    url: str | None = None  # webhook receiving the batched activity report; None = off
    interval: float = 30.0  # seconds between reports
    redis: bool = False     # write <prefix><id>:activity keys instead (Redis registry only)


@dataclass(frozen=True)
class RoutingConfig:
    header_routing: bool = False
    sandbox_id_header: str = "E2b-Sandbox-Id"
    sandbox_port_header: str = "E2b-Sandbox-Port"


@dataclass(frozen=True)
class CommandLine:
    """What the command line set: it wins over the environment and the file, on SIGHUP too."""
    listen: str | None = None     # --listen
    log_level: str | None = None  # --log-level


@dataclass(frozen=True)
class ProxyConfig:
    source: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    log: LogConfig = field(default_factory=LogConfig)
    activity: ActivityConfig = field(default_factory=ActivityConfig)
    overrides: CommandLine = field(default_factory=CommandLine)


def parse_listen(text: str) -> ListenAddress:
    """Parse `host:port` or `[v6]:port`; raise ValueError with the problem."""
    if not isinstance(text, str):
        raise ValueError("expected a string host:port")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    number = int(port)
    if not 0 <= number < 65536:
        raise ValueError(f"port {number} is out of range")
    return ListenAddress(host, number)


class _Section:
    """Reads the keys of one TOML table, remembering which were used so leftovers are errors."""

    def __init__(self, source: str, name: str, table: Any, origins: dict[str, str] | None = None):
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        self.source, self.name, self.table = source, name, table
        self.origins = origins or {}  # key -> environment variable it came from

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.origins.get(key, self.source)}: [{self.name}] {key}: {problem}")

    def get(self, key: str, default: Any, kind: type | tuple[type, ...],
            check: Callable[[Any], str | None] | None = None) -> Any:
        if key not in self.table:
            return default
        value = self.table[key]
        if isinstance(value, bool) and kind is not bool:
            raise self.fail(key, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        if check is not None and (problem := check(value)) is not None:
            raise self.fail(key, problem)
        return value

    def number(self, key: str, default: float, minimum: float = 0.0,
               allow_zero: bool = False) -> float:
        def check(v: float) -> str | None:
            if v < minimum or (v == 0 and not allow_zero):
                return f"must be {'>=' if allow_zero else '>'} {minimum}, got {v}"
            return None
        return float(self.get(key, default, (int, float), check))

    def integer(self, key: str, default: int, minimum: int, maximum: int | None = None) -> int:
        def check(v: int) -> str | None:
            if v < minimum or (maximum is not None and v > maximum):
                upper = f" and <= {maximum}" if maximum is not None else ""
                return f"must be >= {minimum}{upper}, got {v}"
            return None
        return self.get(key, default, int, check)

    # With a default and no allow_empty the answer is always an address (ServerConfig.listen).
    @overload
    def listen(self, key: str, default: ListenAddress,
               allow_empty: Literal[False] = False) -> ListenAddress: ...
    @overload
    def listen(self, key: str, default: ListenAddress | None,
               allow_empty: bool = False) -> ListenAddress | None: ...

    def listen(self, key: str, default: ListenAddress | None,
               allow_empty: bool = False) -> ListenAddress | None:
        text = self.get(key, None, str)
        if text is None:
            return default
        if text == "" and allow_empty:
            return None
        try:
            return parse_listen(text)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def finish(self, known: set[str]) -> None:
        unknown = sorted(set(self.table) - known)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def load_config(path: Path | str | None, listen_override: str | None = None, *,
                log_level: str | None = None,
                environ: Mapping[str, str] | None = None) -> ProxyConfig:
    """Read and validate the config file (None = built-in defaults), then apply the environment
    (ENVIRONMENT_KEYS) and the command line (--listen, --log-level), which wins over both."""
    source_path = Path(path) if path is not None else None
    data = read_toml(source_path) if source_path is not None else {}
    source = str(source_path) if source_path is not None else "<defaults>"
    base_dir = source_path.parent if source_path is not None else Path.cwd()
    data, origins = apply_environment(data, os.environ if environ is None else environ)
    parsers = {
        "server": lambda s: _parse_server(s, base_dir),
        "registry": lambda s: _parse_registry(s, base_dir),
        "admin": _parse_admin,
        "metrics": _parse_metrics,
        "timeouts": _parse_timeouts,
        "upstream": _parse_upstream,
        "limits": _parse_limits,
        "access": _parse_access,
        "routing": _parse_routing,
        "log": _parse_log,
        "activity": _parse_activity,
    }
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in parsers:
            raise ConfigError(f"{source}: [{name}]: unknown section")
        sections[name] = parsers[name](_Section(source, name, table, origins.get(name)))
    for name, parser in parsers.items():
        if name not in sections:
            sections[name] = parser(_Section(source, name, {}))
    if listen_override is not None:
        try:
            listen = parse_listen(listen_override)
        except ValueError as exc:
            raise ConfigError(f"--listen: {exc}") from None
        sections["server"] = replace(sections["server"], listen=listen)
    if sections["activity"].redis and sections["registry"].kind != "redis":
        raise ConfigError(f"{source}: [activity] redis: needs [registry] kind = \"redis\"")
    if log_level is not None:
        if log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"--log-level: must be {', '.join(LOG_LEVELS)}, got {log_level!r}")
        sections["log"] = replace(sections["log"], level=log_level.lower())
    return ProxyConfig(source=source_path, **sections,
                       overrides=CommandLine(listen_override, log_level))


def reload_config(config: ProxyConfig) -> ProxyConfig:
    """Read the config again (SIGHUP): the same file, environment and command line."""
    return load_config(config.source, config.overrides.listen,
                       log_level=config.overrides.log_level)


# The config file's path when --config is not given.
CONFIG_PATH_ENV = "SANDBOX_PROXY_CONFIG"
# Environment variables for the keys set per deployment (containers, Kubernetes): each one set
# (and not empty) replaces its key of the file, validated the same way; a problem names the
# variable and the key. Lists are comma- or space-separated. [admin] token has its own variable,
# ADMIN_TOKEN_ENV. Precedence: command line > environment > file > built-in default.
ENVIRONMENT_KEYS: dict[str, tuple[str, str, type]] = {
    "SANDBOX_PROXY_LISTEN": ("server", "listen", str),
    "SANDBOX_PROXY_DOMAINS": ("server", "domains", list),
    "SANDBOX_PROXY_WORKERS": ("server", "workers", int),
    "SANDBOX_PROXY_TRUSTED_PROXIES": ("server", "trusted_proxies", list),
    "SANDBOX_PROXY_METRICS_LISTEN": ("metrics", "listen", str),
    "SANDBOX_PROXY_ADMIN_LISTEN": ("admin", "listen", str),
    "SANDBOX_PROXY_REGISTRY_KIND": ("registry", "kind", str),
    "SANDBOX_PROXY_REGISTRY_PATH": ("registry", "path", str),
    "SANDBOX_PROXY_REGISTRY_URL": ("registry", "url", str),
    "SANDBOX_PROXY_REGISTRY_NAMESERVERS": ("registry", "nameservers", list),
    "SANDBOX_PROXY_REGISTRY_ZONE": ("registry", "zone", str),
    "SANDBOX_PROXY_RESUME_URL": ("registry", "resume_url", str),
    "SANDBOX_PROXY_ALLOWED_NETWORKS": ("upstream", "allowed_networks", list),
    "SANDBOX_PROXY_ACCESS_LOG": ("log", "access", str),
    "SANDBOX_PROXY_LOG_LEVEL": ("log", "level", str),
    "SANDBOX_PROXY_LOG_FORMAT": ("log", "format", str),
    "SANDBOX_PROXY_SHARE_KEY": ("access", "share_key", str),
}


def apply_environment(data: dict[str, Any], environ: Mapping[str, str],
                      ) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """The file's tables with ENVIRONMENT_KEYS applied, and {section: {key: variable}}."""
    origins: dict[str, dict[str, str]] = {}
    for variable, (section, key, kind) in ENVIRONMENT_KEYS.items():
        text = environ.get(variable, "").strip()
        if not text:
            continue
        value: Any = text
        if kind is list:
            value = text.replace(",", " ").split()
        elif kind is int and text.lstrip("-").isdigit():
            value = int(text)
        table = data.get(section, {})
        if isinstance(table, dict):  # anything else is reported as the file's problem
            data = {**data, section: {**table, key: value}}
            origins.setdefault(section, {})[key] = variable
    return data, origins


def _parse_activity(s: _Section) -> ActivityConfig:
    d = ActivityConfig()
    config = ActivityConfig(
        url=s.get("url", "", str, lambda v: None if not v else _check_http_url(v)) or None,
        interval=s.number("interval", d.interval, minimum=0.05),
        redis=s.get("redis", d.redis, bool),
    )
    s.finish({"url", "interval", "redis"})
    return config


def _parse_tls(s: _Section, base_dir: Path) -> TlsConfig:
    paths = {}
    for key in ("cert", "key"):
        text = s.get(key, None, str, lambda v: None if v else "must not be empty")
        if text is None:
            raise s.fail(key, "required when [server.tls] is present")
        path = Path(text) if Path(text).is_absolute() else base_dir / text
        if not path.is_file():
            raise s.fail(key, f"{path} is not a readable file")
        paths[key] = path
    config = TlsConfig(paths["cert"], paths["key"],
                       s.number("reload_interval", TlsConfig.reload_interval, allow_zero=True))
    s.finish({"cert", "key", "reload_interval"})
    return config


def _parse_log(s: _Section) -> LogConfig:
    d = LogConfig()
    config = LogConfig(
        access=s.get("access", d.access, str, lambda v: None if v in ("json", "text", "off")
                      else f"must be json, text or off, got {v!r}"),
        level=s.get("level", d.level, str, lambda v: None if v in LOG_LEVELS
                    else f"must be debug, info, warning or error, got {v!r}"),
        format=s.get("format", d.format, str, lambda v: None if v in LOG_FORMATS
                     else f"must be text or json, got {v!r}"),
    )
    s.finish({"access", "level", "format"})
    return config


def _parse_server(s: _Section, base_dir: Path) -> ServerConfig:
    d = ServerConfig()

    def check_domains(v: list) -> str | None:
        if not v:
            return "must list at least one domain"
        for item in v:
            if not isinstance(item, str) or not normalize_domain(item):
                return f"{item!r} is not a domain name"
        return None

    domains = s.get("domains", None, list, check_domains)
    trusted = []
    for item in s.get("trusted_proxies", [], list):
        try:
            trusted.append(_ip_network(item))
        except (TypeError, ValueError):
            raise s.fail("trusted_proxies", f"{item!r} is not an IP address or CIDR") from None
    workers = s.integer("workers", d.workers, 0, 1024)
    config = ServerConfig(
        listen=s.listen("listen", d.listen),
        domains=frozenset(normalize_domain(x) for x in domains) if domains else d.domains,
        workers=workers or (os.cpu_count() or 1),
        trusted_proxies=tuple(trusted),
        backlog=s.integer("backlog", d.backlog, 1, 1 << 20),
        drain_delay=s.number("drain_delay", d.drain_delay, allow_zero=True),
        drain_timeout=s.number("drain_timeout", d.drain_timeout, allow_zero=True),
        proxy_protocol=s.get("proxy_protocol", d.proxy_protocol, bool),
        http2=s.get("http2", d.http2, bool),
        tls=(_parse_tls(_Section(s.source, "server.tls", s.table["tls"]), base_dir)
             if "tls" in s.table else None),
    )
    s.finish({"listen", "domains", "workers", "trusted_proxies", "backlog", "drain_delay",
              "drain_timeout", "proxy_protocol", "http2", "tls"})
    return config


def _parse_registry(s: _Section, base_dir: Path) -> RegistryConfig:
    d = RegistryConfig()
    kind = s.get("kind", d.kind, str,
                 lambda v: None if v in REGISTRY_KINDS
                 else f"unknown kind {v!r} (supported: {', '.join(REGISTRY_KINDS)})")
    path = Path(s.get("path", str(d.path), str, lambda v: None if v else "must not be empty"))
    zone = s.get("zone", d.zone, str, _check_zone)
    resume_url = s.get("resume_url", "", str, _check_http_url) or None
    config = RegistryConfig(
        kind=kind,
        path=path if path.is_absolute() else base_dir / path,
        reload_interval=s.number("reload_interval", d.reload_interval, allow_zero=True),
        timeout=s.number("timeout", d.timeout),
        nameservers=_nameservers(s, d.nameservers),
        zone=normalize_domain(zone),
        negative_ttl=s.number("negative_ttl", d.negative_ttl, allow_zero=True),
        url=s.get("url", d.url, str, _check_redis_url),
        prefix=s.get("prefix", d.prefix, str,
                     lambda v: None if v and "*" not in v and "?" not in v and "[" not in v
                     else "must be non-empty, without glob characters (* ? [)"),
        resume_url=resume_url,
        resume_timeout=s.number("resume_timeout", d.resume_timeout),
    )
    s.finish({"kind", "path", "reload_interval", "timeout", "nameservers", "zone",
              "negative_ttl", "url", "prefix", "resume_url", "resume_timeout"})
    return config


def _nameservers(s: _Section, default: tuple[ListenAddress, ...]) -> tuple[ListenAddress, ...]:
    """`["10.0.0.2", "127.0.0.1:5353", "[::1]:53"]`: IP addresses, port 53 unless given."""
    items = s.get("nameservers", None, list,
                  lambda v: None if v else "must list at least one server")
    if items is None:
        return default
    servers = []
    for item in items:
        if not isinstance(item, str):
            raise s.fail("nameservers", f"{item!r} is not an IP address or IP:port")
        try:
            address = ListenAddress(str(ipaddress.ip_address(item)), 53)
        except ValueError:
            try:
                address = parse_listen(item)
                ipaddress.ip_address(address.host)
            except ValueError:
                raise s.fail("nameservers",
                             f"{item!r} is not an IP address or IP:port") from None
        servers.append(address)
    return tuple(servers)


def _check_zone(v: str) -> str | None:
    labels = normalize_domain(v).split(".")
    if not all(0 < len(label) < 64 and label.isascii()
               and all(c.isalnum() or c in "-_" for c in label) for label in labels):
        return f"{v!r} is not a domain name"
    return None


def _check_http_url(v: str) -> str | None:
    if v == "":
        return None
    scheme, sep, rest = v.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or rest.startswith("/"):
        return f"expected an http:// or https:// URL, got {v!r}"
    return None


def _check_redis_url(v: str) -> str | None:
    scheme, sep, rest = v.partition("://")
    if not sep or scheme not in REDIS_URL_SCHEMES or not rest:
        return (f"expected a URL with scheme {', '.join(REDIS_URL_SCHEMES)}, got {v!r}")
    if "sentinel" in scheme:
        hosts, _, path = rest.rpartition("@")[2].partition("/")
        if not hosts or not path.split("/")[0]:
            return "a sentinel URL is redis+sentinel://host:port[,host:port]/<service>[/<db>]"
    return None


def _parse_admin(s: _Section) -> AdminConfig:
    listen = s.listen("listen", None, allow_empty=True)
    token = s.get("token", None, str)
    from_env = os.environ.get(ADMIN_TOKEN_ENV)
    if from_env:
        token = from_env
    if listen is not None:
        if not token:
            raise s.fail("token", f"required when listen is set (or set {ADMIN_TOKEN_ENV})")
        if len(token) < 16 or any(c.isspace() for c in token) or not token.isascii():
            raise s.fail("token", "must be at least 16 ASCII characters without spaces"
                         + (f" (from {ADMIN_TOKEN_ENV})" if from_env else ""))
    s.finish({"listen", "token"})
    return AdminConfig(listen=listen, token=token or None)


ADMIN_TOKEN_ENV = "SANDBOX_PROXY_ADMIN_TOKEN"


def _parse_metrics(s: _Section) -> MetricsConfig:
    d = MetricsConfig()
    config = MetricsConfig(listen=s.listen("listen", d.listen, allow_empty=True),
                           ready_requires_registry=s.get("ready_requires_registry",
                                                         d.ready_requires_registry, bool))
    s.finish({"listen", "ready_requires_registry"})
    return config


def _parse_timeouts(s: _Section) -> TimeoutsConfig:
    d = TimeoutsConfig()
    names = ("connect", "upstream_header", "client_header", "client_idle", "upstream_idle",
             "client_send")
    config = TimeoutsConfig(**{n: s.number(n, getattr(d, n)) for n in names})
    s.finish(set(names))
    return config


def _ip_network(item: Any) -> Network:
    """An IP address or CIDR, as a string: ipaddress would read an integer as an address."""
    if not isinstance(item, str):
        raise TypeError(f"{item!r} is not a string")
    return ipaddress.ip_network(item, strict=False)


def _networks(s: _Section, key: str, default: tuple[Network, ...]) -> tuple[Network, ...]:
    if key not in s.table:
        return default
    networks = []
    for item in s.get(key, [], list):
        try:
            networks.append(_ip_network(item))
        except (TypeError, ValueError):
            raise s.fail(key, f"{item!r} is not an IP address or CIDR") from None
    return tuple(networks)


def _parse_upstream(s: _Section) -> UpstreamConfig:
    d = UpstreamConfig()
    config = UpstreamConfig(
        connect_attempts=s.integer("connect_attempts", d.connect_attempts, 1, 100),
        connect_backoff=s.number("connect_backoff", d.connect_backoff, allow_zero=True),
        max_idle_per_backend=s.integer("max_idle_per_backend", d.max_idle_per_backend, 0),
        allowed_networks=_networks(s, "allowed_networks", d.allowed_networks),
        mask_origin=s.get("mask_origin", d.mask_origin, bool),
    )
    s.finish({"connect_attempts", "connect_backoff", "max_idle_per_backend", "allowed_networks",
              "mask_origin"})
    return config


def _parse_limits(s: _Section) -> LimitsConfig:
    d = LimitsConfig()
    config = LimitsConfig(
        max_header_bytes=s.integer("max_header_bytes", d.max_header_bytes, 1024, 1 << 24),
        max_header_count=s.integer("max_header_count", d.max_header_count, 1, 100_000),
        max_request_line=s.integer("max_request_line", d.max_request_line, 256, 1 << 24),
        sandbox_connections=s.integer("sandbox_connections", d.sandbox_connections, 0),
        max_connections=s.integer("max_connections", d.max_connections, 0),
        http2_max_streams=s.integer("http2_max_streams", d.http2_max_streams, 1, 10_000),
        http2_stream_window=s.integer("http2_stream_window", d.http2_stream_window, 65535,
                                      (1 << 31) - 1),
        http2_connection_window=s.integer("http2_connection_window", d.http2_connection_window,
                                          65535, (1 << 31) - 1),
        http2_max_control_frames=s.integer("http2_max_control_frames",
                                           d.http2_max_control_frames, 10, 1_000_000),
    )
    s.finish({"max_header_bytes", "max_header_count", "max_request_line",
              "sandbox_connections", "max_connections", "http2_max_streams",
              "http2_stream_window", "http2_connection_window", "http2_max_control_frames"})
    return config


def _header_name(v: str) -> str | None:
    if not v or not all(c.isascii() and (c.isalnum() or c in "-_") for c in v):
        return f"{v!r} is not an HTTP header name"
    return None


def _parse_access(s: _Section) -> AccessConfig:
    d = AccessConfig()
    ports = s.get("exempt_ports", sorted(d.exempt_ports), list,
                  lambda v: None if all(isinstance(p, int) and not isinstance(p, bool)
                                        and 0 < p < 65536 for p in v)
                  else "must be a list of ports (1-65535)")
    config = AccessConfig(
        token_header=s.get("token_header", d.token_header, str, _header_name).lower(),
        exempt_ports=frozenset(ports),
        forward_token=s.get("forward_token", d.forward_token, bool),
        browser_cookie=s.get("browser_cookie", d.browser_cookie, bool),
        isolate_cookies=s.get("isolate_cookies", d.isolate_cookies, bool),
        share_key=_share_key(s),
        cookie_name=s.get("cookie_name", d.cookie_name, str, _header_name),
        query_parameter=s.get("query_parameter", d.query_parameter, str, _header_name),
    )
    s.finish({"token_header", "exempt_ports", "forward_token", "browser_cookie", "isolate_cookies",
              "cookie_name", "query_parameter", "share_key"})
    return config


def _share_key(s: _Section) -> str:
    """`share_key` (SANDBOX_PROXY_SHARE_KEY in ENVIRONMENT_KEYS wins over the file: a secret
    belongs in the environment of a container, not in a mounted file)."""
    key: str = s.get("share_key", "", str)
    if key and len(key.encode()) < MIN_SHARE_KEY_BYTES:
        raise s.fail("share_key", f"must be at least {MIN_SHARE_KEY_BYTES} bytes (or empty)")
    return key


def _parse_routing(s: _Section) -> RoutingConfig:
    d = RoutingConfig()
    config = RoutingConfig(
        header_routing=s.get("header_routing", d.header_routing, bool),
        sandbox_id_header=s.get("sandbox_id_header", d.sandbox_id_header, str, _header_name),
        sandbox_port_header=s.get("sandbox_port_header", d.sandbox_port_header, str,
                                  _header_name),
    )
    s.finish({"header_routing", "sandbox_id_header", "sandbox_port_header"})
    return config
