"""Tunnel: after a 101, the client and backend connections relay raw bytes both ways.

Nothing parses frames, so WebSocket subprotocols, extensions, ping/pong and close codes are end to
end. The byte copying itself lives in each protocol's read path (one write per read, with the
usual write-buffer backpressure); this class owns how a tunnel ends: a half-close (EOF) is passed
on as a half-close, and when either connection is lost the other is closed after flushing.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.upstream import UpstreamConnection


class TunnelClient(Protocol):
    """The client side of a tunnel (proxy/edge.py's ClientConnection)."""

    transport: asyncio.Transport

    def tunnel_lost(self) -> None:
        """The backend side is gone: stop relaying, close after what was written."""


class Tunnel:
    __slots__ = ("client", "upstream", "client_ended", "upstream_ended")

    def __init__(self, client: TunnelClient, upstream: UpstreamConnection):
        self.client = client
        self.upstream = upstream
        self.client_ended = False
        self.upstream_ended = False

    def client_eof(self) -> bool:
        """The client half-closed: pass it on; keep relaying the other way."""
        self.client_ended = True
        return self._pass_eof(self.upstream.transport)

    def upstream_eof(self) -> bool:
        self.upstream_ended = True
        return self._pass_eof(self.client.transport)

    def _pass_eof(self, to: asyncio.Transport | None) -> bool:
        if self.client_ended and self.upstream_ended:
            self.close()
            return False
        if to is None or to.is_closing() or not to.can_write_eof():
            self.close()
            return False
        to.write_eof()
        return True

    def client_lost(self) -> None:
        up = self.upstream
        up.client = None
        up.tunnel = None
        up.tunnel_peer = None
        up.close()

    def upstream_lost(self) -> None:
        self.client.tunnel_lost()

    def close(self) -> None:
        self.upstream.close()
        if not self.client.transport.is_closing():
            self.client.transport.close()
