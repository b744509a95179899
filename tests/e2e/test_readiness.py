"""/readyz means "this instance can take traffic": 503 until the registry has answered once and
from SIGTERM on, 200 in between, also while a shared store (Redis) is down, when the proxy's own
503 "registry unavailable" is the better answer than a load balancer with no instance left.
`[metrics] ready_requires_registry = true` keeps the strict behaviour. Real proxies, real
redis-server."""

from __future__ import annotations

import asyncio

import pytest

from support.fleet import redis_server  # noqa: F401 - a fixture
from support.process import port_is_open, wait_until
from support.raw_http import fetch, http_status, metric_value

pytestmark = pytest.mark.timeout(90)

UNAVAILABLE = {"message": "registry unavailable", "code": 503}


def redis_config(server, **metrics) -> dict:
    return {"registry": {"kind": "redis", "url": server.url, "timeout": 0.5},
            "metrics": metrics}


async def registry_unready(p) -> bool:
    return await metric_value(p, "sandbox_proxy_registry_ready") == 0


async def test_redis_down_keeps_instances_ready_and_answers_503(proxy, backend, redis_server):
    redis_server.put("demo", {"host": "127.0.0.1", "ports": {"3000": backend.port}})
    p = proxy(sandboxes={}, config=redis_config(redis_server))
    assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200
    redis_server.kill()
    await wait_until(lambda: registry_unready(p), 5)  # noticed: the metric says so
    for _ in range(5):  # ... and /readyz does not: the load balancer keeps sending traffic
        assert await http_status(p.metrics_url + "/readyz") == 200
        r = await fetch(p, "/echo", host="3000-demo.localhost", timeout=5)
        assert r.status == 503 and r.json() == {"sandboxId": "demo", **UNAVAILABLE}
        await asyncio.sleep(0.2)
    redis_server.start()
    redis_server.put("demo", {"host": "127.0.0.1", "ports": {"3000": backend.port}})

    async def served() -> bool:
        return (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200
    await wait_until(served, 10)

    async def registry_ready() -> bool:
        return await metric_value(p, "sandbox_proxy_registry_ready") == 1
    await wait_until(registry_ready, 10)


async def test_strict_readiness_follows_the_store(proxy, backend, redis_server):
    p = proxy(sandboxes={}, config=redis_config(redis_server, ready_requires_registry=True))
    assert await http_status(p.metrics_url + "/readyz") == 200
    redis_server.kill()

    async def readyz_is(status: int) -> bool:
        return await http_status(p.metrics_url + "/readyz") == status
    await wait_until(lambda: readyz_is(503), 5)
    assert await registry_unready(p)
    redis_server.start()
    await wait_until(lambda: readyz_is(200), 10)


async def test_not_ready_before_the_registry_first_answers(proxy, redis_server):
    """Loaded once: a new instance whose store has never answered takes no traffic."""
    redis_server.kill()
    p = proxy(sandboxes={}, config=redis_config(redis_server), wait=False)

    async def up() -> bool:
        return port_is_open("127.0.0.1", p.port) and port_is_open("127.0.0.1", p.metrics_port)
    await wait_until(up, 15)
    assert await http_status(p.metrics_url + "/healthz") == 200
    for _ in range(3):
        assert await http_status(p.metrics_url + "/readyz") == 503
        await asyncio.sleep(0.3)
    redis_server.start()

    async def ready() -> bool:
        return await http_status(p.metrics_url + "/readyz") == 200
    await wait_until(ready, 15)


async def test_workers_stay_ready_through_a_redis_outage(proxy, redis_server):
    p = proxy(sandboxes={}, config={**redis_config(redis_server), "server": {"workers": 2}})
    assert await metric_value(p, "sandbox_proxy_workers") == 2
    redis_server.kill()

    async def both_unready() -> bool:
        return await metric_value(p, "sandbox_proxy_registry_ready") == 0
    await wait_until(both_unready, 10)
    assert await http_status(p.metrics_url + "/readyz") == 200
    assert p.stop() == 0
