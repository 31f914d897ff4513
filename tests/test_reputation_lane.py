"""The reputation guard across a lane of two workers: a campaign one worker suspends stops in both, and
resuming it by API releases it in both. `engine serve` as a real process, a real SMTP sink."""

from __future__ import annotations

import json
import smtplib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Engine, Sink, free_port, wait_for

RULE = "reputation:acme:xmas"
REFUSED = "550 5.1.1 no such user"


def config(sink: Sink, bulk: int, admin: int) -> str:
    return f"""
[engine]
hostname = "mta.test"
spool_dir = "spool"
log_dir = "logs"
secret = "reputation-lane-test"

[admin]
listen = "127.0.0.1:{admin}"

[routes]
"*" = "{sink.address}"

[[listeners]]
name = "bulk"
listen = "127.0.0.1:{bulk}"
lane = "bulk"

[lanes.bulk]
workers = 2
retry_intervals = ["1s"]
list_unsubscribe = {{ url = "https://mta.test/unsubscribe/{{token}}" }}

[shaping.default]
connection_limit = 1

[reputation]
window = "1h"
min_messages = 20
max_bounce_rate = "5%"
"""


@pytest.fixture
def lane(tmp_path: Path) -> Iterator[tuple[Engine, Sink, int, int]]:
    sink = Sink(tmp_path / "sink", reply=f"bad*@dest.test={REFUSED}")
    bulk, admin = free_port(), free_port()
    engine = Engine(tmp_path, config(sink, bulk, admin)).start([bulk, admin])
    try:
        yield engine, sink, bulk, admin
    finally:
        engine.stop()
        sink.stop()


def message(recipient: str, subject: str) -> bytes:
    return (
        f"From: news@example.net\r\nTo: {recipient}\r\nSubject: {subject}\r\nX-Engine-Campaign: xmas\r\n"
        f"X-Engine-Tenant: acme\r\n\r\nSeason's greetings.\r\n"
    ).encode()


def admin_call(admin: int, method: str, path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def receptions_by_worker(directory: Path) -> dict[str, int]:
    """Reception records per worker log (bulk-0, bulk-1)."""
    counts: dict[str, int] = {}
    for path in (directory / "logs").glob("bulk-*.jsonl"):
        worker = path.name.split(".")[0]
        for line in path.read_text().splitlines():
            if json.loads(line)["type"] == "Reception":
                counts[worker] = counts.get(worker, 0) + 1
    return counts


def delivered(sink: Sink, subject: str) -> set[str]:
    found = set()
    for envelope, data in sink.messages():
        if f"Subject: {subject}\r\n".encode() in data:
            found.update(envelope["recipients"])
    return found


def reputation_alerts(engine: Engine) -> list[dict]:
    return [record for record in engine.events("Alert") if record["rule"] == "reputation"]


def test_a_campaign_one_worker_suspends_stops_in_the_whole_lane(lane: tuple[Engine, Sink, int, int]) -> None:
    engine, sink, bulk, admin = lane
    first = [f"bad{n}@dest.test" for n in range(4)] + [f"good{n}@dest.test" for n in range(36)]
    with smtplib.SMTP("127.0.0.1", bulk, timeout=10) as client:  # one session: one worker
        for recipient in first:
            client.sendmail("news@example.net", [recipient], message(recipient, "first"))
    (alert,) = wait_for(lambda: reputation_alerts(engine), 20, what="reputation Alert")
    assert alert["suspension"] == RULE and alert["campaign"] == "xmas"
    wait_for(
        lambda: [r for r in admin_call(admin, "GET", "/api/v1/suspend")["suspensions"] if r["id"] == RULE],
        10,
        what="the rule in the supervisor",
    )

    later = [f"later{n}@dest.test" for n in range(30)]
    for recipient in later:  # one session each: the kernel spreads them over both workers
        with smtplib.SMTP("127.0.0.1", bulk, timeout=10) as client:
            client.sendmail("news@example.net", [recipient], message(recipient, "later"))
    by_worker = receptions_by_worker(engine.directory)
    assert len(by_worker) == 2, by_worker
    time.sleep(2.0)
    assert not delivered(sink, "later"), "a worker of the lane kept sending the suspended campaign"
    assert len(reputation_alerts(engine)) == 1

    assert admin_call(admin, "DELETE", f"/api/v1/suspend/{RULE}")["resumed"]
    wait_for(lambda: delivered(sink, "later") == set(later), 20, what="every later message after resume")
    assert delivered(sink, "first") == {r for r in first if r.startswith("good")}
