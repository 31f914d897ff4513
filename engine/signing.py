"""DKIM signing (RFC 6376, RFC 8463) with keys parsed once and the private-key operation in OpenSSL.

Stock `dkim.sign` re-parses the PEM on every call and runs RSA in pure Python (~6 ms per message), so the
signature is made here with `cryptography` (OpenSSL). dkimpy's header parsing, selection and
canonicalisation also cost ~80 us more per message than the few precompiled patterns below, so those are
done here too and the tests check them against dkimpy's. Relaxed body canonicalisation, the one loop that
grows with the message, is engine.dkimcanon.

An RSA-2048 signature costs ~0.8 ms of CPU, more than everything else the engine does for a message, and
OpenSSL releases the GIL for all of it: `sign_off_loop` runs that one operation on a small thread pool, so
a worker signs on the other core while its event loop goes on receiving and delivering.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import os
import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from engine.dkimcanon import relaxed_body, simple_body

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
MIN_RSA_BITS = 2048
RSA_KEYGEN_BITS = 2048

# Signed when present, in this order; From once more than present so that an added From breaks it.
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"reply-to",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"feedback-id",
)
OVERSIGNED = (b"from",)
_SIGNED = frozenset(SIGNED_HEADERS)
_PKCS1 = padding.PKCS1v15()
_PREHASHED = Prehashed(hashes.SHA256())

FOLD_COLUMN = 76
SIG_LINE = 64
SIG_NAME = b"DKIM-Signature"
_DNS_NAME = re.compile(r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?)*\Z", re.I)
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*\Z")
_WSP = re.compile(rb"[ \t]+")
# "Name <local@domain>" or "local@domain" in plain ASCII; anything else goes to email.utils.
_AUTHOR = re.compile(rb'(?:[^<>@"(),;:\\]*(<))?[^\s<>@"(),;:\\]+@([a-z0-9.-]+)(?(1)>)\Z', re.I)
_BODY_CANON = {"simple": simple_body, "relaxed": relaxed_body}
SIGNING_THREADS = 2  # the cores of the machine this was measured on; more only queue for them
_pool: ThreadPoolExecutor | None = None


def _signing_pool() -> ThreadPoolExecutor:
    """Made on first use, in the worker process: threads do not survive the supervisor's fork."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=SIGNING_THREADS, thread_name_prefix="dkim-sign")
    return _pool


class DkimKeyError(Exception):
    """A configured DKIM key cannot be used; raised when keys load, never when a message is signed."""


class DkimKeyConfig(Protocol):
    """What engine.config.DkimKey provides."""

    domain: str
    selector: str
    key_file: Path
    algorithm: str


@dataclass(frozen=True, slots=True)
class _Key:
    domain: bytes
    selector: bytes
    algorithm: bytes
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def _ascii_domain(domain: str) -> str:
    """Lower-case A-label form, so keys and From domains compare whatever script they came in."""
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _load_key(config: DkimKeyConfig) -> _Key:
    path = Path(config.key_file)
    where = f"{path} (dkim.{config.domain})"
    if config.algorithm not in ALGORITHMS:
        raise DkimKeyError(f"{where}: algorithm {config.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if not _DNS_NAME.match(config.selector):
        raise DkimKeyError(f"{where}: selector {config.selector!r} is not a DNS name")
    domain = _ascii_domain(config.domain)
    if not domain or not _DNS_NAME.match(domain):
        raise DkimKeyError(f"{where}: domain {config.domain!r} is not a DNS name")
    try:
        pem = path.read_bytes()
    except OSError as error:
        raise DkimKeyError(f"{where}: cannot read key file: {error.strerror or error}") from error
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise DkimKeyError(f"{where}: not an unencrypted PEM private key ({error})") from error
    if config.algorithm == "rsa-sha256":
        if not isinstance(private, rsa.RSAPrivateKey):
            raise DkimKeyError(f"{where}: rsa-sha256 needs an RSA key, the file holds {_kind(private)}")
        if private.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"{where}: RSA key is {private.key_size} bits, at least {MIN_RSA_BITS} needed")
    elif not isinstance(private, ed25519.Ed25519PrivateKey):
        raise DkimKeyError(f"{where}: ed25519-sha256 needs an Ed25519 key, the file holds {_kind(private)}")
    return _Key(domain.encode(), config.selector.encode(), config.algorithm.encode(), private)


def _kind(private: object) -> str:
    if isinstance(private, rsa.RSAPrivateKey):
        return "an RSA key"
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return f"a {type(private).__name__} key"


Field = tuple[bytes, bytes]


def parse_header(head: bytes) -> list[Field] | None:
    """(name, value) fields of a CRLF header block, each value with its folds and final CRLF as sent.

    None for a line that is neither a field nor a continuation: such a message is not signed.
    """
    fields: list[Field] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line + b"\r\n")
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME.match(name):
            return None
        fields.append((name, value + b"\r\n"))
    return fields


def _lower_name(name: bytes) -> bytes:
    return name.rstrip(b" \t").lower()


def relaxed_field(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2 for one field, without the trailing CRLF."""
    return _lower_name(name) + b":" + _WSP.sub(b" ", value.replace(b"\r\n", b"")).strip(b" \t")


def author_domain(fields: list[Field]) -> str | None:
    """The domain of the one author address, or None when there is no single From with one address."""
    values = [value for name, value in fields if _lower_name(name) == b"from"]
    if len(values) != 1:
        return None
    unfolded = values[0].replace(b"\r\n", b"").strip()
    simple = _AUTHOR.match(unfolded)
    if simple:
        return simple.group(2).rstrip(b".").lower().decode("ascii")
    text = unfolded.decode("utf-8", "replace")
    addresses = [address for _, address in email.utils.getaddresses([text]) if "@" in address]
    if len(addresses) != 1:
        return None
    return _ascii_domain(addresses[0].rpartition("@")[2])


def select_fields(fields: list[Field]) -> tuple[list[bytes], list[Field]]:
    """The h= names and, in the same order, the fields they pick (repeated names pick from the bottom up)."""
    present: dict[bytes, list[Field]] = {}
    for field in fields:
        name = _lower_name(field[0])
        if name in _SIGNED:
            present.setdefault(name, []).append(field)
    names: list[bytes] = []
    picked: list[Field] = []
    for name in SIGNED_HEADERS:
        found = present.get(name, ())
        names.extend([name] * len(found))
        picked.extend(reversed(found))
    return names + list(OVERSIGNED), picked


def _fold(parts: list[tuple[bytes, bytes]], column: int) -> bytes:
    """Join (separator, atom) pairs, turning a separator into CRLF + space where a line would pass 76."""
    out = []
    for separator, atom in parts:
        if column + len(separator) + len(atom) > FOLD_COLUMN and column > 1:
            out.append(b"\r\n " + atom)
            column = 1 + len(atom)
        else:
            out.append(separator + atom)
            column += len(separator) + len(atom)
    return b"".join(out)


def _unsigned_value(key: _Key, c_value: bytes, include: list[bytes], body_hash: bytes) -> bytes:
    """The signature header's value up to an empty b=, folded; the b= value is appended after hashing it."""
    names = [name + b":" for name in include[:-1]] + [include[-1] + b";"]
    tags = [
        (b"", b"v=1;"),
        (b" ", b"a=" + key.algorithm + b";"),
        (b" ", b"c=" + c_value + b";"),
        (b" ", b"d=" + key.domain + b";"),
        (b" ", b"s=" + key.selector + b";"),
        (b" ", b"t=%d;" % time.time()),
        (b" ", b"h=" + names[0]),
        *[(b"", name) for name in names[1:]],
        (b" ", b"bh=" + body_hash + b";"),
    ]
    return b" " + _fold(tags, len(SIG_NAME) + 2) + b"\r\n b="


class DkimSigner:
    """Signs outgoing messages with the key of their From domain (or of its nearest parent that has one)."""

    def __init__(self, keys: Mapping[str, _Key]) -> None:
        self._keys = dict(keys)
        self.domains = frozenset(self._keys)

    @classmethod
    def from_config(cls, keys: Mapping[str, DkimKeyConfig]) -> DkimSigner:
        """Load and check every key now, so a bad one is a configuration error at start or SIGHUP."""
        loaded: dict[str, _Key] = {}
        files: dict[str, Path] = {}
        for config in keys.values():
            key = _load_key(config)
            domain = key.domain.decode()
            if domain in loaded:
                raise DkimKeyError(f"{config.key_file} (dkim.{config.domain}): {files[domain]} is for {domain} too")
            loaded[domain], files[domain] = key, Path(config.key_file)
        return cls(loaded)

    def key_for(self, domain: str) -> _Key | None:
        """The key of `domain` itself, else of its closest parent domain that has one."""
        labels = domain.split(".")
        for start in range(len(labels)):
            key = self._keys.get(".".join(labels[start:]))
            if key is not None:
                return key
        return None

    def sign(self, message: bytes, canonicalization: tuple[str, str] = ("relaxed", "relaxed")) -> bytes | None:
        """The DKIM-Signature header (folded, CRLF-terminated) to prepend to `message`.

        None when the message has no single From address or no key covers its domain: it goes unsigned.
        """
        prepared = self._prepare(message, canonicalization)
        if prepared is None:
            return None
        key, unsigned, digest = prepared
        return _signature_field(unsigned, self._sign_digest(key, digest))

    async def sign_off_loop(self, message: bytes) -> bytes | None:
        """`sign`, with an RSA private-key operation on the signing threads: it is the only part that costs
        much, and the only one that runs without the GIL from start to end, so the threads hardly ever wait
        for the event loop's GIL and the loop goes on meanwhile."""
        prepared = self._prepare(message, ("relaxed", "relaxed")) if self._keys else None
        if prepared is None:
            return None
        key, unsigned, digest = prepared
        if isinstance(key.private, rsa.RSAPrivateKey):
            loop = asyncio.get_running_loop()
            signature = await loop.run_in_executor(_signing_pool(), self._sign_digest, key, digest)
        else:
            signature = self._sign_digest(key, digest)
        return _signature_field(unsigned, signature)

    def _prepare(self, message: bytes, canonicalization: tuple[str, str]) -> tuple[_Key, bytes, bytes] | None:
        """(key, signature field value up to b=, digest to sign), or None when the message goes unsigned."""
        header_canon, body_canon = canonicalization
        if not {header_canon, body_canon} <= _BODY_CANON.keys():
            raise ValueError(f"canonicalization must be two of simple/relaxed, not {canonicalization!r}")
        if not self._keys:
            return None
        end = message.find(b"\r\n\r\n")
        head, body = (message, b"") if end < 0 else (message[: end + 2], message[end + 4 :])
        fields = parse_header(head)
        domain = None if fields is None else author_domain(fields)
        key = None if domain is None else self.key_for(domain)
        if key is None:
            return None
        names, picked = select_fields(fields)
        body_hash = base64.b64encode(hashlib.sha256(_BODY_CANON[body_canon](body)).digest())
        unsigned = _unsigned_value(key, f"{header_canon}/{body_canon}".encode(), names, body_hash)
        hasher = hashlib.sha256()
        if header_canon == "relaxed":
            for name, value in picked:
                hasher.update(relaxed_field(name, value) + b"\r\n")
            hasher.update(relaxed_field(SIG_NAME, unsigned))
        else:
            for name, value in picked:
                hasher.update(name + b":" + value)
            hasher.update(SIG_NAME + b":" + unsigned)
        return key, unsigned, hasher.digest()

    @staticmethod
    def _sign_digest(key: _Key, digest: bytes) -> bytes:
        if isinstance(key.private, rsa.RSAPrivateKey):
            return key.private.sign(digest, _PKCS1, _PREHASHED)
        return key.private.sign(digest)


def _signature_field(unsigned: bytes, signature: bytes) -> bytes:
    """The whole DKIM-Signature field: its value up to b=, then the signature folded into lines."""
    encoded = base64.b64encode(signature)
    lines = b"\r\n ".join(encoded[i : i + SIG_LINE] for i in range(0, len(encoded), SIG_LINE))
    return SIG_NAME + b":" + unsigned + lines + b"\r\n"


def generate_key(domain: str, selector: str, algorithm: str, out: Path) -> tuple[str, str]:
    """Write a new private key (PEM, mode 0600, never over an existing file) and return its DNS TXT record.

    Returns (name, value), e.g. ("s2026._domainkey.example.net", "v=DKIM1; k=rsa; p=MIIB...").
    """
    if algorithm == "rsa-sha256":
        private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = rsa.generate_private_key(
            public_exponent=65537, key_size=RSA_KEYGEN_BITS
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        kind = "rsa"
    elif algorithm == "ed25519-sha256":
        private = ed25519.Ed25519PrivateKey.generate()
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kind = "ed25519"
    else:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    name = f"{selector}._domainkey.{_ascii_domain(domain)}"
    return name, f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode('ascii')}"
