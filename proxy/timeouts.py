"""Deadlines: one periodic sweep enforces every connection's timeout.

A connection sets `deadline` (loop time, 0 = none) whenever its state changes, which costs one
float store on the hot path instead of creating and cancelling a timer per request. The sweep runs
a few times per smallest timeout, so deadlines fire within a quarter of their length (at most 1 s
late) and cost O(open connections) per tick.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class HasDeadline(Protocol):
    deadline: float

    def on_deadline(self) -> None: ...


class DeadlineSweeper:
    def __init__(self, loop: asyncio.AbstractEventLoop, shortest_timeout: float):
        self.loop = loop
        self.interval = min(1.0, max(0.02, shortest_timeout / 4))
        self.watched: set[HasDeadline] = set()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._handle = self.loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = self.loop.time()
        expired = [c for c in self.watched if 0 < c.deadline <= now]
        for conn in expired:
            if 0 < conn.deadline <= now:
                conn.deadline = 0.0
                conn.on_deadline()
        self._handle = self.loop.call_later(self.interval, self._tick)
