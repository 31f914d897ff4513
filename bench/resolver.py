"""Cost of a next-hop lookup: engine.resolver against bare dnspython MX queries (the baseline).

The DNS server (tests/dnsserver.py, loaded from a zone file) runs in a subprocess, so CPU time read with
getrusage here is the resolver's alone. Run: python -m bench.resolver [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import dns.asyncresolver
import dns.nameserver
import uvloop

from engine.resolver import Resolver

RESULTS = Path(__file__).parent / "results" / "resolver.json"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _zone(count: int) -> str:
    lines = []
    for i in range(count):
        lines.append(f"d{i}.test 3600 MX 10 mx{i}.test")
        lines.append(f"mx{i}.test 3600 A 127.0.{i // 250}.{i % 250 + 1}")
    return "\n".join(lines) + "\n"


async def _baseline(port: int, count: int) -> None:
    dns_resolver = dns.asyncresolver.Resolver(configure=False)
    dns_resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
    for i in range(count):
        await dns_resolver.resolve(f"d{i}.test.", "MX", search=False)


async def _misses(resolver: Resolver, count: int) -> None:
    for i in range(count):
        await resolver.next_hops(f"d{i}.test")


async def _hits(resolver: Resolver, count: int) -> None:
    await resolver.next_hops("d0.test")
    for _ in range(count):
        await resolver.next_hops("d0.test")


async def _concurrent(resolver: Resolver, count: int, distinct: int) -> None:
    await asyncio.gather(*(resolver.next_hops(f"d{i % distinct}.test") for i in range(count)))


def _measure(run: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run on a fresh uvloop loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        cpu, wall = _cpu(), time.perf_counter()
        runner.run(run())
        return _cpu() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args()
    count = 300 if args.quick else 3000
    hits = 20_000 if args.quick else 200_000
    with tempfile.NamedTemporaryFile("w", suffix=".zone") as zone:
        zone.write(_zone(count))
        zone.flush()
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.dnsserver", "--zone", zone.name], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline().split()[3].rsplit(":", 1)[1])
            cases: list[tuple[str, int, Callable[[], Awaitable[object]]]] = [
                ("dnspython MX query (baseline)", count, lambda: _baseline(port, count)),
                ("next_hops, cache miss", count, lambda: _misses(Resolver([("127.0.0.1", port)]), count)),
                ("next_hops, cache hit", hits, lambda: _hits(Resolver([("127.0.0.1", port)]), hits)),
                (
                    f"next_hops, {count} concurrent, 10 domains",
                    count,
                    lambda: _concurrent(Resolver([("127.0.0.1", port)]), count, 10),
                ),
            ]
            rows = []
            for name, calls, make in cases:
                cpu, wall = _measure(make)
                rows.append({"case": name, "calls": calls, "cpu_us": cpu / calls * 1e6, "wall_us": wall / calls * 1e6})
        finally:
            server.terminate()
            server.wait(10)
    baseline = rows[0]["cpu_us"]
    print(f"{count} domains (MX + A each), DNS server in a subprocess on loopback, uvloop")
    print(f"{'case':<36}{'calls':>8}{'CPU µs/call':>13}{'wall µs/call':>14}{'CPU vs baseline':>17}")
    for row in rows:
        row["ratio_vs_dnspython"] = row["cpu_us"] / baseline
        print(
            f"{row['case']:<36}{row['calls']:>8}{row['cpu_us']:>13.1f}{row['wall_us']:>14.1f}"
            f"{row['ratio_vs_dnspython']:>17.3f}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"domains": count, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
