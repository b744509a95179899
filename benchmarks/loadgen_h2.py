"""HTTP/2 load generation: running h2load on the load core and parsing what it prints.

One call is one bounded h2load run (one thread, fixed clients, concurrent streams per client and
duration, `-D`, a hard time-out) against one loopback address in cleartext HTTP/2 with prior
knowledge (h2c), with a given :authority. With a request body file (`-d`, which makes the method
POST) and gRPC headers the same run drives unary or server-streaming gRPC calls: the file holds
one length-prefixed gRPC message. h2load does not read gRPC trailers, so the result also keeps
the DATA bytes received: a gRPC error answers 200 without a message, which shows as too few
bytes per call. `h2_get` fetches one body over h2c with nghttp (the Host-rewrite check).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.loadgen_http import run_load
from benchmarks.procs import WORK_DIR

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


@dataclass
class H2loadResult:
    ok: bool
    rps: float = 0.0          # succeeded requests per second
    requests: int = 0         # done
    succeeded: int = 0
    failed: int = 0           # failed includes errored and timed out
    non_2xx: int = 0
    data_bytes: int = 0       # DATA frame payload received (response bodies)
    seconds: float = 0.0
    mean_ms: float | None = None
    error: str = ""

    @property
    def errors(self) -> int:
        return self.failed + self.non_2xx


def h2load_path() -> str | None:
    return shutil.which("h2load")


def grpc_frame(payload: bytes) -> bytes:
    """One length-prefixed gRPC message, uncompressed."""
    return b"\0" + struct.pack(">I", len(payload)) + payload


def grpc_body_file(name: str, payload: bytes) -> Path:
    """A request body file for h2load -d holding one gRPC message with this payload."""
    path = WORK_DIR / f"{name}.grpc"
    body = grpc_frame(payload)
    if not path.exists() or path.read_bytes() != body:
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return path


def run_h2load(port: int, authority: str, path: str, duration: float, clients: int,
               streams: int, body: Path | None = None,
               headers: tuple[str, ...] = ()) -> H2loadResult:
    exe = h2load_path()
    if exe is None:
        return H2loadResult(False, error="h2load not installed (Debian package nghttp2-client)")
    secs = max(1, round(duration))
    argv = [exe, "-t1", f"-c{clients}", f"-m{streams}", f"-D{secs}", "-H",
            f":authority: {authority}"]
    for h in headers:
        argv += ["-H", h]
    if body is not None:
        argv += ["-d", str(body)]
    argv.append(f"http://127.0.0.1:{port}{path}")
    return run_load(argv, secs, parse_h2load, lambda error: H2loadResult(False, error=error))


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_h2load(out: str) -> H2loadResult:
    m = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    if not m:
        return H2loadResult(False, error=out.strip()[-300:] or "no output from h2load")
    res = H2loadResult(True, seconds=float(m.group(1)))
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed",
                  out)
    if m:
        res.requests, res.succeeded, res.failed = (int(x) for x in m.groups())
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        res.non_2xx = sum(int(x) for x in m.groups()[1:])
    m = re.search(r"traffic: .*\((\d+)\) data", out)
    if m:
        res.data_bytes = int(m.group(1))
    m = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\s", out)
    if m:
        res.mean_ms = float(m.group(1)) * _UNITS[m.group(2)]
    if res.seconds:
        res.rps = res.succeeded / res.seconds
    if res.succeeded == 0:
        res.ok = False
        res.error = "no request succeeded: " + " ".join(
            ln.strip() for ln in out.splitlines() if ln.startswith(("requests:", "status codes:")))
    return res


def h2_get(port: int, authority: str, path: str, timeout: float = 5.0) -> bytes | None:
    """One GET over h2c (prior knowledge) with nghttp: the body, or None if it failed (nghttp
    exits 0 even when the server did not speak HTTP/2; it then says so on stderr)."""
    exe = shutil.which("nghttp")
    if exe is None:
        return None
    try:
        cp = subprocess.run([exe, "-H", f":authority: {authority}", f"--timeout={timeout:g}",
                             f"http://127.0.0.1:{port}{path}"], capture_output=True,
                            timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return None
    failed = cp.returncode != 0 or b"not processed" in cp.stderr
    return None if failed else cp.stdout
