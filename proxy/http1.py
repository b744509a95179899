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


NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = Body  # globals: cheaper than enum attributes in 3.11


class FramingError(ValueError):
    """The response cannot be framed for this client (answered 502)."""


def response_framing(method: bytes, status: int, scanned: ResponseHeaders, client_http11: bool,
                     ) -> tuple[Body, Body, bytes]:
    """How the backend's response body ends (as llhttp reads it), how the proxy frames the
    client's copy, and the framing header lines of that copy, walking RFC 9112 6.3 in order.

    The client's copy keeps a Content-Length body's length; any other body is re-chunked for an
    HTTP/1.1 client (RFC 9112 7.1), so the connection survives a body the backend ended by
    closing; an HTTP/1.0 client can only be told the end by a close (rule 8), and cannot be sent
    a transfer coding other than chunked at all (RFC 9112 6.1): FramingError. The backend's
    Content-Length and Transfer-Encoding lines were never copied: these lines replace them.
    One function, not one per step: it runs once per response on the hot path.
    """
    if method == b"HEAD" or status < 200 or status == 204 or status == 304:  # rule 1
        if scanned.content_length and status >= 200 and status != 204:
            # HEAD and 304 keep the length a GET would have had (RFC 9110 8.6)
            return NO_BODY, NO_BODY, b"Content-Length: %d\r\n" % scanned.length
        return NO_BODY, NO_BODY, b""
    # rule 2 (a 2xx answer to CONNECT) cannot happen: CONNECT is refused at the edge
    if scanned.chunked:                                    # rule 4: chunked is the final coding
        backend = CHUNKED
    elif scanned.codings:                                  # rule 4: a coding, but not chunked
        backend = UNTIL_CLOSE
    elif scanned.content_length:                           # rule 6 (5: llhttp refuses bad ones)
        return LENGTH, LENGTH, b"Content-Length: %d\r\n" % scanned.length
    else:                                                  # rule 8
        backend = UNTIL_CLOSE
    if client_http11:
        if scanned.codings:  # codings applied before chunked travel on (RFC 9112 6.1)
            return backend, CHUNKED, b"Transfer-Encoding: " + scanned.codings + b", chunked\r\n"
        return backend, CHUNKED, b"Transfer-Encoding: chunked\r\n"
    if scanned.codings:
        raise FramingError("transfer coding for an HTTP/1.0 client")
    return backend, UNTIL_CLOSE, b""


def status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk (RFC 9112 7.1), as pieces for writelines: no copy of `data`."""
    return (b"%x\r\n" % len(data), data, b"\r\n")


def last_chunk(trailer_section: bytes = b"") -> bytes:
    """The last chunk, the trailer section (already filtered) and the final CRLF (RFC 9112 7.1)."""
    return b"0\r\n" + trailer_section + b"\r\n"


LAST_CHUNK = last_chunk()
