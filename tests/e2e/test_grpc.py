"""gRPC through the proxy, end to end: a real grpcio client talks h2c (prior knowledge) to the real
proxy process, which routes each call by :authority (``<port>-<sandboxId>.<domain>``) and sends it
to the sandbox's real grpcio server over one multiplexed h2c connection (proxy/grpc_upstream.py).

The backend is tests/support/grpc_backend.py (service ``test.Echo``, raw-bytes messages, every call
recorded); the client helpers are tests/support/grpc_client.py. Tests are synchronous: grpcio's
blocking API runs in this thread while the backend serves from its own thread pool and the proxy
is a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from support.faulty_backends import BackendProcess
from support.grpc_backend import GrpcBackend
from support.grpc_client import TOKEN_HEADER, Echo, connections_to, h2c_request, proxy_channel
from support.process import ProxyProcess, free_port

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
PORT = 50051            # the sandbox port the gRPC service is published on
TOKEN = "grpc-t0ken-secret"
CALL_TIMEOUT = 10.0     # every call carries a deadline: a hang fails as DEADLINE_EXCEEDED
APPLY_WITHIN = 5.0      # a registry edit applies within ~reload_interval (0.2 s)

# gRPC status codes for the proxy's own answers (proxy/h2_stream.py, _GRPC_STATUS):
# 403 -> PERMISSION_DENIED, 502 (sandbox not found, port not open) -> UNAVAILABLE
PROXY_403 = grpc.StatusCode.PERMISSION_DENIED
PROXY_502 = grpc.StatusCode.UNAVAILABLE


def authority(sid: str = "grpc", port: int = PORT) -> str:
    return f"{port}-{sid}.localhost"


def sandboxes(backend_port: int, **extra: dict) -> dict[str, dict]:
    """``grpc``: port 50051 -> the backend; ``secured``: the same, with a traffic access token."""
    return {
        "grpc": {"host": "127.0.0.1", "ports": {PORT: backend_port}},
        "secured": {"host": "127.0.0.1", "ports": {PORT: backend_port},
                    "traffic_access_token": TOKEN},
        **extra,
    }


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """The RpcError ``call`` raises (failing the test if it succeeds)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture
def grpc_backend():
    """A grpcio server (test.Echo) in this process, stopped at the end of the test."""
    backend = GrpcBackend().start()
    yield backend
    backend.stop()


@pytest.fixture
def grpc_proxy(proxy, grpc_backend) -> Callable[..., ProxyProcess]:
    """Factory: a proxy whose registry is ``sandboxes(grpc_backend.port)`` (plus ``extra``)."""
    def start(config: dict | None = None, **extra: dict) -> ProxyProcess:
        return proxy(sandboxes=sandboxes(grpc_backend.port, **extra), config=config)
    return start


@pytest.fixture
def channels():
    """Factory: ``channels(proxy, sid)`` opens a grpcio channel to sandbox ``sid`` through
    ``proxy``; every channel is closed at the end of the test."""
    opened: list[grpc.Channel] = []

    def open_channel(p: ProxyProcess, sid: str = "grpc", port: int = PORT) -> Echo:
        channel = proxy_channel(p.port, authority(sid, port))
        opened.append(channel)
        return Echo(channel)

    yield open_channel
    for channel in opened:
        channel.close()


def scrape(p: ProxyProcess) -> dict:
    with urllib.request.urlopen(p.metrics_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def access_log(p: ProxyProcess) -> list[dict]:
    return [json.loads(line) for line in p.stdout().splitlines() if line.startswith("{")]


# -- the four kinds of call ------------------------------------------------------------------------

def test_unary_call_round_trips(grpc_proxy, grpc_backend, channels):
    """A unary call reaches the sandbox's gRPC server through the proxy and its answer comes back
    byte for byte, with status OK."""
    p = grpc_proxy()
    echo = channels(p)
    payload = bytes(range(256)) * 4
    response, call = echo.unary.with_call(payload, timeout=CALL_TIMEOUT)
    assert response == payload
    assert call.code() == grpc.StatusCode.OK
    [record] = grpc_backend.wait_calls("Unary")
    assert record.header("x-forwarded-host") == [authority()]


def test_server_streaming_delivers_every_message_in_order(grpc_proxy, channels):
    """A server stream's messages all arrive, in order, and the call ends with OK (the backend's
    trailers are relayed after the last DATA frame)."""
    p = grpc_proxy()
    call = channels(p).count(json.dumps({"n": 200}).encode(), timeout=CALL_TIMEOUT)
    assert list(call) == [b"%d" % i for i in range(200)]
    assert call.code() == grpc.StatusCode.OK


def test_client_streaming_delivers_every_message_in_order(grpc_proxy, channels):
    """Every message of a client stream reaches the backend intact and in order: the count, total
    length and digest the backend computed match what was sent."""
    p = grpc_proxy()
    rng = random.Random(7)
    messages = [rng.randbytes(rng.randrange(0, 40_000)) for _ in range(100)]
    answer = json.loads(channels(p).collect(iter(messages), timeout=CALL_TIMEOUT))
    assert answer == {"count": 100, "length": sum(map(len, messages)),
                      "sha256": hashlib.sha256(b"".join(messages)).hexdigest()}


def test_bidirectional_stream_is_interleaved(grpc_proxy, channels):
    """In a bidirectional stream each message is relayed as it comes, both ways: the client sends
    the next message only after the answer to the previous one arrived, so a proxy that waited
    for either side's end of stream (or held frames back) would never finish the exchange."""
    p = grpc_proxy()
    outbox: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (message := outbox.get()) is not None:
            yield message

    call = channels(p).chat(requests(), timeout=CALL_TIMEOUT)
    try:
        for i in range(30):
            message = b"ping-%d" % i
            outbox.put(message)
            assert next(call) == b"echo:" + message
    finally:
        outbox.put(None)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK


def test_4mib_messages_both_ways(grpc_proxy, grpc_backend, channels):
    """4 MiB messages pass both ways intact (both ends allow 8 MiB): the proxy's flow control
    relays a message many times larger than any HTTP/2 window without losing or reordering
    bytes, to the backend and back, in a client stream of several, and in concurrent calls."""
    p = grpc_proxy()
    echo = channels(p)
    big = random.Random(4).randbytes(4 * MiB)
    assert echo.unary(big, timeout=CALL_TIMEOUT) == big
    others = [random.Random(s).randbytes(4 * MiB) for s in (5, 6, 7)]
    answer = json.loads(echo.collect(iter([big, *others]), timeout=CALL_TIMEOUT))
    assert answer["count"] == 4 and answer["length"] == 16 * MiB
    assert answer["sha256"] == hashlib.sha256(big + b"".join(others)).hexdigest()
    # at once on the one backend connection: each call's window is given back on its own
    futures = [echo.unary.future(m, timeout=CALL_TIMEOUT) for m in others]
    assert [f.result() for f in futures] == others


# -- deadlines, cancellation, errors ---------------------------------------------------------------

def test_deadline_reaches_backend_and_expires_at_client(grpc_proxy, grpc_backend, channels):
    """The client's deadline is carried to the backend (grpc-timeout: the backend's call has a
    deadline no later than the client's), and a backend slower than it ends the call with
    DEADLINE_EXCEEDED at the client, the backend's call ending too."""
    p = grpc_proxy()
    echo = channels(p)
    error = rpc_error(lambda: echo.sleep(json.dumps({"seconds": 30}).encode(), timeout=2.0))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    [record] = grpc_backend.wait_calls("Sleep")
    assert record.time_remaining is not None, "grpc-timeout did not reach the backend"
    assert 0 < record.time_remaining <= 2.0
    assert record.ended.wait(10), "the backend's call outlived the deadline"
    assert record.cut_short


def test_client_cancel_reaches_backend(grpc_proxy, grpc_backend, channels):
    """A call the client cancels is cancelled at the backend too (the proxy resets the backend's
    stream): the backend's handler sees its call end while it is still holding it open."""
    p = grpc_proxy()
    # the deadline is later than the wait below: only the cancel can end the backend's call
    call = channels(p).count(json.dumps({"n": 1, "hold": 50}).encode(), timeout=50)
    [record] = grpc_backend.wait_calls("Count")
    assert not record.ended.is_set()
    call.cancel()
    assert record.ended.wait(10), "the backend's call was not cancelled"
    assert record.cut_short
    assert call.code() == grpc.StatusCode.CANCELLED


def test_backend_status_details_and_trailers_reach_client_exactly(grpc_proxy, channels):
    """A status the backend ends a call with reaches the client exactly: code, details (non-ASCII
    and '%' included: grpc-message's percent-encoding is relayed untouched) and trailing metadata,
    text and binary."""
    p = grpc_proxy()
    echo = channels(p)
    blob = bytes(range(256))
    error = rpc_error(lambda: echo.fail(json.dumps({
        "code": "NOT_FOUND", "details": "no such thing",
        "trailers": [["x-reason", "gone"], ["x-blob-bin", blob.decode("latin-1")]],
    }).encode(), timeout=CALL_TIMEOUT))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such thing"
    trailers = dict(error.trailing_metadata())
    assert trailers["x-reason"] == "gone"
    assert trailers["x-blob-bin"] == blob

    error = rpc_error(lambda: echo.fail(json.dumps({
        "code": "FAILED_PRECONDITION", "details": "Größe 100% überschritten ✓"}).encode(),
        timeout=CALL_TIMEOUT))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "Größe 100% überschritten ✓"


def test_backend_cookies_are_confined_to_the_sandbox_on_grpc_too(grpc_proxy, channels):
    """A gRPC response is a response like any other: a Set-Cookie whose Domain names the shared
    parent domain loses it (no cookie tossing onto sibling sandboxes), one naming the sandbox's
    own host keeps it."""
    p = grpc_proxy()
    echo = channels(p)
    own = authority()
    error = rpc_error(lambda: echo.fail(json.dumps({
        "code": "NOT_FOUND", "details": "x",
        "headers": [["set-cookie", "toss=1; Domain=localhost; Path=/"],
                    ["set-cookie", f"own=1; Domain={own}"]],
    }).encode(), timeout=CALL_TIMEOUT))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    cookies = [v for k, v in error.initial_metadata() if k == "set-cookie"]
    assert cookies == ["toss=1; Path=/", f"own=1; Domain={own}"], cookies


def test_error_after_streamed_messages_keeps_messages_and_status(grpc_proxy, channels):
    """A server stream that fails after sending messages delivers those messages, then the
    backend's status (in trailers after the DATA frames), not a proxy-made one."""
    p = grpc_proxy()
    call = channels(p).count(json.dumps(
        {"n": 3, "fail": {"code": "RESOURCE_EXHAUSTED", "details": "enough"}}).encode(),
        timeout=CALL_TIMEOUT)
    received = []
    with pytest.raises(grpc.RpcError):
        for message in call:
            received.append(message)
    assert received == [b"0", b"1", b"2"]
    assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert call.details() == "enough"


@pytest.fixture
def killable_backend():
    """The gRPC backend in a process of its own, so a test can SIGKILL it."""
    backend = BackendProcess("grpc_backend.py").start()
    yield backend
    backend.kill()


def test_backend_killed_mid_stream_is_unavailable(proxy, killable_backend, channels):
    """When the sandbox's backend dies (SIGKILL: its sockets close with no HTTP/2 frame) while a
    server stream is under way, the client gets the messages sent so far and then UNAVAILABLE
    (14) from the proxy, which gRPC clients retry, not INTERNAL or UNKNOWN from a torn stream."""
    p = proxy(sandboxes={"grpc": {"host": "127.0.0.1", "ports": {PORT: killable_backend.port}}})
    call = channels(p).count(json.dumps({"n": 3, "hold": 30}).encode(), timeout=CALL_TIMEOUT)
    assert [next(call) for _ in range(3)] == [b"0", b"1", b"2"]
    killable_backend.kill()
    with pytest.raises(grpc.RpcError):
        next(call)
    assert call.code() == grpc.StatusCode.UNAVAILABLE
    assert call.code().value[0] == 14
    assert "sandbox" in call.details().lower(), call.details()  # said by the proxy
    assert p.alive()


def test_backend_stopped_mid_stream_is_unavailable(grpc_proxy, grpc_backend, channels):
    """When the backend server shuts down abruptly (grpcio stop with no grace: it cancels its
    calls and closes its connections) during a server stream, the client's call ends with
    UNAVAILABLE, and a new backend on the same port is reached by the next call."""
    p = grpc_proxy()
    echo = channels(p)
    call = echo.count(json.dumps({"n": 2, "hold": 30}).encode(), timeout=CALL_TIMEOUT)
    assert [next(call) for _ in range(2)] == [b"0", b"1"]
    grpc_backend.stop(0)
    with pytest.raises(grpc.RpcError):
        next(call)
    assert call.code() == grpc.StatusCode.UNAVAILABLE, (call.code(), call.details())
    replacement = GrpcBackend(port=grpc_backend.port).start()
    try:
        assert echo.unary(b"again", timeout=CALL_TIMEOUT) == b"again"
        assert len(replacement.wait_calls("Unary")) == 1
    finally:
        replacement.stop()


def test_backend_graceful_shutdown_lets_calls_under_way_finish(grpc_proxy, grpc_backend,
                                                               channels):
    """A backend shutting down gracefully (GOAWAY, then a grace period) finishes the calls it has
    under way: a server stream in flight when the GOAWAY arrives gets all its messages and OK
    through the proxy; a backend started again on the port is reached by the next call."""
    p = grpc_proxy()
    echo = channels(p)
    call = echo.count(json.dumps({"n": 2, "hold": 2.0}).encode(), timeout=CALL_TIMEOUT)
    [record] = grpc_backend.wait_calls("Count")
    assert not record.ended.is_set()  # the shutdown starts while the call is under way
    stopping = threading.Thread(target=grpc_backend.stop, args=(10,))
    stopping.start()
    try:
        assert list(call) == [b"0", b"1"]
        assert call.code() == grpc.StatusCode.OK, (call.code(), call.details())
        assert not record.cut_short
    finally:
        stopping.join(15)
    replacement = GrpcBackend(port=grpc_backend.port).start()
    try:
        assert echo.unary(b"again", timeout=CALL_TIMEOUT) == b"again"
    finally:
        replacement.stop()


# -- the proxy's own answers -----------------------------------------------------------------------

def test_unknown_sandbox_is_a_grpc_error(grpc_proxy, grpc_backend, channels):
    """A call to a sandbox the registry does not know is answered at once by the proxy with a
    trailers-only gRPC response: UNAVAILABLE (the proxy's 502) with the proxy's message, not a
    hang, a reset or an HTTP error page; nothing reaches any backend."""
    p = grpc_proxy()
    echo = channels(p, "nope")
    error = rpc_error(lambda: echo.unary(b"hello", timeout=CALL_TIMEOUT))
    assert error.code() == PROXY_502, (error.code(), error.details())
    assert error.details() == "The sandbox was not found"
    assert grpc_backend.calls == []


def test_closed_port_is_unavailable(proxy, channels):
    """A call to a sandbox whose backend port has nothing listening ends with UNAVAILABLE (the
    proxy's 502 'port is not open'), not a hang."""
    p = proxy(sandboxes={"grpc": {"host": "127.0.0.1", "ports": {PORT: free_port()}}},
              config={"upstream": {"connect_attempts": 1}})
    error = rpc_error(lambda: channels(p).unary(b"hello", timeout=CALL_TIMEOUT))
    assert error.code() == PROXY_502, (error.code(), error.details())
    assert "port is not open" in error.details()


def test_missing_or_wrong_token_is_permission_denied(grpc_proxy, grpc_backend, channels):
    """A call to a token-protected sandbox without the token, or with a wrong one, is refused by
    the proxy with PERMISSION_DENIED (its 403, as proxy/h2_stream.py's _GRPC_STATUS maps it) and
    never reaches the backend; with the right token the call goes through."""
    p = grpc_proxy()
    echo = channels(p, "secured")
    error = rpc_error(lambda: echo.unary(b"x", timeout=CALL_TIMEOUT))
    assert error.code() == PROXY_403, (error.code(), error.details())
    assert TOKEN_HEADER in error.details() and "missing" in error.details()
    error = rpc_error(lambda: echo.unary(b"x", timeout=CALL_TIMEOUT,
                                         metadata=[(TOKEN_HEADER, "wrong")]))
    assert error.code() == PROXY_403, (error.code(), error.details())
    assert "invalid" in error.details()
    assert grpc_backend.calls == []
    assert echo.unary(b"x", timeout=CALL_TIMEOUT, metadata=[(TOKEN_HEADER, TOKEN)]) == b"x"


def test_backend_sees_metadata_and_forwarding_headers_but_not_token(grpc_proxy, channels):
    """What the backend receives: the client's metadata (text and binary), X-Forwarded-For with the
    client's address added by the proxy, X-Forwarded-Host with the sandbox's host; never the access
    token and no connection-specific header (RFC 9113 8.2.2)."""
    p = grpc_proxy()
    blob = b"\x00\xffbinary"
    seen = json.loads(channels(p, "secured").describe(b"", timeout=CALL_TIMEOUT, metadata=[
        (TOKEN_HEADER, TOKEN), ("x-custom", "value-1"), ("x-custom", "value-2"),
        ("x-blob-bin", blob)]))
    metadata = [(k, v) for k, v in seen["metadata"]]
    names = {k for k, _ in metadata}
    assert [v for k, v in metadata if k == "x-custom"] == ["value-1", "value-2"]
    assert [v for k, v in metadata if k == "x-blob-bin"] == [blob.decode("latin-1")]
    assert [v for k, v in metadata if k == "x-forwarded-for"] == ["127.0.0.1"]
    assert TOKEN_HEADER not in names
    assert TOKEN not in json.dumps(seen)
    assert not names & {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                        "upgrade", "host"}, names
    assert [v for k, v in metadata if k == "x-forwarded-host"] == [authority("secured")]


# -- one connection per backend, and its end -------------------------------------------------------

def test_concurrent_calls_are_multiplexed_on_one_backend_connection(grpc_proxy, grpc_backend,
                                                                    channels):
    """Many calls at once on one channel all succeed, and the backend sees a single connection
    from the proxy, also when the calls race the opening of that connection: the calls only pass
    a barrier that needs all of them in the backend at the same time, so they are concurrent
    streams of one h2c connection, not queued ones. A second client connection shares it."""
    p = grpc_proxy()
    n = 24
    grpc_backend.barrier = threading.Barrier(n, timeout=10)
    echo = channels(p)
    # from cold: the calls that arrive while the connection is being opened wait for it
    for _ in range(2):
        futures = [echo.gather.future(b"%d" % i, timeout=CALL_TIMEOUT) for i in range(n)]
        peers = {f.result() for f in futures}
        assert len(peers) == 1, peers
    assert grpc_backend.peers() == {peers.pop().decode()}
    assert connections_to(p.pid, grpc_backend.port) == 1
    # a second client connection to the proxy shares the same backend connection
    other = channels(p)
    assert other.unary(b"other", timeout=CALL_TIMEOUT) == b"other"
    assert connections_to(os.getpid(), p.port) == 2  # two client connections to the proxy
    assert len(grpc_backend.peers()) == 1
    assert connections_to(p.pid, grpc_backend.port) == 1


def test_removed_sandbox_loses_its_backend_connection(grpc_proxy, grpc_backend, channels):
    """Removing a sandbox from the registry closes the proxy's h2c connection to its backend: an
    in-flight server stream ends with UNAVAILABLE at the client and is cancelled at the backend,
    while another sandbox's stream on the same backend goes on. Added back, the sandbox is
    reached again over a new connection."""
    p = grpc_proxy(doomed={"host": "127.0.0.1", "ports": {PORT: grpc_backend.port}})
    hold = json.dumps({"n": 1, "hold": 30}).encode()
    doomed = channels(p, "doomed").count(hold, timeout=CALL_TIMEOUT)
    kept = channels(p, "grpc").chat(iter([b"a", b"b"]), timeout=CALL_TIMEOUT)
    kept_stream = channels(p, "grpc").count(hold, timeout=CALL_TIMEOUT)
    assert next(doomed) == b"0" and next(kept_stream) == b"0"
    records = grpc_backend.wait_calls("Count", 2)
    by_sandbox = {r.header("x-forwarded-host")[0]: r for r in records}
    doomed_call, kept_call = by_sandbox[authority("doomed")], by_sandbox[authority("grpc")]
    assert doomed_call.peer != kept_call.peer  # a connection per sandbox
    assert connections_to(p.pid, grpc_backend.port) == 2

    p.write_registry(sandboxes(grpc_backend.port))
    with pytest.raises(grpc.RpcError):
        next(doomed)
    assert doomed.code() == grpc.StatusCode.UNAVAILABLE, (doomed.code(), doomed.details())
    assert doomed_call.ended.wait(10), "the removed sandbox's backend call is still open"
    assert doomed_call.cut_short
    wait_for(lambda: connections_to(p.pid, grpc_backend.port) == 1, 5,
             "the proxy's connection to the removed sandbox closed")
    # the other sandbox is untouched: its held stream is alive and new calls work
    assert list(kept) == [b"echo:a", b"echo:b"]
    assert not kept_call.ended.is_set()
    kept_stream.cancel()
    again = channels(p, "doomed")
    error = rpc_error(lambda: again.unary(b"x", timeout=CALL_TIMEOUT))
    assert error.code() == PROXY_502 and error.details() == "The sandbox was not found"
    # added back: its calls go through again, on a new connection
    p.write_registry(sandboxes(grpc_backend.port,
                               doomed={"host": "127.0.0.1", "ports": {PORT: grpc_backend.port}}))

    def reachable() -> bool:
        try:
            return again.unary(b"back", timeout=CALL_TIMEOUT) == b"back"
        except grpc.RpcError as exc:
            assert exc.code() == PROXY_502, (exc.code(), exc.details())
            return False

    wait_for(reachable, APPLY_WITHIN, "the re-added sandbox reachable")



def test_idle_backend_connection_is_closed_and_reopened(grpc_proxy, grpc_backend, channels):
    """The shared h2c connection is closed once it has carried no call for [timeouts]
    upstream_idle, never while a call is under way (a stream held open longer than that
    completes), and the next call opens a new one."""
    p = grpc_proxy(config={"timeouts": {"upstream_idle": 0.5}})
    echo = channels(p)
    call = echo.count(json.dumps({"n": 2, "hold": 1.5}).encode(), timeout=CALL_TIMEOUT)
    assert list(call) == [b"0", b"1"]
    assert call.code() == grpc.StatusCode.OK
    [held] = grpc_backend.wait_calls("Count")
    assert not held.cut_short
    wait_for(lambda: connections_to(p.pid, grpc_backend.port) == 0, 10,
             "the idle backend connection closed")
    assert echo.unary(b"again", timeout=CALL_TIMEOUT) == b"again"
    [again] = grpc_backend.wait_calls("Unary")
    assert again.peer != held.peer  # a new connection

# -- accounting ------------------------------------------------------------------------------------

def test_metrics_and_access_log_count_grpc_calls(grpc_proxy, channels):
    """/metrics counts native gRPC calls with http="grpc" (POST, protocol http, from the backend;
    the proxy's own gRPC answer apart, origin proxy), and each call's access log line says
    "http": "grpc" with its method path, status and outcome."""
    p = grpc_proxy()
    echo = channels(p)
    for i in range(3):
        assert echo.unary(b"%d" % i, timeout=CALL_TIMEOUT) == b"%d" % i
    assert list(echo.count(json.dumps({"n": 2}).encode(), timeout=CALL_TIMEOUT)) == [b"0", b"1"]
    unknown = channels(p, "nope")
    assert rpc_error(lambda: unknown.unary(b"x", timeout=CALL_TIMEOUT)).code() == PROXY_502

    def requests() -> dict[frozenset, float]:
        return {labels: v for (name, labels), v in scrape(p).items()
                if name == "sandbox_proxy_requests_total" and v}

    relayed = frozenset({"code_class": "2xx", "method": "POST", "protocol": "http",
                         "origin": "backend", "http": "grpc"}.items())
    wait_for(lambda: sum(requests().values()) >= 5, 5, "5 gRPC calls in /metrics")
    counted = requests()
    assert counted.pop(relayed) == 4, counted
    [(labels, n)] = counted.items()  # the proxy's own answer, counted apart
    assert n == 1 and dict(labels)["origin"] == "proxy" and dict(labels)["http"] == "grpc"

    wait_for(lambda: len(access_log(p)) >= 5, 5, "5 access log lines")
    lines = access_log(p)
    assert len(lines) == 5, lines
    assert {line["http"] for line in lines} == {"grpc"}
    *ok, refused = lines
    assert [line["path"] for line in ok] == ["/test.Echo/Unary"] * 3 + ["/test.Echo/Count"]
    for line in ok:
        assert line["method"] == "POST" and line["status"] == 200 and line["outcome"] == "ok"
        assert line["sandbox_id"] == "grpc" and line["port"] == PORT
        assert line["host"] == authority()
    assert refused["outcome"] == "SandboxNotFound" and refused["host"] == authority("nope")


# -- TLS -------------------------------------------------------------------------------------------

def test_grpc_over_tls_with_alpn_h2(proxy, grpc_backend, tmp_path):
    """A gRPC client over TLS (ALPN h2, the proxy's certificate checked against its CA) reaches the
    sandbox like an h2c one; the backend is told the client used https."""
    ca = trustme.CA()
    cert = ca.issue_cert("*.sbx.example.test")
    cert_path, key_path = tmp_path / "edge.pem", tmp_path / "edge-key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    p = proxy(sandboxes=sandboxes(grpc_backend.port),
              config={"server": {"tls": {"cert": str(cert_path), "key": str(key_path)}}})
    host = authority("grpc").replace(".localhost", ".sbx.example.test")
    channel = proxy_channel(p.port, host, root_certificates=ca.cert_pem.bytes())
    try:
        echo = Echo(channel)
        seen = json.loads(echo.describe(b"", timeout=CALL_TIMEOUT))
        call = echo.count(json.dumps({"n": 5}).encode(), timeout=CALL_TIMEOUT)
        assert list(call) == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        channel.close()
    metadata = dict(map(tuple, seen["metadata"]))
    assert metadata["x-forwarded-proto"] == "https"
    assert metadata["x-forwarded-host"] == host


# -- gRPC-Web is not native gRPC -------------------------------------------------------------------

def test_grpc_web_over_h2c_takes_the_http1_path(proxy, backend):
    """A gRPC-Web request (application/grpc-web+proto) from an HTTP/2 client is an ordinary
    request: it reaches an HTTP/1.1-only backend as HTTP/1.1 with its content type and body
    intact (native gRPC would have been sent over h2c, which that backend cannot speak)."""
    p = proxy(sandboxes={"web": {"host": "127.0.0.1", "ports": {PORT: backend.port}}})
    body = b"\x00\x00\x00\x00\x05hello"
    response = h2c_request(p.port, authority("web"), "/test.Echo/Unary", [
        ("content-type", "application/grpc-web+proto"), ("x-grpc-web", "1"),
        ("content-length", str(len(body)))], body)
    assert response.reset is None and response.status == 200, response
    echo = json.loads(response.body)
    assert echo["version"] == "1.1"
    assert echo["method"] == "POST" and echo["raw_path"] == "/test.Echo/Unary"
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["content-type"] == "application/grpc-web+proto"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()

    # the same request as native gRPC is sent over h2c: the HTTP/1.1 backend cannot answer it,
    # and the client gets a gRPC status, not the backend's HTTP/1.1 error
    response = h2c_request(p.port, authority("web"), "/test.Echo/Unary", [
        ("content-type", "application/grpc"), ("te", "trailers")], body)
    assert response.reset is None, response
    fields = dict(response.headers + response.trailers)
    assert fields.get("grpc-status") == "14", response
