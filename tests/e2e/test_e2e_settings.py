"""Where settings come from, through the real command line: --log-level over [log] level (at
start and on SIGHUP), the diagnostic log as JSON lines, SANDBOX_PROXY_CONFIG, and the
SANDBOX_PROXY_* environment variables over the file (and the command line over them)."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import pytest

from proxy.config import ENVIRONMENT_KEYS
from support.fleet import redis_server  # noqa: F401 - a fixture
from support.process import (default_config, free_port, port_is_open, registry_toml, run_cli,
                             to_toml, wait_until)
from support.raw_http import fetch

pytestmark = pytest.mark.timeout(60)

STARTED = "sandbox-proxy http on"  # the info line every start logs
RELOADED = "config reloaded from"  # the info line every SIGHUP logs
ADMIN_TOKEN = "admin-token-0123456789abcdef"


async def logged(p, text: str, timeout: float = 5.0) -> None:
    async def seen() -> bool:
        return text in p.stderr()
    await wait_until(seen, timeout)


# -- --log-level and [log] ------------------------------------------------------------------


async def test_log_level_flag_wins_over_the_file_at_start_and_on_sighup(proxy):
    quiet = {"log": {"level": "error"}}
    p = proxy(config=quiet)
    assert STARTED not in p.stderr()  # the file alone: errors only

    p = proxy(config=quiet, args=["--log-level", "info"])
    await logged(p, STARTED)
    p.proc.send_signal(signal.SIGHUP)  # the file still says error: the command line still wins
    await logged(p, RELOADED)

    p = proxy(config={"log": {"level": "info"}}, args=["--log-level", "WARNING"])
    p.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert (await fetch(p, "/echo")).status == 200
    assert STARTED not in p.stderr() and RELOADED not in p.stderr()


def test_bad_log_level_flag_is_refused(tmp_path):
    res = run_cli(["--log-level", "loud"], timeout=15, cwd=tmp_path)
    assert res.returncode == 2 and "--log-level" in res.stderr


async def test_diagnostic_log_as_json_lines(proxy):
    p = proxy(config={"log": {"format": "json"}})
    await logged(p, STARTED)
    good = p.config_path.read_text()
    p.config_path.write_text(good + '\n[timeouts]\nconnect = "soon"\n')
    p.proc.send_signal(signal.SIGHUP)
    await logged(p, "config reload failed")
    p.config_path.write_text(good.replace('format = "json"', 'format = "text"'))
    p.proc.send_signal(signal.SIGHUP)  # the format follows the file on SIGHUP, both ways
    await logged(p, RELOADED)
    lines = p.stderr().splitlines()
    entries = [json.loads(line) for line in lines[:-1]]
    assert not lines[-1].startswith("{") and RELOADED in lines[-1]
    for entry in entries:
        assert set(entry) >= {"time", "level", "logger", "message", "pid"}
        assert entry["time"].endswith("Z") and entry["pid"] == p.pid
    started = next(e for e in entries if STARTED in e["message"])
    assert started["level"] == "info" and started["logger"] == "sandbox_proxy"
    failed = next(e for e in entries if "config reload failed" in e["message"])
    assert failed["level"] == "error" and "[timeouts] connect" in failed["message"]


async def test_json_log_of_every_worker_and_the_supervisor(proxy):
    p = proxy(config={"server": {"workers": 2}, "log": {"format": "json"}})
    await wait_until(lambda: _async(p.stderr().count(STARTED) == 2), 10)
    entries = [json.loads(line) for line in p.stderr().splitlines()]
    assert len({e["pid"] for e in entries if STARTED in e["message"]}) == 2
    assert p.stop() == 0
    assert all(json.loads(line) for line in p.stderr().splitlines())


async def _async(value: bool) -> bool:
    return value


# -- SANDBOX_PROXY_CONFIG -------------------------------------------------------------------


async def test_config_path_from_the_environment(proxy):
    p = proxy(config_flag=False, env={"SANDBOX_PROXY_CONFIG": "conf/proxy.toml"})
    assert (await fetch(p, "/echo")).status == 200  # a relative path, from the working directory


def test_config_flag_wins_over_the_environment(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[registry]\npath = "sandboxes.toml"\n')
    (tmp_path / "sandboxes.toml").write_text(registry_toml({"one": {"host": "10.0.0.1"}}))
    res = run_cli(["--config", str(good), "--check"], cwd=tmp_path,
                  env={"SANDBOX_PROXY_CONFIG": str(tmp_path / "missing.toml")})
    assert res.returncode == 0 and "ok: 1 sandboxes" in res.stdout, res.stderr
    res = run_cli(["--check"], cwd=tmp_path,
                  env={"SANDBOX_PROXY_CONFIG": str(tmp_path / "missing.toml")})
    assert res.returncode == 2 and "missing.toml: file not found" in res.stderr


# -- SANDBOX_PROXY_* over the file ----------------------------------------------------------


async def test_environment_overrides_the_file(proxy, backend):
    """Listeners, domains and the admin API set by the environment over a file saying
    otherwise; the command line's --listen over the environment's."""
    edge, metrics, admin = free_port(), free_port(), free_port()
    env = {"SANDBOX_PROXY_LISTEN": f"127.0.0.1:{edge}",
           "SANDBOX_PROXY_METRICS_LISTEN": f"127.0.0.1:{metrics}",
           "SANDBOX_PROXY_DOMAINS": "example.app, other.test",
           "SANDBOX_PROXY_ADMIN_LISTEN": f"127.0.0.1:{admin}",
           "SANDBOX_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
           "SANDBOX_PROXY_LOG_FORMAT": "json",
           "SANDBOX_PROXY_ACCESS_LOG": "off",
           "SANDBOX_PROXY_ALLOWED_NETWORKS": "127.0.0.0/8 ::1/128"}
    p = proxy(env=env)
    file_ports = [int(line.split(":")[-1].rstrip('"')) for line in
                  p.config_path.read_text().splitlines() if line.startswith("listen")]
    assert len(file_ports) == 2 and not any(port_is_open("127.0.0.1", n) for n in file_ports)
    assert (p.port, p.metrics_port) == (edge, metrics)
    assert (await fetch(p, "/echo", host="3000-demo.example.app")).status == 200
    assert (await fetch(p, "/echo", host="3000-demo.other.test")).status == 200
    assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 400  # the file's
    await wait_until(lambda: _async(port_is_open("127.0.0.1", admin)), 5)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{admin}/sandboxes",
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 200 and "demo" in {s["id"] for s in (await r.json())["sandboxes"]}
    assert all(json.loads(line) for line in p.stderr().splitlines())
    await asyncio.sleep(0.2)
    assert p.stdout() == ""  # SANDBOX_PROXY_ACCESS_LOG=off

    assert p.stop() == 0

    flag = free_port()
    p = proxy(env=env | {"SANDBOX_PROXY_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
                         "SANDBOX_PROXY_ADMIN_LISTEN": ""},  # empty: the file's (off)
              args=["--listen", f"127.0.0.1:{flag}"])
    assert p.port == flag and not port_is_open("127.0.0.1", edge)
    assert (await fetch(p, "/echo", host="3000-demo.example.app")).status == 200


async def test_registry_from_the_environment(proxy, backend, redis_server):
    redis_server.put("fromredis", {"host": "127.0.0.1", "ports": {"3000": backend.port}})
    p = proxy(env={"SANDBOX_PROXY_REGISTRY_KIND": "redis",
                   "SANDBOX_PROXY_REGISTRY_URL": redis_server.url})
    assert (await fetch(p, "/echo", host="3000-fromredis.localhost")).status == 200
    assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 502  # file's registry


@pytest.mark.parametrize("variable, value, key, problem", [
    ("SANDBOX_PROXY_LISTEN", "nowhere", "[server] listen", "expected host:port"),
    ("SANDBOX_PROXY_WORKERS", "many", "[server] workers", "expected an integer"),
    ("SANDBOX_PROXY_WORKERS", "-2", "[server] workers", "must be >= 0"),
    ("SANDBOX_PROXY_DOMAINS", " , ", "[server] domains", "at least one domain"),
    ("SANDBOX_PROXY_TRUSTED_PROXIES", "10.0.0.0/99", "[server] trusted_proxies", "CIDR"),
    ("SANDBOX_PROXY_METRICS_LISTEN", "9091", "[metrics] listen", "expected host:port"),
    ("SANDBOX_PROXY_REGISTRY_KIND", "etcd", "[registry] kind", "unknown kind"),
    ("SANDBOX_PROXY_REGISTRY_URL", "http://redis", "[registry] url", "expected a URL"),
    ("SANDBOX_PROXY_REGISTRY_NAMESERVERS", "dns.example", "[registry] nameservers", "IP"),
    ("SANDBOX_PROXY_ALLOWED_NETWORKS", "everything", "[upstream] allowed_networks", "CIDR"),
    ("SANDBOX_PROXY_LOG_LEVEL", "loud", "[log] level", "must be debug"),
    ("SANDBOX_PROXY_LOG_FORMAT", "xml", "[log] format", "must be text or json"),
])
def test_bad_environment_value_exits_2_naming_the_variable_and_key(tmp_path, variable, value,
                                                                    key, problem):
    config = tmp_path / "proxy.toml"
    config.write_text(to_toml(default_config(free_port(), free_port())))
    (tmp_path / "sandboxes.toml").write_text(registry_toml({}))
    res = run_cli(["--config", str(config)], timeout=15, cwd=tmp_path, env={variable: value})
    assert res.returncode == 2, res.stderr
    assert f"{variable}: {key}: " in res.stderr and problem in res.stderr, res.stderr


def test_every_environment_variable_is_documented():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent.parent
    shipped = (root / "config" / "proxy.toml").read_text()
    for variable, (section, key, _) in ENVIRONMENT_KEYS.items():
        assert f"{variable} " in shipped and f"[{section}] {key}" in shipped, variable
    assert "SANDBOX_PROXY_ADMIN_TOKEN" in shipped and "SANDBOX_PROXY_CONFIG" in shipped
    deployment = (root / "docs" / "deployment.md").read_text()
    for variable in [*ENVIRONMENT_KEYS, "SANDBOX_PROXY_CONFIG", "SANDBOX_PROXY_ADMIN_TOKEN"]:
        assert f"`{variable}`" in deployment, variable
