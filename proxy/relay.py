"""Relay: the response half of a client connection, called by the bound UpstreamConnection.

It turns the backend's response head into the client's (hop-by-hop headers stripped, framing
chosen for the client: Content-Length kept, chunked re-framed, read-until-close re-chunked for
HTTP/1.1 clients), relays 1xx interim answers, writes body bytes as they arrive, ends the exchange
and returns the backend connection to its pool when both sides allow. A backend that dies
mid-response makes the client see an incomplete response, never a complete-looking one; after a
101 it hands both connections to a Tunnel.

Everything produced while handling one read from the backend is collected in `out` and written
with one writelines (one writev): a small response costs one send, not one for its head and
another for its body. Anything written to the client directly calls `flush_out` first, so bytes
never overtake each other.
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import TYPE_CHECKING

from proxy import errors
from proxy.connect_rpc import EnvelopeTracker, end_stream_unavailable
from proxy.exchange import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, Exchange
from proxy.flow import WAITING_UPSTREAM, reset
from proxy.headers import MalformedHeaders, scan_response_headers, trailer_lines
from proxy.tunnel import Tunnel

if TYPE_CHECKING:
    from proxy.upstream import UpstreamConnection

log = logging.getLogger("sandbox_proxy.relay")


class ResponseRelay:
    """Mixed into ClientConnection (proxy/edge.py), whose attributes it uses."""

    __slots__ = ()

    def response_head(self, up: "UpstreamConnection", status: int) -> None:
        ex: Exchange = self.active
        try:
            scanned = scan_response_headers(
                up.headers, ex.host if self.ctx.isolate_cookies and status >= 200 else None)
        except (MalformedHeaders, ValueError) as exc:
            self.response_invalid(ex, up, str(exc))
            return
        if status < 200 and status != 101:
            if ex.http11:  # interim (100 Continue, 103 Early Hints): relay, keep waiting
                self.out.append(b"HTTP/1.1 %d %s\r\n%s\r\n"
                                % (status, up.status_reason, b"".join(scanned.lines)))
            up.head_seen = False
            return
        up.deadline = 0.0
        ex.response_started = True
        ex.status = status
        head = [b"HTTP/1.1 %d %s\r\n" % (status, up.status_reason)]
        head += scanned.lines
        if status == 101:
            if ex.upgrade is None or scanned.upgrade is None:
                ex.response_started = False
                self.upstream_lost(up)  # a 101 nobody asked for: the backend is broken
                up.close()
                return
            head.append(b"Connection: Upgrade\r\nUpgrade: " + scanned.upgrade + b"\r\n\r\n")
            self.out.append(b"".join(head))
            self.record_response(ex, 101, "websocket" if scanned.upgrade.strip().lower()
                                 == b"websocket" else "tunnel")
            return
        ex.upstream_reusable = ex.upgrade is None and up.parser.should_keep_alive()
        # The client's framing, chosen here and written here (RFC 9112 6.3): the backend's
        # Content-Length and Transfer-Encoding were never among the copied lines.
        if ex.method == b"HEAD" or status == 204 or status == 304:
            mode = BODY_NONE
            if scanned.content_length and status != 204:  # what a GET would have had (9110 8.6)
                head.append(b"Content-Length: %d\r\n" % scanned.length)
        elif scanned.content_length and not scanned.chunked and not scanned.codings:
            mode = BODY_LENGTH
            up.body_left = scanned.length  # the rest of the body bypasses the parser
            head.append(b"Content-Length: %d\r\n" % scanned.length)
        else:
            ex.upstream_until_close = not scanned.chunked
            if not ex.http11:
                if scanned.codings:  # an HTTP/1.0 client cannot be sent a transfer coding
                    ex.response_started = False
                    self.response_invalid(ex, up, "transfer coding for an HTTP/1.0 client")
                    return
                mode = BODY_UNTIL_CLOSE
            else:
                mode = BODY_CHUNKED
                head.append(b"Transfer-Encoding: " + scanned.codings + b", chunked\r\n"
                            if scanned.codings else b"Transfer-Encoding: chunked\r\n")
        ex.body_mode = mode
        if scanned.connect_stream and mode == BODY_CHUNKED and not ex.upstream_until_close:
            ex.envelopes = EnvelopeTracker()
        if not ex.keep_alive or mode == BODY_UNTIL_CLOSE or ex.close_after or self.ctx.draining:
            ex.close_after = True
            head.append(b"Connection: close\r\n\r\n")
        elif not ex.http11:
            head.append(b"Connection: keep-alive\r\n\r\n")
        else:
            head.append(b"\r\n")
        self.out.append(b"".join(head))
        self.record_response(ex, status, "sse" if scanned.event_stream else "http")
        if ex.method == b"HEAD":
            up.skip_response_body()
            self.response_complete(up)

    def response_invalid(self, ex: Exchange, up: "UpstreamConnection", reason: str) -> None:
        """A response head the proxy will not relay: the client gets a 502, the backend
        connection is dropped."""
        log.info("invalid response from %s:%s of sandbox %s: %s", up.pool.host, up.pool.port,
                 up.pool.sandbox_id, reason)
        self.unbind(ex, up, reuse=False)
        ex.outcome = "upstream_invalid"
        self.answer(ex, errors.UpstreamInvalid(ex.sandbox_id, ex.port))

    def response_body(self, body: bytes) -> None:
        ex = self.active
        ex.bytes_out += len(body)
        if ex.envelopes is not None:
            ex.envelopes.feed(body)
        if ex.body_mode == BODY_CHUNKED:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def response_complete(self, up: "UpstreamConnection") -> None:
        ex = self.active
        if ex is None or not ex.response_started or ex.status == 101 or ex.response_done:
            return  # an interim response ended, or the tunnel takes over
        if ex.body_mode == BODY_CHUNKED:
            trailers = trailer_lines(up.trailers) if up.trailers else b""
            self.out.append(b"0\r\n" + trailers + b"\r\n")
        self.unbind(ex, up, reuse=ex.upstream_reusable and ex.request_done)
        self.response_done(ex)

    def flush_out(self) -> None:
        out = self.out
        if out:
            self.out = []
            if not self.transport.is_closing():
                self.transport.writelines(out)

    def response_done(self, ex: Exchange) -> None:
        ex.response_done = True
        if ex.request_done:
            self.finish(ex)
        else:
            ex.discard = True  # answered early: read and drop the rest of the request body

    def unbind(self, ex: Exchange, up: "UpstreamConnection", reuse: bool) -> None:
        ex.upstream = None
        if self.upstream is up:
            self.upstream = None
        self.upstream_drained()  # a full backend no longer holds the client back
        if reuse:
            up.pool.release(up)
        else:
            up.client = None
            up.close()

    def upstream_lost(self, up: "UpstreamConnection") -> None:
        """The backend connection closed (or broke) while bound to the active exchange."""
        if self.tunnel is not None:
            self.tunnel.upstream_lost()
            return
        ex = self.active
        if ex is None or ex.upstream is not up:
            return
        ex.upstream = None
        self.upstream = None
        up.client = None
        if ex.response_done:
            return
        if ex.response_started:
            if ex.upstream_until_close:  # EOF is how this body ends
                if ex.body_mode == BODY_CHUNKED:
                    self.out.append(b"0\r\n\r\n")
                self.flush_out()
                self.response_done(ex)
            elif ex.envelopes is not None and ex.envelopes.at_boundary:
                # A Connect stream cut between envelopes: end it as Connect clients expect
                # (an `unavailable` error they retry), then end the chunked body cleanly.
                ex.outcome = "upstream_closed"
                if not ex.envelopes.ended:
                    frame = end_stream_unavailable("The sandbox closed the connection")
                    self.out += (b"%x\r\n" % len(frame), frame, b"\r\n")
                self.out.append(b"0\r\n\r\n")
                self.flush_out()
                self.response_done(ex)
            else:
                ex.outcome = "upstream_closed"
                self.exchange_ended(ex)
                self.flush_out()
                if ex.body_mode == BODY_UNTIL_CLOSE:
                    reset(self.transport)  # a FIN would look like a complete body
                else:
                    self.closing = True
                    self.transport.close()  # fewer bytes than framed: the client sees it
            return
        if up.reused and ex.retryable and not ex.retried:
            ex.retried = True  # a pooled connection the backend had already closed
            self.ctx.stats.retries += 1
            self.connect_to_backend(ex, fresh=True)
            return
        self.answer(ex, errors.UpstreamClosed(ex.sandbox_id, ex.port))

    def upstream_timed_out(self, up: "UpstreamConnection") -> None:
        ex = self.active
        if ex is None or ex.upstream is not up or ex.response_started:
            return
        self.unbind(ex, up, reuse=False)
        self.answer(ex, errors.UpstreamTimeout(ex.sandbox_id, ex.port))

    def upstream_upgraded(self, up: "UpstreamConnection", rest: bytes) -> None:
        """The backend answered 101: from now on both sides are raw byte streams."""
        ex = self.active
        if ex is None or ex.upstream is not up or ex.status != 101:
            up.close()
            return
        ex.response_done = True
        ex.started = monotonic()  # from here on it measures the stream's lifetime
        self.tunnel = Tunnel(self, up)
        self.tunnel_peer = up.transport
        up.tunnel_peer = self.transport
        self.deadline = up.deadline = 0.0
        if rest:
            self.out.append(rest)
        self.flush_out()
        early, self.held = self.held, None
        self.upgrading = None
        for data in early or ():
            if data:
                up.transport.write(data)
        self.gate.resume(WAITING_UPSTREAM)

    def tunnel_eof_from_upstream(self) -> bool | None:
        return self.tunnel.upstream_eof() if self.tunnel is not None else False
