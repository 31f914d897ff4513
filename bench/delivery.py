"""Client CPU per message of engine.delivery.Deliverer against plain aiosmtplib on one connection (baseline).

`engine sink` runs in a subprocess, so the CPU time read with getrusage here is the delivering side alone:
the price of pooling, per-recipient replies and address checks on top of aiosmtplib, and what reusing
sessions saves over a connection per message. Run: python -m bench.delivery [--quick]
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

import aiosmtplib
import uvloop

from engine.config import Egress, load_config
from engine.delivery import Deliverer
from engine.resolver import Resolver

SENDER = "bench@src.test"
RECIPIENTS = ["user@dest.test"]
MESSAGE = b"From: bench@src.test\r\nTo: user@dest.test\r\nSubject: bench\r\n\r\n" + b"x" * 76 + b"\r\n"
MESSAGE = MESSAGE * (2048 // len(MESSAGE))
RESULTS = Path(__file__).parent / "results" / "delivery.json"


class _Sink:
    def __init__(self) -> None:
        command = [sys.executable, "-m", "engine", "sink", "--listen", "127.0.0.1:0"]
        self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self.port = int(json.loads(self._proc.stdout.readline())["listening"].rpartition(":")[2])

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)


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


def _measure(run: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(CPU, wall) seconds of one run on a fresh uvloop loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        runner.run(run())
        after, wall2 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime), wall2 - wall


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
        sink = _Sink()
        try:
            cpu, wall = _measure(lambda make=make, port=sink.port: make(port))
        finally:
            sink.close()
        sent = count // 4 if "per message" in name else count
        rows.append({"case": name, "messages": sent, "cpu_us_per_msg": cpu / sent * 1e6, "msgs_per_s": sent / wall})
    baseline = rows[0]["cpu_us_per_msg"]
    print(f"{'case':42} {'messages':>8} {'CPU µs/msg':>11} {'msgs/s':>8} {'CPU vs baseline':>16}")
    for row in rows:
        row["cpu_ratio"] = row["cpu_us_per_msg"] / baseline
        print(
            f"{row['case']:42} {row['messages']:>8} {row['cpu_us_per_msg']:>11.0f} "
            f"{row['msgs_per_s']:>8.0f} {row['cpu_ratio']:>15.2f}x"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"quick": args.quick, "size": len(MESSAGE), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
