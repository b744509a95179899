"""Metrics listener: /metrics (Prometheus text), /healthz (alive) and /readyz (this instance can
take traffic: the registry has answered once and no drain has begun; Worker.ready).

The numbers come from `Stats` snapshots (proxy/stats.py): the process's own when it serves alone,
or the sum of every worker's latest snapshot when `server.workers > 1` (the supervisor serves this
listener then). Metric names follow Prometheus conventions under one prefix, in base units; no
label ever carries a sandbox id, a host or a path.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from proxy import __version__
from proxy.stats import Snapshot

P = "sandbox_proxy_"
GAUGES = {  # snapshot gauge name -> (metric name, help)
    "client_connections": ("client_connections", "Open client connections"),
    "requests_in_flight": ("requests_in_flight", "Requests being served (head read, not done)"),
    "open_streams": ("open_streams", "Open upgraded streams (WebSocket and other tunnels)"),
    "upstream_connections": ("upstream_connections",
                             "Open backend connections (pooled, busy and tunnels)"),
    "upstream_idle_connections": ("upstream_idle_connections",
                                  "Idle keep-alive backend connections in the pools"),
    "upstream_pools": ("upstream_pools", "Backend pools (one per sandbox address and port)"),
    "sandboxes": ("registry_sandboxes", "Sandboxes known to the registry (in memory)"),
    "draining": ("draining", "1 while the process drains after SIGTERM"),
    "event_loop_tasks": ("event_loop_tasks", "asyncio tasks alive (connects, remote look-ups, "
                         "periodic jobs); steady when nothing leaks"),
    "registry_ready": ("registry_ready", "Workers whose registry is reachable (equals "
                       "sandbox_proxy_workers when all are; 1 for a single process)"),
    "workers": ("workers", "Worker processes serving the edge"),
}


# The proxy's processes (the supervisor and every worker with server.workers > 1, else the one
# process): summed, but for the start time, the latest. The README's leak criteria, graphable.
PROCESS = {  # process_usage() key -> (metric name, help)
    "resident_memory_bytes": ("process_resident_memory_bytes",
                              "Resident memory of the proxy's processes, bytes"),
    "open_fds": ("process_open_fds", "Open file descriptors of the proxy's processes"),
    "max_fds": ("process_max_fds", "Limits on open file descriptors (RLIMIT_NOFILE) of the "
                "proxy's processes, summed like process_open_fds"),
    "start_time_seconds": ("process_start_time_seconds", "Unix time the most recently started "
                           "of the proxy's processes started (a replaced worker moves it)"),
}


def _histogram(name: str, doc: str, h: dict[str, Any], labels: list[str] | None = None,
               values: list[str] | None = None,
               family: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
    family = family or HistogramMetricFamily(name, doc, labels=labels)
    cumulative, running = [], 0
    for bound, count in zip([*h["bounds"], float("inf")], h["counts"]):
        running += count
        cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
    family.add_metric(values or [], cumulative, h["sum"])
    return family


class SnapshotCollector:
    """Renders a merged Stats snapshot as Prometheus metric families."""

    def __init__(self, snapshot: Callable[[], Snapshot]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        yield InfoMetricFamily(P + "build", "Build information",
                               value={"version": __version__,
                                      "python": platform.python_version()})
        if not s:
            return
        requests = CounterMetricFamily(P + "requests", "Responses sent, by status class, "
                                       "method, protocol (http, websocket, sse, tunnel), "
                                       "origin (backend: relayed; proxy: the proxy's own answer) "
                                       "and the client's HTTP (h1, h2, grpc: native gRPC)",
                                       labels=["code_class", "method", "protocol", "origin",
                                               "http"])
        for *labels, n in s["responses"]:
            if len(labels) == 4:  # a snapshot written before the http label existed
                labels.append("h1")
            requests.add_metric(labels, n)
        yield requests
        yield _histogram(P + "request_duration_seconds",
                         "Time from a complete request head to the response head",
                         s["response_duration"])
        streams = HistogramMetricFamily(P + "stream_duration_seconds",
                                        "Lifetime of upgraded streams and SSE responses",
                                        labels=["protocol"])
        for protocol, h in sorted(s["stream_duration"].items()):
            _histogram("", "", h, values=[protocol], family=streams)
        yield streams
        for key, doc in (("request_bytes", "Request body bytes received from clients"),
                         ("response_bytes", "Response body bytes sent to clients"),
                         ("connections_opened", "Client connections accepted"),
                         ("h2_connections", "Client connections that spoke HTTP/2"),
                         ("h2_streams", "HTTP/2 streams (requests) opened by clients")):
            counter = CounterMetricFamily(P + key, doc)
            counter.add_metric([], s.get(key, 0))
            yield counter
        yield _histogram(P + "upstream_connect_duration_seconds",
                         "Time to open a new backend connection", s["connect_duration"])
        failures = CounterMetricFamily(P + "upstream_connect_failures",
                                       "Failed backend connect attempts by reason",
                                       labels=["reason"])
        for reason, n in sorted(s["connect_failures"].items()):
            failures.add_metric([reason], n)
        yield failures
        goaways = CounterMetricFamily(P + "h2_goaways",
                                      "HTTP/2 connections ended with GOAWAY for the client's "
                                      "misbehaviour, by reason", labels=["reason"])
        for reason, n in sorted(s.get("h2_goaways", {}).items()):
            goaways.add_metric([reason], n)
        yield goaways
        retries = CounterMetricFamily(P + "upstream_retries",
                                      "Requests retried on a fresh backend connection")
        retries.add_metric([], s["retries"])
        yield retries
        lookups = CounterMetricFamily(P + "registry_lookups", "Registry look-ups by outcome",
                                      labels=["kind", "outcome"])
        for kind, outcome, n in s["lookups"]:
            lookups.add_metric([kind, outcome], n)
        yield lookups
        yield _histogram(P + "registry_lookup_duration_seconds",
                         "Duration of registry look-ups that went to a remote store",
                         s["lookup_duration"])
        resumes = CounterMetricFamily(P + "resumes", "Auto-resume calls by outcome",
                                      labels=["outcome"])
        for outcome, n in sorted(s.get("resumes", {}).items()):
            resumes.add_metric([outcome], n)
        yield resumes
        if "resume_duration" in s:
            yield _histogram(P + "resume_duration_seconds",
                             "Time from a resume call to the sandbox running",
                             s["resume_duration"])
        reloads = CounterMetricFamily(P + "reloads", "Config, registry and certificate reloads",
                                      labels=["what", "result"])
        for what, result, n in s["reloads"]:
            reloads.add_metric([what, result], n)
        yield reloads
        last = GaugeMetricFamily(P + "last_reload_success_timestamp_seconds",
                                 "Unix time of the last successful reload", labels=["what"])
        for what, when in sorted(s["last_reload_success"].items()):
            last.add_metric([what], when)
        yield last
        for key, (name, doc) in GAUGES.items():
            if key in s["gauges"]:
                gauge = GaugeMetricFamily(P + name, doc)
                gauge.add_metric([], s["gauges"][key])
                yield gauge
        dropped = CounterMetricFamily(P + "access_log_dropped_lines",
                                      "Access log lines dropped because stdout could not keep up")
        dropped.add_metric([], s.get("access_log_dropped", 0))
        yield dropped
        usage = s.get("process", {})
        if "cpu_seconds" in usage:
            cpu = CounterMetricFamily(P + "process_cpu_seconds",
                                      "User and system CPU time of the proxy's processes")
            cpu.add_metric([], usage["cpu_seconds"])
            yield cpu
        for key, (name, doc) in PROCESS.items():
            if key in usage:
                gauge = GaugeMetricFamily(P + name, doc)
                gauge.add_metric([], usage[key])
                yield gauge


def metrics_app(snapshot: Callable[[], Snapshot], ready: Callable[[], bool]) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
