"""Redis registry: sandbox records as JSON under `<prefix><sandboxId>`, shared by a fleet.

Reads go through the local cache of proxy/registry/remote.py. The cache learns about changes from
Redis keyspace notifications: one subscribed connection per Redis node
(`PSUBSCRIBE __keyspace@<db>__:<prefix>*`) receives an event for every write, delete, expiry or
eviction of a record; the id is dropped from the cache and, when connections may be open to it,
fetched again at once (a delete or a new host closes them).

Why keyspace notifications rather than client-side caching (CLIENT TRACKING):
- the subscription and its health are one connection: when it breaks, the proxy knows at once,
  stops answering from memory and re-checks every sandbox it served once it is back. Tracking in
  RESP2 couples two connections (the tracking one redirects to a subscribed one) and loses
  invalidations silently when the tracking connection dies; RESP3 push handling is not part of
  redis-py's public asyncio API.
- the event names a delete or expiry apart from a write, and it works the same on a single Redis,
  on the master a Sentinel names (the subscription moves with a failover) and on every node of a
  Cluster.
The price is the server setting `notify-keyspace-events` (at least `K`, `g`, `$`, `x`, `e`). The
proxy adds the missing flags itself (`CONFIG SET`, again after each reconnect since a restarted or
promoted server may lack them). Where CONFIG is disabled (managed Redis) the operator sets it; if
the proxy can neither read nor set it, it does not cache at all (every request asks Redis), so a
missing setting costs speed, never isolation.

URLs: `redis://`, `rediss://`, `unix://` as redis-py reads them; `redis+sentinel://[user:pass@]
host:port[,host:port...]/<service>[/<db>]` asks those Sentinels for the master of `<service>`;
`redis+cluster://host:port` is a Redis Cluster (db 0). Not notified: FLUSHDB/FLUSHALL (no per-key
events); use DEL.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
from collections.abc import Coroutine
from typing import Any, TypedDict
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from proxy.config import ConfigError, RegistryConfig
from proxy.registry.record import SandboxRecord, record_from_mapping
from proxy.registry.remote import InvalidRecord, RegistryUnreachable, RemoteRegistry

log = logging.getLogger("sandbox_proxy.registry")

NOTIFY_FLAGS = "Kg$xe"      # keyspace channel; generic (del, rename), string, expired, evicted
PING_EVERY = 1.0            # seconds of silence on a subscription before it is pinged
RECONNECT_BACKOFF = (0.1, 1.0)  # first and largest pause between reconnect attempts
LIST_SCAN_COUNT = 1000
ACTIVITY_SUFFIX = ":activity"  # [activity] redis: `<prefix><id>:activity`, never a record


class ClientOptions(TypedDict, total=False):
    """The keyword arguments every client of the registry is made with."""

    decode_responses: bool
    socket_timeout: float
    socket_connect_timeout: float
    retry: Retry


class RedisTarget:
    """Where the records live, from the URL: the data client and the clients to subscribe on."""

    def __init__(self, url: str, timeout: float):
        self.url = url
        self.timeout = timeout
        self.scheme = urlsplit(url).scheme
        self.cluster = self.scheme.endswith("+cluster")
        self.sentinel = self.scheme.endswith("+sentinel")
        self.options: ClientOptions = {"decode_responses": True, "socket_timeout": timeout,
                                       "socket_connect_timeout": timeout}
        try:
            self._parse()
        except ValueError as exc:
            raise ConfigError(f"[registry] url: {exc}") from None

    def _parse(self) -> None:
        parts = urlsplit(self.url)
        self.db = 0
        if self.sentinel:
            self.tls = self.scheme.startswith("rediss")
            userinfo, _, hosts = parts.netloc.rpartition("@")
            user, _, password = userinfo.partition(":")
            self.auth = {k: unquote(v) for k, v in (("username", user), ("password", password))
                         if v}
            self.sentinels = []
            for item in hosts.split(","):
                host, _, port = item.rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"sentinel address {item!r} is not host:port")
                self.sentinels.append((host.strip("[]"), int(port)))
            path = [p for p in parts.path.split("/") if p]
            if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
                raise ValueError("expected redis+sentinel://host:port[,host:port]/<service>[/<db>]")
            self.service = path[0]
            self.db = int(path[1]) if len(path) == 2 else 0
        elif self.cluster:
            self.plain_url = self.url.replace("+cluster", "", 1)
        else:
            # let redis-py validate what it will use
            pool = aioredis.ConnectionPool.from_url(self.url)
            self.db = int(pool.connection_kwargs.get("db", 0) or 0)

    def _options(self, retries: int) -> ClientOptions:
        return {**self.options, "retry": Retry(NoBackoff(), retries)}

    def data_client(self, retries: int = 1) -> aioredis.Redis | RedisCluster:
        """A client for commands. `retries = 0` for subscriptions: a reconnect must be seen (and
        the cache flushed), never done silently behind our back."""
        if self.cluster:
            return RedisCluster.from_url(self.plain_url, **self._options(retries))
        return self._node_client(retries)

    def _node_client(self, retries: int) -> aioredis.Redis:
        """A client of one Redis: the URL's, or the master the Sentinels name."""
        options = self._options(retries)
        if self.sentinel:
            extra = {"ssl": True} if self.tls else {}
            sentinels = Sentinel(self.sentinels, sentinel_kwargs={**self.auth, **extra,
                                                                   "socket_timeout": self.timeout},
                                 **self.auth, **extra, **options)
            master: aioredis.Redis = sentinels.master_for(self.service, db=self.db)
            return master
        return aioredis.from_url(self.url, **options)

    async def watch_clients(self) -> list[aioredis.Redis]:
        """One client per node whose keyspace events carry our keys (the caller closes them)."""
        if not self.cluster:
            return [self._node_client(retries=0)]
        cluster = RedisCluster.from_url(self.plain_url, **self._options(0))
        try:
            await cluster.initialize()
            kwargs = cluster.get_default_node().connection_kwargs
            auth = {k: kwargs[k] for k in ("username", "password", "ssl") if kwargs.get(k)}
            return [aioredis.Redis(host=node.host, port=int(node.port), **auth,
                                   **self._options(0))
                    for node in cluster.get_primaries()]
        finally:
            await cluster.aclose()


class RedisRegistry(RemoteRegistry):
    """Records in Redis, cached locally while keyspace notifications are subscribed."""

    kind = "redis"
    writable = True

    def __init__(self, config: RegistryConfig):
        super().__init__(config.timeout)
        self.prefix = config.prefix
        self.target = RedisTarget(config.url, config.timeout)
        self._pattern = f"__keyspace@{self.target.db}__:{self.prefix}*"
        self._client: aioredis.Redis | RedisCluster | None = None
        self._watcher: asyncio.Task | None = None
        self._subscribed = False
        self._background: set[asyncio.Task] = set()

    def ready(self) -> bool:
        return self._subscribed

    async def start(self) -> None:
        self._client = self.target.data_client()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        tasks = [t for t in (self._watcher, *self._background, *self._inflight.values()) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watcher = None
        if self._client is not None:
            await self._client.aclose()

    def _key(self, sandbox_id: str) -> str:
        return self.prefix + sandbox_id

    def _started(self) -> aioredis.Redis | RedisCluster:
        if self._client is None:
            raise RegistryUnreachable("redis registry not started yet")
        return self._client

    # -- reads -------------------------------------------------------------------------------

    async def _fetch(self, sandbox_id: str) -> tuple[SandboxRecord | None, float | None]:
        raw = await self._started().get(self._key(sandbox_id))
        return (None if raw is None else parse_stored(sandbox_id, raw)), None

    # -- change notifications ----------------------------------------------------------------

    async def _watch(self) -> None:
        pause = RECONNECT_BACKOFF[0]
        while True:
            subscriptions: list[PubSub] = []
            nodes: list[aioredis.Redis] = []
            try:
                nodes = await self.target.watch_clients()
                confirmed = True
                for node in nodes:
                    confirmed = await self._enable_notifications(node) and confirmed
                for node in nodes:
                    pubsub = node.pubsub()
                    subscriptions.append(pubsub)
                    await self._subscribe(pubsub)
                # changes made while we were not subscribed were missed: re-check what we serve
                self._caching = confirmed
                self._subscribed = True
                pause = RECONNECT_BACKOFF[0]
                log.info("redis registry: watching %s on %d node(s)%s", self._pattern,
                         len(nodes), "" if confirmed else " (not caching)")
                self._spawn(self.reverify())
                await asyncio.gather(*(self._listen(p) for p in subscriptions))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._subscribed:
                    log.warning("redis registry: lost the connection (%s); answering from Redis "
                                "only, 503 while it is unreachable", exc)
                else:
                    log.debug("redis registry: cannot subscribe: %s", exc)
            finally:
                self._subscribed = False
                self.flush()
                closables: list[PubSub | aioredis.Redis] = [*subscriptions, *nodes]
                for closable in closables:
                    try:
                        await closable.aclose()
                    except Exception:
                        pass
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECONNECT_BACKOFF[1])

    async def _subscribe(self, pubsub: PubSub) -> None:
        """PSUBSCRIBE and wait for the server to confirm it: only then are writes announced."""
        await pubsub.psubscribe(self._pattern)
        async with asyncio.timeout(self.timeout):
            while True:
                message = await pubsub.get_message(timeout=self.timeout)
                if message is not None and message["type"] == "psubscribe":
                    return

    async def _enable_notifications(self, client: aioredis.Redis) -> bool:
        """Make sure writes are announced; False when that cannot be confirmed."""
        try:
            current = (await client.config_get("notify-keyspace-events")).get(
                "notify-keyspace-events", "")
        except ResponseError:
            current = None  # CONFIG disabled or renamed: try to set it anyway
        if current is not None and _has_flags(current):
            return True
        merged = (current or "") + "".join(f for f in NOTIFY_FLAGS if f not in (current or ""))
        try:
            await client.config_set("notify-keyspace-events", merged)
            return True
        except ResponseError as exc:
            log.warning("redis registry: cannot set notify-keyspace-events=%s (%s); set it on "
                        "the server, until then every request asks Redis", NOTIFY_FLAGS, exc)
            return False

    async def _listen(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        prefix_at = len("__keyspace@") + len(str(self.target.db)) + len("__:") + len(self.prefix)
        while True:
            message = await pubsub.get_message(timeout=PING_EVERY)
            now = loop.time()
            if message is None:
                if now - heard > PING_EVERY + self.timeout:
                    raise RegistryUnreachable("no answer to PING on the subscription")
                await pubsub.ping()
                continue
            heard = now
            if message["type"] == "pmessage":
                key = message["channel"][prefix_at:]
                if ACTIVITY_SUFFIX not in key:  # our own activity keys are not records
                    self.refresh(key)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- admin -------------------------------------------------------------------------------

    async def list(self, after: str | None, limit: int) -> tuple[list[SandboxRecord], str | None]:
        """Records in id order after `after`; each page scans the keys (admin use only)."""
        async with asyncio.timeout(self.timeout * 5):
            ids = sorted({key[len(self.prefix):] async for key in self._started().scan_iter(
                match=self.prefix + "*", count=LIST_SCAN_COUNT)
                if key[len(self.prefix):] > (after or "")  # a set: SCAN may repeat keys
                and ACTIVITY_SUFFIX not in key})
            page = ids[:limit]
            values = await self._mget([self._key(i) for i in page]) if page else []
        records = []
        for sandbox_id, raw in zip(page, values):
            if raw is None:
                continue  # deleted meanwhile
            try:
                records.append(parse_stored(sandbox_id, raw))
            except InvalidRecord as exc:
                log.error("redis registry: record of %s is invalid: %s", sandbox_id, exc)
        return records, (page[-1] if len(ids) > limit else None)

    async def _mget(self, keys: builtins.list[str]) -> builtins.list[str | bytes | None]:
        # (`list` here is the method above: the annotations name the builtin)
        client = self._started()
        if isinstance(client, RedisCluster):
            return await client.mget_nonatomic(keys)
        return await client.mget(keys)

    async def put(self, record: SandboxRecord) -> None:
        async with asyncio.timeout(self.timeout):
            await self._started().set(self._key(record.sandbox_id),
                                   json.dumps(record.to_mapping(), separators=(",", ":")))
        self._applied_locally(record.sandbox_id, record)

    async def write_activity(self, report: dict[str, dict[str, int]], ttl: int) -> None:
        """[activity] redis: one `<prefix><id>:activity` JSON value per sandbox, expiring."""
        async with asyncio.timeout(self.timeout * 5):
            async with self._started().pipeline(transaction=False) as pipe:
                for sandbox_id, entry in report.items():
                    pipe.set(self._key(sandbox_id) + ACTIVITY_SUFFIX,
                             json.dumps(entry, separators=(",", ":")), ex=ttl)
                await pipe.execute()

    async def delete(self, sandbox_id: str) -> bool:
        async with asyncio.timeout(self.timeout):
            removed = await self._started().delete(self._key(sandbox_id))
        self._applied_locally(sandbox_id, None)
        return bool(removed)


def parse_stored(sandbox_id: str, raw: str | bytes) -> SandboxRecord:
    """Validate a stored value exactly as every kind validates a record."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidRecord(f"not JSON: {exc}") from None
    try:
        return record_from_mapping(sandbox_id, data)
    except ValueError as exc:
        raise InvalidRecord(str(exc)) from None


def _has_flags(current: str) -> bool:
    if "K" not in current:
        return False
    return "A" in current or all(f in current for f in NOTIFY_FLAGS[1:])
