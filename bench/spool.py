"""Durable spool writes: group commit against one transaction and fsync per message, in the same run.

    python -m bench.spool [--quick] [--dir DIR]

For 1, 10, 100 and 1000 concurrent writers (asyncio tasks on uvloop, each storing 2 KB messages back to
back for a fixed time) it reports durable messages/s, wall µs per message, CPU µs per message, p99 store
latency and the mean batch per commit. The baseline is the same writers on the same LMDB settings
(sync, metasync, no writemap) with one write transaction and fsync per message on one thread, which is
what the spool would cost without grouping. A last table runs 1 and 100 writers next to a task that keeps
the event loop thread busy (as serving sessions does), with the default 5 ms switch interval and with the
spool's: the committer thread must win the GIL back after every fsync.
Medians over repeats; writes bench/results/spool.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb
import uvloop

from bench.common import Column, print_table, write_results
from engine.envelope import new_message_id
from engine.spool import SWITCH_INTERVAL, Spool

CONCURRENCY = (1, 10, 100, 1000)
BODY = os.urandom(2048)
ENVELOPE = os.urandom(150)
DEFAULT_SWITCH_INTERVAL = sys.getswitchinterval()

Store = Callable[[bytes, bytes, bytes], Awaitable[None]]


class PerMessageCommit:
    """The baseline: every store is its own write transaction and fsync, on one thread."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), map_size=1 << 30, sync=True, metasync=True, writemap=False, max_dbs=2)
        self.envelopes = self.env.open_db(b"envelope")
        self.bodies = self.env.open_db(b"body")
        self.thread = ThreadPoolExecutor(max_workers=1)

    def _put(self, key: bytes, envelope: bytes, body: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key, envelope, db=self.envelopes)
            txn.put(key, body, db=self.bodies)

    async def store(self, key: bytes, envelope: bytes, body: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(self.thread, self._put, key, envelope, body)

    async def close(self) -> None:
        self.thread.shutdown()
        self.env.close()


BUSY_SLICE = 0.001


def burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def drive(store: Store, writers: int, duration: float, busy: bool) -> dict:
    """`writers` tasks store back to back until `duration` is over; returns throughput and latency.

    With `busy`, another task keeps the event loop thread running Python (1 ms slices), as serving
    sessions does, so the committer thread has to win the GIL from it after every fsync."""
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    async def writer() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await store(new_message_id(), ENVELOPE, BODY)
            latencies.append(time.perf_counter() - start)

    async def hog() -> None:
        while time.perf_counter() < deadline:
            burn(BUSY_SLICE)
            await asyncio.sleep(0)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)), *([hog()] if busy else []))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    latencies.sort()
    count = len(latencies)
    return {
        "messages": count,
        "per_s": count / wall,
        "wall_us": wall / count * 1e6,
        "cpu_us": cpu / count * 1e6,
        "p99_ms": latencies[min(count - 1, int(count * 0.99))] * 1e3,
    }


async def measure(kind: str, directory: Path, writers: int, duration: float, busy: bool = False) -> dict:
    if kind == "baseline":
        baseline = PerMessageCommit(directory)
        result = await drive(baseline.store, writers, duration, busy)
        await baseline.close()
        result["batch"] = 1.0
        return result
    spool = Spool(directory, map_size=1 << 30)
    if kind == "group, default switch interval":
        sys.setswitchinterval(DEFAULT_SWITCH_INTERVAL)
    result = await drive(spool.store, writers, duration, busy)
    stats = spool.stats()
    await spool.close()
    sys.setswitchinterval(SWITCH_INTERVAL)
    result["batch"] = stats["ops_committed"] / max(1, stats["commits"])
    return result


def median_run(kind: str, root: Path, writers: int, duration: float, repeats: int, busy: bool = False) -> dict:
    runs = []
    for n in range(repeats):
        directory = root / f"{kind}-{writers}-{busy}-{n}".replace(" ", "_").replace(",", "")
        runs.append(uvloop.run(measure(kind, directory, writers, duration, busy)))
    return {field: statistics.median(run[field] for run in runs) for field in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the LMDB files (default: a temp dir)")
    args = parser.parse_args()
    duration, repeats = (0.3, 1) if args.quick else (1.5, 3)

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        root = Path(directory)
        rows = []
        for writers in CONCURRENCY:
            group = median_run("group", root, writers, duration, repeats)
            baseline = median_run("baseline", root, writers, duration, repeats)
            rows.append(
                {"writers": writers, "group": group, "baseline": baseline, "ratio": group["per_s"] / baseline["per_s"]}
            )
        busy = [
            {"writers": writers, "kind": kind, **median_run(kind, root, writers, duration, repeats, busy=True)}
            for writers in (1, 100)
            for kind in ("group", "group, default switch interval")
        ]
    report(rows, busy)
    write_results("spool", {"quick": args.quick, "body_bytes": len(BODY), "rows": rows, "busy_loop": busy})


def report(rows: list[dict], busy: list[dict]) -> None:
    print(f"durable stores, {len(BODY)} B bodies: group commit vs one transaction+fsync per message")
    flat = [
        {"writers": row["writers"], "ratio": row["ratio"]}
        | {f"group_{k}": v for k, v in row["group"].items()}
        | {f"base_{k}": v for k, v in row["baseline"].items()}
        for row in rows
    ]
    print_table(
        [
            Column("writers", "writers", ">8"),
            Column("group msg/s", "group_per_s", ">13,.0f"),
            Column("us/msg", "group_wall_us", ">9.1f"),
            Column("cpu us", "group_cpu_us", ">8.1f"),
            Column("p99 ms", "group_p99_ms", ">8.2f"),
            Column("batch", "group_batch", ">8.1f"),
            Column("base msg/s", "base_per_s", ">12,.0f"),
            Column("us/msg", "base_wall_us", ">9.1f"),
            Column("p99 ms", "base_p99_ms", ">8.2f"),
            Column("ratio", "ratio", ">7.1f", "x"),
        ],
        flat,
    )
    print(f"\nnext to a task that keeps the event loop busy in {BUSY_SLICE * 1e3:g} ms slices")
    labelled = [
        row
        | {"label": row["kind"] if "default" in row["kind"] else f"group, switch interval {SWITCH_INTERVAL * 1e3:g} ms"}
        for row in busy
    ]
    print_table(
        [
            Column("writers", "writers", ">8"),
            Column("", "label", "<34"),
            Column("msg/s", "per_s", ">9,.0f"),
            Column("p99 ms", "p99_ms", ">8.2f"),
            Column("batch", "batch", ">8.1f"),
        ],
        labelled,
    )


if __name__ == "__main__":
    main()
