"""Sandbox lifecycle and sharing (issue 15), end to end through the real CLI: no credential, no
wake-up; the webhook's refusals reach the client; traffic is reported as activity; share links
that expire, cover one port and can be revoked; public ports; blocked control-plane paths."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings, strategies as st

from support.fleet import ControlPlane, control_plane, redis_server  # noqa: F401 - fixtures
from support.process import free_port, run_cli
from support.raw_http import RawConn, fetch, header_value, raw_backend

pytestmark = pytest.mark.timeout(90)

TOKEN = "s3cret-Token_1"
TOKEN_HEADER = "e2b-traffic-access-token"
SHARE_KEY = "share-key-0123456789abcdef"


def box(backend_port: int, **extra) -> dict:
    return {"host": "127.0.0.1", "ports": {3000: backend_port, 8080: backend_port,
                                           49983: backend_port}, **extra}


def resume_config(plane: ControlPlane) -> dict:
    return {"registry": {"resume_url": plane.url, "resume_timeout": 5}}


# -- 1. admission before wake-up ------------------------------------------------------------------

async def test_unauthenticated_request_never_wakes_a_protected_sandbox(proxy, backend,
                                                                       control_plane):
    sleepy = box(backend.port, state="paused", auto_resume=True, traffic_access_token=TOKEN,
                 blocked_paths={"3000": ["/init"]})
    fenced = box(backend.port, state="paused", auto_resume=True,
                 allowed_clients=["10.0.0.0/8"])
    p = proxy({"sleepy": sleepy, "fenced": fenced}, config=resume_config(control_plane))
    control_plane.on_resume = lambda body: p.write_registry(
        {"sleepy": {**sleepy, "state": "running"}, "fenced": fenced})
    refused = [
        ("3000-sleepy.localhost", {}, 403),                              # no credential
        ("3000-sleepy.localhost", {TOKEN_HEADER: "wrong"}, 403),         # a wrong one
        ("3000-sleepy.localhost", {"Cookie": f"sandbox-access-token={TOKEN}"}, 403),  # cookie off
        ("3000-fenced.localhost", {}, 403),                              # ingress rules
    ]
    for host, headers, status in refused:
        r = await fetch(p, "/echo", host=host, headers=headers)
        assert r.status == status, (host, headers, r.body)
    r = await fetch(p, "/init", host="3000-sleepy.localhost", headers={TOKEN_HEADER: TOKEN})
    assert r.status == 404                                               # a blocked path
    await asyncio.sleep(0.5)
    assert control_plane.calls == []
    # a valid credential wakes it, once
    r = await fetch(p, "/echo", host="3000-sleepy.localhost", headers={TOKEN_HEADER: TOKEN})
    assert r.status == 200, r.body
    assert len(control_plane.calls) == 1


async def test_limits_are_decided_before_wake_up(proxy, backend, control_plane):
    sleepy = box(backend.port, state="paused", auto_resume=True)
    p = proxy({"sleepy": sleepy, "awake": box(backend.port)},
              config={**resume_config(control_plane),
                      "limits": {"sandbox_connections": 1}})
    control_plane.status = 200
    control_plane.delay = 30  # never comes back while the test runs
    first = asyncio.create_task(fetch(p, "/echo", host="3000-sleepy.localhost", timeout=10))
    await asyncio.sleep(0.5)
    assert len(control_plane.calls) == 1
    r = await fetch(p, "/echo", host="3000-sleepy.localhost")
    assert r.status == 429
    await asyncio.sleep(0.3)
    assert len(control_plane.calls) == 1  # the refused request did not call it again
    first.cancel()


@pytest.mark.parametrize("status, headers, expected", [
    (403, {}, (403, {"sandboxId": "sleepy", "code": 403,
                     "message": "You do not have permission to resume this sandbox"})),
    (429, {"Retry-After": "7"}, (429, None)),
    (404, {}, (502, {"sandboxId": "sleepy", "code": 502,
                     "message": "The sandbox was not found"})),
])
async def test_webhook_answers_reach_the_client(proxy, backend, status, headers, expected):
    async def resume(request: web.Request) -> web.Response:
        return web.json_response({"error": "no"}, status=status, headers=headers)
    app = web.Application()
    app.router.add_post("/resume", resume)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        p = proxy({"sleepy": box(backend.port, state="paused", auto_resume=True)},
                  config={"registry": {"resume_url": f"http://127.0.0.1:{port}/resume",
                                       "resume_timeout": 5}})
        r = await fetch(p, "/echo", host="3000-sleepy.localhost")
        assert r.status == expected[0], r.body
        if expected[1] is not None:
            assert r.json() == expected[1]
        if status == 429:
            assert r.headers["Retry-After"] == "7"
            assert r.json()["sandboxId"] == "sleepy"
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    finally:
        await runner.cleanup()


# -- 2. activity reporting -------------------------------------------------------------------------

class ActivitySink:
    """A control plane's activity webhook: records every report; can fail on purpose."""

    def __init__(self):
        self.reports: list[dict] = []
        self.fail = False

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.fail:
            return web.Response(status=500)
        self.reports.append({"at": time.time(), **body})
        return web.Response(status=204)

    async def __aenter__(self):
        app = web.Application()
        app.router.add_post("/activity", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.url = f"http://127.0.0.1:{self.port}/activity"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()

    def since(self, moment: float) -> list[dict]:
        return [r["sandboxes"] for r in self.reports if r["at"] > moment]


async def test_open_websocket_keeps_a_sandbox_in_every_report(proxy, backend):
    async with ActivitySink() as sink:
        p = proxy({"ws": box(backend.port), "plain": box(backend.port), "idle": box(backend.port)},
                  config={"activity": {"url": sink.url, "interval": 0.3}})
        assert (await fetch(p, "/echo", host="3000-plain.localhost")).status == 200
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(p.url("/ws"), headers={"Host": "3000-ws.localhost"}
                                          ) as ws:
                opened = time.time()
                await asyncio.sleep(1.5)
                await ws.send_str("still here")
                assert (await ws.receive()).data == "still here"
                during = sink.since(opened + 0.1)
        closed = time.time()
        await asyncio.sleep(1.5)
    assert len(during) >= 3, sink.reports
    for report in during:
        assert report["ws"]["openStreams"] == 1
        assert abs(report["ws"]["lastActive"] - time.time()) < 10
    first = sink.reports[0]["sandboxes"]
    assert first["plain"]["openStreams"] == 0
    assert all("plain" not in r for r in during[1:])  # reported once, for its request
    later = sink.since(closed + 0.7)
    assert later == [] or all("ws" not in r for r in later)
    assert all("idle" not in r["sandboxes"] for r in sink.reports)


async def test_failed_reports_are_retried_merged(proxy, backend):
    async with ActivitySink() as sink:
        sink.fail = True
        p = proxy({"a": box(backend.port), "b": box(backend.port)},
                  config={"activity": {"url": sink.url, "interval": 0.2}})
        assert (await fetch(p, "/echo", host="3000-a.localhost")).status == 200
        await asyncio.sleep(0.5)
        assert (await fetch(p, "/echo", host="3000-b.localhost")).status == 200
        await asyncio.sleep(0.3)
        sink.fail = False
        await asyncio.sleep(0.6)
    assert sink.reports, "nothing was delivered"
    assert {"a", "b"} <= set(sink.reports[0]["sandboxes"])


async def test_activity_written_to_redis(proxy, backend, redis_server):
    redis_server.put("ws", box(backend.port) | {"ports": {"3000": backend.port}})
    p = proxy(sandboxes={}, config={
        "registry": {"kind": "redis", "url": redis_server.url, "timeout": 1.0},
        "activity": {"redis": True, "interval": 0.2}})
    assert (await fetch(p, "/echo", host="3000-ws.localhost")).status == 200
    deadline = time.monotonic() + 5
    value = None
    while time.monotonic() < deadline and value is None:
        await asyncio.sleep(0.1)
        with redis_server.client() as c:
            value = c.get("sandbox:ws:activity")
            ttl = c.ttl("sandbox:ws:activity")
    assert value is not None
    entry = json.loads(value)
    assert abs(entry["lastActive"] - time.time()) < 10 and entry["openStreams"] == 0
    assert ttl > 0
    # the activity key is not a record: the sandbox still routes, nothing else appears
    assert (await fetch(p, "/echo", host="3000-ws.localhost")).status == 200


def test_activity_redis_needs_the_redis_registry(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text("[activity]\nredis = true\n")
    r = run_cli(["--config", str(config), "--check"])
    assert r.returncode == 2 and "[activity] redis" in r.stderr


# -- 3. share links ---------------------------------------------------------------------------------

def mint(p, sandbox: str, port: int, ttl: int) -> str:
    r = run_cli(["share", "--config", str(p.config_path), "--sandbox", sandbox,
                 "--port", str(port), "--ttl", str(ttl), "--scheme", "http"])
    assert r.returncode == 0, r.stderr
    url = r.stdout.strip()
    assert url.startswith(f"http://{port}-{sandbox}.localhost/?share=")
    return urllib.parse.urlsplit(url).query.partition("=")[2]


def shared_box(backend_port: int, epoch: int = 0) -> dict:
    return box(backend_port, traffic_access_token=TOKEN, share_epoch=epoch)


async def open_link(p, token: str, port: int = 3000, path: str = "/page?x=1"):
    conn = await RawConn.open(p.port)
    try:
        sep = "&" if "?" in path else "?"
        return await conn.request("GET", f"{path}{sep}share={token}", f"{port}-locked.localhost")
    finally:
        await conn.aclose()


async def test_share_link_opens_its_port_until_it_expires(proxy, backend):
    p = proxy({"locked": shared_box(backend.port)},
              config={"access": {"share_key": SHARE_KEY}})
    token = mint(p, "locked", 3000, 60)
    r = await open_link(p, token)
    assert r.status == 302 and r.header("Location") == "/page?x=1"
    cookie = r.header("Set-Cookie")
    assert cookie.startswith(f"sandbox-share={token};")
    assert "HttpOnly" in cookie and "Domain" not in cookie and "Max-Age=" in cookie
    jar = {"Cookie": f"other=1; sandbox-share={token}"}
    r = await fetch(p, "/echo?share=no-not-this", host="3000-locked.localhost", headers=jar)
    assert r.status == 403  # a query share is always checked, even with a good cookie
    r = await fetch(p, "/echo", host="3000-locked.localhost", headers=jar)
    assert r.status == 200, r.body
    echo = r.json()
    assert header_value(echo, "Cookie") == "other=1"  # never forwarded
    assert "share" not in echo["raw_path"]
    # only for its port
    r = await fetch(p, "/echo", host="8080-locked.localhost", headers=jar)
    assert r.status == 403
    assert (await open_link(p, token, port=8080)).status == 403
    # not for another sandbox
    p.write_registry({"locked": shared_box(backend.port),
                      "other": shared_box(backend.port)})
    await asyncio.sleep(0.6)
    r = await fetch(p, "/echo", host="3000-other.localhost", headers=jar)
    assert r.status == 403


async def test_share_link_stops_at_expiry(proxy, backend):
    p = proxy({"locked": shared_box(backend.port)},
              config={"access": {"share_key": SHARE_KEY}})
    token = mint(p, "locked", 3000, 2)
    jar = {"Cookie": f"sandbox-share={token}"}
    assert (await fetch(p, "/echo", host="3000-locked.localhost", headers=jar)).status == 200
    await asyncio.sleep(2.5)
    r = await fetch(p, "/echo", host="3000-locked.localhost", headers=jar)
    assert r.status == 403 and "share link" in r.json()["message"]
    assert (await open_link(p, token)).status == 403


async def test_epoch_bump_revokes_every_older_link(proxy, backend):
    p = proxy({"locked": shared_box(backend.port)},
              config={"access": {"share_key": SHARE_KEY}})
    old = mint(p, "locked", 3000, 600)
    p.write_registry({"locked": shared_box(backend.port, epoch=1)})
    await asyncio.sleep(0.6)
    assert (await fetch(p, "/echo", host="3000-locked.localhost",
                        headers={"Cookie": f"sandbox-share={old}"})).status == 403
    new = mint(p, "locked", 3000, 600)
    assert (await fetch(p, "/echo", host="3000-locked.localhost",
                        headers={"Cookie": f"sandbox-share={new}"})).status == 200


@pytest.mark.parametrize("mutate", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),      # signature
    lambda t: t.replace(".3000.", ".3001.", 1),             # port
    lambda t: "x" + t,                                      # sandbox id
    lambda t: t.rsplit(".", 2)[0] + ".9." + t.rsplit(".", 1)[1],  # epoch
])
async def test_a_tampered_link_is_refused(proxy, backend, mutate):
    p = proxy({"locked": shared_box(backend.port)},
              config={"access": {"share_key": SHARE_KEY}})
    token = mint(p, "locked", 3000, 600)
    assert (await open_link(p, mutate(token))).status == 403


async def test_share_links_through_the_admin_api(proxy, backend):
    admin_port = free_port()
    p = proxy({"locked": shared_box(backend.port)},
              config={"access": {"share_key": SHARE_KEY},
                      "admin": {"listen": f"127.0.0.1:{admin_port}",
                                "token": "admin-token-0123456789abcdef"}})
    auth = {"Authorization": "Bearer admin-token-0123456789abcdef"}
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{admin_port}/sandboxes/locked/shares"
        async with session.post(url, json={"port": 3000, "ttl": 60}, headers=auth) as r:
            assert r.status == 201
            body = await r.json()
        async with session.post(url, json={"port": 0, "ttl": 60}, headers=auth) as bad:
            assert bad.status == 400 and (await bad.json())["field"] == "port"
        async with session.post(f"http://127.0.0.1:{admin_port}/sandboxes/ghost/shares",
                                json={"port": 3000, "ttl": 60}, headers=auth) as missing:
            assert missing.status == 404
    assert body["url"].startswith("https://3000-locked.localhost/?share=")
    assert body["epoch"] == 0 and body["expires"] > time.time()
    assert (await open_link(p, body["token"])).status == 302


def test_share_key_must_be_long_enough(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('[access]\nshare_key = "short"\n')
    r = run_cli(["--config", str(config), "--check"])
    assert r.returncode == 2 and "[access] share_key" in r.stderr


# -- 4. public ports and blocked paths ----------------------------------------------------------------

async def test_public_ports_replace_the_exempt_default(proxy, backend):
    p = proxy({"locked": box(backend.port, traffic_access_token=TOKEN, public_ports=[8080])})
    assert (await fetch(p, "/echo", host="8080-locked.localhost")).status == 200
    assert (await fetch(p, "/echo", host="3000-locked.localhost")).status == 403
    assert (await fetch(p, "/echo", host="49983-locked.localhost")).status == 403


BLOCKED = {"message": "This endpoint is reserved for the control plane and is not reachable "
                      "through the sandbox URL", "code": 404}


def spellings_of(path: str) -> st.SearchStrategy[str]:
    """Ways to write `path` that a backend framework may normalize back to it."""
    def encode(char: str, how: int) -> str:
        if how == 1 and char.isalnum():
            return f"%{ord(char):02X}"
        if how == 2 and char.isalpha():
            return char.upper()
        return char
    # dot segments before the path are resolved by normalizing routers; dot segments after it
    # are routed to it by routers that match the raw path (both kinds, never mixed: no router
    # resolves some `..` and keeps others)
    normalized = st.tuples(st.sampled_from(["", ".", "x/..", "%2e", "a/%2e%2e", "/"]),
                           st.sampled_from(["", "/", "/sub", ";jsessionid=1", "?q=1", "/?a=b"]))
    raw = st.tuples(st.sampled_from(["", "/", "."]),
                    st.sampled_from(["/../x", "/x/../../y", "/..", "/./../z"]))
    return st.tuples(
        st.lists(st.integers(0, 2), min_size=len(path), max_size=len(path)),
        st.one_of(normalized, raw),
        st.sampled_from(["/", "//", "/./"]),
    ).map(lambda t: t[2] + (t[1][0] + "/" if t[1][0] else "")
          + "".join(encode(c, h) for c, h in zip(path.lstrip("/"), t[0])) + t[1][1])


@pytest.fixture(scope="module")
def blocked_proxy(tmp_path_factory, backend):
    from support.process import launch_proxy
    p = launch_proxy(tmp_path_factory.mktemp("blocked"), {
        "daemon": {"host": "127.0.0.1", "ports": {49983: backend.port},
                   "blocked_paths": {"49983": ["/init", "/upgrade"]}}})
    yield p
    p.stop()


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(spellings_of("/init"), spellings_of("/upgrade")))
def test_blocked_paths_are_404_under_every_spelling(blocked_proxy, backend, spelling):
    before = backend.state["requests"]

    async def ask():
        conn = await RawConn.open(blocked_proxy.port)
        try:
            return await conn.request("GET", spelling, "49983-daemon.localhost")
        finally:
            await conn.aclose()
    r = asyncio.run(ask())
    assert r.status == 404, (spelling, r.status)
    body = r.json()
    assert {k: body[k] for k in ("message", "code")} == BLOCKED
    assert body["path"] == spelling.partition("?")[0]
    assert backend.state["requests"] == before  # nothing reached the sandbox


async def test_unblocked_paths_and_other_ports_pass(proxy, backend):
    p = proxy({"daemon": box(backend.port, blocked_paths={"49983": ["/init"]})})
    for host, path in (("49983-daemon.localhost", "/initial"),
                       ("49983-daemon.localhost", "/files/init"),
                       ("3000-daemon.localhost", "/init")):
        assert (await fetch(p, path, host=host)).status == 200, (host, path)


def test_share_cli_with_an_unreachable_registry_is_a_clean_error(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text(f'[registry]\nkind = "redis"\nurl = "redis://127.0.0.1:{free_port()}/0"\n'
                      f'timeout = 0.5\n[access]\nshare_key = "{SHARE_KEY}"\n')
    r = run_cli(["share", "--config", str(config), "--sandbox", "locked", "--port", "3000",
                 "--ttl", "60"])
    assert r.returncode == 1, r.stderr
    assert "registry unavailable" in r.stderr and "Traceback" not in r.stderr


def test_share_key_from_the_environment(tmp_path):
    import os
    import subprocess
    import sys
    config = tmp_path / "proxy.toml"
    config.write_text("")
    env = dict(os.environ, SANDBOX_PROXY_SHARE_KEY="short")
    r = subprocess.run([sys.executable, "-m", "proxy", "--config", str(config), "--check"],
                       capture_output=True, text=True, env=env, timeout=20)
    assert r.returncode == 2 and "SANDBOX_PROXY_SHARE_KEY" in r.stderr, r.stderr


async def test_admin_share_rejects_a_domain_that_is_not_a_string(proxy, backend):
    admin_port = free_port()
    proxy({"locked": shared_box(backend.port)},
          config={"access": {"share_key": SHARE_KEY},
                  "admin": {"listen": f"127.0.0.1:{admin_port}",
                            "token": "admin-token-0123456789abcdef"}})
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{admin_port}/sandboxes/locked/shares",
                                json={"port": 3000, "ttl": 60, "domain": ["x"]},
                                headers={"Authorization": "Bearer admin-token-0123456789abcdef"},
                                ) as r:
            assert r.status == 400 and (await r.json())["field"] == "domain"
