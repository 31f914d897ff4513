"""The spool's LMDB environment through py-lmdb: the pure twin of engine._spooldb.

Same file, same operations, same errors. It is the slower one under load because py-lmdb releases and
re-takes the GIL around every LMDB call: a batch written on the committer thread then hands the GIL back
and forth with the busy event loop several times per message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lmdb

__all__ = ["REMOVE", "STORE", "UPDATE", "MapFull", "MapResized", "Op", "Panic", "SpoolDB", "StoreError"]

STORE, UPDATE, REMOVE = range(3)
Op = tuple[int, bytes, bytes | None, bytes | None]  # (kind, key, envelope, body)
FILE_MODE = 0o600  # message contents: readable by the engine's user only


class StoreError(Exception):
    """An LMDB call failed; the message names the call and LMDB's reason."""


class MapFull(StoreError):
    """The batch does not fit in the memory map: grow it and write the batch again."""


class MapResized(StoreError):
    """Another process grew the map: adopt its size (set_map_size(0)) and try again."""


class Panic(StoreError):
    """A failed meta-page write poisoned the environment: only a fresh one can be used."""


_ERRORS = ((lmdb.MapFullError, MapFull), (lmdb.MapResizedError, MapResized), (lmdb.PanicError, Panic))


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except lmdb.Error as error:
        for raised, ours in _ERRORS:
            if isinstance(error, raised):
                raise ours(str(error)) from error
        raise StoreError(str(error)) from error


class SpoolDB:
    """One environment with two databases, `envelope` and `body`, keyed alike."""

    def __init__(self, path: str, map_size: int) -> None:
        with _translated():
            self._env = lmdb.open(
                path,
                map_size=map_size,
                sync=True,
                metasync=True,
                writemap=False,
                max_dbs=2,
                lock=True,
                mode=FILE_MODE,
                create=False,
            )
            self._envelopes = self._env.open_db(b"envelope")
            self._bodies = self._env.open_db(b"body")

    def reader_check(self) -> int:
        """Frees the reader slots of dead processes; returns how many."""
        with _translated():
            return self._env.reader_check()

    def max_key_size(self) -> int:
        return self._env.max_key_size()

    def map_size(self) -> int:
        return self._env.info()["map_size"]

    def set_map_size(self, size: int) -> None:
        """0 adopts the size another process set. No transaction may be open in this process."""
        with _translated():
            self._env.set_mapsize(size)

    def entries(self) -> int:
        """Messages (envelopes) stored."""
        with _translated(), self._env.begin() as txn:
            return txn.stat(self._envelopes)["entries"]

    def envelope(self, key: bytes) -> bytes | None:
        with _translated(), self._env.begin(db=self._envelopes) as txn:
            return txn.get(key)

    def body(self, key: bytes) -> bytes | None:
        with _translated(), self._env.begin(db=self._bodies) as txn:
            return txn.get(key)

    def envelopes_after(self, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to `limit` (key, envelope) in key order, from the first key past `after` (None: the start)."""
        chunk: list[tuple[bytes, bytes]] = []
        with _translated(), self._env.begin(db=self._envelopes) as txn, txn.cursor() as cursor:
            found = cursor.first() if after is None else cursor.set_range(after)
            if found and cursor.key() == after:
                found = cursor.next()
            while found and len(chunk) < limit:
                chunk.append(cursor.item())
                found = cursor.next()
        return chunk

    def write(self, ops: list[Op]) -> None:
        """One write transaction and one commit (fsync) for the batch: STORE writes envelope and body,
        UPDATE rewrites the envelope of a message still stored, REMOVE deletes both (missing is fine)."""
        envelopes, bodies = self._envelopes, self._bodies
        with _translated(), self._env.begin(write=True) as txn:
            for kind, key, envelope, body in ops:
                if kind == STORE:
                    txn.put(key, envelope, db=envelopes)
                    txn.put(key, body, db=bodies)
                elif kind == UPDATE:
                    if txn.get(key, db=envelopes) is not None:
                        txn.put(key, envelope, db=envelopes)
                else:
                    txn.delete(key, db=envelopes)
                    txn.delete(key, db=bodies)

    def close(self) -> None:
        self._env.close()
