"""The server side of STARTTLS: the SSLContext of a listener, built from its tls_cert and tls_key.

Certificates get renewed while the engine runs (ACME clients replace the files every few weeks), so the
context is rebuilt whenever either file changes; a pair that does not load keeps the previous context.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

log = logging.getLogger(__name__)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2 or newer with OpenSSL's default ciphers; no client certificates, as mail clients have none."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class CertificateFiles:
    """A listener's certificate and key, loaded at start (errors raise) and again after they change."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self._stamp = self._stat()
        self._context = server_context(cert, key)

    def _stat(self) -> tuple | None:
        try:
            return tuple((stat.st_mtime_ns, stat.st_size, stat.st_ino) for stat in map(os.stat, (self.cert, self.key)))
        except OSError:
            return None

    def context(self) -> ssl.SSLContext:
        """The context for the next handshake: two stat calls when nothing changed."""
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._context = server_context(self.cert, self.key)
                log.info("reloaded TLS certificate %s", self.cert)
            except (OSError, ssl.SSLError) as error:
                log.error("keeping the previous TLS certificate: %s and %s do not load: %s", self.cert, self.key, error)
        return self._context
