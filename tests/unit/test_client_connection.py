"""ClientConnection driven through fake transports: parsing, routing, ordering, upgrades,
deadlines and backpressure, without a socket (tests/unit/fakes.py)."""

from __future__ import annotations

import socket

import pytest

from proxy.edge import HEADER_DUE, IDLE_DUE, LINGER_DUE, NO_DEADLINE, PROBE_DUE
from proxy.exchange import BODY, HEAD, RECEIVED, SENT, TUNNEL, WAITING
from proxy.flow import PEER_FULL, WAITING_TURN, WAITING_UPSTREAM

from .fakes import (
    FakeTransport,
    connect_client,
    expire,
    open_edge,
    request,
    response,
    status_of,
    tick,
)

WS_HEADERS = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
              ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]
SWITCH = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


# -- a request goes where it is routed, as built ------------------------------------------------

async def test_get_is_routed_and_backend_receives_exactly_the_built_head(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("GET", "/path?q=1", headers=[("Accept", "text/plain"),
                                                 ("Connection", "keep-alive")]))
    ex = e.exchange
    assert ex.sandbox_id == "demo" and ex.port == 3000
    assert b.transport.writes == [ex.upstream_head]
    assert b.transport.calls == ["write"]
    assert ex.upstream_head == (
        b"GET /path?q=1 HTTP/1.1\r\nHost: 3000-demo.localhost\r\nAccept: text/plain\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: 3000-demo.localhost\r\n\r\n")
    assert b.up.client is ex and ex.upstream is b.up
    assert e.transport.writes == []  # nothing answered yet


async def test_head_split_across_reads_is_started_once_complete(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    raw = request("GET", "/split")
    for i in range(len(raw) - 1):
        e.send(raw[i:i + 1])
    assert b.transport.writes == []
    assert e.conn.deadline_kind == HEADER_DUE
    e.send(raw[-1:])
    assert b.transport.data.startswith(b"GET /split HTTP/1.1\r\n")
    assert e.conn.deadline_kind == NO_DEADLINE


async def test_response_read_reaches_the_client_in_one_writelines(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    b.send(response(body=b"hello world", headers=[("X-App", "1")]))
    assert e.transport.calls == ["writelines"]
    assert e.transport.writes == [
        b"HTTP/1.1 200 OK\r\nX-App: 1\r\nContent-Length: 11\r\n\r\nhello world"]


async def test_response_body_in_later_reads_is_relayed_as_it_comes(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123")
    b.send(b"456")
    assert e.transport.writes[1:] == [b"456"]
    assert len(e.records) == 0
    b.send(b"789")
    assert e.transport.data.endswith(b"\r\n\r\n0123456789")
    assert len(e.transport.writes) == 3  # one write per backend read
    assert len(e.records) == 1 and b.pool.idle == [b.up]


async def test_unknown_sandbox_is_answered_without_any_backend(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request(host=b"3000-nosuch.localhost"))
    assert status_of(e.transport.data) == 502
    assert b.transport.writes == []
    assert e.records[0]["outcome"] == "SandboxNotFound"
    assert e.conn.deadline_kind == IDLE_DUE  # a 502 of ours keeps the connection


# -- pipelining: the front request only, answers in order ---------------------------------------

async def test_pipelined_requests_start_one_at_a_time_and_are_answered_in_order(tmp_path):
    e = open_edge(tmp_path)
    b1, b2, b3 = e.seed(3)
    e.send(request("GET", "/1") + request("GET", "/2") + request("GET", "/3"))
    assert b1.transport.data.startswith(b"GET /1 ")
    assert b2.transport.writes == [] and b3.transport.writes == []
    assert e.conn.gate.reasons & WAITING_TURN and not e.transport.reading
    assert len(e.conn.queued) == 2

    b1.send(response(body=b"one"))
    # /2 starts on the next pooled connection only now; b1 is still mid-read (parked)
    assert b2.transport.data.startswith(b"GET /2 ")
    assert b3.transport.writes == []
    b2.send(response(body=b"two"))
    assert b1.transport.data.count(b"GET ") == 2  # b1 went back to the pool and took /3
    assert b1.transport.data.split(b"\r\n\r\n")[1].startswith(b"GET /3 ")
    b1.send(response(body=b"three"))
    assert [w[-5:] for w in e.transport.writes] == [b"\r\none", b"\r\ntwo", b"three"]
    assert [r["target"] for r in e.records] == [b"/1", b"/2", b"/3"]
    assert e.conn.gate.reasons == 0 and e.transport.reading


async def test_pipelined_request_behind_a_slow_response_waits(tmp_path):
    e = open_edge(tmp_path)
    b1, b2 = e.seed(2)
    e.send(request("GET", "/1"))
    e.send(request("GET", "/2"))
    b1.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert b2.transport.writes == []
    b1.send(b"cd")
    assert b2.transport.data.startswith(b"GET /2 ")


async def test_malformed_bytes_after_a_complete_request_are_answered_after_it(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("GET", "/ok") + b"NOT HTTP AT ALL\r\n\r\n")
    assert b.transport.data.startswith(b"GET /ok ")
    assert e.transport.writes == []  # the 400 waits for the answer in front of it
    b.send(response(body=b"fine"))
    first, _, second = e.transport.data.partition(b"fine")
    assert status_of(first) == 200
    assert status_of(second) == 400 and b"Connection: close\r\n" in second
    assert [r["status"] for r in e.records] == [200, 400]


# -- what llhttp refuses never reaches a backend -----------------------------------------------

async def test_head_refused_after_headers_complete_is_never_started(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    # llhttp calls on_headers_complete (the exchange is ready, with the 501 routing decided),
    # then refuses the Transfer-Encoding value: llhttp's 400 answers it, the exchange is never
    # started (which would answer its own 501 first).
    e.send(b"POST /x HTTP/1.1\r\nHost: 3000-demo.localhost\r\n"
           b"Transfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n")
    assert b.transport.writes == [] and b.transport.calls == []
    assert b.pool.idle == [b.up] and b.up.client is None
    assert e.transport.data.startswith(b"HTTP/1.1 400 ")
    assert b"Transfer-Encoding" in e.transport.data
    (rec,) = e.records
    assert (rec["method"], rec["status"]) == (b"POST", 400)  # the head was complete
    assert e.transport.eof_written and e.conn.deadline_kind == LINGER_DUE


async def test_routed_head_with_a_bad_first_chunk_never_reaches_the_backend(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(b"POST /x HTTP/1.1\r\nHost: 3000-demo.localhost\r\n"
           b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n")
    assert b.transport.writes == [] and b.up.client is None
    assert status_of(e.transport.data) == 400
    (rec,) = e.records
    assert rec["sandbox_id"] == "demo"  # it was parsed and routed: only llhttp said no


async def test_head_larger_than_the_limit_is_431(tmp_path):
    e = open_edge(tmp_path, config={"limits": {"max_header_bytes": 1024}})
    (b,) = e.seed()
    e.send(request(headers=[("X-Big", "a" * 2000)]))
    assert status_of(e.transport.data) == 431
    assert b.transport.writes == []


async def test_bytes_after_a_close_answer_are_dropped(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(b"BROKEN\r\n\r\n")
    assert status_of(e.transport.data) == 400
    before = list(e.transport.writes)
    e.send(request())
    assert e.transport.writes == before and b.transport.writes == []


# -- upgrades: what follows is held until the answer is known ----------------------------------

async def test_upgrade_refused_with_426_parses_the_held_bytes(tmp_path):
    e = open_edge(tmp_path)
    b1, b2 = e.seed(2)
    e.send(request("GET", "/ws", headers=WS_HEADERS) + request("GET", "/after"))
    assert e.conn.feed == e.conn.feed_held
    assert e.conn.gate.reasons & WAITING_UPSTREAM and not e.transport.reading
    assert b1.transport.data.startswith(b"GET /ws ") and b"GET /after" not in b1.transport.data
    assert b2.transport.writes == []

    b1.send(response(426, b"", "Upgrade Required"))
    assert b1.transport.closed  # an upgrade's connection is never pooled
    assert b2.transport.data.startswith(b"GET /after ")  # parsed as HTTP, on another connection
    assert e.conn.feed is None and e.conn.upgrading is None
    b2.send(response(body=b"after"))
    assert [status_of(w) for w in e.transport.writes] == [426, 200]
    assert [r["status"] for r in e.records] == [426, 200]


async def test_upgrade_accepted_with_101_sends_the_held_bytes_raw(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("GET", "/ws", headers=WS_HEADERS) + b"\x81\x02hi")
    e.send(b"GET /not-parsed HTTP/1.1\r\n\r\n")  # held too: raw bytes of the stream
    head_sent = b.transport.data
    assert b"\x81\x02hi" not in head_sent

    b.send(SWITCH + b"\x81\x03srv")
    ex = e.conn.active
    assert ex.response == TUNNEL and e.conn.tunnel is not None
    assert status_of(e.transport.writes[0]) == 101
    assert e.transport.data.endswith(b"\r\n\r\n\x81\x03srv")
    assert b.transport.data == head_sent + b"\x81\x02hi" + b"GET /not-parsed HTTP/1.1\r\n\r\n"
    assert e.transport.reading and e.conn.gate.reasons == 0

    e.send(b"\x81\x05later")
    assert b.transport.writes[-1] == b"\x81\x05later"
    b.send(b"\x81\x04back")
    assert e.transport.writes[-1] == b"\x81\x04back"
    assert len(e.records) == 0  # a stream is accounted for when it ends


async def test_upgrade_answered_by_the_proxy_parses_the_held_bytes(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("GET", "/ws", host=b"3000-nosuch.localhost", headers=WS_HEADERS)
           + request("GET", "/next"))
    assert b.transport.data.startswith(b"GET /next ")
    b.send(response())
    assert [r["status"] for r in e.records] == [502, 200]


async def test_tunnel_backpressure_both_ways(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("GET", "/ws", headers=WS_HEADERS))
    b.send(SWITCH)
    e.transport.fill()
    assert not b.transport.reading
    e.transport.drain()
    assert b.transport.reading
    b.transport.fill()
    assert not e.transport.reading and e.conn.gate.reasons == PEER_FULL
    b.transport.drain()
    assert e.transport.reading


async def test_upgrade_without_a_backend_answer_holds_everything(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("GET", "/ws", headers=WS_HEADERS))
    e.send(request("GET", "/x"))
    assert e.conn.held == [b"", request("GET", "/x")]
    assert b.transport.data.count(b"GET ") == 1


# -- deadlines: one per connection, with its kind -----------------------------------------------

async def test_header_deadline_answers_408(tmp_path):
    e = open_edge(tmp_path)
    e.send(b"GET / HTTP/1.1\r\nHost: 3000-demo.localhost\r\n")
    assert e.conn.deadline_kind == HEADER_DUE
    assert e.conn.deadline == pytest.approx(e.ctx.loop.time() + e.ctx.client_header_timeout,
                                            abs=1.0)
    expire(e.conn)
    assert status_of(e.transport.data) == 408
    assert b"Connection: close\r\n" in e.transport.data
    assert e.transport.eof_written and e.conn.deadline_kind == LINGER_DUE
    assert [r["status"] for r in e.records] == [408]


async def test_partial_pipelined_head_gets_a_header_deadline_once_in_front(tmp_path):
    # BUG (fails today): the partial head came in the read that completed the request in
    # front, so on_headers_complete cleared the deadline, and exchange_done sets none for a
    # queued request whose head is incomplete: the connection stays open with no deadline.
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("GET", "/1") + b"GET /2 HTTP/1.1\r\nHost: 3000-")
    b.send(response())
    assert e.conn.active is not None and e.conn.active.request == HEAD
    assert e.conn.deadline_kind == HEADER_DUE


async def test_header_deadline_of_a_pipelined_head_does_not_answer_the_request_in_front(
        tmp_path):
    # /1 is complete and waits for its backend (upstream_header 60 s): the partial /2 behind it
    # must not arm the header clock (client_header 10 s), whose 408 would answer /1 and leave
    # the backend bound to an answered exchange. /2's clock starts when it reaches the front.
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("GET", "/1"))
    e.send(b"GET /2 HTTP/1.1\r\nHost: 3000-")
    assert e.conn.deadline_kind != HEADER_DUE
    b.send(response(body=b"late"))
    assert status_of(e.transport.data) == 200 and e.transport.data.endswith(b"late")
    assert [(r["target"], r["status"]) for r in e.records][:1] == [(b"/1", 200)]
    assert e.conn.deadline_kind == HEADER_DUE  # now /2 is in front
    expire(e.conn)
    assert b" 408 " in e.transport.data


async def test_header_deadline_on_a_silent_new_connection_just_closes(tmp_path):
    e = open_edge(tmp_path)
    assert e.conn.deadline_kind == HEADER_DUE
    expire(e.conn)
    assert e.transport.writes == [] and e.transport.closed
    assert e.records == []


async def test_idle_deadline_closes_a_kept_alive_connection(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    assert e.conn.deadline_kind == NO_DEADLINE
    b.send(response())
    assert e.conn.deadline_kind == IDLE_DUE
    assert e.conn.deadline == pytest.approx(e.ctx.loop.time() + e.ctx.client_idle_timeout,
                                            abs=1.0)
    writes = list(e.transport.writes)
    expire(e.conn)
    assert e.transport.closed and e.transport.writes == writes
    await tick()
    assert e.transport.lost and e.conn.closed and e.conn not in e.ctx.connections


async def test_linger_deadline_closes_after_a_close_answer(tmp_path):
    e = open_edge(tmp_path)
    e.send(b"BROKEN\r\n\r\n")
    assert e.conn.deadline_kind == LINGER_DUE
    assert e.transport.eof_written and not e.transport.closed
    assert e.transport.reading  # lingering reads (and drops) what comes
    expire(e.conn)
    assert e.transport.closed


async def test_linger_without_half_close_support_closes_at_once(tmp_path):
    e = open_edge(tmp_path, can_write_eof=False)
    e.send(b"BROKEN\r\n\r\n")
    assert not e.transport.eof_written and e.transport.closed


async def _paused_by_full_backend(tmp_path, **transport):
    e = open_edge(tmp_path, **transport)
    (b,) = e.seed()
    e.send(request("POST", "/upload", headers=[("Content-Length", "100")], body=b"x" * 10))
    b.transport.fill()
    return e, b


async def test_probe_deadline_rearms_while_the_client_is_there(tmp_path):
    e, b = await _paused_by_full_backend(tmp_path)
    assert e.conn.gate.reasons & PEER_FULL and not e.transport.reading
    assert e.conn.deadline_kind == PROBE_DUE
    expire(e.conn)
    assert e.conn.deadline_kind == PROBE_DUE and not e.transport.aborted
    b.transport.drain()
    assert e.conn.deadline_kind == NO_DEADLINE and e.transport.reading


async def test_probe_deadline_aborts_when_the_client_is_gone(tmp_path):
    ours, theirs = socket.socketpair()
    try:
        e, b = await _paused_by_full_backend(tmp_path, sock=ours)
        theirs.close()
        expire(e.conn)
        assert e.transport.aborted
        await tick()
        assert b.transport.aborted  # the backend connection is released with it
        (rec,) = e.records
        assert rec["outcome"] == "client_closed"
    finally:
        ours.close()
        theirs.close()


# -- backpressure -------------------------------------------------------------------------------

async def test_full_client_pauses_the_backend_reading(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    e.transport.fill()
    assert not b.transport.reading and b.up.reading_paused
    e.transport.drain()
    assert b.transport.reading and not b.up.reading_paused


async def test_backend_bound_while_the_client_is_full_starts_paused(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.transport.fill()
    e.send(request())
    assert not b.transport.reading
    b.send(response())
    assert b.pool.idle == [b.up] and b.transport.reading  # never pooled paused


async def test_full_backend_pauses_the_client_gate_for_that_reason_only(tmp_path):
    e, b = await _paused_by_full_backend(tmp_path)
    assert e.conn.gate.reasons == PEER_FULL
    b.transport.drain()
    assert e.conn.gate.reasons == 0 and e.transport.reading
    assert e.transport.pauses == 1 and e.transport.resumes == 1


# -- the client goes away -----------------------------------------------------------------------

async def test_client_half_close_while_waiting_gets_the_answer_then_close(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    assert e.conn.eof_received() is True
    b.send(response())
    assert b"Connection: close\r\n" in e.transport.data
    assert e.transport.eof_written and e.conn.deadline_kind == LINGER_DUE


async def test_client_lost_releases_everything(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    parser = e.conn.parser
    e.transport.lose()
    assert b.transport.aborted and b.up.client is None
    assert e.conn not in e.ctx.connections and e.conn not in e.ctx.sweeper.watched
    # the parser <-> protocol cycle is broken: the parser is replaced by one that refers to none
    assert e.conn.active is None and e.conn.parser is not parser
    assert [r["outcome"] for r in e.records] == ["client_closed"]


async def test_request_states_as_the_head_and_body_arrive(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(b"POST /p HTTP/1.1\r\nHost: 3000-demo.localhost\r\nContent-Length: 6\r\n\r\n")
    ex = e.exchange
    assert (ex.request, ex.response) == (BODY, WAITING)
    e.send(b"abc")
    assert e.conn.feed == e.conn.feed_body and e.conn.body_left == 3
    e.send(b"def")
    assert (ex.request, ex.response) == (RECEIVED, WAITING)
    assert e.conn.feed is None
    b.send(response())
    assert (ex.request, ex.response) == (RECEIVED, SENT) and ex.ended


async def test_drain_closes_idle_connections_and_lets_active_ones_finish(tmp_path):
    idle = open_edge(tmp_path)
    idle.conn.drain()
    assert idle.transport.closed
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    e.conn.drain()
    assert not e.transport.closing
    b.send(response())
    assert b"Connection: close\r\n" in e.transport.data and e.transport.eof_written


async def test_connections_over_the_limit_are_answered_503(tmp_path):
    e = open_edge(tmp_path, config={"limits": {"max_connections": 1}})
    extra = connect_client(e.ctx)
    assert status_of(extra.transport.data) == 503
    assert b"Connection: close\r\n" in extra.transport.data
    assert e.transport.writes == []


async def test_fake_transport_delivers_connection_lost_once(tmp_path):
    t = FakeTransport()
    lost = []

    class P:
        def connection_lost(self, exc):
            lost.append(exc)

    t.set_protocol(P())  # type: ignore[arg-type]
    t.close()
    t.abort()
    await tick()
    assert lost == [None]
