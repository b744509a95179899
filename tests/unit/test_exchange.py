"""Exchange: the state tables, and every way a request can go ending with `end()` exactly once
(one access log record), driven through fake transports (tests/unit/fakes.py)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from proxy.edge import IDLE_DUE, LINGER_DUE
from proxy.exchange import (
    BODY,
    DISCARDING,
    HEAD,
    RECEIVED,
    SENT,
    STREAMING,
    TUNNEL,
    WAITING,
    Exchange,
    RequestState,
    ResponseState,
    StateError,
)

from .fakes import connect_client, expire, open_edge, request, response, status_of, tick

# The legal transitions, written out independently of proxy/exchange.py's bit masks.
LEGAL_REQUEST = {(HEAD, BODY), (BODY, RECEIVED), (BODY, DISCARDING), (DISCARDING, RECEIVED)}
LEGAL_RESPONSE = {(WAITING, STREAMING), (WAITING, SENT), (STREAMING, SENT), (STREAMING, TUNNEL)}


# -- the state tables ---------------------------------------------------------------------------

@pytest.mark.parametrize("before,after", list(itertools.product(RequestState, RequestState)),
                         ids=lambda state: state.name)
async def test_request_transitions_follow_the_table(tmp_path, before, after):
    ex = Exchange(open_edge(tmp_path).conn)
    ex.request = before
    if (before, after) in LEGAL_REQUEST:
        ex._request_to(after)
        assert ex.request == after
    else:
        with pytest.raises(StateError, match=f"request {before.name} -> {after.name}"):
            ex._request_to(after)
        assert ex.request == before


@pytest.mark.parametrize("before,after", list(itertools.product(ResponseState, ResponseState)),
                         ids=lambda state: state.name)
async def test_response_transitions_follow_the_table(tmp_path, before, after):
    ex = Exchange(open_edge(tmp_path).conn)
    ex.response = before
    if (before, after) in LEGAL_RESPONSE:
        ex._response_to(after)
        assert ex.response == after
    else:
        with pytest.raises(StateError, match=f"response {before.name} -> {after.name}"):
            ex._response_to(after)
        assert ex.response == before


async def test_inlined_transitions_check_the_same_table(tmp_path):
    e = open_edge(tmp_path)
    for state in RequestState:
        ex = Exchange(e.conn)
        ex.request = state
        if state == HEAD:
            ex.head_complete()
            assert ex.request == BODY
        else:
            with pytest.raises(StateError):
                ex.head_complete()
    ex = Exchange(e.conn)
    with pytest.raises(StateError, match="HEAD -> RECEIVED"):
        ex.request_complete()  # no head yet
    ex = Exchange(e.conn)
    ex.response = SENT
    with pytest.raises(StateError, match="SENT -> SENT"):
        ex.response_finished()  # a second final answer
    ex = Exchange(e.conn)
    ex.response = TUNNEL
    with pytest.raises(StateError, match="TUNNEL -> SENT"):
        ex.response_finished()


async def test_end_accounts_once(tmp_path):
    e = open_edge(tmp_path)
    ex = Exchange(e.conn)
    ex.bytes_in, ex.bytes_out = 3, 5
    ex.end()
    ex.end()
    ex.client_lost()
    assert len(e.records) == 1
    assert (e.ctx.stats.request_bytes, e.ctx.stats.response_bytes) == (3, 5)


# -- every legal path ends once -----------------------------------------------------------------

async def test_get(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    ex = e.exchange
    assert (ex.request, ex.response) == (RECEIVED, WAITING)
    assert b.up.deadline > 0  # the backend's header clock runs once the request is sent
    b.send(response(body=b"12345"))
    assert (ex.request, ex.response) == (RECEIVED, SENT)
    assert b.pool.idle == [b.up] and b.up.client is None
    (rec,) = e.records
    assert (rec["status"], rec["bytes_out"], rec["outcome"]) == (200, 5, "ok")
    assert e.ctx.stats.responses == {(2, b"GET", "http", "backend", "h1"): 1}
    e.transport.lose()
    assert len(e.records) == 1


async def test_post_with_content_length_body(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("POST", "/p", headers=[("Content-Length", "11")], body=b"hello"))
    head = e.exchange.upstream_head
    assert b"Content-Length: 11\r\n" in head
    e.send(b" world")
    assert b.transport.writes == [head, b"hello", b" world"]
    ex = e.exchange
    assert ex.request == RECEIVED
    b.send(response(201, b"", "Created"))
    (rec,) = e.records
    assert (rec["status"], rec["bytes_in"], ex.response) == (201, 11, SENT)


async def test_chunked_body_with_trailers(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(b"POST /c HTTP/1.1\r\nHost: 3000-demo.localhost\r\nTransfer-Encoding: chunked\r\n"
           b"\r\n5\r\nhello\r\n")
    ex = e.exchange
    assert b"Transfer-Encoding: chunked\r\n" in ex.upstream_head
    e.send(b"6\r\n world\r\n0\r\nX-Sum: 42\r\nE2b-Traffic-Access-Token: secret\r\n\r\n")
    assert b.transport.data == (ex.upstream_head + b"5\r\nhello\r\n6\r\n world\r\n"
                                + b"0\r\nX-Sum: 42\r\n\r\n")  # the token never travels on
    assert ex.request == RECEIVED
    b.send(response())
    (rec,) = e.records
    assert rec["bytes_in"] == 11 and ex.response == SENT


async def test_early_answer_discards_the_rest_of_the_body(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("POST", "/p", headers=[("Content-Length", "10")], body=b"0123"))
    ex = e.exchange
    b.send(response(413, b"no", "Content Too Large"))
    assert status_of(e.transport.data) == 413
    assert (ex.request, ex.response) == (DISCARDING, SENT)
    assert b.transport.closed  # a backend that answered early is not reused
    assert e.records == []  # not over until the request is
    e.send(b"456789")
    assert b.transport.data.endswith(b"0123")  # the rest was dropped
    assert (ex.request, ex.response) == (RECEIVED, SENT)
    (rec,) = e.records
    assert (rec["status"], rec["bytes_in"]) == (413, 4)
    assert e.conn.deadline_kind == IDLE_DUE  # and the connection serves the next request


async def test_proxy_error_answer(tmp_path):
    e = open_edge(tmp_path)
    e.send(request(host=b"3000-nosuch.localhost"))
    (rec,) = e.records
    assert (rec["status"], rec["outcome"]) == (502, "SandboxNotFound")
    assert e.ctx.stats.responses == {(5, b"GET", "http", "proxy", "h1"): 1}
    assert e.conn.active is None


async def test_proxy_error_before_the_body_ends_closes(tmp_path):
    e = open_edge(tmp_path)
    e.send(request("POST", "/", host=b"3000-nosuch.localhost",
                   headers=[("Content-Length", "100")], body=b"x"))
    assert b"Connection: close\r\n" in e.transport.data
    assert e.conn.deadline_kind == LINGER_DUE
    e.send(b"y" * 99)
    await tick()
    assert len(e.records) == 1


async def test_backend_lost_before_head_is_502(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("POST", "/", headers=[("Content-Length", "2")], body=b"hi"))
    ex = e.exchange
    b.transport.lose()
    assert status_of(e.transport.data) == 502
    assert (ex.request, ex.response) == (RECEIVED, SENT)
    assert [r["outcome"] for r in e.records] == ["UpstreamClosed"]
    assert e.ctx.stats.retries == 0  # a request with a body is never retried


async def test_idempotent_request_on_a_dead_pooled_connection_is_retried(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    ex = e.exchange
    b.transport.lose()
    assert e.ctx.stats.retries == 1 and ex.connecting is not None
    # the fresh connection is refused by [upstream] allowed_networks, without a socket
    await asyncio.wait_for(ex.connecting, 1)
    assert status_of(e.transport.data) == 502
    assert [r["outcome"] for r in e.records] == ["BackendNotAllowed"]


async def test_backend_lost_mid_body_cuts_the_response(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    ex = e.exchange
    b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123")
    b.transport.lose()
    assert e.transport.closed and not e.transport.aborted  # fewer bytes than framed, then FIN
    assert [r["outcome"] for r in e.records] == ["upstream_closed"]
    await tick()
    assert e.transport.lost and len(e.records) == 1
    assert ex.response == STREAMING  # abandoned mid-body


async def test_body_until_close_is_rechunked_and_ends_cleanly(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    ex = e.exchange
    b.send(b"HTTP/1.1 200 OK\r\n\r\nsome")
    assert b"Transfer-Encoding: chunked\r\n" in e.transport.data
    b.send(b"more")
    b.transport.lose()
    assert e.transport.data.endswith(b"4\r\nsome\r\n4\r\nmore\r\n0\r\n\r\n")
    assert (ex.request, ex.response) == (RECEIVED, SENT)
    assert [r["outcome"] for r in e.records] == ["ok"]
    assert not e.transport.closing and e.conn.deadline_kind == IDLE_DUE


async def test_backend_header_timeout_is_504(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    expire(b.up)
    assert status_of(e.transport.data) == 504
    assert b.transport.closed and b.up not in b.pool.idle
    assert [r["outcome"] for r in e.records] == ["UpstreamTimeout"]
    assert e.conn.deadline_kind == IDLE_DUE


async def test_tunnel_ends_once_when_the_client_leaves(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("GET", "/ws", headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")]))
    ex = e.exchange
    b.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade"
           b"\r\n\r\n")
    assert (ex.request, ex.response) == (RECEIVED, TUNNEL)
    e.send(b"abc")
    b.send(b"defgh")
    e.transport.lose()
    assert b.transport.closed
    (rec,) = e.records
    assert (rec["status"], rec["protocol"], rec["bytes_in"], rec["bytes_out"]) == (
        101, "websocket", 3, 5)
    await tick()  # the backend's connection_lost does not account for it again
    assert len(e.records) == 1


async def test_tunnel_backend_leaving_closes_the_client(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("GET", "/ws", headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")]))
    b.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade"
           b"\r\n\r\n")
    b.transport.lose()
    assert e.transport.closed
    await tick()
    assert len(e.records) == 1 and e.records[0]["protocol"] == "websocket"


async def test_unrequested_101_is_not_relayed(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("DELETE", "/x", headers=[("Content-Length", "0")]))
    b.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade"
           b"\r\n\r\n")
    assert b" 101 " not in e.transport.data
    assert b.transport.closed
    assert [r["status"] for r in e.records] == [502]


# -- responses ----------------------------------------------------------------------------------

async def test_interim_100_continue_is_relayed_before_the_answer(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("POST", "/", headers=[("Content-Length", "5"), ("Expect", "100-continue")]))
    b.send(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert e.transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert e.exchange.response == WAITING
    e.send(b"hello")
    b.send(response())
    assert status_of(e.transport.writes[1]) == 200
    assert len(e.records) == 1


async def test_head_response_has_no_body_and_the_connection_is_reused(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request("HEAD", "/"))
    b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert e.transport.writes == [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"]
    assert b.pool.idle == [b.up]
    e.send(request("GET", "/again"))
    assert b.transport.writes[-1].startswith(b"GET /again ")
    b.send(response(body=b"12345"))
    assert e.transport.writes[-1].endswith(b"\r\n\r\n12345")
    assert len(e.records) == 2


async def test_chunked_response_trailers_are_relayed(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    b.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
           b"0\r\nX-Check: 1\r\n\r\n")
    assert e.transport.writes == [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"5\r\nhello\r\n0\r\nX-Check: 1\r\n\r\n"]
    assert b.pool.idle == [b.up]


async def test_invalid_response_head_is_502(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    b.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked, gzip\r\n\r\n")
    assert status_of(e.transport.data) == 502
    assert b.transport.closed
    # (response_invalid sets outcome "upstream_invalid", which answer() overwrites)
    assert [r["outcome"] for r in e.records] == ["UpstreamInvalid"]


# -- a backend connection answers only what it was asked ----------------------------------------

async def test_unsolicited_bytes_in_the_same_read_close_the_backend(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    b.send(response(body=b"one") + response(body=b"two"))
    assert e.transport.data.endswith(b"\r\n\r\none")
    assert b"two" not in e.transport.data
    assert b.transport.closed and b.up not in b.pool.idle
    assert [r["status"] for r in e.records] == [200]


async def test_unsolicited_bytes_after_a_relayed_body_close_the_backend(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    e.send(request())
    b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\none")
    b.send(b"two" + response(body=b"evil"))
    assert e.transport.data.endswith(b"\r\n\r\nonetwo")
    assert b"evil" not in e.transport.data
    assert b.transport.closed and b.up not in b.pool.idle
    assert len(e.records) == 1


async def test_idle_backend_that_speaks_is_closed(tmp_path):
    e = open_edge(tmp_path)
    (b,) = e.seed()
    b.send(response())
    assert b.transport.closed
    await tick()
    assert b.pool.take() is None and b.up not in b.pool.members
    assert e.transport.writes == []


async def test_sandbox_slot_is_returned_once_per_exchange(tmp_path):
    e = open_edge(tmp_path, config={"limits": {"sandbox_connections": 1}})
    b1, _ = e.seed(2)
    e.send(request("GET", "/1"))
    assert e.ctx.sandbox_slots == {"demo": 1}
    other = connect_client(e.ctx)  # a second client of the same process
    other.send(request("GET", "/busy"))
    assert status_of(other.transport.data) == 429
    b1.send(response())
    assert e.ctx.sandbox_slots == {}
    e.send(request("GET", "/2"))
    assert e.ctx.sandbox_slots == {"demo": 1}
    e.transport.lose()  # client_lost and end: the slot comes back once, not twice
    assert e.ctx.sandbox_slots == {}
