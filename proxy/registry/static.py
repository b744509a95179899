"""Static registry: sandboxes listed in a TOML (or JSON) file, re-read when the file changes.

The file is checked every `reload_interval` seconds (stat only; it is parsed only when its size,
mtime or inode changed). A file that became invalid is reported and ignored: the last good table
keeps serving. Sandboxes removed or re-pointed by an edit are passed to the removal listeners.

Admin writes (PUT/DELETE through proxy/admin.py) are an in-memory overlay on top of the file,
lost at restart. The latest write wins: an admin write overrides the file's entry for that id
until the file's entry for that id changes, which drops the overlay entry. With
`server.workers > 1` each worker has its own memory, so the overlay is refused (`writable` False):
use the redis kind for writes in a multi-process fleet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from proxy.config import ConfigError, read_toml
from proxy.registry import RemovalListener
from proxy.registry.record import SandboxRecord, record_from_mapping
from proxy.registry.toml_subset import parse_registry_subset

log = logging.getLogger("sandbox_proxy.registry")


def _read_registry_toml(path: Path) -> dict:
    """The registry's usual shape by the fast subset reader, anything else by tomllib."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return read_toml(path)  # it reports the problem with the file
    data = parse_registry_subset(text)
    return data if data is not None else read_toml(path)


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
        data = _read_registry_toml(path)
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
    """Sandboxes from a file (plus admin writes), looked up from an in-memory dict."""

    kind = "static"

    def __init__(self, path: Path, reload_interval: float, writable: bool = True):
        self.path = path
        self.reload_interval = reload_interval
        self.writable = writable
        self._signature = _file_signature(path)
        self._file_records = load_registry_file(path)
        self._overlay: dict[str, SandboxRecord | None] = {}  # admin writes; None = deleted
        # The file with the overlay applied; the same dict as the file's while there is no
        # overlay (a million sandboxes are not held twice).
        self._records = self._file_records
        self._listeners: list[RemovalListener] = []
        self._watcher: asyncio.Task[None] | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_ok: float | None = None  # unix time

    def __len__(self) -> int:
        return len(self._records)

    def lookup(self, sandbox_id: str, port: int = 0) -> SandboxRecord | None:
        """The hot path: one dict look-up."""
        return self._records.get(sandbox_id)

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
        records = self._read_if_changed()
        return records is not None and self._apply(records)

    def _read_if_changed(self) -> dict[str, SandboxRecord] | None:
        """The file's records if it changed since the last read (None: unchanged or invalid).
        Runs in a thread for the watcher: parsing a big file must not stall the event loop."""
        signature = _file_signature(self.path)
        if signature == self._signature:
            return None
        self._signature = signature
        try:
            return load_registry_file(self.path)
        except ConfigError as exc:
            self.reloads_failed += 1
            log.error("registry reload failed, keeping the previous table: %s", exc)
            return None

    def _apply(self, records: dict[str, SandboxRecord]) -> bool:
        for sandbox_id in [s for s in self._overlay
                           if records.get(s) != self._file_records.get(s)]:
            del self._overlay[sandbox_id]  # the file changed this entry later: it wins
        self._file_records = records
        merged = dict(records) if self._overlay else records
        for sandbox_id, record in self._overlay.items():
            if record is None:
                merged.pop(sandbox_id, None)
            else:
                merged[sandbox_id] = record
        gone = [sid for sid, old in self._records.items()
                if (new := merged.get(sid)) is None or not new.same_backend(old)]
        self._records = merged
        self.reloads_ok += 1
        self.last_reload_ok = time.time()
        log.info("registry reloaded from %s: %d sandboxes, %d removed or re-pointed",
                 self.path, len(merged), len(gone))
        self._removed(gone)
        return True

    def _removed(self, ids: list[str]) -> None:
        if ids:
            for listener in self._listeners:
                listener(ids)

    # -- admin API ---------------------------------------------------------------------------

    async def get(self, sandbox_id: str) -> SandboxRecord | None:
        return self._records.get(sandbox_id)

    async def list(self, after: str | None, limit: int) -> tuple[list[SandboxRecord], str | None]:
        ids = sorted(s for s in self._records if after is None or s > after)
        page = ids[:limit]
        return [self._records[s] for s in page], (page[-1] if len(ids) > limit else None)

    def _own_records(self) -> dict[str, SandboxRecord]:
        """Copy-on-write: the first admin write separates the table from the file's."""
        if self._records is self._file_records:
            self._records = dict(self._file_records)
        return self._records

    async def put(self, record: SandboxRecord) -> None:
        self._require_writable()
        self._own_records()
        sandbox_id = record.sandbox_id
        old = self._records.get(sandbox_id)
        self._overlay[sandbox_id] = record
        self._records[sandbox_id] = record
        if old is not None and not old.same_backend(record):
            self._removed([sandbox_id])

    async def delete(self, sandbox_id: str) -> bool:
        self._require_writable()
        self._own_records()
        if sandbox_id in self._file_records:
            self._overlay[sandbox_id] = None
        else:
            self._overlay.pop(sandbox_id, None)
        existed = self._records.pop(sandbox_id, None) is not None
        if existed:
            self._removed([sandbox_id])
        return existed

    def _require_writable(self) -> None:
        if not self.writable:
            raise NotImplementedError("the static registry is read-only with server.workers > 1 "
                                      "(each worker has its own memory); use kind = \"redis\"")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                records = await asyncio.to_thread(self._read_if_changed)
                if records is not None:
                    self._apply(records)
            except Exception:  # never let the watcher die: the next tick tries again
                log.exception("registry reload crashed")
