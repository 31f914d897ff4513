"""The durable message spool of one worker: LMDB with group commit, so a 250 costs a share of one fsync.

Every mutating call joins the pending batch; one committer thread writes a whole batch in one transaction
and one fsync while the next batch gathers, so batches grow with load and an idle spool commits at once.
The committer takes the next batch itself as soon as a commit ends (the event loop hands batches over
once per loop iteration and is woken once per commit to resolve its futures): under load it never sleeps,
so there is no thread wake-up or executor hand-off per batch.
Envelopes and bodies live in separate databases of one environment (so a message is durable in one fsync):
a retry rewrites only the small envelope. Their pages interleave in the file, and the kernel's fault-around
maps up to 16 already-cached neighbours on every page fault (MADV_RANDOM only stops readahead I/O), so
listing every envelope maps the whole file, bodies included; the listing therefore unmaps what each chunk
touched (MADV_DONTNEED: the pages stay in the page cache, a later read maps them again).

Durability choices (measured on this machine, see FINDINGS.md): `sync=True` with `metasync=True`, because
MDB_NOMETASYNC "preserves ACI but not D" (LMDB docs) and a 250 promises D; `writemap=False`, because with a
writable map a full disk kills the process with SIGBUS instead of failing the commit, and it was no faster.
Open a Spool after fork: LMDB refuses an environment the parent process still holds.

LMDB calls go through engine.spooldb: compiled against liblmdb, a batch is written in one call that takes
the GIL once, where py-lmdb (the twin) would hand it back and forth with the event loop on every put.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from engine.spooldb import REMOVE, STORE, UPDATE, MapFull, MapResized, Op, Panic, SpoolDB

__all__ = ["Spool", "SpoolError"]

log = logging.getLogger(__name__)

SWITCH_INTERVAL = 0.0002  # seconds; the default 5 ms starves the committer thread next to a busy event loop
LIST_CHUNK = 1024  # envelopes read per read transaction, so listing never pins old pages for long

MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class SpoolError(Exception):
    """A commit failed (disk full, map full that could not be grown, I/O error); the operation did not happen."""


class Spool:
    """One LMDB environment (a directory) holding the envelope and body of every message a worker owns."""

    def __init__(self, path: Path, *, map_size: int = 64 << 30, map_size_cap: int = 1 << 40) -> None:
        self.path = Path(path)
        self._map_size = map_size
        self._map_size_cap = max(map_size, map_size_cap)
        self._poisoned = False
        self.path.mkdir(parents=True, exist_ok=True)
        self._open(map_size)
        cleared = self._db.reader_check()
        if cleared:
            log.info("spool %s: cleared %d stale reader slots", self.path, cleared)
        self._max_key_size = self._db.max_key_size()
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        # Readers on the event loop and set_mapsize/reopen on the committer must never overlap.
        self._map_lock = threading.Lock()
        self._pending: list[tuple[Op, asyncio.Future[None] | None]] = []  # this loop iteration's operations
        self._handed: list[tuple[Op, asyncio.Future[None] | None]] = []  # for the committer's next batch
        self._handover = threading.Condition(threading.Lock())  # guards _handed and _stopping
        self._stopping = False
        self._unfinished = 0  # operations accepted and not yet committed (or failed)
        self._idle = asyncio.Event()  # _unfinished == 0
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._committer = threading.Thread(target=self._commit_loop, name="spool-commit", daemon=True)
        self._committer.start()
        self._closed = False
        self._commits = 0
        self._failed_commits = 0
        self._ops_committed = 0
        self._last_batch = 0

    def _open(self, map_size: int) -> None:
        self._db = SpoolDB(str(self.path), map_size)

    # store, update and remove return futures, not coroutines: awaiting or gathering them costs no Task.

    def store(self, key: bytes, envelope: bytes, body: bytes) -> asyncio.Future[None]:
        """Writes a new message; done once it is on stable storage."""
        return self._submit(STORE, key, envelope, body)

    def update(self, key: bytes, envelope: bytes) -> asyncio.Future[None]:
        """Rewrites only the envelope of a spooled message; a message no longer in the spool stays gone."""
        return self._submit(UPDATE, key, envelope, None)

    def remove(self, key: bytes) -> asyncio.Future[None]:
        """Deletes envelope and body; removing a missing key is not an error."""
        return self._submit(REMOVE, key, None, None)

    def discard(self, key: bytes) -> None:
        """`remove` in the next commit, without waiting for it. For a message whose last recipient is final:
        losing that removal in a crash only means it is delivered once more after the restart, so a delivery
        need not wait for an fsync before it takes the next message. A failed commit is logged."""
        self._enqueue((REMOVE, self._checked(key), None, None), None)

    def envelope(self, key: bytes) -> bytes | None:
        with self._map_lock:
            return self._db.envelope(key)

    def body(self, key: bytes) -> bytes | None:
        with self._map_lock:
            return self._db.body(key)

    def envelopes(self) -> Iterator[tuple[bytes, bytes]]:
        """All (key, envelope) in key order, read in chunks so no read transaction outlives a chunk."""
        after: bytes | None = None
        while True:
            with self._map_lock:
                chunk = self._db.envelopes_after(after, LIST_CHUNK)
            self._unmap()
            yield from chunk
            if len(chunk) < LIST_CHUNK:
                return
            after = chunk[-1][0]

    def _unmap(self) -> None:
        """Drops this process's mapping of the spool file's pages (not the pages: they stay cached)."""
        if _libc is None:
            return
        data = str((self.path / "data.mdb").resolve())
        with self._map_lock, open("/proc/self/maps") as maps:
            for line in maps:
                if line.rstrip("\n").endswith(data):
                    start, end = (int(bound, 16) for bound in line.split(None, 1)[0].split("-"))
                    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)

    def stats(self) -> dict:
        """Counts for the admin API and metrics: contents, space, and how well commits are grouped."""
        with self._map_lock:
            messages = self._db.entries()
            map_size = self._db.map_size()
        return {
            "messages": messages,
            "disk_bytes": os.stat(self.path / "data.mdb").st_blocks * 512,
            "map_size": map_size,
            "commits": self._commits,
            "failed_commits": self._failed_commits,
            "ops_committed": self._ops_committed,
            "last_batch": self._last_batch,
        }

    async def close(self) -> None:
        """Waits for every accepted operation to commit (or fail), then closes the environment."""
        if self._closed:
            return
        self._closed = True
        await self._idle.wait()
        with self._handover:
            self._stopping = True
            self._handover.notify()
        self._committer.join()
        self._db.close()

    def _checked(self, key: bytes) -> bytes:
        if self._closed:
            raise SpoolError("spool is closed")
        if not 0 < len(key) <= self._max_key_size:
            raise ValueError(f"spool keys are 1 to {self._max_key_size} bytes, got {len(key)}")
        return key

    def _submit(self, kind: int, key: bytes, envelope: bytes | None, body: bytes | None) -> asyncio.Future[None]:
        """The operation's future; a closed spool or an unusable key fails it (raised when awaited)."""
        future = asyncio.get_running_loop().create_future()
        try:
            op = (kind, self._checked(key), envelope, body)
        except (SpoolError, ValueError) as error:
            future.set_exception(error)
        else:
            self._enqueue(op, future)
        return future

    def _enqueue(self, op: Op, future: asyncio.Future[None] | None) -> None:
        if not self._pending:
            # Hand over at the end of this loop iteration, so everything submitted in it shares a commit.
            self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._hand_over)
        self._pending.append((op, future))
        self._unfinished += 1
        self._idle.clear()

    def _hand_over(self) -> None:
        with self._handover:
            self._handed += self._pending
            self._handover.notify()
        self._pending = []

    def _commit_loop(self) -> None:
        """Committer thread: takes whatever was handed over, commits it, passes the outcome to the loop."""
        while True:
            with self._handover:
                while not self._handed and not self._stopping:
                    self._handover.wait()
                if not self._handed:
                    return
                batch, self._handed = self._handed, []
            try:
                self._commit([op for op, _ in batch])
            except Exception as error:
                self._loop.call_soon_threadsafe(self._finished, batch, error)
            else:
                self._loop.call_soon_threadsafe(self._finished, batch, None)

    def _finished(self, batch: list[tuple[Op, asyncio.Future[None] | None]], error: Exception | None) -> None:
        if error is None:
            self._commits += 1
            self._ops_committed += len(batch)
            self._last_batch = len(batch)
        else:
            self._failed_commits += 1
            log.error("spool %s: commit of %d operations failed: %s", self.path, len(batch), error)
        for _, future in batch:
            if future is None or future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                failure = SpoolError(f"spool commit failed: {error}")
                failure.__cause__ = error
                future.set_exception(failure)
        self._unfinished -= len(batch)
        if not self._unfinished:
            self._idle.set()

    def _commit(self, ops: list[Op]) -> None:
        """One write transaction and one fsync for the whole batch."""
        if self._poisoned:
            self._reopen()
        grown = resized = False
        while True:
            try:
                self._db.write(ops)
                return
            except MapFull:
                if grown or not self._grow():
                    raise
                grown = True
            except MapResized:
                if resized:
                    raise
                resized = True
                self._set_map_size(0)
            except Panic:
                # A failed meta-page write poisons the environment for good: readers and the next batch need
                # a fresh one (tried again before every batch until it opens).
                self._poisoned = True
                self._reopen()
                raise

    def _grow(self) -> bool:
        current = self._db.map_size()
        if current >= self._map_size_cap:
            return False
        target = min(current * 2, self._map_size_cap)
        log.warning("spool %s: map full, growing it from %d to %d bytes", self.path, current, target)
        self._set_map_size(target)
        return True

    def _set_map_size(self, size: int) -> None:
        with self._map_lock:
            self._db.set_map_size(size)
            self._map_size = self._db.map_size()

    def _reopen(self) -> None:
        with self._map_lock:
            self._db.close()
            self._open(self._map_size)
            self._poisoned = False
