"""Edge listener: accepts client connections (plain, TLS, and/or behind a PROXY protocol header)
and hands each to a ClientConnection.

Without the PROXY protocol, asyncio's own server accepts (with TLS when configured). With it, an
accept loop peeks at each new socket until the whole PROXY header has arrived, consumes exactly
that many bytes and only then lets the event loop (and TLS, for passed-through TCP) take the
socket, so no byte of the client's own stream is lost. A connection without a valid header, or
whose header does not arrive within `timeouts.client_header`, is closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from proxy.context import EdgeContext
from proxy.edge import ClientConnection
from proxy.proxy_protocol import MAX_HEADER, ProxyHeaderError, parse_proxy_header

log = logging.getLogger("sandbox_proxy.listener")


class EdgeListener:
    def __init__(self, ctx: EdgeContext, sock: socket.socket, ssl_context: ssl.SSLContext | None,
                 proxy_protocol: bool):
        self.ctx = ctx
        self.sock = sock
        self.ssl_context = ssl_context
        self.proxy_protocol = proxy_protocol
        self._server: asyncio.base_events.Server | None = None
        self._accepting: asyncio.Task | None = None
        self._handshakes: set[asyncio.Task] = set()

    async def start(self) -> None:
        loop = self.ctx.loop
        if not self.proxy_protocol:
            self._server = await loop.create_server(
                lambda: ClientConnection(self.ctx), sock=self.sock, ssl=self.ssl_context,
                backlog=self.ctx.config.server.backlog)
        else:
            self._accepting = loop.create_task(self._accept_loop())

    def close(self) -> None:
        """Stop accepting (connections already accepted carry on)."""
        if self._server is not None:
            self._server.close()
        if self._accepting is not None:
            self._accepting.cancel()
            self.sock.close()
        for task in list(self._handshakes):
            task.cancel()

    async def _accept_loop(self) -> None:
        loop = self.ctx.loop
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._take_over(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _take_over(self, conn: socket.socket) -> None:
        loop = self.ctx.loop
        conn.setblocking(False)
        try:
            async with asyncio.timeout(self.ctx.client_header_timeout):
                consumed, source = await self._read_proxy_header(conn)
            conn.recv(consumed)  # exactly the header: the client's bytes stay in the socket
            await loop.connect_accepted_socket(
                lambda: ClientConnection(self.ctx, client_ip=source), conn,
                ssl=self.ssl_context)
        except (ProxyHeaderError, TimeoutError, OSError, ssl.SSLError) as exc:
            log.info("refused edge connection: %s", exc or type(exc).__name__)
            conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise

    async def _read_proxy_header(self, conn: socket.socket) -> tuple[int, str | None]:
        loop = self.ctx.loop
        seen = 0
        while True:
            await _readable(loop, conn)
            data = conn.recv(MAX_HEADER, socket.MSG_PEEK)
            if not data:
                raise ProxyHeaderError("closed before the PROXY header")
            parsed = parse_proxy_header(data)
            if parsed is not None:
                consumed, source = parsed
                return consumed, source
            if len(data) == seen:  # nothing new yet: wait a little instead of spinning
                await asyncio.sleep(0.005)
            seen = len(data)


def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> asyncio.Future:
    future = loop.create_future()
    fd = conn.fileno()

    def ready() -> None:
        loop.remove_reader(fd)
        if not future.done():
            future.set_result(None)

    loop.add_reader(fd, ready)
    future.add_done_callback(lambda _: loop.remove_reader(fd))
    return future
