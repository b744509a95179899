"""Fixtures and helpers for the end-to-end tests of sandbox-proxy.

The proxy is always exercised as a black box: ``python -m proxy --config FILE``
in a subprocess, configured through the TOML files documented in
config/proxy.toml and config/sandboxes.toml.  Backends (tests/backends.py) run
in this process on an event loop of their own, so the proxy's memory can be
measured on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backends import ThreadedBackend  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PROXY_START_TIMEOUT = 15.0
DOMAINS = ["localhost", "sbx.example.test"]


# --------------------------------------------------------------------------
# CI: a skipped test is a failed test when SANDBOX_PROXY_NO_SKIP=1
# --------------------------------------------------------------------------


def _no_skip() -> bool:
    return os.environ.get("SANDBOX_PROXY_NO_SKIP") == "1"


def _skip_reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if _no_skip() and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"SANDBOX_PROXY_NO_SKIP=1: skipped test counts as a failure ({reason})"
        )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if _no_skip() and report.skipped:
        reason = _skip_reason(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"SANDBOX_PROXY_NO_SKIP=1: skipped module counts as a failure ({reason})"
        )
    return report


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            key = str(k)
            if not key.replace("_", "").replace("-", "").isalnum() or not key.isascii():
                key = json.dumps(key)
            parts.append(f"{key} = {_toml_value(v)}")
        return "{ " + ", ".join(parts) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Write {table_name: {key: value}} as TOML (inline tables for dict values)."""
    out = []
    for name, keys in tables.items():
        out.append(f"[{name}]")
        for k, v in keys.items():
            out.append(f"{k} = {_toml_value(v)}")
        out.append("")
    return "\n".join(out)


def registry_toml(sandboxes: dict[str, dict[str, Any]]) -> str:
    return to_toml({f"sandboxes.{sid}": spec for sid, spec in sandboxes.items()})


def deep_merge(base: dict, extra: dict | None) -> dict:
    result = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(result.get(k), dict):
            result[k] = deep_merge(result[k], v)
        else:
            result[k] = copy.deepcopy(v)
    return result


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may contain spaces: the ppid is the 2nd field after ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process and all its descendants."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        todo.extend(_children(p))
    return total


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.05
) -> float:
    """Poll an async predicate until true; returns the time it took, fails on timeout."""
    start = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def header_values(echo: dict, name: str) -> list[str]:
    """All values of a header in a backend echo (case-insensitive name)."""
    lname = name.lower()
    return [v for k, v in echo["headers"] if k.lower() == lname]


def header_value(echo: dict, name: str) -> str | None:
    values = header_values(echo, name)
    assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
    return values[0] if values else None


# --------------------------------------------------------------------------
# The proxy subprocess
# --------------------------------------------------------------------------


class ProxyStartError(AssertionError):
    pass


@dataclass
class ProxyProcess:
    """A running ``python -m proxy`` and the files that configure it."""

    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    workdir: Path
    config_path: Path
    registry_path: Path
    stdout_path: Path
    stderr_path: Path
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    extra_listeners: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def host(self, sid: str = "demo", port: int = 3000, domain: str = "localhost") -> str:
        """The Host header that addresses ``port`` of sandbox ``sid``."""
        return f"{port}-{sid}.{domain}"

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    def write_registry(self, sandboxes: dict[str, dict[str, Any]], atomic: bool = True) -> None:
        text = registry_toml(sandboxes)
        if atomic:
            tmp = self.registry_path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.registry_path)
        else:
            with open(self.registry_path, "w") as f:
                f.write(text)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def default_config(port: int, metrics_port: int) -> dict[str, dict[str, Any]]:
    return {
        # drain_delay 0: stopping a proxy (SIGTERM) must not wait for a load balancer
        "server": {"listen": f"127.0.0.1:{port}", "domains": list(DOMAINS), "drain_delay": 0},
        "registry": {"kind": "static", "path": "sandboxes.toml", "reload_interval": 0.2},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        # test backends live on loopback, which the proxy refuses unless allowed
        "upstream": {"allowed_networks": ["127.0.0.0/8", "::1/128"]},
    }


def launch_proxy(
    workdir: Path,
    sandboxes: dict[str, dict[str, Any]],
    config: dict | None = None,
    args: list[str] | None = None,
    raw_config: str | None = None,
    wait: bool = True,
    env: dict[str, str] | None = None,
    config_flag: bool = True,
) -> ProxyProcess:
    """Write proxy.toml and sandboxes.toml under ``workdir/conf`` and start the CLI.

    The process runs with ``workdir`` as its current directory, not the config
    directory, so a registry path that is not resolved relative to the config
    file shows up as a start-up failure. ``env`` is added to the process's
    environment (SANDBOX_PROXY_LISTEN / _METRICS_LISTEN move the ports waited
    for); without ``config_flag`` no --config is passed (SANDBOX_PROXY_CONFIG
    in ``env`` names the file then).
    """
    conf_dir = workdir / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    metrics_port = free_port()
    cfg = deep_merge(default_config(port, metrics_port), config)
    listen = cfg["server"]["listen"]
    port = int(listen.rsplit(":", 1)[1])
    metrics_listen = cfg.get("metrics", {}).get("listen", "")
    metrics_port = int(metrics_listen.rsplit(":", 1)[1]) if metrics_listen else None
    env = dict(env or {})
    if env.get("SANDBOX_PROXY_LISTEN"):
        port = int(env["SANDBOX_PROXY_LISTEN"].rsplit(":", 1)[1])
    if env.get("SANDBOX_PROXY_METRICS_LISTEN"):
        metrics_port = int(env["SANDBOX_PROXY_METRICS_LISTEN"].rsplit(":", 1)[1])
    if args and "--listen" in args:
        port = int(args[args.index("--listen") + 1].rsplit(":", 1)[1])

    config_path = conf_dir / "proxy.toml"
    config_path.write_text(raw_config if raw_config is not None else to_toml(cfg))
    registry_path = conf_dir / "sandboxes.toml"
    registry_path.write_text(registry_toml(sandboxes))
    stdout_path = workdir / "proxy.stdout"
    stderr_path = workdir / "proxy.stderr"
    config_args = ["--config", str(config_path)] if config_flag else []
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *config_args, *(args or [])],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
        )
    p = ProxyProcess(
        proc=proc,
        port=port,
        metrics_port=metrics_port,
        workdir=workdir,
        config_path=config_path,
        registry_path=registry_path,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
        domains=list(cfg["server"].get("domains", DOMAINS)),
    )
    # every other listener the config asks for (e.g. a future [admin] listen) must accept too
    for name, table in cfg.items():
        if name in ("server", "metrics") or not isinstance(table, dict):
            continue
        listen_addr = table.get("listen")
        if isinstance(listen_addr, str) and listen_addr.rsplit(":", 1)[-1].isdigit():
            p.extra_listeners.append(int(listen_addr.rsplit(":", 1)[1]))
    if wait:
        try:
            wait_ready(p)
        except BaseException:
            p.stop(grace=2)
            raise
    return p


def wait_ready(p: ProxyProcess, timeout: float = PROXY_START_TIMEOUT) -> None:
    """Wait until the edge port accepts, /healthz and /readyz answer 200 (when the metrics
    listener is on) and any other configured listener accepts."""
    deadline = time.monotonic() + timeout
    edge_up = health_ok = ready_ok = False
    extra_up: set[int] = set()
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise ProxyStartError(
                f"proxy exited with status {p.proc.returncode} during start-up\n"
                f"--- stderr ---\n{p.stderr()}\n--- stdout ---\n{p.stdout()}"
            )
        if not edge_up:
            edge_up = port_is_open("127.0.0.1", p.port, timeout=0.2)
        if edge_up and not health_ok:
            health_ok = p.metrics_port is None or (
                _http_status(f"{p.metrics_url}/healthz", timeout=0.5) == 200
            )
        if health_ok and not ready_ok:
            ready_ok = p.metrics_port is None or (
                _http_status(f"{p.metrics_url}/readyz", timeout=0.5) == 200
            )
        for port in p.extra_listeners:
            if port not in extra_up and port_is_open("127.0.0.1", port, timeout=0.2):
                extra_up.add(port)
        if edge_up and health_ok and ready_ok and extra_up >= set(p.extra_listeners):
            return
        time.sleep(0.05)
    raise ProxyStartError(
        f"proxy not ready within {timeout} s (edge port {p.port} accepting: {edge_up}, "
        f"/healthz on {p.metrics_port} 200: {health_ok}, /readyz 200: {ready_ok}, "
        f"other listeners {p.extra_listeners} accepting: {sorted(extra_up)})\n"
        f"--- stderr ---\n{p.stderr()}\n--- stdout ---\n{p.stdout()}"
    )


def run_cli(args: list[str], timeout: float = 20.0, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m proxy ARGS`` to completion (for start-up failures); ``env`` is added
    to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
    )


def standard_registry(backend_port: int, refused_port: int) -> dict[str, dict[str, Any]]:
    """demo: port 3000 -> backend; masked: the same with Host masking;
    refused: port 3000 -> a port nothing listens on."""
    return {
        "demo": {"host": "127.0.0.1", "ports": {3000: backend_port}},
        "masked": {
            "host": "127.0.0.1",
            "mask_request_host": "localhost:${PORT}",
            "ports": {3000: backend_port},
        },
        "refused": {"host": "127.0.0.1", "ports": {3000: refused_port}},
    }


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def backend():
    """The aiohttp test backend (tests/backends.py) on 127.0.0.1:<free port>."""
    b = ThreadedBackend(name="main").start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def refused_port():
    return free_port()


@pytest.fixture
def registry(backend, refused_port):
    return standard_registry(backend.port, refused_port)


@pytest.fixture
def proxy(tmp_path, backend, refused_port):
    """Factory: ``proxy(sandboxes=None, config=None, args=None)`` starts a proxy.

    Every proxy started is stopped (SIGTERM, then SIGKILL) at the end of the test.
    """
    started: list[ProxyProcess] = []

    def start(
        sandboxes: dict | None = None,
        config: dict | None = None,
        args: list[str] | None = None,
        wait: bool = True,
        env: dict[str, str] | None = None,
        config_flag: bool = True,
    ) -> ProxyProcess:
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        reg = standard_registry(backend.port, refused_port) if sandboxes is None else sandboxes
        p = launch_proxy(workdir, reg, config=config, args=args, wait=wait, env=env,
                         config_flag=config_flag)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="module")
def shared_proxy(tmp_path_factory, backend, refused_port):
    """One proxy with the standard registry shared by a module's read-only tests."""
    workdir = tmp_path_factory.mktemp("shared-proxy")
    p = launch_proxy(workdir, standard_registry(backend.port, refused_port))
    yield p
    p.stop()


@contextlib.asynccontextmanager
async def raw_backend(handler):
    """A hand-written backend: `handler(reader, writer)` per connection; yields its port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


# --------------------------------------------------------------------------
# A raw HTTP/1.1 client, for what client libraries refuse to send or hide
# --------------------------------------------------------------------------


class IncompleteResponse(AssertionError):
    def __init__(self, message: str, head: "RawResponse | None" = None, received: bytes = b""):
        super().__init__(message)
        self.head = head
        self.received = received


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    body: bytes = b""
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def json(self) -> Any:
        return json.loads(self.body)

    def connection_tokens(self) -> set[str]:
        tokens: set[str] = set()
        for v in self.header_all("Connection"):
            tokens.update(t.strip().lower() for t in v.split(",") if t.strip())
        return tokens


def build_request(
    method: str,
    target: str,
    host: str | None,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    hdrs = list(headers or [])
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in hdrs):
        hdrs.append(("Content-Length", str(len(body))))
    lines.extend(f"{k}: {v}" for k, v in hdrs)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def parse_head(raw: bytes) -> RawResponse:
    text = raw.decode("latin-1")
    lines = text.split("\r\n")
    status_line = lines[0]
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise AssertionError(f"not an HTTP status line: {status_line!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        k, sep, v = line.partition(":")
        assert sep, f"malformed header line {line!r}"
        headers.append((k.strip(), v.strip()))
    return RawResponse(
        version=parts[0],
        status=int(parts[1]),
        reason=parts[2] if len(parts) > 2 else "",
        headers=headers,
        raw_head=raw,
    )


class RawConn:
    """One client TCP connection to the proxy, speaking hand-written HTTP/1.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> "RawConn":
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 20), timeout
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, method: str, target: str, host: str | None, headers=None,
                      body: bytes | None = None, version: str = "HTTP/1.1",
                      timeout: float = 10.0) -> RawResponse:
        await self.send(build_request(method, target, host, headers, body, version))
        return await self.response(method=method, timeout=timeout)

    async def read_head(self, timeout: float = 10.0) -> RawResponse:
        try:
            raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as e:
            raise IncompleteResponse(
                f"connection closed before a complete response head (got {e.partial[:200]!r})",
                received=e.partial,
            ) from None
        return parse_head(raw)

    async def response(self, method: str = "GET", timeout: float = 10.0,
                       skip_interim: bool = True) -> RawResponse:
        """Read one response (by default skipping 100 Continue and other 1xx but 101)."""
        async def read() -> RawResponse:
            while True:
                head = await self.read_head(timeout)
                if skip_interim and 100 <= head.status < 200 and head.status != 101:
                    continue
                break
            await self._read_body(head, method)
            return head

        return await asyncio.wait_for(read(), timeout)

    async def _read_body(self, head: RawResponse, method: str) -> None:
        if method.upper() == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
            return
        te = ",".join(head.header_all("Transfer-Encoding")).lower()
        if te:
            assert te.split(",")[-1].strip() == "chunked", f"unexpected transfer-encoding {te!r}"
            head.chunked = True
            body = bytearray()
            while True:
                try:
                    size_line = await self.reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0].strip(), 16)
                    if size == 0:
                        while True:
                            line = await self.reader.readuntil(b"\r\n")
                            if line == b"\r\n":
                                break
                            k, _, v = line.decode("latin-1").partition(":")
                            head.trailers.append((k.strip(), v.strip()))
                        break
                    body += await self.reader.readexactly(size)
                    crlf = await self.reader.readexactly(2)
                    assert crlf == b"\r\n", f"bad chunk terminator {crlf!r}"
                except (asyncio.IncompleteReadError, ConnectionError) as e:
                    partial = getattr(e, "partial", b"")
                    head.body = bytes(body)
                    raise IncompleteResponse(
                        f"connection closed inside a chunked body after {len(body)} bytes",
                        head=head, received=bytes(body) + partial,
                    ) from None
            head.body = bytes(body)
            return
        cl = head.header("Content-Length")
        if cl is not None:
            n = int(cl)
            try:
                head.body = await self.reader.readexactly(n)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                partial = getattr(e, "partial", b"")
                head.body = partial
                raise IncompleteResponse(
                    f"connection closed after {len(partial)} of {n} body bytes",
                    head=head, received=partial,
                ) from None
            return
        # close-delimited
        head.body = await self.reader.read(-1)

    async def closed(self, timeout: float) -> bool:
        """True when the peer closes (EOF or reset) within ``timeout`` seconds.

        Anything the proxy still sends before closing is returned in
        ``self.last_bytes``."""
        self.last_bytes = b""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                data = await asyncio.wait_for(self.reader.read(65536), left)
                if not data:
                    return True
                self.last_bytes += data
        except asyncio.TimeoutError:  # first: since Python 3.11 it is an OSError too
            return False
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


@pytest.fixture
async def raw_conns():
    """Factory opening RawConns that are all closed at the end of the test."""
    conns: list[RawConn] = []

    async def open_conn(port: int) -> RawConn:
        c = await RawConn.open(port)
        conns.append(c)
        return c

    yield open_conn
    for c in conns:
        await c.aclose()


# --------------------------------------------------------------------------
# Expected proxy error bodies
# --------------------------------------------------------------------------


def not_found_body(sid: str) -> dict:
    return {"sandboxId": sid, "message": "The sandbox was not found", "code": 502}


def port_closed_body(sid: str, port: int) -> dict:
    return {
        "sandboxId": sid,
        "message": "The sandbox is running but port is not open",
        "port": port,
        "code": 502,
    }


BROWSER_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0 Safari/537.36"
)
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"


# --------------------------------------------------------------------------
# aiohttp client shortcut
# --------------------------------------------------------------------------


@dataclass
class Fetched:
    status: int
    headers: Any  # CIMultiDictProxy
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(
    p: ProxyProcess,
    path: str,
    host: str | None = None,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: Any = None,
    timeout: float = 20.0,
) -> Fetched:
    """One request through the proxy with aiohttp (no decompression, no env proxies)."""
    import aiohttp

    hdrs = {"Host": host or p.host()}
    hdrs.update(headers or {})
    async with aiohttp.ClientSession(
        auto_decompress=False, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        async with session.request(method, p.url(path), headers=hdrs, data=data) as resp:
            body = await resp.read()
            return Fetched(resp.status, resp.headers, body)


async def metric_value(p: ProxyProcess, name: str, **labels: str) -> float | None:
    """One sample of the proxy's /metrics (None when it is not there)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(p.metrics_url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


async def http_status(url: str) -> int:
    """The status of a GET (for /readyz and /healthz)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(url) as resp:
            return resp.status


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state on sockets held by ``pid`` and its descendants."""
    inodes: set[str] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{p}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        todo.extend(_children(p))
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
