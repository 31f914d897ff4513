"""What clustering costs, against a real redis-server on loopback: why rates are leased in batches, why
connection limits stay per node, and how fast a suppression reaches another node.

Baseline (same run): a message-rate check in the node's own lane table (compiled). Rows:
- the same check in leased mode (the table also spends a token leased from the cluster);
- a Redis round trip per message (what an unbatched cluster rate would cost) and the lease amortised over
  the batch a node takes at 1,000/s;
- a cluster-wide connection slot (one Redis round trip to take one, one to give it back) against opening
  an SMTP session to a local sink, which every new connection pays anyway;
- two nodes (two tables, two leasers) sending as fast as a 200/s cluster rate lets them: the total rate
  reached and each node's share;
- a suppression added on one node until the other node's LMDB list has it (two in-process cluster agents).
Run: python -m bench.cluster [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import uvloop

from bench.common import Column, Sink, free_port, print_table, write_results
from engine import _throttle, _throttle_py
from engine.admin.store import Rule, SuspensionStore
from engine.cluster import Cluster
from engine.cluster.link import Link
from engine.cluster.rates import TICK, RateLeaser, batch
from engine.suppression import SuppressionList

KEY = _throttle_py.throttle_key("egress-1", "example.com")
CLUSTER_RATE = 200.0


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*command, "--dir", str(directory), "--logfile", str(directory / "redis.log")])
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    return process, f"redis://127.0.0.1:{port}/0"


def local_checks(count: int) -> tuple[float, float]:
    """(alone, leased) seconds per rate check that lets a message go, best of three runs taken in turns."""
    table = _throttle.ThrottleTable.create(None, 64, 4, leases=True)
    best, clock, waits = [float("inf"), float("inf")], 0.0, 0.0
    for _ in range(3):
        for leased in (False, True):
            table.set_leased(leased)
            table.grant(KEY, count, clock, clock + 1e6)
            started = time.perf_counter()
            for i in range(count):
                waits += table.acquire(KEY, 1e9, 1_000_000, clock + i * 1e-6)
            best[leased] = min(best[leased], (time.perf_counter() - started) / count)
            clock += count * 1e-6 + 1.0
    table.close()
    assert waits == 0.0, "every check must let its message go"
    return best[0], best[1]


async def redis_round_trips(url: str, count: int) -> tuple[float, float, float]:
    """(one lease call, one lease amortised over a 1,000/s batch, one connection slot take + give back)."""
    link = Link(url, "bench")
    table = _throttle.ThrottleTable.create(None, 64, 4, leases=True)
    leaser = RateLeaser(link, {"bench": table})
    table.set_leased(True)
    slot = link.commands.register_script(
        "local n = redis.call('INCR', KEYS[1]) if n > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]) "
        "return 0 end redis.call('PEXPIRE', KEYS[1], 30000) return 1"
    )

    async def timed(step, n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await step()
        return (time.perf_counter() - started) / n

    async def lease_one() -> None:
        table.acquire(KEY, 1e6, 1, time.monotonic())  # refused: demand for the lease
        await leaser.lease()

    async def slot_pair() -> None:
        await slot(keys=["engine:bench:slots"], args=[1_000_000])
        await link.commands.decr("engine:bench:slots")

    await lease_one()
    lease = await timed(lease_one, count)
    pair = await timed(slot_pair, count)
    await link.close()
    table.close()
    return lease, lease / batch(1000.0, 100), pair


def smtp_session_open(count: int) -> float:
    """Seconds to connect to a local `engine sink`, read its greeting, EHLO and QUIT."""
    sink = Sink()
    try:
        started = time.perf_counter()
        for _ in range(count):
            with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
                client.ehlo("bench.test")
        return (time.perf_counter() - started) / count
    finally:
        sink.stop()


async def shared_rate(url: str, seconds: float) -> tuple[float, list[int]]:
    """Two nodes, each spending every token it can get: (total messages per second, messages per node)."""
    links = [Link(url, f"node-{n}") for n in range(2)]
    tables = [_throttle.ThrottleTable.create(None, 64, 1, leases=True) for _ in range(2)]
    leasers = [RateLeaser(link, {"bulk": table}) for link, table in zip(links, tables, strict=True)]
    for table in tables:
        table.set_leased(True)
    sent = [0, 0]
    burst = int(CLUSTER_RATE / 10)

    async def node(index: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            while tables[index].acquire(KEY, CLUSTER_RATE, burst, time.monotonic()) == 0.0:
                sent[index] += 1
            await leasers[index].lease()
            await asyncio.sleep(TICK * random.uniform(0.5, 1.5))

    started = time.monotonic()
    await asyncio.gather(node(0, started + seconds), node(1, started + seconds))
    elapsed = time.monotonic() - started
    for link in links:
        await link.close()
    return sum(sent) / elapsed, sent


class _Node:
    """The part of the supervisor a cluster agent calls."""

    def __init__(self, directory: Path) -> None:
        self.suspensions = SuspensionStore(directory / "suspensions.json")
        self.suppression = SuppressionList(directory / "suppression")

    async def adopt_remote_rule(self, rule: Rule) -> None:
        self.suspensions.put(rule)

    async def drop_remote_rule(self, rule_id: str) -> None:
        self.suspensions.remove(rule_id)


async def replication_latency(url: str, directory: Path, count: int) -> list[float]:
    """Seconds from an add on node A's list until node B's list has it, per address."""
    a, b = _Node(directory / "a"), _Node(directory / "b")
    agents = [Cluster(url, name, node, node.suppression, {}) for name, node in (("a", a), ("b", b))]
    for agent in agents:
        agent.start()
    while not all(agent.joined for agent in agents):
        await asyncio.sleep(0.01)
    latencies = []
    for n in range(count):
        address = f"user{n}@example.org"
        started = time.perf_counter()
        await asyncio.to_thread(a.suppression.add, address)
        while not b.suppression.contains(address):
            await asyncio.sleep(0.001)
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(random.uniform(0.0, 0.1))
    for agent in agents:
        await agent.close()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args()
    checks, trips, seconds, adds = (100_000, 300, 3.0, 20) if args.quick else (1_000_000, 3000, 10.0, 100)
    directory = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    server, url = start_redis(directory)
    try:
        alone, leased = local_checks(checks)
        lease, amortised, slot = uvloop.run(redis_round_trips(url, trips))
        session = smtp_session_open(max(50, trips // 20))
        rate, sent = uvloop.run(shared_rate(url, seconds))
        latencies = uvloop.run(replication_latency(url, directory, adds))
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
    rows = [
        {"what": "rate check, own lane table (baseline)", "us": alone * 1e6},
        {"what": "rate check, leased mode (token from the table)", "us": leased * 1e6},
        {"what": "Redis lease round trip, per message if unbatched", "us": lease * 1e6},
        {"what": "Redis lease amortised over a 1,000/s batch (100)", "us": amortised * 1e6},
        {"what": "cluster-wide connection slot: take + give back", "us": slot * 1e6},
        {"what": "SMTP session open: connect, greeting, EHLO, QUIT", "us": session * 1e6},
    ]
    for row in rows:
        row["ratio"] = row["us"] / rows[0]["us"]
    columns = [Column("cost per operation", "what", "<52"), Column("us", "us", ">10.2f")]
    print_table([*columns, Column("x baseline", "ratio", ">12.1f", "x")], rows)
    latencies.sort()
    shared = {
        "configured_per_s": CLUSTER_RATE,
        "reached_per_s": rate,
        "ratio": rate / CLUSTER_RATE,
        "per_node": sent,
        "smaller_share": min(sent) / max(1, sum(sent)),
        "seconds": seconds,
    }
    replication = {
        "adds": len(latencies),
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
        "max_ms": latencies[-1] * 1e3,
    }
    print(
        f"\ntwo nodes sharing {CLUSTER_RATE:.0f}/s for {seconds:.0f}s: {rate:.1f}/s reached "
        f"({shared['ratio']:.3f}x), per node {sent} (smaller share {shared['smaller_share']:.2f})"
    )
    print(
        f"suppression add on A until B has it: p50 {replication['p50_ms']:.1f} ms, "
        f"p99 {replication['p99_ms']:.1f} ms, max {replication['max_ms']:.1f} ms ({len(latencies)} adds)"
    )
    write_results("cluster", {"quick": args.quick, "costs": rows, "shared_rate": shared, "replication": replication})
    return 0


if __name__ == "__main__":
    sys.exit(main())
