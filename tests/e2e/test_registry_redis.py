"""The redis registry against a real redis-server: cache, notifications, outages, and a fleet of
two proxy processes sharing one Redis through the admin API."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from proxy.config import ConfigError, RegistryConfig, load_config
from proxy.registry.record import SandboxRecord
from proxy.registry.redis_store import RedisRegistry
from support.fleet import (RedisServer, check_core_scenarios, closed_within,  # noqa: F401
                           core_records, redis_cluster, redis_server, sentinel_server,
                           ws_connect)  # fixtures
from support.process import run_cli, wait_until
from support.raw_http import fetch, metric_value, not_found_body

pytestmark = pytest.mark.timeout(90)

ADMIN_TOKEN = "admin-token-0123456789abcdef"


def registry_config(server: RedisServer, **extra) -> dict:
    return {"registry": {"kind": "redis", "url": server.url, "timeout": 1.0, **extra}}


async def started(server: RedisServer, **extra) -> RedisRegistry:
    registry = RedisRegistry(RegistryConfig(kind="redis", url=server.url, timeout=1.0, **extra))
    await registry.start()
    await wait_until(lambda: _true(registry.ready()), 10)
    return registry


async def _true(value: bool) -> bool:
    return value


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, problem", [
    ("url", "http://127.0.0.1:6379", "expected a URL with scheme"),
    ("url", "redis+sentinel://127.0.0.1:26379", "sentinel URL"),
    ("prefix", "", "must be non-empty"),
    ("prefix", "sandbox:*", "glob"),
    ("timeout", 0, "must be >"),
    ("timeout", "2", "expected an integer or a number"),
    ("kind", "etcd", "unknown kind 'etcd' (supported: static, dns, redis)"),
])
def test_bad_redis_keys_name_file_key_and_problem(tmp_path, key, value, problem):
    config = tmp_path / "proxy.toml"
    kind = "" if key == "kind" else 'kind = "redis"\n'
    config.write_text(f"[registry]\n{kind}{key} = {json.dumps(value)}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert str(config) in message and f"[registry] {key}:" in message and problem in message


def test_bad_redis_url_exits_2(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('[registry]\nkind = "redis"\nurl = "redis://:x@127.0.0.1:notaport/0"\n')
    result = run_cli(["--config", str(config), "--check"])
    assert result.returncode == 2, result.stderr
    assert f"{config}: [registry] url:" in result.stderr


# -- the registry in-process -----------------------------------------------------------------


async def test_cached_answer_is_the_record_itself(redis_server):
    registry = await started(redis_server)
    try:
        redis_server.put("abc", {"host": "127.0.0.1", "ports": {"3000": 4000}})
        await asyncio.sleep(0.2)  # the write's own notification has arrived
        first = registry.lookup("abc")
        assert type(first) is not SandboxRecord  # a miss: an awaitable
        record = await first
        assert record.host == "127.0.0.1" and record.backend_port(3000) == 4000
        assert registry.lookup("abc") is record  # warm: the record, no awaitable
        assert await registry.lookup("nobody") is None
        assert registry.lookup("nobody") is None  # negative answers are cached too
        assert registry.lookup_outcomes["found"] == 1
        assert registry.lookup_outcomes["not_found"] == 1
        assert registry.lookup_duration.total > 0
    finally:
        await registry.close()


async def test_concurrent_lookups_share_one_get(redis_server):
    registry = await started(redis_server)
    redis_server.put("abc", {"host": "127.0.0.1"})
    await asyncio.sleep(0.2)
    calls = []
    real_get = registry._client.get

    async def counting_get(key):
        calls.append(key)
        await asyncio.sleep(0.05)
        return await real_get(key)

    registry._client.get = counting_get
    try:
        answers = await asyncio.gather(*(registry.lookup("abc") for _ in range(50)))
        assert {a.host for a in answers} == {"127.0.0.1"}
        assert calls == ["sandbox:abc"]
        assert registry.lookup_outcomes["coalesced"] == 49
    finally:
        await registry.close()


async def test_writes_and_deletes_elsewhere_reach_the_cache_and_the_listeners(redis_server):
    registry = await started(redis_server)
    removed: list[str] = []
    registry.add_removal_listener(removed.extend)
    try:
        redis_server.put("abc", {"host": "127.0.0.1"})
        redis_server.put("other", {"host": "127.0.0.1"})
        await asyncio.sleep(0.2)
        await registry.lookup("abc")
        await registry.lookup("other")
        # a change that keeps the backend: no removal, but the new value is served
        redis_server.put("abc", {"host": "127.0.0.1", "mask_request_host": "localhost"})
        await wait_until(lambda: _true(_host_mask(registry, "abc") == "localhost"), 1)
        assert removed == []
        # re-pointed, then deleted: each closes the connections at once
        redis_server.put("abc", {"host": "127.0.0.2"})
        await wait_until(lambda: _true(removed == ["abc"]), 1)
        redis_server.delete("abc")
        await wait_until(lambda: _true(removed == ["abc", "abc"]), 1)
        assert await _answer(registry.lookup("abc")) is None
        assert _answer_now(registry.lookup("other")).host == "127.0.0.1"
        # expiry is a removal too
        with redis_server.client() as client:
            client.pexpire("sandbox:other", 100)
        await wait_until(lambda: _true("other" in removed), 2)
    finally:
        await registry.close()


def _host_mask(registry, sandbox_id):
    found = registry.lookup(sandbox_id)
    return found.mask_request_host if type(found) is SandboxRecord else None


def _answer_now(found):
    assert type(found) is SandboxRecord, found
    return found


async def _answer(found):
    return await found if found is not None and type(found) is not SandboxRecord else found


async def test_invalid_stored_value_is_not_found(redis_server):
    registry = await started(redis_server)
    try:
        with redis_server.client() as client:
            client.set("sandbox:broken", "{not json")
            client.set("sandbox:badport", json.dumps({"host": "127.0.0.1", "ports": {"x": 1}}))
        assert await registry.lookup("broken") is None
        assert await registry.lookup("badport") is None
        assert registry.lookup_outcomes["invalid"] == 2
    finally:
        await registry.close()


async def test_proxy_turns_on_keyspace_notifications(redis_server):
    with redis_server.client() as client:
        client.config_set("notify-keyspace-events", "")
    registry = await started(redis_server)
    try:
        with redis_server.client() as client:
            flags = client.config_get("notify-keyspace-events")["notify-keyspace-events"]
        assert "K" in flags and all(f in flags or "A" in flags for f in "g$xe")
    finally:
        await registry.close()


async def test_outage_raises_within_the_timeout_and_recovers(redis_server):
    registry = await started(redis_server)
    try:
        redis_server.put("abc", {"host": "127.0.0.1"})
        await asyncio.sleep(0.2)
        await registry.lookup("abc")
        redis_server.kill()
        await wait_until(lambda: _true(not registry.ready()), 3)
        assert len(registry) == 0  # nothing is answered from memory while blind
        start = time.monotonic()
        with pytest.raises(Exception):
            await registry.lookup("abc")
        assert time.monotonic() - start < 1.5
        redis_server.start()
        await wait_until(lambda: _true(registry.ready()), 5)
        redis_server.put("abc", {"host": "127.0.0.3"})

        async def new_value_served():
            record = await _answer(registry.lookup("abc"))
            return record is not None and record.host == "127.0.0.3"

        await wait_until(new_value_served, 1)
    finally:
        await registry.close()


async def test_a_hung_redis_is_bounded_by_the_timeout(redis_server):
    registry = await started(redis_server)
    redis_server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(Exception):
            await registry.lookup("abc")
        assert time.monotonic() - start < 1.5
        await wait_until(lambda: _true(not registry.ready()), 5)
    finally:
        redis_server.resume()
        await registry.close()


# -- the proxy process -------------------------------------------------------------------------


async def test_core_scenarios_with_redis(proxy, backend, refused_port, redis_server):
    for sandbox_id, record in core_records(backend.port, refused_port).items():
        redis_server.put(sandbox_id, record)
    p = proxy(sandboxes={}, config=registry_config(redis_server))
    await check_core_scenarios(p)


async def test_delete_in_redis_closes_websocket_and_answers_not_found(proxy, backend,
                                                                       redis_server):
    redis_server.put("demo", {"host": "127.0.0.1", "ports": {"3000": backend.port}})
    redis_server.put("doomed", {"host": "127.0.0.1", "ports": {"3000": backend.port}})
    p = proxy(sandboxes={}, config=registry_config(redis_server))
    async with ws_connect(p, "demo") as keep, ws_connect(p, "doomed") as doomed:
        await doomed.send("alive?")
        assert await asyncio.wait_for(doomed.recv(), 5) == "alive?"
        redis_server.delete("doomed")
        assert await closed_within(doomed, 1.0) < 1.0
        r = await fetch(p, "/echo", host="3000-doomed.localhost")
        assert r.status == 502 and r.json() == not_found_body("doomed")
        await keep.send("still here")
        assert await asyncio.wait_for(keep.recv(), 5) == "still here"


async def test_redis_down_is_503_never_a_hang_and_recovers(proxy, backend, redis_server):
    redis_server.put("demo", {"host": "127.0.0.1", "ports": {"3000": backend.port}})
    p = proxy(sandboxes={}, config=registry_config(redis_server))
    assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200
    redis_server.kill()
    await wait_until(lambda: _registry_lost(p), 3)  # the proxy has noticed
    assert await _readyz_is(p, 200)  # and still takes traffic (tests/test_readiness.py)
    for sandbox_id in ("demo", "unknown"):
        start = time.monotonic()
        r = await fetch(p, "/echo", host=f"3000-{sandbox_id}.localhost", timeout=10)
        assert time.monotonic() - start < 2.0
        assert r.status == 503, r.body
        assert r.json()["message"] == "registry unavailable"
    redis_server.start()
    redis_server.put("demo", {"host": "127.0.0.1", "ports": {"3000": backend.port}})

    async def served():
        return (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200

    await wait_until(served, 5)
    await wait_until(lambda: _readyz_is(p, 200), 3)
    assert p.alive()


async def _registry_lost(p) -> bool:
    return await metric_value(p, "sandbox_proxy_registry_ready") == 0


async def _readyz_is(p, status: int) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        async with session.get(p.metrics_url + "/readyz") as r:
            return r.status == status


async def test_hung_redis_is_503_within_the_timeout(proxy, backend, redis_server):
    p = proxy(sandboxes={}, config=registry_config(redis_server))
    redis_server.pause()
    try:
        start = time.monotonic()
        r = await fetch(p, "/echo", host="3000-demo.localhost", timeout=10)
        assert r.status == 503 and r.json()["message"] == "registry unavailable"
        assert time.monotonic() - start < 2.0
    finally:
        redis_server.resume()


async def test_sentinel_url_finds_the_master(proxy, backend, redis_server, sentinel_server):
    redis_server.put("demo", {"host": "127.0.0.1", "ports": {"3000": backend.port}})
    p = proxy(sandboxes={}, config={"registry": {"kind": "redis", "url": sentinel_server.url,
                                                 "timeout": 1.0}})
    assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200
    async with ws_connect(p, "demo") as ws:
        await ws.send("hi")
        assert await asyncio.wait_for(ws.recv(), 5) == "hi"
        redis_server.delete("demo")  # notifications arrive through the master Sentinel named
        await closed_within(ws, 1.0)
    r = await fetch(p, "/echo", host="3000-demo.localhost")
    assert r.status == 502 and r.json() == not_found_body("demo")


async def test_cluster_url_watches_every_node(proxy, backend, redis_cluster):
    ids = [f"box{n}" for n in range(8)]  # spread over the three nodes' slots
    with redis_cluster.client() as cluster:
        for sandbox_id in ids:
            cluster.set(f"sandbox:{sandbox_id}",
                        json.dumps({"host": "127.0.0.1", "ports": {"3000": backend.port}}))
        nodes = {cluster.get_node_from_key(f"sandbox:{s}").port for s in ids}
    assert len(nodes) > 1
    p = proxy(sandboxes={}, config={"registry": {"kind": "redis", "url": redis_cluster.url,
                                                 "timeout": 1.0}})
    for sandbox_id in ids:
        assert (await fetch(p, "/echo", host=f"3000-{sandbox_id}.localhost")).status == 200
    with redis_cluster.client() as cluster:
        for sandbox_id in ids:
            cluster.delete(f"sandbox:{sandbox_id}")
    deleted_at = time.monotonic()

    async def all_gone():
        answers = [await fetch(p, "/echo", host=f"3000-{s}.localhost") for s in ids]
        return all(a.status == 502 for a in answers)

    await wait_until(all_gone, 1.0)
    assert time.monotonic() - deleted_at < 1.5


# -- a fleet: two proxies, one Redis, the admin API ------------------------------------------------


def admin_config(server: RedisServer, port: int) -> dict:
    return {**registry_config(server),
            "admin": {"listen": f"127.0.0.1:{port}", "token": ADMIN_TOKEN}}


async def admin_call(port: int, method: str, path: str, body: dict | None = None):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.request(method, f"http://127.0.0.1:{port}{path}", json=body,
                                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else None)


async def test_two_proxies_share_one_redis_through_the_admin_api(proxy, backend, redis_server):
    from support.process import free_port
    admin_a, admin_b = free_port(), free_port()
    a = proxy(sandboxes={}, config=admin_config(redis_server, admin_a))
    b = proxy(sandboxes={}, config=admin_config(redis_server, admin_b))
    record = {"host": "127.0.0.1", "ports": {"3000": backend.port}}

    # B has seen the sandbox missing (a cached negative answer must not linger)
    assert (await fetch(b, "/echo", host="3000-fleet.localhost")).status == 502
    status, body = await admin_call(admin_a, "PUT", "/sandboxes/fleet", record)
    assert status == 200 and body["id"] == "fleet"
    put_at = time.monotonic()

    async def served_by_b():
        return (await fetch(b, "/echo", host="3000-fleet.localhost")).status == 200

    await wait_until(served_by_b, 1.0)
    assert time.monotonic() - put_at < 1.0
    assert (await admin_call(admin_b, "GET", "/sandboxes/fleet"))[1]["host"] == "127.0.0.1"

    async with ws_connect(a, "fleet") as ws:
        await ws.send("via A")
        assert await asyncio.wait_for(ws.recv(), 5) == "via A"
        status, _ = await admin_call(admin_b, "DELETE", "/sandboxes/fleet")
        assert status == 204
        deleted_at = time.monotonic()
        await closed_within(ws, 1.0)

        async def gone_from_a():
            r = await fetch(a, "/echo", host="3000-fleet.localhost")
            return r.status == 502 and r.json() == not_found_body("fleet")

        await wait_until(gone_from_a, 1.0)
        assert time.monotonic() - deleted_at < 1.0
