"""Sandbox registry: where the proxy learns which backend serves a sandbox id.

`SandboxRecord` is what every registry kind yields; `open_registry` builds the kind named in the
config:

- `static` (proxy/registry/static.py): a TOML/JSON file, re-read when it changes;
- `dns` (proxy/registry/dns.py): `<id>.<zone>` A/AAAA (+TXT) records, cached for their TTL;
- `redis` (proxy/registry/redis_store.py): JSON records in Redis, cached while keyspace
  notifications are subscribed;
- any of them wrapped by proxy/registry/resume.py when `resume_url` is set (auto-resume of paused
  sandboxes). proxy/registry/remote.py holds what the remote kinds share.

The edge depends only on the `Registry` protocol below:

- `lookup(sandbox_id, port=0)` is on the hot path. It answers from memory when it can: the
  record, or None for "no such sandbox" (502 not found). A kind that must ask a remote store
  returns an awaitable instead, resolving to the record or None; the awaitable raises (any
  exception) when the store cannot be reached, which the edge answers with 503 `registry
  unavailable`. `port` is the requested sandbox port; only the resume webhook uses it.
- removal listeners are called with the ids of sandboxes that were removed or re-pointed (host or
  ports changed); the proxy then closes every connection to them at once.
- `ready()`: False while the store is unreachable; it feeds the `registry_ready` metric (and
  /readyz only with `[metrics] ready_requires_registry = true`).
- admin writes (`put`, `delete`) go to the kind's own store; a read-only kind has
  `writable = False` and the admin API answers 405.
- `len(registry)`: the records it holds in memory (a remote kind: its cache), for the
  `sandboxes` gauge and `--check`.

Optional parts, each a protocol of its own with a test beside it: `Resumable` (`can_resume`: the
auto-resume wrapper), and the counters the metrics read (`ReloadCounters` of the static kind,
`StoreCounters` of the remote kinds, `ResumeCounters` of the auto-resume wrapper). The tests look
for an attribute (hasattr), not isinstance: the auto-resume wrapper hands out its inner kind's
attributes through __getattr__, which isinstance against a protocol ignores from Python 3.12.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Protocol, TypeGuard

from proxy.config import ProxyConfig
from proxy.registry.record import SandboxRecord

if TYPE_CHECKING:
    from proxy.stats import Histogram

RemovalListener = Callable[[Iterable[str]], None]
LookupResult = SandboxRecord | Awaitable[SandboxRecord | None] | None


class Registry(Protocol):
    kind: str
    writable: bool

    def lookup(self, sandbox_id: str, port: int = 0) -> LookupResult: ...
    def add_removal_listener(self, listener: RemovalListener) -> None: ...
    def ready(self) -> bool: ...
    def __len__(self) -> int: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    # admin API
    async def get(self, sandbox_id: str) -> SandboxRecord | None: ...
    async def list(self, after: str | None, limit: int,
                   ) -> tuple[list[SandboxRecord], str | None]: ...
    async def put(self, record: SandboxRecord) -> None: ...
    async def delete(self, sandbox_id: str) -> bool: ...


class Resumable(Registry, Protocol):
    """A registry that wakes paused sandboxes (proxy/registry/resume.py): resolves to the
    running record, or None when the control plane says the sandbox is gone."""

    def resume(self, sandbox_id: str, port: int,
               state: str = "paused") -> Awaitable[SandboxRecord | None]: ...


def can_resume(registry: Registry) -> TypeGuard[Resumable]:
    return hasattr(registry, "resume")


class ReloadCounters(Protocol):
    """A file-backed registry counts its own reloads (the edge cannot see them)."""

    reloads_ok: int
    reloads_failed: int
    last_reload_ok: float | None  # unix time


def counts_reloads(registry: Registry) -> TypeGuard[ReloadCounters]:
    return hasattr(registry, "reloads_ok")


class StoreCounters(Protocol):
    """A remote registry counts the look-ups that went to its store (cache misses)."""

    kind: str
    lookup_outcomes: dict[str, int]
    lookup_duration: Histogram


def counts_store_lookups(registry: Registry) -> TypeGuard[StoreCounters]:
    return hasattr(registry, "lookup_outcomes")


class ResumeCounters(Protocol):
    """The auto-resume wrapper counts resume attempts by outcome and their durations."""

    resumes: dict[str, int]
    resume_duration: Histogram


def counts_resumes(registry: Registry) -> TypeGuard[ResumeCounters]:
    return hasattr(registry, "resumes")


def open_registry(config: ProxyConfig) -> Registry:
    """Build (and validate) the registry the config names; raises ConfigError when unusable.

    Nothing here touches the network or an event loop (the CLI forks workers after this):
    remote kinds connect in `start()`.
    """
    settings = config.registry
    registry: Registry
    if settings.kind == "dns":
        from proxy.registry.dns import DnsRegistry
        registry = DnsRegistry(settings)
    elif settings.kind == "redis":
        from proxy.config import ConfigError
        from proxy.registry.redis_store import RedisRegistry
        try:
            registry = RedisRegistry(settings)
        except ConfigError as exc:  # a URL redis-py refuses: name the config file too
            raise ConfigError(f"{config.source or '<defaults>'}: {exc}") from None
    else:
        from proxy.registry.static import StaticRegistry
        registry = StaticRegistry(settings.path, settings.reload_interval,
                                  writable=config.server.workers <= 1)
    if settings.resume_url is not None:
        from proxy.registry.resume import AutoResumeRegistry
        registry = AutoResumeRegistry(registry, settings.resume_url, settings.resume_timeout)
    return registry


__all__ = ["LookupResult", "Registry", "ReloadCounters", "RemovalListener", "Resumable",
           "ResumeCounters", "SandboxRecord", "StoreCounters", "can_resume", "counts_reloads",
           "counts_resumes", "counts_store_lookups", "open_registry"]
