"""Real servers for the registry tests: redis-server, dnsmasq and a small control plane.

Each runs on a free loopback port and is stopped by its fixture. Import the fixtures into a test
module with ``from support.fleet import redis_server, dns_server, control_plane  # noqa: F401``.

- ``RedisServer``: ``redis-server`` without persistence; ``kill()`` and ``start()`` again on the
  same port simulate an outage; ``client()`` is a synchronous redis-py client.
- ``DnsServer``: ``dnsmasq`` authoritative for ``sandboxes.internal`` (so negative answers carry
  a SOA), records from a hosts file re-read on SIGHUP, TXT records given at start (``restart()``
  to change them), TTL ``ttl`` seconds for answers and for negative answers. With
  ``authoritative=False`` it is a plain (non-authoritative) server instead, where ``addresses``
  are answered by ``--address=/name/ip``, as many setups publish names: such a name has its A
  record, while other types of it (TXT) may be answered NXDOMAIN.
- ``ControlPlane``: ``POST /resume`` records each call and runs ``on_resume(body)`` after
  ``delay`` seconds in a thread; answers ``status``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

ZONE = "sandboxes.internal"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_both() -> int:
    """A port free for both TCP and UDP (DNS listens on both)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free TCP+UDP port")


def binary(name: str, *candidates: str) -> str:
    found = shutil.which(name) or next((c for c in candidates if os.path.exists(c)), None)
    if found is None:
        raise RuntimeError(f"{name} is not installed (apt-get install -y redis-server "
                           f"dnsmasq-base; .ci/run installs them)")
    return found


def wait_port(port: int, timeout: float = 10.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server for port {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class RedisServer:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.extra_args: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary("redis-server", "/usr/bin/redis-server"), "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "no", *self.extra_args],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        try:
            wait_port(self.port, process=self.proc)
        except RuntimeError as exc:
            self.kill()
            log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{exc}\n--- redis.log ---\n{log}") from None
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True,
                           socket_timeout=5)

    def put(self, sandbox_id: str, record: dict, prefix: str = "sandbox:") -> None:
        with self.client() as c:
            c.set(prefix + sandbox_id, json.dumps(record))

    def delete(self, sandbox_id: str, prefix: str = "sandbox:") -> None:
        with self.client() as c:
            c.delete(prefix + sandbox_id)


class SentinelServer:
    """A Redis Sentinel (``redis-server --sentinel``) watching ``master`` as ``service``."""

    def __init__(self, workdir: Path, master: RedisServer, service: str = "sandboxes"):
        self.workdir = workdir
        self.master = master
        self.service = service
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def start(self) -> "SentinelServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "sentinel.conf"  # sentinel rewrites its file: one of its own
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                        f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n")
        self.proc = subprocess.Popen(
            [binary("redis-server", "/usr/bin/redis-server"), str(conf), "--sentinel"],
            stdout=open(self.workdir / "sentinel.log", "ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        wait_port(self.port, process=self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


class RedisClusterServer:
    """Three redis-server primaries joined into a Redis Cluster (``redis-cli --cluster``)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.nodes = [RedisServer(workdir / f"node{i}") for i in range(3)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> "RedisClusterServer":
        for node in self.nodes:
            # the bus port defaults to port + 10000, which a high free port overflows
            node.extra_args = ["--cluster-enabled", "yes", "--cluster-config-file",
                               str(node.workdir / "nodes.conf"),
                               "--cluster-port", str(free_port())]
            node.start()
        subprocess.run([binary("redis-cli", "/usr/bin/redis-cli"), "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with self.nodes[0].client() as c:
                if c.cluster("info").get("cluster_state") == "ok":
                    return self
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become ready")

    def client(self):
        import redis.cluster
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.nodes[0].port,
                                          decode_responses=True, socket_timeout=5)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


class DnsServer:
    def __init__(self, workdir: Path, ttl: int = 1, authoritative: bool = True):
        self.workdir = workdir
        self.authoritative = authoritative
        self.port = free_port_both()
        self.ttl = ttl
        self.hosts_file = workdir / "hosts"
        self.txt: dict[str, list[str]] = {}
        self.addresses: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, hosts: dict[str, str] | None = None,
              txt: dict[str, list[str]] | None = None,
              addresses: dict[str, str] | None = None) -> "DnsServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if hosts is not None or not self.hosts_file.exists():
            self.write_hosts(hosts or {}, reload=False)
        if txt is not None:
            self.txt = txt
        if addresses is not None:
            self.addresses = addresses
        args = [binary("dnsmasq", "/usr/sbin/dnsmasq"), "--keep-in-foreground",
                "--conf-file=/dev/null", f"--port={self.port}", "--listen-address=127.0.0.1",
                "--bind-interfaces", "--no-resolv", "--no-hosts", "--no-poll",
                f"--addn-hosts={self.hosts_file}", f"--pid-file={self.workdir / 'pid'}",
                f"--local-ttl={self.ttl}", "--log-facility=-"]
        if self.authoritative:
            args += [f"--auth-zone={ZONE}", f"--auth-server=ns.{ZONE},127.0.0.1",
                     f"--auth-ttl={self.ttl}", f"--auth-soa=1,hostmaster.{ZONE},60,60,600"]
        else:
            args.append(f"--local=/{ZONE}/")  # answered here only (NXDOMAIN), never forwarded
        if os.getuid() == 0:
            args.append("--user=root")
        for sandbox_id, strings in self.txt.items():
            # dnsmasq splits the strings at commas (and keeps quotes literally)
            assert not any("," in s for s in strings), "TXT strings cannot contain commas here"
            args.append(f"--txt-record={sandbox_id}.{ZONE},{','.join(strings)}")
        for sandbox_id, address in self.addresses.items():
            args.append(f"--address=/{sandbox_id}.{ZONE}/{address}")
        self.proc = subprocess.Popen(args, stdout=open(self.workdir / "dnsmasq.log", "ab"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_port(self.port, process=self.proc)
        return self

    def write_hosts(self, hosts: dict[str, str], reload: bool = True) -> None:
        """``{sandbox_id: ip}``; with ``reload`` dnsmasq re-reads the file (SIGHUP)."""
        lines = [f"{ip} {sandbox_id}.{ZONE}\n" for sandbox_id, ip in hosts.items()]
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(self.hosts_file)
        if reload and self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self, txt: dict[str, list[str]] | None = None) -> None:
        self.kill()
        self.start(txt=txt)


class ControlPlane:
    """POST /resume -> records the JSON body, answers ``status``, runs ``on_resume`` later."""

    def __init__(self):
        self.calls: list[dict] = []
        self.status = 200
        self.delay = 0.3
        self.on_resume: Callable[[dict], None] | None = None
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                plane.calls.append({"path": self.path, "body": body})
                if plane.on_resume is not None and 200 <= plane.status < 300:
                    threading.Timer(plane.delay, plane.on_resume, (body,)).start()
                payload = b'{"ok":true}'
                self.send_response(plane.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/resume"

    def start(self) -> "ControlPlane":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture
def sentinel_server(tmp_path, redis_server):
    server = SentinelServer(tmp_path / "sentinel", redis_server).start()
    yield server
    server.kill()


@pytest.fixture
def redis_cluster(tmp_path):
    cluster = RedisClusterServer(tmp_path / "cluster")
    try:
        yield cluster.start()
    finally:
        cluster.kill()


@pytest.fixture
def dns_server(tmp_path):
    server = DnsServer(tmp_path / "dns")
    yield server
    server.kill()


@pytest.fixture
def control_plane():
    plane = ControlPlane().start()
    yield plane
    plane.stop()


# --------------------------------------------------------------------------
# The core end-to-end scenarios, run against every registry kind
# --------------------------------------------------------------------------

CORE_TOKEN = "s3cret-token-for-tests"


def core_records(backend_port: int, refused_port: int) -> dict[str, dict]:
    """The records `check_core_scenarios` expects, in the JSON shape of every kind."""
    import hashlib
    ports = {"3000": backend_port}
    return {
        "demo": {"host": "127.0.0.1", "ports": ports},
        "masked": {"host": "127.0.0.1", "ports": ports, "mask_request_host": "localhost:${PORT}"},
        "originkept": {"host": "127.0.0.1", "ports": ports,
                       "mask_request_host": "localhost:${PORT}", "mask_origin": False},
        "refused": {"host": "127.0.0.1", "ports": {"3000": refused_port}},
        "secured": {"host": "127.0.0.1", "ports": ports,
                    "traffic_access_token_sha256": hashlib.sha256(CORE_TOKEN.encode()).hexdigest()},
        # issues 13 and 15: ingress rules, lifecycle state, public ports, blocked paths, epochs
        "fenced": {"host": "127.0.0.1", "ports": ports, "allowed_clients": ["10.0.0.0/8"]},
        "sleepy": {"host": "127.0.0.1", "ports": ports, "state": "paused"},
        "daemon": {"host": "127.0.0.1", "ports": ports, "public_ports": [3000],
                   "traffic_access_token_sha256": hashlib.sha256(CORE_TOKEN.encode()).hexdigest(),
                   "blocked_paths": {"3000": ["/init"]}, "share_epoch": 2},
    }


async def check_core_scenarios(p) -> None:
    """HTTP, bodies, Host mask, token, WebSocket, SSE and the error answers through proxy ``p``."""
    import asyncio
    import hashlib

    import aiohttp
    from websockets.asyncio.client import connect

    from support.raw_http import fetch, header_value, not_found_body, port_closed_body

    r = await fetch(p, "/echo?x=1", host="3000-demo.localhost")
    assert r.status == 200, r.body
    assert r.json()["raw_path"] == "/echo?x=1"
    assert header_value(r.json(), "Host") == "3000-demo.localhost"

    body = bytes(range(256)) * 4096  # 1 MiB
    r = await fetch(p, "/upload", host="3000-demo.localhost", method="POST", data=body)
    assert r.status == 200 and r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()

    r = await fetch(p, "/echo", host="3000-masked.localhost")
    assert header_value(r.json(), "Host") == "localhost:3000"
    # Origin follows the mask (proxy/origin.py), unless the record says mask_origin = false
    same_origin = {"Origin": "http://3000-masked.localhost",
                   "Referer": "http://3000-masked.localhost/p?q"}
    r = await fetch(p, "/echo", host="3000-masked.localhost", headers=same_origin)
    assert header_value(r.json(), "Origin") == "http://localhost:3000"
    assert header_value(r.json(), "Referer") == "http://localhost:3000/p?q"
    kept = {"Origin": "http://3000-originkept.localhost"}
    r = await fetch(p, "/echo", host="3000-originkept.localhost", headers=kept)
    assert header_value(r.json(), "Host") == "localhost:3000"
    assert header_value(r.json(), "Origin") == "http://3000-originkept.localhost"

    r = await fetch(p, "/echo", host="3000-nosuchbox.localhost")
    assert r.status == 502 and r.json() == not_found_body("nosuchbox")
    r = await fetch(p, "/echo", host="3000-refused.localhost")
    assert r.status == 502 and r.json() == port_closed_body("refused", 3000)

    r = await fetch(p, "/echo", host="3000-secured.localhost")
    assert r.status == 403, r.body
    r = await fetch(p, "/echo", host="3000-secured.localhost",
                    headers={"e2b-traffic-access-token": CORE_TOKEN})
    assert r.status == 200

    r = await fetch(p, "/echo", host="3000-fenced.localhost")
    assert r.status == 403 and r.json()["clientIp"] == "127.0.0.1", r.body
    r = await fetch(p, "/echo", host="3000-sleepy.localhost")
    assert r.status == 409 and r.json()["message"] == "The sandbox is paused", r.body
    r = await fetch(p, "/echo", host="3000-daemon.localhost")  # a public port: no token
    assert r.status == 200, r.body
    r = await fetch(p, "/init/x", host="3000-daemon.localhost")
    assert r.status == 404 and r.json()["path"] == "/init/x", r.body

    async with connect(f"ws://3000-demo.localhost:{p.port}/ws", host="127.0.0.1", port=p.port,
                       proxy=None, open_timeout=10, close_timeout=3) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello"

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        async with s.get(p.url("/sse?n=3&interval=0.05"),
                         headers={"Host": "3000-demo.localhost"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            text = (await resp.read()).decode()
    assert text.count("event: tick") == 3


def ws_connect(p, sandbox_id: str):
    from websockets.asyncio.client import connect
    return connect(f"ws://3000-{sandbox_id}.localhost:{p.port}/ws", host="127.0.0.1",
                   port=p.port, proxy=None, open_timeout=10, close_timeout=3,
                   ping_interval=None)


async def closed_within(ws, seconds: float) -> float:
    """Wait until the proxy closes ``ws`` (the backend never sends unprompted); the time taken."""
    import asyncio

    from websockets.exceptions import ConnectionClosed
    start = time.monotonic()
    try:
        await asyncio.wait_for(ws.recv(), seconds)
    except ConnectionClosed:
        return time.monotonic() - start
    raise AssertionError("the WebSocket received a message instead of being closed")
