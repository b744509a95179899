"""TLS on the edge listener: the server SSLContext and its certificate reloads.

A wildcard certificate (`*.example.app`) serves every sandbox host. When the certificate or key
file changes (checked every `[server.tls] reload_interval`), the pair is first loaded into a
throwaway context to prove it valid, then into the live context, so new handshakes use it and
existing connections are untouched. A broken pair is reported and ignored.
"""

from __future__ import annotations

import logging
import os
import ssl

from proxy.config import TlsConfig

log = logging.getLogger("sandbox_proxy.tls")


FileSignature = tuple[int, int, int] | None  # (inode, size, mtime_ns); None: cannot stat


def _signature(config: TlsConfig) -> tuple[FileSignature, ...]:
    sig: list[FileSignature] = []
    for path in (config.cert, config.key):
        try:
            st = os.stat(path)
            sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append(None)
    return tuple(sig)


def _new_context(config: TlsConfig, http2: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ALPN: each connection speaks what was negotiated (proxy/edge.py hands h2 to h2_edge.py)
    context.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    context.load_cert_chain(config.cert, config.key)
    return context


class CertificateStore:
    def __init__(self, config: TlsConfig, http2: bool = False):
        self.config = config
        self.http2 = http2
        self._signature = _signature(config)
        try:
            self.context = _new_context(config, http2)
        except (OSError, ssl.SSLError) as exc:
            from proxy.config import ConfigError
            raise ConfigError(f"[server.tls] cert/key: cannot load {config.cert} and "
                              f"{config.key}: {exc}") from None

    def reload_if_changed(self) -> bool | None:
        """True: reloaded; False: changed but invalid (kept the old pair); None: unchanged."""
        signature = _signature(self.config)
        if signature == self._signature:
            return None
        self._signature = signature
        try:
            _new_context(self.config, self.http2)  # prove the new pair first
            self.context.load_cert_chain(self.config.cert, self.config.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("certificate reload failed, keeping the previous one: %s", exc)
            return False
        log.info("certificate reloaded from %s", self.config.cert)
        return True
