"""The client side of tests/e2e/test_grpc.py: a grpcio channel that reaches a sandbox through the
proxy, the ``test.Echo`` methods (tests/support/grpc_backend.py) as callables, a one-request h2c
client (the ``h2`` library on a plain socket) for what grpcio cannot send, and what /proc says about
the proxy's connections to a backend.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field

import grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)

from support.grpc_backend import MAX_MESSAGE, SERVICE
from support.process import socket_inodes

TOKEN_HEADER = "e2b-traffic-access-token"  # [access] token_header's default


def proxy_channel(proxy_port: int, authority: str, max_message: int = MAX_MESSAGE,
                  root_certificates: bytes | None = None) -> grpc.Channel:
    """A grpcio channel to the proxy's listener whose calls carry ``authority``
    (``<port>-<sandboxId>.<domain>``) as :authority: h2c with prior knowledge, or, given the CA
    that signed the proxy's certificate, TLS (ALPN h2) with ``authority`` as the server name."""
    options = [
        ("grpc.default_authority", authority),
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        ("grpc.enable_retries", 0),  # a failed call is reported as it failed, never retried
        ("grpc.use_local_subchannel_pool", 1),  # a connection of its own, not a shared one
    ]
    target = f"127.0.0.1:{proxy_port}"
    if root_certificates is None:
        return grpc.insecure_channel(target, options=options)
    options.append(("grpc.ssl_target_name_override", authority))
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.secure_channel(target, credentials, options=options)


class Echo:
    """The methods of ``test.Echo`` on ``channel``, bytes in and bytes out."""

    def __init__(self, channel: grpc.Channel):
        def path(name: str) -> str:
            return f"/{SERVICE}/{name}"

        self.unary = channel.unary_unary(path("Unary"))
        self.describe = channel.unary_unary(path("Describe"))
        self.fail = channel.unary_unary(path("Fail"))
        self.sleep = channel.unary_unary(path("Sleep"))
        self.gather = channel.unary_unary(path("Gather"))
        self.count = channel.unary_stream(path("Count"))
        self.collect = channel.stream_unary(path("Collect"))
        self.chat = channel.stream_stream(path("Chat"))


# -- the proxy's connections, as the kernel sees them ----------------------------------------------

def connections_to(pid: int, port: int) -> int:
    """TCP connections in ESTABLISHED state that process ``pid`` (and its children) holds to
    remote port ``port``."""
    inodes = socket_inodes(pid)
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[3] == "01" and remote_port == port and fields[9] in inodes:
                    n += 1
    return n


# -- one request over h2c -------------------------------------------------------------------------

@dataclass
class H2Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    reset: int | None = None  # the RST_STREAM error code, if the stream was reset

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


def h2c_request(port: int, authority: str, path: str, headers: list[tuple[str, str]],
                body: bytes = b"", method: str = "POST", timeout: float = 10.0) -> H2Response:
    """One request on a fresh HTTP/2 prior-knowledge connection to 127.0.0.1:``port``; the whole
    response (head, body, trailers) or the stream's reset."""
    h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    response = H2Response()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        h2.initiate_connection()
        stream_id = h2.get_next_available_stream_id()
        h2.send_headers(stream_id, [(":method", method), (":scheme", "http"),
                                    (":authority", authority), (":path", path), *headers],
                        end_stream=not body)
        if body:
            h2.send_data(stream_id, body, end_stream=True)
        sock.sendall(h2.data_to_send())
        done = False
        while not done:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the proxy closed the connection before the response ended")
            for event in h2.receive_data(data):
                if isinstance(event, ResponseReceived) and event.stream_id == stream_id:
                    response.headers = [(k, v) for k, v in event.headers]
                    response.status = int(dict(response.headers)[":status"])
                elif isinstance(event, DataReceived) and event.stream_id == stream_id:
                    response.body += event.data
                    h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, TrailersReceived) and event.stream_id == stream_id:
                    response.trailers = [(k, v) for k, v in event.headers]
                elif isinstance(event, StreamEnded) and event.stream_id == stream_id:
                    done = True
                elif isinstance(event, StreamReset) and event.stream_id == stream_id:
                    response.reset = int(event.error_code)
                    done = True
                elif isinstance(event, ConnectionTerminated):
                    raise ConnectionError(f"GOAWAY from the proxy: {event.error_code}")
            sock.sendall(h2.data_to_send())
    return response
