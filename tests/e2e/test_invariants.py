"""Differential invariants: what clients sent against what each sandbox's backend received.

Hypothesis generates traffic: one to three client connections at once, each a burst of pipelined
requests written in one or two sends, to several sandboxes (two open, two with a traffic token, one
unknown), with or without credentials (token header, browser cookie, `?access_token`, each valid,
wrong or the other sandbox's), `Connection` options naming arbitrary headers (framing, Host,
X-Forwarded-For, the credentials, random names), bodies framed by Content-Length or chunked (with
extensions and trailers, some trailers a forged X-Forwarded-For or a token; some bodies are
themselves requests), HEAD requests, and upgrades the backend accepts or refuses. Every request
carries a marker, in its path and in X-Test-Id. Every sandbox has a recording backend of its own
(tests/recording_backend.py) that parses strictly and answers as the request's `script=` asks,
sometimes with hostile answers (an extra unsolicited response, a body after a HEAD response's head,
a `Connection: Content-Length` response, a close mid-body).

After each example the checks are:

- every request a backend received is one the client sent to THAT sandbox, once (an idempotent
  one may be retried, RFC 9110 9.2.2), with the same method, the same target (less the
  `access_token` credential) and exactly the body the client framed; what the proxy sent parses
  strictly and leaves nothing unread;
- each client connection received one response per request, in request order (the backend echoes
  the marker), each from the right sandbox and with the body the backend sent;
- no token value (header, cookie or query) reached any backend outside a tunnel;
- nothing a client sent to one sandbox (markers anywhere in the bytes) reached another's backend;
- a request the proxy answered itself (403, 302, 502), or that was never answered, reached no
  backend; the proxy's own answers are the ones the access rules predict;
- after a 101 the bytes that follow the upgrade request reach that backend, and only it, verbatim.

All examples run (no shrinking, no database): problems are grouped by kind and reported with the
smallest example that showed each. The proxy (the real CLI) and the backends are shared by every
example. Deterministic: ``derandomize=True``; ``SANDBOX_PROXY_FUZZ_EXAMPLES`` sets the number of
examples (``make fuzz`` runs 2000).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from support.process import launch_proxy
from support.raw_http import IncompleteResponse, RawConn
from support.recording_backend import RecordingFleet, StrictParseError, expected_body, parse_request

pytestmark = pytest.mark.timeout(1800)

EXAMPLES = int(os.environ.get("SANDBOX_PROXY_FUZZ_EXAMPLES", "120"))
READ_TIMEOUT = 2.5  # a local backend answers in milliseconds: longer is a hang

TOKENS = {"gamma": "tok-gamma-7Qx9", "delta": "tok-delta-k2Pz"}
WRONG = "nope-wrong-tok"
SECRETS = [*TOKENS.values(), WRONG]
OPEN = ("alpha", "beta")
LOCKED = tuple(TOKENS)
UNKNOWN = "ghost"
TOKEN_HEADER = "e2b-traffic-access-token"
COOKIE = "sandbox-access-token"
MARKER = re.compile(rb"i\d+x(?:s)?")
# A proxy may retry these on a new connection when the first one failed (RFC 9110 9.2.2)
IDEMPOTENT = {"GET", "HEAD", "OPTIONS", "PUT", "DELETE"}


# --------------------------------------------------------------------------------------------
# Generated traffic
# --------------------------------------------------------------------------------------------

@dataclass
class Spec:
    """One request as generated (the marker is given when it is sent)."""

    sandbox: str
    method: str
    suffix: str
    script: str
    upgrade: bool
    creds: dict  # kind (header | cookie | query) -> valid | wrong | other
    options: list[str]  # Connection options
    framing: str  # none | length | chunked
    body: bytes | None  # None: a body that is itself a request (made with the marker)
    chunk_cuts: list[int]
    chunk_ext: bool
    trailers: str | None  # marker (X-Trailer) | forwarded (a forged X-Forwarded-For) | token
    hop: bool
    forged_xff: bool
    query_first: bool
    order_seed: int


@dataclass
class Sent:
    spec: Spec
    marker: str
    data: bytes
    start: int  # offset in the connection's stream
    end: int
    body: bytes
    target: str
    host: str


OPTION_NAMES = ["content-length", "transfer-encoding", "host", "x-forwarded-for", "x-test-id",
                "x-hop", "x-random-opt", "cookie", TOKEN_HEADER, "keep-alive", "te",
                "authorization", "x-forwarded-host"]
CASES = [str.lower, str.title, str.upper]
SUFFIXES = ["", "a", "a/b", "x.y", "%2F", "~u", "z-1"]
PLAIN_SCRIPTS = ["ok"] * 8 + ["chunked"] * 2 + ["refuse", "extra1", "extra2", "extrachunked",
                                                  "extrabig", "connopt", "closemid"]


@st.composite
def request_specs(draw) -> Spec:
    sandbox = draw(st.sampled_from(["alpha"] * 3 + ["beta"] * 2 + ["gamma"] * 3 + ["delta"]
                                   + [UNKNOWN]))
    upgrade = draw(st.integers(0, 7)) == 0
    creds: dict = {}
    if sandbox in LOCKED:
        auth = draw(st.sampled_from(["header", "header", "cookie", "cookie", "query", "none",
                                     "mixed", "mixed"]))
        if auth in ("header", "cookie", "query"):
            creds[auth] = "valid"
        elif auth == "mixed":
            for kind in ("header", "cookie", "query"):
                value = draw(st.sampled_from([None, None, "valid", "wrong", "other"]))
                if value:
                    creds[kind] = value
    else:
        for kind in ("header", "cookie"):
            if draw(st.integers(0, 4)) == 0:
                creds[kind] = draw(st.sampled_from(["valid", "wrong", "other"]))
    options = [draw(st.sampled_from(CASES))(name) for name in
               draw(st.lists(st.sampled_from(OPTION_NAMES), max_size=3, unique=True))]
    if upgrade:
        method = "GET"
        options.append(draw(st.sampled_from(CASES))("upgrade"))
        script = draw(st.sampled_from(["accept", "accept", "refuse"]))
        framing, body = "none", b""
    else:
        if draw(st.integers(0, 11)) == 0:
            options.append("close")
        method = draw(st.sampled_from(["GET", "GET", "POST", "POST", "PUT", "PATCH", "DELETE",
                                       "OPTIONS", "HEAD"]))
        script = draw(st.sampled_from(["ok", "ok", "headbody"] if method == "HEAD"
                                      else PLAIN_SCRIPTS))
        framing = draw(st.sampled_from(["none"] * 3 + ["length"] * 3 + ["chunked"] * 2))
        if framing == "none":
            body = b""
        elif draw(st.integers(0, 4)) == 0:
            body = None  # a request inside the body
        else:
            body = draw(st.binary(max_size=48))
    draw_options = draw(st.permutations(options))
    cuts = draw(st.lists(st.integers(1, 64), max_size=3))
    return Spec(
        sandbox=sandbox, method=method,
        suffix=draw(st.sampled_from(SUFFIXES)), script=script, upgrade=upgrade, creds=creds,
        options=draw_options, framing=framing, body=body, chunk_cuts=cuts,
        chunk_ext=draw(st.integers(0, 4)) == 0,
        trailers=draw(st.sampled_from([None, None, None, "marker", "forwarded", "token"])),
        hop=draw(st.booleans()), forged_xff=draw(st.integers(0, 4)) == 0,
        query_first=draw(st.booleans()), order_seed=draw(st.integers(0, 2 ** 16)))


@st.composite
def connections(draw) -> list[tuple[list[Spec], float | None]]:
    """One to three connections: (pipelined requests, where to split the burst in two)."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        specs = draw(st.lists(request_specs(), min_size=1, max_size=5))
        split = draw(st.one_of(st.none(), st.none(), st.floats(0.05, 0.95)))
        out.append((specs, split))
    return out


def token_value(spec: Spec, value: str) -> str:
    if value == "valid":
        return TOKENS.get(spec.sandbox, TOKENS["gamma"])
    if value == "other":
        return TOKENS["delta"] if spec.sandbox == "gamma" else TOKENS["gamma"]
    return WRONG


def trailer_line(spec: Spec, marker: str) -> bytes | None:
    if spec.trailers == "marker":
        return b"X-Trailer: " + marker.encode()
    if spec.trailers == "forwarded":
        return b"X-Forwarded-For: 6.6.6.6"
    if spec.trailers == "token":
        return f"{TOKEN_HEADER}: {token_value(spec, 'valid')}".encode()
    return None


def chunked(body: bytes, cuts: list[int], ext: bool, trailer: bytes | None) -> bytes:
    pieces, pos = [], 0
    for cut in cuts:
        if pos + cut >= len(body):
            break
        pieces.append(body[pos:pos + cut])
        pos += cut
    if pos < len(body):
        pieces.append(body[pos:])
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";ext=1" if ext else b"", p) for p in pieces)
    return out + b"0\r\n" + (trailer + b"\r\n" if trailer else b"") + b"\r\n"


def serialize(spec: Spec, marker: str) -> tuple[bytes, bytes, str, str]:
    """(request bytes, body as the backend must receive it, target, host)."""
    host = f"3000-{spec.sandbox}.localhost"
    params = [f"script={spec.script}"]
    if "query" in spec.creds:
        token = f"access_token={token_value(spec, spec.creds['query'])}"
        params.insert(0 if spec.query_first else 1, token)
    target = f"/m/{marker}/{spec.suffix}?{'&'.join(params)}"
    headers = [("Host", host), ("X-Test-Id", marker)]
    if spec.hop:
        headers.append(("X-Hop", marker))
    if spec.forged_xff:
        headers.append(("X-Forwarded-For", "6.6.6.6"))
    if "header" in spec.creds:
        headers.append((TOKEN_HEADER, token_value(spec, spec.creds["header"])))
    if "cookie" in spec.creds:
        headers.append(("Cookie", f"theme=dark; {COOKIE}={token_value(spec, spec.creds['cookie'])}"))
    if spec.options:
        headers.append(("Connection", ", ".join(spec.options)))
    if spec.upgrade:
        headers += [("Upgrade", "websocket"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                    ("Sec-WebSocket-Version", "13")]
    body = spec.body
    if body is None:  # a complete request to another sandbox, hidden in the body
        body = (f"GET /m/{marker}s/ HTTP/1.1\r\nHost: 3000-beta.localhost\r\n"
                f"X-Test-Id: {marker}s\r\n\r\n").encode()
    if spec.framing == "length":
        headers.append(("Content-Length", str(len(body))))
        payload = body
    elif spec.framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        payload = chunked(body, spec.chunk_cuts, spec.chunk_ext, trailer_line(spec, marker))
    else:
        payload = body = b""
    first, rest = headers[0], headers[1:]
    random.Random(spec.order_seed).shuffle(rest)
    head = f"{spec.method} {target} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in [first, *rest]) + "\r\n"
    return head.encode() + payload, body, target, host


# --------------------------------------------------------------------------------------------
# What the access rules predict
# --------------------------------------------------------------------------------------------

def expected_outcomes(spec: Spec) -> set:
    """Acceptable outcomes: "backend", or the status of an answer the proxy makes itself."""
    if spec.sandbox == UNKNOWN:
        return {502}
    if spec.sandbox in OPEN:
        return {"backend"}
    named = {o.lower() for o in spec.options}
    if named & {"cookie", TOKEN_HEADER}:
        return {"backend", 302, 403}  # whether a credential named by Connection counts is open
    values = set(spec.creds.values())
    if not values:
        return {403}
    if values == {"valid"}:
        if "query" in spec.creds:
            return {302} if len(spec.creds) == 1 else {"backend", 302}
        return {"backend"}
    if "valid" not in values:
        return {403}
    return {"backend", 302, 403}  # a valid and a wrong credential at once


# --------------------------------------------------------------------------------------------
# Running one example
# --------------------------------------------------------------------------------------------

@dataclass
class ConnResult:
    sent: list[Sent]
    responses: list = field(default_factory=list)  # RawResponse | IncompleteResponse
    ended: str = "all"  # all | eof | timeout | close | tunnel | unframed | garbage
    echo: bytes = b""
    tunnel_from: int | None = None  # index of the request whose 101 started a tunnel
    extra: bytes = b""
    problem: str = ""


_counter = itertools.count()


def build_connection(specs: list[Spec]) -> list[Sent]:
    sent, offset = [], 0
    for spec in specs:
        marker = f"i{next(_counter)}x"
        data, body, target, host = serialize(spec, marker)
        sent.append(Sent(spec, marker, data, offset, offset + len(data), body, target, host))
        offset += len(data)
    return sent


async def read_response(conn: RawConn, method: str):
    head = await conn.read_head(READ_TIMEOUT)
    while 100 <= head.status < 200 and head.status != 101:
        head = await conn.read_head(READ_TIMEOUT)
    if head.status == 101 or head.status in (204, 304) or method == "HEAD":
        return head
    framed = head.header("Content-Length") is not None or head.header("Transfer-Encoding")
    if not framed and "close" not in head.connection_tokens():
        return head  # unframed: the caller reports it (reading would wait for a close)
    await asyncio.wait_for(conn._read_body(head, method), READ_TIMEOUT)
    return head


async def run_connection(port: int, sent: list[Sent], split: float | None) -> ConnResult:
    result = ConnResult(sent)
    stream = b"".join(s.data for s in sent)
    conn = await RawConn.open(port)
    try:
        if split is None:
            await conn.send(stream)
        else:
            cut = max(1, int(len(stream) * split))
            await conn.send(stream[:cut])
            await asyncio.sleep(0.005)
            await conn.send(stream[cut:])
        for i, s in enumerate(sent):
            try:
                r = await read_response(conn, s.spec.method)
            except IncompleteResponse as exc:
                if exc.head is not None:
                    result.responses.append(exc)
                result.ended = "eof"
                return result
            except (asyncio.TimeoutError, ConnectionError):
                result.ended = "timeout"
                return result
            except (AssertionError, ValueError) as exc:  # RawConn's parser: not HTTP
                result.ended = "garbage"
                result.problem = str(exc)[:300]
                return result
            result.responses.append(r)
            if r.status == 101:
                owner = next((x for x in sent if x.marker == r.header("X-Test-Id")), s)
                result.tunnel_from = sent.index(owner)
                result.ended = "tunnel"
                want = len(stream) - owner.end
                try:
                    result.echo = await asyncio.wait_for(conn.reader.readexactly(want),
                                                         READ_TIMEOUT)
                except asyncio.IncompleteReadError as exc:
                    result.echo = exc.partial
                except (asyncio.TimeoutError, ConnectionError):
                    pass
                return result
            has_framing = (r.header("Content-Length") is not None or r.header("Transfer-Encoding")
                           or r.status in (204, 304) or s.spec.method == "HEAD")
            if not has_framing and "close" not in r.connection_tokens():
                result.ended = "unframed"
                result.problem = r.raw_head.decode("latin-1")[:300]
                return result
            if "close" in r.connection_tokens():
                result.ended = "close"
                if not await conn.closed(READ_TIMEOUT):
                    result.problem = "still open after a Connection: close response"
                result.extra = conn.last_bytes
                return result
        # all answered: nothing else may follow
        await conn.closed(0.03)
        result.extra = conn.last_bytes
        return result
    finally:
        await conn.aclose()


async def run_example(port: int, plan: list[tuple[list[Spec], float | None]]) -> list[ConnResult]:
    conns = [(build_connection(specs), split) for specs, split in plan]
    return list(await asyncio.gather(*(run_connection(port, sent, split)
                                       for sent, split in conns)))


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------

@dataclass
class Findings:
    """Problems by kind, with the smallest example that showed each."""

    by_kind: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    examples: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, size: int, example: str, detail: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        known = self.by_kind.get(kind)
        if known is None or size < known[0]:
            self.by_kind[kind] = (size, example, detail)

    def report(self) -> str:
        lines = [f"{sum(self.counts.values())} problems in {self.examples} examples:"]
        for kind, (_, example, detail) in sorted(self.by_kind.items()):
            lines.append(f"\n- {kind} (x{self.counts[kind]}): {detail}\n  smallest example:\n"
                         f"{example}")
        return "\n".join(lines)


def describe_example(results: list[ConnResult]) -> str:
    out = []
    for n, res in enumerate(results):
        out.append(f"    connection {n} (ended: {res.ended}):")
        for i, s in enumerate(res.sent):
            r = res.responses[i] if i < len(res.responses) else None
            if isinstance(r, IncompleteResponse):
                got = f"incomplete {r.head.status} {r.head.header('X-Test-Id')}"
            elif r is not None:
                got = f"{r.status} {r.header('X-Test-Id') or 'proxy'}"
            else:
                got = "-"
            out.append(f"      {s.data[:600]!r}\n        -> {got}")
    return "\n".join(out)


def head_of(r):
    return r.head if isinstance(r, IncompleteResponse) else r


def check_example(results: list[ConnResult], fleet: RecordingFleet, findings: Findings) -> None:
    size = sum(len(s.data) for res in results for s in res.sent)
    example = describe_example(results)

    def add(kind: str, detail: str) -> None:
        findings.add(kind, size, example, detail)

    by_marker: dict[str, Sent] = {}
    answered_by_backend: dict[str, object] = {}  # marker -> its response (head) from a backend
    tunnel_owner: dict[int, tuple[str, bytes]] = {}
    for res in results:
        for s in res.sent:
            by_marker[s.marker] = s
        if res.tunnel_from is not None:
            tunnel_owner[id(res)] = (res.sent[res.tunnel_from].spec.sandbox,
                                     b"".join(x.data for x in res.sent[res.tunnel_from + 1:]))
        for r in res.responses:
            if head_of(r).header("X-Backend") is not None:
                answered_by_backend[head_of(r).header("X-Test-Id")] = r
        desync = False
        for i, r in enumerate(res.responses):
            s = res.sent[i]
            head = head_of(r)
            test_id = head.header("X-Test-Id") or "no marker"
            if head.header("X-Backend") is None:
                test_id = None  # the proxy's own answer names the sandbox in its JSON body
                with contextlib.suppress(ValueError, AttributeError):
                    answered_for = json.loads(head.body).get("sandboxId")
                    if answered_for != s.spec.sandbox:
                        test_id = f"a request to {answered_for}"
            elif head.header("X-Backend").startswith("inv-") \
                    and head.header("X-Backend") != f"inv-{s.spec.sandbox}":
                add("answered by another sandbox's backend",
                    f"{s.marker} to {s.spec.sandbox} answered by {head.header('X-Backend')} "
                    f"(X-Test-Id {test_id})")
                desync = True
                break
            if test_id is not None and test_id != s.marker:
                # what follows on this connection is shifted: one report, not one per response
                add("a response reached the wrong request",
                    f"request {s.marker} got the answer to {test_id!r}")
                desync = True
                break
            origin = "backend" if head.header("X-Backend") is not None else head.status
            outcome = f"{origin if origin == 'backend' else 'proxy'}:{head.status}"
            findings.outcomes[outcome] = findings.outcomes.get(outcome, 0) + 1
            allowed = expected_outcomes(s.spec)
            if origin not in allowed:
                add(f"unexpected outcome {origin} (expected {sorted(map(str, allowed))})",
                    f"{s.spec.sandbox} creds {s.spec.creds} options {s.spec.options}: got "
                    f"{head.status} {head.body[:120]!r}")
            if origin != "backend":
                continue
            backend = f"inv-{s.spec.sandbox}"
            want = (b"" if s.spec.method == "HEAD"
                    else expected_body(backend, s.marker, s.spec.script))
            if isinstance(r, IncompleteResponse):
                if s.spec.script != "closemid":
                    add("a response was cut short", f"{s.marker} ({s.spec.script}): {r}")
            elif head.status != 101 and want is not None and head.body != want:
                add("a response body was altered",
                    f"{s.marker} ({s.spec.script}): {head.body[:120]!r}, expected {want[:60]!r}")
        if desync:
            continue
        # every request answered, in order, unless the connection legitimately ended early
        n = len(res.responses)
        if res.ended == "timeout":
            add("no answer within the timeout (the connection hangs)",
                f"{n} of {len(res.sent)} requests answered")
        elif res.ended == "unframed":
            add("a response without framing reached the client", res.problem)
        elif res.ended == "garbage":
            add("the client received bytes that are not an HTTP response", res.problem)
        elif res.ended == "eof":
            last = res.responses[-1] if res.responses else None
            if not (isinstance(last, IncompleteResponse) and last.head.header("X-Backend")
                    and res.sent[n - 1].spec.script == "closemid"):
                add("the connection was closed early",
                    f"after {n} of {len(res.sent)} responses")
        elif res.ended == "close":
            s = res.sent[n - 1]
            r = head_of(res.responses[-1])
            ok_close = ("close" in [o.lower() for o in s.spec.options]
                        or r.header("X-Backend") is None)
            if not ok_close:
                add("the connection was closed after a backend response without reason",
                    f"{s.marker}: {r.raw_head[:200]!r}")
            if res.problem:
                add("a Connection: close response left the connection open", res.problem)
        elif res.ended == "tunnel":
            i = res.tunnel_from
            want = b"".join(x.data for x in res.sent[i + 1:])
            if res.echo != want:
                add("the tunnel did not carry the bytes after the upgrade",
                    f"echoed {res.echo[:200]!r}, sent {want[:200]!r}")
        if res.ended in ("all", "close") and res.extra:
            add("bytes after the last response", repr(res.extra[:200]))

    # bytes after an upgrade the backend must accept belong to its tunnel, whatever they say
    tunneled: dict[str, str] = {}  # marker -> the sandbox whose tunnel must carry it
    for res in results:
        for i, s in enumerate(res.sent):
            if s.spec.upgrade and s.spec.script == "accept" \
                    and expected_outcomes(s.spec) == {"backend"}:
                for later in res.sent[i + 1:]:
                    tunneled[later.marker] = s.spec.sandbox
                break
            if expected_outcomes(s.spec) != {"backend"} or s.spec.script == "closemid" \
                    or "close" in s.spec.options:
                break  # the connection may end or change course here: no prediction

    # -- the backends' side ----------------------------------------------------------------
    received: dict[str, list] = {}
    for name, backend in fleet.backends.items():
        sandbox = name.removeprefix("inv-")
        for conn in backend.snapshot():
            if conn.error:
                add("the proxy sent a backend what is not strict HTTP/1.1",
                    f"{name}: {conn.error}")
            elif conn.pending and not conn.tunnel:
                add("bytes a backend cannot read as a request (framing lost)",
                    f"{name}: {conn.pending[:200]!r}")
            http_bytes = bytes(conn.raw[:len(conn.raw) - len(conn.tunnel)])
            for secret in SECRETS:
                if secret.encode() in http_bytes:
                    add("a credential reached a backend",
                        f"{secret} in what {name} received: {http_bytes[:300]!r}")
            for found in set(MARKER.findall(http_bytes)):
                mk = found.decode()
                owner = by_marker.get(mk.rstrip("s"))
                if owner is None:
                    continue  # a previous example's
                if owner.marker in tunneled:
                    add("bytes after an accepted upgrade were read as HTTP",
                        f"{mk} (tunneled to {tunneled[owner.marker]}) parsed by the proxy and "
                        f"sent to {name}")
                elif owner.spec.sandbox != sandbox:
                    add("bytes sent to one sandbox reached another's backend",
                        f"{mk} (sent to {owner.spec.sandbox}) at {name}")
                elif mk in by_marker and mk not in answered_by_backend:
                    add("a request reached a backend without its answer reaching the client",
                        f"{mk} at {name}")
            if conn.tunnel:
                tunnels = [want for sb, want in tunnel_owner.values() if sb == sandbox]
                if bytes(conn.tunnel) not in tunnels:
                    add("a backend's tunnel carried other bytes than the client sent",
                        f"{name} tunnel {bytes(conn.tunnel)[:200]!r}")
            for req in conn.requests:
                received.setdefault(req.marker, []).append((sandbox, req))

    for mk, got in received.items():
        owner = by_marker.get(mk)
        if owner is None:
            if mk.rstrip("s") in by_marker:
                add("a request the client never sent reached a backend (a body was parsed as a "
                    "request)", f"{mk} at {[sb for sb, _ in got]}")
            continue
        if len(got) > 1 and owner.spec.method not in IDEMPOTENT:
            add("a non-idempotent request reached a backend more than once",
                f"{mk} ({owner.spec.method}) {len(got)} times")
        for sandbox, req in got:
            if sandbox != owner.spec.sandbox:
                continue  # reported above from the raw bytes
            check_forwarded(owner, req, add)


def without_access_token(target: str) -> str:
    path, _, query = target.partition("?")
    kept = [p for p in query.split("&") if not p.startswith("access_token=")]
    return path + ("?" + "&".join(kept) if kept else "")


def check_forwarded(s: Sent, req, add) -> None:
    """One request as the backend received it, against the request the client sent."""
    spec = s.spec
    if req.method.decode() != spec.method:
        add("the method was altered", f"{s.marker}: {req.method!r}")
    if without_access_token(req.target.decode("latin-1")) != without_access_token(s.target):
        add("the target was altered (beyond removing access_token)",
            f"{s.marker}: {req.target!r}, sent {s.target!r}")
    if req.body != s.body:
        add("the body was altered", f"{s.marker} ({spec.framing}, Connection: {spec.options}): "
                                    f"received {req.body[:100]!r} ({req.framing}), sent "
                                    f"{s.body[:100]!r}")
    if req.header_all("host") != [s.host.encode()]:
        add("the Host was altered", f"{s.marker}: {req.header_all('host')}")
    if req.header_all("x-forwarded-for") != [b"127.0.0.1"] or any(
            k.lower() == b"x-forwarded-for" for k, _ in req.trailers):
        add("X-Forwarded-For is not the client's address alone",
            f"{s.marker}: {req.header_all('x-forwarded-for')}, trailers {req.trailers} "
            f"(forged: {spec.forged_xff}, Connection: {spec.options})")
    named = {o.lower() for o in spec.options}
    if spec.hop:
        if "x-hop" in named and req.header("x-hop") is not None:
            add("a header named by Connection was forwarded", f"{s.marker}: X-Hop")
        if "x-hop" not in named and req.header_all("x-hop") != [s.marker.encode()]:
            add("an end-to-end header was dropped", f"{s.marker}: X-Hop {req.header_all('x-hop')}")
    if req.header(TOKEN_HEADER) is not None:
        add("the token header reached a backend", f"{s.marker}")
    if any(COOKIE.encode() in v for v in req.header_all("cookie")):
        add("the token cookie reached a backend", f"{s.marker}: {req.header_all('cookie')}")
    if "access_token" in req.target.decode("latin-1"):
        add("access_token reached a backend", f"{s.marker}: {req.target!r}")
    if spec.upgrade and (req.header("upgrade") is None
                         or b"upgrade" not in req.connection_tokens()):
        add("an upgrade request lost its Upgrade", f"{s.marker}: {req.headers}")


# --------------------------------------------------------------------------------------------
# The recording backend's parser is as strict as the checks assume
# --------------------------------------------------------------------------------------------

H = b"Host: h\r\n"
STRICT_OK = [
    (b"GET / HTTP/1.1\r\n" + H + b"\r\n", b"", "none"),
    (b"POST /x?y HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc", b"abc", "length"),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n2;e=1\r\nab\r\n"
     b"1\r\nc\r\n0\r\nX-T: t\r\n\r\n", b"abc", "chunked"),
    (b"GET / HTTP/1.1\r\n" + H + b"X-A: caf\xc3\xa9 \t \r\n\r\n", b"", "none"),
]
STRICT_BAD = [
    b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n",          # obs-fold
    b"GET / HTTP/1.1\r\n" + H + b"X-A: a\nX-B: b\r\n\r\n",         # bare LF
    b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n",              # bare CR
    b"GET / HTTP/1.1\r\n" + H + H + b"\r\n",                        # two Hosts
    b"GET / HTTP/1.1\r\nX-A: a\r\n\r\n",                           # no Host
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\na",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +1\r\n\r\na",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x1\r\na\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\nab\r\n0\r\n\r\n",
    b"GET  / HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.0\r\n" + H + b"\r\n",
    b"GET /\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"X-A : a\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n",
    b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
]


@pytest.mark.parametrize("raw, body, framing", STRICT_OK)
def test_strict_parser_reads_clean_requests(raw, body, framing):
    for cut in range(len(raw)):
        assert parse_request(raw[:cut]) is None  # every prefix is incomplete, not an error
    req, used = parse_request(raw + b"GET")
    assert (req.body, req.framing, used) == (body, framing, len(raw))


@pytest.mark.parametrize("raw", STRICT_BAD)
def test_strict_parser_rejects_what_a_proxy_must_not_send(raw):
    with pytest.raises(StrictParseError):
        parse_request(raw)


# --------------------------------------------------------------------------------------------
# The module's proxy and the test
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    fleet = RecordingFleet()
    registry = {}
    for sandbox in (*OPEN, *LOCKED):
        backend = fleet.add(f"inv-{sandbox}")
        registry[sandbox] = {"host": "127.0.0.1", "ports": {3000: backend.port}}
        if sandbox in TOKENS:
            registry[sandbox]["traffic_access_token"] = TOKENS[sandbox]
    p = launch_proxy(tmp_path_factory.mktemp("invariants"), registry, config={
        "access": {"browser_cookie": True}, "timeouts": {"upstream_header": 5.0}})
    yield p, fleet
    p.stop()
    fleet.stop()


def test_client_and_backend_views_agree(edge):
    p, fleet = edge
    findings = Findings()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(connections())
    def run(plan) -> None:
        fleet.reset()
        results = asyncio.run(run_example(p.port, plan))
        fleet.quiet(0.05)
        findings.examples += 1
        if not p.alive():
            findings.add("the proxy process died", 0, "", f"exit status {p.proc.returncode}")
            return
        check_example(results, fleet, findings)

    started = time.monotonic()
    run()
    elapsed = time.monotonic() - started
    stderr = p.stderr()
    for marker in ("Traceback", "Exception in callback"):
        if marker in stderr:
            findings.add(f"the proxy logged {marker!r}", 0, "",
                         stderr[stderr.find(marker):][:800])
    top = sorted(findings.outcomes.items(), key=lambda kv: -kv[1])
    print(f"invariants: {findings.examples} examples in {elapsed:.1f} s; outcomes {top}")
    assert not findings.by_kind, findings.report()
