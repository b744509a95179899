"""Sandbox registry: where the proxy learns which backend serves a sandbox id.

`SandboxRecord` is what every registry kind yields; `open_registry` builds the kind named in the
config. A registry answers `lookup(sandbox_id)` from memory and tells its listeners which ids were
removed or re-pointed, so the proxy can close their connections (an address reused by the next
sandbox must never receive the old one's traffic).
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

from proxy.config import ProxyConfig
from proxy.registry.record import SandboxRecord

RemovalListener = Callable[[Iterable[str]], None]


class Registry(Protocol):
    def lookup(self, sandbox_id: str) -> SandboxRecord | None: ...
    def add_removal_listener(self, listener: RemovalListener) -> None: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...


def open_registry(config: ProxyConfig) -> Registry:
    """Build (and validate) the registry the config names; raises ConfigError when unusable."""
    from proxy.registry.static import StaticRegistry

    return StaticRegistry(config.registry.path, config.registry.reload_interval)


__all__ = ["Registry", "RemovalListener", "SandboxRecord", "open_registry"]
