"""Metrics listener: /metrics (Prometheus text), /healthz (alive) and /readyz (ready, not draining).

The hot path only increments plain integers on the EdgeContext; a prometheus-client collector reads
them at scrape time, so serving a request never touches a metrics library lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from proxy import __version__

if TYPE_CHECKING:
    from proxy.edge import EdgeContext

CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class EdgeCollector:
    def __init__(self, ctx: "EdgeContext"):
        self.ctx = ctx

    def collect(self):
        ctx = self.ctx
        yield InfoMetricFamily("sandbox_proxy_build", "Build information",
                               value={"version": __version__})
        requests = CounterMetricFamily("sandbox_proxy_requests",
                                       "Requests whose head was read completely")
        requests.add_metric([], ctx.requests)
        yield requests
        responses = CounterMetricFamily("sandbox_proxy_responses",
                                        "Responses sent to clients by status class",
                                        labels=["code_class"])
        for klass, count in ctx.responses.items():
            responses.add_metric([CLASSES[klass]], count)
        yield responses
        tunnels = CounterMetricFamily("sandbox_proxy_tunnels", "Upgrades relayed as raw tunnels")
        tunnels.add_metric([], ctx.tunnels_opened)
        yield tunnels
        clients = GaugeMetricFamily("sandbox_proxy_client_connections",
                                    "Open client connections")
        clients.add_metric([], len(ctx.connections))
        yield clients
        upstreams = GaugeMetricFamily("sandbox_proxy_upstream_connections",
                                      "Open backend connections (pooled, busy and tunnels)")
        upstreams.add_metric([], ctx.pools.open_connections())
        yield upstreams
        failures = CounterMetricFamily("sandbox_proxy_upstream_connect_failures",
                                       "Failed connect attempts to backends")
        failures.add_metric([], ctx.pools.connect_failures)
        yield failures


def metrics_app(ready: Callable[[], bool], ctx: "EdgeContext | None") -> web.Application:
    registry = CollectorRegistry()
    if ctx is not None:
        registry.register(EdgeCollector(ctx))

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
