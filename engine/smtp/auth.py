"""SMTP AUTH credentials: the users_file of salted scrypt hashes, and the delay that slows password guessing.

A users_file holds one `user:hash` line per account; blank lines and lines starting with `#` are ignored.
The hash is `$scrypt$ln=LOG2_N,r=R,p=P$SALT$KEY` with SALT and KEY in unpadded base64, so the cost
parameters travel with each hash and can be raised for new entries without invalidating old ones.
`engine users add FILE USER` writes such lines. The file is re-read when it changes, so accounts can be
added or removed without a restart.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import hmac
import os
import secrets
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

__all__ = [
    "FailureDelays",
    "UsersFile",
    "UsersFileError",
    "add_user",
    "decode_plain",
    "hash_password",
    "users_add_command",
    "verify_password",
]

LOG_N = 15  # N = 32768, r = 8: 32 MiB and ~0.3 s per hash on a 2 GHz core
BLOCK_SIZE = 8
PARALLELISM = 1
SALT_SIZE = 16
KEY_SIZE = 32
_PREFIX = "$scrypt$"


class UsersFileError(Exception):
    """The users_file cannot be read or has a malformed line; AUTH answers 454 until it is fixed."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    maxmem = 256 * r * (n + p) + (1 << 20)
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=KEY_SIZE)


def hash_password(password: str, *, log_n: int = LOG_N, r: int = BLOCK_SIZE, p: int = PARALLELISM) -> str:
    """A fresh salted scrypt hash of `password` in the users_file format."""
    salt = secrets.token_bytes(SALT_SIZE)
    key = _scrypt(password, salt, log_n, r, p)
    return f"{_PREFIX}ln={log_n},r={r},p={p}${_b64(salt)}${_b64(key)}"


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    if not stored.startswith(_PREFIX):
        raise ValueError("not a $scrypt$ hash")
    try:
        params, salt, key = stored[len(_PREFIX) :].split("$")
        fields = dict(item.split("=", 1) for item in params.split(","))
        log_n, r, p = int(fields.pop("ln")), int(fields.pop("r")), int(fields.pop("p"))
        decoded = _unb64(salt), _unb64(key)
    except (KeyError, ValueError, binascii.Error) as error:
        raise ValueError(f"malformed $scrypt$ hash: {error}") from None
    if fields or not (1 <= log_n <= 24 and 1 <= r <= 64 and 1 <= p <= 16) or not all(decoded):
        raise ValueError("malformed $scrypt$ hash: parameters out of range")
    return log_n, r, p, *decoded


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches a users_file hash; ValueError if the hash is malformed. Takes the hash's time."""
    log_n, r, p, salt, key = _parse_hash(stored)
    return hmac.compare_digest(_scrypt(password, salt, log_n, r, p), key)


def decode_plain(response: bytes) -> tuple[str, str, str]:
    """(authorisation identity, user, password) of a base64 SASL PLAIN response (RFC 4616); ValueError if
    malformed."""
    try:
        authzid, user, password = base64.b64decode(response, validate=True).decode().split("\0")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("malformed PLAIN response") from None
    if not user:
        raise ValueError("malformed PLAIN response: no user")
    return authzid, user, password


def _dummy_hash() -> str:
    """A well-formed hash no password matches, so an unknown user costs one scrypt like a known one."""
    salt, key = secrets.token_bytes(SALT_SIZE), secrets.token_bytes(KEY_SIZE)
    return f"{_PREFIX}ln={LOG_N},r={BLOCK_SIZE},p={PARALLELISM}${_b64(salt)}${_b64(key)}"


class UsersFile:
    """The accounts of one listener, re-read whenever the file's size or modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, str] = {}
        self._error: str | None = None
        self._dummy = _dummy_hash()

    def accounts(self) -> dict[str, str]:
        """user → hash, re-read if the file changed; UsersFileError if it cannot be read or has a bad line."""
        with self._lock:
            try:
                stat = os.stat(self.path)
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp != self._stamp:
                    self._users, self._error = self._read(), None
                    self._stamp = stamp
            except (OSError, UsersFileError) as error:
                self._stamp, self._error = None, str(error)
            if self._error is not None:
                raise UsersFileError(self._error)
            return self._users

    def _read(self) -> dict[str, str]:
        users: dict[str, str] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, _, stored = line.partition(":")
            try:
                _parse_hash(stored)
            except ValueError as error:
                raise UsersFileError(f"{self.path}:{number}: {error}") from None
            users[user] = stored
        return users

    def verify(self, user: str, password: str) -> bool:
        """Blocking (one scrypt): run it in a thread. An unknown user costs the same time as a wrong password."""
        stored = self.accounts().get(user)
        if stored is None:
            verify_password(password, self._dummy)
            return False
        return verify_password(password, stored)


class FailureDelays:
    """How long to wait before answering a failed AUTH, per client IP: `base` doubled for every failure
    in a row, at most `cap`; an address is forgotten after `forget_after` seconds without a failure."""

    def __init__(
        self, base: float = 1.0, cap: float = 30.0, forget_after: float = 900.0, max_clients: int = 10_000
    ) -> None:
        self.base = base
        self.cap = cap
        self.forget_after = forget_after
        self.max_clients = max_clients
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def failed(self, address: str) -> float:
        """Counts a failure and returns the delay to apply before answering it."""
        now = time.monotonic()
        count, last = self._failures.pop(address, (0, now))
        count = 1 if now - last > self.forget_after else count + 1
        self._failures[address] = (count, now)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
        return min(self.base * 2 ** min(count - 1, 32), self.cap)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


def add_user(path: Path, user: str, password: str) -> None:
    """Adds `user` to a users_file or replaces its hash; the file is rewritten atomically, readable by owner only."""
    if not user or ":" in user or any(ch.isspace() or not ch.isprintable() for ch in user):
        raise ValueError(f"invalid user name {user!r}: no ':', spaces or control characters")
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip().partition(":")[0] != user or line.lstrip().startswith("#")]
    kept.append(f"{user}:{hash_password(password)}")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write("\n".join(kept) + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def users_add_command(args: argparse.Namespace) -> int:
    """`engine users add FILE USER`: the password is asked for on a terminal, else read from stdin's first line."""
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
        if password != getpass.getpass("again: "):
            print("passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("empty password refused", file=sys.stderr)
        return 1
    try:
        add_user(args.file, args.user, password)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    return 0
