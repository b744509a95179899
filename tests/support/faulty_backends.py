"""Backends that misbehave on purpose, for the reliability tests and the soak.

``FaultyBackend`` is a raw asyncio HTTP/1.1 server (llhttp through httptools, no framework that
would smooth over what the proxy sends). It counts everything it receives, so a test can tell
whether a request the proxy rejected reached it, and it misbehaves on request, by path:

``/echo`` and any path not listed here
    Reads the whole request, answers ``200`` JSON ``{"method", "target", "body_length",
    "body_sha256", "headers"}`` with ``X-Backend: faulty``. A request it cannot parse is answered
    ``400`` with ``X-Backend: faulty`` and the connection is closed: whatever carries that header
    came from the backend, never from the proxy.
``/never``
    Reads the request and never answers (the connection stays open).
``/no-read``
    Stops reading right after the request head (an upload backs up) and never answers.
``/partial?n=N&send=M&then=hang|fin|rst[&chunked=1]``
    Announces ``N`` body bytes (``Content-Length``, or chunked with ``chunked=1``), sends the
    first ``M`` of ``det_bytes``, then hangs, closes (FIN) or aborts (RST). ``hang`` is the state a
    backend process is in when a test kills it.
``/firehose?n=N``
    Sends ``N`` bytes with ``Content-Length`` as fast as the proxy takes them, honouring
    backpressure; ``state["firehose_sent"]`` is how many the proxy took so far.
``/endless-head``
    Starts a response and sends header lines for ever (a hostile sandbox); ``/endless-trailers``
    does the same after a chunked body's last chunk. ``state["flood_sent"]`` counts the bytes.

Run in this process on a loop of its own (``ThreadedFaultyBackend``) to read its counters, or as a
separate process (``python tests/support/faulty_backends.py --port N`` prints ``READY <port>``; see
``BackendProcess``, which also runs tests/support/backends.py that way) when a test kills it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

SUPPORT_DIR = Path(__file__).resolve().parent
# run as a script (``python tests/support/faulty_backends.py``): tests/ makes ``support`` importable
sys.path.insert(0, str(SUPPORT_DIR.parent))

from support.backends import det_bytes  # noqa: E402

FIREHOSE_PIECE = 64 * 1024


def new_state() -> dict:
    return {
        "connections_opened": 0,  # TCP connections accepted
        "connections_open": 0,    # ... and not yet closed
        "bytes_received": 0,      # every byte read from any connection
        "heads": 0,               # request heads parsed completely
        "messages": 0,            # requests received completely (head and body)
        "answered": 0,            # responses started
        "paths": {},              # path -> complete heads seen
        "firehose_sent": 0,       # bytes /firehose handed to the kernel
        "parse_errors": 0,
        "flood_sent": 0,          # header bytes /endless-head and /endless-trailers sent
    }


class FaultyConnection(asyncio.Protocol):
    """One backend connection: parse requests, behave as the path says."""

    def __init__(self, state: dict):
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = hashlib.sha256()
        self.body_length = 0
        self.behaviour = "echo"
        self.query: dict[str, list[str]] = {}
        self.firehose_left = 0
        self.flooding = False
        self.firehose_paused = False
        self.closed = False

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state["connections_opened"] += 1
        self.state["connections_open"] += 1

    def data_received(self, data: bytes) -> None:
        self.state["bytes_received"] += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self.respond(501, b"upgrades are not served here\n", close=True)
        except HttpParserError:
            self.state["parse_errors"] += 1
            self.respond(400, b"the backend could not parse the request\n", close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state["connections_open"] -= 1

    def pause_writing(self) -> None:
        self.firehose_paused = True

    def resume_writing(self) -> None:
        self.firehose_paused = False
        if self.firehose_left:
            self.pump()
        elif self.flooding:
            self.flood()

    # -- llhttp callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.target = b""
        self.headers = []
        self.body = hashlib.sha256()
        self.body_length = 0

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        state = self.state
        state["heads"] += 1
        parts = urlsplit(self.target.decode("latin-1"))
        path = parts.path
        state["paths"][path] = state["paths"].get(path, 0) + 1
        self.query = parse_qs(parts.query)
        self.behaviour = path.strip("/") if path in (
            "/never", "/no-read", "/partial", "/firehose", "/endless-head",
            "/endless-trailers") else "echo"
        if self.behaviour == "no-read":
            self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        self.body.update(body)
        self.body_length += len(body)

    def on_message_complete(self) -> None:
        self.state["messages"] += 1
        behaviour = self.behaviour
        if behaviour == "echo":
            payload = json.dumps({
                "method": self.parser.get_method().decode("latin-1"),
                "target": self.target.decode("latin-1"),
                "body_length": self.body_length,
                "body_sha256": self.body.hexdigest(),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")]
                            for k, v in self.headers],
            }).encode()
            self.respond(200, payload, close=not self.parser.should_keep_alive(),
                         content_type=b"application/json",
                         head_only=self.parser.get_method() == b"HEAD")
        elif behaviour == "partial":
            self.partial()
        elif behaviour == "firehose":
            self.firehose()
        elif behaviour in ("endless-head", "endless-trailers"):
            self.state["answered"] += 1
            if behaviour == "endless-head":
                self.transport.write(b"HTTP/1.1 200 OK\r\nX-Backend: faulty\r\n")
            else:
                self.transport.write(b"HTTP/1.1 200 OK\r\nX-Backend: faulty\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
            self.flooding = True
            self.flood()
        # never: nothing, ever

    # -- behaviours ---------------------------------------------------------------------------
    def arg(self, name: str, default: str) -> str:
        return self.query.get(name, [default])[0]

    def respond(self, status: int, body: bytes, close: bool,
                content_type: bytes = b"text/plain", head_only: bool = False) -> None:
        if self.transport.is_closing():
            return
        self.state["answered"] += 1
        head = (b"HTTP/1.1 %d X\r\nX-Backend: faulty\r\nContent-Type: %s\r\n"
                b"Content-Length: %d\r\n" % (status, content_type, len(body)))
        if close:
            head += b"Connection: close\r\n"
        self.transport.write(head + b"\r\n" + (b"" if head_only else body))
        if close:
            self.transport.close()

    def partial(self) -> None:
        n = int(self.arg("n", "1048576"))
        send = int(self.arg("send", str(n // 2)))
        then = self.arg("then", "hang")
        chunked = self.arg("chunked", "0") == "1"
        self.state["answered"] += 1
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % n
        self.transport.write(b"HTTP/1.1 200 OK\r\nX-Backend: faulty\r\n"
                             b"Content-Type: application/octet-stream\r\n%s\r\n\r\n" % framing)
        data = det_bytes(send)
        if chunked:
            for start in range(0, send, 16384):
                piece = data[start:start + 16384]
                self.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        else:
            self.transport.write(data)
        if then == "fin":
            self.transport.close()
        elif then == "rst":
            self.transport.abort()

    def firehose(self) -> None:
        self.firehose_left = int(self.arg("n", str(1 << 30)))
        self.state["answered"] += 1
        self.transport.write(b"HTTP/1.1 200 OK\r\nX-Backend: faulty\r\n"
                             b"Content-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % self.firehose_left)
        self.pump()

    def pump(self) -> None:
        piece = det_bytes(FIREHOSE_PIECE)
        while self.firehose_left and not self.firehose_paused and not self.transport.is_closing():
            size = min(self.firehose_left, FIREHOSE_PIECE)
            self.transport.write(piece[:size])
            self.firehose_left -= size
            self.state["firehose_sent"] += size

    def flood(self) -> None:
        line = b"X-Flood: " + b"f" * 1000 + b"\r\n"
        lines = line * 64
        while not self.firehose_paused and not self.transport.is_closing():
            self.transport.write(lines)
            self.state["flood_sent"] += len(lines)


async def serve(host: str, port: int, state: dict) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: FaultyConnection(state), host, port, backlog=1024)


class ThreadedFaultyBackend:
    """A FaultyBackend on its own event loop in a daemon thread; ``state`` holds its counters."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.requested_port = port
        self.state = new_state()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> "ThreadedFaultyBackend":
        self._thread = threading.Thread(target=self._run, name="faulty-backend", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self.port is None:
            raise RuntimeError("the faulty backend did not start")
        return self

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        server = loop.run_until_complete(serve(self.host, self.requested_port, self.state))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()
        server.close()
        loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


class BackendProcess:
    """A backend in a process of its own (so a test can SIGKILL it): ``tests/support/backends.py``
    or ``tests/support/faulty_backends.py``, started with ``--port`` and waited for until ``READY``."""

    def __init__(self, script: str = "backends.py", port: int = 0):
        self.script = SUPPORT_DIR / script
        self.requested_port = port
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "BackendProcess":
        port = self.requested_port or self.port or 0
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        line = _readline_within(self.proc, timeout)
        if not line.startswith("READY "):
            self.kill()
            raise RuntimeError(f"{self.script.name} did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the kernel closes its sockets, nothing is flushed or said."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


def _readline_within(proc: subprocess.Popen, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""


def main() -> None:
    parser = argparse.ArgumentParser(description="misbehaving backend for sandbox-proxy tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    async def run() -> None:
        server = await serve(args.host, args.port, new_state())
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
