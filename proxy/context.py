"""EdgeContext: what every client connection of one process shares (settings resolved once from
the config, the registry, the upstream pools, the deadline sweeper, counters and per-sandbox
slots)."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field

from proxy import share
from proxy.accesslog import AccessLog
from proxy.config import ProxyConfig
from proxy.pools import UpstreamPools
from proxy.registry import Registry, can_resume
from proxy.stats import Stats
from proxy.timeouts import DeadlineSweeper


@dataclass
class EdgeContext:
    loop: asyncio.AbstractEventLoop
    config: ProxyConfig
    registry: Registry
    pools: UpstreamPools
    sweeper: DeadlineSweeper
    stats: Stats
    access_log: AccessLog
    scheme: bytes = b"http"
    draining: bool = False
    connections: set = field(default_factory=set)
    # sandbox id -> requests in flight + open streams (only when limits.sandbox_connections > 0)
    sandbox_slots: dict = field(default_factory=dict)
    # sandbox id -> loop time of its last forwarded request ([activity] reporting), None: off
    activity_seen: dict | None = None

    def __post_init__(self) -> None:
        self.can_resume = can_resume(self.registry)  # [registry] resume_url is set
        self.apply(self.config)

    def apply(self, c: ProxyConfig) -> None:
        """Adopt the settings that may change while serving (SIGHUP reload)."""
        self.config = c
        self.domains = c.server.domains
        self.trusted_proxies = c.server.trusted_proxies
        self.client_header_timeout = c.timeouts.client_header
        self.client_idle_timeout = c.timeouts.client_idle
        self.upstream_header_timeout = c.timeouts.upstream_header
        self.max_header_bytes = c.limits.max_header_bytes
        self.max_header_count = c.limits.max_header_count
        self.max_request_line = c.limits.max_request_line
        self.sandbox_limit = c.limits.sandbox_connections
        self.max_connections = c.limits.max_connections
        self.token_header = c.access.token_header.encode()
        self.token_header_name = c.access.token_header
        self.exempt_ports = c.access.exempt_ports
        self.mask_origin = c.upstream.mask_origin  # records without mask_origin follow this
        # request headers never forwarded: the token, unless the operator asks for it
        self.private_headers = (frozenset() if c.access.forward_token
                                else frozenset({self.token_header}))
        self.cookie_name = c.access.cookie_name.encode()
        self.query_parameter = c.access.query_parameter.lower().encode()
        self.share_key = c.access.share_key.encode() if c.access.share_key else None
        # credential cookies are removed from what backends see
        strip = []
        if c.access.browser_cookie and not c.access.forward_token:
            strip.append(self.cookie_name.lower())
        if self.share_key is not None:
            strip.append(share.COOKIE_NAME)
        self.strip_cookies = tuple(strip)
        # query parameters carrying credentials: never forwarded, whatever the port
        self.query_credentials = tuple(
            ([self.query_parameter] if c.access.browser_cookie else [])
            + ([share.QUERY_PARAMETER] if self.share_key is not None else []))
        self.isolate_cookies = c.access.isolate_cookies
        self.http2 = c.server.http2
        self.header_routing = c.routing.header_routing
        self.sandbox_id_header = c.routing.sandbox_id_header.lower().encode()
        self.sandbox_port_header = c.routing.sandbox_port_header.lower().encode()
        self.stable_hosts = frozenset({"localhost"} | {"sandbox." + d for d in self.domains})

    def gauges(self) -> dict[str, float]:
        connections = self.connections
        registry = self.registry
        gauges: dict[str, float] = {
            "client_connections": len(connections),
            "requests_in_flight": sum(c.requests_in_flight for c in connections),
            "open_streams": sum(c.open_streams for c in connections),
            "draining": int(self.draining),
            "event_loop_tasks": len(asyncio.all_tasks(self.loop)),
            "registry_ready": int(registry.ready()),
            **self.pools.gauges(),
        }
        gauges["sandboxes"] = len(registry)
        return gauges

    def is_trusted(self, ip: str) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)

    def take_slot(self, sandbox_id: str) -> bool:
        """Count one more request/stream for the sandbox; False when it is at its limit."""
        count = self.sandbox_slots.get(sandbox_id, 0)
        if count >= self.sandbox_limit:
            return False
        self.sandbox_slots[sandbox_id] = count + 1
        return True

    def give_slot(self, sandbox_id: str) -> None:
        count = self.sandbox_slots.get(sandbox_id, 0) - 1
        if count > 0:
            self.sandbox_slots[sandbox_id] = count
        else:
            self.sandbox_slots.pop(sandbox_id, None)
