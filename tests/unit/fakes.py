"""Fakes for the unit tests: transports without sockets, and a real EdgeContext around them.

Only the transports are fake. The protocols (ClientConnection, UpstreamConnection), llhttp
(httptools), the Exchange, the registry (a real StaticRegistry over a temporary TOML file),
Stats and the upstream pools are the real ones. A backend connection is a real
UpstreamConnection bound to a FakeTransport and put in its pool's idle list (`Backend.seed`), so
`UpstreamPool.take()` hands it out; opening a fresh one can never reach the network, since the
sandboxes' address lies outside `[upstream] allowed_networks` (a fresh connect is answered 502
BackendNotAllowed without a socket).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.accesslog import AccessLog
from proxy.config import load_config
from proxy.context import EdgeContext
from proxy.edge import ClientConnection
from proxy.pools import UpstreamPool, UpstreamPools
from proxy.registry.static import StaticRegistry
from proxy.stats import Stats
from proxy.timeouts import DeadlineSweeper
from proxy.upstream import UpstreamConnection

SANDBOX = "demo"
PORT = 3000
HOST = b"3000-demo.localhost"
BACKEND_HOST = "10.0.0.7"  # outside ALLOWED: a fresh connect is refused before any socket
ALLOWED = "192.0.2.0/24"


class FakeTransport(asyncio.Transport):
    """Records what a protocol does to its transport; lets a test act as the peer and the loop.

    `close()` and `abort()` deliver `connection_lost` on the next loop iteration, as asyncio's
    own transports do (`auto_lose=False`: only `lose()` delivers it)."""

    def __init__(self, peer: tuple[str, int] = ("203.0.113.9", 40000), *,
                 can_write_eof: bool = True, sock: socket.socket | None = None,
                 auto_lose: bool = True) -> None:
        super().__init__()
        self.peer = peer
        self.sock = sock
        self._can_write_eof = can_write_eof
        self.auto_lose = auto_lose
        self.protocol: asyncio.BaseProtocol | None = None
        self.writes: list[bytes] = []           # one entry per write() or writelines() call
        self.calls: list[str] = []              # "write", "writelines", "write_eof", ...
        self.eof_written = False
        self.closing = False
        self.closed = False                     # close() was called
        self.aborted = False                    # abort() was called
        self.reading = True
        self.pauses = 0
        self.resumes = 0
        self.lost = False

    # -- what the protocol calls ------------------------------------------------------------
    def write(self, data: bytes) -> None:
        self.calls.append("write")
        self.writes.append(bytes(data))

    def writelines(self, list_of_data) -> None:  # type: ignore[override]
        self.calls.append("writelines")
        self.writes.append(b"".join(list_of_data))

    def write_eof(self) -> None:
        self.calls.append("write_eof")
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return self._can_write_eof

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True
        self._closing()

    def abort(self) -> None:
        self.calls.append("abort")
        self.aborted = True
        self._closing()

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")
        self.pauses += 1
        self.reading = False

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")
        self.resumes += 1
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        if name == "socket":
            return self.sock
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def get_write_buffer_size(self) -> int:
        return 0

    # -- what a test does as the peer or the loop ---------------------------------------------
    def _closing(self) -> None:
        if not self.closing:
            self.closing = True
            if self.auto_lose:
                asyncio.get_running_loop().call_soon(self.lose)

    def lose(self, exc: Exception | None = None) -> None:
        """The connection is gone: connection_lost, once."""
        self.closing = True
        if not self.lost:
            self.lost = True
            assert self.protocol is not None
            self.protocol.connection_lost(exc)

    def fill(self) -> None:
        """The write buffer crossed its high-water mark."""
        self.protocol.pause_writing()  # type: ignore[union-attr]

    def drain(self) -> None:
        """The write buffer went below its low-water mark."""
        self.protocol.resume_writing()  # type: ignore[union-attr]

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


class RecordingAccessLog(AccessLog):
    """The real AccessLog's interface with the output replaced by a list: one entry per
    `Exchange.end()` that reached the log."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__("off", loop)
        self.enabled = True
        self.records: list[dict[str, Any]] = []

    def record(self, client_ip, method, host, sandbox_id, port, target, status, bytes_in,
               bytes_out, duration, connect_time, outcome, protocol, http="h1") -> None:
        self.records.append(dict(
            client_ip=client_ip, method=method, host=host, sandbox_id=sandbox_id, port=port,
            target=target, status=status, bytes_in=bytes_in, bytes_out=bytes_out,
            outcome=outcome, protocol=protocol, http=http))


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    """Just enough TOML for the test configs (copied in spirit from tests/conftest.py)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + " }"
        raise TypeError(v)
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out += [f"{k} = {value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def make_context(tmp_path: Path, config: dict[str, dict[str, Any]] | None = None,
                 sandboxes: dict[str, dict[str, Any]] | None = None) -> EdgeContext:
    """A real EdgeContext on the running loop: config and registry files under `tmp_path`."""
    loop = asyncio.get_running_loop()
    if sandboxes is None:
        sandboxes = {SANDBOX: {"host": BACKEND_HOST}}
    (tmp_path / "sandboxes.toml").write_text(
        _toml({f"sandboxes.{sid}": entry for sid, entry in sandboxes.items()}))
    tables: dict[str, dict[str, Any]] = {
        "server": {"domains": ["localhost"]},
        "registry": {"kind": "static", "path": "sandboxes.toml", "reload_interval": 0},
        "upstream": {"allowed_networks": [ALLOWED], "connect_attempts": 1},
        "log": {"access": "off"},
    }
    for name, table in (config or {}).items():
        tables[name] = {**tables.get(name, {}), **table}
    (tmp_path / "proxy.toml").write_text(_toml(tables))
    cfg = load_config(tmp_path / "proxy.toml", environ={})
    registry = StaticRegistry(cfg.registry.path, cfg.registry.reload_interval)
    sweeper = DeadlineSweeper(loop, 1.0)  # never started: tests fire deadlines (`expire`)
    stats = Stats("static")
    pools = UpstreamPools(cfg, loop, sweeper, stats)
    return EdgeContext(loop=loop, config=cfg, registry=registry, pools=pools, sweeper=sweeper,
                       stats=stats, access_log=RecordingAccessLog(loop))


def expire(obj: ClientConnection | UpstreamConnection) -> None:
    """What the sweeper does when `obj`'s deadline has passed."""
    assert obj.deadline > 0, "no deadline set"
    obj.deadline = 0.0
    obj.on_deadline()


@dataclass
class Backend:
    """One backend connection: a real UpstreamConnection on a FakeTransport."""
    up: UpstreamConnection
    transport: FakeTransport

    def send(self, data: bytes) -> None:
        self.up.data_received(data)

    @property
    def pool(self) -> UpstreamPool:
        return self.up.pool


@dataclass
class Edge:
    """A client connection on a FakeTransport, with its context and seeded backends."""
    ctx: EdgeContext
    conn: ClientConnection
    transport: FakeTransport
    backends: list[Backend] = field(default_factory=list)

    def send(self, data: bytes) -> None:
        self.conn.data_received(data)

    def seed(self, count: int = 1, sandbox_id: str = SANDBOX, host: str = BACKEND_HOST,
             port: int = PORT) -> list[Backend]:
        """Put `count` idle connections in the pool of (sandbox, host, port); the last one
        seeded is taken first (the pool is a stack)."""
        pool = self.ctx.pools.pool(sandbox_id, host, port)
        made = []
        for _ in range(count):
            up = UpstreamConnection(pool)
            t = FakeTransport(peer=(host, port))
            t.set_protocol(up)
            up.connection_made(t)
            pool.release(up)
            made.append(Backend(up, t))
        self.backends += made
        return made[::-1]  # in the order take() hands them out

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.ctx.access_log.records  # type: ignore[attr-defined]

    @property
    def exchange(self):
        return self.conn.active


def open_edge(tmp_path: Path, config: dict[str, dict[str, Any]] | None = None,
              sandboxes: dict[str, dict[str, Any]] | None = None, **transport: Any) -> Edge:
    return connect_client(make_context(tmp_path, config, sandboxes), **transport)


def connect_client(ctx: EdgeContext, **transport: Any) -> Edge:
    """A client connection accepted by the process `ctx` belongs to."""
    conn = ClientConnection(ctx)
    t = FakeTransport(**transport)
    t.set_protocol(conn)
    conn.connection_made(t)
    return Edge(ctx, conn, t)


def request(method: str = "GET", target: str = "/", host: bytes = HOST,
            headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + host]
    lines += [f"{k}: {v}".encode() for k, v in headers or ()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def response(status: int = 200, body: bytes = b"hello", reason: str = "OK",
             headers: list[tuple[str, str]] | None = None, length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}".encode()]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    lines += [f"{k}: {v}".encode() for k, v in headers or ()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def status_of(data: bytes) -> int:
    """The status code of the first response in `data`."""
    assert data.startswith(b"HTTP/1.1 "), data[:80]
    return int(data[9:12])


async def tick() -> None:
    """Let callbacks scheduled with call_soon (connection_lost after close) run."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
