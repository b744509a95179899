"""HTTP load generation: running wrk on the load core and parsing what it prints.

One call is one bounded wrk run (`-t1`, fixed connections and duration, a hard time-out) against
one loopback address with a given Host header. The result keeps req/s, latency percentiles,
socket errors and non-2xx counts so that a proxy answering errors fast cannot pass as fast.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.procs import LOAD_CPU, WORK_DIR, taskset_prefix

BIG_BODY = 10 * 1024 * 1024  # the "10 MB" of the transfer scenario


@dataclass
class WrkResult:
    ok: bool
    rps: float = 0.0
    requests: int = 0
    seconds: float = 0.0
    latency_ms: dict = field(default_factory=dict)   # "50" / "75" / "90" / "99" -> ms
    socket_errors: dict = field(default_factory=dict)
    non_2xx: int = 0
    error: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def as_dict(self) -> dict:
        return asdict(self)


def wrk_path() -> str | None:
    return shutil.which("wrk")


def upload_script() -> Path:
    """A wrk Lua script that POSTs a 10 MB body on every request."""
    path = WORK_DIR / "upload.lua"
    if not path.exists():
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(
            'wrk.method = "POST"\n'
            f'wrk.body = string.rep("x", {BIG_BODY})\n'
            'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return path


def run_wrk(port: int, host_header: str, path: str = "/", duration: float = 5.0,
            connections: int = 50, script: Path | None = None, timeout_s: float = 5.0) -> WrkResult:
    exe = wrk_path()
    if exe is None:
        return WrkResult(False, error="wrk not installed")
    secs = max(1, round(duration))
    argv = [exe, "-t1", f"-c{connections}", f"-d{secs}s", f"--timeout={round(timeout_s)}s",
            "--latency", "-H", f"Host: {host_header}"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}{path}")
    return run_load(argv, secs, parse_wrk, lambda error: WrkResult(False, error=error))


def run_load(argv: list[str], secs: int, parse, failed):
    """Run a load generator on the load core for its `secs` (killed 30 s past them); its
    stdout goes to parse(), a time-out to failed(error). A non-zero exit that the parser did
    not explain fails the result with the end of what the tool printed."""
    try:
        cp = subprocess.run([*taskset_prefix(LOAD_CPU), *argv], capture_output=True, text=True,
                            timeout=secs + 30)
    except subprocess.TimeoutExpired:
        return failed(f"{Path(argv[0]).name} did not finish in time")
    res = parse(cp.stdout)
    if cp.returncode != 0 and not res.error:
        res.ok = False
        res.error = (cp.stderr or cp.stdout).strip()[-300:]
    return res


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(out: str) -> WrkResult:
    res = WrkResult(True)
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not m:
        return WrkResult(False, error=out.strip()[-300:] or "no output from wrk")
    res.rps = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if m:
        res.requests = int(m.group(1))
        res.seconds = _ms(m.group(2) + m.group(3)) / 1000.0
    for pct, val in re.findall(r"^\s*(50|75|90|99)%\s+(\S+)\s*$", out, re.M):
        res.latency_ms[pct] = _ms(val)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res.socket_errors = {k: int(v) for k, v in
                             zip(("connect", "read", "write", "timeout"), m.groups())}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res.non_2xx = int(m.group(1))
    if res.requests == 0:
        res.ok = False
        res.error = "no request completed"
    return res
