# cython: language_level=3
"""The scheduler, compiled: ready queues by priority, retry timers, expiry, suspensions over C structs.

Every held item is one 88-byte record in a growable array, carrying the caller's spool key (up to 16
bytes) and creation time so the caller needs nothing of its own per waiting item; the timer heap, the
expiry heap and each queue's ready heap hold int32 record indexes, and an open-addressing table maps item
ids to records. No Python object exists per item. engine/_scheduler_py.py is the readable twin with the
same API and the same decisions: ready order is (priority, rank) where rank counts when an item became
ready, timers fire in (due, rank) order and expired() returns items in (expires, item) order.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.math cimport INFINITY
from libc.string cimport memcmp, memcpy, memset

__all__ = ["KEY_SIZE", "MAX_QUEUES", "PRIORITIES", "Scheduler", "SchedulerFull"]

PRIORITIES = 10
MAX_QUEUES = 1 << 20
KEY_SIZE = 16


class SchedulerFull(Exception):
    """The scheduler holds `capacity` items; reception answers 452 until deliveries make room."""


cdef enum:
    _WAITING = 0
    _READY = 1
    _PARKED = 2
    _FREE = 3
    _K_TIMER = 0
    _K_READY = 1
    _K_EXPIRY = 2
    _RANK_SHIFT = 56
    _MAX_QUEUES = 1 << 20
    _MIN_RECORDS = 1024
    _KEY_SIZE = 16

cdef struct Rec:
    int64_t item
    double due
    double expires
    double created
    uint64_t rank
    int32_t queue
    int32_t campaign
    int32_t tenant
    int32_t hpos  # index in the timer heap (waiting) or the queue's ready heap (ready)
    int32_t xpos  # index in the expiry heap
    int32_t next  # parked list, or free list
    int32_t prev
    uint8_t state
    uint8_t keylen
    uint8_t key[_KEY_SIZE]

cdef struct Heap:
    int32_t *a
    int32_t size
    int32_t cap

cdef struct Queue:
    Heap ready
    int32_t waiting
    int32_t parked
    uint64_t mark

cdef struct Hold:
    int64_t id
    int32_t queue  # -1: any
    int32_t campaign  # 0: any
    int32_t tenant  # 0: any


cdef inline bint _less(const Rec *r, int kind, int32_t a, int32_t b) noexcept nogil:
    if kind == _K_EXPIRY:
        if r[a].expires != r[b].expires:
            return r[a].expires < r[b].expires
        return r[a].item < r[b].item
    if kind == _K_TIMER and r[a].due != r[b].due:
        return r[a].due < r[b].due
    return r[a].rank < r[b].rank


cdef inline void _place(Rec *r, int kind, Heap *h, int32_t pos, int32_t slot) noexcept nogil:
    h.a[pos] = slot
    if kind == _K_EXPIRY:
        r[slot].xpos = pos
    else:
        r[slot].hpos = pos


cdef void _sift_up(Rec *r, int kind, Heap *h, int32_t pos) noexcept nogil:
    cdef int32_t slot = h.a[pos]
    cdef int32_t parent
    while pos > 0:
        parent = (pos - 1) >> 1
        if not _less(r, kind, slot, h.a[parent]):
            break
        _place(r, kind, h, pos, h.a[parent])
        pos = parent
    _place(r, kind, h, pos, slot)


cdef void _sift_down(Rec *r, int kind, Heap *h, int32_t pos) noexcept nogil:
    cdef int32_t slot = h.a[pos]
    cdef int32_t n = h.size
    cdef int32_t child
    while True:
        child = 2 * pos + 1
        if child >= n:
            break
        if child + 1 < n and _less(r, kind, h.a[child + 1], h.a[child]):
            child += 1
        if not _less(r, kind, h.a[child], slot):
            break
        _place(r, kind, h, pos, h.a[child])
        pos = child
    _place(r, kind, h, pos, slot)


cdef int _heap_push(Rec *r, int kind, Heap *h, int32_t slot) except -1:
    cdef int32_t cap
    cdef int32_t *grown
    if h.size == h.cap:
        cap = h.cap * 2 if h.cap else 8
        grown = <int32_t *>PyMem_Realloc(h.a, cap * sizeof(int32_t))
        if grown == NULL:
            raise MemoryError()
        h.a = grown
        h.cap = cap
    h.a[h.size] = slot
    h.size += 1
    _sift_up(r, kind, h, h.size - 1)
    return 0


cdef void _heap_remove(Rec *r, int kind, Heap *h, int32_t pos) noexcept nogil:
    h.size -= 1
    if pos == h.size:
        return
    _place(r, kind, h, pos, h.a[h.size])
    if pos > 0 and _less(r, kind, h.a[pos], h.a[(pos - 1) >> 1]):
        _sift_up(r, kind, h, pos)
    else:
        _sift_down(r, kind, h, pos)


cdef inline uint64_t _hash(int64_t item, int bits) noexcept nogil:
    return (<uint64_t>item * <uint64_t>0x9E3779B97F4A7C15ULL) >> (64 - bits)


cdef class Scheduler:
    """Ready queues, retry timers and expiry for one worker's items, at most `capacity` of them."""

    cdef Rec *recs
    cdef int32_t nrecs  # records ever handed out (high-water mark)
    cdef int32_t rcap
    cdef int32_t free_head
    cdef int32_t count
    cdef int32_t _capacity
    cdef int64_t *hkeys
    cdef int32_t *hvals
    cdef int hbits
    cdef Heap timers
    cdef Heap expiry
    cdef Queue *queues
    cdef int32_t nqueues
    cdef int32_t parked_head
    cdef int32_t parked_tail
    cdef uint64_t counter
    cdef uint64_t epoch
    cdef Hold *holds
    cdef int32_t nholds

    def __cinit__(self, int capacity=1_000_000):
        if capacity < 1:
            raise ValueError("capacity must be in [1, 2**31)")
        self._capacity = capacity
        self.free_head = -1
        self.parked_head = -1
        self.parked_tail = -1
        self.hbits = 11
        self.hkeys = <int64_t *>PyMem_Malloc((1 << self.hbits) * sizeof(int64_t))
        self.hvals = <int32_t *>PyMem_Malloc((1 << self.hbits) * sizeof(int32_t))
        if self.hkeys == NULL or self.hvals == NULL:
            raise MemoryError()
        memset(self.hvals, 0xFF, (1 << self.hbits) * sizeof(int32_t))

    def __dealloc__(self):
        cdef int32_t q
        for q in range(self.nqueues):
            PyMem_Free(self.queues[q].ready.a)
        PyMem_Free(self.queues)
        PyMem_Free(self.recs)
        PyMem_Free(self.hkeys)
        PyMem_Free(self.hvals)
        PyMem_Free(self.timers.a)
        PyMem_Free(self.expiry.a)
        PyMem_Free(self.holds)

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self):
        return self.count

    def __contains__(self, item):
        return isinstance(item, int) and 0 <= item < (1 << 63) and self._find(item) >= 0

    # item -> record table (linear probing, backward-shift deletion)

    cdef int32_t _find(self, int64_t item) noexcept:
        cdef uint64_t mask = (1ULL << self.hbits) - 1
        cdef uint64_t i = _hash(item, self.hbits)
        while self.hvals[i] >= 0:
            if self.hkeys[i] == item:
                return self.hvals[i]
            i = (i + 1) & mask
        return -1

    cdef void _hinsert(self, int64_t item, int32_t slot) noexcept:
        cdef uint64_t mask = (1ULL << self.hbits) - 1
        cdef uint64_t i = _hash(item, self.hbits)
        while self.hvals[i] >= 0:
            i = (i + 1) & mask
        self.hkeys[i] = item
        self.hvals[i] = slot

    cdef void _hdelete(self, int64_t item) noexcept:
        cdef uint64_t mask = (1ULL << self.hbits) - 1
        cdef uint64_t i = _hash(item, self.hbits)
        cdef uint64_t j, home
        while self.hkeys[i] != item or self.hvals[i] < 0:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if self.hvals[j] < 0:
                break
            home = _hash(self.hkeys[j], self.hbits)
            if ((j - home) & mask) >= ((j - i) & mask):
                self.hkeys[i] = self.hkeys[j]
                self.hvals[i] = self.hvals[j]
                i = j
        self.hvals[i] = -1

    cdef int _hgrow(self) except -1:
        cdef int64_t *old_keys = self.hkeys
        cdef int32_t *old_vals = self.hvals
        cdef Py_ssize_t old_size = 1 << self.hbits
        cdef Py_ssize_t i, size = old_size * 2
        cdef int64_t *keys = <int64_t *>PyMem_Malloc(size * sizeof(int64_t))
        cdef int32_t *vals = <int32_t *>PyMem_Malloc(size * sizeof(int32_t))
        if keys == NULL or vals == NULL:
            PyMem_Free(keys)
            PyMem_Free(vals)
            raise MemoryError()
        memset(vals, 0xFF, size * sizeof(int32_t))
        self.hkeys = keys
        self.hvals = vals
        self.hbits += 1
        for i in range(old_size):
            if old_vals[i] >= 0:
                self._hinsert(old_keys[i], old_vals[i])
        PyMem_Free(old_keys)
        PyMem_Free(old_vals)
        return 0

    # records and queues

    cdef int32_t _new_record(self) except -1:
        cdef int32_t slot, cap
        cdef Rec *grown
        if self.free_head >= 0:
            slot = self.free_head
            self.free_head = self.recs[slot].next
            return slot
        if self.nrecs == self.rcap:
            cap = self.rcap * 2 if self.rcap else _MIN_RECORDS
            if cap > self._capacity:
                cap = max(self._capacity, self.nrecs + 1)
            grown = <Rec *>PyMem_Realloc(self.recs, cap * sizeof(Rec))
            if grown == NULL:
                raise MemoryError()
            self.recs = grown
            self.rcap = cap
        slot = self.nrecs
        self.nrecs += 1
        return slot

    cdef Queue *_queue(self, int32_t queue) except NULL:
        cdef int32_t n
        cdef Queue *grown
        if queue >= self.nqueues:
            n = max(queue + 1, self.nqueues * 2)
            n = min(n, _MAX_QUEUES)
            grown = <Queue *>PyMem_Realloc(self.queues, n * sizeof(Queue))
            if grown == NULL:
                raise MemoryError()
            memset(&grown[self.nqueues], 0, (n - self.nqueues) * sizeof(Queue))
            self.queues = grown
            self.nqueues = n
        return &self.queues[queue]

    cdef void _release(self, int32_t slot) noexcept:
        self._hdelete(self.recs[slot].item)
        self.recs[slot].state = _FREE
        self.recs[slot].next = self.free_head
        self.free_head = slot
        self.count -= 1

    cdef void _unlink_parked(self, int32_t slot) noexcept:
        cdef Rec *r = &self.recs[slot]
        if r.prev >= 0:
            self.recs[r.prev].next = r.next
        else:
            self.parked_head = r.next
        if r.next >= 0:
            self.recs[r.next].prev = r.prev
        else:
            self.parked_tail = r.prev

    cdef void _discard(self, int32_t slot) noexcept:
        """Takes a record out of its state's structure and frees it (the expiry heap is the caller's)."""
        cdef Rec *r = &self.recs[slot]
        cdef Queue *q = &self.queues[r.queue]
        if r.state == _WAITING:
            _heap_remove(self.recs, _K_TIMER, &self.timers, r.hpos)
            q.waiting -= 1
        elif r.state == _READY:
            _heap_remove(self.recs, _K_READY, &q.ready, r.hpos)
        else:
            self._unlink_parked(slot)
            q.parked -= 1
        self._release(slot)

    cdef object _entry(self, int32_t slot):
        cdef Rec *r = &self.recs[slot]
        return (
            r.item,
            r.queue,
            <int>(r.rank >> _RANK_SHIFT),
            r.key[:r.keylen],
            r.created,
            r.expires,
            r.campaign,
            r.tenant,
        )

    cdef bint _held(self, const Rec *r) noexcept:
        cdef int32_t h
        cdef const Hold *hold
        for h in range(self.nholds):
            hold = &self.holds[h]
            if (
                (hold.queue < 0 or hold.queue == r.queue)
                and (hold.campaign == 0 or hold.campaign == r.campaign)
                and (hold.tenant == 0 or hold.tenant == r.tenant)
            ):
                return True
        return False

    cdef int32_t _pop_slot(self, int32_t queue) noexcept:
        """Takes the most urgent unheld ready record of `queue` out of every heap (parking held ones on the
        way); the caller reads it, then releases it. -1 when there is none."""
        cdef Queue *q
        cdef Rec *r
        cdef int32_t slot
        if queue < 0 or queue >= self.nqueues:
            return -1
        q = &self.queues[queue]
        while q.ready.size:
            slot = q.ready.a[0]
            r = &self.recs[slot]
            _heap_remove(self.recs, _K_READY, &q.ready, 0)
            if self.nholds and self._held(r):
                r.state = _PARKED
                q.parked += 1
                r.next = -1
                r.prev = self.parked_tail
                if self.parked_tail >= 0:
                    self.recs[self.parked_tail].next = slot
                else:
                    self.parked_head = slot
                self.parked_tail = slot
                continue
            _heap_remove(self.recs, _K_EXPIRY, &self.expiry, r.xpos)
            return slot
        return -1

    # public API

    def schedule(
        self,
        int64_t item,
        int32_t queue,
        int priority,
        double due,
        double expires,
        int32_t campaign=0,
        int32_t tenant=0,
        double now=0.0,
        const uint8_t[::1] key=None,
        double created=0.0,
    ) -> None:
        """Holds an item, ready at once when due <= now (pass due=0 for "now"); SchedulerFull when full.
        `key` (at most KEY_SIZE bytes) and `created` ride along and come back in the item's entry."""
        cdef int32_t slot
        cdef Rec *r
        cdef Queue *q
        cdef Py_ssize_t keylen = 0 if key is None else key.shape[0]
        if priority < 0 or priority >= 10:
            raise ValueError("priority must be in [0, 10)")
        if queue < 0 or queue >= _MAX_QUEUES:
            raise ValueError("queue must be in [0, 2**20)")
        if item < 0:
            raise ValueError("item must be >= 0")
        if due != due or expires != expires:
            raise ValueError("due and expires must not be NaN")
        if keylen > _KEY_SIZE:
            raise ValueError("key must be at most 16 bytes")
        if self._find(item) >= 0:
            raise ValueError(f"item {item} is already scheduled")
        if self.count >= self._capacity:
            raise SchedulerFull(f"scheduler full ({self._capacity} items)")
        q = self._queue(queue)
        if 2 * (self.count + 1) > (1 << self.hbits):
            self._hgrow()
        slot = self._new_record()
        r = &self.recs[slot]
        self.counter += 1
        r.item = item
        r.queue = queue
        r.due = due
        r.expires = expires
        r.created = created
        r.campaign = campaign
        r.tenant = tenant
        r.keylen = <uint8_t>keylen
        if keylen:
            memcpy(r.key, &key[0], keylen)
        r.rank = (<uint64_t>priority << _RANK_SHIFT) | self.counter
        self._hinsert(item, slot)
        self.count += 1
        if due <= now:
            r.state = _READY
            _heap_push(self.recs, _K_READY, &q.ready, slot)
        else:
            r.state = _WAITING
            q.waiting += 1
            _heap_push(self.recs, _K_TIMER, &self.timers, slot)
        _heap_push(self.recs, _K_EXPIRY, &self.expiry, slot)

    def advance(self, double now) -> list:
        """Moves items due by `now` to their ready queues; returns the queues that got some."""
        cdef list woken = []
        cdef int32_t slot
        cdef Rec *r
        cdef Queue *q
        self.epoch += 1
        while self.timers.size and self.recs[self.timers.a[0]].due <= now:
            slot = self.timers.a[0]
            _heap_remove(self.recs, _K_TIMER, &self.timers, 0)
            r = &self.recs[slot]
            self.counter += 1
            r.rank = (r.rank & (0xFFULL << _RANK_SHIFT)) | self.counter
            r.state = _READY
            q = &self.queues[r.queue]
            q.waiting -= 1
            _heap_push(self.recs, _K_READY, &q.ready, slot)
            if q.mark != self.epoch:
                q.mark = self.epoch
                woken.append(r.queue)
        return woken

    def pop(self, int32_t queue) -> int:
        """The most urgent unheld item of `queue`, removed from the scheduler; -1 when there is none."""
        cdef int32_t slot = self._pop_slot(queue)
        cdef int64_t item
        if slot < 0:
            return -1
        item = self.recs[slot].item
        self._release(slot)
        return item

    def pop_entry(self, int32_t queue):
        """Like pop(), but the whole entry: (item, queue, priority, key, created, expires, campaign, tenant),
        or None."""
        cdef int32_t slot = self._pop_slot(queue)
        if slot < 0:
            return None
        entry = self._entry(slot)
        self._release(slot)
        return entry

    def take(self, int64_t item, bytes key) -> object:
        """Removes `item` and returns its entry when it is ready, no hold matches it and it carries `key`
        (a caller that derives ids from keys checks it got its own); None, changing nothing, otherwise."""
        cdef int32_t slot = self._find(item)
        cdef Rec *r
        if slot < 0:
            return None
        r = &self.recs[slot]
        if (
            r.state != _READY
            or (self.nholds and self._held(r))
            or r.keylen != len(key)
            or memcmp(r.key, <const char *>key, r.keylen) != 0
        ):
            return None
        entry = self._entry(slot)
        _heap_remove(self.recs, _K_READY, &self.queues[r.queue].ready, r.hpos)
        _heap_remove(self.recs, _K_EXPIRY, &self.expiry, r.xpos)
        self._release(slot)
        return entry

    def expired(self, double now) -> list:
        """Removes and returns every item whose expiry is <= now, whatever its state."""
        return self._expire(now, False)

    def expired_entries(self, double now) -> list:
        """Like expired(), but entries as pop_entry() gives them."""
        return self._expire(now, True)

    cdef list _expire(self, double now, bint entries):
        cdef list out = []
        cdef int32_t slot
        while self.expiry.size and self.recs[self.expiry.a[0]].expires <= now:
            slot = self.expiry.a[0]
            _heap_remove(self.recs, _K_EXPIRY, &self.expiry, 0)
            out.append(self._entry(slot) if entries else self.recs[slot].item)
            self._discard(slot)
        return out

    def remove(self, int64_t item) -> bool:
        """Drops an item in any state (admin bounce); False when it was not held."""
        cdef int32_t slot = self._find(item)
        if slot < 0:
            return False
        _heap_remove(self.recs, _K_EXPIRY, &self.expiry, self.recs[slot].xpos)
        self._discard(slot)
        return True

    def remove_matching(self, queues=None, int32_t campaign=0, int32_t tenant=0) -> list:
        """Drops every held item (any state) on one of `queues` (None: any), of `campaign` and of `tenant`
        (0: any); returns their entries in item order."""
        cdef list out = []
        cdef int32_t slot
        cdef Rec *r
        for slot in range(self.nrecs):
            r = &self.recs[slot]
            if (
                r.state == _FREE
                or (campaign and r.campaign != campaign)
                or (tenant and r.tenant != tenant)
                or (queues is not None and r.queue not in queues)
            ):
                continue
            out.append(self._entry(slot))
            _heap_remove(self.recs, _K_EXPIRY, &self.expiry, r.xpos)
            self._discard(slot)
        out.sort()
        return out

    def next_due(self):
        """Due time of the earliest waiting item, None when nothing waits."""
        return self.recs[self.timers.a[0]].due if self.timers.size else None

    def next_expiry(self):
        """Earliest expiry of any held item, None when empty."""
        return self.recs[self.expiry.a[0]].expires if self.expiry.size else None

    def counts(self, int32_t queue) -> tuple:
        """(ready, waiting) of a queue; parked items are in neither (see parked())."""
        if queue < 0 or queue >= self.nqueues:
            return (0, 0)
        return (self.queues[queue].ready.size, self.queues[queue].waiting)

    def parked(self, int32_t queue) -> int:
        """Items of `queue` parked by a hold."""
        if queue < 0 or queue >= self.nqueues:
            return 0
        return self.queues[queue].parked

    def summary(self) -> list:
        """(queue, ready, waiting, parked, oldest created) of every queue holding items, in queue order:
        one pass over the records, for operator views."""
        cdef double *oldest
        cdef int32_t slot, queue
        cdef Queue *q
        cdef list out = []
        if not self.nqueues:
            return out
        oldest = <double *>PyMem_Malloc(self.nqueues * sizeof(double))
        if oldest == NULL:
            raise MemoryError()
        try:
            for queue in range(self.nqueues):
                oldest[queue] = INFINITY
            for slot in range(self.nrecs):
                if self.recs[slot].state != _FREE and self.recs[slot].created < oldest[self.recs[slot].queue]:
                    oldest[self.recs[slot].queue] = self.recs[slot].created
            for queue in range(self.nqueues):
                q = &self.queues[queue]
                if q.ready.size or q.waiting or q.parked:
                    out.append((queue, q.ready.size, q.waiting, q.parked, oldest[queue]))
        finally:
            PyMem_Free(oldest)
        return out

    def hold(self, int64_t hold_id, int32_t queue=-1, int32_t campaign=0, int32_t tenant=0) -> None:
        """Parks, when pop() meets them, the items on `queue` (-1: any) of `campaign` and of `tenant` (0: any);
        they stay held (and still expire) until release(hold_id)."""
        cdef Hold *grown
        cdef int32_t h
        if queue < -1 or queue >= _MAX_QUEUES:
            raise ValueError("queue must be in [-1, 2**20)")
        if campaign < 0 or tenant < 0:
            raise ValueError("campaign and tenant must be >= 0")
        for h in range(self.nholds):
            if self.holds[h].id == hold_id:
                raise ValueError(f"hold {hold_id} exists")
        grown = <Hold *>PyMem_Realloc(self.holds, (self.nholds + 1) * sizeof(Hold))
        if grown == NULL:
            raise MemoryError()
        self.holds = grown
        self.holds[self.nholds] = Hold(hold_id, queue, campaign, tenant)
        self.nholds += 1

    def release(self, int64_t hold_id) -> list:
        """Ends a hold and unparks what no other hold keeps, in its original order; returns the queues that
        got items back, in the order their first item was parked."""
        cdef int32_t h
        for h in range(self.nholds):
            if self.holds[h].id == hold_id:
                self.holds[h] = self.holds[self.nholds - 1]
                self.nholds -= 1
                return self._unpark()
        return []

    cdef list _unpark(self):
        cdef list woken = []
        cdef int32_t slot = self.parked_head
        cdef int32_t following
        cdef Rec *r
        cdef Queue *q
        self.epoch += 1
        while slot >= 0:
            r = &self.recs[slot]
            following = r.next
            if not self._held(r):
                self._unlink_parked(slot)
                r.state = _READY
                q = &self.queues[r.queue]
                q.parked -= 1
                _heap_push(self.recs, _K_READY, &q.ready, slot)
                if q.mark != self.epoch:
                    q.mark = self.epoch
                    woken.append(r.queue)
            slot = following
        return woken
