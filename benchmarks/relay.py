"""The bare TCP relay: the reference ceiling for any Python proxy design.

A uvloop server that pipes every accepted connection to one fixed target, byte for byte, with
no HTTP parsing, no routing and no header rewriting, only transport flow control (a side whose
peer cannot keep up stops being read) and half-close propagation. Whatever our proxy adds on top
of this is the cost of HTTP. Run as
`python -m benchmarks.relay LISTEN_PORT=TARGET_HOST:TARGET_PORT [...]` (all on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import socket

from benchmarks.wsbackend import run_loop

HIGH_WATER = 256 * 1024


class _Side(asyncio.Protocol):
    """One socket of a relayed pair; `peer` is the other side once both exist."""

    def __init__(self) -> None:
        self.t: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []   # client bytes that arrived before the target connected
        self.eof = False
        self.closed = False

    def connection_made(self, transport) -> None:
        self.t = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.t is None:
            self.pending.append(data)
            return
        peer.t.write(data)

    def eof_received(self):
        self.eof = True
        peer = self.peer
        if peer is not None and peer.t is not None and not peer.closed:
            if peer.eof:  # both directions are finished: nothing left to relay
                peer.t.close()
                self.t.close()
                return False
            if peer.t.can_write_eof():
                peer.t.write_eof()
        return True  # keep our write side open until the peer finishes

    def connection_lost(self, exc) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.t is not None and not peer.closed:
            peer.t.close()

    # Flow control: when our outgoing buffer fills, stop reading from the peer.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.t is not None:
            self.peer.t.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.t is not None and not self.peer.closed:
            self.peer.t.resume_reading()


class _Client(_Side):
    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__()
        self.target = target

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(_Side, *self.target)
        except OSError:
            self.t.close()
            return
        if self.closed:
            upstream.t.close()
            return
        upstream.peer = self
        self.peer = upstream
        for chunk in self.pending:
            upstream.t.write(chunk)
        self.pending.clear()
        if self.eof and upstream.t.can_write_eof():
            upstream.t.write_eof()


async def serve(routes: list[tuple[int, tuple[str, int]]]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for port, target in routes:
        servers.append(await loop.create_server(lambda t=target: _Client(t), "127.0.0.1", port,
                                                backlog=4096, reuse_address=True))
    await asyncio.gather(*(s.serve_forever() for s in servers))


def parse_route(text: str) -> tuple[int, tuple[str, int]]:
    listen, _, target = text.partition("=")
    host, _, port = target.rpartition(":")
    return int(listen), (host or "127.0.0.1", int(port))


def main() -> None:
    ap = argparse.ArgumentParser(description="bare uvloop TCP relay (benchmark reference)")
    ap.add_argument("routes", nargs="+", metavar="LISTEN_PORT=HOST:PORT")
    args = ap.parse_args()
    try:
        run_loop(serve([parse_route(r) for r in args.routes]))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
