"""Remote registries: what the DNS and Redis kinds share.

A remote kind keeps a local cache in front of its store so the hot path stays one dict look-up:

- `_records` holds the records that may be answered from memory; `lookup` returns them directly.
- A miss starts one fetch per sandbox id; every request for that id while it runs awaits the same
  task (through `asyncio.shield`, so a client that goes away cancels only its own wait). Each fetch
  is bounded by `timeout`; a store that cannot be asked raises `RegistryUnreachable` from the
  awaitable, which the edge answers with 503 `registry unavailable`.
- `_absent` remembers "no such sandbox" until a deadline (negative caching).
- `_known` is the last record answered for each id, cached or not: connections may be open to it.
  Whenever a fresh answer says the sandbox is gone or routes elsewhere (`same_backend`), the removal
  listeners are called with its id, so its connections are closed at once.

Subclasses implement `_fetch` (ask the store) and decide when caching is trustworthy
(`_caching`): Redis only while its change notifications are subscribed, DNS always (TTL based).
"""

from __future__ import annotations

import asyncio
import logging
import math
from time import monotonic

from proxy.registry import RemovalListener
from proxy.registry.record import SandboxRecord
from proxy.stats import LOOKUP_BUCKETS, Histogram

log = logging.getLogger("sandbox_proxy.registry")

NEGATIVE_CACHE_LIMIT = 65536  # "no such sandbox" entries kept at most (cleared when exceeded)
REVERIFY_CONCURRENCY = 32     # fetches at once when re-checking known sandboxes


class RegistryUnreachable(Exception):
    """The store could not be asked (timeout, refused connection, server failure)."""


class InvalidRecord(Exception):
    """The store holds something for this id that is not a valid record; served as not found."""

    def __init__(self, problem: str, ttl: float | None = None):
        super().__init__(problem)
        self.ttl = ttl


class RemoteRegistry:
    """The cache, coalescing, removal detection and counters of a registry backed by a store."""

    kind = "remote"
    writable = False

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._records: dict[str, SandboxRecord] = {}
        self._expires: dict[str, float] = {}     # id -> loop time its cached record expires
        self._absent: dict[str, float] = {}      # id -> loop time until which it is unknown
        self._known: dict[str, SandboxRecord] = {}
        self._inflight: dict[str, asyncio.Task[SandboxRecord | None]] = {}
        self._stale_inflight: set[str] = set()   # invalidated while their fetch was running
        self._caching = False
        self._listeners: list[RemovalListener] = []
        # Read by the metrics: outcomes of the fetches that went to the store (cache hits are
        # not counted here: the edge counts answers), their durations, ids handed to removal.
        self.lookup_outcomes = {"found": 0, "not_found": 0, "invalid": 0, "error": 0,
                                "coalesced": 0}
        self.lookup_duration = Histogram(LOOKUP_BUCKETS)
        self.removals = 0

    def __len__(self) -> int:
        return len(self._records)

    # -- the hot path ------------------------------------------------------------------------

    def lookup(self, sandbox_id: str, port: int = 0,
               ) -> SandboxRecord | asyncio.Future[SandboxRecord | None] | None:
        record = self._records.get(sandbox_id)
        if record is not None:
            return record
        return self._miss(sandbox_id)

    def _miss(self, sandbox_id: str) -> asyncio.Future[SandboxRecord | None] | None:
        until = self._absent.get(sandbox_id)
        if until is not None:
            if until > asyncio.get_running_loop().time():
                return None
            del self._absent[sandbox_id]
        return asyncio.shield(self._fetch_shared(sandbox_id))

    def _fetch_shared(self, sandbox_id: str) -> asyncio.Task[SandboxRecord | None]:
        task = self._inflight.get(sandbox_id)
        if task is not None:
            self.lookup_outcomes["coalesced"] += 1
            return task
        task = asyncio.get_running_loop().create_task(self._fetch_and_remember(sandbox_id))
        self._inflight[sandbox_id] = task
        task.add_done_callback(_consume_exception)
        return task

    async def _fetch_and_remember(self, sandbox_id: str) -> SandboxRecord | None:
        started = monotonic()
        outcome = "error"
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    record, ttl = await self._fetch(sandbox_id)
            except InvalidRecord as exc:
                log.error("%s registry: record of %s is invalid, answering not found: %s",
                          self.kind, sandbox_id, exc)
                outcome, record, ttl = "invalid", None, exc.ttl
            except TimeoutError:
                self._fetch_failed(sandbox_id)
                raise RegistryUnreachable(
                    f"{self.kind} registry did not answer within {self.timeout:g}s") from None
            except asyncio.CancelledError:
                raise  # the registry is closing
            except RegistryUnreachable:
                self._fetch_failed(sandbox_id)
                raise
            except Exception as exc:
                self._fetch_failed(sandbox_id)
                raise RegistryUnreachable(f"{self.kind} registry: {exc}") from exc
            else:
                outcome = "found" if record is not None else "not_found"
        finally:
            self.lookup_outcomes[outcome] += 1
            self.lookup_duration.observe(monotonic() - started)
            if self._inflight.get(sandbox_id) is asyncio.current_task():
                del self._inflight[sandbox_id]
        stale = sandbox_id in self._stale_inflight
        self._stale_inflight.discard(sandbox_id)
        self._fetch_succeeded()
        self._remember(sandbox_id, record, ttl, cache=self._caching and not stale)
        return record

    async def _fetch(self, sandbox_id: str) -> tuple[SandboxRecord | None, float | None]:
        """Ask the store: (record or None, seconds the answer may be cached; None = until told)."""
        raise NotImplementedError

    def _fetch_failed(self, sandbox_id: str) -> None:
        """A fetch failed: stop answering this id from memory (it can no longer be confirmed)."""
        self._records.pop(sandbox_id, None)
        self._expires.pop(sandbox_id, None)

    def _fetch_succeeded(self) -> None:
        """Hook: the store answered (readiness of kinds that track it)."""

    # -- cache and removal bookkeeping -------------------------------------------------------

    def _remember(self, sandbox_id: str, record: SandboxRecord | None, ttl: float | None,
                  cache: bool) -> None:
        now = asyncio.get_running_loop().time()
        until = math.inf if ttl is None else now + ttl
        if record is None:
            self._records.pop(sandbox_id, None)
            self._expires.pop(sandbox_id, None)
            if cache and until > now:
                if len(self._absent) >= NEGATIVE_CACHE_LIMIT:
                    self._absent.clear()
                self._absent[sandbox_id] = until
        else:
            self._absent.pop(sandbox_id, None)
            if cache and until > now:
                self._records[sandbox_id] = record
                if ttl is None:
                    self._expires.pop(sandbox_id, None)
                else:
                    self._expires[sandbox_id] = until
            else:
                self._records.pop(sandbox_id, None)
                self._expires.pop(sandbox_id, None)
        self._observe(sandbox_id, record)

    def _observe(self, sandbox_id: str, record: SandboxRecord | None) -> None:
        """A fresh answer for `sandbox_id`: tell the listeners when it is gone or re-pointed."""
        old = self._known.get(sandbox_id)
        if record is None:
            if old is not None:
                del self._known[sandbox_id]
                self._removed([sandbox_id])
            return
        self._known[sandbox_id] = record
        if old is not None and not old.same_backend(record):
            self._removed([sandbox_id])

    def _removed(self, ids: list[str]) -> None:
        self.removals += len(ids)
        log.info("%s registry: %s removed or re-pointed; closing their connections",
                 self.kind, ", ".join(ids))
        for listener in self._listeners:
            try:
                listener(ids)
            except Exception:  # one listener must not keep the others from running
                log.exception("removal listener failed")

    def invalidate(self, sandbox_id: str) -> None:
        """Forget what is cached for `sandbox_id` (the next look-up asks the store)."""
        self._records.pop(sandbox_id, None)
        self._expires.pop(sandbox_id, None)
        self._absent.pop(sandbox_id, None)
        if sandbox_id in self._inflight:
            self._stale_inflight.add(sandbox_id)

    def refresh(self, sandbox_id: str) -> None:
        """The store says `sandbox_id` changed: forget it and, when connections may be open to
        it, fetch it at once so a removal or re-pointing closes them without waiting for a
        request."""
        self.invalidate(sandbox_id)
        if sandbox_id in self._known:
            self._fetch_shared(sandbox_id)

    def flush(self) -> None:
        """The cache can no longer be trusted (lost notifications): answer nothing from memory."""
        self._caching = False
        self._records.clear()
        self._expires.clear()
        self._absent.clear()
        self._stale_inflight.update(self._inflight)

    async def reverify(self) -> None:
        """Fetch every sandbox connections may be open to; removals found close them."""
        gate = asyncio.Semaphore(REVERIFY_CONCURRENCY)

        async def check(sandbox_id: str) -> None:
            async with gate:
                try:
                    await self._fetch_shared(sandbox_id)
                except RegistryUnreachable:
                    pass  # still unreachable: checked again when it is back

        await asyncio.gather(*(check(sid) for sid in list(self._known)))

    # -- the rest of the Registry protocol ---------------------------------------------------

    def add_removal_listener(self, listener: RemovalListener) -> None:
        self._listeners.append(listener)

    async def get(self, sandbox_id: str) -> SandboxRecord | None:
        """A fresh read for the admin API (bypasses the cache; invalid data raises ValueError)."""
        try:
            async with asyncio.timeout(self.timeout):
                record, _ = await self._fetch(sandbox_id)
        except InvalidRecord as exc:
            raise ValueError(f"the stored record is invalid: {exc}") from None
        except TimeoutError:
            raise RegistryUnreachable(
                f"{self.kind} registry did not answer within {self.timeout:g}s") from None
        return record

    async def list(self, after: str | None, limit: int,
                   ) -> tuple[list[SandboxRecord], str | None]:
        raise NotImplementedError(f"the {self.kind} registry cannot list its sandboxes")

    async def put(self, record: SandboxRecord) -> None:
        raise NotImplementedError(f"the {self.kind} registry is read-only")

    async def delete(self, sandbox_id: str) -> bool:
        raise NotImplementedError(f"the {self.kind} registry is read-only")

    def _applied_locally(self, sandbox_id: str, record: SandboxRecord | None) -> None:
        """This process wrote `record` (None: deleted): apply it now, not when told back."""
        self.invalidate(sandbox_id)
        self._observe(sandbox_id, record)


def _consume_exception(task: asyncio.Task[SandboxRecord | None]) -> None:
    """Fetches nobody waits for any more (clients gone, background refresh) must not log
    'exception was never retrieved'."""
    if not task.cancelled():
        task.exception()
