"""The gRPC check: real grpcio calls through a target, before the gRPC scenario measures it.

h2load drives the load but reads neither gRPC messages nor trailers, so each target is first
checked with a real client: the unary call must return b"Hello, World!", a server stream of
CHECK_MESSAGES messages must deliver all of them, and the Authority method tells the :authority
the backend saw (the Host rewrite); each call must end with grpc-status 0 (OK).

Run as `python -m benchmarks.grpccheck PORT AUTHORITY`: prints one JSON object. A process of
its own, so that grpcio's threads never live in the harness, which forks the load generators.
`check(port, authority)` runs it and returns the parsed object.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

from benchmarks.procs import REPO_DIR

CHECK_MESSAGES = 1000
UNARY_REPLY = b"Hello, World!"
STREAM_MESSAGE = b"x" * 256  # what grpcbackend.js streams


def _calls(port: int, authority: str) -> dict:
    import grpc

    out: dict = {}
    options = [("grpc.default_authority", authority)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
        def call(name: str, fn):
            try:
                out[name] = fn()
            except grpc.RpcError as e:
                out[name + "_error"] = f"{e.code().name}: {e.details()}"

        unary = ch.unary_unary("/bench.Bench/Unary")
        call("unary", lambda: unary(UNARY_REPLY, timeout=10) == UNARY_REPLY)
        stream = ch.unary_stream("/bench.Bench/Stream")
        call("stream", lambda: sum(m == STREAM_MESSAGE for m in stream(
            struct.pack(">I", CHECK_MESSAGES), timeout=20)) == CHECK_MESSAGES)
        authority_of = ch.unary_unary("/bench.Bench/Authority")
        call("authority", lambda: authority_of(b"", timeout=10).decode(errors="replace"))
    return out


def check(port: int, authority: str) -> dict:
    """Run the check in a child process; {"error": ...} if it could not run at all."""
    try:
        cp = subprocess.run([sys.executable, "-m", "benchmarks.grpccheck", str(port), authority],
                            capture_output=True, text=True, timeout=60, cwd=REPO_DIR)
    except subprocess.TimeoutExpired:
        return {"error": "the grpcio check did not finish within 60 s"}
    try:
        return json.loads(cp.stdout)
    except ValueError:
        return {"error": (cp.stderr or cp.stdout).strip()[-300:] or f"exit {cp.returncode}"}


def problems(result: dict, want_authority: str) -> list[str]:
    """What is wrong with a check result (empty: the target passes gRPC correctly)."""
    if "error" in result:
        return [result["error"]]
    bad = [f"{k[:-6]} call failed: {v}" for k, v in result.items() if k.endswith("_error")]
    if result.get("unary") is False:
        bad.append(f"unary call did not return {UNARY_REPLY!r}")
    if result.get("stream") is False:
        bad.append(f"server stream did not deliver {CHECK_MESSAGES} messages")
    if "authority" in result and result["authority"] != want_authority:
        bad.append(f"HOST REWRITE WRONG: backend saw :authority {result['authority']!r}")
    return bad


def main() -> None:
    try:
        out = _calls(int(sys.argv[1]), sys.argv[2])
    except ImportError as e:
        out = {"error": f"grpcio is not installed ({e})"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
