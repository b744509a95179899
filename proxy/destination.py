"""The declared interfaces of the request path: what the backend side may call on a response's
destination, and what an exchange may call on the client connection it belongs to.

`UpstreamConnection` (proxy/upstream.py) parses a backend's response and hands each event to the
`ResponseDestination` it is bound to; it knows nothing else about the client. An HTTP/1.1
exchange (proxy/exchange.py) is one destination; an HTTP/2 stream can be another without
upstream.py changing. `ClientSide` is the narrow view an HTTP/1.1 exchange has of its client
connection (proxy/edge.py). A type checker holds both sides to these declarations.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.context import EdgeContext
    from proxy.exchange import Exchange
    from proxy.upstream import UpstreamConnection


class ResponseDestination(Protocol):
    """Where a backend's response goes. Called by the UpstreamConnection bound to it, in order:
    `response_head` (once per interim 1xx, then once for the final head), `response_body` for
    each piece of body, `response_complete`; or `upstream_lost` / `upstream_timed_out` at any
    point; or `upstream_upgraded` after a 101. `flush` ends each read from the backend (one write
    for everything it produced); `upstream_full` / `upstream_drained` report the backend's send
    buffer crossing its high-water marks (backpressure on the request body)."""

    def response_head(self, up: UpstreamConnection, status: int) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_complete(self, up: UpstreamConnection) -> None: ...
    def upstream_lost(self, up: UpstreamConnection) -> None: ...
    def upstream_timed_out(self, up: UpstreamConnection) -> None: ...
    def upstream_upgraded(self, up: UpstreamConnection, rest: bytes) -> None: ...
    def upstream_full(self) -> None: ...
    def upstream_drained(self) -> None: ...
    def flush(self) -> None: ...


class Gate(Protocol):
    """Stops the client's request bytes while any reason (proxy/flow.py's bits) is set: a
    paused socket (HTTP/1.1, flow.ReadGate) or withheld flow-control credit (an HTTP/2 stream,
    h2_stream.StreamGate)."""

    def pause(self, reason: int) -> None: ...
    def resume(self, reason: int) -> None: ...


class ClientSide(Protocol):
    """What an exchange uses of its client: an HTTP/1.1 connection (proxy/edge.py) or an HTTP/2
    stream (proxy/h2_stream.py)."""

    ctx: EdgeContext
    loop: asyncio.AbstractEventLoop

    @property
    def gate(self) -> Gate: ...

    out: list[bytes]         # bytes for the client, written by flush_out in one writelines
    client_ip: bytes
    trusted: bool
    writing_paused: bool     # the client's write buffer is full: backends must stop reading
    closed: bool

    def flush_out(self) -> None: ...
    def exchange_done(self, ex: Exchange) -> None:
        """Both halves of `ex` are complete: account for it, serve the next request."""
    def linger_close(self) -> None:
        """Send FIN after what was written, drop further input briefly, then close."""
    def abort_response(self, hard: bool) -> None:
        """The response cannot be completed: make the client see it incomplete (`hard`: RST, for
        a body delimited by the close; else FIN, for a framed one)."""
    def upstream_full(self) -> None: ...
    def upstream_drained(self) -> None: ...
    def start_tunnel(self, ex: Exchange, up: UpstreamConnection, rest: bytes) -> None:
        """After a 101: relay raw bytes both ways from now on."""
