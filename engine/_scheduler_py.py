"""Pure-Python scheduler: the reference for the compiled one and the fallback where it is not built.

Items are ints owned by the caller (a lane worker maps them to spool keys). Each sits either in a
ready queue (FIFO per priority, 0 most urgent) or in the timer heap until it is due; expiry is checked
in both states. Removal is lazy: a removed item stays in its deque or heap until it reaches the front.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque

PRIORITIES = 10
_WAITING, _READY = 0, 1


class SchedulerFull(Exception):
    """The scheduler holds `capacity` items; reception answers 452 until deliveries make room."""


class _Queue:
    __slots__ = ("ready", "ready_count", "waiting_count")

    def __init__(self) -> None:
        self.ready: list[deque[tuple[int, int]]] = [deque() for _ in range(PRIORITIES)]
        self.ready_count = 0
        self.waiting_count = 0


class Scheduler:
    """Ready queues, retry timers and expiry for one worker's items."""

    def __init__(self, capacity: int = 2_000_000) -> None:
        self.capacity = capacity
        self._items: dict[int, list] = {}  # item -> [queue, priority, state, sequence]
        self._queues: dict[int, _Queue] = {}
        self._timers: list[tuple[float, int, int]] = []
        self._expiries: list[tuple[float, int, int]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def schedule(
        self, item: int, queue: int, priority: int, due: float, expires: float, campaign: int = 0, tenant: int = 0
    ) -> None:
        """Adds an item, ready at once when `due` is not in the future (the caller passes 0 for "now")."""
        if item in self._items:
            raise ValueError(f"item {item} is already scheduled")
        if len(self._items) >= self.capacity:
            raise SchedulerFull(f"scheduler full ({self.capacity} items)")
        if not 0 <= priority < PRIORITIES:
            raise ValueError(f"priority {priority} outside 0..{PRIORITIES - 1}")
        state = self._queues.get(queue)
        if state is None:
            state = self._queues[queue] = _Queue()
        sequence = next(self._sequence)
        if due <= 0:
            self._items[item] = [queue, priority, _READY, sequence]
            state.ready[priority].append((item, sequence))
            state.ready_count += 1
        else:
            self._items[item] = [queue, priority, _WAITING, sequence]
            heapq.heappush(self._timers, (due, sequence, item))
            state.waiting_count += 1
        heapq.heappush(self._expiries, (expires, sequence, item))

    def advance(self, now: float) -> list[int]:
        """Moves items whose time has come into their ready queues; returns the queues that got some."""
        timers = self._timers
        woken: set[int] = set()
        while timers and timers[0][0] <= now:
            _, sequence, item = heapq.heappop(timers)
            entry = self._items.get(item)
            if entry is None or entry[3] != sequence:
                continue
            queue, priority = entry[0], entry[1]
            entry[2] = _READY
            state = self._queues[queue]
            state.waiting_count -= 1
            state.ready_count += 1
            state.ready[priority].append((item, sequence))
            woken.add(queue)
        return list(woken)

    def next_due(self) -> float | None:
        """When the earliest waiting item becomes ready (None when nothing waits)."""
        timers = self._timers
        while timers and (self._items.get(timers[0][2]) or (0, 0, 0, -1))[3] != timers[0][1]:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def pop(self, queue: int) -> int:
        """The most urgent ready item of the queue (FIFO within a priority), removed; -1 when none."""
        state = self._queues.get(queue)
        if state is None or not state.ready_count:
            return -1
        items = self._items
        for ready in state.ready:
            while ready:
                item, sequence = ready.popleft()
                entry = items.get(item)
                if entry is not None and entry[3] == sequence:
                    del items[item]
                    state.ready_count -= 1
                    return item
        return -1

    def expired(self, now: float) -> list[int]:
        """Items whose expiry passed, in any state; they are removed."""
        expiries = self._expiries
        found = []
        while expiries and expiries[0][0] <= now:
            _, sequence, item = heapq.heappop(expiries)
            entry = self._items.get(item)
            if entry is not None and entry[3] == sequence:
                self.remove(item)
                found.append(item)
        return found

    def remove(self, item: int) -> bool:
        entry = self._items.pop(item, None)
        if entry is None:
            return False
        state = self._queues[entry[0]]
        if entry[2] == _READY:
            state.ready_count -= 1
        else:
            state.waiting_count -= 1
        return True

    def counts(self, queue: int) -> tuple[int, int]:
        """(ready, waiting) items of the queue."""
        state = self._queues.get(queue)
        return (state.ready_count, state.waiting_count) if state is not None else (0, 0)
