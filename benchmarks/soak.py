"""Soak: a bounded mixed workload through one proxy process, then proof that it let go of
everything it held. Explained in benchmarks/soak.md.

    python -m benchmarks.soak --duration SECONDS [--concurrency N] [--seed S] [--json PATH]

It starts the real CLI (`python -m proxy --config ...`), the test backend
(tests/support/backends.py) and the misbehaving one (tests/support/faulty_backends.py) as processes
of their own, warms the proxy up, takes a baseline, runs the mix for the duration with bounded
concurrency (HTTP, uploads, downloads, SSE, WebSocket, the proxy's own error answers, backends dying
mid-response, clients vanishing, garbage on the socket), then waits for the proxy to return to the
baseline: RSS within a tolerance, open file descriptors and the connection gauges exactly back. Exit
status 0 when every exchange ended as expected and nothing leaked, 1 otherwise.

`ProxyProbe` (RSS, open fds and the /metrics gauges of a proxy process) is also what the
reliability tests use to check that the proxy returned to its baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

REPO_DIR = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_DIR / "tests"
MiB = 1024 * 1024
PREFIX = "sandbox_proxy_"

# Gauges that count what a client or a backend holds open: after the load they must be back.
HELD_GAUGES = ("client_connections", "requests_in_flight", "open_streams")
# The gauge asked for to count the proxy's asyncio tasks (compared when the proxy exports it).
TASKS_GAUGE = "event_loop_tasks"


# --------------------------------------------------------------------------------------------
# Observing a proxy process
# --------------------------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    """Open file descriptors of one process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of one process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def parse_gauges(text: str) -> dict[str, float]:
    """Every `sandbox_proxy_*` gauge of a /metrics page, by name without the prefix."""
    gauges = {}
    for family in text_string_to_metric_families(text):
        if family.type == "gauge" and family.name.startswith(PREFIX):
            for sample in family.samples:
                if not sample.labels:
                    gauges[family.name[len(PREFIX):]] = sample.value
    return gauges


@dataclass
class ProcessSample:
    rss: int
    fds: int
    gauges: dict[str, float]

    @property
    def busy_upstream(self) -> float:
        """Backend connections that are not idle in a pool (bound to a request or a tunnel)."""
        return (self.gauges.get("upstream_connections", 0)
                - self.gauges.get("upstream_idle_connections", 0))

    @property
    def fds_without_idle_pool(self) -> float:
        """Open fds not counting idle pooled backend connections (kept on purpose)."""
        return self.fds - self.gauges.get("upstream_idle_connections", 0)


class ProxyProbe:
    """RSS, fds and gauges of one proxy process (`server.workers = 1`)."""

    def __init__(self, pid: int, metrics_url: str):
        self.pid = pid
        self.metrics_url = metrics_url

    async def gauges(self) -> dict[str, float]:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(self.metrics_url + "/metrics") as resp:
                return parse_gauges(await resp.text())

    async def sample(self) -> ProcessSample:
        gauges = await self.gauges()
        return ProcessSample(rss=rss_bytes(self.pid), fds=open_fds(self.pid), gauges=gauges)

    @staticmethod
    def leaks(baseline: ProcessSample, now: ProcessSample, rss_tolerance: int) -> list[str]:
        """What `now` still holds beyond `baseline` (empty when it is back)."""
        problems = []
        if now.fds_without_idle_pool > baseline.fds_without_idle_pool:
            idle_now = now.gauges.get("upstream_idle_connections", 0)
            idle_then = baseline.gauges.get("upstream_idle_connections", 0)
            problems.append(f"open fds {now.fds} (idle pooled {idle_now:g}) > baseline "
                            f"{baseline.fds} (idle pooled {idle_then:g})")
        for name in HELD_GAUGES:
            if now.gauges.get(name, 0) > baseline.gauges.get(name, 0):
                problems.append(f"{name} {now.gauges.get(name, 0):g} > baseline "
                                f"{baseline.gauges.get(name, 0):g}")
        if now.busy_upstream > baseline.busy_upstream:
            problems.append(f"busy upstream connections {now.busy_upstream:g} > baseline "
                            f"{baseline.busy_upstream:g}")
        if TASKS_GAUGE in now.gauges and TASKS_GAUGE in baseline.gauges:
            if now.gauges[TASKS_GAUGE] > baseline.gauges[TASKS_GAUGE]:
                problems.append(f"{TASKS_GAUGE} {now.gauges[TASKS_GAUGE]:g} > baseline "
                                f"{baseline.gauges[TASKS_GAUGE]:g}")
        if now.rss - baseline.rss > rss_tolerance:
            problems.append(f"RSS {now.rss / MiB:.1f} MiB > baseline {baseline.rss / MiB:.1f} MiB "
                            f"+ {rss_tolerance / MiB:.0f} MiB")
        return problems

    async def quiet(self, timeout: float) -> tuple[ProcessSample, list[str]]:
        """Wait until no connection of any kind is open (pooled ones expired) and the fd count
        is stable: (that sample, the baseline; what is still open if that never happened)."""
        start = time.monotonic()
        previous = None
        while True:
            now = await self.sample()
            still = [f"{name} {now.gauges.get(name, 0):g}"
                     for name in (*HELD_GAUGES, "upstream_connections")
                     if now.gauges.get(name, 0)]
            if not still and previous is not None and previous.fds == now.fds:
                return now, []
            if time.monotonic() - start > timeout:
                return now, [f"not quiet {timeout:g} s after the warm-up: {', '.join(still)}"]
            previous = None if still else now
            await asyncio.sleep(0.3)

    async def settle(self, baseline: ProcessSample, timeout: float,
                     rss_tolerance: int = 10 * MiB) -> tuple[ProcessSample, list[str], float]:
        """Poll until nothing leaks or `timeout`: (last sample, remaining problems, seconds)."""
        start = time.monotonic()
        while True:
            now = await self.sample()
            problems = self.leaks(baseline, now, rss_tolerance)
            elapsed = time.monotonic() - start
            if not problems or elapsed > timeout:
                return now, problems, elapsed
            await asyncio.sleep(0.2)


# --------------------------------------------------------------------------------------------
# The processes: proxy and backends
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy_config(port: int, metrics_port: int) -> str:
    return f"""\
[server]
listen = "127.0.0.1:{port}"
domains = ["localhost"]
drain_delay = 0
drain_timeout = 5.0

[registry]
kind = "static"
path = "sandboxes.toml"
reload_interval = 1.0

[metrics]
listen = "127.0.0.1:{metrics_port}"

[timeouts]
connect = 2.0
upstream_header = 1.5    # the /never scenario is a 504 after this
client_header = 5.0
client_idle = 30.0
upstream_idle = 2.0      # so pooled backend connections are gone when the baseline is taken

[upstream]
connect_attempts = 2     # the refused-port scenario answers after one short retry
connect_backoff = 0.05
allowed_networks = ["127.0.0.0/8"]

[log]
access = "json"
level = "warning"
"""


def registry_file(backend_port: int, faulty_port: int, refused_port: int) -> str:
    return f"""\
[sandboxes.demo]
host = "127.0.0.1"
ports = {{ 3000 = {backend_port} }}

[sandboxes.faulty]
host = "127.0.0.1"
ports = {{ 3000 = {faulty_port} }}

[sandboxes.refused]
host = "127.0.0.1"
ports = {{ 3000 = {refused_port} }}
"""


class ProxyUnderSoak:
    def __init__(self, workdir: Path, backend_port: int, faulty_port: int):
        self.workdir = workdir
        self.port = free_port()
        self.metrics_port = free_port()
        conf = workdir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "proxy.toml").write_text(proxy_config(self.port, self.metrics_port))
        (conf / "sandboxes.toml").write_text(registry_file(backend_port, faulty_port,
                                                           free_port()))
        self.config_path = conf / "proxy.toml"
        self.proc: subprocess.Popen | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self, timeout: float = 15.0) -> "ProxyUnderSoak":
        with open(self.workdir / "proxy.stdout", "wb") as out, \
                open(self.workdir / "proxy.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "--config", str(self.config_path)],
                cwd=REPO_DIR, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the proxy exited with {self.proc.returncode}: "
                                   f"{(self.workdir / 'proxy.stderr').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.metrics_port), timeout=0.2):
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the proxy did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --------------------------------------------------------------------------------------------
# The workload
# --------------------------------------------------------------------------------------------


class Unexpected(Exception):
    """An exchange ended in a way the proxy must never produce."""


@dataclass
class Client:
    """What every scenario gets: the proxy's address, a keep-alive session, a seeded RNG."""

    port: int
    session: aiohttp.ClientSession
    rng: random.Random

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def host(sandbox: str = "demo") -> dict[str, str]:
    return {"Host": f"3000-{sandbox}.localhost"}


async def expect_json_error(resp: aiohttp.ClientResponse, status: int, message: str) -> None:
    body = await resp.read()
    if resp.status != status:
        raise Unexpected(f"status {resp.status}, expected {status}: {body[:200]!r}")
    if json.loads(body).get("message") != message:
        raise Unexpected(f"{status} with body {body[:200]!r}")


async def http_small(c: Client) -> None:
    n = c.rng.randrange(1 << 30)
    async with c.session.get(c.url(f"/echo?n={n}"), headers=host()) as resp:
        data = await resp.json(content_type=None)
        if resp.status != 200 or data["raw_path"] != f"/echo?n={n}":
            raise Unexpected(f"{resp.status} {data!r:.200}")


async def upload(c: Client) -> None:
    body = c.rng.randbytes(c.rng.randrange(1, 2 * MiB))
    async with c.session.post(c.url("/upload"), data=body, headers=host()) as resp:
        data = await resp.json(content_type=None)
        if resp.status != 200 or data["body_sha256"] != hashlib.sha256(body).hexdigest():
            raise Unexpected(f"upload of {len(body)} bytes: {resp.status} {data!r:.200}")


async def download(c: Client, route: str = "bytes") -> None:
    from support.backends import det_digest  # tests/support/backends.py

    n, seed = c.rng.randrange(1, 4 * MiB), c.rng.randrange(100)
    h = hashlib.sha256()
    async with c.session.get(c.url(f"/{route}?n={n}&seed={seed}"), headers=host()) as resp:
        async for piece in resp.content.iter_chunked(256 * 1024):
            h.update(piece)
    if resp.status != 200 or h.hexdigest() != det_digest(n, seed):
        raise Unexpected(f"/{route} of {n} bytes: {resp.status}, body differs")


async def chunked_download(c: Client) -> None:
    await download(c, "chunked")


async def sse(c: Client) -> None:
    async with c.session.get(c.url("/sse?n=5&interval=0.02"), headers=host()) as resp:
        text = (await resp.read()).decode()
    if resp.status != 200 or text.count("event: tick") != 5:
        raise Unexpected(f"SSE: {resp.status} {text[:200]!r}")


async def websocket(c: Client) -> None:
    async with c.session.ws_connect(c.url("/ws"), headers=host(), autoping=False) as ws:
        for i in range(c.rng.randrange(1, 20)):
            if i % 2:
                payload = c.rng.randbytes(c.rng.randrange(1, 64 * 1024))
                await ws.send_bytes(payload)
                msg = await ws.receive(timeout=10)
                if msg.data != payload:
                    raise Unexpected("a binary WebSocket message came back different")
            else:
                await ws.send_str(f"m{i}")
                msg = await ws.receive(timeout=10)
                if msg.data != f"m{i}":
                    raise Unexpected(f"WebSocket echo {msg!r:.200}")
        await ws.close()


async def websocket_abandoned(c: Client) -> None:
    """A client that vanishes from an open WebSocket without a close frame."""
    reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: 3000-demo.localhost\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.transport.abort()
    if not head.startswith(b"HTTP/1.1 101"):
        raise Unexpected(f"WebSocket upgrade answered {head[:100]!r}")


async def not_found(c: Client) -> None:
    async with c.session.get(c.url("/"), headers=host(f"nosuch{c.rng.randrange(10**6)}")) as r:
        await expect_json_error(r, 502, "The sandbox was not found")


async def port_closed(c: Client) -> None:
    async with c.session.get(c.url("/"), headers=host("refused")) as resp:
        await expect_json_error(resp, 502, "The sandbox is running but port is not open")


async def bad_host(c: Client) -> None:
    async with c.session.get(c.url("/"), headers={"Host": "no-dots-here"}) as resp:
        await resp.read()
        if resp.status != 400:
            raise Unexpected(f"bad Host answered {resp.status}")


async def upstream_timeout(c: Client) -> None:
    async with c.session.get(c.url("/never"), headers=host("faulty")) as resp:
        await expect_json_error(resp, 504, "The sandbox did not respond in time")


async def backend_dies_mid_response(c: Client) -> None:
    """The backend resets the connection half way: the client must see an incomplete body."""
    chunked = c.rng.choice(("0", "1"))
    path = f"/partial?n={MiB}&send={MiB // 4}&then=rst&chunked={chunked}"
    try:
        async with c.session.get(c.url(path), headers=host("faulty")) as resp:
            body = await resp.read()
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError):
        return
    raise Unexpected(f"a truncated response was presented as complete ({len(body)} bytes)")


async def client_aborts_download(c: Client) -> None:
    async with c.session.get(c.url("/bytes?n=67108864"), headers=host()) as resp:
        await resp.content.readexactly(MiB)
        resp.close()  # drops the connection mid-body


async def client_aborts_upload(c: Client) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: 3000-demo.localhost\r\n"
                 b"Content-Length: 10485760\r\n\r\n" + c.rng.randbytes(MiB))
    await writer.drain()
    writer.transport.abort()


async def garbage(c: Client) -> None:
    """Random bytes on a raw socket: the proxy answers 4xx or closes, within the header
    timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
    try:
        writer.write(c.rng.randbytes(c.rng.randrange(1, 4096)))
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return
    finally:
        writer.transport.abort()
    if data and not data.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5")):
        raise Unexpected(f"garbage answered {data[:100]!r}")


Scenario = Callable[[Client], Awaitable[None]]
SCENARIOS: dict[str, tuple[Scenario, int]] = {  # name -> (scenario, weight)
    "http": (http_small, 40),
    "upload": (upload, 8),
    "download": (download, 8),
    "chunked_download": (chunked_download, 4),
    "sse": (sse, 6),
    "websocket": (websocket, 8),
    "websocket_abandoned": (websocket_abandoned, 2),
    "not_found_502": (not_found, 4),
    "port_closed_502": (port_closed, 2),
    "bad_host_400": (bad_host, 4),
    "timeout_504": (upstream_timeout, 1),
    "backend_dies": (backend_dies_mid_response, 3),
    "client_aborts_download": (client_aborts_download, 2),
    "client_aborts_upload": (client_aborts_upload, 2),
    "garbage": (garbage, 3),
}
SCENARIO_TIMEOUT = 30.0  # an exchange still running after this is a hang


@dataclass
class Tally:
    runs: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, name: str, problem: str | None) -> None:
        self.runs[name] = self.runs.get(name, 0) + 1
        if problem is not None:
            self.failures[name] = self.failures.get(name, 0) + 1
            if len(self.examples) < 20:
                self.examples.append(f"{name}: {problem}")

    @property
    def total(self) -> int:
        return sum(self.runs.values())

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


async def run_one(name: str, client: Client, tally: Tally) -> None:
    scenario = SCENARIOS[name][0]
    try:
        await asyncio.wait_for(scenario(client), SCENARIO_TIMEOUT)
    except asyncio.TimeoutError:
        tally.add(name, f"no end within {SCENARIO_TIMEOUT:g} s (a hang)")
    except Unexpected as exc:
        tally.add(name, str(exc))
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        tally.add(name, f"{type(exc).__name__}: {exc}")
    else:
        tally.add(name, None)


async def worker(port: int, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    names = list(SCENARIOS)
    weights = [SCENARIOS[n][1] for n in names]
    timeout = aiohttp.ClientTimeout(total=SCENARIO_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        client = Client(port, session, rng)
        while time.monotonic() < until:
            await run_one(rng.choices(names, weights)[0], client, tally)


async def load(port: int, seconds: float, concurrency: int, seed: int, tally: Tally) -> None:
    until = time.monotonic() + seconds
    await asyncio.gather(*(worker(port, seed * 1000 + i, until, tally)
                           for i in range(concurrency)))


async def warm_up(port: int, seconds: float, concurrency: int, seed: int) -> Tally:
    """Every scenario once, then the mix at full concurrency: lazy allocations happen here."""
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=SCENARIO_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        client = Client(port, session, random.Random(seed))
        for name in SCENARIOS:
            await run_one(name, client, tally)
    await load(port, seconds, concurrency, seed + 1, tally)
    return tally


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class Peak:
    rss: int = 0
    fds: int = 0
    gauges: dict[str, float] = field(default_factory=dict)

    def update(self, s: ProcessSample) -> None:
        self.rss = max(self.rss, s.rss)
        self.fds = max(self.fds, s.fds)
        for k, v in s.gauges.items():
            self.gauges[k] = max(self.gauges.get(k, v), v)


async def sample_peaks(probe: ProxyProbe, peak: Peak, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):
            peak.update(await probe.sample())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


def render(args, tally: Tally, seconds: float, baseline: ProcessSample, peak: Peak,
           after: ProcessSample, settle_seconds: float, problems: list[str]) -> str:
    lines = [f"soak: {seconds:.1f} s of mixed load, {args.concurrency} concurrent clients, "
             f"seed {args.seed}", "",
             f"{'scenario':<24}{'runs':>8}{'failed':>8}"]
    for name in SCENARIOS:
        lines.append(f"{name:<24}{tally.runs.get(name, 0):>8}{tally.failures.get(name, 0):>8}")
    lines.append(f"{'total':<24}{tally.total:>8}{tally.failed:>8}   "
                 f"({tally.total / seconds:.0f} exchanges/s)")
    lines += [f"  {e}" for e in tally.examples]
    lines += ["", f"{'':<28}{'baseline':>12}{'peak':>12}{'after':>12}"]

    def row(name: str, b, p, a, fmt=lambda v: f"{v:g}") -> None:
        lines.append(f"{name:<28}{fmt(b):>12}{fmt(p):>12}{fmt(a):>12}")

    row("RSS (MiB)", baseline.rss / MiB, peak.rss / MiB, after.rss / MiB, lambda v: f"{v:.1f}")
    row("open fds", baseline.fds, peak.fds, after.fds)
    for name in (*HELD_GAUGES, "upstream_connections", "upstream_idle_connections"):
        row(name, baseline.gauges.get(name, 0), peak.gauges.get(name, 0),
            after.gauges.get(name, 0))
    if TASKS_GAUGE in after.gauges:
        row(TASKS_GAUGE, baseline.gauges.get(TASKS_GAUGE, 0), peak.gauges.get(TASKS_GAUGE, 0),
            after.gauges[TASKS_GAUGE])
    else:
        lines.append(f"{TASKS_GAUGE:<28}{'not exported by this proxy':>36}")
    lines.append("")
    if problems:
        lines.append(f"LEAK: not back to the baseline {settle_seconds:.1f} s after the load:")
        lines += [f"  {p}" for p in problems]
    else:
        lines.append(f"back to the baseline {settle_seconds:.1f} s after the load "
                     f"(RSS tolerance {args.rss_tolerance:g} MiB)")
    lines.append("PASS" if not problems and not tally.failed else "FAIL")
    return "\n".join(lines)


def summary(args, tally: Tally, seconds: float, baseline: ProcessSample, peak: Peak,
            after: ProcessSample, settle_seconds: float, problems: list[str]) -> dict:
    def sample(s) -> dict:
        return {"rss": s.rss, "fds": s.fds, "gauges": s.gauges}

    return {"duration": seconds, "concurrency": args.concurrency, "seed": args.seed,
            "runs": tally.runs, "failures": tally.failures, "examples": tally.examples,
            "exchanges": tally.total, "failed": tally.failed,
            "baseline": sample(baseline), "peak": sample(peak), "after": sample(after),
            "settle_seconds": settle_seconds, "leaks": problems,
            "passed": not problems and not tally.failed}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


async def soak(args, proxy: ProxyUnderSoak) -> dict:
    probe = ProxyProbe(proxy.proc.pid, proxy.metrics_url)
    warm = min(10.0, max(2.0, args.duration / 4))
    print(f"warming up for {warm:.0f} s ...", flush=True)
    warm_tally = await warm_up(proxy.port, warm, args.concurrency, args.seed)
    baseline, not_quiet = await probe.quiet(timeout=args.settle)
    print(f"baseline: RSS {baseline.rss / MiB:.1f} MiB, {baseline.fds} fds; "
          f"running the mix for {args.duration:g} s ...", flush=True)
    tally = Tally()
    peak = Peak()
    stop = asyncio.Event()
    sampler = asyncio.get_running_loop().create_task(sample_peaks(probe, peak, stop))
    started = time.monotonic()
    await load(proxy.port, args.duration, args.concurrency, args.seed + 2, tally)
    seconds = time.monotonic() - started
    stop.set()
    await sampler
    after, problems, settle_seconds = await probe.settle(
        baseline, timeout=args.settle, rss_tolerance=int(args.rss_tolerance * MiB))
    problems = not_quiet + problems
    if warm_tally.failed:
        tally.examples[:0] = [f"(warm-up) {e}" for e in warm_tally.examples]
        for name, n in warm_tally.failures.items():
            tally.failures[name] = tally.failures.get(name, 0) + n
    print(render(args, tally, seconds, baseline, peak, after, settle_seconds, problems))
    return summary(args, tally, seconds, baseline, peak, after, settle_seconds, problems)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                     description="mixed load, then a check that the proxy "
                                                 "returns to its baseline")
    parser.add_argument("--duration", type=float, default=300.0,
                        help="seconds of mixed load (default 300)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="concurrent clients (default 32)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of the mix (default: all of "
                             f"{', '.join(SCENARIOS)})")
    parser.add_argument("--rss-tolerance", type=float, default=10.0,
                        help="MiB the RSS may stay above its baseline (default 10)")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds the proxy gets to return to the baseline (default 15)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="configs and logs (default: a temporary directory, kept on failure)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown or not chosen:
        print(f"unknown scenarios: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    for name in list(SCENARIOS):
        if name not in chosen:
            del SCENARIOS[name]
    sys.path.insert(0, str(TESTS_DIR))
    from support.faulty_backends import BackendProcess  # tests/support/faulty_backends.py

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sandbox-proxy-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    backend = BackendProcess("backends.py").start()
    faulty = BackendProcess("faulty_backends.py").start()
    proxy = None
    result: dict = {"passed": False}
    try:
        proxy = ProxyUnderSoak(workdir, backend.port, faulty.port).start()
        result = asyncio.run(soak(args, proxy))
        if proxy.proc.poll() is not None:
            result["passed"] = False
            print(f"FAIL: the proxy exited ({proxy.proc.returncode}) during the soak")
    finally:
        if proxy is not None:
            proxy.stop()
        backend.kill()
        faulty.kill()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if result["passed"] and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not result["passed"]:
        print(f"configs and logs kept in {workdir}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
