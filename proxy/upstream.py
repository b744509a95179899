"""Upstream: connections to sandbox backends and the keep-alive pools that hold them.

An `UpstreamConnection` is an asyncio Protocol that parses the backend's responses with llhttp and
hands each event to the ResponseDestination it is bound to (proxy/destination.py: an HTTP/1.1
exchange today; nothing here knows what kind); after a 101 it becomes one half of a raw byte
tunnel. `UpstreamPool` keeps idle keep-alive connections for one (sandbox, address, port):
pools are never shared across sandboxes, so an address reused by the next sandbox can never be
handed the previous one's connection. `UpstreamPools` finds pools and closes every connection of a
sandbox the registry removed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable
from time import monotonic
from typing import TYPE_CHECKING, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from proxy.config import ListenAddress, ProxyConfig
from proxy.stats import Stats
from proxy.timeouts import DeadlineSweeper

if TYPE_CHECKING:
    from proxy.destination import ResponseDestination
    from proxy.tunnel import Tunnel

log = logging.getLogger("sandbox_proxy.upstream")


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


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# What a lost connection's `parser` becomes: the real one refers back to the protocol.
_CLOSED_PARSER = HttpResponseParser(object())


class UnsolicitedResponse(Exception):
    """The backend sent response bytes that no request of this connection asked for."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "client", "tunnel", "tunnel_peer", "status_reason",
                 "headers", "trailers", "deadline", "reused", "responded", "closed",
                 "reading_paused", "head_seen", "tunnel_out", "quiet_bytes",
                 "body_left", "feeding", "parked")

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        # set by connection_made: create_connection hands out only connected instances
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = HttpResponseParser(self)
        self.client: ResponseDestination | None = None  # bound while serving one response
        self.tunnel: Tunnel | None = None  # after a 101
        self.tunnel_peer: asyncio.Transport | None = None  # the client's, after a 101
        self.status_reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.deadline = 0.0
        self.reused = False
        self.responded = False  # some byte of the current response has arrived
        self.closed = False
        self.reading_paused = False
        self.head_seen = False
        self.tunnel_out = 0  # bytes relayed to the client after a 101
        # Bytes received since the response last made progress (head complete, body bytes):
        # a head or trailer section is bounded by `pools.max_head_bytes`, so a backend that
        # never ends one cannot make the proxy buffer without end.
        self.quiet_bytes = 0
        # Content-Length body bytes still to come once the body has started: they are relayed
        # as they arrive, without parsing or copying them (see relay_body).
        self.body_left = 0
        # One read from the backend is handled whole before the connection may serve another
        # request: a response that completes mid-read is `parked` instead of pooled, and pooled
        # only if nothing followed it in that read. Bytes after a complete response are a
        # response nobody asked for (it would answer the next client's request): the connection
        # is closed instead (RFC 9112 9.3.2 pairs responses with requests by order alone).
        self.feeding = False
        self.parked = False

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.pool.members.add(self)
        self.pool.pools.register(self.pool)  # again: it may have been dropped while connecting
        self.pool.pools.sweeper.watched.add(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel_peer is not None:
            self.tunnel_out += len(data)
            self.tunnel_peer.write(data)
            return
        client = self.client
        if client is None:  # an idle backend must not speak; drop the connection
            self.close()
            return
        self.feeding = True
        if self.body_left:
            self.relay_body(client, data)
            self.end_read()
            return
        self.responded = True
        self.quiet_bytes += len(data)
        try:
            self.parser.feed_data(data)
            if self.quiet_bytes > self.pool.pools.max_head_bytes:
                log.warning("backend %s:%s of %s sent more than %d bytes of response head or "
                            "trailers", self.pool.host, self.pool.port, self.pool.sandbox_id,
                            self.pool.pools.max_head_bytes)
                if self.client is not None:
                    self.client.upstream_lost(self)
                self.abort()
        except HttpParserUpgrade as exc:
            client.upstream_upgraded(self, data[exc.args[0]:])
        except HttpParserError as exc:
            if isinstance(exc.__context__, UnsolicitedResponse):
                log.warning("backend %s:%s of sandbox %s sent a response nobody asked for; "
                            "connection closed", self.pool.host, self.pool.port,
                            self.pool.sandbox_id)
            else:
                log.info("invalid response from %s:%s: %s", self.pool.host, self.pool.port, exc)
            if self.client is not None:
                self.client.upstream_lost(self)
            self.close()
        finally:
            client.flush()  # one write for everything this read produced
            self.feeding = False  # end_read, inlined: once per read
            if self.parked:
                self.parked = False
                self.pool.release(self)

    def end_read(self) -> None:
        self.feeding = False
        if self.parked:
            self.parked = False
            self.pool.release(self)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.upstream_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        self.pool.pools.sweeper.watched.discard(self)
        if self.tunnel is not None:
            self.tunnel.upstream_lost()
        elif self.client is not None:
            self.client.upstream_lost(self)
        self.client = self.tunnel = self.tunnel_peer = None
        self.parser = _CLOSED_PARSER  # break the parser <-> protocol cycle

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_full()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_drained()

    # -- llhttp callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.client is None:
            raise UnsolicitedResponse()
        self.body_left = 0
        self.headers = []
        self.trailers = None
        self.head_seen = False

    def on_status(self, reason: bytes) -> None:
        self.status_reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_seen:
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name, value))
        else:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_seen = True
        self.quiet_bytes = 0
        if self.client is None:
            raise UnsolicitedResponse()
        self.client.response_head(self, self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.quiet_bytes = 0
        if self.client is None:  # e.g. body bytes after a HEAD response, or an abandoned one
            raise UnsolicitedResponse()
        if self.body_left:
            self.body_left -= len(body)
        self.client.response_body(body)

    def relay_body(self, client: ResponseDestination, data: bytes) -> None:
        """Content-Length body bytes after the first read: no llhttp, no copy. The parser,
        which still expects them, is replaced when the body ends."""
        left = self.body_left
        self.quiet_bytes = 0
        if len(data) < left:
            self.body_left = left - len(data)
            client.response_body(data)
        else:
            self.body_left = 0
            client.response_body(data if len(data) == left else data[:left])
            self.parser = HttpResponseParser(self)
            if len(data) > left:  # bytes after the response nobody asked for
                log.warning("backend %s:%s of sandbox %s sent a response nobody asked for; "
                            "connection closed", self.pool.host, self.pool.port,
                            self.pool.sandbox_id)
                self.close()  # before the exchange ends: it must not go back to the pool
            client.response_complete(self)
        client.flush()

    def on_message_complete(self) -> None:
        if self.client is not None:
            self.client.response_complete(self)

    # -- used by the client side --------------------------------------------------------------
    def on_deadline(self) -> None:
        if self.client is not None:
            self.client.upstream_timed_out(self)
        self.close()

    def skip_response_body(self) -> None:
        """The response has no body whatever its headers say (HEAD): parse the next one fresh."""
        self.parser = HttpResponseParser(self)

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections to one backend address of one sandbox."""

    __slots__ = ("pools", "key", "sandbox_id", "host", "port", "idle", "members")

    def __init__(self, pools: UpstreamPools, key: tuple[str, str, int]):
        self.pools = pools
        self.key = key
        self.sandbox_id, self.host, self.port = key
        self.idle: list[UpstreamConnection] = []
        self.members: set[UpstreamConnection] = set()

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
        if not self.members:
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
        """Open a new connection, retrying refused connects with a doubling backoff."""
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
                    _, conn = await loop.create_connection(
                        lambda: UpstreamConnection(self), ip, self.port)
                stats.connect_duration.observe(monotonic() - started)
                return conn
            except BackendRefused:
                stats.connect_failed("not_allowed")
                if not self.members:
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
        if not self.members:
            pools.drop(self)
        raise ConnectFailed(reason, timed_out)

    def close_all(self) -> None:
        for conn in list(self.members):
            conn.abort()
        self.idle.clear()


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
