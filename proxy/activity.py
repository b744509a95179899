"""Activity: traffic counts as activity, and the control plane hears about it.

Platforms pause idle sandboxes; only the proxy sees their traffic. With `[activity] url`, every
`[activity] interval` each worker POSTs one batch:

    {"sandboxes": {"<id>": {"lastActive": <unix seconds>, "openStreams": <n>}}}

for every sandbox that had a request forwarded to it since the last report, or has an open stream
now (a WebSocket or other tunnel, a response still streaming: SSE, downloads). `openStreams`
counts those at report time. A report that cannot be delivered is merged into the next (the
latest `lastActive` wins) and retried then; delivery never blocks traffic. With `[activity] redis`
the same facts are written as `<prefix><id>:activity` keys of the Redis registry instead.

Cost on the request path: one dict store per forwarded request (`seen`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Protocol, TypeGuard

import aiohttp

if TYPE_CHECKING:
    from proxy.config import ActivityConfig
    from proxy.context import EdgeContext
    from proxy.registry import Registry

log = logging.getLogger("sandbox_proxy.activity")

Report = dict[str, dict[str, int]]  # sandbox id -> {"lastActive": ..., "openStreams": ...}


class ActivityStore(Protocol):
    """A registry that keeps the reports itself (`[activity] redis`: the Redis kind)."""

    async def write_activity(self, report: Report, ttl: int) -> None: ...


class ActivityReporter:
    def __init__(self, ctx: EdgeContext, config: ActivityConfig, registry: Registry):
        self.ctx = ctx
        self.config = config
        self.registry = registry
        self.seen: dict[str, float] = {}  # sandbox id -> loop time of its last forwarded request
        self.pending: Report = {}  # collected, not yet delivered
        self.session: aiohttp.ClientSession | None = None
        self.failures = 0
        ctx.activity_seen = self.seen

    def collect(self) -> Report:
        """What happened since the last call, as report entries."""
        loop_now = self.ctx.loop.time()
        now = time.time()
        streams: dict[str, int] = {}
        for conn in self.ctx.connections:
            ex = conn.active
            if ex is None or ex.record is None:
                continue
            if conn.tunnel is not None or (ex.response_started and not ex.response_done):
                streams[ex.sandbox_id] = streams.get(ex.sandbox_id, 0) + 1
        report = {sandbox_id: {"lastActive": int(now - (loop_now - at)),
                               "openStreams": streams.get(sandbox_id, 0)}
                  for sandbox_id, at in self.seen.items()}
        self.seen.clear()
        for sandbox_id, count in streams.items():
            report[sandbox_id] = {"lastActive": int(now), "openStreams": count}
        return report

    def merge(self, report: Report) -> None:
        for sandbox_id, entry in report.items():
            old = self.pending.get(sandbox_id)
            if old is not None and old["lastActive"] > entry["lastActive"]:
                entry = {**entry, "lastActive": old["lastActive"]}
            self.pending[sandbox_id] = entry

    async def report_once(self) -> None:
        self.merge(self.collect())
        if not self.pending:
            return
        batch = dict(self.pending)
        try:
            if self.config.redis:
                ttl = max(60, int(self.config.interval * 4))
                await _activity_store(self.registry).write_activity(batch, ttl=ttl)
            else:
                await self.post(batch)
        except Exception as exc:  # retried with the next report, merged
            self.failures += 1
            if self.failures == 1 or self.failures % 20 == 0:
                log.warning("activity report of %d sandboxes failed (%d in a row): %s",
                            len(batch), self.failures, exc or type(exc).__name__)
            return
        self.failures = 0
        for sandbox_id, entry in batch.items():  # entries merged in meanwhile stay pending
            if self.pending.get(sandbox_id) is entry:
                del self.pending[sandbox_id]

    async def post(self, batch: Report) -> None:
        url = self.config.url
        if url is None:  # the reporter runs with [activity] url or redis set
            raise RuntimeError("no [activity] url to post to")
        if self.session is None:
            self.session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=max(1.0, min(10.0, self.config.interval)))
        async with self.session.post(url, data=json.dumps({"sandboxes": batch}),
                                     headers={"Content-Type": "application/json"},
                                     timeout=timeout, allow_redirects=False) as response:
            await response.read()
            if not 200 <= response.status < 300:
                raise RuntimeError(f"webhook answered {response.status}")

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.config.interval)
                try:
                    await self.report_once()
                except Exception:  # a bug here must not end the reports for good
                    log.exception("activity report failed")
        finally:
            if self.session is not None:
                await self.session.close()
                self.session = None


def _keeps_activity(registry: Registry) -> TypeGuard[ActivityStore]:
    # hasattr: the auto-resume wrapper forwards write_activity through __getattr__
    return hasattr(registry, "write_activity")


def _activity_store(registry: Registry) -> ActivityStore:
    if not _keeps_activity(registry):  # config.py allows [activity] redis with it only
        raise TypeError(f"the {registry.kind} registry cannot keep activity reports")
    return registry
