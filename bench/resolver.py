"""Cost of a next-hop lookup: engine.resolver against bare dnspython MX queries (the baseline).

The DNS server (tests/dnsserver.py, loaded from a zone file) runs in a subprocess, so CPU time read with
getrusage here is the resolver's alone. Run: python -m bench.resolver [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable

import dns.asyncresolver
import dns.nameserver

from bench.common import Column, print_table, run_on_fresh_loop, write_results
from engine.resolver import Resolver


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
                timing = run_on_fresh_loop(make)
                rows.append(
                    {
                        "case": name,
                        "calls": calls,
                        "cpu_us": timing.cpu / calls * 1e6,
                        "wall_us": timing.wall / calls * 1e6,
                    }
                )
        finally:
            server.terminate()
            server.wait(10)
    baseline = rows[0]["cpu_us"]
    print(f"{count} domains (MX + A each), DNS server in a subprocess on loopback, uvloop")
    for row in rows:
        row["ratio_vs_dnspython"] = row["cpu_us"] / baseline
    print_table(
        [
            Column("case", "case", "<36"),
            Column("calls", "calls", ">8"),
            Column("CPU µs/call", "cpu_us", ">13.1f"),
            Column("wall µs/call", "wall_us", ">14.1f"),
            Column("CPU vs baseline", "ratio_vs_dnspython", ">17.3f"),
        ],
        rows,
    )
    write_results("resolver", {"domains": count, "rows": rows})


if __name__ == "__main__":
    main()
