"""Black-box tests: `engine serve` as a real process, a real SMTP sink as the destination."""

from __future__ import annotations

import re
import smtplib
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import Engine, Sink, engine_command, engine_toml, free_port, listener, wait_for


def engine_config(sink: Sink, tx_port: int, bulk_port: int, admin_port: int) -> str:
    return engine_toml(
        admin=admin_port,
        routes={"*": sink.address},
        listeners=[listener("tx", tx_port, "transactional"), listener("bulk", bulk_port, "bulk")],
        lanes={"transactional": {"retry_intervals": ["1s"]}, "bulk": {"retry_intervals": ["1s"]}},
    )


@pytest.fixture
def ports() -> tuple[int, int, int]:
    return free_port(), free_port(), free_port()


@pytest.fixture
def engine(tmp_path: Path, sink: Sink, ports):
    engine = Engine(tmp_path, engine_config(sink, *ports)).start(list(ports[:2]))
    yield engine
    if engine.process.poll() is None:
        engine.stop()


MESSAGE = (
    b"From: Alice <alice@example.net>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Subject: password reset\r\n"
    b"X-Engine-Campaign: spring\r\n"
    b"X-Engine-Tenant: acme\r\n"
    b"X-Engine-Priority: 1\r\n"
    b"\r\n"
    b"Your code is 123456.\r\n"
    b".leading dot survives\r\n"
)


def test_message_arrives_byte_for_byte_with_trace_and_message_id(engine: Engine, sink: Sink, ports) -> None:
    with smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as client:
        client.sendmail("alice@example.net", ["bob@dest.test"], MESSAGE)
    wait_for(lambda: sink.count() == 1, 10, what="delivery to the sink")
    envelope, received = sink.messages()[0]
    assert envelope["sender"] == "alice@example.net"
    assert envelope["recipients"] == ["bob@dest.test"]
    assert received.startswith(b"Received: from ")
    header, _, body = received.partition(b"\r\n\r\n")
    assert body == b"Your code is 123456.\r\n.leading dot survives\r\n"
    assert b"X-Engine-" not in header
    message_ids = re.findall(rb"Message-ID: <([0-9a-f]+)@mta.test>", header)
    assert len(message_ids) == 1
    original_fields = [line for line in MESSAGE.split(b"\r\n\r\n")[0].split(b"\r\n") if not line.startswith(b"X-")]
    for field in original_fields:
        assert field in header.split(b"\r\n")
    wait_for(lambda: engine.events("Delivery"), 5, what="Delivery record")
    reception = engine.events("Reception")[0]
    delivery = engine.events("Delivery")[0]
    assert reception["id"] == delivery["id"] == message_ids[0].decode()
    assert reception["recipients"] == ["bob@dest.test"]
    assert (reception["campaign"], reception["tenant"], reception["priority"]) == ("spring", "acme", 1)
    assert delivery["recipient"] == "bob@dest.test"
    assert delivery["domain"] == "dest.test"
    assert delivery["lane"] == "transactional"
    assert delivery["response"]["code"] == 250
    assert delivery["peer"]["address"] == "127.0.0.1"
    for field in ("sender", "campaign", "tenant", "priority", "size", "created", "timestamp", "attempt"):
        assert field in delivery


def test_recipient_refused_by_destination_bounces_others_delivered(tmp_path: Path, ports) -> None:
    sink = Sink(tmp_path / "sink", reply="nobody@*=550 5.1.1 no such user;later@*=451 4.2.0 busy")
    engine = Engine(tmp_path, engine_config(sink, *ports)).start(list(ports[:2]))
    try:
        with smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as client:
            client.sendmail("a@example.net", ["ok@dest.test", "nobody@dest.test", "later@dest.test"], MESSAGE)
        wait_for(lambda: engine.events("Bounce") and len(engine.events("TransientFailure")) >= 2, 10)
        assert sink.messages()[0][0]["recipients"] == ["ok@dest.test"]
        (bounce,) = engine.events("Bounce")
        assert bounce["recipient"] == "nobody@dest.test"
        assert bounce["response"] == {"code": 550, "enhanced": "5.1.1", "text": "no such user"}
        retries = engine.events("TransientFailure")
        assert {r["recipient"] for r in retries} == {"later@dest.test"}
        assert [r["attempt"] for r in retries][:2] == [1, 2]
        assert len(engine.events("Delivery")) == 1
    finally:
        engine.stop()
        sink.stop()


def test_two_thousand_messages_from_engine_send_all_arrive_once(engine: Engine, sink: Sink, ports) -> None:
    result = subprocess.run(
        engine_command(
            "send", "--server", f"127.0.0.1:{ports[0]}", "--to", "user{n}@dest.test",
            "--count", "2000", "--concurrency", "20", "--size", "2048", "--quiet",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "msg/s" in result.stdout
    wait_for(lambda: sink.count() >= 2000, 60, what="2000 messages at the sink")
    time.sleep(0.5)
    recipients = Counter(r for envelope, _ in sink.messages() for r in envelope["recipients"])
    assert len(recipients) == 2000
    assert max(recipients.values()) == 1
    wait_for(lambda: len(engine.events("Delivery")) >= 2000, 10)
    assert len({r["id"] for r in engine.events("Delivery")}) == 2000


def inject(port: int, count: int, sessions: int, acked: list[int], stop: threading.Event) -> list[threading.Thread]:
    """Sends numbered messages from several sessions; `acked` collects the numbers that got 250."""

    def session(first: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                for n in range(first, count, sessions):
                    if stop.is_set():
                        return
                    body = f"Subject: blast {n}\r\nX-Seq: {n}\r\n\r\nmessage {n}\r\n".encode()
                    client.sendmail("blast@example.net", [f"r{n}@dest.test"], body)
                    acked.append(n)
        except (smtplib.SMTPException, OSError):
            return

    threads = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
    for thread in threads:
        thread.start()
    return threads


def test_kill_minus_nine_mid_blast_loses_nothing_that_got_250(tmp_path: Path, sink: Sink, ports) -> None:
    engine = Engine(tmp_path, engine_config(sink, *ports)).start(list(ports[:2]))
    acked: list[int] = []
    stop = threading.Event()
    threads = inject(ports[0], 2000, 20, acked, stop)
    wait_for(lambda: len(acked) >= 700, 60, what="700 acknowledged messages")
    engine.kill()
    stop.set()
    for thread in threads:
        thread.join(15)
    acknowledged = set(acked)
    engine.start(list(ports[:2]))
    try:

        def arrived() -> Counter:
            return Counter(int(re.search(rb"X-Seq: (\d+)", eml).group(1)) for _, eml in sink.messages())

        wait_for(lambda: acknowledged <= set(arrived()), 60, what="every acknowledged message at the sink")
        counts = arrived()
        duplicates = sum(c - 1 for c in counts.values() if c > 1)
        lost = acknowledged - set(counts)
        print(f"acknowledged={len(acknowledged)} arrived={len(counts)} duplicates={duplicates} lost={len(lost)}")
        assert not lost
    finally:
        engine.stop()
