"""Process plumbing: starting pinned child processes, waiting for them, measuring and stopping them.

Owns the core layout (which CPU the proxy under test gets, which the load generator and
backends get), the registry of every process the harness started (so all of them are stopped on
exit, by process group id, never by name), RSS sampling from /proc, and readiness probes.
"""

from __future__ import annotations

import atexit
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "work"
LOG_DIR = WORK_DIR / "logs"
RESULTS_DIR = BENCH_DIR / "results"

# Core layout: the proxy under test alone on one core, everything else on the other. Read
# once at import, before the harness pins itself to the load core.
_CPUS = sorted(os.sched_getaffinity(0))
PROXY_CPU = _CPUS[0]
LOAD_CPU = _CPUS[1] if len(_CPUS) > 1 else _CPUS[0]

NOFILE = 200_000  # enough for 10k idle websockets (client side, proxy both sides, backend)


def ncpus() -> int:
    return len(_CPUS)


def pin_self_to_load_cpu() -> None:
    """The harness process runs the WebSocket load generator, so it lives on the load core."""
    if ncpus() > 1:
        os.sched_setaffinity(0, {LOAD_CPU})


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise RLIMIT_NOFILE for this process (children inherit it). Returns the soft limit set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, limit)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def taskset_prefix(cpu: int) -> list[str]:
    if shutil.which("taskset") and ncpus() > 1:
        return ["taskset", "-c", str(cpu)]
    return []


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_kib(self) -> int:
        """RSS of the process and all its descendants (nginx master + worker, forked workers)."""
        return sum(_rss_kib(pid) for pid in [self.pid, *descendants(self.pid)])

    def cpu_seconds(self) -> float:
        """user + system CPU time of the process and its descendants so far."""
        return sum(_cpu_seconds(pid) for pid in [self.pid, *descendants(self.pid)])

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


_RUNNING: list[Proc] = []


def spawn(name: str, argv: list[str], cpu: int | None, env: dict | None = None,
          cwd: Path | None = None) -> Proc:
    """Start argv (pinned to cpu if given) in its own process group, output to logs/<name>.log."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    log = open(log_path, "ab")
    log.write(f"\n=== {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
    log.flush()
    full_env = dict(os.environ)
    full_env.update(env or {})
    prefix = taskset_prefix(cpu) if cpu is not None else []
    popen = subprocess.Popen(prefix + argv, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=full_env, cwd=cwd,
                             start_new_session=True)
    log.close()
    proc = Proc(name, popen, log_path)
    _RUNNING.append(proc)
    return proc


def clear_logs() -> None:
    """Start a run with empty logs; within it, restarts of a process append to its log."""
    if LOG_DIR.exists():
        for path in LOG_DIR.glob("*.log"):
            path.unlink()


def stop(proc: Proc, timeout: float = 5.0) -> None:
    """SIGTERM the process group we created for proc, then SIGKILL it if it lingers."""
    if proc in _RUNNING:
        _RUNNING.remove(proc)
    if proc.popen.poll() is not None:
        _killpg(proc.pid, signal.SIGKILL)  # stray children of a dead leader
        return
    _killpg(proc.pid, signal.SIGTERM)
    try:
        proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    _killpg(proc.pid, signal.SIGKILL)
    try:
        proc.popen.wait(2)
    except subprocess.TimeoutExpired:
        pass


def stop_all() -> None:
    for proc in list(reversed(_RUNNING)):
        stop(proc, timeout=3.0)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def install_cleanup() -> None:
    atexit.register(stop_all)

    def handler(signum, _frame):
        stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def descendants(pid: int) -> list[int]:
    """All descendant pids, from /proc/<pid>/task/*/children."""
    out: list[int] = []
    todo = [pid]
    for _ in range(10_000):  # bounded walk
        if not todo:
            break
        cur = todo.pop()
        for task in Path(f"/proc/{cur}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in kids:
                k = int(kid)
                if k not in out:
                    out.append(k)
                    todo.append(k)
    return out


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def busy_cpus(seconds: float = 1.0) -> float:
    """How many CPUs' worth of work the whole machine did over `seconds` (from /proc/stat)."""
    def sample():
        vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    total = t1 - t0
    return 0.0 if total <= 0 else ncpus() * (1 - (i1 - i0) / total)


class ForeignCpu:
    """CPU the machine spent on anything the harness did not start, over an interval, in CPUs.

    Machine time is user + nice + system + irq + softirq from /proc/stat (with tick-based
    accounting a task's system time includes the softirq ticks it ran). Ours is every process
    started through spawn() (with descendants), the harness itself and its waited-for children
    (wrk). What is left is someone else's work competing for the cores: noise."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.m0 = self._machine()
        self.o0 = self._ours()

    @staticmethod
    def _machine() -> float:
        vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        user, nice, system, _idle, _iowait, irq, softirq = vals
        return (user + nice + system + irq + softirq) / _TICK

    @staticmethod
    def _ours() -> float:
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return own + sum(p.cpu_seconds() for p in list(_RUNNING))

    def cpus(self) -> float:
        wall = time.monotonic() - self.t0
        if wall <= 0:
            return 0.0
        return max(0.0, (self._machine() - self.m0) - (self._ours() - self.o0)) / wall


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_get(port: int, host_header: str, path: str = "/", timeout: float = 2.0,
             host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One tiny HTTP/1.1 GET with Connection: close; returns (status, body). Status 0 = failed."""
    req = (f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n"
           f"User-Agent: sandbox-proxy-bench\r\n\r\n").encode()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(req)
            chunks = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
    except OSError:
        return 0, b""
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0, raw
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    for _ in range(100_000):
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return bytes(out)


def wait_http(port: int, host_header: str, proc: Proc | None, timeout: float,
              path: str = "/", want: int = 200, interval: float = 0.02) -> float | None:
    """Poll until GET returns `want`; seconds waited, or None on timeout / process death."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            return None
        status, _ = http_get(port, host_header, path, timeout=1.0)
        if status == want:
            return time.monotonic() - t0
        time.sleep(interval)
    return None


def wait_port(port: int, proc: Proc | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False
