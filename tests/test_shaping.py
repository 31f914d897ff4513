"""Scheduling and shaping seen from outside: lane-wide rates, priority, retry timing, expiry while queued."""

from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path

from tests.harness import Engine, Sink, engine_command, engine_toml, free_port, listener, wait_for


def start(
    tmp_path: Path, sink: Sink, *, workers: int = 1, retry: str = "1s", max_age: str = "1h", shaping: dict | None = None
) -> tuple[Engine, int]:
    port = free_port()
    text = engine_toml(
        admin=free_port(),
        routes={"*": sink.address},
        listeners=[listener("tx", port, "transactional")],
        lanes={"transactional": {"workers": workers, "retry_intervals": [retry], "max_age": max_age}},
        shaping=shaping,
    )
    return Engine(tmp_path, text).start([port]), port


def blast(port: int, count: int, concurrency: int = 10, *headers: str, to: str = "user{n}@dest.test") -> None:
    command = engine_command(
        "send", "--server", f"127.0.0.1:{port}", "--to", to, "--count", str(count),
        "--concurrency", str(concurrency), "--size", "512", "--quiet",
    )  # fmt: skip
    for header in headers:
        command += ["--header", header]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_workers_hold_the_lane_wide_rate(tmp_path: Path, sink: Sink) -> None:
    engine, port = start(tmp_path, sink, workers=2, shaping={"max_message_rate": "20/s"})
    try:
        blast(port, 260, 10)
        wait_for(lambda: sink.count() >= 260, 30, what="260 messages at 20/s")
        arrivals = sorted(envelope["received"] for envelope, _ in sink.messages())
        steady = arrivals[10:]  # past the initial burst
        span = steady[-1] - steady[0]
        rate = (len(steady) - 1) / span
        assert span >= 10
        assert 18.0 <= rate <= 22.0, f"{rate:.2f} msgs/s over {span:.1f}s"
        workers = {record["id"][-8:-4] for record in engine.events("Delivery")}
        assert len(workers) == 2, "both workers delivered"
    finally:
        engine.stop()


def test_priority_zero_overtakes_five_thousand_queued(tmp_path: Path, sink: Sink) -> None:
    engine, port = start(tmp_path, sink, shaping={"connection_limit": 2, "max_message_rate": "200/s"})
    try:
        blast(port, 5000, 20)
        queued_at = sink.count()
        assert queued_at < 4000, "the backlog must still exist when the urgent message comes"
        blast(port, 1, 1, "X-Engine-Priority: 0", "X-Urgent: yes", to="urgent@dest.test")

        def urgent_position() -> int | None:
            for position, (envelope, _) in enumerate(sink.messages()):
                if envelope["recipients"] == ["urgent@dest.test"]:
                    return position + 1
            return None

        position = wait_for(urgent_position, 30, interval=0.02, what="the urgent message")
        assert position <= queued_at + 200, f"urgent message arrived {position}th; {queued_at} were there before it"
    finally:
        engine.stop()


def test_retry_fires_on_schedule(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "sink", reply="*@later.test=451 4.3.0 not yet")
    engine, port = start(tmp_path, sink, retry="2s")
    try:
        blast(port, 1, 1, to="r@later.test")
        wait_for(lambda: len(engine.events("TransientFailure")) >= 3, 15, what="three attempts")
        stamps = [record["timestamp"] for record in engine.events("TransientFailure")]
        gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
        assert all(2.0 <= gap <= 2.5 for gap in gaps), gaps
    finally:
        engine.stop()
        sink.stop()


def test_messages_expire_while_waiting_in_a_ready_queue(tmp_path: Path, sink: Sink) -> None:
    engine, port = start(tmp_path, sink, max_age="2s", shaping={"connection_limit": 1, "max_message_rate": "2/s"})
    try:
        started = time.time()
        blast(port, 20, 4)
        wait_for(lambda: len(engine.events("Delivery", "Expiration")) == 20, 15, what="20 final outcomes")
        expirations = engine.events("Expiration")
        assert len(expirations) >= 10
        never_tried = [record for record in expirations if record["attempt"] == 0]
        assert never_tried, "expired while ready, before any attempt"
        assert all(record["timestamp"] - started < 4.0 for record in never_tried)
        assert sink.count() == len(engine.events("Delivery"))
    finally:
        engine.stop()


def test_connection_limit_holds_across_two_workers(tmp_path: Path, sink: Sink) -> None:
    engine, port = start(tmp_path, sink, workers=2, shaping={"connection_limit": 3, "idle_timeout": "1s"})
    try:
        blast(port, 1500, 20)
        wait_for(lambda: sink.count() >= 1500, 60, what="1500 messages at the sink")
        workers = {record["id"][-8:-4] for record in engine.events("Delivery")}
        assert len(workers) == 2, "both workers delivered"
    finally:
        engine.stop()
    stats = sink.stop()
    assert stats["peak_sessions_by_peer"] == {"127.0.0.1": 3}
