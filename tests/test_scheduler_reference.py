"""The pure-Python scheduler's contract: priority then FIFO, timers, expiry in every state, removal."""

from __future__ import annotations

import pytest

from engine._scheduler_py import Scheduler, SchedulerFull


def test_priority_zero_behind_five_thousand_pops_first() -> None:
    scheduler = Scheduler()
    for item in range(5000):
        scheduler.schedule(item, 1, 5, 0.0, 1e9)
    scheduler.schedule(99_999, 1, 0, 0.0, 1e9)
    assert scheduler.pop(1) == 99_999
    assert [scheduler.pop(1) for _ in range(3)] == [0, 1, 2]
    assert scheduler.counts(1) == (4997, 0)


def test_queues_are_separate() -> None:
    scheduler = Scheduler()
    scheduler.schedule(1, 1, 5, 0.0, 1e9)
    scheduler.schedule(2, 2, 5, 0.0, 1e9)
    assert scheduler.pop(3) == -1
    assert scheduler.pop(2) == 2
    assert scheduler.pop(2) == -1
    assert scheduler.pop(1) == 1


def test_timers_move_due_items_to_ready() -> None:
    scheduler = Scheduler()
    scheduler.schedule(1, 7, 5, 102.0, 1e9)
    scheduler.schedule(2, 7, 1, 101.0, 1e9)
    assert scheduler.pop(7) == -1
    assert scheduler.counts(7) == (0, 2)
    assert scheduler.next_due() == 101.0
    assert scheduler.advance(100.0) == []
    assert scheduler.advance(101.5) == [7]
    assert scheduler.counts(7) == (1, 1)
    assert scheduler.advance(200.0) == [7]
    assert [scheduler.pop(7), scheduler.pop(7)] == [2, 1]
    assert scheduler.next_due() is None


def test_expiry_in_ready_and_waiting_states() -> None:
    scheduler = Scheduler()
    scheduler.schedule(1, 1, 5, 0.0, 50.0)  # ready
    scheduler.schedule(2, 1, 5, 500.0, 60.0)  # waiting for a retry that comes too late
    scheduler.schedule(3, 1, 5, 0.0, 1e9)
    assert scheduler.expired(10.0) == []
    assert sorted(scheduler.expired(61.0)) == [1, 2]
    assert len(scheduler) == 1
    assert scheduler.pop(1) == 3
    assert scheduler.advance(600.0) == []


def test_remove_and_reschedule_same_item() -> None:
    scheduler = Scheduler()
    scheduler.schedule(1, 1, 5, 0.0, 10.0)
    assert scheduler.remove(1)
    assert not scheduler.remove(1)
    assert scheduler.pop(1) == -1
    scheduler.schedule(1, 1, 5, 0.0, 1e9)
    assert scheduler.expired(20.0) == []  # the old expiry no longer applies
    assert scheduler.pop(1) == 1


def test_capacity_and_bad_input() -> None:
    scheduler = Scheduler(capacity=2)
    scheduler.schedule(1, 1, 5, 0.0, 1e9)
    with pytest.raises(ValueError):
        scheduler.schedule(1, 1, 5, 0.0, 1e9)
    with pytest.raises(ValueError):
        scheduler.schedule(2, 1, 10, 0.0, 1e9)
    scheduler.schedule(2, 1, 9, 0.0, 1e9)
    with pytest.raises(SchedulerFull):
        scheduler.schedule(3, 1, 5, 0.0, 1e9)
