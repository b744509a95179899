"""Access log: one line per request or stream, JSON (default) or text, on stdout.

The request path only appends a tuple. Entries are formatted in batches every 50 ms and written
by a daemon thread, so a slow or blocked stdout never stalls the event loop; if the writer falls
more than `MAX_QUEUED_BATCHES` behind, batches are dropped and counted rather than held in
memory. Only the path is logged, never the query string, and no header is logged, so tokens and
cookies never reach the log.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
import threading
import time
from typing import BinaryIO

FLUSH_SECONDS = 0.05
MAX_QUEUED_BATCHES = 200



def _js(text: str) -> str:
    """A JSON string literal; the common case (printable, nothing to escape) costs one scan."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


def _text(text: str) -> str:
    """Printable as is; anything else escaped, so a log line is always one line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class AccessLog:
    def __init__(self, mode: str, loop: asyncio.AbstractEventLoop,
                 stream: BinaryIO | None = None):
        self.enabled = mode != "off"
        self.mode = mode
        self.loop = loop
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.pending: list[tuple] = []
        self.dropped = 0
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stamp_second = -1
        self._stamp_prefix = ""

    def record(self, client_ip: bytes, method: bytes, host: bytes, sandbox_id: str, port: int,
               target: bytes, status: int, bytes_in: int, bytes_out: int, duration: float,
               connect_time: float, outcome: str, protocol: str, http: str = "h1") -> None:
        if not self.pending:
            self.loop.call_later(FLUSH_SECONDS, self.flush)
        self.pending.append((time.time(), client_ip, method, host, sandbox_id, port, target,
                             status, bytes_in, bytes_out, duration, connect_time, outcome,
                             protocol, http))

    def flush(self) -> None:
        entries, self.pending = self.pending, []
        if not entries:
            return
        if self._queue.qsize() >= MAX_QUEUED_BATCHES:
            self.dropped += len(entries)
            return
        data = (self._format_json if self.mode == "json" else self._format_text)(entries)
        if self._thread is None:
            self._thread = threading.Thread(target=self._write, name="access-log", daemon=True)
            self._thread.start()
        self._queue.put(data)

    def close(self) -> None:
        self.flush()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(2.0)

    def _stamp(self, when: float) -> str:
        second = int(when)
        if second != self._stamp_second:
            self._stamp_second = second
            self._stamp_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp_prefix}.{int((when - second) * 1000):03d}Z"

    def _values(self, entry: tuple) -> tuple:
        (when, ip, method, host, sandbox_id, port, target, status, bytes_in, bytes_out,
         duration, connect_time, outcome, protocol, http) = entry
        return (self._stamp(when), ip.decode("latin-1"), method.decode("latin-1"),
                host.decode("latin-1"), sandbox_id, port,
                target.partition(b"?")[0].decode("latin-1"), status, bytes_in, bytes_out,
                duration, connect_time, outcome, protocol, http)

    def _format_json(self, entries: list[tuple]) -> bytes:
        lines = []
        for e in entries:
            (stamp, ip, method, host, sandbox_id, port, path, status, bytes_in, bytes_out,
             duration, connect_time, outcome, protocol, http) = self._values(e)
            lines.append(
                f'{{"time": "{stamp}", "client_ip": "{ip}", "method": {_js(method)}, '
                f'"host": {_js(host)}, "sandbox_id": "{sandbox_id}", "port": {port}, '
                f'"path": {_js(path)}, "status": {status}, "bytes_in": {bytes_in}, '
                f'"bytes_out": {bytes_out}, "duration": {duration:.6f}, '
                f'"connect_time": {connect_time:.6f}, "outcome": "{outcome}", '
                f'"protocol": "{protocol}", "http": "{http}"}}\n')
        return "".join(lines).encode()

    def _format_text(self, entries: list[tuple]) -> bytes:
        lines = []
        for e in entries:
            v = self._values(e)
            lines.append(f'{v[0]} {v[1]} "{v[2]} {_text(v[6])}" {v[7]} in={v[8]} out={v[9]} '
                         f'{v[10]:.6f}s connect={v[11]:.6f}s host={_text(v[3])} '
                         f'sandbox={v[4] or "-"} '
                         f'port={v[5]} {v[12]} {v[13]} {v[14]}\n')
        return "".join(lines).encode()

    def _write(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            try:
                self.stream.write(data)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stdout gone: keep serving
