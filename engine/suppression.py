"""The suppression list: addresses bulk mail is no longer sent to, globally or for one tenant.

One LMDB environment of its own (spool_dir/suppression), opened by the supervisor's admin API and by every
bulk worker, each after fork/exec. LMDB lets several processes share it: every write is one durable
transaction, and every lookup starts a fresh read transaction, so a worker sees an unsubscribe the moment
the admin API committed it, without a restart or a message between processes.

    suppressed = SuppressionList(config.engine.spool_dir / "suppression")
    suppressed.add("bob@example.org", tenant="acme", reason="one-click unsubscribe")
    suppressed.contains("Bob@example.org", "acme")  # True: addresses compare case-insensitively
    suppressed.contains("bob@example.org", "other")  # False: only acme's list and the global one apply

In a cluster every node keeps its own list and the supervisor replicates it (engine.cluster.suppression).
With the journal switched on (set_journal), every add and remove, in whichever process it happens, also
writes a Change to a journal in the same transaction; the supervisor publishes the journal and forgets
what it published, so an add made while Redis is unreachable waits there, durable, until it can spread.
Changes that came from other nodes are applied with apply(), which does not journal them again.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb
import msgpack

__all__ = ["Change", "SuppressionEntry", "SuppressionList", "suppression_path"]

log = logging.getLogger(__name__)

DIRECTORY = "suppression"
_SEPARATOR = b"\x00"
_JOURNAL_ON = b"journal"
_SEQUENCE = struct.Struct(">Q")


def suppression_path(spool_dir: Path) -> Path:
    """Where an installation keeps its suppression list."""
    return Path(spool_dir) / DIRECTORY


@dataclass(frozen=True, slots=True)
class SuppressionEntry:
    address: str
    tenant: str | None  # None: suppressed for every tenant
    reason: str
    created: float  # Unix time

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Change:
    """One add (value = the entry's packed reason and time) or remove (value None) of a list key."""

    key: bytes  # tenant NUL address, as the list stores it
    value: bytes | None

    def entry(self) -> SuppressionEntry | None:
        return None if self.value is None else _entry(self.key, self.value)


def _key(address: str, tenant: str | None) -> bytes:
    if _SEPARATOR.decode() in (tenant or ""):
        raise ValueError("a tenant name cannot contain NUL")
    return (tenant or "").encode() + _SEPARATOR + address.strip().lower().encode()


def _entry(key: bytes, value: bytes) -> SuppressionEntry:
    tenant, _, address = key.partition(_SEPARATOR)
    reason, created = msgpack.unpackb(value)
    return SuppressionEntry(address.decode(), tenant.decode() or None, reason, created)


class SuppressionList:
    """A durable set of (tenant or global, address) shared by every process of one installation."""

    def __init__(self, path: Path, *, map_size: int = 1 << 30, map_size_cap: int = 1 << 40) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._map_size_cap = max(map_size, map_size_cap)
        self._env = lmdb.open(str(self.path), map_size=map_size, sync=True, metasync=True, max_dbs=3, lock=True)
        self._db = self._env.open_db(b"suppression")
        self._journal = self._env.open_db(b"journal")
        self._state = self._env.open_db(b"state")
        self._max_key = self._env.max_key_size()
        self._write_lock = threading.Lock()
        cleared = self._env.reader_check()
        if cleared:
            log.info("suppression list %s: cleared %d stale reader slots", self.path, cleared)

    def add(self, address: str, tenant: str | None = None, reason: str = "") -> bool:
        """Suppresses `address` for `tenant` (None: for everyone); False when it already was."""
        return self.add_many([address], tenant, reason) == 1

    def add_many(self, addresses: Iterable[str], tenant: str | None = None, reason: str = "") -> int:
        """Adds several addresses in one durable transaction; returns how many were new."""
        value = msgpack.packb([reason, time.time()])
        keys = [self._checked(_key(address, tenant)) for address in addresses]

        def add(txn: lmdb.Transaction) -> int:
            added = [key for key in keys if txn.put(key, value, overwrite=False)]
            self._record(txn, [Change(key, value) for key in added])
            return len(added)

        return self._write(add)

    def remove(self, address: str, tenant: str | None = None) -> bool:
        """Lifts one suppression (the global one when tenant is None); False when there was none."""
        key = self._checked(_key(address, tenant))

        def remove(txn: lmdb.Transaction) -> bool:
            removed = txn.delete(key)
            if removed:
                self._record(txn, [Change(key, None)])
            return removed

        return self._write(remove)

    def contains(self, address: str, tenant: str | None = None) -> bool:
        """Whether mail of `tenant` must not go to `address`: on the global list or on the tenant's."""
        global_key = _key(address, None)
        tenant_key = _key(address, tenant) if tenant else None
        return self._read(lambda txn: txn.get(global_key) is not None or bool(tenant_key and txn.get(tenant_key)))

    def get(self, address: str, tenant: str | None = None) -> SuppressionEntry | None:
        """The entry exactly for (address, tenant), without falling back to the global list."""
        key = _key(address, tenant)
        value = self._read(lambda txn: txn.get(key))
        return None if value is None else _entry(key, value)

    def list(self, tenant: str | None = None, limit: int = 100, offset: int = 0) -> list[SuppressionEntry]:
        """Entries in (tenant, address) order: all of them when tenant is None, else only that tenant's."""

        def page(txn: lmdb.Transaction) -> list[SuppressionEntry]:
            found = []
            for index, (key, value) in enumerate(self._scan(txn, tenant)):
                if index >= offset + limit:
                    break
                if index >= offset:
                    found.append(_entry(key, value))
            return found

        return self._read(page)

    def count(self, tenant: str | None = None) -> int:
        """How many entries `list(tenant)` would page through."""
        if tenant is None:
            return self._read(lambda txn: txn.stat(self._db)["entries"])
        return self._read(lambda txn: sum(1 for _ in self._scan(txn, tenant)))

    def close(self) -> None:
        self._env.close()

    # replication (engine.cluster.suppression)

    def set_journal(self, enabled: bool) -> None:
        """Starts journaling every change, or stops and drops the journal (a node that left its cluster)."""

        def switch(txn: lmdb.Transaction) -> None:
            if enabled:
                txn.put(_JOURNAL_ON, b"1", db=self._state)
            elif txn.delete(_JOURNAL_ON, db=self._state):
                txn.drop(self._journal, delete=False)

        self._write(switch)

    def journal(self, limit: int = 1000) -> list[tuple[bytes, Change]]:
        """The oldest unpublished changes, each with its journal position for forget()."""

        def oldest(txn: lmdb.Transaction) -> list[tuple[bytes, Change]]:
            found = []
            for position, packed in txn.cursor(self._journal):
                if len(found) >= limit:
                    break
                key, value = msgpack.unpackb(packed)
                found.append((position, Change(key, value)))
            return found

        return self._read(oldest)

    def forget(self, positions: Iterable[bytes]) -> None:
        """Drops published changes from the journal."""
        positions = list(positions)
        self._write(lambda txn: [txn.delete(position, db=self._journal) for position in positions])

    def apply(self, changes: Iterable[Change], state: Mapping[str, bytes] | None = None) -> int:
        """Applies changes made on other nodes, in order, without journaling them, and sets `state` values
        in the same transaction; returns how many changed the list. An add never replaces an entry the list
        already has (it keeps its own reason and time)."""
        changes = [Change(self._checked(change.key), change.value) for change in changes]

        def apply(txn: lmdb.Transaction) -> int:
            changed = 0
            for change in changes:
                if change.value is None:
                    changed += txn.delete(change.key)
                else:
                    changed += txn.put(change.key, change.value, overwrite=False)
            for name, value in (state or {}).items():
                txn.put(name.encode(), value, db=self._state)
            return changed

        return self._write(apply)

    def items(self, after: bytes = b"", limit: int = 1000) -> list[Change]:
        """Every entry as an add, in key order, `limit` at a time: pass the last key seen as `after`."""

        def page(txn: lmdb.Transaction) -> list[Change]:
            cursor = txn.cursor(self._db)
            if not cursor.set_range(after):
                return []
            found = []
            for key, value in cursor.iternext():
                if key == after:
                    continue
                if len(found) >= limit:
                    break
                found.append(Change(key, value))
            return found

        return self._read(page)

    def state(self, name: str) -> bytes | None:
        """A value the replication keeps with the list (its cluster's epoch, its place in the change stream)."""
        return self._read(lambda txn: txn.get(name.encode(), db=self._state))

    def set_state(self, name: str, value: bytes) -> None:
        self._write(lambda txn: txn.put(name.encode(), value, db=self._state))

    def _record(self, txn: lmdb.Transaction, changes: list[Change]) -> None:
        """Journals changes when the journal is on; positions grow within the writer-serialised transaction."""
        if not changes or txn.get(_JOURNAL_ON, db=self._state) is None:
            return
        cursor = txn.cursor(self._journal)
        last = _SEQUENCE.unpack(cursor.key())[0] if cursor.last() else 0
        position = max(last + 1, time.time_ns())
        for offset, change in enumerate(changes):
            txn.put(_SEQUENCE.pack(position + offset), msgpack.packb([change.key, change.value]), db=self._journal)

    def _scan(self, txn: lmdb.Transaction, tenant: str | None) -> Iterator[tuple[bytes, bytes]]:
        cursor = txn.cursor(self._db)
        if tenant is None:
            yield from cursor.iternext()
            return
        prefix = _key("", tenant)
        if not cursor.set_range(prefix):
            return
        for key, value in cursor.iternext():
            if not key.startswith(prefix):
                return
            yield key, value

    def _checked(self, key: bytes) -> bytes:
        if len(key) > self._max_key:
            raise ValueError(f"address and tenant too long for the suppression list ({len(key)} bytes)")
        return key

    def _read(self, operation):
        for _ in range(2):
            try:
                with self._env.begin(db=self._db) as txn:
                    return operation(txn)
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)  # another process grew the map: adopt its size
        with self._env.begin(db=self._db) as txn:
            return operation(txn)

    def _write(self, operation):
        with self._write_lock:
            while True:
                try:
                    with self._env.begin(db=self._db, write=True) as txn:
                        return operation(txn)
                except lmdb.MapResizedError:
                    self._env.set_mapsize(0)
                except lmdb.MapFullError:
                    current = self._env.info()["map_size"]
                    if current >= self._map_size_cap:
                        raise
                    self._env.set_mapsize(min(current * 2, self._map_size_cap))
