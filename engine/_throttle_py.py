"""Pure-Python twin of engine._throttle: lane-wide shaping counters in a shared-memory table.

One table serves every worker of a lane: the supervisor creates it (a file, so workers started with fork
and exec attach by path; or an anonymous shared mapping that forked children inherit), workers attach.
Each (egress, domain) pair has a slot holding a GCRA clock for the message rate and one lease entry per
worker for its open connections. Both implementations use the same layout and the same robust,
process-shared pthread mutex per slot (through ctypes here), so either can drive a table, even at once.
A worker killed while holding a slot's mutex leaves it to the next locker (EOWNERDEAD); its connection
leases are dropped by reclaim(worker) or expire on their own when not renewed.

Clustered nodes share a rate through Redis (engine.cluster.rates): their tables are created with a lease
area, and while the supervisor switches the table to leased mode a message also needs a token the
supervisor leased from the cluster for its slot.
acquire() leaves the slot's rate, burst and unmet demand for the supervisor to read (demand()) and the
supervisor hands tokens out with grant(); a token not used by its end time is dropped, so tokens leased
in one moment cannot pile up into a burst later.

Layout (little-endian): a 64-byte header (magic b"ENGTHRT2", u32 slots, u32 workers, u32 slot size,
u32 leased flag, u64 offset of the lease area or 0), then `slots` slots of 64 + 32 * workers bytes:
pthread_mutex_t at 0 (48 bytes reserved), u64 key at 48 (0 = free; keys are never removed), i64 GCRA
theoretical arrival time in nanoseconds at 56, then per worker entry: i64 worker id, i64 open
connections, f64 lease seconds, f64 lease end (monotonic seconds). The lease area, when there is one,
has 48 bytes per slot, guarded by the slot's mutex: f64 rate and i64 burst last asked for, i64 leased
tokens, i64 their end in nanoseconds, i64 acquires refused for want of a token and i64 tokens taken,
both since the last grant. Times are time.monotonic() seconds, shared by every process on the host.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import struct
from collections.abc import Iterator

__all__ = ["TableFull", "ThrottleTable", "throttle_key"]

MAGIC = b"ENGTHRT2"
HEADER = struct.Struct("<8sIII")
_LEASE_AREA = struct.Struct("<Q")
HEADER_SIZE = 64
LEASED_AT = 20
LEASE_AREA_AT = 24
MUTEX_SIZE = 48
SLOT_HEAD = 64
LEASE_WAIT = 0.025  # seconds a worker waits for tokens when its slot has none (the supervisor leases every 50 ms)
ENTRY = struct.Struct("<qqdd")
_KEY = struct.Struct("<Q")
_SLOT = struct.Struct("<Qq")
_LEASE = struct.Struct("<dqqqqq")  # rate, burst, tokens, tokens' end (ns), refused, taken
_FLAG = struct.Struct("<I")
MIN_RATE = 0.001
MAX_RATE = 1e9
MAX_BURST = 1_000_000
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1

_libc = ctypes.CDLL(None, use_errno=True)
_lock = _libc.pthread_mutex_lock
_unlock = _libc.pthread_mutex_unlock
_consistent = _libc.pthread_mutex_consistent
for _function in (_lock, _unlock, _consistent, _libc.pthread_mutex_init):
    _function.restype = ctypes.c_int
_lock.argtypes = _unlock.argtypes = _consistent.argtypes = [ctypes.c_void_p]


class TableFull(Exception):
    """Every slot holds another key; create the table with more slots."""


def throttle_key(egress: str, domain: str) -> int:
    """The 64-bit slot key of an (egress source, destination domain) pair, the same in every process."""
    digest = hashlib.blake2b(f"{egress}\0{domain.lower()}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def slot_size(workers: int) -> int:
    return SLOT_HEAD + ENTRY.size * workers


def open_table(path: str | os.PathLike | None, slots: int, workers: int, leases: bool = False) -> mmap.mmap:
    """A new, initialised table (with a lease area if `leases`); a file is written aside and renamed so
    attachers never see it half-made."""
    if not 1 <= workers <= 4096:
        raise ValueError("workers must be in [1, 4096]")
    if not 1 <= slots <= 1 << 24:
        raise ValueError("slots must be in [1, 2**24]")
    slots = 1 << (slots - 1).bit_length()
    lease_area = HEADER_SIZE + slots * slot_size(workers) if leases else 0
    size = HEADER_SIZE + slots * slot_size(workers) + (slots * _LEASE.size if leases else 0)
    if path is None:
        table = mmap.mmap(-1, size)
        _initialise(table, slots, workers, lease_area)
        return table
    temporary = f"{os.fspath(path)}.{os.getpid()}.tmp"
    descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(descriptor, size)
        table = mmap.mmap(descriptor, size)
    finally:
        os.close(descriptor)
    _initialise(table, slots, workers, lease_area)
    os.replace(temporary, path)
    return table


def attach_table(path: str | os.PathLike) -> mmap.mmap:
    """Maps a table another process created; refuses files that are not one."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        table = mmap.mmap(descriptor, 0)
    finally:
        os.close(descriptor)
    magic, slots, workers, size = HEADER.unpack_from(table, 0)
    (lease_area,) = _LEASE_AREA.unpack_from(table, LEASE_AREA_AT)
    end = lease_area + slots * _LEASE.size if lease_area else HEADER_SIZE + slots * size
    if magic != MAGIC or size != slot_size(workers) or len(table) < end:
        table.close()
        raise ValueError(f"{path} is not a throttle table")
    return table


def _initialise(table: mmap.mmap, slots: int, workers: int, lease_area: int) -> None:
    HEADER.pack_into(table, 0, MAGIC, slots, workers, slot_size(workers))
    _LEASE_AREA.pack_into(table, LEASE_AREA_AT, lease_area)
    attributes = ctypes.create_string_buffer(64)
    _libc.pthread_mutexattr_init(attributes)
    _libc.pthread_mutexattr_setpshared(attributes, _PTHREAD_PROCESS_SHARED)
    _libc.pthread_mutexattr_setrobust(attributes, _PTHREAD_MUTEX_ROBUST)
    buffer = ctypes.c_char.from_buffer(table)
    base = ctypes.addressof(buffer)
    try:
        for slot in range(slots):
            if _libc.pthread_mutex_init(ctypes.c_void_p(base + HEADER_SIZE + slot * slot_size(workers)), attributes):
                raise OSError("pthread_mutex_init failed")
    finally:
        _libc.pthread_mutexattr_destroy(attributes)
        del buffer


class ThrottleTable:
    """Message-rate clocks and connection leases per (egress, domain) key, shared by a lane's workers."""

    def __init__(self, table: mmap.mmap, path: str | None = None) -> None:
        """Wraps a mapped table; use create() or attach()."""
        _, self.slots, self.workers, self._slot_size = HEADER.unpack_from(table, 0)
        (self._lease_area,) = _LEASE_AREA.unpack_from(table, LEASE_AREA_AT)
        self.path = path
        self._map = table
        self._buffer = ctypes.c_char.from_buffer(table)
        self._base = ctypes.addressof(self._buffer) + HEADER_SIZE

    @classmethod
    def create(
        cls, path: str | os.PathLike | None = None, slots: int = 4096, workers: int = 16, leases: bool = False
    ) -> ThrottleTable:
        """A fresh table (slots rounded up to a power of two): a file at `path`, or anonymous when None;
        `leases` gives it the lease area a cluster node needs (48 bytes a slot)."""
        return cls(open_table(path, slots, workers, leases), None if path is None else os.fspath(path))

    @classmethod
    def attach(cls, path: str | os.PathLike) -> ThrottleTable:
        return cls(attach_table(path), os.fspath(path))

    def close(self) -> None:
        del self._buffer
        self._map.close()

    # slot access

    def _acquire_lock(self, offset: int) -> None:
        status = _lock(self._base + offset)
        if status == errno.EOWNERDEAD:
            _consistent(self._base + offset)
        elif status:
            raise OSError(status, os.strerror(status))

    def _release_lock(self, offset: int) -> None:
        _unlock(self._base + offset)

    def _locate(self, key: int, claim: bool) -> int:
        """Offset of the key's slot, locked; -1 (nothing locked) when absent and not claimed."""
        if not 0 < key <= _MASK64:
            raise ValueError("key must be in [1, 2**64)")
        mask = self.slots - 1
        start = ((key * _GOLDEN) & _MASK64) >> 32
        for probe in range(self.slots):
            offset = ((start + probe) & mask) * self._slot_size
            self._acquire_lock(offset)
            (found,) = _KEY.unpack_from(self._map, HEADER_SIZE + offset + MUTEX_SIZE)
            if found == key:
                return offset
            if found == 0:
                if claim:
                    _KEY.pack_into(self._map, HEADER_SIZE + offset + MUTEX_SIZE, key)
                    return offset
                self._release_lock(offset)
                return -1
            self._release_lock(offset)
        if claim:
            raise TableFull(f"all {self.slots} throttle slots are taken")
        return -1

    def _entries(self, offset: int) -> list[list]:
        start = HEADER_SIZE + offset + SLOT_HEAD
        return [list(ENTRY.unpack_from(self._map, start + i * ENTRY.size)) for i in range(self.workers)]

    def _store(self, offset: int, index: int, entry: list) -> None:
        ENTRY.pack_into(self._map, HEADER_SIZE + offset + SLOT_HEAD + index * ENTRY.size, *entry)

    # message rate

    def acquire(self, key: int, rate: float, burst: int, now: float) -> float:
        """0.0 when a message may go now (and counts it), else the seconds to wait (GCRA, burst messages)."""
        if not MIN_RATE <= rate <= MAX_RATE or not 1 <= burst <= MAX_BURST:
            raise ValueError(f"rate must be in [{MIN_RATE}, {MAX_RATE}] and burst in [1, {MAX_BURST}]")
        if not -9e9 < now < 9e9:
            raise ValueError("now must be a monotonic clock reading in seconds")
        interval = int(1e9 / rate)
        now_ns = int(now * 1e9)
        offset = self._locate(key, True)
        try:
            position = HEADER_SIZE + offset + MUTEX_SIZE
            _, tat = _SLOT.unpack_from(self._map, position)
            tat = max(tat, now_ns)
            wait = tat - now_ns - (burst - 1) * interval
            if wait > 0:
                return wait / 1e9
            if self.leased() and not self._take_token(offset, rate, burst, now_ns):
                return LEASE_WAIT
            _SLOT.pack_into(self._map, position, key, tat + interval)
            return 0.0
        finally:
            self._release_lock(offset)

    def _lease_position(self, offset: int) -> int:
        return self._lease_area + offset // self._slot_size * _LEASE.size

    def _take_token(self, offset: int, rate: float, burst: int, now_ns: int) -> bool:
        position = self._lease_position(offset)
        _, _, tokens, until, refused, taken = _LEASE.unpack_from(self._map, position)
        if tokens > 0 and until > now_ns:
            _LEASE.pack_into(self._map, position, rate, burst, tokens - 1, until, refused, taken + 1)
            return True
        _LEASE.pack_into(self._map, position, rate, burst, 0, until, refused + 1, taken)
        return False

    # cluster leases

    def leased(self) -> bool:
        """Whether a message also needs a token leased from the cluster (see grant())."""
        return _FLAG.unpack_from(self._map, LEASED_AT)[0] != 0

    def set_leased(self, leased: bool) -> None:
        """The supervisor's switch: on while it leases tokens from the cluster, off to shape alone."""
        self._check_lease_area()
        _FLAG.pack_into(self._map, LEASED_AT, 1 if leased else 0)

    def demand(self, now: float) -> list[tuple[int, float, int, int, int, int]]:
        """(key, rate, burst, valid tokens left, acquires refused, tokens taken) of every slot that asked for
        or took a token since its last grant: the keys the supervisor leases tokens for, and how many."""
        self._check_lease_area()
        now_ns = int(now * 1e9)
        found = []
        for offset, key in self._occupied():
            self._acquire_lock(offset)
            try:
                lease = _LEASE.unpack_from(self._map, self._lease_position(offset))
            finally:
                self._release_lock(offset)
            rate, burst, tokens, until, refused, taken = lease
            if refused or taken:
                found.append((key, rate, burst, tokens if until > now_ns else 0, refused, taken))
        return found

    def grant(self, key: int, tokens: int, now: float, until: float) -> None:
        """Adds `tokens` leased from the cluster to the key's slot (with those still valid at `now`); all of
        them expire at `until`. Clears the slot's demand."""
        self._check_lease_area()
        offset = self._locate(key, True)
        try:
            position = self._lease_position(offset)
            rate, burst, left, end, _, _ = _LEASE.unpack_from(self._map, position)
            left = left if end > int(now * 1e9) else 0
            _LEASE.pack_into(self._map, position, rate, burst, left + max(tokens, 0), int(until * 1e9), 0, 0)
        finally:
            self._release_lock(offset)

    def _check_lease_area(self) -> None:
        if not self._lease_area:
            raise ValueError("this table has no lease area: create it with leases=True")

    # connections

    def open_connection(self, key: int, limit: int, worker: int, now: float, lease: float) -> bool:
        """Takes one of the key's `limit` connection slots for `worker` (held for `lease` s unless renewed)."""
        offset = self._locate(key, True)
        try:
            entries = self._entries(offset)
            total, mine, free = 0, -1, -1
            for index, entry in enumerate(entries):
                if entry[1] > 0 and entry[3] <= now:
                    entry[1] = 0
                    self._store(offset, index, entry)
                if entry[1] > 0:
                    total += entry[1]
                    if entry[0] == worker:
                        mine = index
                elif free < 0:
                    free = index
            if total >= limit:
                return False
            if mine >= 0:
                self._store(offset, mine, [worker, entries[mine][1] + 1, lease, now + lease])
                return True
            if free >= 0:
                self._store(offset, free, [worker, 1, lease, now + lease])
                return True
            return False
        finally:
            self._release_lock(offset)

    def close_connection(self, key: int, worker: int) -> bool:
        """Gives back one of `worker`'s connection slots; False when it held none (lease expired)."""
        offset = self._locate(key, False)
        if offset < 0:
            return False
        try:
            for index, entry in enumerate(self._entries(offset)):
                if entry[1] > 0 and entry[0] == worker:
                    entry[1] -= 1
                    self._store(offset, index, entry)
                    return True
            return False
        finally:
            self._release_lock(offset)

    def connections(self, key: int, now: float) -> int:
        """Open connections at `key`, all workers, leases still running."""
        offset = self._locate(key, False)
        if offset < 0:
            return 0
        try:
            return sum(entry[1] for entry in self._entries(offset) if entry[1] > 0 and entry[3] > now)
        finally:
            self._release_lock(offset)

    def renew(self, worker: int, now: float) -> int:
        """Extends `worker`'s running leases by their length; returns how many connections they cover."""
        return self._sweep(worker, now, True)

    def reclaim(self, worker: int) -> int:
        """Drops every connection `worker` holds (it died); returns how many there were."""
        return self._sweep(worker, 0.0, False)

    def _occupied(self) -> Iterator[tuple[int, int]]:
        """(offset, key) of every slot some key holds."""
        for slot in range(self.slots):
            offset = slot * self._slot_size
            (key,) = _KEY.unpack_from(self._map, HEADER_SIZE + offset + MUTEX_SIZE)
            if key:
                yield offset, key

    def _sweep(self, worker: int, now: float, renew: bool) -> int:
        covered = 0
        for offset, _ in self._occupied():
            self._acquire_lock(offset)
            try:
                for index, entry in enumerate(self._entries(offset)):
                    if entry[1] <= 0 or entry[0] != worker:
                        continue
                    if renew and entry[3] > now:
                        covered += entry[1]
                        entry[3] = now + entry[2]
                    else:
                        if not renew:
                            covered += entry[1]
                        entry[1] = 0
                    self._store(offset, index, entry)
            finally:
                self._release_lock(offset)
        return covered
