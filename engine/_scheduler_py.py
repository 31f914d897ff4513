"""Pure-Python twin of engine._scheduler: ready queues by priority, retry timers, expiry, holds.

Same API and the same decisions as the compiled module, written for clarity (heapq with lazy deletion)
and used when no compiler was at hand or ENGINE_PURE_PYTHON=1.

An item is an int id carrying the caller's spool key (at most KEY_SIZE bytes) and creation time; it sits
on one queue (an int per (egress, domain)). Order inside a queue: priority 0 before 9, then the order in
which items became ready. Waiting items become ready in (due, rank) order; expired() returns items in
(expires, item) order, in any state. Items a hold matches (by queue, campaign, tenant) are parked when
pop() meets them and go back to their queue, in their original order, when the hold is released.
An entry is (item, queue, priority, key, created, expires, campaign, tenant).
"""

from __future__ import annotations

import heapq
import math

__all__ = ["KEY_SIZE", "MAX_QUEUES", "PRIORITIES", "Scheduler", "SchedulerFull"]

PRIORITIES = 10
MAX_QUEUES = 1 << 20
KEY_SIZE = 16

_WAITING, _READY, _PARKED = 0, 1, 2
_RANK_SHIFT = 56
_COMPACT_SLACK = 4096


class SchedulerFull(Exception):
    """The scheduler holds `capacity` items; reception answers 452 until deliveries make room."""


class _Record:
    __slots__ = (
        "campaign",
        "created",
        "due",
        "expires",
        "item",
        "key",
        "priority",
        "queue",
        "rank",
        "state",
        "tenant",
        "token",
    )

    def __init__(
        self,
        item: int,
        queue: int,
        priority: int,
        due: float,
        expires: float,
        campaign: int,
        tenant: int,
        key: bytes,
        created: float,
    ):
        self.item = item
        self.key = key
        self.created = created
        self.queue = queue
        self.priority = priority
        self.due = due
        self.expires = expires
        self.campaign = campaign
        self.tenant = tenant
        self.rank = 0
        self.state = _WAITING
        self.token = 0

    def entry(self) -> tuple:
        return (
            self.item,
            self.queue,
            self.priority,
            self.key,
            self.created,
            self.expires,
            self.campaign,
            self.tenant,
        )


class _Queue:
    __slots__ = ("heap", "parked", "ready", "waiting")

    def __init__(self) -> None:
        self.heap: list[tuple[int, int]] = []
        self.ready = 0
        self.waiting = 0
        self.parked = 0


class Scheduler:
    """Ready queues, retry timers and expiry for one worker's items, at most `capacity` of them."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        if capacity < 1 or capacity >= 1 << 31:
            raise ValueError("capacity must be in [1, 2**31)")
        self._capacity = capacity
        self._records: dict[int, _Record] = {}
        self._queues: dict[int, _Queue] = {}
        self._timers: list[tuple[float, int, int]] = []
        self._expiry: list[tuple[float, int, int]] = []
        self._parked: dict[int, _Record] = {}
        self._holds: dict[int, tuple[int, int, int]] = {}
        self._counter = 0
        self._garbage = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, item: object) -> bool:
        return item in self._records

    def schedule(
        self,
        item: int,
        queue: int,
        priority: int,
        due: float,
        expires: float,
        campaign: int = 0,
        tenant: int = 0,
        now: float = 0.0,
        key: bytes | None = None,
        created: float = 0.0,
    ) -> None:
        """Holds an item, ready at once when due <= now (pass due=0 for "now"); SchedulerFull when full.
        `key` (at most KEY_SIZE bytes) and `created` ride along and come back in the item's entry."""
        key = b"" if key is None else bytes(key)
        if not 0 <= priority < PRIORITIES:
            raise ValueError("priority must be in [0, 10)")
        if not 0 <= queue < MAX_QUEUES:
            raise ValueError("queue must be in [0, 2**20)")
        if item < 0:
            raise ValueError("item must be >= 0")
        if due != due or expires != expires:
            raise ValueError("due and expires must not be NaN")
        if len(key) > KEY_SIZE:
            raise ValueError("key must be at most 16 bytes")
        if item in self._records:
            raise ValueError(f"item {item} is already scheduled")
        if len(self._records) >= self._capacity:
            raise SchedulerFull(f"scheduler full ({self._capacity} items)")
        record = _Record(item, queue, priority, due, expires, campaign, tenant, key, created)
        self._counter += 1
        record.token = self._counter
        record.rank = (priority << _RANK_SHIFT) | self._counter
        self._records[item] = record
        state = self._queues.get(queue)
        if state is None:
            state = self._queues[queue] = _Queue()
        if due <= now:
            record.state = _READY
            state.ready += 1
            heapq.heappush(state.heap, (record.rank, item))
        else:
            state.waiting += 1
            heapq.heappush(self._timers, (due, record.rank, item))
        heapq.heappush(self._expiry, (expires, item, record.token))

    def advance(self, now: float) -> list[int]:
        """Moves items due by `now` to their ready queues; returns the queues that got some."""
        woken: list[int] = []
        seen: set[int] = set()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, rank, item = heapq.heappop(timers)
            record = self._records.get(item)
            if record is None or record.state != _WAITING or record.rank != rank:
                self._garbage -= 1
                continue
            self._counter += 1
            record.rank = (record.priority << _RANK_SHIFT) | self._counter
            record.state = _READY
            state = self._queues[record.queue]
            state.waiting -= 1
            state.ready += 1
            heapq.heappush(state.heap, (record.rank, item))
            if record.queue not in seen:
                seen.add(record.queue)
                woken.append(record.queue)
        return woken

    def pop(self, queue: int) -> int:
        """The most urgent unheld item of `queue`, removed from the scheduler; -1 when there is none."""
        record = self._pop_record(queue)
        return -1 if record is None else record.item

    def pop_entry(self, queue: int) -> tuple | None:
        """Like pop(), but the whole entry, or None."""
        record = self._pop_record(queue)
        return None if record is None else record.entry()

    def _pop_record(self, queue: int) -> _Record | None:
        state = self._queues.get(queue)
        if state is None:
            return None
        heap = state.heap
        while heap:
            rank, item = heapq.heappop(heap)
            record = self._records.get(item)
            if record is None or record.state != _READY or record.rank != rank:
                self._garbage -= 1
                continue
            state.ready -= 1
            if self._holds and self._held(record):
                record.state = _PARKED
                state.parked += 1
                self._parked[item] = record
                continue
            del self._records[item]
            self._garbage += 1
            self._maybe_compact()
            return record
        return None

    def take(self, item: int, key: bytes) -> tuple | None:
        """Removes `item` and returns its entry when it is ready, no hold matches it and it carries `key`
        (a caller that derives ids from keys checks it got its own); None, changing nothing, otherwise."""
        record = self._records.get(item)
        if record is None or record.state != _READY or (self._holds and self._held(record)) or record.key != key:
            return None
        self._discard(record, expiry_entry=True)
        self._maybe_compact()
        return record.entry()

    def expired(self, now: float) -> list[int]:
        """Removes and returns every item whose expiry is <= now, whatever its state."""
        return [entry[0] for entry in self.expired_entries(now)]

    def expired_entries(self, now: float) -> list[tuple]:
        """Like expired(), but entries as pop_entry() gives them."""
        out: list[tuple] = []
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, item, token = heapq.heappop(expiry)
            record = self._records.get(item)
            if record is None or record.token != token:
                self._garbage -= 1
                continue
            self._discard(record, expiry_entry=False)
            out.append(record.entry())
        self._maybe_compact()
        return out

    def remove(self, item: int) -> bool:
        """Drops an item in any state (admin bounce); False when it was not held."""
        record = self._records.get(item)
        if record is None:
            return False
        self._discard(record, expiry_entry=True)
        self._maybe_compact()
        return True

    def remove_matching(self, queues=None, campaign: int = 0, tenant: int = 0) -> list[tuple]:
        """Drops every held item (any state) on one of `queues` (None: any), of `campaign` and of `tenant`
        (0: any); returns their entries in item order."""
        chosen = [
            record
            for record in self._records.values()
            if (not campaign or record.campaign == campaign)
            and (not tenant or record.tenant == tenant)
            and (queues is None or record.queue in queues)
        ]
        for record in chosen:
            self._discard(record, expiry_entry=True)
        self._maybe_compact()
        return sorted(record.entry() for record in chosen)

    def next_due(self) -> float | None:
        """Due time of the earliest waiting item, None when nothing waits."""
        timers = self._timers
        while timers:
            _, rank, item = timers[0]
            record = self._records.get(item)
            if record is not None and record.state == _WAITING and record.rank == rank:
                return timers[0][0]
            heapq.heappop(timers)
            self._garbage -= 1
        return None

    def next_expiry(self) -> float | None:
        """Earliest expiry of any held item, None when empty."""
        expiry = self._expiry
        while expiry:
            _, item, token = expiry[0]
            record = self._records.get(item)
            if record is not None and record.token == token:
                return expiry[0][0]
            heapq.heappop(expiry)
            self._garbage -= 1
        return None

    def counts(self, queue: int) -> tuple[int, int]:
        """(ready, waiting) of a queue; parked items are in neither (see parked())."""
        state = self._queues.get(queue)
        return (0, 0) if state is None else (state.ready, state.waiting)

    def parked(self, queue: int) -> int:
        """Items of `queue` parked by a hold."""
        state = self._queues.get(queue)
        return 0 if state is None else state.parked

    def summary(self) -> list[tuple[int, int, int, int, float]]:
        """(queue, ready, waiting, parked, oldest created) of every queue holding items, in queue order."""
        oldest: dict[int, float] = {}
        for record in self._records.values():
            oldest[record.queue] = min(oldest.get(record.queue, math.inf), record.created)
        return [
            (queue, state.ready, state.waiting, state.parked, oldest[queue])
            for queue, state in sorted(self._queues.items())
            if state.ready or state.waiting or state.parked
        ]

    def hold(self, hold_id: int, queue: int = -1, campaign: int = 0, tenant: int = 0) -> None:
        """Parks, when pop() meets them, the items on `queue` (-1: any) of `campaign` and of `tenant` (0: any);
        they stay held (and still expire) until release(hold_id)."""
        if not -1 <= queue < MAX_QUEUES:
            raise ValueError("queue must be in [-1, 2**20)")
        if campaign < 0 or tenant < 0:
            raise ValueError("campaign and tenant must be >= 0")
        if hold_id in self._holds:
            raise ValueError(f"hold {hold_id} exists")
        self._holds[hold_id] = (queue, campaign, tenant)

    def release(self, hold_id: int) -> list[int]:
        """Ends a hold and unparks what no other hold keeps, in its original order; returns the queues that
        got items back, in the order their first item was parked."""
        if self._holds.pop(hold_id, None) is None:
            return []
        return self._unpark()

    def _held(self, record: _Record) -> bool:
        return any(
            (queue < 0 or queue == record.queue)
            and (not campaign or campaign == record.campaign)
            and (not tenant or tenant == record.tenant)
            for queue, campaign, tenant in self._holds.values()
        )

    def _unpark(self) -> list[int]:
        woken: list[int] = []
        seen: set[int] = set()
        for item, record in list(self._parked.items()):
            if self._held(record):
                continue
            del self._parked[item]
            record.state = _READY
            state = self._queues[record.queue]
            state.parked -= 1
            state.ready += 1
            heapq.heappush(state.heap, (record.rank, item))
            if record.queue not in seen:
                seen.add(record.queue)
                woken.append(record.queue)
        return woken

    def _discard(self, record: _Record, *, expiry_entry: bool) -> None:
        del self._records[record.item]
        state = self._queues[record.queue]
        if record.state == _WAITING:
            state.waiting -= 1
            self._garbage += 1
        elif record.state == _READY:
            state.ready -= 1
            self._garbage += 1
        else:
            state.parked -= 1
            del self._parked[record.item]
        if expiry_entry:
            self._garbage += 1

    def _maybe_compact(self) -> None:
        """Rebuilds the heaps once stale entries outnumber live items, so garbage stays bounded."""
        if self._garbage <= len(self._records) + _COMPACT_SLACK:
            return
        records = self._records.values()
        self._timers = [(r.due, r.rank, r.item) for r in records if r.state == _WAITING]
        self._expiry = [(r.expires, r.item, r.token) for r in records]
        heapq.heapify(self._timers)
        heapq.heapify(self._expiry)
        for state in self._queues.values():
            state.heap.clear()
        for r in records:
            if r.state == _READY:
                self._queues[r.queue].heap.append((r.rank, r.item))
        for state in self._queues.values():
            heapq.heapify(state.heap)
        self._garbage = 0
