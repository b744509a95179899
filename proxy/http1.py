"""HTTP/1.1 message framing (RFC 9112), sans I/O: how a body is delimited, and the bytes that
frame it. Every `b"%x\\r\\n"` of the proxy is written here.

A proxy frames twice per response: it reads the backend's body as the backend framed it, and
writes the client's copy framed for the client. Both decisions are made here, from the header
facts `proxy/headers.py` extracted, walking RFC 9112 6.3 in order. llhttp does the reading; these
functions decide what it has to agree with.
"""

from __future__ import annotations

import enum

from proxy.headers import ResponseHeaders


class Body(enum.IntEnum):
    """How a message body is delimited (RFC 9112 6.3)."""
    NONE = 0         # no body, whatever the header fields say
    LENGTH = 1       # Content-Length bytes
    CHUNKED = 2      # chunked transfer coding, ending with the last chunk
    UNTIL_CLOSE = 3  # everything until the connection closes (responses only)


class FramingError(ValueError):
    """The response cannot be framed for this client (answered 502)."""


def response_has_no_body(method: bytes, status: int) -> bool:
    """RFC 9112 6.3 rule 1: a response to HEAD, and any 1xx, 204 or 304 response, ends after its
    header section; Content-Length and Transfer-Encoding describe what a GET would have got."""
    return method == b"HEAD" or status < 200 or status == 204 or status == 304


def backend_body(method: bytes, status: int, scanned: ResponseHeaders) -> Body:
    """How the backend's response body ends, as llhttp reads it (RFC 9112 6.3)."""
    if response_has_no_body(method, status):                 # rule 1
        return Body.NONE
    # rule 2 (a 2xx answer to CONNECT) cannot happen: CONNECT is refused at the edge
    if scanned.chunked:                                      # rule 4: chunked is final
        return Body.CHUNKED
    if scanned.codings:                                      # rule 4: a coding, not chunked
        return Body.UNTIL_CLOSE
    if scanned.content_length:                               # rule 6
        return Body.LENGTH
    return Body.UNTIL_CLOSE                                  # rule 8


def client_body(method: bytes, status: int, scanned: ResponseHeaders, client_http11: bool,
                ) -> Body:
    """How the proxy frames the response body it writes to the client.

    A Content-Length body keeps its length. Any other body is re-chunked for an HTTP/1.1 client
    (RFC 9112 7.1), so the connection survives a body the backend ended by closing; an HTTP/1.0
    client can only be told the end by a close (RFC 9112 6.3 rule 8). A transfer coding other
    than chunked cannot be sent to HTTP/1.0 (RFC 9112 6.1): FramingError.
    """
    mode = backend_body(method, status, scanned)
    if mode is Body.NONE or mode is Body.LENGTH:
        return mode
    if client_http11:
        return Body.CHUNKED
    if scanned.codings:
        raise FramingError("transfer coding for an HTTP/1.0 client")
    return Body.UNTIL_CLOSE


def framing_lines(mode: Body, scanned: ResponseHeaders, status: int) -> bytes:
    """The framing header lines of the client's copy (the backend's were never copied)."""
    if mode is Body.LENGTH:
        return b"Content-Length: %d\r\n" % scanned.length
    if mode is Body.CHUNKED:
        if scanned.codings:  # codings applied before chunked travel on (RFC 9112 6.1)
            return b"Transfer-Encoding: " + scanned.codings + b", chunked\r\n"
        return b"Transfer-Encoding: chunked\r\n"
    if mode is Body.NONE and scanned.content_length and status != 204 and status >= 200:
        return b"Content-Length: %d\r\n" % scanned.length  # HEAD and 304: what GET would get
    return b""


def status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk (RFC 9112 7.1), as pieces for writelines: no copy of `data`."""
    return (b"%x\r\n" % len(data), data, b"\r\n")


def last_chunk(trailer_section: bytes = b"") -> bytes:
    """The last chunk, the trailer section (already filtered) and the final CRLF (RFC 9112 7.1)."""
    return b"0\r\n" + trailer_section + b"\r\n"


LAST_CHUNK = last_chunk()
