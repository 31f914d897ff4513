"""Client-side CPU per message: engine.smtp.client and `engine send` against aiosmtplib (the baseline).

The server (the recording ESMTP peer of tests/test_client.py, recording off) runs in a subprocess, so the
CPU time read with getrusage in this process is the client's alone. Run: python -m bench.smtp_client [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable

import aiosmtplib
import uvloop

from bench.common import Column, print_table, run_on_fresh_loop, write_results
from engine.loadgen import _Composer, run_load
from engine.smtp.client import SMTPConnection

SIZE = 2048
SENDER = "bench@src.test"


class _PeerProcess:
    """The test peer in a child process; `pipelining` chooses whether it advertises PIPELINING."""

    def __init__(self, pipelining: bool) -> None:
        flag = [] if pipelining else ["--no-pipelining"]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.smtp_client", "--peer", *flag],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
        )
        self.port = int(self._proc.stdout.readline())

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(10)


async def _serve_peer(pipelining: bool) -> None:
    from tests.test_client import Peer

    peer = Peer(pipelining=pipelining, record=False)
    await peer.start()
    print(peer.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def _engine_client(port: int, count: int, messages: list[bytes], window: int) -> None:
    """`window` callers share one connection, so bodies and next envelopes can share a write."""
    conn = await SMTPConnection.open("127.0.0.1", port)

    async def caller(first: int) -> None:
        for i in range(first, count, window):
            _, _, data = await conn.send_message(SENDER, [f"user{i}@d.test"], messages[i % len(messages)])
            assert data is not None and data.code == 250

    await asyncio.gather(*(caller(i) for i in range(window)))
    await conn.quit()


async def _aiosmtplib_client(port: int, count: int, messages: list[bytes]) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, use_tls=False)
    await smtp.connect()
    for i in range(count):
        await smtp.sendmail(SENDER, [f"user{i}@d.test"], messages[i % len(messages)])
    await smtp.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-pipelining", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        uvloop.run(_serve_peer(not args.no_pipelining))
        return

    count, repeat = (2000, 3) if args.quick else (10000, 5)
    composer = _Composer(["user{n}@d.test"], SIZE, [], SENDER)
    messages = [composer.message(n) for n in range(1, 101)]
    cases: list[tuple[str, bool, Callable[[int], Awaitable[object]]]] = [
        ("aiosmtplib (baseline)", True, lambda p: _aiosmtplib_client(p, count, messages)),
        ("SMTPConnection, no PIPELINING", False, lambda p: _engine_client(p, count, messages, 1)),
        ("SMTPConnection, PIPELINING", True, lambda p: _engine_client(p, count, messages, 1)),
        ("SMTPConnection, 2 in flight", True, lambda p: _engine_client(p, count, messages, 2)),
        *(
            (
                f"engine send, {c} session{'s' * (c > 1)}",
                True,
                lambda p, c=c: run_load(("127.0.0.1", p), ["user{n}@d.test"], count, c, SIZE, [], SENDER, False),
            )
            for c in (1, 20)
        ),
    ]
    rows = []
    for name, pipelining, make in cases:
        peer = _PeerProcess(pipelining)
        try:
            runs = [run_on_fresh_loop(lambda make=make, port=peer.port: make(port)) for _ in range(repeat)]
        finally:
            peer.close()
        user, system, wall = (
            statistics.median(getattr(r, field) for r in runs) for field in ("user", "system", "wall")
        )
        rows.append(
            {
                "client": name,
                "cpu_us_per_msg": statistics.median(r.cpu for r in runs) / count * 1e6,
                "user_us_per_msg": user / count * 1e6,
                "sys_us_per_msg": system / count * 1e6,
                "msgs_per_s": count / wall,
            }
        )
    baseline = rows[0]["cpu_us_per_msg"]
    print(f"{count} messages of {SIZE} bytes, one recipient, uvloop, server in a subprocess, median of {repeat}")
    for row in rows:
        row["ratio_vs_aiosmtplib"] = row["cpu_us_per_msg"] / baseline
    print_table(
        [
            Column("client", "client", "<32"),
            Column("CPU µs/msg", "cpu_us_per_msg", ">12.1f"),
            Column("user", "user_us_per_msg", ">8.1f"),
            Column("sys", "sys_us_per_msg", ">8.1f"),
            Column("msgs/s", "msgs_per_s", ">10.0f"),
            Column("CPU vs baseline", "ratio_vs_aiosmtplib", ">17.2f"),
        ],
        rows,
    )
    write_results("smtp_client", {"count": count, "size": SIZE, "repeat": repeat, "rows": rows})


if __name__ == "__main__":
    main()
