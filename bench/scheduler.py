"""Operations per second of the scheduler and the throttle table, compiled against the pure-Python twins.

The twins are the baseline measured in the same run. Also measures scheduler RAM per waiting item at
1,000,000 items (RSS growth of a fresh process), and checks the issue 9 targets: >= 2,000,000 push+pop/s
and >= 5x the twin, >= 5,000,000 throttle checks/s, <= 150 bytes per waiting item.
Run: python -m bench.scheduler [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from engine import _scheduler, _scheduler_py, _throttle, _throttle_py

RESULTS = Path(__file__).parent / "results" / "scheduler.json"
FAR = 1e12
MEMORY_ITEMS = 1_000_000
TARGETS = {"push_pop_per_s": 2_000_000, "push_pop_ratio": 5.0, "throttle_per_s": 5_000_000, "bytes_per_item": 150}


def _push_pop_steady(sched: ModuleType, n: int) -> Callable[[], int]:
    """One queue kept 1,000 deep: each step schedules one ready item and pops the most urgent."""
    scheduler = sched.Scheduler(capacity=2 * n + 2000)
    for item in range(1000):
        scheduler.schedule(item, 0, item % 10, 0.0, FAR)
    priorities = [i % 10 for i in range(n)]

    def run() -> int:
        schedule, pop = scheduler.schedule, scheduler.pop
        start = 1_000_000_000 + run.calls * n
        run.calls += 1
        for item, priority in enumerate(priorities, start):
            schedule(item, 0, priority, 0.0, FAR)
            pop(0)
        return n

    run.calls = 0
    return run


def _push_then_drain(sched: ModuleType, n: int) -> Callable[[], int]:
    """n ready items over 100 queues and ten priorities, then every queue popped empty."""
    priorities = [i % 10 for i in range(n)]

    def run() -> int:
        scheduler = sched.Scheduler(capacity=n)
        schedule, pop = scheduler.schedule, scheduler.pop
        for item, priority in enumerate(priorities):
            schedule(item, item % 100, priority, 0.0, FAR)
        for queue in range(100):
            while pop(queue) >= 0:
                pass
        return n

    return run


def _timer_expire(sched: ModuleType, n: int) -> Callable[[], int]:
    """n waiting items with random due and expiry times, then expired() returns them all."""
    rng = random.Random(9)
    times = [(rng.uniform(1.0, 1e5), rng.uniform(1e5, 2e5)) for _ in range(n)]

    def run() -> int:
        scheduler = sched.Scheduler(capacity=n)
        schedule = scheduler.schedule
        for item, (due, expires) in enumerate(times):
            schedule(item, item & 63, item % 10, due, expires)
        assert len(scheduler.expired(3e5)) == n
        return n

    return run


def _timer_fire(sched: ModuleType, n: int) -> Callable[[], int]:
    """n retries at random times: scheduled waiting, moved to ready by advance(), popped."""
    rng = random.Random(10)
    dues = [rng.uniform(1.0, 1e5) for _ in range(n)]

    def run() -> int:
        scheduler = sched.Scheduler(capacity=n)
        schedule, pop = scheduler.schedule, scheduler.pop
        for item, due in enumerate(dues):
            schedule(item, item & 63, item % 10, due, FAR)
        for now in range(0, 100_001, 1000):
            for queue in scheduler.advance(float(now)):
                while pop(queue) >= 0:
                    pass
        assert len(scheduler) == 0
        return n

    return run


def _throttle_acquire(throttle: ModuleType, n: int) -> Callable[[], int]:
    """acquire() on 64 keys with a clock advancing 1 µs a call: every check reads and writes its slot."""
    table = throttle.ThrottleTable.create(None, slots=4096, workers=16)
    keys = [throttle.throttle_key("egress", f"d{i}.example") for i in range(64)]
    calls = [(keys[i & 63], i * 1e-6) for i in range(n)]

    def run() -> int:
        acquire = table.acquire
        for key, now in calls:
            acquire(key, 1e6, 10, now)
        return n

    return run


def _throttle_connection(throttle: ModuleType, n: int) -> Callable[[], int]:
    """open_connection() + close_connection() pairs on 64 keys, 16 worker entries per slot."""
    table = throttle.ThrottleTable.create(None, slots=4096, workers=16)
    keys = [throttle.throttle_key("egress", f"d{i}.example") for i in range(64)]

    def run() -> int:
        opening, closing = table.open_connection, table.close_connection
        for i in range(n):
            key = keys[i & 63]
            opening(key, 10, 3, 0.0, 30.0)
            closing(key, 3)
        return n

    return run


CASES = [
    ("push+pop, one queue 1,000 deep", "sched", _push_pop_steady, 200_000),
    ("push 100k ready, drain 100 queues", "sched", _push_then_drain, 100_000),
    ("timer insert + expire (random times)", "sched", _timer_expire, 100_000),
    ("timer insert + advance + pop", "sched", _timer_fire, 100_000),
    ("throttle acquire (GCRA)", "throttle", _throttle_acquire, 500_000),
    ("throttle open + close connection", "throttle", _throttle_connection, 200_000),
]
MODULES = {"sched": (_scheduler, _scheduler_py), "throttle": (_throttle, _throttle_py)}


def _rate(run: Callable[[], int], repeats: int) -> float:
    """Best of `repeats` runs, in operations per second."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        done = run()
        best = max(best, done / (time.perf_counter() - start))
    return best


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure_memory(module: str, items: int) -> None:
    """In a fresh process: RSS growth while `items` waiting items are scheduled, each with a 12-byte spool key
    and its creation time as the dispatcher schedules them, printed as bytes."""
    sched = __import__(module, fromlist=["Scheduler"])
    scheduler = sched.Scheduler(capacity=items)
    before = _rss()
    schedule = scheduler.schedule
    for item in range(items):
        schedule(item, item % 1000, item % 10, 1e6 + item, 2e6 + item, key=item.to_bytes(12, "big"), created=1.0)
    print(_rss() - before)


def _bytes_per_item(module: str, items: int) -> float:
    output = subprocess.run(
        [sys.executable, "-m", "bench.scheduler", "--memory", module, str(items)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    ).stdout
    return int(output) / items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--memory", nargs=2, metavar=("MODULE", "ITEMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        _measure_memory(args.memory[0], int(args.memory[1]))
        return
    repeats = 2 if args.quick else 5
    rows = []
    for name, kind, case, n in CASES:
        n = n // 5 if args.quick else n
        compiled, python = MODULES[kind]
        row = {"case": name, "compiled_per_s": _rate(case(compiled, n), repeats)}
        row["python_per_s"] = _rate(case(python, n // 4), max(1, repeats - 2))
        row["ratio"] = row["compiled_per_s"] / row["python_per_s"]
        rows.append(row)
    python_items = MEMORY_ITEMS // 10 if args.quick else MEMORY_ITEMS
    memory = {
        "items": MEMORY_ITEMS,
        "compiled_bytes_per_item": _bytes_per_item("engine._scheduler", MEMORY_ITEMS),
        "python_items": python_items,
        "python_bytes_per_item": _bytes_per_item("engine._scheduler_py", python_items),
    }
    push_pop, acquire = rows[0], rows[4]
    verdicts = {
        "push_pop_per_s": push_pop["compiled_per_s"] >= TARGETS["push_pop_per_s"],
        "push_pop_ratio": push_pop["ratio"] >= TARGETS["push_pop_ratio"],
        "throttle_per_s": acquire["compiled_per_s"] >= TARGETS["throttle_per_s"],
        "bytes_per_item": memory["compiled_bytes_per_item"] <= TARGETS["bytes_per_item"],
    }
    print(f"{'case (ops/s)':40} {'compiled':>12} {'pure (baseline)':>16} {'compiled / pure':>16}")
    for row in rows:
        print(f"{row['case']:40} {row['compiled_per_s']:>12,.0f} {row['python_per_s']:>16,.0f} {row['ratio']:>15.1f}x")
    print(
        f"{'RAM per waiting item at 1,000,000 (B)':40} {memory['compiled_bytes_per_item']:>12.1f}"
        f" {memory['python_bytes_per_item']:>16.1f}"
    )
    for target, met in verdicts.items():
        print(f"target {target} {TARGETS[target]:,}: {'met' if met else 'MISSED'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"quick": args.quick, "rows": rows, "memory": memory, "targets": TARGETS, "met": verdicts}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
