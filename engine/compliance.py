"""One-click unsubscribe (RFC 8058, RFC 2369): signed tokens and the List-Unsubscribe header fields.

A token names (recipient, tenant, campaign) and carries an HMAC-SHA256 over them with the engine secret,
so the admin endpoint and the mailto handler verify it without a database lookup. Tokens are URL-safe
base64 without padding, so they fit a URL path segment, a mailto subject and a local part alike.

    token = make_token(secret, "bob@example.org", "acme", "spring")
    verify_token(secret, token)  # -> ("bob@example.org", "acme", "spring"), or raises InvalidToken
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from pathlib import Path

import msgpack

from engine.config import Config, ListUnsubscribe

__all__ = [
    "InvalidToken",
    "find_token",
    "load_secret",
    "make_token",
    "unsubscribe_fields",
    "verify_token",
]

TOKEN_VERSION = 1
MAC_BYTES = 16  # 128 bits of HMAC-SHA256: forging one needs 2**128 guesses
MAX_TOKEN_CHARS = 1024
SECRET_FILE = "secret"
ONE_CLICK_FIELD = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
_TOKEN = re.compile(rb"[A-Za-z0-9_-]+")
_TOKEN_CANDIDATE = re.compile(rb"[A-Za-z0-9_-]{24,1024}")


class InvalidToken(ValueError):
    """A token that is malformed or not signed with this engine's secret."""


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _mac(secret: str | bytes, payload: bytes) -> bytes:
    return hmac.new(_key(secret), payload, hashlib.sha256).digest()[:MAC_BYTES]


def make_token(secret: str | bytes, recipient: str, tenant: str | None, campaign: str | None) -> str:
    """The unsubscribe token of one recipient of one campaign; the address is lower-cased."""
    payload = msgpack.packb([TOKEN_VERSION, recipient.lower(), tenant, campaign])
    return base64.urlsafe_b64encode(_mac(secret, payload) + payload).rstrip(b"=").decode()


def verify_token(secret: str | bytes, token: str | bytes) -> tuple[str, str | None, str | None]:
    """(recipient, tenant, campaign) of a token this engine made; InvalidToken for anything else."""
    raw = token.encode() if isinstance(token, str) else token
    if not raw or len(raw) > MAX_TOKEN_CHARS or not _TOKEN.fullmatch(raw):
        raise InvalidToken("malformed token")
    try:
        data = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed token") from None
    mac, payload = data[:MAC_BYTES], data[MAC_BYTES:]
    if len(mac) != MAC_BYTES or not hmac.compare_digest(mac, _mac(secret, payload)):
        raise InvalidToken("bad signature")
    try:
        version, recipient, tenant, campaign = msgpack.unpackb(payload)
    except (ValueError, TypeError, msgpack.UnpackException):
        raise InvalidToken("malformed token") from None
    if version != TOKEN_VERSION or not isinstance(recipient, str):
        raise InvalidToken("unknown token version")
    return recipient, tenant, campaign


def find_token(secret: str | bytes, text: bytes) -> tuple[str, str | None, str | None] | None:
    """The first valid token anywhere in `text` (a subject, a body, an address), else None."""
    for match in _TOKEN_CANDIDATE.finditer(text):
        try:
            return verify_token(secret, match.group())
        except InvalidToken:
            continue
    return None


def unsubscribe_fields(setting: ListUnsubscribe, token: str) -> bytes:
    """List-Unsubscribe (mailto and https) and List-Unsubscribe-Post header fields, CRLF-terminated."""
    targets = []
    if setting.mailto:
        targets.append(f"<mailto:{setting.mailto}?subject=unsubscribe%20{token}>")
    if setting.url:
        targets.append(f"<{setting.url.replace('{token}', token)}>")
    fields = ("List-Unsubscribe: " + ",\r\n ".join(targets) + "\r\n").encode()
    return fields + ONE_CLICK_FIELD if setting.url else fields


def load_secret(config: Config) -> bytes:
    """The configured `engine.secret`, else a random one kept in spool_dir/secret (made once, mode 0600),
    so the supervisor and every worker of one installation agree on it."""
    if config.engine.secret:
        return config.engine.secret.encode()
    path = Path(config.engine.spool_dir) / SECRET_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(f"{SECRET_FILE}.{os.getpid()}")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, base64.urlsafe_b64encode(os.urandom(32)))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(candidate, path)  # the first process to link wins; the others read its secret
    except FileExistsError:
        pass
    finally:
        candidate.unlink()
    return path.read_bytes()
