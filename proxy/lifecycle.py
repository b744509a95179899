"""Lifecycle: how exchanges and client connections end.

The proxy's own answers (rendered by proxy/errors.py), finishing an exchange and starting the
next pipelined one, closing with a linger (so an answer is not destroyed by a reset), the
per-sandbox slot, deadlines (header and idle timeouts, liveness probes of paused clients), drain
on shutdown, and the accounting of every exchange exactly once (metrics, access log).
Mixed into ClientConnection (proxy/edge.py), whose attributes it uses.
"""

from __future__ import annotations

from time import monotonic

from proxy import errors
from proxy.exchange import Exchange
from proxy.flow import PEER_FULL, WAITING_TURN, WAITING_UPSTREAM, peer_closed

LINGER_SECONDS = 2.0        # reading (and discarding) after our answer before a hard close
PROBE_SECONDS = 1.0         # how often a client paused by a full backend is checked for life


class ExchangeLifecycle:
    __slots__ = ()

    # -- answers the proxy makes itself -------------------------------------------------------
    def answer(self, ex: Exchange, error: errors.ProxyError) -> None:
        # A body still coming is not waited for: answer, then linger-close.
        close = (error.close or not ex.keep_alive or ex.close_after or self.ctx.draining
                 or (ex.has_body and not ex.request_done))
        status = error.status
        if ex.method == b"OPTIONS" and error.status >= 400 and not isinstance(
                error, errors.BadRequest) and ex.header(b"access-control-request-method"):
            # A CORS preflight nobody else can answer: let the browser send the real request,
            # whose answer (ours, with CORS) it can then read. Preflights that reach a live
            # sandbox are the sandbox's to answer.
            status = 204
            self.out.append(errors.render_preflight(ex.header(b"access-control-request-headers"),
                                                    close=close))
        else:
            self.out.append(errors.render_error(
                error, html_page=ex.wants_html(), head_only=ex.method == b"HEAD", close=close))
        self.flush_out()
        self.record_response(ex, status, "http", "proxy")
        ex.outcome = type(error).__name__
        ex.response_started = True
        if close:
            ex.response_done = True
            self.exchange_ended(ex)
            self.linger_close()
        else:
            self.response_done(ex)

    def record_response(self, ex: Exchange, status: int, protocol: str,
                        origin: str = "backend") -> None:
        ex.status = status
        ex.protocol = protocol
        stats = self.ctx.stats
        stats.response(status, ex.method, protocol, origin)
        if ex.started:
            stats.response_duration.observe(monotonic() - ex.started)

    def exchange_ended(self, ex: Exchange) -> None:
        """Account for an exchange once, however it ended: counters and the access log."""
        if ex.ended:
            return
        ex.ended = True
        ctx = self.ctx
        stats = ctx.stats
        stats.request_bytes += ex.bytes_in
        stats.response_bytes += ex.bytes_out
        duration = monotonic() - ex.started if ex.started else 0.0
        if ex.protocol == "sse":
            stats.stream_duration["sse"].observe(duration)
        if ctx.access_log.enabled:
            ctx.access_log.record(self.client_ip, ex.method, ex.host, ex.sandbox_id, ex.port,
                                  ex.target, ex.status, ex.bytes_in, ex.bytes_out, duration,
                                  ex.connect_time, ex.outcome, ex.protocol)

    def linger_close(self) -> None:
        """Send FIN after the answer, keep reading (and dropping) briefly, then close.

        Closing a socket with unread input makes the kernel send RST, which can destroy the
        answer before the client reads it.
        """
        self.flush_out()
        self.closing = self.lingering = True
        self.active = self.queued = None
        self.release_slot()
        self.gate.reasons = 0
        if not self.transport.is_closing():
            self.transport.resume_reading()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()
        self.deadline = self.loop.time() + LINGER_SECONDS

    def release_slot(self) -> None:
        if self.slot is not None:
            self.ctx.give_slot(self.slot)
            self.slot = None

    def finish(self, ex: Exchange) -> None:
        """The exchange is complete both ways: serve the next pipelined request or wait."""
        self.exchange_ended(ex)
        self.active = None
        self.release_slot()
        if ex.close_after or self.closing:
            self.linger_close()
            return
        if ex is self.upgrading:  # refused: what followed the upgrade request is HTTP again
            self.release_held()
            return
        queued = self.queued
        if queued:
            nxt = self.active = queued.popleft()
            if not queued and self.pending_error is None:
                self.gate.resume(WAITING_TURN)
            if nxt.method:  # its head is complete
                if self.feeding:
                    self.ready = nxt  # llhttp has not finished with this read yet
                else:
                    self.dispatch(nxt)
        elif self.pending_error is not None:
            error, self.pending_error = self.pending_error, None
            self.answer(Exchange(), error)  # a BadRequest: it closes
        elif self.in_head and not self.head_bytes:
            self.deadline = self.loop.time() + self.ctx.client_idle_timeout

    # -- timeouts and shutdown ----------------------------------------------------------------
    def on_deadline(self) -> None:
        if self.probing:
            if not self.gate.reasons & PEER_FULL:
                self.probing = False
                return
            ex = self.active
            mid_request = self.tunnel is None and ex is not None and not ex.request_done
            if peer_closed(self.transport, half_close_counts=mid_request):
                self.transport.abort()  # connection_lost releases the backend connection
            else:
                self.deadline = self.loop.time() + PROBE_SECONDS
            return
        if self.lingering or self.active is None and not self.head_bytes:
            self.closing = True
            self.transport.close()  # linger over, or idle keep-alive / silent new connection
        elif self.in_head:
            ex = self.active or Exchange()
            ex.close_after = True
            self.answer(ex, errors.RequestTimeout("Request header timed out"))

    def drain(self) -> None:
        """Shutting down: finish the exchange under way, then close; close idle ones now."""
        if self.tunnel is not None:
            return  # tunnels get until the drain timeout
        if self.active is None and not self.head_bytes:
            self.closing = True
            self.transport.close()
        elif self.active is not None:
            self.active.close_after = True
