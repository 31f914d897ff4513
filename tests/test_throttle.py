"""engine.throttle: both implementations, one table layout, and limits that hold across processes.

Every test runs against the compiled engine._throttle and the pure engine._throttle_py; a missing
compiled module fails the test (the suite builds extensions first). Tables are real shared mappings and
the concurrency tests use real processes.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import time
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine import _throttle_py

IMPLEMENTATIONS = {"compiled": "engine._throttle", "python": "engine._throttle_py"}
KEY = _throttle_py.throttle_key("egress-1", "example.com")
FORK = multiprocessing.get_context("fork")


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(IMPLEMENTATIONS[request.param])


def module(name: str) -> ModuleType:
    return importlib.import_module(IMPLEMENTATIONS[name])


def test_keys_are_stable_nonzero_and_ignore_domain_case(impl: ModuleType) -> None:
    assert impl.throttle_key("egress-1", "Example.COM") == KEY
    assert impl.throttle_key("egress-2", "example.com") != KEY
    assert 0 < KEY < 1 << 64


def test_gcra_lets_a_burst_through_then_one_per_interval(impl: ModuleType) -> None:
    table = impl.ThrottleTable.create(None, slots=8, workers=2)
    assert [table.acquire(KEY, 10.0, 3, 100.0) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.1)]
    assert table.acquire(KEY, 10.0, 3, 100.05) == pytest.approx(0.05)
    assert table.acquire(KEY, 10.0, 3, 100.1) == 0.0
    assert table.acquire(KEY, 10.0, 3, 100.1) == pytest.approx(0.1)
    assert [table.acquire(KEY, 10.0, 3, 200.0) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.1)]
    other = impl.throttle_key("egress-1", "example.net")
    assert table.acquire(other, 10.0, 1, 200.0) == 0.0
    with pytest.raises(ValueError):
        table.acquire(KEY, 0.0, 3, 100.0)
    with pytest.raises(ValueError):
        table.acquire(KEY, 10.0, 0, 100.0)
    table.close()


def test_connections_are_counted_per_worker_and_leases_expire(impl: ModuleType) -> None:
    table = impl.ThrottleTable.create(None, slots=8, workers=2)
    assert [table.open_connection(KEY, 3, worker, 0.0, 10.0) for worker in (7, 7, 8, 8)] == [True, True, True, False]
    assert table.open_connection(KEY, 4, 9, 0.0, 10.0) is False  # two entries per slot: a third worker has none
    assert table.connections(KEY, 1.0) == 3
    assert table.close_connection(KEY, 7)
    assert table.connections(KEY, 1.0) == 2
    assert table.renew(7, 8.0) == 1
    assert table.connections(KEY, 12.0) == 1  # worker 8's lease ran out at 10, worker 7's runs to 18
    assert table.renew(8, 12.0) == 0
    assert not table.close_connection(KEY, 8)
    assert table.open_connection(KEY, 3, 8, 12.0, 10.0)
    assert table.reclaim(7) == 1
    assert table.reclaim(7) == 0
    assert table.connections(KEY, 12.0) == 1
    assert not table.close_connection(impl.throttle_key("egress-1", "example.net"), 8)
    table.close()


def test_a_full_table_says_so(impl: ModuleType) -> None:
    table = impl.ThrottleTable.create(None, slots=2, workers=1)
    assert table.slots == 2
    table.acquire(1, 1.0, 1, 0.0)
    table.acquire(2, 1.0, 1, 0.0)
    with pytest.raises(impl.TableFull):
        table.acquire(3, 1.0, 1, 0.0)
    assert table.connections(3, 0.0) == 0
    table.close()


def test_attach_sees_what_the_creator_wrote_and_refuses_other_files(impl: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "throttle.table"
    creator = module("compiled").ThrottleTable.create(path, slots=100, workers=4)
    assert creator.slots == 128
    assert creator.open_connection(KEY, 2, 1, 0.0, 30.0)
    attached = impl.ThrottleTable.attach(path)
    assert (attached.slots, attached.workers, attached.path) == (128, 4, str(path))
    assert attached.connections(KEY, 1.0) == 1
    assert attached.open_connection(KEY, 2, 2, 0.0, 30.0)
    assert not creator.open_connection(KEY, 2, 1, 0.0, 30.0)
    assert [p.name for p in tmp_path.iterdir()] == ["throttle.table"]
    attached.close()
    creator.close()
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError):
        impl.ThrottleTable.attach(bogus)


def _open_in_child(table, results) -> None:
    results.put(table.open_connection(KEY, 1, 5, 0.0, 30.0))


def test_an_anonymous_table_is_shared_with_forked_children(impl: ModuleType) -> None:
    table = impl.ThrottleTable.create(None, slots=8, workers=2)
    assert table.path is None
    results = FORK.Queue()
    child = FORK.Process(target=_open_in_child, args=(table, results))
    child.start()
    child.join(10)
    assert results.get(timeout=5) is True
    assert table.connections(KEY, 1.0) == 1
    assert not table.open_connection(KEY, 1, 6, 1.0, 30.0)
    assert table.reclaim(5) == 1
    assert table.open_connection(KEY, 1, 6, 1.0, 30.0)


def _lock_and_die(path: str) -> None:
    table = _throttle_py.ThrottleTable.attach(path)
    table._locate(KEY, True)  # the slot's mutex is now held by this process
    os.kill(os.getpid(), signal.SIGKILL)


def _acquire_once(path: str, name: str, results) -> None:
    table = module(name).ThrottleTable.attach(path)
    results.put(table.acquire(KEY, 1.0, 1, 50.0))


def test_a_worker_killed_inside_a_slot_does_not_lock_the_lane_out(impl: ModuleType, tmp_path: Path) -> None:
    path = str(tmp_path / "throttle.table")
    impl.ThrottleTable.create(path, slots=8, workers=2).close()
    killed = FORK.Process(target=_lock_and_die, args=(path,))
    killed.start()
    killed.join(10)
    assert killed.exitcode == -signal.SIGKILL
    results = FORK.Queue()
    name = "compiled" if impl.__name__.endswith("._throttle") else "python"
    survivor = FORK.Process(target=_acquire_once, args=(path, name, results))
    survivor.start()
    survivor.join(10)
    if survivor.is_alive():
        survivor.kill()
        pytest.fail("the slot of a dead locker stayed locked")
    assert results.get(timeout=5) == 0.0


LIMIT = 3
RATE = 100.0
BURST = 5
SECONDS = 1.0


def _hammer(path: str, name: str, worker: int, inside, peak, start: float, results) -> None:
    """Opens connections (tracking how many are open by an independent counter) and takes rate tokens."""
    table = module(name).ThrottleTable.attach(path)
    rate_key = KEY ^ 1
    opened, admitted = 0, []
    while (now := time.monotonic()) < start + SECONDS:
        if table.acquire(rate_key, RATE, BURST, now) == 0.0:
            admitted.append(now)
        if table.open_connection(KEY, LIMIT, worker, now, 30.0):
            opened += 1
            with inside.get_lock():
                inside.value += 1
                peak.value = max(peak.value, inside.value)
            time.sleep(0.0002)
            with inside.get_lock():
                inside.value -= 1
            assert table.close_connection(KEY, worker)
    results.put((opened, admitted))


@pytest.mark.parametrize("mix", [("compiled",) * 4, ("compiled", "python") * 2])
def test_processes_never_exceed_the_limits(tmp_path: Path, mix: tuple[str, ...]) -> None:
    path = str(tmp_path / "throttle.table")
    table = module("compiled").ThrottleTable.create(path, slots=64, workers=8)
    inside, peak, results = FORK.Value("i", 0), FORK.Value("i", 0), FORK.Queue()
    start = time.monotonic() + 0.3
    workers = [
        FORK.Process(target=_hammer, args=(path, name, worker, inside, peak, start, results))
        for worker, name in enumerate(mix)
    ]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=30) for _ in workers]
    for process in workers:
        process.join(10)
        assert process.exitcode == 0
    assert 1 <= peak.value <= LIMIT
    assert all(opened > 0 for opened, _ in outcomes)
    assert table.connections(KEY, time.monotonic()) == 0
    admitted = sorted(t for _, times in outcomes for t in times)
    expected = RATE * (admitted[-1] - admitted[0]) + BURST
    assert abs(len(admitted) - expected) <= 1, (len(admitted), expected)
    table.close()


KEYS = st.sampled_from([1, 2, 3, 1 << 63, KEY])
WORKERS = st.integers(0, 3)
CLOCK = st.floats(0.0, 100.0, allow_nan=False)


class Agreement(RuleBasedStateMachine):
    """Random operations give the same answers on a compiled table, a pure one, and one both drive."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = [_throttle_py.open_table(None, 4, 3) for _ in range(3)]
        self.tables = [module("compiled").ThrottleTable(self.maps[0]), module("python").ThrottleTable(self.maps[1])]
        self.mixed = [module(name).ThrottleTable(self.maps[2]) for name in ("compiled", "python")]
        self.turn = 0

    def all(self, name: str, *args):
        self.turn += 1
        results = []
        for table in [*self.tables, self.mixed[self.turn % 2]]:
            try:
                results.append(getattr(table, name)(*args))
            except Exception as error:
                results.append(type(error).__name__)
        assert results[0] == results[1] == results[2], (name, args, results)

    @rule(key=KEYS, rate=st.floats(0.001, 1e6), burst=st.integers(1, 20), now=CLOCK)
    def acquire(self, key, rate, burst, now) -> None:
        self.all("acquire", key, rate, burst, now)

    @rule(key=KEYS, limit=st.integers(0, 4), worker=WORKERS, now=CLOCK, lease=st.floats(0.0, 50.0))
    def open_connection(self, key, limit, worker, now, lease) -> None:
        self.all("open_connection", key, limit, worker, now, lease)

    @rule(key=KEYS, worker=WORKERS)
    def close_connection(self, key, worker) -> None:
        self.all("close_connection", key, worker)

    @rule(worker=WORKERS, now=CLOCK)
    def renew(self, worker, now) -> None:
        self.all("renew", worker, now)

    @rule(worker=WORKERS)
    def reclaim(self, worker) -> None:
        self.all("reclaim", worker)

    @invariant()
    def same_bytes(self) -> None:
        """The tables hold the same bytes outside the mutexes: one layout, one arithmetic."""
        images = [bytearray(table_map[:]) for table_map in self.maps]
        size = _throttle_py.slot_size(3)
        for image in images:
            for slot in range(4):
                start = _throttle_py.HEADER_SIZE + slot * size
                image[start : start + _throttle_py.MUTEX_SIZE] = bytes(_throttle_py.MUTEX_SIZE)
        assert images[0] == images[1] == images[2]


Agreement.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_implementations_agree = Agreement.TestCase
