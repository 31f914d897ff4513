"""The server side of STARTTLS: one SSLContext per listener, built from its tls_cert and tls_key."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2 or newer with OpenSSL's default ciphers; no client certificates, as mail clients have none."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
