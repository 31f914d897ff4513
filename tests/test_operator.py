"""The operator commands (`engine queues|suspend|resume|bounce|suppress|top`) against a running engine."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from engine.operator import human_duration, render_top
from tests.control_plane import TOKEN, recipients_at, send, start_engine
from tests.harness import Sink, engine_command, free_port, wait_for


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("operator")
    sink = Sink(directory / "sink")
    engine, admin, ports = start_engine(directory, sink.address)
    yield engine, admin, ports, sink
    engine.stop()
    sink.stop()


def engine_cli(admin_url: str, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    command = engine_command(args[0], "--admin", admin_url, *(["--token", token] if token else []), *args[1:])
    env = {k: v for k, v in os.environ.items() if k not in ("ENGINE_ADMIN_URL", "ENGINE_ADMIN_TOKEN")}
    return subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)


def test_suspend_queues_resume_bounce_round_trip(running) -> None:
    engine, admin, ports, sink = running
    done = engine_cli(admin.base, "suspend", "--domain", "ops.test", "--reason", "mx broken", "--duration", "1h")
    assert done.returncode == 0, done.stderr
    rule_id = done.stdout.strip().removeprefix("suspended: ")
    listed = engine_cli(admin.base, "suspend", "--list").stdout.splitlines()
    assert listed[0].split() == ["ID", "LANE", "DOMAIN", "CAMPAIGN", "TENANT", "ENDS", "IN", "REASON"]
    assert listed[1].split()[:5] == [rule_id, "*", "ops.test", "*", "*"] and listed[1].endswith("mx broken")

    send(ports[0], ["a@ops.test"])
    send(ports[1], ["b@ops.test"])
    wait_for(lambda: len(admin.ok("GET", "/api/v1/queues")["queues"]) == 2, 10, what="two queues held")
    rows = engine_cli(admin.base, "queues").stdout.splitlines()
    assert rows[0].split() == ["LANE", "DOMAIN", "QUEUED", "READY", "DEFERRED", "SUSPENDED", "OLDEST"]
    assert sorted(row.split()[:6] for row in rows[1:]) == [
        ["bulk", "ops.test", "1", "0", "0", "1"],
        ["transactional", "ops.test", "1", "0", "0", "1"],
    ]
    only_bulk = engine_cli(admin.base, "queues", "--lane", "bulk", "--json")
    assert '"lane": "bulk"' in only_bulk.stdout and "transactional" not in only_bulk.stdout

    bounced = engine_cli(admin.base, "bounce", "--lane", "bulk", "--domain", "ops.test", "--reason", "give up")
    assert bounced.stdout.strip() == "bounced 1 recipients"
    wait_for(lambda: engine.events("AdminBounce"), 5)
    assert engine_cli(admin.base, "resume", rule_id).stdout.strip() == f"resumed: {rule_id}"
    wait_for(lambda: "a@ops.test" in recipients_at(sink), 10, what="delivery after resume")
    assert "b@ops.test" not in recipients_at(sink)
    assert engine_cli(admin.base, "queues").stdout.strip() == "no queued messages"


def test_suppress_add_list_remove(running) -> None:
    _, admin, _, _ = running
    added = engine_cli(admin.base, "suppress", "add", "x@s.test", "y@s.test", "--tenant", "acme", "--reason", "asked")
    assert added.stdout.strip() == "added 2, already suppressed 0"
    listed = engine_cli(admin.base, "suppress", "list", "--tenant", "acme").stdout.splitlines()
    assert [line.split() for line in listed] == [
        ["ADDRESS", "TENANT", "REASON"],
        ["x@s.test", "acme", "asked"],
        ["y@s.test", "acme", "asked"],
        ["2", "in", "total"],
    ]
    assert engine_cli(admin.base, "suppress", "remove", "x@s.test", "--tenant", "acme").returncode == 0
    again = engine_cli(admin.base, "suppress", "remove", "x@s.test", "--tenant", "acme")
    assert again.returncode == 1
    assert again.stderr.strip() == "engine suppress: HTTP 404: x@s.test is not suppressed for tenant acme"


def test_top_draws_the_lanes(running) -> None:
    _, admin, ports, sink = running
    send(ports[0], ["top@dest.test"])
    wait_for(lambda: "top@dest.test" in recipients_at(sink), 10)
    wait_for(lambda: admin.ok("GET", "/api/v1/overview")["lanes"][0]["p99"] is not None, 10)
    frame = engine_cli(admin.base, "top", "--once").stdout.splitlines()
    assert frame[0].startswith("engine top - mta.test - ")
    header = frame[2].split()
    assert header == ["LANE", "WORKERS", "MSGS/S", "P50", "P99", "SLA", "SUCCESS", "QUEUED", "ALERTS"]
    transactional = frame[3].split()
    assert transactional[:2] == ["transactional", "1/1"] and transactional[5] == "2.00s"
    assert transactional[6] == "100.0%"
    assert frame[4].split()[:2] == ["bulk", "1/1"]
    live = engine_cli(admin.base, "top", "--count", "2", "--interval", "0.1")
    assert live.returncode == 0 and live.stdout.count("\x1b[H\x1b[2J") == 2


def test_errors_say_what_went_wrong(running) -> None:
    _, admin, _, _ = running
    denied = engine_cli(admin.base, "queues", token="wrong")
    assert (denied.returncode, denied.stderr.strip()) == (1, "engine queues: HTTP 401: wrong bearer token")
    missing = engine_cli(admin.base, "suspend", "--domain", "x.test")
    assert missing.stderr.strip() == "engine suspend: --reason is required (it is logged with the suspension)"
    bad_lane = engine_cli(admin.base, "bounce", "--lane", "nope", "--reason", "r")
    assert bad_lane.stderr.strip() == "engine bounce: HTTP 400: unknown lane 'nope'; lanes: transactional, bulk"
    nobody = engine_cli(f"http://127.0.0.1:{free_port()}", "queues")
    assert nobody.returncode == 1 and "cannot reach the admin API at http://127.0.0.1:" in nobody.stderr


def test_render_top_without_a_server() -> None:
    now = time.time()
    overview = {
        "time": now,
        "hostname": "mta.example",
        "lanes": [
            {
                "name": "transactional",
                "workers": {"alive": 2, "configured": 2},
                "rate": 41.25,
                "p50": 0.012,
                "p99": 3.5,
                "sla_latency": 2.0,
                "success_rate": 0.9996,
                "queued": 7,
                "alerts": [{"severity": "P0"}],
                "destinations": [
                    {
                        "lane": "transactional",
                        "domain": "gmail.com",
                        "queued": 7,
                        "ready": 5,
                        "deferred": 2,
                        "suspended": 0,
                        "oldest_age": 95.0,
                    }
                ],
            }
        ],
        "suspensions": [],
        "alerts": [{"timestamp": now, "severity": "P0", "state": "firing", "message": "p99 too high"}],
    }
    lines = render_top(overview).splitlines()
    assert lines[3].split() == ["transactional", "2/2", "41.2", "12ms", "3.50s", "2.00s", "100.0%", "7", "P0"]
    assert lines[7].split() == ["transactional", "gmail.com", "7", "5", "2", "0", "1.6m"]
    assert lines[-1].endswith("P0 firing   p99 too high")
    assert all(len(line) <= 40 for line in render_top(overview, width=40).splitlines())


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.0042, "4ms"), (1.5, "1.50s"), (90, "1.5m"), (7200, "2.0h"), (3 * 86400, "3.0d")],
)
def test_human_duration(seconds: float | None, text: str) -> None:
    assert human_duration(seconds) == text


def test_top_of_an_empty_engine_says_so(tmp_path: Path) -> None:
    engine, admin, _ = start_engine(tmp_path, "127.0.0.1:9")
    try:
        frame = engine_cli(admin.base, "top", "--once").stdout
        assert "(queues empty)" in frame and "RECENT ALERTS" not in frame
    finally:
        engine.stop()
