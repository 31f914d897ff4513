"""Durability proofs against the real engine: kill -9 at random moments, a killed worker, a full spool disk.

The promise (SPEC "Durability", Postfix's and Exim's): a 250 is given only once the message is on disk, so
every message that got one is delivered after any crash; a message can be delivered twice only if it was
in flight at the crash (delivered, but its removal from the spool not yet committed).
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import Engine, Sink, free_port, wait_for

RUNS = 10
MESSAGES_PER_RUN = 300
SESSIONS = 6
IN_FLIGHT_WINDOW = 2.0  # a duplicate's first copy reached the sink at most this long before the kill
SINK_LAG = 1.0  # or this long after it: the sink stamps a message once it has read and written all of it
_ID = re.compile(rb"^X-Test-Id: (\S+)\r$", re.MULTILINE)


def config(port: int, admin: int, route: str, workers: int = 1, spool: str = "spool") -> str:
    return f"""
[engine]
hostname = "mta.test"
spool_dir = "{spool}"
log_dir = "logs"
[admin]
listen = "127.0.0.1:{admin}"
[routes]
"*" = "{route}"
[lanes.transactional]
workers = {workers}
retry_intervals = ["1s"]
[[listeners]]
name = "tx"
listen = "127.0.0.1:{port}"
lane = "transactional"
"""


class Blast:
    """SESSIONS threads, each with one SMTP session, sending numbered messages once each; a session that
    fails is replaced. `acked` holds the ids that got their 250."""

    def __init__(self, port: int, run: str, count: int, size: int = 1000) -> None:
        self.port = port
        self.ids = [f"{run}-{n:05d}" for n in range(count)]
        self.body = b"x" * 70 + b"\r\n"
        self.lines = max(1, size // len(self.body))
        self.acked: set[str] = set()
        self.failed = 0
        self._next = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._session, daemon=True) for _ in range(SESSIONS)]

    def start(self) -> Blast:
        for thread in self.threads:
            thread.start()
        return self

    def join(self, timeout: float = 60.0) -> None:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a blast session hung"

    def _take(self) -> str | None:
        with self._lock:
            if self._next >= len(self.ids):
                return None
            self._next += 1
            return self.ids[self._next - 1]

    def _session(self) -> None:
        client: smtplib.SMTP | None = None
        while (message_id := self._take()) is not None:
            message = f"Subject: blast\r\nX-Test-Id: {message_id}\r\n\r\n".encode() + self.body * self.lines
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
                client.sendmail("blast@x.test", ["rcpt@dest.test"], message)
            except (smtplib.SMTPException, OSError):
                with self._lock:
                    self.failed += 1
                if client is not None:
                    client.close()
                client = None
                time.sleep(0.02)
                continue
            with self._lock:
                self.acked.add(message_id)
        if client is not None:
            client.close()


def arrivals(sink: Sink, prefix: str) -> dict[str, list[float]]:
    """id → times it reached the sink, for the ids of one run."""
    found: dict[str, list[float]] = {}
    for envelope, message in sink.messages():
        match = _ID.search(message)
        if match and match.group(1).decode().startswith(prefix):
            found.setdefault(match.group(1).decode(), []).append(envelope["received"])
    return found


def check_run(sink: Sink, prefix: str, acked: set[str], killed_at: float, timeout: float = 30.0) -> tuple[int, int]:
    """Waits until every acked message arrived; returns (duplicates, delivered although not acked)."""
    wait_for(lambda: acked <= set(arrivals(sink, prefix)), timeout, what=f"every acked message of {prefix}")
    found = arrivals(sink, prefix)
    duplicates = {key: times for key, times in found.items() if len(times) > 1}
    for key, times in duplicates.items():
        first = min(times)
        assert killed_at - IN_FLIGHT_WINDOW <= first <= killed_at + SINK_LAG, (
            f"{key} duplicated but not in flight: {times}"
        )
    return sum(len(times) - 1 for times in duplicates.values()), len(set(found) - acked)


def test_kill_9_of_the_whole_engine_loses_no_acknowledged_message(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    sink = Sink(tmp_path / "sink")
    totals = Counter()
    try:
        for run in range(RUNS):
            directory = tmp_path / f"run{run}"
            directory.mkdir()
            port, admin = free_port(), free_port()
            engine = Engine(directory, config(port, admin, sink.address)).start([port])
            blast = Blast(port, f"r{run}", MESSAGES_PER_RUN).start()
            target = rng.randint(1, MESSAGES_PER_RUN - 50)
            wait_for(
                lambda b=blast, t=target: len(b.acked) >= t, 30, interval=0.005, what=f"{target} messages accepted"
            )
            time.sleep(rng.uniform(0, 0.01))
            killed_at = time.time()
            engine.kill()
            blast.join()
            engine.start([port])
            try:
                duplicates, unacked = check_run(sink, f"r{run}-", blast.acked, killed_at)
            finally:
                engine.stop()
            totals.update(runs=1, acked=len(blast.acked), duplicates=duplicates, unacked_delivered=unacked)
            totals.update(not_sent=blast.failed)
    finally:
        sink.stop()
    print(f"\nkill -9 of the engine (seed {seed}): {dict(totals)}, lost 0")
    assert totals["runs"] == RUNS and totals["acked"] > 0


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def sessions_of(pid: int, port: int) -> int:
    """Established connections to local `port` held by process `pid` (its socket inodes in /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


def test_kill_9_of_one_worker_while_the_supervisor_restarts_it(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "sink")
    port, admin = free_port(), free_port()
    engine = Engine(tmp_path, config(port, admin, sink.address, workers=2)).start([port])
    try:
        workers = wait_for(lambda: len(children(engine.process.pid)) == 2 and children(engine.process.pid), 10)
        blast = Blast(port, "w", 600).start()
        wait_for(lambda: len(blast.acked) >= 100, 20, what="100 messages accepted")
        victim = max(workers, key=lambda pid: sessions_of(pid, port))
        assert sessions_of(victim, port) > 0, "no worker holds a blast session"
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        blast.join()
        assert blast.failed > 0, "the victim's sessions did not notice"
        assert len(blast.acked) > 300, f"only {len(blast.acked)} accepted: the surviving worker stopped serving"
        wait_for(lambda: len(children(engine.process.pid)) == 2 and victim not in children(engine.process.pid), 20)
        (survivor,) = set(workers) - {victim}
        assert survivor in children(engine.process.pid)  # left alone
        duplicates, _ = check_run(sink, "w-", blast.acked, killed_at)
        assert engine.process.poll() is None
    finally:
        engine.stop()
        sink.stop()
    print(f"\nkill -9 of one worker: acked {len(blast.acked)}, cut {blast.failed}, duplicates {duplicates}")


def test_kill_9_of_the_supervisor_alone(tmp_path: Path) -> None:
    """Orphaned workers notice, finish their sessions and stop; a new engine delivers what they accepted."""
    sink = Sink(tmp_path / "sink")
    port, admin = free_port(), free_port()
    engine = Engine(tmp_path, config(port, admin, sink.address, workers=2)).start([port])
    try:
        workers = wait_for(lambda: len(children(engine.process.pid)) == 2 and children(engine.process.pid), 10)
        blast = Blast(port, "s", 400).start()
        wait_for(lambda: len(blast.acked) >= 100, 20, what="100 messages accepted")
        killed_at = time.time()
        os.kill(engine.process.pid, signal.SIGKILL)
        engine.process.wait(10)
        engine.stderr.close()
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 40, what="orphaned workers gone")
        blast.join()
        engine.start([port])
        duplicates, unacked = check_run(sink, "s-", blast.acked, killed_at)
    finally:
        engine.stop()
        sink.stop()
    print(
        f"\nkill -9 of the supervisor: acked {len(blast.acked)}, duplicates {duplicates}, unacked delivered {unacked}"
    )


def send(port: int, size: int) -> tuple[int, bytes]:
    """One message; (code, text) of the answer to DATA, or of the command that failed."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        try:
            client.sendmail(
                "a@x.test", ["b@dest.test"], b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * (size // 1000)
            )
        except smtplib.SMTPDataError as error:
            return error.smtp_code, error.smtp_error
        except smtplib.SMTPRecipientsRefused as error:
            return next(iter(error.recipients.values()))
        return 250, b""


def test_full_spool_disk_answers_452_keeps_serving_and_recovers_without_restart(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(spool)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"this test needs root to mount a 2 MB tmpfs for the spool: {mounted.stderr.decode().strip()}")
    port, admin = free_port(), free_port()
    nowhere = f"127.0.0.1:{free_port()}"  # deliveries fail and retry, so the spool keeps what it accepted
    engine = Engine(tmp_path, config(port, admin, nowhere, spool=str(spool))).start([port])
    try:
        (worker,) = wait_for(lambda: children(engine.process.pid), 10)
        answers = []
        for _ in range(80):  # 80 x 50 KB is twice the disk
            answers.append(send(port, 50_000))
            if answers[-1][0] != 250:
                break
        accepted = sum(code == 250 for code, _ in answers)
        assert answers[-1][0] == 452 and answers[-1][1].startswith(b"4.3.1"), answers[-3:]
        assert accepted >= 1, "the spool took nothing before it was full"
        for _ in range(3):  # still full: still answering, still refusing politely
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                assert client.noop()[0] == 250
            assert send(port, 50_000)[0] == 452
        remount = ["mount", "-o", "remount,size=64m", str(spool)]
        subprocess.run(remount, check=True)
        recovered = wait_for(
            lambda: send(port, 50_000)[0] == 250, 10, interval=0.2, what="acceptance after space returned"
        )
        assert recovered
        assert children(engine.process.pid) == [worker], "the worker was restarted"
        assert engine.process.poll() is None
    finally:
        engine.stop()
        subprocess.run(["umount", "-l", str(spool)], check=False)
    print(f"\nfull spool: {accepted} x 50 KB accepted on 2 MB, then 452 4.3.1; accepted again after growing it")
