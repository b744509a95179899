"""PROXY protocol v1 and v2 (the header L4 load balancers put before the client's bytes so the
real client address reaches the proxy). Pure parsing; proxy/listener.py reads the socket.

v1 is one text line (`PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n`, at most 107 bytes); v2 a
16-byte binary header (12-byte signature, version/command, family, length) plus addresses.
A LOCAL (v2) or UNKNOWN (v1) header is a health check from the balancer itself: the socket's own
peer address stands.
"""

from __future__ import annotations

import ipaddress

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
MAX_HEADER = 16 + 216  # v2 header with the largest address block the proxy accepts


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header: the connection is refused."""


def parse_proxy_header(data: bytes) -> tuple[int, str | None] | None:
    """(bytes the header takes, source IP or None) when complete; None when more is needed."""
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)] and len(data) < 16:
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if b"PROXY "[:len(data)] == data[:6]:
        if len(data) < 6:
            return None
        return _parse_v1(data)
    raise ProxyHeaderError("connection does not start with a PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[int, str | None] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    parts = data[:end].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return end + 2, None
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        source = ipaddress.ip_address(parts[2].decode("ascii"))
        ipaddress.ip_address(parts[3].decode("ascii"))
        ports = [int(p) for p in parts[4:6]]
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("malformed PROXY v1 addresses") from None
    if source.version != (4 if parts[1] == b"TCP4" else 6) or not all(0 <= p < 65536
                                                                      for p in ports):
        raise ProxyHeaderError("malformed PROXY v1 addresses")
    return end + 2, str(source)


def _parse_v2(data: bytes) -> tuple[int, str | None] | None:
    version_command, family = data[12], data[13]
    length = int.from_bytes(data[14:16], "big")
    if version_command >> 4 != 2 or version_command & 0x0F > 1:
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    if 16 + length > MAX_HEADER:
        raise ProxyHeaderError("PROXY v2 header too long")
    total = 16 + length
    if len(data) < total:
        return None
    if version_command & 0x0F == 0:  # LOCAL
        return total, None
    body = data[16:total]
    if family == 0x11 and length >= 12:    # TCP over IPv4
        return total, str(ipaddress.IPv4Address(body[:4]))
    if family == 0x21 and length >= 36:    # TCP over IPv6
        return total, str(ipaddress.IPv6Address(body[:16]))
    if family == 0x00:                     # UNSPEC
        return total, None
    raise ProxyHeaderError("unsupported PROXY v2 address family")
