"""The admin API: auth, validation, CRUD and pagination over each registry kind, the OpenAPI
document, the [admin] config section, the static registry's in-memory overlay, and the listener
in the real proxy process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path

import aiohttp
import openapi_spec_validator
import pytest
from openapi_schema_validator import OAS30Validator

from proxy.admin import OPENAPI_PATH, admin_app, start_admin
from proxy.config import ConfigError, ListenAddress, RegistryConfig, load_config
from proxy.registry.dns import DnsRegistry
from proxy.registry.redis_store import RedisRegistry
from proxy.registry.static import StaticRegistry
from support.fleet import closed_within, redis_server, ws_connect  # noqa: F401 - a fixture
from support.process import free_port, registry_toml
from support.raw_http import fetch, not_found_body

pytestmark = pytest.mark.timeout(60)

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def static_registry(tmp_path: Path, sandboxes: dict | None = None,
                    writable: bool = True) -> StaticRegistry:
    path = tmp_path / "sandboxes.toml"
    path.write_text(registry_toml(sandboxes or {}))
    return StaticRegistry(path, 0, writable=writable)


@pytest.fixture
async def static_client(tmp_path, aiohttp_client):
    registry = static_registry(tmp_path, {"fromfile": {"host": "10.0.0.1"}})
    client = await aiohttp_client(admin_app(registry, TOKEN))
    client.registry = registry
    return client


# -- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-000000000"},
                                     {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": TOKEN}])
async def test_every_route_needs_the_bearer_token(static_client, headers):
    for method, path in (("GET", "/sandboxes"), ("GET", "/sandboxes/fromfile"),
                         ("PUT", "/sandboxes/x"), ("DELETE", "/sandboxes/fromfile")):
        r = await static_client.request(method, path, headers=headers, json={"host": "1.2.3.4"})
        assert r.status == 401, (method, path)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "error" in await r.json()
    assert await static_client.registry.get("fromfile") is not None


async def test_openapi_is_public_and_describes_every_route(static_client):
    r = await static_client.get("/openapi.json")
    assert r.status == 200
    spec = await r.json()
    assert spec["openapi"].startswith("3.")
    served = {(route.method.lower(), route.resource.canonical)
              for route in static_client.app.router.routes() if route.method != "HEAD"}
    described = {(method, path) for path, item in spec["paths"].items()
                 for method in item if method != "parameters"}
    assert served == described
    assert json.loads(OPENAPI_PATH.read_text()) == spec


def test_openapi_document_is_valid_openapi():
    """openapi-spec-validator, the reference validator of OpenAPI documents."""
    spec = json.loads(OPENAPI_PATH.read_text())
    openapi_spec_validator.validate(spec)
    assert spec["openapi"].startswith("3.0.")


# -- CRUD over the static overlay ------------------------------------------------------------


async def test_put_get_list_delete(static_client):
    body = {"host": "10.0.0.2", "ports": {"3000": 32768}, "mask_request_host": "localhost:${PORT}",
            "mask_origin": False, "traffic_access_token": "tok-en", "state": "paused",
            "auto_resume": True}
    r = await static_client.put("/sandboxes/abc", json=body, headers=AUTH)
    assert r.status == 200
    stored = await r.json()
    assert stored == {"id": "abc", "host": "10.0.0.2", "ports": {"3000": 32768},
                      "mask_request_host": "localhost:${PORT}", "mask_origin": False,
                      "traffic_access_token_sha256": hashlib.sha256(b"tok-en").hexdigest(),
                      "state": "paused", "auto_resume": True}
    assert "tok-en" not in json.dumps(stored)  # a token is never echoed
    r = await static_client.get("/sandboxes/abc", headers=AUTH)
    assert r.status == 200 and await r.json() == stored
    assert static_client.registry.lookup("abc").host == "10.0.0.2"

    r = await static_client.get("/sandboxes", headers=AUTH)
    assert [s["id"] for s in (await r.json())["sandboxes"]] == ["abc", "fromfile"]

    r = await static_client.delete("/sandboxes/abc", headers=AUTH)
    assert r.status == 204
    assert static_client.registry.lookup("abc") is None
    r = await static_client.delete("/sandboxes/abc", headers=AUTH)
    assert r.status == 404
    r = await static_client.get("/sandboxes/abc", headers=AUTH)
    assert r.status == 404 and (await r.json())["id"] == "abc"


async def test_list_is_paginated_in_id_order(static_client):
    for sandbox_id in ("e1", "a1", "d1", "b1", "c1"):
        r = await static_client.put(f"/sandboxes/{sandbox_id}", json={"host": "10.0.0.9"},
                                    headers=AUTH)
        assert r.status == 200
    seen, after = [], None
    while True:
        query = "limit=2" + (f"&after={after}" if after else "")
        page = await (await static_client.get(f"/sandboxes?{query}", headers=AUTH)).json()
        assert len(page["sandboxes"]) <= 2
        seen += [s["id"] for s in page["sandboxes"]]
        after = page["next"]
        if after is None:
            break
    assert seen == ["a1", "b1", "c1", "d1", "e1", "fromfile"]
    for bad in ("0", "1001", "x", "-1"):
        r = await static_client.get(f"/sandboxes?limit={bad}", headers=AUTH)
        assert r.status == 400 and (await r.json())["field"] == "limit"


@pytest.mark.parametrize("path, body, field", [
    ("/sandboxes/abc", {"ports": {}}, "host"),
    ("/sandboxes/abc", {"host": "10.0.0.1", "ports": {"x": 1}}, "ports"),
    ("/sandboxes/abc", {"host": "10.0.0.1", "ports": {"3000": 70000}}, "ports"),
    ("/sandboxes/abc", {"host": "10.0.0.1", "colour": "red"}, "colour"),
    ("/sandboxes/abc", {"host": "10.0.0.1", "state": "sleeping"}, "state"),
    ("/sandboxes/abc", {"host": "10.0.0.1", "auto_resume": "yes"}, "auto_resume"),
    ("/sandboxes/abc", {"host": "10.0.0.1", "mask_origin": "false"}, "mask_origin"),
    ("/sandboxes/abc", {"host": "10.0.0.1", "mask_request_host": "a b"}, "mask_request_host"),
    ("/sandboxes/abc", {"host": "10.0.0.1", "traffic_access_token_sha256": "00"},
     "traffic_access_token_sha256"),
    ("/sandboxes/abc", {"host": "10.0.0.1", "traffic_access_token": "a",
                        "traffic_access_token_sha256": "00" * 32}, "traffic_access_token"),
    ("/sandboxes/abc", ["host"], "body"),
    ("/sandboxes/ABC", {"host": "10.0.0.1"}, "id"),
    ("/sandboxes/a-b", {"host": "10.0.0.1"}, "id"),
])
async def test_validation_errors_are_400_naming_the_field(static_client, path, body, field):
    r = await static_client.put(path, json=body, headers=AUTH)
    assert r.status == 400
    answer = await r.json()
    assert answer["field"] == field and answer["error"]


async def test_body_that_is_not_json_is_400(static_client):
    r = await static_client.put("/sandboxes/abc", data=b"{host", headers=AUTH)
    assert r.status == 400 and (await r.json())["field"] == "body"
    r = await static_client.put("/sandboxes/abc", data=b"x" * 100_000, headers=AUTH)
    assert r.status == 413


async def test_static_overlay_removal_and_file_edits(tmp_path):
    registry = static_registry(tmp_path, {"keep": {"host": "10.0.0.1"},
                                          "moved": {"host": "10.0.0.1"}})
    removed: list[str] = []
    registry.add_removal_listener(removed.extend)
    from proxy.registry.record import record_from_mapping
    await registry.put(record_from_mapping("moved", {"host": "10.0.0.2"}))
    assert removed == ["moved"]  # re-pointed: its connections are closed
    await registry.put(record_from_mapping("keep", {"host": "10.0.0.1",
                                                    "mask_request_host": "localhost"}))
    assert removed == ["moved"]  # same backend: connections may stay
    assert await registry.delete("keep") and removed == ["moved", "keep"]
    # an edit of other entries keeps the overlay ...
    import os
    import time
    registry.path.write_text(registry_toml({"keep": {"host": "10.0.0.1"},
                                            "moved": {"host": "10.0.0.1"},
                                            "new": {"host": "10.0.0.3"}}))
    os.utime(registry.path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert registry.reload()
    assert registry.lookup("moved").host == "10.0.0.2" and registry.lookup("keep") is None
    # ... an edit of the same entry wins over it (latest write wins)
    registry.path.write_text(registry_toml({"keep": {"host": "10.0.0.5"},
                                            "moved": {"host": "10.0.0.4"},
                                            "new": {"host": "10.0.0.3"}}))
    os.utime(registry.path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert registry.reload()
    assert registry.lookup("moved").host == "10.0.0.4"
    assert registry.lookup("keep").host == "10.0.0.5"
    assert removed[-1:] == ["moved"] and "new" not in removed


# -- read-only kinds and stores that are down ------------------------------------------------


async def test_read_only_kinds_answer_405(tmp_path, aiohttp_client):
    dns_registry = DnsRegistry(RegistryConfig(kind="dns"))
    for registry in (dns_registry, static_registry(tmp_path, writable=False)):
        client = await aiohttp_client(admin_app(registry, TOKEN))
        r = await client.put("/sandboxes/abc", json={"host": "10.0.0.1"}, headers=AUTH)
        assert r.status == 405 and "read-only" in (await r.json())["error"]
        assert r.headers["Allow"] == "GET"
        r = await client.delete("/sandboxes/abc", headers=AUTH)
        assert r.status == 405
    r = await client.get("/sandboxes", headers=AUTH)
    assert r.status == 200  # static can list even when read-only
    client = await aiohttp_client(admin_app(dns_registry, TOKEN))
    r = await client.get("/sandboxes", headers=AUTH)
    assert r.status == 405 and "cannot list" in (await r.json())["error"]


async def test_redis_store_through_the_admin_api(redis_server, aiohttp_client):
    registry = RedisRegistry(RegistryConfig(kind="redis", url=redis_server.url, timeout=1.0))
    await registry.start()
    try:
        client = await aiohttp_client(admin_app(registry, TOKEN))
        r = await client.put("/sandboxes/abc", json={"host": "10.0.0.1",
                                                     "traffic_access_token": "t0k"},
                             headers=AUTH)
        assert r.status == 200
        with redis_server.client() as redis:
            stored = json.loads(redis.get("sandbox:abc"))
        assert stored == {"host": "10.0.0.1",
                          "traffic_access_token_sha256": hashlib.sha256(b"t0k").hexdigest()}
        for n in range(3):
            await client.put(f"/sandboxes/p{n}", json={"host": "10.0.0.1"}, headers=AUTH)
        page = await (await client.get("/sandboxes?limit=3", headers=AUTH)).json()
        assert [s["id"] for s in page["sandboxes"]] == ["abc", "p0", "p1"] and page["next"] == "p1"
        page = await (await client.get("/sandboxes?after=p1", headers=AUTH)).json()
        assert [s["id"] for s in page["sandboxes"]] == ["p2"] and page["next"] is None
        with redis_server.client() as redis:
            redis.set("sandbox:broken", "{")
        r = await client.get("/sandboxes/broken", headers=AUTH)
        assert r.status == 409 and "invalid" in (await r.json())["error"]
        redis_server.kill()
        for method, path in (("GET", "/sandboxes/abc"), ("PUT", "/sandboxes/abc"),
                             ("DELETE", "/sandboxes/abc"), ("GET", "/sandboxes")):
            r = await client.request(method, path, json={"host": "10.0.0.1"}, headers=AUTH)
            assert r.status == 503 and (await r.json())["error"] == "registry unavailable"
    finally:
        await registry.close()


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, problem", [
    ('listen = "127.0.0.1:9092"', "[admin] token: required when listen is set"),
    ('listen = "127.0.0.1:9092"\ntoken = "short"', "[admin] token: must be at least 16"),
    ('listen = "127.0.0.1:9092"\ntoken = "has spaces in the token"', "[admin] token: must be"),
    ('listen = "nowhere"\ntoken = "0123456789abcdef0"', "[admin] listen: expected host:port"),
    ('colour = "red"', "[admin] colour: unknown key"),
])
def test_bad_admin_config(tmp_path, monkeypatch, text, problem):
    monkeypatch.delenv("SANDBOX_PROXY_ADMIN_TOKEN", raising=False)
    config = tmp_path / "proxy.toml"
    config.write_text(f"[admin]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(config) in str(info.value) and problem in str(info.value)


def test_admin_token_from_the_environment(tmp_path, monkeypatch):
    config = tmp_path / "proxy.toml"
    config.write_text('[admin]\nlisten = "127.0.0.1:9092"\ntoken = "from-the-file-000000"\n')
    monkeypatch.setenv("SANDBOX_PROXY_ADMIN_TOKEN", "from-the-environment-0000")
    admin = load_config(config).admin
    assert admin.listen == ListenAddress("127.0.0.1", 9092)
    assert admin.token == "from-the-environment-0000"
    assert "from-the" not in repr(admin)  # never in logs
    monkeypatch.delenv("SANDBOX_PROXY_ADMIN_TOKEN")
    assert load_config(None).admin.listen is None  # off by default


async def test_start_admin_listens_only_when_configured(tmp_path):
    from dataclasses import replace
    registry = static_registry(tmp_path)
    config = load_config(None)
    assert await start_admin(config, registry) is None
    port = free_port()
    config = replace(config, admin=replace(config.admin, listen=ListenAddress("127.0.0.1", port),
                                           token=TOKEN))
    runner = await start_admin(config, registry)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/sandboxes") as r:
                assert r.status == 401
            async with session.get(f"http://127.0.0.1:{port}/sandboxes", headers=AUTH) as r:
                assert r.status == 200
    finally:
        await runner.cleanup()


# -- the proxy process -------------------------------------------------------------------------


async def test_admin_api_of_the_running_proxy(proxy, backend):
    admin_port = free_port()
    p = proxy(sandboxes={}, config={"admin": {"listen": f"127.0.0.1:{admin_port}",
                                              "token": TOKEN}})
    base = f"http://127.0.0.1:{admin_port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.put(f"{base}/sandboxes/viaapi", headers=AUTH,
                               json={"host": "127.0.0.1", "ports": {"3000": backend.port}}) as r:
            assert r.status == 200
        r = await fetch(p, "/echo", host="3000-viaapi.localhost")
        assert r.status == 200
        async with ws_connect(p, "viaapi") as ws:
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), 5) == "hi"
            async with session.delete(f"{base}/sandboxes/viaapi", headers=AUTH) as r:
                assert r.status == 204
            assert await closed_within(ws, 1.0) < 1.0
        r = await fetch(p, "/echo", host="3000-viaapi.localhost")
        assert r.status == 502 and r.json() == not_found_body("viaapi")


# -- every answer of the running proxy's admin API is one the document describes --------------


class SpecChecker:
    """Holds answers to proxy/admin_openapi.json: the status is one the operation lists, the
    body valid against that response's schema (OpenAPI 3.0 rules); answers for paths or
    methods the document does not have are its Error object."""

    def __init__(self) -> None:
        self.spec = json.loads(OPENAPI_PATH.read_text())
        self.problems: list[str] = []
        self.seen: set[tuple[str, str, int]] = set()

    def schema_errors(self, schema: dict, body) -> list[str]:
        validator = OAS30Validator({**schema, "components": self.spec["components"]})
        return [e.message for e in validator.iter_errors(body)]

    def operation(self, method: str, path: str) -> tuple[str, dict] | None:
        for template, item in self.spec["paths"].items():
            pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
            if re.match(pattern, path) and method.lower() in item:
                return template, item[method.lower()]
        return None

    async def check(self, response: aiohttp.ClientResponse) -> None:
        method, path = response.method, response.url.path
        body = await response.read()
        found = self.operation(method, path)
        where = f"{method} {path} -> {response.status}"
        if found is None:
            if response.status not in (404, 405):
                self.problems.append(f"{where}: not in the document")
            data = json.loads(body)
            errors = self.schema_errors({"$ref": "#/components/schemas/Error"}, data)
            if errors or response.headers.get("Content-Type", "").split(";")[0] != \
                    "application/json":
                self.problems.append(f"{where}: not an Error object: {body[:200]!r}")
            if response.status == 405 and not response.headers.get("Allow"):
                self.problems.append(f"{where}: no Allow header")
            self.seen.add((method, "?", response.status))
            return
        template, operation = found
        self.seen.add((method, template, response.status))
        documented = operation["responses"].get(str(response.status))
        if documented is None:
            self.problems.append(f"{where}: status not documented for {method} {template}")
            return
        content = documented.get("content", {}).get("application/json")
        if content is None:
            if body and template != "/openapi.json":
                self.problems.append(f"{where}: a body where none is documented")
            return
        errors = self.schema_errors(content["schema"], json.loads(body))
        if errors:
            self.problems.append(f"{where}: {errors}")


async def test_every_answer_of_the_running_admin_api_is_documented(proxy, redis_server):
    """Through the real CLI on a real Redis: success and every error the API gives."""
    admin_port = free_port()
    p = proxy(sandboxes={}, config={
        "registry": {"kind": "redis", "url": redis_server.url, "timeout": 0.5},
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": TOKEN}})
    base = f"http://127.0.0.1:{admin_port}"
    spec = SpecChecker()
    with redis_server.client() as redis:
        redis.set("sandbox:broken", '{"host": 7}')
    record = {"host": "10.0.0.1", "ports": {"3000": 32768}, "traffic_access_token": "t0k",
              "mask_request_host": "localhost:${PORT}", "state": "paused", "auto_resume": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def call(method: str, path: str, headers=AUTH, **kwargs) -> int:
            async with session.request(method, base + path, headers=headers, **kwargs) as r:
                await spec.check(r)
                return r.status

        assert await call("GET", "/openapi.json", headers={}) == 200
        assert await call("PUT", "/sandboxes/abc", json=record) == 200
        assert await call("PUT", "/sandboxes/other", json={"host": "10.0.0.2"}) == 200
        assert await call("PUT", "/sandboxes/abc", json={"host": 1}) == 400
        assert await call("PUT", "/sandboxes/abc", json={"host": "h", "colour": 1}) == 400
        assert await call("PUT", "/sandboxes/abc", data=b"{not json") == 400
        assert await call("PUT", "/sandboxes/Bad_Id", json={"host": "10.0.0.1"}) == 400
        assert await call("PUT", "/sandboxes/abc", data=b"x" * (70 * 1024)) == 413
        assert await call("GET", "/sandboxes/abc") == 200
        assert await call("GET", "/sandboxes/nobody") == 404
        assert await call("GET", "/sandboxes/broken") == 409  # was an undocumented 500
        assert await call("GET", "/sandboxes/Bad_Id") == 400
        assert await call("GET", "/sandboxes?limit=1") == 200
        assert await call("GET", "/sandboxes?limit=0") == 400
        assert await call("GET", "/sandboxes", headers={}) == 401
        assert await call("DELETE", "/sandboxes/other") == 204
        assert await call("DELETE", "/sandboxes/other") == 404
        # what the document does not have: the documented Error shape all the same
        assert await call("POST", "/sandboxes/abc", json=record) == 405
        assert await call("PATCH", "/sandboxes", json=record) == 405
        assert await call("GET", "/nothing/here") == 404
        assert await call("GET", "/sandboxes/abc/extra") == 404
        redis_server.kill()
        for method, path in (("GET", "/sandboxes/abc"), ("PUT", "/sandboxes/abc"),
                             ("DELETE", "/sandboxes/abc"), ("GET", "/sandboxes")):
            assert await call(method, path, json=record) == 503
    assert not spec.problems, "\n".join(spec.problems)
    assert {s for _, _, s in spec.seen} >= {200, 204, 400, 401, 404, 405, 409, 413, 503}
