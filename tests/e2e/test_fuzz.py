"""Fuzzing the edge with request heads on a raw socket (hypothesis, deterministic and bounded).

Generated requests range from valid to broken: methods, targets, versions, Host lines, header
names and values with odd bytes, line endings, Content-Length / Transfer-Encoding combinations,
chunk sizes, bodies, and bytes after the request. Each is sent on its own connection to one
running proxy (the real CLI, shared by the module) followed by a half-close, and the test checks:

- the process stays alive and logs no traceback;
- the connection ends (the proxy closes it) within the header timeout and a little more, and
  what came back is a sequence of complete, well-formed HTTP/1.1 responses;
- a request the proxy answered itself never reached the backend complete (the backend counts
  every byte, head and complete message it receives), a head it refused as too large or
  unsupported (405, 414, 431, 501) reached it not at all, and every answer of the backend
  reached the client;
- every request the backend did receive was rewritten as the proxy promises: one Host, no
  hop-by-hop headers, no Content-Length next to Transfer-Encoding, the proxy's own
  X-Forwarded-* headers.

All examples run; failures are grouped by kind and reported with the shortest reproduction of
each. At the end the proxy must hold no connection, fd or memory it did not hold before.
``SANDBOX_PROXY_FUZZ_EXAMPLES`` raises the number of examples for a longer local run.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from support.faulty_backends import ThreadedFaultyBackend
from support.process import REPO_ROOT, launch_proxy, standard_registry

sys.path.insert(0, str(REPO_ROOT))
from benchmarks.soak import ProxyProbe  # noqa: E402

pytestmark = pytest.mark.timeout(290)

EXAMPLES = int(os.environ.get("SANDBOX_PROXY_FUZZ_EXAMPLES", "1000"))
HEADER_TIMEOUT = 1.0
END_WITHIN = HEADER_TIMEOUT + 1.5  # the sweep fires within a quarter of the timeout; slack
HOST = b"3000-fuzz.localhost"
MiB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

ODD_BYTES = b"\x00\x01\t\x0b\x0c\r\n \"#%&'(),/:;<=>?@[\\]{}\x7f\x80\xc3\xa9\xff"


def odd_binary(max_size: int) -> st.SearchStrategy[bytes]:
    """Short byte strings mostly made of characters parsers disagree about."""
    return st.lists(st.one_of(st.sampled_from([bytes([b]) for b in ODD_BYTES]),
                              st.binary(min_size=1, max_size=3),
                              st.sampled_from([b"a", b"Z", b"0", b"-", b"_", b"."])),
                    max_size=max_size).map(b"".join)


METHODS = st.one_of(
    st.sampled_from([b"GET"] * 6 + [b"POST"] * 4 + [b"PUT", b"HEAD", b"DELETE", b"OPTIONS",
                                                    b"PATCH", b"TRACE", b"CONNECT"]),
    st.sampled_from([b"get", b"G ET", b"GET\x00", b"", b"PRI", b"M-SEARCH", b"PROPFIND",
                     b"QUERY", b"X" * 40, b"\xff\xfe", b"GET\t"]),
    odd_binary(6),
)

TARGETS = st.one_of(
    st.sampled_from([b"/echo"] * 8 + [b"/echo?a=1&b=%20", b"/echo/", b"/echo#frag", b"//echo",
                                      b"/%2e%2e/echo", b"/echo;p", b"*", b"", b"echo",
                                      b"/echo with space", b"/" + b"a" * 17000,
                                      b"http://3000-fuzz.localhost/echo",
                                      b"HTTP://3000-FUZZ.localhost:80/echo?x=1",
                                      b"https://3000-fuzz.localhost/echo",
                                      b"http://user@3000-fuzz.localhost/echo",
                                      b"http://3000-nothere.localhost/echo", b"ftp://x/echo",
                                      b"3000-fuzz.localhost:80", b"http:///echo"]),
    odd_binary(12).map(lambda suffix: b"/echo" + suffix),
)

VERSIONS = st.sampled_from([b"HTTP/1.1"] * 10 + [b"HTTP/1.0"] * 3 + [
    b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/11", b"http/1.1", b"", b"HTTP/1.1 x",
    b"HTTP/1.10", b"HTTP/9.9", b"HTTP/1.1\x00", b"HTTP/1"])

EOLS = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n"])

HOST_LINES = st.one_of(
    st.just([b"Host: " + HOST]),
    st.just([b"Host: " + HOST]),
    st.just([b"Host: " + HOST]),
    st.sampled_from([
        [], [b"Host: " + HOST, b"Host: " + HOST], [b"Host: " + HOST, b"Host: 3000-demo.localhost"],
        [b"Host: 3000-fuzz.localhost:8080"], [b"Host:" + HOST], [b"Host : " + HOST],
        [b"Host: " + HOST + b" "], [b"Host:\t" + HOST], [b"host: 3000-FUZZ.LOCALHOST"],
        [b"Host: " + HOST + b"."], [b"Host: 3000-fuzz.sbx.example.test"], [b"Host: "],
        [b"Host: " + HOST + b"\x00"], [b"Host: 3000-fuzz", b" .localhost"],
        [b"Host: " + HOST + b", 3000-demo.localhost"], [b"Host: [::1]"],
        [b"Host: 3000-nothere.localhost"], [b"Host: 99999-fuzz.localhost"],
        [b"Host: 3000-fuzz.localhost@3000-demo.localhost"],
    ]),
    odd_binary(20).map(lambda value: [b"Host: " + value]),
)

HEADER_NAMES = st.one_of(
    st.sampled_from([b"Connection", b"Upgrade", b"Expect", b"Keep-Alive", b"Proxy-Connection",
                     b"TE", b"Trailer", b"X-Forwarded-For", b"X-Forwarded-Host", b"Forwarded",
                     b"X-Real-IP", b"Cookie", b"Accept", b"User-Agent", b"E2b-Sandbox-Id",
                     b"X-Custom", b"Content-Type", b"Proxy-Authorization",
                     b"e2b-traffic-access-token"]),
    odd_binary(8),
)
HEADER_VALUES = st.one_of(
    st.sampled_from([b"close", b"keep-alive", b"upgrade", b"Upgrade, close", b"websocket",
                     b"100-continue", b"X-Custom", b"X-Custom, close", b"1.2.3.4", b"trailers",
                     b"chunked", b"", b"Mozilla/5.0", b"text/html", b"a" * 9000]),
    odd_binary(16),
)
SEPARATORS = st.sampled_from([b": "] * 6 + [b":", b" : ", b":\t", b"::", b""])
HEADERS = st.lists(st.tuples(HEADER_NAMES, SEPARATORS, HEADER_VALUES).map(b"".join), max_size=5)


@st.composite
def chunked_body(draw) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(min_size=1, max_size=40))
        size = b"%x" % len(data)
        size = draw(st.sampled_from([size, size, size.upper(), b"0" + size, size + b" ",
                                     size + b";ext=1", size + b";" + b"e" * 100]))
        parts.append(size + b"\r\n" + data + b"\r\n")
    last = draw(st.sampled_from([b"0\r\n\r\n"] * 4 + [b"0\r\nX-Trailer: t\r\n\r\n",
                                                     b"0\r\nContent-Length: 5\r\n\r\n",
                                                     b"0;x\r\n\r\n", b"00\r\n\r\n"]))
    return b"".join(parts) + last


BAD_CHUNKS = st.sampled_from([
    b"zz\r\nhello\r\n0\r\n\r\n", b"-1\r\nhello\r\n0\r\n\r\n", b"ffffffffffffffffff\r\nx\r\n",
    b"5 ;x\r\nhello\r\n0\r\n\r\n", b"0x5\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n",
    b"5\nhello\n0\n\n", b"5\r\nhel", b"5\r\nhello\r\n", b"\r\n\r\n", b"3\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n", b"5\r\nhello\r\n0\r\nX: " + b"t" * 100 + b"\r\n\r\n",
])


@st.composite
def framing(draw, wild: bool = True) -> tuple[list[bytes], bytes]:
    """(framing header lines, body bytes) as a client might send them, right or wrong."""
    kinds = ["none"] * 6 + ["length"] * 4 + ["chunked"] * 3
    if wild:
        kinds += ["length_short", "length_long", "length_invalid", "length_twice_same",
                  "length_twice_different", "bad_chunks", "te_and_length", "te_other",
                  "te_twice"]
    kind = draw(st.sampled_from(kinds))
    body = draw(st.binary(max_size=64))
    n = len(body)
    te = b"Transfer-Encoding: chunked"
    if kind == "none":
        return [], b""
    if kind == "length":
        return [b"Content-Length: %d" % n], body
    if kind == "chunked":
        return [te], draw(chunked_body())
    if kind == "length_short":  # fewer bytes than announced, then the half-close
        return [b"Content-Length: %d" % (n + draw(st.integers(1, 100)))], body
    if kind == "length_long":  # more bytes than announced: the rest is the next "request"
        return [b"Content-Length: %d" % n], body + draw(odd_binary(20))
    if kind == "length_invalid":
        value = draw(st.sampled_from([b"-1", b"+5", b"0x5", b"5 5", b"", b"abc", b"5.0",
                                      b"99999999999999999999", b" 5", b"5,5", b"5, 6", b"\x005"]))
        return [b"Content-Length: " + value], b"hello"
    if kind == "length_twice_same":
        return [b"Content-Length: 5", b"Content-Length: 5"], b"hello"
    if kind == "length_twice_different":
        return [b"Content-Length: 5", b"Content-Length: 6"], b"hello!"
    if kind == "bad_chunks":
        return [te], draw(BAD_CHUNKS)
    if kind == "te_and_length":
        return draw(st.permutations([te, b"Content-Length: 5"])), draw(chunked_body())
    if kind == "te_other":
        value = draw(st.sampled_from([b"chunked, chunked", b"gzip, chunked", b"chunked, gzip",
                                      b"identity", b"gzip", b"xchunked", b" chunked",
                                      b"chunked\x00", b"CHUNKED", b"chunked;q=1", b"chunked ",
                                      b"\tchunked", b"chunk", b"chunked\x0b"]))
        return [b"Transfer-Encoding: " + value], draw(chunked_body())
    return [b"Transfer-Encoding: gzip", te], draw(chunked_body())  # te_twice


SECOND_REQUESTS = st.sampled_from([
    b"GET /echo?second HTTP/1.1\r\nHost: 3000-fuzz.localhost\r\n\r\n",
    b"POST /echo?third HTTP/1.1\r\nHost: 3000-fuzz.localhost\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /echo?other HTTP/1.1\r\nHost: 3000-demo.localhost\r\n\r\n",
])
TAILS = st.one_of(st.just(b""), st.just(b""), st.just(b""), SECOND_REQUESTS, odd_binary(30))

# The same parts, each always valid (and still varied): most requests are sane but for one or
# two parts, so the proxy's forwarding path is exercised as much as its rejections.
SANE = {
    "method": st.sampled_from([b"GET", b"GET", b"POST", b"PUT", b"HEAD", b"DELETE",
                               b"OPTIONS", b"PATCH"]),
    "target": st.sampled_from([b"/echo", b"/echo", b"/echo?a=1&b=%20", b"/echo/x",
                               b"http://3000-fuzz.localhost/echo", b"/echo;p?q#f"]),
    "version": st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]),
    "eol": st.just(b"\r\n"),
    "host": st.sampled_from([[b"Host: " + HOST], [b"Host: 3000-fuzz.localhost:8080"],
                             [b"host: 3000-FUZZ.LOCALHOST"],
                             [b"Host: 3000-fuzz.sbx.example.test"]]),
    "headers": st.lists(st.tuples(
        st.sampled_from([b"Connection", b"Keep-Alive", b"Proxy-Connection", b"TE", b"Trailer",
                         b"X-Forwarded-For", b"Forwarded", b"X-Real-IP", b"Cookie", b"Accept",
                         b"X-Custom", b"Content-Type", b"Proxy-Authorization",
                         b"e2b-traffic-access-token", b"Expect"]),
        st.sampled_from([b"close", b"keep-alive", b"X-Custom", b"X-Custom, close", b"1.2.3.4",
                         b"trailers", b"a=b; c=d", b"text/plain", b"100-continue", b""])
    ).map(lambda kv: kv[0] + b": " + kv[1]), max_size=5),
    "framing": framing(wild=False),
    "tail": st.sampled_from([b"", b"", b"", b""]) | SECOND_REQUESTS,
}
WILD = {
    "method": METHODS, "target": TARGETS, "version": VERSIONS, "eol": EOLS,
    "host": HOST_LINES, "headers": HEADERS, "framing": framing(), "tail": TAILS,
}


@st.composite
def requests(draw) -> bytes:
    wild_parts = draw(st.sampled_from([0, 0, 1, 1, 2, 8]))
    wild = set(draw(st.permutations(list(SANE)))[:wild_parts])
    part = {name: draw(WILD[name] if name in wild else SANE[name]) for name in SANE}
    request_line = draw(st.sampled_from([
        lambda m, t, v: m + b" " + t + b" " + v,
        lambda m, t, v: m + b" " + t + b" " + v,
        lambda m, t, v: m + b" " + t + b" " + v,
        lambda m, t, v: m + b"  " + t + b" " + v,
        lambda m, t, v: m + b" " + t,
        lambda m, t, v: m + b"\t" + t + b"\t" + v,
    ]) if "version" in wild else st.just(lambda m, t, v: m + b" " + t + b" " + v))(
        part["method"], part["target"], part["version"])
    frame_lines, body = part["framing"]
    lines = draw(st.permutations(part["host"] + part["headers"] + frame_lines))
    eol = part["eol"]
    head = eol.join([request_line, *lines]) + eol + eol
    return head + body + part["tail"]


# --------------------------------------------------------------------------------------------
# One exchange on a raw socket, and what came back
# --------------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def from_backend(self) -> bool:
        """Answered by the fuzzed sandbox's backend (tests/faulty_backends.py)."""
        return self.header(b"x-backend") == b"faulty"

    @property
    def from_proxy(self) -> bool:
        """Made by the proxy itself (every test backend names itself in X-Backend)."""
        return self.header(b"x-backend") is None


def exchange(port: int, data: bytes) -> tuple[bytes, str, float]:
    """Send `data`, half-close, read until the proxy closes: (bytes, "eof"/"reset"/"open",
    seconds)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    started = time.monotonic()
    received = bytearray()
    how = "open"
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        while True:
            left = END_WITHIN - (time.monotonic() - started)
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(1 << 16)
            except socket.timeout:
                break
            except OSError:
                how = "reset"
                break
            if not chunk:
                how = "eof"
                break
            received += chunk
    finally:
        sock.close()
    return bytes(received), how, time.monotonic() - started


def parse_responses(raw: bytes, head_request: bool) -> tuple[list[Response], str | None]:
    """Split what the proxy sent into responses; the problem with it, if any."""
    responses: list[Response] = []
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\r\n\r\n", pos)
        if end < 0:
            return responses, f"an incomplete response head: {raw[pos:pos + 120]!r}"
        lines = raw[pos:end].split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or status_line[0] != b"HTTP/1.1" or not status_line[1].isdigit():
            return responses, f"not an HTTP/1.1 status line: {lines[0][:120]!r}"
        status = int(status_line[1])
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                return responses, f"malformed response header line {line[:120]!r}"
            headers.append((name, value.strip()))
        pos = end + 4
        r = Response(status, headers, b"")
        if head_request and not responses and r.header(b"connection") == b"close" \
                and r.header(b"content-length") == b"%d" % (len(raw) - pos):
            head_request = False  # a request rejected before its method counted: body and close
        if (head_request and not responses) or status in (204, 304) or 100 <= status < 200:
            if 100 <= status < 200:
                continue  # interim; the final response follows
            responses.append(r)
            continue
        te, cl = r.header(b"transfer-encoding"), r.header(b"content-length")
        if te is not None:
            if te.lower() != b"chunked":
                return responses, f"response transfer-encoding {te!r}"
            body = bytearray()
            while True:
                line_end = raw.find(b"\r\n", pos)
                if line_end < 0:
                    return responses, "a chunked response body without its last chunk"
                try:
                    size = int(raw[pos:line_end].split(b";")[0], 16)
                except ValueError:
                    return responses, f"bad chunk size line {raw[pos:line_end][:60]!r}"
                pos = line_end + 2
                if size == 0:
                    trailer_end = raw.find(b"\r\n", pos)
                    while trailer_end > pos:  # trailer lines
                        pos = trailer_end + 2
                        trailer_end = raw.find(b"\r\n", pos)
                    if trailer_end < 0:
                        return responses, "an incomplete trailer section"
                    pos = trailer_end + 2
                    break
                if pos + size + 2 > len(raw):
                    return responses, "a chunked response body cut short"
                body += raw[pos:pos + size]
                pos += size + 2
            r.body = bytes(body)
        elif cl is not None:
            n = int(cl)
            if pos + n > len(raw):
                return responses, f"a response body of {len(raw) - pos} of {n} bytes"
            r.body = raw[pos:pos + n]
            pos += n
        else:
            return responses, "a response delimited by the close (never sent to HTTP/1.1)"
        responses.append(r)
    return responses, None


# Answers decided on the first request's head alone, after which the connection is closed:
# not one byte of that connection may reach a backend.
HEAD_REJECTIONS = (405, 414, 431, 501)
HOP_BY_HOP = {"keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
              "trailer", "upgrade"}


def forwarded_problems(echo: dict) -> list[str]:
    """What is wrong with a request as the backend received it."""
    problems = []
    names: dict[str, list[str]] = {}
    for name, value in echo["headers"]:
        names.setdefault(name.lower(), []).append(value)
    if len(names.get("host", [])) != 1:
        problems.append(f"the backend received {len(names.get('host', []))} Host headers")
    for name in HOP_BY_HOP & names.keys():
        problems.append(f"hop-by-hop header {name} forwarded")
    te = names.get("transfer-encoding", [])
    if te and (te != ["chunked"] or "content-length" in names):
        problems.append(f"forwarded framing: transfer-encoding {te}, content-length "
                        f"{names.get('content-length')}")
    if len(names.get("content-length", [])) > 1:
        problems.append(f"forwarded content-length {names['content-length']}")
    for value in names.get("connection", []):
        tokens = {t.strip().lower() for t in value.split(",")}
        if not tokens <= {"te", "upgrade"}:
            problems.append(f"forwarded Connection: {value}")
    if names.get("x-forwarded-for") != ["127.0.0.1"]:
        problems.append(f"forwarded X-Forwarded-For {names.get('x-forwarded-for')}")
    for name in ("forwarded", "x-real-ip", "e2b-traffic-access-token"):
        if name in names:
            problems.append(f"{name} from an untrusted client forwarded")
    return problems


# --------------------------------------------------------------------------------------------
# The module's proxy and the checks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tmp_path_factory, backend, refused_port):
    faulty = ThreadedFaultyBackend().start()
    registry = standard_registry(backend.port, refused_port)
    registry["fuzz"] = {"host": "127.0.0.1", "ports": {3000: faulty.port}}
    # upstream_idle 2 s: pooled backend connections are gone by the end, so the open fds must
    # come back exactly to the baseline
    p = launch_proxy(tmp_path_factory.mktemp("fuzz-proxy"), registry,
                     config={"timeouts": {"client_header": HEADER_TIMEOUT, "upstream_idle": 2.0}})
    yield p, faulty
    p.stop()
    faulty.stop()


@dataclass
class Findings:
    """Problems by kind, with the shortest request that showed each."""

    by_kind: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    examples: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, data: bytes, detail: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        known = self.by_kind.get(kind)
        if known is None or len(data) < len(known[0]):
            self.by_kind[kind] = (data, detail)

    def report(self) -> str:
        lines = [f"{sum(self.counts.values())} problems in {self.examples} examples:"]
        for kind, (data, detail) in sorted(self.by_kind.items()):
            lines.append(f"- {kind} (x{self.counts[kind]}): {detail}\n  shortest request: "
                         f"{data!r}")
        return "\n".join(lines)


def backend_counters(faulty: ThreadedFaultyBackend) -> dict[str, int]:
    return {k: v for k, v in faulty.state.items() if isinstance(v, int)}


def check_one(p, faulty: ThreadedFaultyBackend, data: bytes, findings: Findings,
              stderr_seen: int) -> int:
    before = backend_counters(faulty)
    raw, how, took = exchange(p.port, data)
    time.sleep(0.01)  # let the backend finish what the proxy sent it
    delta = {k: v - before[k] for k, v in backend_counters(faulty).items()}
    findings.examples += 1
    if not p.alive():
        findings.add("the proxy process died", data, f"exit status {p.proc.returncode}")
        return stderr_seen
    stderr = p.stderr()
    new_log = stderr[stderr_seen:]
    for marker in ("Traceback", "Exception in callback", " ERROR "):
        if marker in new_log:
            findings.add(f"the proxy logged {marker.strip()!r}", data,
                         new_log[new_log.find(marker):][:600])
            break
    if how == "open":
        findings.add("neither answered nor closed in time", data,
                     f"still open after {END_WITHIN} s, received {raw[:200]!r}")
        return len(stderr)
    responses, problem = parse_responses(raw, data.startswith(b"HEAD "))
    if problem is not None and how != "reset":
        findings.add("malformed or incomplete response", data, f"{problem}; received "
                                                               f"{raw[:300]!r}")
    outcome = ",".join(str(r.status) + ("p" if r.from_proxy else "b") for r in responses)
    findings.outcomes[outcome or how] = findings.outcomes.get(outcome or how, 0) + 1
    from_backend = [r for r in responses if r.from_backend]
    if delta["answered"] != len(from_backend):
        findings.add("backend answers lost or invented", data,
                     f"the backend answered {delta['answered']}, the client got "
                     f"{len(from_backend)} of its answers: {outcome}")
    if delta["messages"] > len(from_backend):
        findings.add("a request the proxy answered itself reached the backend", data,
                     f"{delta['messages']} complete requests at the backend, {outcome}")
    if responses and responses[0].from_proxy and responses[0].status in HEAD_REJECTIONS \
            and delta["bytes_received"]:
        findings.add("a rejected head reached the backend", data,
                     f"{responses[0].status} {responses[0].body[:100]!r} while the backend "
                     f"received {delta['bytes_received']} bytes")
    for r in from_backend:
        if r.status == 200 and r.body:
            for issue in forwarded_problems(json.loads(r.body)):
                findings.add(issue.split(":")[0].split(" [")[0], data, issue)
    return len(stderr)


async def sane(p, baseline) -> list[str]:
    probe = ProxyProbe(p.pid, p.metrics_url)
    _, problems, _ = await probe.settle(baseline, 10.0, rss_tolerance=32 * MiB)
    return problems


def test_fuzzed_request_heads(target):
    p, faulty = target
    probe = ProxyProbe(p.pid, p.metrics_url)
    baseline = asyncio.run(probe.sample())
    findings = Findings()
    seen = [len(p.stderr())]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=(Phase.explicit, Phase.generate),
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def run(data: bytes) -> None:
        seen[0] = check_one(p, faulty, data, findings, seen[0])

    started = time.monotonic()
    run()
    elapsed = time.monotonic() - started
    leaks = asyncio.run(sane(p, baseline))
    if leaks:
        findings.add("not back to the baseline after the run", b"", "; ".join(leaks))
    top = sorted(findings.outcomes.items(), key=lambda kv: -kv[1])[:12]
    print(f"fuzz: {findings.examples} requests in {elapsed:.1f} s; outcomes "
          f"(status, b = backend, p = proxy): {top}")
    assert not findings.by_kind, findings.report()
