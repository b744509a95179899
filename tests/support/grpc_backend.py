"""A real gRPC server (grpcio) behind the proxy as a sandbox's backend (tests/e2e/test_grpc.py).

No protoc, no generated code: the service ``test.Echo`` is a generic handler whose messages are
raw bytes (no serializers), and the requests that need parameters carry them as JSON.

Methods (``/test.Echo/<Name>``):

``Unary`` (unary-unary)
    Answers the request bytes unchanged.
``Describe`` (unary-unary)
    Answers JSON ``{"metadata": [[key, value], ...], "peer": ..., "time_remaining": ...}``: the
    metadata the call arrived with (binary ``-bin`` values as latin-1 text), the connection's peer
    address (``ipv4:127.0.0.1:PORT``: one value per TCP connection) and the deadline the call
    carried (grpc-timeout; ``null`` without one).
``Fail`` (unary-unary)
    ``{"code": "NOT_FOUND", "details": "...", "trailers": [[key, value], ...]}``: ends the call
    with that status, details and trailing metadata (``-bin`` values given as latin-1 text).
``Sleep`` (unary-unary)
    ``{"seconds": S}``: holds the call for ``S`` seconds, or until it ends (deadline, cancel).
``Gather`` (unary-unary)
    Waits at ``GrpcBackend.barrier`` (a ``threading.Barrier``): only as many calls at once as the
    barrier has parties get through, so the calls must really be concurrent. Answers the peer.
``Count`` (unary-stream)
    ``{"n": N, "hold": S, "fail": {"code": ..., "details": ...}}``: sends ``b"0"``, ``b"1"``, ...
    ``N-1``; then, with ``hold``, holds the call open (nothing more is sent) for ``S`` seconds or
    until the call ends; then, with ``fail``, ends with that status.
``Collect`` (stream-unary)
    Answers JSON ``{"count", "length", "sha256"}`` of the messages received, in order.
``Chat`` (stream-stream)
    Answers each message ``m`` with ``b"echo:" + m`` as it arrives.

Every call is recorded (``GrpcBackend.calls``: a ``CallRecord`` each, with the metadata, peer and
deadline it arrived with and an event set when the call ends, noting whether it ended before the
handler finished: cancelled by the client, the proxy, or the deadline).

Run in this process (``GrpcBackend(...).start()``, thread pool of its own), or as a separate
process a test can SIGKILL (``python tests/support/grpc_backend.py --port N`` prints
``READY <port>``; ``support.faulty_backends.BackendProcess("grpc_backend.py")`` runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

SERVICE = "test.Echo"
MiB = 1 << 20
MAX_MESSAGE = 8 * MiB  # both ends allow messages this large (the tests send 4 MiB)


@dataclass
class CallRecord:
    method: str
    metadata: list[tuple[str, str]]
    peer: str
    time_remaining: float | None
    ended: threading.Event = field(default_factory=threading.Event)
    handler_done: bool = False
    cut_short: bool = False  # the call ended (cancel, deadline, connection lost) mid-handler

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.metadata if k == name]


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _metadata_out(pairs: list) -> list[tuple[str, Any]]:
    return [(k, v.encode("latin-1") if k.endswith("-bin") else v) for k, v in pairs]


class GrpcBackend:
    """The ``test.Echo`` service on a grpcio server bound to ``host:port`` (0: a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, workers: int = 64):
        self.host = host
        self.requested_port = port
        self.workers = workers
        self.port = 0
        self.server: grpc.Server | None = None
        self.calls: list[CallRecord] = []
        self.barrier: threading.Barrier | None = None
        self._lock = threading.Condition()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> GrpcBackend:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="grpc-backend"),
            options=[("grpc.max_send_message_length", MAX_MESSAGE),
                     ("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((self._handler(),))
        self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if not self.port:
            raise RuntimeError(f"grpc backend could not bind {self.host}:{self.requested_port}")
        server.start()
        self.server = server
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; calls under way are aborted (grace None or 0) or given ``grace`` s."""
        server, self.server = self.server, None
        if server is not None:
            server.stop(grace).wait(10)

    # -- what the calls saw ------------------------------------------------------------------
    def wait_calls(self, method: str, n: int = 1, timeout: float = 10.0) -> list[CallRecord]:
        """The first ``n`` calls of ``method``, once they have arrived."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [c for c in self.calls if c.method == method]
                if len(found) >= n:
                    return found[:n]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{n} call(s) of {method} not seen within {timeout} s "
                                         f"(seen: {[c.method for c in self.calls]})")
                self._lock.wait(left)

    def peers(self, method: str | None = None) -> set[str]:
        with self._lock:
            return {c.peer for c in self.calls if method is None or c.method == method}

    # -- the service ---------------------------------------------------------------------------
    def _record(self, method: str, context: grpc.ServicerContext) -> CallRecord:
        record = CallRecord(method, [(k, _text(v)) for k, v in context.invocation_metadata()],
                            context.peer(), context.time_remaining())

        def ended() -> None:
            if not record.handler_done:
                record.cut_short = True
            record.ended.set()

        if not context.add_callback(ended):  # already over
            record.cut_short = True
            record.ended.set()
        with self._lock:
            self.calls.append(record)
            self._lock.notify_all()
        return record

    def _handler(self) -> grpc.GenericRpcHandler:
        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            record = self._record("Unary", context)
            record.handler_done = True
            return request

        def describe(request: bytes, context: grpc.ServicerContext) -> bytes:
            record = self._record("Describe", context)
            record.handler_done = True
            return json.dumps({"metadata": record.metadata, "peer": record.peer,
                               "time_remaining": record.time_remaining}).encode()

        def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
            record = self._record("Fail", context)
            spec = json.loads(request)
            record.handler_done = True
            if spec.get("headers"):
                context.send_initial_metadata(_metadata_out(spec["headers"]))
            if spec.get("trailers"):
                context.set_trailing_metadata(_metadata_out(spec["trailers"]))
            context.abort(grpc.StatusCode[spec["code"]], spec["details"])
            return b""  # not reached: abort raises

        def sleep(request: bytes, context: grpc.ServicerContext) -> bytes:
            record = self._record("Sleep", context)
            record.ended.wait(json.loads(request)["seconds"])
            record.handler_done = True
            return b"slept"

        def gather(request: bytes, context: grpc.ServicerContext) -> bytes:
            record = self._record("Gather", context)
            assert self.barrier is not None
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              "the calls did not arrive together")
            record.handler_done = True
            return record.peer.encode()

        def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            record = self._record("Count", context)
            spec = json.loads(request)
            for i in range(spec.get("n", 0)):
                yield b"%d" % i
            if spec.get("hold"):
                record.ended.wait(spec["hold"])
            record.handler_done = True
            failure = spec.get("fail")
            if failure and not record.ended.is_set():
                context.abort(grpc.StatusCode[failure["code"]], failure["details"])

        def collect(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            record = self._record("Collect", context)
            h = hashlib.sha256()
            n = length = 0
            for message in requests:
                n += 1
                length += len(message)
                h.update(message)
            record.handler_done = True
            return json.dumps({"count": n, "length": length, "sha256": h.hexdigest()}).encode()

        def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            record = self._record("Chat", context)
            for message in requests:
                yield b"echo:" + message
            record.handler_done = True

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Describe": grpc.unary_unary_rpc_method_handler(describe),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
            "Gather": grpc.unary_unary_rpc_method_handler(gather),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Collect": grpc.stream_unary_rpc_method_handler(collect),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        })


def main() -> None:
    parser = argparse.ArgumentParser(description="gRPC backend (test.Echo) for sandbox-proxy tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    backend = GrpcBackend(args.host, args.port).start()
    print(f"READY {backend.port}", flush=True)
    try:
        threading.Event().wait()
    finally:
        backend.stop()
        os._exit(0)


if __name__ == "__main__":
    main()
