"""Connect protocol streams: where a streaming body is between envelopes, and the end-stream
envelope the proxy writes when the sandbox goes away mid-stream.

A Connect streaming body (`Content-Type: application/connect+<codec>`) is a sequence of
envelopes: one flags byte, a 4-byte big-endian length, then that many bytes. Flag 0x02 marks the
end-stream envelope, whose JSON may carry `{"error": {"code", "message"}}`. When the backend dies
exactly between envelopes, the proxy can end the stream as Connect clients expect, with an
`unavailable` error they retry, instead of a truncated body they report as a framing error.
"""

from __future__ import annotations

import json

END_STREAM = 0x02


class EnvelopeTracker:
    """Follows envelope boundaries in the bytes of one response body, without copying them."""

    __slots__ = ("header", "left", "ended")

    def __init__(self) -> None:
        self.header = b""   # bytes of an envelope prefix not yet complete
        self.left = 0       # data bytes of the current envelope still to come
        self.ended = False  # the end-stream envelope has started

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.left:
                step = min(self.left, n - i)
                self.left -= step
                i += step
                continue
            need = 5 - len(self.header)
            self.header += data[i:i + need]
            i += need
            if len(self.header) == 5:
                self.ended = self.ended or bool(self.header[0] & END_STREAM)
                self.left = int.from_bytes(self.header[1:5], "big")
                self.header = b""

    @property
    def at_boundary(self) -> bool:
        return not self.left and not self.header


def end_stream_unavailable(message: str) -> bytes:
    """An end-stream envelope carrying the `unavailable` error code."""
    body = json.dumps({"error": {"code": "unavailable", "message": message}}).encode()
    return bytes([END_STREAM]) + len(body).to_bytes(4, "big") + body
