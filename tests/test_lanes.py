"""Lanes are isolated: own egress addresses, own processes, and a bulk backlog never delays transactional mail."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import threading
import time
from pathlib import Path

from tests.harness import Engine, Sink, engine_command, engine_toml, free_port, listener, wait_for


def lanes_engine(tmp_path: Path, sink: Sink, shaping: dict | None = None) -> tuple[Engine, int, int]:
    """Each lane on its own egress addresses: transactional from 127.0.0.3, bulk from 127.0.0.4 and .5."""
    tx, bulk = free_port(), free_port()
    text = engine_toml(
        admin=free_port(),
        routes={"*": sink.address},
        listeners=[listener("tx", tx, "transactional"), listener("bulk", bulk, "bulk")],
        egress={
            "tx-1": {"source_address": "127.0.0.3", "ehlo_name": "tx1.test"},
            "bulk-1": {"source_address": "127.0.0.4", "ehlo_name": "bulk1.test"},
            "bulk-2": {"source_address": "127.0.0.5", "ehlo_name": "bulk2.test"},
        },
        lanes={
            "transactional": {"egress_pool": ["tx-1"], "retry_intervals": ["1s"]},
            "bulk": {"egress_pool": ["bulk-1", "bulk-2"], "retry_intervals": ["1s"]},
        },
        shaping={"connection_limit": 4, **(shaping or {})},
    )
    return Engine(tmp_path, text).start([tx, bulk]), tx, bulk


def send(port: int, recipients: list[str], lane: str, number: int) -> float:
    """One message; returns the time it was handed over (before the SMTP session began)."""
    started = time.time()
    body = f"Subject: {lane} {number}\r\nX-Lane: {lane}\r\nX-Number: {number}\r\n\r\nhello\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(f"{lane}@sender.test", recipients, body.encode())
    return started


def lane_of(message: bytes) -> str:
    return message.split(b"X-Lane: ", 1)[1].split(b"\r\n", 1)[0].decode()


def test_each_lane_leaves_from_its_own_egress_addresses(tmp_path: Path, sink: Sink) -> None:
    engine, tx, bulk = lanes_engine(tmp_path, sink)
    try:
        for n in range(6):
            send(tx, [f"user{n}@d{n}.test"], "tx", n)
        for n in range(20):
            send(bulk, [f"user{n}@d{n % 10}.test"], "bulk", n)
        wait_for(lambda: sink.count() == 26, 20, what="26 messages at the sink")
        peers: dict[str, set] = {"tx": set(), "bulk": set()}
        helos: dict[str, set] = {"tx": set(), "bulk": set()}
        for envelope, message in sink.messages():
            peers[lane_of(message)].add(envelope["peer"])
            helos[lane_of(message)].add(envelope["helo"])
        assert peers == {"tx": {"127.0.0.3"}, "bulk": {"127.0.0.4", "127.0.0.5"}}
        assert helos == {"tx": {"tx1.test"}, "bulk": {"bulk1.test", "bulk2.test"}}
        deliveries = engine.events("Delivery")
        assert {(r["lane"], r["egress_source"]) for r in deliveries} == {
            ("transactional", "tx-1"),
            ("bulk", "bulk-1"),
            ("bulk", "bulk-2"),
        }
    finally:
        engine.stop()


def worker_pids(engine: Engine, lane: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == engine.process.pid and b"worker" in command and lane.encode() in command:
            pids.append(int(entry))
    return pids


def test_killing_a_bulk_worker_does_not_touch_the_transactional_lane(tmp_path: Path, sink: Sink) -> None:
    engine, tx, bulk = lanes_engine(tmp_path, sink, shaping={"max_message_rate": "100/s"})
    try:
        stop = threading.Event()

        def bulk_blast() -> None:
            for n in range(400):
                if stop.is_set():
                    return
                try:
                    send(bulk, [f"b{n}@bulk.test"], "bulk", n)
                except (smtplib.SMTPException, OSError):
                    time.sleep(0.1)

        blaster = threading.Thread(target=bulk_blast)
        blaster.start()
        wait_for(lambda: sink.count() >= 20, 20, what="bulk delivery under way")
        (bulk_worker,) = worker_pids(engine, "bulk")
        os.kill(bulk_worker, signal.SIGKILL)
        latencies = []
        for n in range(20):
            started = send(tx, [f"t{n}@tx.test"], "tx", n)

            def arrived(number: int = n) -> float | None:
                for envelope, message in sink.messages():
                    if lane_of(message) == "tx" and f"X-Number: {number}\r\n".encode() in message:
                        return envelope["received"]
                return None

            latencies.append(wait_for(arrived, 10, interval=0.01, what=f"tx message {n}") - started)
        stop.set()
        blaster.join(30)
        assert max(latencies) < 2.0, latencies  # the transactional SLA (sla_latency default 2s)
        wait_for(lambda: worker_pids(engine, "bulk") and worker_pids(engine, "bulk") != [bulk_worker], 10)
    finally:
        engine.stop()


def test_transactional_latency_stays_low_behind_a_bulk_backlog(tmp_path: Path, sink: Sink) -> None:
    engine, tx, bulk = lanes_engine(tmp_path, sink, shaping={"max_message_rate": "100/s"})
    seen: dict[str, tuple[dict, bytes]] = {}
    try:
        result = subprocess.run(
            engine_command(
                "send", "--server", f"127.0.0.1:{bulk}", "--to", "b{n}@bulk.test", "--count", "3000",
                "--concurrency", "20", "--size", "1024", "--header", "X-Lane: bulk", "--quiet",
            ),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        latencies = []
        for n in range(50):
            started = send(tx, [f"t{n}@tx.test"], "tx", n)

            def arrived(number: int = n) -> float | None:
                for envelope, message in sink.arrivals(seen).values():
                    if lane_of(message) == "tx" and f"X-Number: {number}\r\n".encode() in message:
                        return envelope["received"]
                return None

            latencies.append(wait_for(arrived, 10, interval=0.005, what=f"tx message {n}") - started)
            time.sleep(max(0.0, started + 0.05 - time.time()))  # 20 messages a second
        bulk_delivered = sum(1 for _, message in sink.arrivals(seen).values() if lane_of(message) == "bulk")
        assert bulk_delivered < 3000, "the bulk backlog was gone before the transactional messages: proves nothing"
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"transactional p50={latencies[25] * 1000:.1f}ms p99={p99 * 1000:.1f}ms, bulk delivered {bulk_delivered}")
        assert p99 < 1.0
    finally:
        engine.stop()
