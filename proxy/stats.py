"""Stats: the proxy's measurements as plain numbers, cheap enough for the hot path.

The request path only increments integers and drops durations into fixed buckets; nothing here
takes a lock or formats text. `snapshot()` turns the numbers into a JSON-able dict and `merge()`
adds snapshots of several worker processes together, so /metrics is correct with
`server.workers > 1` (proxy/metrics.py renders the merged snapshot in Prometheus form).
"""

from __future__ import annotations

import os
import resource
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

# What Stats.snapshot gives (and merge sums): JSON, as workers hand it to the supervisor in a
# file; proxy/metrics.py renders it.
Snapshot = dict[str, Any]

# Bucket upper bounds (seconds), Prometheus `le` semantics.
RESPONSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
STREAM_BUCKETS = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0)
LOOKUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

METHODS = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH",
                                   b"OPTIONS", b"TRACE", b"CONNECT")}
CODE_CLASSES = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")


class Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total}


class Stats:
    """Everything one process measured since it started."""

    def __init__(self, registry_kind: str = "static") -> None:
        # (status // 100, method as llhttp gave it, protocol, origin, http): labels are made at
        # snapshot time. origin: "backend" relayed a backend's answer, "proxy" answered itself;
        # http: the client's protocol (h1, h2, or grpc: native gRPC over HTTP/2).
        self.responses: dict[tuple[int, bytes, str, str, str], int] = {}
        self.request_bytes = 0
        self.response_bytes = 0
        self.connections_opened = 0
        self.h2_connections = 0     # of them, the ones that became HTTP/2
        self.h2_streams = 0
        # GOAWAYs the proxy sent for a client's misdeed, by reason; the rows exist from the start
        # (increase() sees the first one, and the series is there to alert on)
        self.h2_goaways: dict[str, int] = dict.fromkeys(
            ("protocol_error", "rapid_reset", "control_flood", "not_reading"), 0)
        self.response_duration = Histogram(RESPONSE_BUCKETS)  # time to the response head
        self.stream_duration = {"websocket": Histogram(STREAM_BUCKETS),
                                "sse": Histogram(STREAM_BUCKETS),
                                "tunnel": Histogram(STREAM_BUCKETS)}
        self.connect_duration = Histogram(CONNECT_BUCKETS)
        self.connect_failures: dict[str, int] = {}
        self.retries = 0
        # (what, ok|error); the config's rows exist from the start so increase() sees the first
        self.reloads: dict[tuple[str, str], int] = {("config", "ok"): 0, ("config", "error"): 0}
        self.last_reload_success: dict[str, float] = {}
        self.registry_kind = registry_kind
        self.lookups_found = 0       # answered from memory (the hot path counts plain ints)
        self.lookups_not_found = 0
        self.lookups: dict[tuple[str, str], int] = {}  # (registry kind, outcome), remote ones
        self.lookup_duration = Histogram(LOOKUP_BUCKETS)

    def response(self, status: int, method: bytes, protocol: str, origin: str,
                 http: str = "h1") -> None:
        key = (status // 100, method, protocol, origin, http)
        responses = self.responses
        responses[key] = responses.get(key, 0) + 1

    def h2_goaway(self, reason: str) -> None:
        self.h2_goaways[reason] = self.h2_goaways.get(reason, 0) + 1

    def lookup(self, outcome: str, seconds: float | None = None) -> None:
        """A look-up that went to a remote store (the in-memory ones are counted inline)."""
        key = (self.registry_kind, outcome)
        self.lookups[key] = self.lookups.get(key, 0) + 1
        if seconds is not None:
            self.lookup_duration.observe(seconds)

    def connect_failed(self, reason: str) -> None:
        self.connect_failures[reason] = self.connect_failures.get(reason, 0) + 1

    def reloaded(self, what: str, ok: bool, when: float) -> None:
        key = (what, "ok" if ok else "error")
        self.reloads[key] = self.reloads.get(key, 0) + 1
        if ok:
            self.last_reload_success[what] = when

    def snapshot(self, gauges: dict[str, float]) -> Snapshot:
        responses: dict[tuple[str, str, str, str, str], int] = {}
        for (klass, method, protocol, origin, http), n in self.responses.items():
            key = (CODE_CLASSES[klass] if klass < 6 else "5xx", METHODS.get(method, "other"),
                   protocol, origin, http)
            responses[key] = responses.get(key, 0) + n
        lookups = dict(self.lookups)
        for outcome, n in (("found", self.lookups_found), ("not_found", self.lookups_not_found)):
            if n:
                lookup_key = (self.registry_kind, outcome)
                lookups[lookup_key] = lookups.get(lookup_key, 0) + n
        return {
            "responses": [[*k, v] for k, v in responses.items()],
            "request_bytes": self.request_bytes,
            "connections_opened": self.connections_opened,
            "h2_connections": self.h2_connections,
            "h2_streams": self.h2_streams,
            "h2_goaways": dict(self.h2_goaways),
            "response_bytes": self.response_bytes,
            "response_duration": self.response_duration.snapshot(),
            "stream_duration": {k: h.snapshot() for k, h in self.stream_duration.items()},
            "connect_duration": self.connect_duration.snapshot(),
            "connect_failures": dict(self.connect_failures),
            "retries": self.retries,
            "reloads": [[*k, v] for k, v in self.reloads.items()],
            "last_reload_success": dict(self.last_reload_success),
            "lookups": [[*k, v] for k, v in lookups.items()],
            "lookup_duration": self.lookup_duration.snapshot(),
            "gauges": gauges,
        }


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_started: tuple[int, float] | None = None  # (pid, unix time): a forked worker reads its own


def process_usage() -> dict[str, float]:
    """This process's footprint: resident memory, open file descriptors and their limit, CPU
    seconds (user + system), start time. Memory, descriptors and start time come from /proc
    (Linux); where it is missing they are left out."""
    times = os.times()
    usage = {"cpu_seconds": times.user + times.system,
             "max_fds": float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])}
    try:
        with open("/proc/self/statm") as f:
            usage["resident_memory_bytes"] = float(int(f.read().split()[1]) * PAGE_SIZE)
        usage["open_fds"] = float(len(os.listdir("/proc/self/fd")))
        usage["start_time_seconds"] = _start_time()
    except OSError:
        pass
    return usage


def _start_time() -> float:
    global _started
    pid = os.getpid()
    if _started is None or _started[0] != pid:
        with open("/proc/self/stat") as f:
            stat = f.read()
        # the fields after the command name (which may hold spaces); starttime is field 22,
        # in clock ticks since boot
        ticks = int(stat[stat.rfind(")") + 2:].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        _started = (pid, boot + ticks / os.sysconf("SC_CLK_TCK"))
    return _started[1]


ROW_COUNTERS = ("responses", "reloads", "lookups")          # [[*labels, n], ...]
NUMBERS = ("request_bytes", "response_bytes", "retries", "connections_opened",
           "h2_connections", "h2_streams", "access_log_dropped")
HISTOGRAMS = ("response_duration", "connect_duration", "lookup_duration", "resume_duration")
KEYED_HISTOGRAMS = ("stream_duration",)                      # {label: histogram}
KEYED_COUNTS = ("connect_failures", "h2_goaways", "resumes", "gauges",
                "process")                                   # {label: n}, summed ...
NOT_SUMMED = {("gauges", "sandboxes"): max,                  # ... except these
              ("process", "start_time_seconds"): max}        # (the latest start of any)
KEYED_LATEST = ("last_reload_success",)                      # {label: unix time}, the latest


def _add_histogram(into: dict[str, Any] | None, h: dict[str, Any]) -> dict[str, Any]:
    if into is None:
        return {"bounds": h["bounds"], "counts": list(h["counts"]), "sum": h["sum"]}
    into["counts"] = [a + b for a, b in zip(into["counts"], h["counts"])]
    into["sum"] += h["sum"]
    return into


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Add several processes' snapshots: counters, histograms, gauges and process usage are sums
    (open connections of all workers, say); reload and start times take the latest. {} when there
    are none."""
    rows: dict[str, dict[tuple, float]] = {f: {} for f in ROW_COUNTERS}
    merged: Snapshot = {}
    for snap in snapshots:
        if not merged:
            merged = {f: 0 for f in NUMBERS}
            merged.update({f: {} for f in KEYED_HISTOGRAMS + KEYED_COUNTS + KEYED_LATEST})
        for field in ROW_COUNTERS:
            for row in snap.get(field, ()):
                key = tuple(row[:-1])
                rows[field][key] = rows[field].get(key, 0) + row[-1]
        for field in NUMBERS:
            merged[field] += snap.get(field, 0)
        for field in HISTOGRAMS:
            if field in snap:
                merged[field] = _add_histogram(merged.get(field), snap[field])
        for field in KEYED_HISTOGRAMS:
            for name, h in snap.get(field, {}).items():
                merged[field][name] = _add_histogram(merged[field].get(name), h)
        for field in KEYED_COUNTS:
            for name, n in snap.get(field, {}).items():
                combine = NOT_SUMMED.get((field, name))
                old = merged[field].get(name)
                merged[field][name] = (n if old is None else combine(old, n) if combine
                                       else old + n)
        for field in KEYED_LATEST:
            for name, when in snap.get(field, {}).items():
                merged[field][name] = max(when, merged[field].get(name, 0.0))
    if merged:
        for field in ROW_COUNTERS:
            merged[field] = [[*k, v] for k, v in rows[field].items()]
    return merged
