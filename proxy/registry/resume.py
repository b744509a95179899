"""Auto-resume: a registry wrapper that wakes paused sandboxes through the control plane.

`open_registry` wraps any kind in `AutoResumeRegistry` when `[registry] resume_url` is set.
Look-ups pass through unchanged: a record that is not running (`state` paused, pausing or
resuming) with `auto_resume = true` is first admitted by the edge like any request (Host, ingress
rules, token, limits: a request that would be refused never wakes anything), and only then is
`resume()` asked for it:

1. the control plane's webhook is called once per sandbox: `POST resume_url` with
   `{"sandboxId": "<id>", "port": <requested port or null>}`; every request for that sandbox that
   arrives meanwhile shares the same call and the same wait;
2. the record is read again (bypassing caches) every `POLL_EVERY` seconds until it says running,
   for at most `[registry] resume_timeout` seconds counted from the first request;
3. the running record is the answer, and the request proceeds.

Outcomes:
- webhook 2xx, record turns running in time: the record (the request is served);
- webhook 404 or 410, or the record disappears or loses `auto_resume` meanwhile: None, the usual
  502 "not found": the control plane says the sandbox is gone;
- webhook 403 or 429: ResumeRefused, which the edge answers 403 "You do not have permission to
  resume this sandbox", or 429 with the webhook's `Retry-After`;
- webhook unreachable, another status, or still paused at the deadline: an exception, which the
  edge answers with 503. Not 502: SDKs read "not found" as "the sandbox is gone for good", while
  a slow or failed resume is worth retrying and the sandbox is still there.

A record that is `resuming` is only waited for (no webhook call); one that is `pausing` is waited
for until it is paused, then resumed as above. Records without `auto_resume` pass through
unchanged: the edge answers 409 "The sandbox is paused" (`canAutoResume: false`) or, for
`pausing`/`resuming`, 409 "The sandbox is still transitioning".
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from time import monotonic
from typing import Any

import aiohttp

from proxy.registry import LookupResult, Registry, RemovalListener
from proxy.registry.record import SandboxRecord
from proxy.stats import Histogram

log = logging.getLogger("sandbox_proxy.registry")

POLL_EVERY = 0.1  # seconds between reads of the record while waiting for it to run
RESUME_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ResumeError(Exception):
    """The sandbox could not be resumed in time; answered 503 (retry), never 502 (gone)."""


class ResumeRefused(Exception):
    """The control plane refused the resume: 403 (not allowed) or 429 (`retry_after`, the
    webhook's Retry-After value, passed on)."""

    def __init__(self, status: int, retry_after: str | None = None):
        super().__init__(f"resume webhook answered {status}")
        self.status = status
        self.retry_after = retry_after


class AutoResumeRegistry:
    """Wraps a registry: paused auto-resume sandboxes are resumed before they are answered."""

    def __init__(self, inner: Registry, resume_url: str, resume_timeout: float):
        self.inner = inner
        self.kind = inner.kind
        self.writable = inner.writable
        self.resume_url = resume_url
        self.resume_timeout = resume_timeout
        self._resuming: dict[str, asyncio.Task[SandboxRecord | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        # Read by the metrics: resume attempts by outcome and how long they took.
        self.resumes = {"resumed": 0, "not_found": 0, "refused": 0, "timeout": 0, "error": 0}
        self.resume_duration = Histogram(RESUME_BUCKETS)

    def __getattr__(self, name: str) -> Any:
        # everything else (admin operations, counters, reload, invalidate) is the inner kind's
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def lookup(self, sandbox_id: str, port: int = 0) -> LookupResult:
        return self.inner.lookup(sandbox_id, port)

    def resume(self, sandbox_id: str, port: int,
               state: str = "paused") -> asyncio.Future[SandboxRecord | None]:
        """Wake the sandbox (one webhook call shared by every request meanwhile); resolves to
        the running record, or None when the control plane says it is gone."""
        task = self._resuming.get(sandbox_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._run_resume(sandbox_id, port, state))
            self._resuming[sandbox_id] = task
            task.add_done_callback(lambda t: self._finished(sandbox_id, t))
        return asyncio.shield(task)  # a client that leaves cancels its wait, not the resume

    def _finished(self, sandbox_id: str, task: asyncio.Task[SandboxRecord | None]) -> None:
        if self._resuming.get(sandbox_id) is task:
            del self._resuming[sandbox_id]
        if not task.cancelled():
            task.exception()  # retrieved: nobody may be waiting any more

    async def _run_resume(self, sandbox_id: str, port: int, state: str) -> SandboxRecord | None:
        """Resume a paused sandbox; a `resuming` one is only waited for, a `pausing` one is
        waited for until it is paused, then resumed."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        resume_started = monotonic()
        deadline = started + self.resume_timeout
        outcome = "error"
        try:
            while state == "pausing":
                record = await self._read_fresh(sandbox_id)
                if record is None or not record.auto_resume:
                    outcome = "not_found"
                    return None
                state = record.state
                if state == "pausing":
                    if loop.time() >= deadline:
                        outcome = "timeout"
                        raise ResumeError(f"sandbox {sandbox_id} still pausing after "
                                           f"{self.resume_timeout:g}s")
                    await asyncio.sleep(POLL_EVERY)
            if state == "running":
                outcome = "resumed"
                return record
            if state == "paused":
                status, retry_after = await self._call_webhook(sandbox_id, port,
                                                               deadline - loop.time())
                if status in (404, 410):
                    outcome = "not_found"
                    log.info("resume of %s: control plane answered %d, not found", sandbox_id,
                             status)
                    return None
                if status in (403, 429):
                    outcome = "refused"
                    raise ResumeRefused(status, retry_after)
                if not 200 <= status < 300:
                    raise ResumeError(f"resume webhook answered {status}")
            while True:
                record = await self._read_fresh(sandbox_id)
                if record is None or (record.paused and not record.auto_resume):
                    outcome = "not_found"
                    return None
                if not record.paused:
                    outcome = "resumed"
                    log.info("resumed %s in %.2fs", sandbox_id, loop.time() - started)
                    return record
                left = deadline - loop.time()
                if left <= 0:
                    outcome = "timeout"
                    raise ResumeError(f"sandbox {sandbox_id} still paused after "
                                       f"{self.resume_timeout:g}s")
                await asyncio.sleep(min(POLL_EVERY, left))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ResumeError(f"resume webhook {self.resume_url}: {exc or type(exc).__name__}"
                               ) from None
        finally:
            self.resumes[outcome] += 1
            self.resume_duration.observe(monotonic() - resume_started)
            if outcome in ("error", "timeout"):
                log.warning("resume of %s failed (%s)", sandbox_id, outcome)

    async def _call_webhook(self, sandbox_id: str, port: int, timeout: float,
                            ) -> tuple[int, str | None]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.post(
                self.resume_url, json={"sandboxId": sandbox_id, "port": port or None},
                timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False) as response:
            await response.read()
            return response.status, response.headers.get("Retry-After")

    async def _read_fresh(self, sandbox_id: str) -> SandboxRecord | None:
        invalidate = getattr(self.inner, "invalidate", None)
        if invalidate is not None:
            invalidate(sandbox_id)  # a cache (DNS TTL) must not hide the change
        found = self.inner.lookup(sandbox_id, 0)
        if inspect.isawaitable(found):
            found = await found
        return found

    # -- the rest of the Registry protocol, passed through -----------------------------------

    def add_removal_listener(self, listener: RemovalListener) -> None:
        self.inner.add_removal_listener(listener)

    def ready(self) -> bool:
        return self.inner.ready()

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        for task in list(self._resuming.values()):
            task.cancel()
        await asyncio.gather(*self._resuming.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.inner.close()
