"""Static registry: sandboxes listed in a TOML (or JSON) file, re-read when the file changes.

The file is checked every `reload_interval` seconds (stat only; it is parsed only when its size,
mtime or inode changed). A file that became invalid is reported and ignored: the last good table
keeps serving. Sandboxes removed or re-pointed by an edit are passed to the removal listeners.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from proxy.config import ConfigError, read_toml
from proxy.registry import RemovalListener
from proxy.registry.record import SandboxRecord, record_from_mapping

log = logging.getLogger("sandbox_proxy.registry")


def load_registry_file(path: Path) -> dict[str, SandboxRecord]:
    """Parse and validate a registry file; raise ConfigError naming file, key and problem."""
    if path.suffix == ".json":
        try:
            data: Any = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    else:
        data = read_toml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a table with a [sandboxes] section")
    unknown = sorted(set(data) - {"sandboxes"})
    if unknown:
        raise ConfigError(f"{path}: [{unknown[0]}]: unknown section (expected [sandboxes.<id>])")
    sandboxes = data.get("sandboxes", {})
    if not isinstance(sandboxes, dict):
        raise ConfigError(f"{path}: sandboxes: must be a table of [sandboxes.<id>]")
    records: dict[str, SandboxRecord] = {}
    for sandbox_id, entry in sandboxes.items():
        try:
            records[sandbox_id] = record_from_mapping(sandbox_id, entry)
        except ValueError as exc:
            raise ConfigError(f"{path}: [sandboxes.{sandbox_id}] {exc}") from None
    return records


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class StaticRegistry:
    """Sandboxes from a file, looked up from an in-memory dict."""

    kind = "static"
    writable = False  # admin writes come with the admin API (an in-memory overlay)

    def __init__(self, path: Path, reload_interval: float):
        self.path = path
        self.reload_interval = reload_interval
        self._signature = _file_signature(path)
        self._records = load_registry_file(path)
        self.lookup = self._records.get  # the hot path: one dict look-up
        self._listeners: list[RemovalListener] = []
        self._watcher: asyncio.Task[None] | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0

    def __len__(self) -> int:
        return len(self._records)

    def add_removal_listener(self, listener: RemovalListener) -> None:
        self._listeners.append(listener)

    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        if self.reload_interval > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
            self._watcher = None

    def reload(self) -> bool:
        """Re-read the file if it changed; True when a new table was applied."""
        signature = _file_signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            records = load_registry_file(self.path)
        except ConfigError as exc:
            self.reloads_failed += 1
            log.error("registry reload failed, keeping the previous table: %s", exc)
            return False
        gone = [sid for sid, old in self._records.items()
                if (new := records.get(sid)) is None or not new.same_backend(old)]
        self._records = records
        self.lookup = records.get
        self.reloads_ok += 1
        log.info("registry reloaded from %s: %d sandboxes, %d removed or re-pointed",
                 self.path, len(records), len(gone))
        if gone:
            for listener in self._listeners:
                listener(gone)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                self.reload()
            except Exception:  # never let the watcher die: the next tick tries again
                log.exception("registry reload crashed")
