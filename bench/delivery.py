"""Client CPU per message of engine.delivery.Deliverer against plain aiosmtplib on one connection (baseline).

`engine sink` runs in a subprocess, so the CPU time read with getrusage here is the delivering side alone:
the price of pooling, per-recipient replies and address checks on top of aiosmtplib, and what reusing
sessions saves over a connection per message. Run: python -m bench.delivery [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosmtplib

from bench.common import Column, Sink, print_table, run_on_fresh_loop, write_results
from engine.config import Egress, load_config
from engine.delivery import Deliverer
from engine.resolver import Resolver

SENDER = "bench@src.test"
RECIPIENTS = ["user@dest.test"]
MESSAGE = b"From: bench@src.test\r\nTo: user@dest.test\r\nSubject: bench\r\n\r\n" + b"x" * 76 + b"\r\n"
MESSAGE = MESSAGE * (2048 // len(MESSAGE))


async def _baseline(port: int, count: int) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, local_hostname="bench.test")
    await smtp.connect()
    for _ in range(count):
        await smtp.sendmail(SENDER, RECIPIENTS, MESSAGE)
    await smtp.quit()


async def _deliverer(port: int, count: int, concurrency: int, shaping: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "engine.toml"
        path.write_text(f'[routes]\n"dest.test" = "127.0.0.1:{port}"\n[shaping.default]\n{shaping}\n')
        config = load_config(path)
    deliverer = Deliverer(config, Resolver([("127.0.0.1", 1)]), Egress("default", None, "bench.test", 1))

    async def sender(n: int) -> None:
        for _ in range(n):
            attempt = await deliverer.deliver("dest.test", SENDER, RECIPIENTS, MESSAGE)
            assert attempt.responses[RECIPIENTS[0]].code == 250, attempt

    await asyncio.gather(*(sender(count // concurrency) for _ in range(concurrency)))
    await deliverer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args()
    count = 1000 if args.quick else 10000
    cases: list[tuple[str, Callable[[int], Awaitable[object]]]] = [
        ("aiosmtplib, 1 connection (baseline)", lambda p: _baseline(p, count)),
        ("Deliverer, 1 in flight", lambda p: _deliverer(p, count, 1, "")),
        ("Deliverer, 20 in flight, limit 10", lambda p: _deliverer(p, count, 20, "connection_limit = 10")),
        (
            "Deliverer, new connection per message",
            lambda p: _deliverer(p, count // 4, 1, "max_deliveries_per_connection = 1"),
        ),
    ]
    rows = []
    for name, make in cases:
        sink = Sink()
        try:
            timing = run_on_fresh_loop(lambda make=make, port=sink.port: make(port))
        finally:
            sink.stop()
        sent = count // 4 if "per message" in name else count
        rows.append(
            {
                "case": name,
                "messages": sent,
                "cpu_us_per_msg": timing.cpu / sent * 1e6,
                "msgs_per_s": sent / timing.wall,
            }
        )
    baseline = rows[0]["cpu_us_per_msg"]
    for row in rows:
        row["cpu_ratio"] = row["cpu_us_per_msg"] / baseline
    print_table(
        [
            Column("case", "case", "<42"),
            Column("messages", "messages", ">8"),
            Column("CPU µs/msg", "cpu_us_per_msg", ">11.0f"),
            Column("msgs/s", "msgs_per_s", ">8.0f"),
            Column("CPU vs baseline", "cpu_ratio", ">15.2f", "x"),
        ],
        rows,
    )
    write_results("delivery", {"quick": args.quick, "size": len(MESSAGE), "rows": rows})


if __name__ == "__main__":
    main()
