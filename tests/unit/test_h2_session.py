"""proxy._h2session (libnghttp2 through the proxy's C module) against a real HTTP/2 client, the
`h2` library, bytes handed across in memory: what the module adds to the library, one
behaviour per test."""

from __future__ import annotations

from collections import deque

import h2.config
import h2.connection
import h2.events
import pytest

from proxy.h2_connection import (
    DATA,
    END,
    HEADERS,
    LATE,
    ErrorCodes,
    Session,
    Setting,
    send_queued,
)

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x.test"),
           (b":path", b"/")]


class Pair:
    """A server Session and an h2 client, each fed what the other writes."""

    def __init__(self, advertised: int = 100, window: int = 65535, **settings: int):
        self.server = Session(True, [(Setting.MAX_CONCURRENT_STREAMS, 2 * advertised),
                                     (Setting.INITIAL_WINDOW_SIZE, window)],
                              1 << 20, 65536, advertised)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.client.initiate_connection()
        if settings:
            self.client.update_settings({getattr(h2.settings.SettingCodes, k.upper()): v
                                         for k, v in settings.items()})
        self.events: list = []  # the server's
        self.client_events: list = []
        self.turn()

    def turn(self) -> None:
        """Exchange bytes until neither side has anything to say."""
        for _ in range(50):
            to_server = self.client.data_to_send()
            if to_server:
                self.events += self.server.receive(to_server)
            to_client = self.server.send()
            if to_client:
                self.client_events += self.client.receive_data(to_client)
            if not to_server and not to_client:
                return
        raise AssertionError("the two sides never went quiet")

    def of(self, kind: type) -> list:
        return [e for e in self.client_events if isinstance(e, kind)]


def test_settings_announce_the_advertised_stream_limit():
    p = Pair(advertised=7)
    assert p.client.remote_settings.max_concurrent_streams == 7


def test_request_events_and_a_body_ending_in_one_data_frame():
    p = Pair()
    p.client.send_headers(1, REQUEST)
    p.client.send_data(1, b"hello", end_stream=True)
    p.turn()
    events = [e for e in p.events if e[0] in (HEADERS, DATA, END)]
    assert [e[0] for e in events] == [HEADERS, DATA, END]
    assert events[0][2] == REQUEST and events[1][2] == b"hello"
    assert p.server.respond(1, 200, [(b"content-type", b"text/plain")], False)
    assert send_queued(p.server, 1, deque([b"ab", b"cd"]), True) == (1, 4, True)
    p.turn()
    [data] = p.of(h2.events.DataReceived)
    assert data.data == b"abcd" and data.stream_ended is not None  # one frame, END_STREAM on it
    assert p.of(h2.events.ResponseReceived)[0].headers[0] == (b":status", b"200")


def test_room_follows_the_client_window_and_queued_bytes_wait_for_it():
    p = Pair(initial_window_size=10)
    p.client.send_headers(1, REQUEST, end_stream=True)
    p.turn()
    p.server.respond(1, 200, [], False)
    assert p.server.room(1) == 10
    queued = deque([b"x" * 25])
    assert send_queued(p.server, 1, queued, True)[2] is False
    assert p.server.room(1) == 0 and queued == deque([b"x" * 15])
    p.turn()
    assert sum(len(e.data) for e in p.of(h2.events.DataReceived)) == 10
    p.client.acknowledge_received_data(10, 1)
    p.client.increment_flow_control_window(100, 1)
    p.turn()
    assert p.server.room(1) > 0
    assert send_queued(p.server, 1, queued, True)[2] is True
    p.turn()
    assert sum(len(e.data) for e in p.of(h2.events.DataReceived)) == 25
    assert p.of(h2.events.StreamEnded)


def test_trailers_follow_the_body():
    p = Pair()
    p.client.send_headers(1, REQUEST, end_stream=True)
    p.turn()
    p.server.respond(1, 200, [], False)
    send_queued(p.server, 1, deque([b"body"]), [(b"grpc-status", b"0")])
    p.turn()
    [trailers] = p.of(h2.events.TrailersReceived)
    assert trailers.headers == [(b"grpc-status", b"0")]
    assert b"".join(e.data for e in p.of(h2.events.DataReceived)) == b"body"


def test_an_early_complete_response_is_sent_before_the_reset_that_stops_the_request():
    """RFC 9113 8.1: the response first, then RST_STREAM NO_ERROR (a reset submitted at once
    would make the library drop the response)."""
    p = Pair()
    p.client.send_headers(1, REQUEST)  # the body is still to come
    p.turn()
    p.server.respond(1, 403, [(b"content-length", b"0")], True)
    p.turn()
    assert p.of(h2.events.ResponseReceived)[0].headers[0] == (b":status", b"403")
    [reset] = p.of(h2.events.StreamReset)
    assert reset.error_code == ErrorCodes.NO_ERROR


def test_consumed_bytes_reopen_the_window():
    p = Pair(window=65535)
    p.client.send_headers(1, REQUEST)
    for _ in range(6):
        p.client.send_data(1, b"y" * 10000)
    p.turn()
    before = p.client.local_flow_control_window(1)
    p.server.consume(1, 60000)
    p.turn()
    assert p.client.local_flow_control_window(1) > before


def test_nothing_is_acknowledged_before_it_is_consumed():
    p = Pair(window=65535)
    p.client.send_headers(1, REQUEST)
    for _ in range(6):
        p.client.send_data(1, b"y" * 10000)
    p.turn()
    assert p.client.local_flow_control_window(1) == 65535 - 60000


def test_a_stream_opened_after_a_graceful_goaway_is_reported_late():
    p = Pair()
    p.client.send_headers(1, REQUEST, end_stream=True)
    p.turn()
    p.client.send_headers(3, REQUEST, end_stream=True)
    crossing = p.client.data_to_send()  # sent before the client could see the GOAWAY
    p.server.goaway(ErrorCodes.NO_ERROR, 1)
    assert p.server.send()
    p.events += p.server.receive(crossing)
    p.events += p.server.receive(crossing)  # sent again: reported once, refused once
    assert p.events.count((LATE, 3)) == 1
    assert not [e for e in p.events if e[0] == HEADERS and e[1] == 3]


@pytest.mark.parametrize("ended", [False, True])
def test_a_session_dropped_with_streams_and_queued_bytes_frees_them(ended):
    p = Pair(initial_window_size=1)
    for sid in (1, 3, 5):
        p.client.send_headers(sid, REQUEST, end_stream=True)
    p.turn()
    for sid in (1, 3, 5):
        p.server.respond(sid, 200, [], False)
        p.server.data(sid, b"z" * 1000)
        if ended:
            p.server.end(sid, [(b"x-t", b"1")])
    p.turn()
    del p.server  # frees the queues of streams still open (no crash, nothing kept)
