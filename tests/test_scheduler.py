"""engine.scheduler: both implementations, the same cases, and a state machine that they decide alike.

Every test runs against the compiled engine._scheduler and the pure engine._scheduler_py; a missing
compiled module fails the test (the suite builds extensions first).
"""

from __future__ import annotations

import importlib
import math
import random
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

IMPLEMENTATIONS = {"compiled": "engine._scheduler", "python": "engine._scheduler_py"}
FAR = 1e12


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(IMPLEMENTATIONS[request.param])


def drain(scheduler, queue: int) -> list[int]:
    out = []
    for _ in range(len(scheduler) + 1):
        item = scheduler.pop(queue)
        if item < 0:
            return out
        out.append(item)
    raise AssertionError("pop never ran dry")


def test_priority_zero_behind_five_thousand_pops_first(impl: ModuleType) -> None:
    scheduler = impl.Scheduler()
    for item in range(5000):
        scheduler.schedule(item, 3, 5, 0.0, FAR)
    scheduler.schedule(10_000, 3, 0, 0.0, FAR)
    assert scheduler.pop(3) == 10_000
    assert drain(scheduler, 3) == list(range(5000))


def test_fifo_inside_a_priority_is_the_order_of_becoming_ready(impl: ModuleType) -> None:
    scheduler = impl.Scheduler()
    scheduler.schedule(1, 0, 4, 20.0, FAR)
    scheduler.schedule(2, 0, 4, 10.0, FAR)
    scheduler.schedule(3, 0, 4, 0.0, FAR)
    scheduler.schedule(4, 0, 4, 15.0, FAR, now=15.0)
    assert scheduler.counts(0) == (2, 2)
    assert scheduler.next_due() == 10.0
    assert scheduler.advance(30.0) == [0]
    assert drain(scheduler, 0) == [3, 4, 2, 1]
    assert scheduler.next_due() is None


def test_expiry_applies_to_ready_waiting_and_parked_items(impl: ModuleType) -> None:
    scheduler = impl.Scheduler()
    scheduler.schedule(1, 0, 5, 0.0, 50.0, campaign=7)
    scheduler.schedule(2, 0, 5, 0.0, 40.0)
    scheduler.schedule(3, 1, 5, 500.0, 45.0)
    scheduler.schedule(4, 1, 5, 0.0, 1000.0)
    scheduler.hold(1, campaign=7)
    assert scheduler.pop(0) == 2
    assert scheduler.pop(0) == -1
    assert (scheduler.counts(0), scheduler.parked(0)) == ((0, 0), 1)
    scheduler.schedule(2, 0, 5, 0.0, 40.0)
    assert scheduler.next_expiry() == 40.0
    assert scheduler.expired(39.0) == []
    assert scheduler.expired(60.0) == [2, 3, 1]
    assert (len(scheduler), scheduler.parked(0), scheduler.counts(1)) == (1, 0, (1, 0))
    assert scheduler.release(1) == []


def test_held_items_come_back_in_their_original_order_when_no_hold_is_left(impl: ModuleType) -> None:
    scheduler = impl.Scheduler()
    for item in range(10):
        scheduler.schedule(item, 2, 5, 0.0, FAR, campaign=1 + item % 2, tenant=9)
    scheduler.hold(10, campaign=1)
    scheduler.hold(11, tenant=9)
    assert scheduler.pop(2) == -1
    assert scheduler.parked(2) == 10
    assert scheduler.release(10) == []
    assert scheduler.release(11) == [2]
    scheduler.hold(12, queue=2)
    assert scheduler.pop(2) == -1
    assert (scheduler.counts(2), scheduler.parked(2)) == ((0, 0), 10)
    assert scheduler.release(12) == [2]
    assert scheduler.release(12) == []
    assert drain(scheduler, 2) == list(range(10))


def test_a_hold_needs_every_selector_it_names_to_match(impl: ModuleType) -> None:
    scheduler = impl.Scheduler()
    scheduler.schedule(1, 0, 5, 0.0, FAR, campaign=1, tenant=2)
    scheduler.schedule(2, 0, 5, 0.0, FAR, campaign=1, tenant=3)
    scheduler.schedule(3, 1, 5, 0.0, FAR, campaign=1, tenant=2)
    scheduler.hold(7, queue=0, campaign=1, tenant=2)
    assert drain(scheduler, 0) == [2]
    assert drain(scheduler, 1) == [3]
    assert scheduler.release(7) == [0]
    assert drain(scheduler, 0) == [1]


def test_a_hold_on_everything_parks_every_queue(impl: ModuleType) -> None:
    scheduler = impl.Scheduler()
    for item, queue in enumerate([4, 1, 3]):
        scheduler.schedule(item, queue, 5, 0.0, FAR)
    scheduler.hold(1)
    assert [scheduler.pop(queue) for queue in (3, 1, 4)] == [-1, -1, -1]
    assert scheduler.release(1) == [3, 1, 4]


def test_advance_names_each_woken_queue_once(impl: ModuleType) -> None:
    scheduler = impl.Scheduler()
    for item, queue in enumerate([5, 1, 5, 3, 1]):
        scheduler.schedule(item, queue, 5, 1.0 + item, FAR)
    assert scheduler.advance(10.0) == [5, 1, 3]


def test_entries_carry_key_and_creation_time(impl: ModuleType) -> None:
    scheduler = impl.Scheduler()
    key = bytes(range(12))
    scheduler.schedule(1, 3, 2, 0.0, 90.0, 4, 5, key=key, created=1234.5)
    scheduler.schedule(2, 3, 7, 50.0, 80.0, 0, 5, key=b"\xff" * 16, created=1000.0)
    scheduler.schedule(3, 6, 0, 0.0, 95.0, 4, 0, created=2000.0)
    assert scheduler.summary() == [(3, 1, 1, 0, 1000.0), (6, 1, 0, 0, 2000.0)]
    assert scheduler.pop_entry(3) == (1, 3, 2, key, 1234.5, 90.0, 4, 5)
    assert scheduler.pop_entry(3) is None
    assert scheduler.expired_entries(85.0) == [(2, 3, 7, b"\xff" * 16, 1000.0, 80.0, 0, 5)]
    assert scheduler.remove_matching(campaign=4) == [(3, 6, 0, b"", 2000.0, 95.0, 4, 0)]
    assert (len(scheduler), scheduler.summary()) == (0, [])
    with pytest.raises(ValueError):
        scheduler.schedule(4, 0, 5, 0.0, FAR, key=b"k" * 17)


def test_take_removes_only_a_ready_unheld_item_with_the_right_key(impl: ModuleType) -> None:
    scheduler = impl.Scheduler()
    scheduler.schedule(1, 0, 5, 0.0, 90.0, campaign=3, key=b"one", created=7.0)
    scheduler.schedule(2, 0, 5, 50.0, 90.0, key=b"two")
    scheduler.schedule(3, 1, 4, 0.0, 90.0, key=b"three")
    assert scheduler.take(1, b"two") is None
    assert scheduler.take(2, b"two") is None
    assert scheduler.take(9, b"one") is None
    scheduler.hold(1, campaign=3)
    assert scheduler.take(1, b"one") is None
    scheduler.release(1)
    assert scheduler.take(1, b"one") == (1, 0, 5, b"one", 7.0, 90.0, 3, 0)
    assert scheduler.take(1, b"one") is None
    assert (len(scheduler), scheduler.counts(0), scheduler.next_expiry()) == (2, (0, 1), 90.0)
    assert scheduler.pop(1) == 3
    assert scheduler.expired(100.0) == [2]


def test_remove_matching_takes_every_state_and_only_what_matches(impl: ModuleType) -> None:
    scheduler = impl.Scheduler()
    for item in range(12):
        scheduler.schedule(item, item % 3, 5, 0.0 if item % 2 else 50.0, FAR, campaign=1 + item % 4, tenant=1)
    scheduler.hold(1, tenant=1)
    assert scheduler.pop(1) == -1
    assert [entry[0] for entry in scheduler.remove_matching({1, 2}, campaign=2)] == [1, 5]
    assert [entry[0] for entry in scheduler.remove_matching(None, tenant=2)] == []
    assert len(scheduler) == 10
    assert scheduler.parked(1) == 1


def test_capacity_is_back_pressure(impl: ModuleType) -> None:
    scheduler = impl.Scheduler(capacity=3)
    for item in range(3):
        scheduler.schedule(item, 0, 5, 0.0, FAR)
    with pytest.raises(impl.SchedulerFull):
        scheduler.schedule(3, 0, 5, 0.0, FAR)
    assert scheduler.pop(0) == 0
    scheduler.schedule(3, 0, 5, 0.0, FAR)
    assert len(scheduler) == 3


@pytest.mark.parametrize(
    "args",
    [(1, 0, 10, 0.0, FAR), (1, 0, -1, 0.0, FAR), (1, -1, 5, 0.0, FAR), (-1, 0, 5, 0.0, FAR), (1, 0, 5, math.nan, FAR)],
)
def test_bad_input_is_refused(impl: ModuleType, args: tuple) -> None:
    scheduler = impl.Scheduler()
    with pytest.raises(ValueError):
        scheduler.schedule(*args)
    scheduler.schedule(1, 0, 5, 0.0, FAR)
    with pytest.raises(ValueError):
        scheduler.schedule(1, 0, 5, 0.0, FAR)
    scheduler.hold(1)
    for bad in ({"hold_id": 1}, {"hold_id": 2, "queue": -2}, {"hold_id": 2, "campaign": -1}):
        with pytest.raises(ValueError):
            scheduler.hold(**bad)
    assert len(scheduler) == 1


def test_many_items_survive_growth_and_removal(impl: ModuleType) -> None:
    scheduler = impl.Scheduler()
    items = range(0, 60_000, 3)
    for item in items:
        scheduler.schedule(item << 20, item % 7, item % 10, float(item % 100), FAR)
    for item in items[::2]:
        assert scheduler.remove(item << 20)
    assert not scheduler.remove(1)
    assert len(scheduler) == len(items) // 2
    scheduler.advance(100.0)
    popped = [item for queue in range(7) for item in drain(scheduler, queue)]
    assert sorted(popped) == [item << 20 for item in items[1::2]]
    assert len(scheduler) == 0


ITEMS = st.integers(0, 40)
QUEUES = st.integers(0, 3)
TIMES = st.sampled_from([0.0, 1.0, 2.0, 2.5, 5.0, 10.0, 50.0, math.inf])
TAGS = st.integers(0, 2)


class Agreement(RuleBasedStateMachine):
    """Random operation sequences: the compiled scheduler decides exactly as the reference does."""

    def __init__(self) -> None:
        super().__init__()
        self.compiled = importlib.import_module(IMPLEMENTATIONS["compiled"]).Scheduler(capacity=25)
        self.python = importlib.import_module(IMPLEMENTATIONS["python"]).Scheduler(capacity=25)

    def both(self, name: str, *args, **kwargs):
        results = []
        for scheduler in (self.compiled, self.python):
            try:
                results.append(getattr(scheduler, name)(*args, **kwargs))
            except Exception as error:
                results.append(type(error).__name__)
        assert results[0] == results[1], (name, args, kwargs, results)
        return results[0]

    @rule(item=ITEMS, queue=QUEUES, priority=st.integers(0, 9), due=TIMES, expires=TIMES, tags=st.tuples(TAGS, TAGS))
    def schedule(self, item, queue, priority, due, expires, tags) -> None:
        key = item.to_bytes(12, "big")
        self.both("schedule", item, queue, priority, due, expires, *tags, now=1.0, key=key, created=float(item % 5))

    @rule(queue=QUEUES)
    def pop(self, queue) -> None:
        self.both("pop", queue)

    @rule(queue=QUEUES)
    def pop_entry(self, queue) -> None:
        self.both("pop_entry", queue)

    @rule()
    def pop_everywhere(self) -> None:
        for queue in range(4):
            self.both("pop", queue)

    @rule(now=TIMES)
    def advance(self, now) -> None:
        self.both("advance", now)

    @rule(now=TIMES)
    def expired(self, now) -> None:
        self.both("expired_entries", now)

    @rule(item=ITEMS)
    def remove(self, item) -> None:
        self.both("remove", item)

    @rule(item=ITEMS, other=st.booleans())
    def take(self, item, other) -> None:
        self.both("take", item, (item + other).to_bytes(12, "big"))

    @rule(queue=st.integers(-1, 3), campaign=TAGS, tenant=TAGS)
    def remove_matching(self, queue, campaign, tenant) -> None:
        self.both("remove_matching", None if queue < 0 else {queue}, campaign, tenant)

    @rule(hold=st.integers(0, 3), queue=st.integers(-1, 3), campaign=TAGS, tenant=TAGS)
    def hold(self, hold, queue, campaign, tenant) -> None:
        self.both("hold", hold, queue, campaign, tenant)

    @rule(hold=st.integers(0, 3))
    def release(self, hold) -> None:
        self.both("release", hold)

    @invariant()
    def same_state(self) -> None:
        self.both("__len__")
        self.both("next_due")
        self.both("next_expiry")
        self.both("summary")
        for queue in range(4):
            self.both("counts", queue)
            self.both("parked", queue)


Agreement.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_implementations_agree = Agreement.TestCase


def test_implementations_agree_on_a_long_random_run() -> None:
    """Thousands of items, deep heaps and table growth: sizes the state machine never reaches."""
    rng = random.Random(2024)
    compiled = importlib.import_module(IMPLEMENTATIONS["compiled"]).Scheduler(capacity=6000)
    python = importlib.import_module(IMPLEMENTATIONS["python"]).Scheduler(capacity=6000)
    now, peak = 0.0, 0
    for step in range(40_000):
        roll = rng.random()
        if roll < 0.55:
            args = (
                rng.randrange(8000),
                rng.randrange(20),
                rng.randrange(10),
                now + rng.choice([0.0, rng.uniform(0, 50)]),
            )
            call = ("schedule", (*args, now + rng.uniform(1, 4000), rng.randrange(4), rng.randrange(4)), {"now": now})
        elif roll < 0.75:
            call = ("pop", (rng.randrange(20),), {})
        elif roll < 0.85:
            call = ("remove", (rng.randrange(8000),), {})
        elif roll < 0.9:
            now += rng.uniform(0, 5)
            call = (rng.choice(["advance", "expired"]), (now,), {})
        elif roll < 0.95:
            selector = rng.choice(
                [(rng.randrange(20), 0, 0), (-1, rng.randrange(1, 4), 0), (-1, 0, rng.randrange(1, 4))]
            )
            call = ("hold", (rng.randrange(6), *selector), {})
        else:
            call = ("release", (rng.randrange(6),), {})
        name, args, kwargs = call
        outcomes = []
        for scheduler in (compiled, python):
            try:
                outcomes.append(getattr(scheduler, name)(*args, **kwargs))
            except Exception as error:
                outcomes.append(type(error).__name__)
        assert outcomes[0] == outcomes[1], (step, name, args, outcomes)
        peak = max(peak, len(compiled))
    assert peak > 2500
    assert len(compiled) == len(python)
    assert [compiled.counts(q) for q in range(20)] == [python.counts(q) for q in range(20)]
