# cython: language_level=3
"""Lane-wide shaping counters, compiled: GCRA message-rate clocks and connection leases in shared memory.

The operations on a table engine/_throttle_py.py creates and documents (the layout, the files, the
anonymous mappings are shared with it and are not hot). Each operation locks one slot's robust,
process-shared pthread mutex, the same one the twin locks through ctypes, so both can drive one table
at once; a slot whose locker died is taken over (EOWNERDEAD) and stays usable.
"""

import os

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from engine._throttle_py import (
    LEASE_WAIT,
    MAX_BURST,
    MAX_RATE,
    MIN_RATE,
    TableFull,
    attach_table,
    open_table,
    throttle_key,
)

__all__ = ["TableFull", "ThrottleTable", "throttle_key"]


cdef extern from *:
    """
    #include <errno.h>
    #include <pthread.h>
    #include <stdint.h>
    _Static_assert(sizeof(pthread_mutex_t) <= 48, "pthread_mutex_t must fit the 48 bytes a slot reserves");
    static int throttle_lock(char *slot) {
        int status = pthread_mutex_lock((pthread_mutex_t *)slot);
        if (status == EOWNERDEAD) {
            pthread_mutex_consistent((pthread_mutex_t *)slot);
            status = 0;
        }
        return status;
    }
    static void throttle_unlock(char *slot) { pthread_mutex_unlock((pthread_mutex_t *)slot); }
    static uint64_t throttle_peek_key(const char *slot) {
        return __atomic_load_n((const uint64_t *)(slot + 48), __ATOMIC_ACQUIRE);
    }
    static void throttle_set_key(char *slot, uint64_t key) {
        __atomic_store_n((uint64_t *)(slot + 48), key, __ATOMIC_RELEASE);
    }
    """
    int throttle_lock(char *slot) nogil
    void throttle_unlock(char *slot) nogil
    uint64_t throttle_peek_key(const char *slot) nogil
    void throttle_set_key(char *slot, uint64_t key) nogil


cdef struct Entry:
    int64_t worker
    int64_t count
    double lease
    double until


cdef struct Lease:
    double rate
    int64_t burst
    int64_t tokens
    int64_t until
    int64_t refused
    int64_t taken


cdef enum:
    _HEADER = 64
    _LEASED = 20
    _LEASE_AREA = 24
    _KEY = 48
    _TAT = 56
    _ENTRIES = 64

cdef uint64_t _GOLDEN = 0x9E3779B97F4A7C15ULL


cdef inline bint _take_token(Lease *lease, double rate, int64_t burst, int64_t now_ns) noexcept nogil:
    """One leased token for a message, if the slot holds a valid one; else the refusal counts as demand."""
    lease.rate = rate
    lease.burst = burst
    if lease.tokens > 0 and lease.until > now_ns:
        lease.tokens -= 1
        lease.taken += 1
        return True
    lease.tokens = 0
    lease.refused += 1
    return False


cdef class ThrottleTable:
    """Message-rate clocks and connection leases per (egress, domain) key, shared by a lane's workers."""

    cdef object _map
    cdef Py_buffer _view
    cdef bint _viewing
    cdef char *_slots
    cdef uint32_t *_leased
    cdef char *_leases
    cdef uint64_t _mask
    cdef uint32_t _slot_size
    cdef readonly uint32_t slots
    cdef readonly uint32_t workers
    cdef readonly object path

    def __init__(self, table, path=None):
        """Wraps a mapped table; use create() or attach()."""
        cdef const char *header
        cdef uint64_t lease_area
        PyObject_GetBuffer(table, &self._view, PyBUF_WRITABLE)
        self._viewing = True
        self._map = table
        self.path = path
        header = <const char *>self._view.buf
        memcpy(&self.slots, header + 8, 4)
        memcpy(&self.workers, header + 12, 4)
        memcpy(&self._slot_size, header + 16, 4)
        self._mask = self.slots - 1
        self._slots = <char *>self._view.buf + _HEADER
        self._leased = <uint32_t *>(<char *>self._view.buf + _LEASED)
        memcpy(&lease_area, header + _LEASE_AREA, 8)
        self._leases = <char *>self._view.buf + lease_area if lease_area else NULL

    def __dealloc__(self):
        if self._viewing:
            PyBuffer_Release(&self._view)

    @classmethod
    def create(cls, path=None, int slots=4096, int workers=16, bint leases=False):
        """A fresh table (slots rounded up to a power of two): a file at `path`, or anonymous when None;
        `leases` gives it the lease area a cluster node needs (48 bytes a slot)."""
        return cls(open_table(path, slots, workers, leases), None if path is None else os.fspath(path))

    @classmethod
    def attach(cls, path):
        return cls(attach_table(path), os.fspath(path))

    def close(self) -> None:
        if self._viewing:
            PyBuffer_Release(&self._view)
            self._viewing = False
        self._map.close()

    cdef char *_locate(self, uint64_t key, bint claim) except? NULL:
        """The key's slot, locked; NULL (nothing locked) when absent and not claimed."""
        cdef uint64_t start = (key * _GOLDEN) >> 32
        cdef uint64_t probe, found
        cdef char *slot
        cdef int status
        if key == 0:
            raise ValueError("key must be in [1, 2**64)")
        if not self._viewing:
            raise ValueError("the table is closed")
        for probe in range(self.slots):
            slot = self._slots + ((start + probe) & self._mask) * self._slot_size
            status = throttle_lock(slot)
            if status:
                raise OSError(status, os.strerror(status))
            found = (<uint64_t *>(slot + _KEY))[0]
            if found == key:
                return slot
            if found == 0:
                if claim:
                    throttle_set_key(slot, key)
                    return slot
                throttle_unlock(slot)
                return NULL
            throttle_unlock(slot)
        if claim:
            raise TableFull(f"all {self.slots} throttle slots are taken")
        return NULL

    def acquire(self, uint64_t key, double rate, int64_t burst, double now) -> float:
        """0.0 when a message may go now (and counts it), else the seconds to wait (GCRA, burst messages)."""
        cdef int64_t interval, now_ns, tat, wait
        cdef char *slot
        if not (MIN_RATE <= rate <= MAX_RATE) or not (1 <= burst <= MAX_BURST):
            raise ValueError(f"rate must be in [{MIN_RATE}, {MAX_RATE}] and burst in [1, {MAX_BURST}]")
        if not (-9e9 < now < 9e9):
            raise ValueError("now must be a monotonic clock reading in seconds")
        interval = <int64_t>(1e9 / rate)
        now_ns = <int64_t>(now * 1e9)
        slot = self._locate(key, True)
        tat = (<int64_t *>(slot + _TAT))[0]
        if tat < now_ns:
            tat = now_ns
        wait = tat - now_ns - (burst - 1) * interval
        if wait > 0:
            throttle_unlock(slot)
            return wait / 1e9
        if self._leased[0] and not _take_token(self._lease(slot), rate, burst, now_ns):
            throttle_unlock(slot)
            return LEASE_WAIT
        (<int64_t *>(slot + _TAT))[0] = tat + interval
        throttle_unlock(slot)
        return 0.0

    def leased(self) -> bool:
        """Whether a message also needs a token leased from the cluster (see grant())."""
        self._check_open()
        return self._leased[0] != 0

    def set_leased(self, bint leased) -> None:
        """The supervisor's switch: on while it leases tokens from the cluster, off to shape alone."""
        self._check_lease_area()
        self._leased[0] = 1 if leased else 0

    def demand(self, double now) -> list:
        """(key, rate, burst, valid tokens left, acquires refused, tokens taken) of every slot that asked for
        or took a token since its last grant: the keys the supervisor leases tokens for, and how many."""
        cdef int64_t now_ns = <int64_t>(now * 1e9)
        cdef uint64_t index, key
        cdef char *slot
        cdef Lease lease
        cdef int64_t tokens
        cdef int status
        found = []
        self._check_lease_area()
        for index in range(self.slots):
            slot = self._slots + index * self._slot_size
            key = throttle_peek_key(slot)
            if key == 0:
                continue
            status = throttle_lock(slot)
            if status:
                raise OSError(status, os.strerror(status))
            lease = self._lease(slot)[0]
            throttle_unlock(slot)
            if lease.refused or lease.taken:
                tokens = lease.tokens if lease.until > now_ns else 0
                found.append((key, lease.rate, lease.burst, tokens, lease.refused, lease.taken))
        return found

    def grant(self, uint64_t key, int64_t tokens, double now, double until) -> None:
        """Adds `tokens` leased from the cluster to the key's slot (with those still valid at `now`); all of
        them expire at `until`. Clears the slot's demand."""
        cdef char *slot
        cdef Lease *lease
        self._check_lease_area()
        slot = self._locate(key, True)
        lease = self._lease(slot)
        if lease.until <= <int64_t>(now * 1e9):
            lease.tokens = 0
        lease.tokens += tokens if tokens > 0 else 0
        lease.until = <int64_t>(until * 1e9)
        lease.refused = 0
        lease.taken = 0
        throttle_unlock(slot)

    cdef int _check_open(self) except -1:
        if not self._viewing:
            raise ValueError("the table is closed")
        return 0

    cdef int _check_lease_area(self) except -1:
        self._check_open()
        if self._leases == NULL:
            raise ValueError("this table has no lease area: create it with leases=True")
        return 0

    cdef inline Lease *_lease(self, char *slot) noexcept nogil:
        """The lease record of a slot (the table has a lease area whenever leased mode can be on)."""
        return <Lease *>(self._leases + (slot - self._slots) // self._slot_size * sizeof(Lease))

    def open_connection(self, uint64_t key, int64_t limit, int64_t worker, double now, double lease) -> bool:
        """Takes one of the key's `limit` connection slots for `worker` (held for `lease` s unless renewed)."""
        cdef char *slot = self._locate(key, True)
        cdef Entry *entries = <Entry *>(slot + _ENTRIES)
        cdef int64_t total = 0
        cdef Py_ssize_t index, mine = -1, free = -1
        for index in range(self.workers):
            if entries[index].count > 0 and entries[index].until <= now:
                entries[index].count = 0
            if entries[index].count > 0:
                total += entries[index].count
                if entries[index].worker == worker:
                    mine = index
            elif free < 0:
                free = index
        if total >= limit:
            throttle_unlock(slot)
            return False
        if mine < 0:
            if free < 0:
                throttle_unlock(slot)
                return False
            mine = free
            entries[mine].worker = worker
            entries[mine].count = 0
        entries[mine].count += 1
        entries[mine].lease = lease
        entries[mine].until = now + lease
        throttle_unlock(slot)
        return True

    def close_connection(self, uint64_t key, int64_t worker) -> bool:
        """Gives back one of `worker`'s connection slots; False when it held none (lease expired)."""
        cdef char *slot = self._locate(key, False)
        cdef Entry *entries
        cdef Py_ssize_t index
        if slot == NULL:
            return False
        entries = <Entry *>(slot + _ENTRIES)
        for index in range(self.workers):
            if entries[index].count > 0 and entries[index].worker == worker:
                entries[index].count -= 1
                throttle_unlock(slot)
                return True
        throttle_unlock(slot)
        return False

    def connections(self, uint64_t key, double now) -> int:
        """Open connections at `key`, all workers, leases still running."""
        cdef char *slot = self._locate(key, False)
        cdef Entry *entries
        cdef Py_ssize_t index
        cdef int64_t total = 0
        if slot == NULL:
            return 0
        entries = <Entry *>(slot + _ENTRIES)
        for index in range(self.workers):
            if entries[index].count > 0 and entries[index].until > now:
                total += entries[index].count
        throttle_unlock(slot)
        return total

    def renew(self, int64_t worker, double now) -> int:
        """Extends `worker`'s running leases by their length; returns how many connections they cover."""
        return self._sweep(worker, now, True)

    def reclaim(self, int64_t worker) -> int:
        """Drops every connection `worker` holds (it died); returns how many there were."""
        return self._sweep(worker, 0.0, False)

    cdef int64_t _sweep(self, int64_t worker, double now, bint renew) except -1:
        cdef int64_t covered = 0
        cdef uint64_t index
        cdef Py_ssize_t i
        cdef char *slot
        cdef Entry *entries
        cdef int status
        if not self._viewing:
            raise ValueError("the table is closed")
        for index in range(self.slots):
            slot = self._slots + index * self._slot_size
            if throttle_peek_key(slot) == 0:
                continue
            status = throttle_lock(slot)
            if status:
                raise OSError(status, os.strerror(status))
            entries = <Entry *>(slot + _ENTRIES)
            for i in range(self.workers):
                if entries[i].count <= 0 or entries[i].worker != worker:
                    continue
                if renew and entries[i].until > now:
                    covered += entries[i].count
                    entries[i].until = now + entries[i].lease
                else:
                    if not renew:
                        covered += entries[i].count
                    entries[i].count = 0
            throttle_unlock(slot)
        return covered
