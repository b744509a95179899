"""Pools: the keep-alive pools that hold backend connections, and the policy for where they may
connect.

`UpstreamPool` keeps idle keep-alive connections (proxy/upstream.py) for one (sandbox, address,
port): pools are never shared across sandboxes, so an address reused by the next sandbox can never
be handed the previous one's connection. `UpstreamPools` finds pools and closes every connection
of a sandbox the registry removed (HTTP/1.1 ones, and the one h2c connection gRPC calls share,
proxy/grpc_upstream.py). `BackendPolicy` decides which resolved addresses may be connected to;
the address checked is the address connected to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable
from time import monotonic
from typing import Any, Protocol, TypeVar

from proxy.config import ListenAddress, ProxyConfig
from proxy.stats import Stats
from proxy.timeouts import DeadlineSweeper
from proxy.upstream import UpstreamConnection

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
P = TypeVar("P", bound=asyncio.Protocol)


class PoolMember(Protocol):
    """What a pool needs of each of its open connections: to close it at once."""

    def abort(self) -> None: ...


class ConnectFailed(Exception):
    """Every connect attempt failed; `timed_out` tells a silent host from a refused port."""

    def __init__(self, reason: str, timed_out: bool):
        super().__init__(reason)
        self.timed_out = timed_out


class BackendRefused(Exception):
    """The backend address is outside [upstream] allowed_networks, or is the proxy itself."""


class BackendPolicy:
    """Which resolved backend addresses may be connected to (a poisoned registry must not turn
    the proxy into a door into the operator's network)."""

    def __init__(self, allowed_networks: Iterable[IPNetwork],
                 own_listeners: Iterable[ListenAddress | None]):
        self.allowed = tuple(allowed_networks)
        self.own = [(a.host, a.port) for a in own_listeners if a is not None]

    def check(self, ip: str, port: int) -> str | None:
        """None when allowed, else the reason."""
        address = ipaddress.ip_address(ip.split("%", 1)[0])
        for host, own_port in self.own:
            if port == own_port and (host in ("0.0.0.0", "::", "") or address.is_loopback
                                     or host == str(address)):
                return f"{ip}:{port} is one of the proxy's own listeners"
        if not any(address in network for network in self.allowed):
            return f"{ip} is outside [upstream] allowed_networks"
        return None


class UpstreamPool:
    """Idle keep-alive connections to one backend address of one sandbox."""

    __slots__ = ("pools", "key", "sandbox_id", "host", "port", "idle", "members", "multiplexed",
                 "connecting")

    def __init__(self, pools: UpstreamPools, key: tuple[str, str, int]):
        self.pools = pools
        self.key = key
        self.sandbox_id, self.host, self.port = key
        self.idle: list[UpstreamConnection] = []
        # every open connection: HTTP/1.1 ones, and the HTTP/2 one gRPC calls share
        self.members: set[PoolMember] = set()
        # the h2c connection native gRPC calls to this backend are multiplexed on
        # (proxy/grpc_upstream.py), or the task opening it
        self.multiplexed: Any = None
        # requests waiting for a connection this pool opens, counted from the moment they ask
        # (before their task first runs): until they have it the pool stays registered, or the
        # connection would land in a pool no request finds (never reused, not in the gauges)
        self.connecting = 0

    def take(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            conn.reused = True
            conn.deadline = 0.0
            return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose exchange finished cleanly; keep it if there is room."""
        conn.client = None
        if conn.feeding:  # mid-read: pooled once the rest of the read is known to be empty
            conn.parked = True
            return
        conn.responded = False
        if conn.reading_paused:
            conn.resume_reading()
        pools = self.pools
        if conn.closed or len(self.idle) >= pools.max_idle or pools.closing:
            conn.close()
            return
        conn.deadline = pools.loop.time() + pools.idle_timeout
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.members.discard(conn)
        if not self.members and not self.connecting:
            self.pools.drop(self)

    async def resolve(self) -> str:
        """The address to connect to: the host itself if an IP, else its first allowed address.
        The address checked is the address connected to (no second resolution to race)."""
        policy = self.pools.policy
        try:
            ipaddress.ip_address(self.host.split("%", 1)[0])
            candidates = [self.host]
        except ValueError:
            infos = await self.pools.loop.getaddrinfo(self.host, self.port,
                                                      type=socket.SOCK_STREAM)
            candidates = [str(info[4][0]) for info in infos]
        reasons = ["no address"]
        for ip in candidates:
            reason = policy.check(ip, self.port)
            if reason is None:
                return ip
            reasons.append(reason)
        raise BackendRefused(reasons[-1])

    async def connect(self) -> UpstreamConnection:
        """Open a new HTTP/1.1 connection (see open)."""
        return await self.open(lambda: UpstreamConnection(self))

    async def open(self, protocol: Callable[[], P]) -> P:
        """Open a new connection to the backend with the protocol `protocol` makes (checked
        against the address policy), retrying refused connects with a doubling backoff."""
        pools = self.pools
        loop = pools.loop
        stats = pools.stats
        timed_out = False
        reason = "no attempt"
        for attempt in range(pools.connect_attempts):
            if attempt:
                await asyncio.sleep(pools.connect_backoff * (2 ** (attempt - 1)))
            started = monotonic()
            try:
                async with asyncio.timeout(pools.connect_timeout):
                    ip = await self.resolve()
                    _, conn = await loop.create_connection(protocol, ip, self.port)
                stats.connect_duration.observe(monotonic() - started)
                return conn
            except BackendRefused:
                stats.connect_failed("not_allowed")
                if not self.members and not self.connecting:
                    pools.drop(self)
                raise
            except TimeoutError:
                kind, timed_out = "timeout", True
                reason = f"connect timed out after {pools.connect_timeout}s"
            except socket.gaierror as exc:
                kind, timed_out, reason = "dns", False, f"cannot resolve {self.host}: {exc}"
            except ConnectionRefusedError as exc:
                kind, timed_out, reason = "refused", False, exc.strerror or str(exc)
            except OSError as exc:
                kind, timed_out, reason = "other", False, exc.strerror or str(exc)
            stats.connect_failed(kind)
        if not self.members and not self.connecting:
            pools.drop(self)
        raise ConnectFailed(reason, timed_out)

    def close_all(self) -> None:
        for conn in list(self.members):
            conn.abort()
        self.idle.clear()
        self.multiplexed = None


class UpstreamPools:
    """Every pool of this process, by (sandbox id, backend host, backend port)."""

    def __init__(self, config: ProxyConfig, loop: asyncio.AbstractEventLoop,
                 sweeper: DeadlineSweeper, stats: Stats):
        self.loop = loop
        self.stats = stats
        self.apply(config)
        self.sweeper = sweeper
        self.by_key: dict[tuple[str, str, int], UpstreamPool] = {}
        self.by_sandbox: dict[str, set[UpstreamPool]] = {}
        self.closing = False

    def apply(self, config: ProxyConfig) -> None:
        """Adopt settings that may change while serving (SIGHUP reload)."""
        self.policy = BackendPolicy(config.upstream.allowed_networks,
                                    (config.server.listen, config.metrics.listen,
                                     config.admin.listen))
        self.connect_timeout = config.timeouts.connect
        self.connect_attempts = config.upstream.connect_attempts
        self.connect_backoff = config.upstream.connect_backoff
        self.idle_timeout = config.timeouts.upstream_idle
        self.max_idle = config.upstream.max_idle_per_backend
        self.max_head_bytes = config.limits.max_header_bytes  # backends' heads and trailers
        # frames per second a gRPC backend may send that ask for work without carrying a call's
        # data (proxy/grpc_upstream.py), as for clients
        self.max_control_frames = config.limits.http2_max_control_frames

    def pool(self, sandbox_id: str, host: str, port: int) -> UpstreamPool:
        key = (sandbox_id, host, port)
        pool = self.by_key.get(key)
        if pool is None:
            pool = UpstreamPool(self, key)
            self.register(pool)
        return pool

    def register(self, pool: UpstreamPool) -> None:
        """Make `pool` findable by key and by sandbox (removal must reach all its connections)."""
        self.by_key.setdefault(pool.key, pool)
        self.by_sandbox.setdefault(pool.sandbox_id, set()).add(pool)

    def drop(self, pool: UpstreamPool) -> None:
        if self.by_key.get(pool.key) is pool:
            del self.by_key[pool.key]
        siblings = self.by_sandbox.get(pool.sandbox_id)
        if siblings is not None:
            siblings.discard(pool)
            if not siblings:
                del self.by_sandbox[pool.sandbox_id]

    def close_sandboxes(self, sandbox_ids) -> None:
        """Close every connection (pooled, in flight, tunnels) to these sandboxes, at once."""
        for sandbox_id in sandbox_ids:
            for pool in list(self.by_sandbox.pop(sandbox_id, ())):
                self.by_key.pop(pool.key, None)
                pool.close_all()

    def close_idle(self) -> None:
        self.closing = True
        for pool in list(self.by_key.values()):
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()

    def gauges(self) -> dict[str, int]:
        pools = list(self.by_key.values())
        return {"upstream_connections": sum(len(p.members) for p in pools),
                "upstream_idle_connections": sum(len(p.idle) for p in pools),
                "upstream_pools": len(pools)}
