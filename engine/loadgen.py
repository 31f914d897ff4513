"""`engine send`: inject test mail over pipelined SMTP sessions and report throughput and latency.

The generator must stay cheap next to the engine it drives on the same box: messages are cut from one
pre-built body, and every session is a single pipelining SMTPConnection. It injects with DATA, as most
submitting applications do, even where the server offers BDAT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate

import uvloop

from engine.smtp.client import Reply, SMTPClientError, SMTPConnection, SMTPTimeoutError

__all__ = ["LoadReport", "run_load", "send_command"]

_LINE = 76
_WINDOW = 2  # messages in flight per session: the body of one leaves in the same write as the next envelope
_VOCABULARY = (
    "the of and to in is for that on with as delivery message queue sender recipient domain lane bulk "
    "transactional throughput latency retry bounce header body campaign tenant priority spool engine "
    "report account order shipped invoice password reset welcome newsletter update weekly digest"
)
_WORDS = _VOCABULARY.split()


@dataclass
class LoadReport:
    """What one run achieved.

    `failed` counts messages not accepted, by the reply code that refused them, or "DATA" (the DATA command
    refused), "connect" (no session), "connection" (session broke), "timeout"; `refused` counts refused
    recipients by reply code.
    """

    count: int
    sent: int
    failed: dict[str, int]
    refused: dict[str, int]
    elapsed: float
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.sent == self.count and not self.refused

    def as_dict(self) -> dict[str, object]:
        return {
            "count": self.count,
            "sent": self.sent,
            "failed": sum(self.failed.values()),
            "failed_by_code": self.failed,
            "refused_recipients": self.refused,
            "elapsed_s": round(self.elapsed, 6),
            "messages_per_second": round(self.rate, 2),
            "latency_ms": self.latency_ms,
        }

    def format(self) -> str:
        lines = [
            f"sent        {self.sent}",
            f"failed      {sum(self.failed.values())}",
            *(f"  {code:<10}{n}" for code, n in sorted(self.failed.items())),
        ]
        if self.refused:
            lines.append(f"refused     {sum(self.refused.values())} recipients")
            lines.extend(f"  {code:<10}{n}" for code, n in sorted(self.refused.items()))
        lines.append(f"elapsed     {self.elapsed:.3f} s")
        lines.append(f"rate        {self.rate:.1f} msg/s")
        if self.latency_ms:
            lat = self.latency_ms
            lines.append(
                f"latency ms  p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f}"
            )
        return "\n".join(lines)


def _percentiles(latencies: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds."""
    if not latencies:
        return {}
    ordered = sorted(latencies)
    n = len(ordered)

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p / 100 * n) - 1)] * 1000, 3)

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": round(ordered[-1] * 1000, 3)}


def _filler(size: int) -> bytes:
    """Text lines of exactly 76 characters, like a wrapped or quoted-printable body, at least `size` long."""
    rng = random.Random(size)
    lines = []
    total = 0
    while total < size + _LINE + 2:
        words: list[str] = []
        length = -1
        while length < _LINE:
            word = rng.choice(_WORDS)
            words.append(word)
            length += len(word) + 1
        line = " ".join(words)[:_LINE].rstrip().ljust(_LINE, ".")
        lines.append(line.encode() + b"\r\n")
        total += _LINE + 2
    return b"".join(lines)


def _check_headers(headers: list[str]) -> list[str]:
    for header in headers:
        name, sep, _ = header.partition(":")
        if not sep or not name.strip() or " " in name.strip() or not header.isprintable():
            raise ValueError(f"invalid header {header!r}: expected 'Name: value'")
    return headers


class _Composer:
    """Builds message N: fixed headers, per-message ids, and a body that pads the whole to `size` bytes."""

    def __init__(self, to: list[str], size: int, headers: list[str], sender: str) -> None:
        run = uuid.uuid4().hex[:12]
        domain = sender.rpartition("@")[2] or "localhost"
        fixed = {
            "from": f"From: <{sender}>",
            "to": "To: " + ", ".join(f"<{a}>" for a in to),
            "subject": "Subject: engine loadgen message {n}",
            "date": f"Date: {formatdate(localtime=True)}",
        }
        extra = []
        for header in _check_headers(headers):
            name = header.partition(":")[0].strip().lower()
            if name in fixed:
                fixed[name] = header
            else:
                extra.append(header)
        lines = [
            *fixed.values(),
            f"Message-ID: <{run}.{{n}}@{domain}>",
            f"X-Loadgen-Id: {run}",
            "X-Loadgen-Seq: {n}",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=us-ascii",
            *extra,
        ]
        self._head = "\r\n".join(lines) + "\r\n\r\n"
        self._to = to
        self._to_varies = any("{n}" in a for a in to)
        self._size = size
        self._filler = _filler(size)

    def recipients(self, n: int) -> list[str]:
        if not self._to_varies:
            return self._to
        number = str(n)
        return [a.replace("{n}", number) for a in self._to]

    def message(self, n: int) -> bytes:
        head = self._head.replace("{n}", str(n)).encode()
        full, rest = divmod(self._size - len(head), _LINE + 2)
        if full < 0:
            return head
        if rest == 1 and full:
            full -= 1
            rest += _LINE + 2
        body = self._filler[: full * (_LINE + 2)]
        if rest >= 2:
            body += self._filler[: rest - 2] + b"\r\n"
        return head + body


class _Run:
    """Shared state of one load run: the next message number, outcomes, latencies."""

    def __init__(self, server: tuple[str, int], composer: _Composer, count: int, sender: str) -> None:
        self.server = server
        self.composer = composer
        self.count = count
        self.sender = sender
        self.next = 1
        self.sent = 0
        self.failed: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.latencies: list[float] = []

    @property
    def done(self) -> int:
        return self.sent + self.failed.total()

    def take(self) -> int | None:
        """The next message number to send, or None when all are handed out."""
        if self.next > self.count:
            return None
        self.next += 1
        return self.next - 1

    async def session(self) -> None:
        """Send messages over one connection until none are left; reconnect after a broken session."""
        while (n := self.take()) is not None:
            try:
                conn = await SMTPConnection.open(*self.server, chunking=False)
            except OSError:
                self.failed["connect"] += 1
                continue
            except SMTPClientError as exc:
                self._failure(exc)
                continue
            try:
                await asyncio.gather(*(self.stream(conn, n if i == 0 else None) for i in range(_WINDOW)))
            finally:
                await conn.quit()

    async def stream(self, conn: SMTPConnection, n: int | None) -> None:
        """One of the overlapping senders on a connection: runs until the work or the connection ends."""
        composer, sender, clock = self.composer, self.sender, time.perf_counter
        if n is None:
            n = self.take()
        while n is not None:
            start = clock()
            try:
                mail, rcpts, data = await conn.send_message(sender, composer.recipients(n), composer.message(n))
            except SMTPClientError as exc:
                self._failure(exc)
                return
            latency = clock() - start
            for reply in rcpts:
                if not reply.success:
                    self.refused[str(reply.code)] += 1
            if data is not None and data.success:
                self.sent += 1
                self.latencies.append(latency)
            else:
                self.failed[_first_failure(mail, rcpts, data)] += 1
            n = None if conn.closed else self.take()

    def _failure(self, exc: SMTPClientError) -> None:
        if isinstance(exc, SMTPTimeoutError):
            self.failed["timeout"] += 1
        else:
            self.failed[str(exc.reply.code) if exc.reply else "connection"] += 1


def _first_failure(mail: Reply, rcpts: list[Reply], data: Reply | None) -> str:
    """The reply code that explains why a message was not accepted (MAIL's, DATA's, else a recipient's)."""
    if not mail.success:
        return str(mail.code)
    if data is not None:
        return str(data.code)
    return next((str(r.code) for r in rcpts if not r.success), "DATA")


def _draw(run: _Run, started: float, final: bool = False) -> None:
    done, count = run.done, run.count
    width = 30
    filled = width * done // count if count else width
    elapsed = time.perf_counter() - started
    rate = run.sent / elapsed if elapsed > 0 else 0.0
    bar = "#" * filled + "." * (width - filled)
    failed = run.failed.total()
    sys.stderr.write(f"\r[{bar}] {done}/{count} {rate:,.0f} msg/s failed {failed} ")
    if final:
        sys.stderr.write("\n")
    sys.stderr.flush()


async def _progress(run: _Run, started: float) -> None:
    while True:
        _draw(run, started)
        await asyncio.sleep(0.2)


async def run_load(
    server: tuple[str, int],
    to: list[str],
    count: int,
    concurrency: int,
    size: int,
    headers: list[str],
    sender: str,
    progress: bool,
) -> LoadReport:
    """Send `count` messages to all of `to` over `concurrency` sessions.

    `{n}` in an address or header is replaced by the message number (1..count).
    """
    if not to:
        raise ValueError("at least one recipient is needed")
    run = _Run(server, _Composer(to, size, headers, sender), count, sender)
    started = time.perf_counter()
    bar = asyncio.get_running_loop().create_task(_progress(run, started)) if progress else None
    try:
        await asyncio.gather(*(run.session() for _ in range(max(1, min(concurrency, count)))))
    finally:
        if bar is not None:
            bar.cancel()
            _draw(run, started, final=True)
    elapsed = time.perf_counter() - started
    return LoadReport(count, run.sent, dict(run.failed), dict(run.refused), elapsed, _percentiles(run.latencies))


def _parse_server(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--server {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _load_options(args: argparse.Namespace) -> dict[str, object]:
    """run_load's arguments from the `engine send` command line; ValueError names what is wrong."""
    to, headers = list(args.to or []), list(args.header or [])
    if not to:
        raise ValueError("--to is required")
    if args.count < 0 or args.size < 0 or args.concurrency < 1:
        raise ValueError("--count and --size must be 0 or more, --concurrency 1 or more")
    return {
        "server": _parse_server(args.server),
        "to": to,
        "count": args.count,
        "concurrency": args.concurrency,
        "size": args.size,
        "headers": _check_headers(headers),
        "sender": getattr(args, "sender", None) or "loadgen@localhost",
        "progress": not args.quiet and (getattr(args, "progress", False) or sys.stderr.isatty()),
    }


def send_command(args: argparse.Namespace) -> int:
    """Entry point of `engine send`: exit 0 when everything was accepted, 1 if not, 2 on bad arguments."""
    try:
        options = _load_options(args)
    except ValueError as exc:
        print(f"engine send: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(run_load(**options))
    except KeyboardInterrupt:
        print("engine send: interrupted", file=sys.stderr)
        return 130
    print(report.format())
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report.as_dict(), out, indent=2)
            out.write("\n")
    return 0 if report.ok else 1
