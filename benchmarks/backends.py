"""The backends every proxy forwards to, all on the load core.

  HTTP: an nginx (1 worker, keep-alive) answering
        /       200 "Hello, World!" (13 bytes)       - the small-request scenario
        /host   200 with the Host header it received  - checks each peer's Host rewrite
        /10mb   a 10 MiB static file                  - downloads
  Python (benchmarks.wsbackend) on its own port:
        /echo, /sink  WebSocket echo and sink       - the WebSocket scenarios
        /upload       200 "ok" after reading a POST - uploads (nginx answers before reading)
  gRPC (benchmarks/grpcbackend.js, Node's http2 module), cleartext HTTP/2, only when the gRPC
        scenario runs: bench.Bench/Unary, /Stream, /Authority - the gRPC scenarios
"""

from __future__ import annotations

import resource
import shutil
import sys
from dataclasses import dataclass

from benchmarks.loadgen_http import BIG_BODY
from benchmarks.procs import (BENCH_DIR, LOAD_CPU, REPO_DIR, WORK_DIR, Proc, port_free, spawn,
                              stop, wait_http, wait_port)

HTTP_PORT = 23000
WS_PORT = 23001
GRPC_PORT = 23002
GRPC_BACKEND = BENCH_DIR / "grpcbackend.js"
HELLO = b"Hello, World!"


def nginx_bin() -> str | None:
    return shutil.which("nginx") or (shutil.which("/usr/sbin/nginx"))


def nginx_common(prefix_dir, pid_name: str) -> str:
    """Top of an nginx.conf shared by the backend and the nginx peer: 1 worker, no daemon,
    every path inside the work dir, enough descriptors for 10k idle connections."""
    user = "user root root;\n" if _is_root() else ""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return f"""{user}worker_processes 1;
daemon off;
pid {prefix_dir}/{pid_name}.pid;
error_log stderr warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {nofile - 100}; multi_accept on; }}
"""


def nginx_http_common(prefix_dir) -> str:
    return f"""    access_log off;
    client_body_temp_path {prefix_dir}/body;
    proxy_temp_path {prefix_dir}/proxy;
    fastcgi_temp_path {prefix_dir}/fastcgi;
    uwsgi_temp_path {prefix_dir}/uwsgi;
    scgi_temp_path {prefix_dir}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 3600s;
    tcp_nodelay on;
"""


def _is_root() -> bool:
    import os
    return os.geteuid() == 0


def write_backend_conf() -> str:
    d = WORK_DIR / "backend"
    (d / "www").mkdir(parents=True, exist_ok=True)
    big = d / "www" / "10mb"
    if not big.exists() or big.stat().st_size != BIG_BODY:
        big.write_bytes(b"\xa5" * BIG_BODY)
    conf = d / "nginx.conf"
    conf.write_text(nginx_common(d, "nginx") + f"""http {{
{nginx_http_common(d)}    sendfile on;
    server {{
        listen 127.0.0.1:{HTTP_PORT} default_server backlog=4096;
        client_max_body_size 0;
        location = / {{ default_type text/plain; return 200 "Hello, World!"; }}
        location = /host {{ default_type text/plain; return 200 "$http_host"; }}
        location = /10mb {{ root {d}/www; default_type application/octet-stream; }}
    }}
}}
""")
    return str(conf)


@dataclass
class Backends:
    http: Proc
    ws: Proc
    grpc: Proc | None = None  # started by start_grpc_backend, for the gRPC scenario only

    def alive(self) -> bool:
        return all(p.alive() for p in (self.http, self.ws, self.grpc) if p is not None)

    def stop(self) -> None:
        for p in (self.grpc, self.ws, self.http):
            if p is not None:
                stop(p)


def start_backends() -> Backends:
    exe = nginx_bin()
    if exe is None:
        raise RuntimeError("nginx is needed for the HTTP backend and is not installed")
    for port in (HTTP_PORT, WS_PORT):
        if not port_free(port):
            raise RuntimeError(f"backend port {port} is already in use")
    conf = write_backend_conf()
    http = spawn("backend-nginx",
                 [exe, "-e", "stderr", "-c", conf, "-p", str(WORK_DIR / "backend")], LOAD_CPU)
    ws = spawn("backend-ws", [sys.executable, "-m", "benchmarks.wsbackend", "--port", str(WS_PORT)],
               LOAD_CPU, cwd=REPO_DIR)
    if wait_http(HTTP_PORT, f"localhost:{HTTP_PORT}", http, 10) is None:
        raise RuntimeError("backend nginx did not start:\n" + http.log_tail())
    if not wait_port(WS_PORT, ws, 10):
        raise RuntimeError("backend WebSocket server did not start:\n" + ws.log_tail())
    return Backends(http, ws)


def start_grpc_backend() -> Proc:
    """The gRPC backend (grpcbackend.js) on the load core; RuntimeError if it cannot run."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed (Debian package nodejs)")
    if not port_free(GRPC_PORT):
        raise RuntimeError(f"gRPC backend port {GRPC_PORT} is already in use")
    proc = spawn("backend-grpc", [node, str(GRPC_BACKEND), str(GRPC_PORT)], LOAD_CPU)
    if not wait_port(GRPC_PORT, proc, 10):
        stop(proc)
        raise RuntimeError("gRPC backend did not start:\n" + proc.log_tail())
    return proc
