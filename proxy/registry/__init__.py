"""Sandbox registry: where the proxy learns which backend serves a sandbox id.

`SandboxRecord` is what every registry kind yields; `open_registry` builds the kind named in the
config. The edge depends only on the `Registry` protocol below:

- `lookup(sandbox_id)` is on the hot path. It answers from memory when it can: the record, or
  None for "no such sandbox" (502 not found). A kind that must ask a remote store returns an
  awaitable instead, resolving to the record or None; the awaitable raises (any exception) when
  the store cannot be reached, which the edge answers with 503 `registry unavailable`.
- removal listeners are called with the ids of sandboxes that were removed or re-pointed (host or
  ports changed); the proxy then closes every connection to them at once.
- `ready()` feeds /readyz: False while the store is unreachable.
- admin writes (`put`, `delete`) go to the kind's own store; a read-only kind has
  `writable = False` and the admin API answers 405.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Iterable, Protocol

from proxy.config import ProxyConfig
from proxy.registry.record import SandboxRecord

RemovalListener = Callable[[Iterable[str]], None]


class Registry(Protocol):
    kind: str
    writable: bool

    def lookup(self, sandbox_id: str) -> SandboxRecord | None | Awaitable[SandboxRecord | None]: ...
    def add_removal_listener(self, listener: RemovalListener) -> None: ...
    def ready(self) -> bool: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    # admin API
    async def get(self, sandbox_id: str) -> SandboxRecord | None: ...
    async def list(self, after: str | None, limit: int) -> tuple[list[SandboxRecord], str | None]: ...
    async def put(self, record: SandboxRecord) -> None: ...
    async def delete(self, sandbox_id: str) -> bool: ...


def open_registry(config: ProxyConfig) -> Registry:
    """Build (and validate) the registry the config names; raises ConfigError when unusable."""
    from proxy.registry.static import StaticRegistry

    return StaticRegistry(config.registry.path, config.registry.reload_interval)


__all__ = ["Registry", "RemovalListener", "SandboxRecord", "open_registry"]
