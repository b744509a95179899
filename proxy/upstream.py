"""Upstream: one connection to a sandbox backend.

An `UpstreamConnection` is an asyncio Protocol that parses the backend's responses with llhttp and
hands each event to the ResponseDestination it is bound to (proxy/destination.py: an HTTP/1.1
exchange today; nothing here knows what kind); after a 101 it becomes one half of a raw byte
tunnel. Between responses it rests in its pool (proxy/pools.py); a response nobody asked for
closes it instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

if TYPE_CHECKING:
    from proxy.destination import ResponseDestination
    from proxy.pools import UpstreamPool
    from proxy.tunnel import Tunnel

log = logging.getLogger("sandbox_proxy.upstream")

# What a lost connection's `parser` becomes: the real one refers back to the protocol.
_CLOSED_PARSER = HttpResponseParser(object())


class UnsolicitedResponse(Exception):
    """The backend sent response bytes that no request of this connection asked for."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "client", "tunnel", "tunnel_peer", "status_reason",
                 "headers", "trailers", "deadline", "reused", "responded", "closed",
                 "reading_paused", "head_seen", "tunnel_out", "quiet_bytes",
                 "body_left", "feeding", "parked")

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        # set by connection_made: create_connection hands out only connected instances
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = HttpResponseParser(self)
        self.client: ResponseDestination | None = None  # bound while serving one response
        self.tunnel: Tunnel | None = None  # after a 101
        self.tunnel_peer: asyncio.Transport | None = None  # the client's, after a 101
        self.status_reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.deadline = 0.0
        self.reused = False
        self.responded = False  # some byte of the current response has arrived
        self.closed = False
        self.reading_paused = False
        self.head_seen = False
        self.tunnel_out = 0  # bytes relayed to the client after a 101
        # Bytes received since the response last made progress (head complete, body bytes):
        # a head or trailer section is bounded by `pools.max_head_bytes`, so a backend that
        # never ends one cannot make the proxy buffer without end.
        self.quiet_bytes = 0
        # Content-Length body bytes still to come once the body has started: they are relayed
        # as they arrive, without parsing or copying them (see relay_body).
        self.body_left = 0
        # One read from the backend is handled whole before the connection may serve another
        # request: a response that completes mid-read is `parked` instead of pooled, and pooled
        # only if nothing followed it in that read. Bytes after a complete response are a
        # response nobody asked for (it would answer the next client's request): the connection
        # is closed instead (RFC 9112 9.3.2 pairs responses with requests by order alone).
        self.feeding = False
        self.parked = False

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.pool.members.add(self)
        self.pool.pools.register(self.pool)  # again: it may have been dropped while connecting
        self.pool.pools.sweeper.watched.add(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel_peer is not None:
            self.tunnel_out += len(data)
            self.tunnel_peer.write(data)
            return
        client = self.client
        if client is None:  # an idle backend must not speak; drop the connection
            self.close()
            return
        self.feeding = True
        try:
            if self.body_left:
                self.relay_body(client, data)
                return
            self.responded = True
            self.quiet_bytes += len(data)
            self.parser.feed_data(data)
            if self.quiet_bytes > self.pool.pools.max_head_bytes:
                log.warning("backend %s:%s of %s sent more than %d bytes of response head or "
                            "trailers", self.pool.host, self.pool.port, self.pool.sandbox_id,
                            self.pool.pools.max_head_bytes)
                if self.client is not None:
                    self.client.upstream_lost(self)
                self.abort()
        except HttpParserUpgrade as exc:
            client.upstream_upgraded(self, data[exc.args[0]:])
        except HttpParserError as exc:
            if isinstance(exc.__context__, UnsolicitedResponse):
                self.log_unsolicited()
            else:
                log.info("invalid response from %s:%s: %s", self.pool.host, self.pool.port, exc)
            if self.client is not None:
                self.client.upstream_lost(self)
            self.close()
        finally:
            client.flush()  # one write for everything this read produced
            self.feeding = False  # the read is whole: a parked connection may be pooled now
            if self.parked:
                self.parked = False
                self.pool.release(self)

    def log_unsolicited(self) -> None:
        log.warning("backend %s:%s of sandbox %s sent a response nobody asked for; connection "
                    "closed", self.pool.host, self.pool.port, self.pool.sandbox_id)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.upstream_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        self.pool.pools.sweeper.watched.discard(self)
        if self.tunnel is not None:
            self.tunnel.upstream_lost()
        elif self.client is not None:
            self.client.upstream_lost(self)
        self.client = self.tunnel = self.tunnel_peer = None
        self.parser = _CLOSED_PARSER  # break the parser <-> protocol cycle

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_full()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_drained()

    # -- llhttp callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.client is None:
            raise UnsolicitedResponse()
        self.body_left = 0
        self.headers = []
        self.trailers = None
        self.head_seen = False

    def on_status(self, reason: bytes) -> None:
        self.status_reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_seen:
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name, value))
        else:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_seen = True
        self.quiet_bytes = 0
        if self.client is None:
            raise UnsolicitedResponse()
        self.client.response_head(self, self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.quiet_bytes = 0
        if self.client is None:  # e.g. body bytes after a HEAD response, or an abandoned one
            raise UnsolicitedResponse()
        if self.body_left:
            self.body_left -= len(body)
        self.client.response_body(body)

    def relay_body(self, client: ResponseDestination, data: bytes) -> None:
        """Content-Length body bytes after the first read: no llhttp, no copy. The parser,
        which still expects them, is replaced when the body ends."""
        left = self.body_left
        self.quiet_bytes = 0
        if len(data) < left:
            self.body_left = left - len(data)
            client.response_body(data)
        else:
            self.body_left = 0
            client.response_body(data if len(data) == left else data[:left])
            self.parser = HttpResponseParser(self)
            if len(data) > left:  # bytes after the response nobody asked for
                self.log_unsolicited()
                self.close()  # before the exchange ends: it must not go back to the pool
            client.response_complete(self)

    def on_message_complete(self) -> None:
        if self.client is not None:
            self.client.response_complete(self)

    # -- used by the client side --------------------------------------------------------------
    def on_deadline(self) -> None:
        if self.client is not None:
            self.client.upstream_timed_out(self)
        self.close()

    def skip_response_body(self) -> None:
        """The response has no body whatever its headers say (HEAD): parse the next one fresh."""
        self.parser = HttpResponseParser(self)

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
