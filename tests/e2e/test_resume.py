"""Auto-resume: a paused sandbox with auto_resume is woken through the control plane's webhook
(one call shared by concurrent requests) and served once its record says running."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from proxy.config import ConfigError, load_config
from support.fleet import ControlPlane, control_plane, redis_server  # noqa: F401 - fixtures
from support.process import free_port
from support.raw_http import fetch, not_found_body

pytestmark = pytest.mark.timeout(60)


def resume_config(plane: ControlPlane | str, timeout: float = 5.0, **registry) -> dict:
    url = plane if isinstance(plane, str) else plane.url
    return {"registry": {"resume_url": url, "resume_timeout": timeout, **registry}}


def sleepy(backend_port: int, state: str = "paused", auto_resume: bool = True) -> dict:
    return {"host": "127.0.0.1", "ports": {3000: backend_port}, "state": state,
            "auto_resume": auto_resume}


@pytest.mark.parametrize("text, problem", [
    ('resume_url = "ftp://cp/resume"', "[registry] resume_url: expected an http:// or https://"),
    ('resume_url = "http://"', "[registry] resume_url: expected an http:// or https://"),
    ('resume_timeout = 0', "[registry] resume_timeout: must be >"),
    ('resume_timeout = "30"', "[registry] resume_timeout: expected"),
])
def test_bad_resume_keys(tmp_path, text, problem):
    config = tmp_path / "proxy.toml"
    config.write_text(f"[registry]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(config) in str(info.value) and problem in str(info.value)


async def test_concurrent_requests_share_one_resume_and_are_served(proxy, backend,
                                                                   control_plane):
    p = proxy(sandboxes={"sleepy": sleepy(backend.port)}, config=resume_config(control_plane))
    control_plane.on_resume = lambda body: p.write_registry(
        {"sleepy": sleepy(backend.port, state="running")})
    start = time.monotonic()
    answers = await asyncio.gather(*(fetch(p, "/echo", host="3000-sleepy.localhost")
                                     for _ in range(8)))
    assert [a.status for a in answers] == [200] * 8, [a.body for a in answers]
    assert time.monotonic() - start < 5
    assert len(control_plane.calls) == 1
    call = control_plane.calls[0]
    assert call["path"] == "/resume" and call["body"]["sandboxId"] == "sleepy"
    assert call["body"]["port"] == 3000
    # running now: later requests go straight through
    assert (await fetch(p, "/echo", host="3000-sleepy.localhost")).status == 200
    assert len(control_plane.calls) == 1


async def test_resume_that_does_not_finish_in_time_is_503(proxy, backend, control_plane):
    p = proxy(sandboxes={"sleepy": sleepy(backend.port)},
              config=resume_config(control_plane, timeout=1.0))
    start = time.monotonic()
    r = await fetch(p, "/echo", host="3000-sleepy.localhost")
    elapsed = time.monotonic() - start
    assert r.status == 503
    assert r.json() == {"sandboxId": "sleepy", "code": 503,
                        "message": "The sandbox could not be resumed in time"}
    assert 0.9 < elapsed < 3
    assert len(control_plane.calls) == 1


async def test_control_plane_that_does_not_know_the_sandbox_is_not_found(proxy, backend,
                                                                        control_plane):
    control_plane.status = 404
    p = proxy(sandboxes={"sleepy": sleepy(backend.port)}, config=resume_config(control_plane))
    r = await fetch(p, "/echo", host="3000-sleepy.localhost")
    assert r.status == 502 and r.json() == not_found_body("sleepy")


async def test_control_plane_failing_or_unreachable_is_503(proxy, backend, control_plane):
    control_plane.status = 500
    p = proxy(sandboxes={"sleepy": sleepy(backend.port)}, config=resume_config(control_plane))
    r = await fetch(p, "/echo", host="3000-sleepy.localhost")
    assert r.status == 503
    q = proxy(sandboxes={"sleepy": sleepy(backend.port)},
              config=resume_config(f"http://127.0.0.1:{free_port()}/resume"))
    start = time.monotonic()
    r = await fetch(q, "/echo", host="3000-sleepy.localhost")
    assert r.status == 503 and time.monotonic() - start < 3


async def test_paused_without_auto_resume_is_409_paused(proxy, backend, control_plane):
    p = proxy(sandboxes={"napping": sleepy(backend.port, auto_resume=False),
                         "awake": sleepy(backend.port, state="running")},
              config=resume_config(control_plane))
    r = await fetch(p, "/echo", host="3000-napping.localhost")
    # issue 13: the reference's answer, no longer 502 not found
    assert r.status == 409 and r.json() == {"sandboxId": "napping", "code": 409,
                                            "message": "The sandbox is paused",
                                            "canAutoResume": False}
    assert (await fetch(p, "/echo", host="3000-awake.localhost")).status == 200
    assert control_plane.calls == []


async def test_resume_with_redis(proxy, backend, control_plane, redis_server):
    record = {"host": "127.0.0.1", "ports": {"3000": backend.port}}
    redis_server.put("sleepy", {**record, "state": "paused", "auto_resume": True})
    control_plane.delay = 0.2
    control_plane.on_resume = lambda body: redis_server.put(body["sandboxId"], record)
    p = proxy(sandboxes={}, config=resume_config(control_plane, kind="redis",
                                                 url=redis_server.url, timeout=1.0))
    answers = await asyncio.gather(*(fetch(p, "/echo", host="3000-sleepy.localhost")
                                     for _ in range(4)))
    assert [a.status for a in answers] == [200] * 4
    assert len(control_plane.calls) == 1
    assert json.loads(json.dumps(control_plane.calls[0]["body"]))["sandboxId"] == "sleepy"


async def test_a_client_leaving_does_not_cancel_the_shared_resume(tmp_path, control_plane):
    from proxy.registry.resume import AutoResumeRegistry
    from proxy.registry.static import StaticRegistry
    from support.process import registry_toml

    path = tmp_path / "sandboxes.toml"
    path.write_text(registry_toml({"sleepy": sleepy(4000)}))
    registry = AutoResumeRegistry(StaticRegistry(path, 0), control_plane.url, 5.0)
    control_plane.on_resume = lambda body: path.write_text(
        registry_toml({"sleepy": sleepy(4000, state="running")}))
    await registry.start()
    try:
        assert registry.lookup("sleepy", 3000).paused  # look-ups never wake anything
        leaving = asyncio.ensure_future(registry.resume("sleepy", 3000))
        staying = registry.resume("sleepy", 3000)
        await asyncio.sleep(0.05)
        leaving.cancel()

        async def reload_until_running():
            while registry.inner.lookup("sleepy").paused:
                await asyncio.sleep(0.05)
                registry.inner.reload()

        await asyncio.wait_for(reload_until_running(), 5)
        record = await asyncio.wait_for(staying, 5)
        assert record is not None and not record.paused
        assert len(control_plane.calls) == 1
        assert control_plane.calls[0]["body"] == {"sandboxId": "sleepy", "port": 3000}
        assert registry.resumes["resumed"] == 1
    finally:
        await registry.close()
