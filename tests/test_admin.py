"""Black-box tests of the admin API: `engine serve` for real, a recording sink or a tarpit as destination."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.control_plane import TOKEN, Admin, Tarpit, WebhookReceiver, recipients_at, send, start_engine
from tests.harness import Sink, wait_for

ENDPOINTS = [
    ("GET", "/api/v1/status", None),
    ("GET", "/api/v1/queues", None),
    ("GET", "/api/v1/overview", None),
    ("GET", "/api/v1/suspend", None),
    ("POST", "/api/v1/suspend", {"domain": "x.test", "reason": "r"}),
    ("DELETE", "/api/v1/suspend/abc", None),
    ("POST", "/api/v1/bounce", {"domain": "x.test", "reason": "r"}),
    ("GET", "/api/v1/suppression", None),
    ("POST", "/api/v1/suppression", {"address": "a@x.test"}),
    ("DELETE", "/api/v1/suppression", {"address": "a@x.test"}),
]


@pytest.fixture
def running(tmp_path: Path, sink: Sink):
    engine, admin, ports = start_engine(tmp_path, sink.address)
    yield engine, admin, ports
    if engine.process.poll() is None:
        engine.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    """One engine for the tests that leave no state behind that another test looks at."""
    directory = tmp_path_factory.mktemp("admin")
    engine, admin, ports = start_engine(directory, "127.0.0.1:9")
    yield engine, admin, ports
    engine.stop()


def test_every_api_endpoint_needs_the_bearer_token(shared) -> None:
    _, admin, _ = shared
    for method, path, body in ENDPOINTS:
        for token, reason in ((False, "missing bearer token"), ("wrong", "wrong bearer token")):
            status, answer = admin.call(method, path, body, token=token)
            assert (status, answer) == (401, {"error": reason}), (method, path)
    assert admin.call("GET", "/api/v1/suspend")[1] == {"suspensions": []}, "nothing changed without the token"
    status, text = admin.call("GET", "/metrics", token=False)
    assert status == 200 and "engine_messages_received_total" in text
    status, page = admin.call("GET", "/", token=False)
    assert status == 200 and "<title>engine dashboard</title>" in page


def test_status_lists_lanes_workers_listeners_and_spools(shared) -> None:
    engine, admin, ports = shared
    status = admin.ok("GET", "/api/v1/status")
    assert [lane["name"] for lane in status["lanes"]] == ["transactional", "bulk"]
    assert status["pid"] == engine.process.pid
    workers = {(w["lane"], w["index"]): w for w in status["workers"]}
    assert set(workers) == {("transactional", 0), ("bulk", 0)}
    for worker in workers.values():
        assert worker["alive"] and worker["pid"] > 0 and worker["restarts"] == 0
        os.kill(worker["pid"], 0)
    assert {(item["name"], item["listen"]) for item in status["listeners"]} == {
        ("tx", f"127.0.0.1:{ports[0]}"),
        ("bulk", f"127.0.0.1:{ports[1]}"),
    }
    assert set(status["spool"]) == {"transactional/0", "bulk/0"}
    wait_for(lambda: all(admin.ok("GET", "/api/v1/status")["spool"].values()), 10, what="both spools on disk")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "reason"),
    [
        ("POST", "/api/v1/suspend", {"domain": "x.test"}, 400, "reason is required"),
        ("POST", "/api/v1/suspend", {"lane": "nope", "reason": "r"}, 400, "unknown lane 'nope'"),
        ("POST", "/api/v1/suspend", {"domian": "x.test", "reason": "r"}, 400, "unknown field(s) domian"),
        ("POST", "/api/v1/suspend", {"domain": "x.test", "reason": "r", "duration": "soon"}, 400, "duration:"),
        ("POST", "/api/v1/suspend", {"domain": 5, "reason": "r"}, 400, "domain must be a non-empty string"),
        ("POST", "/api/v1/suspend", ["x"], 400, "must be a JSON object"),
        ("DELETE", "/api/v1/suspend/nosuch", None, 404, "no active suspension with id 'nosuch'"),
        ("POST", "/api/v1/bounce", {"reason": "r"}, 400, "refusing to bounce everything"),
        ("POST", "/api/v1/bounce", {"domain": "x.test"}, 400, "reason is required"),
        ("GET", "/api/v1/queues?lane=nope", None, 400, "unknown lane 'nope'"),
        ("POST", "/api/v1/suppression", {"address": "not-an-address"}, 400, "invalid address"),
        ("DELETE", "/api/v1/suppression", {"address": "a@x.test"}, 404, "a@x.test is not suppressed"),
        ("GET", "/api/v1/nothing", None, 404, "Not Found"),
        ("PUT", "/api/v1/status", None, 405, "Method Not Allowed"),
    ],
)
def test_bad_requests_get_json_errors_with_reasons(shared, method, path, body, status, reason) -> None:
    _, admin, _ = shared
    got, answer = admin.call(method, path, body)
    assert got == status
    assert reason in answer["error"]


def test_body_that_is_not_json_is_a_400(shared) -> None:
    _, admin, _ = shared
    status, answer = admin.call("POST", "/api/v1/suspend", raw=b"{domain: x")
    assert status == 400 and answer["error"].startswith("request body is not JSON")


def test_suspend_holds_delivery_until_resume_and_survives_restarts(tmp_path: Path, running, sink: Sink) -> None:
    engine, admin, ports = running
    rule = admin.ok("POST", "/api/v1/suspend", {"lane": "transactional", "domain": "held.test", "reason": "incident"})
    assert admin.ok("GET", "/api/v1/suspend")["suspensions"] == [rule]
    send(ports[0], ["a@held.test", "b@held.test"])
    send(ports[0], ["c@free.test"])
    send(ports[1], ["d@held.test"])  # the bulk lane is not suspended
    wait_for(lambda: {"c@free.test", "d@held.test"} <= set(recipients_at(sink)), 10, what="unsuspended mail")

    def held() -> list[dict]:
        return admin.ok("GET", "/api/v1/queues?domain=held.test")["queues"]

    wait_for(lambda: [(q["lane"], q["suspended"]) for q in held()] == [("transactional", 1)], 10)
    (row,) = held()
    assert (row["queued"], row["ready"], row["deferred"]) == (1, 0, 0)

    worker = next(w for w in admin.ok("GET", "/api/v1/status")["workers"] if w["lane"] == "transactional")
    os.kill(worker["pid"], signal.SIGKILL)
    wait_for(lambda: _restarted(admin, worker["pid"]), 20, what="transactional worker restarted")
    wait_for(lambda: [q["suspended"] for q in held()] == [1], 10, what="held again after the worker restart")

    engine.stop()
    engine.start(ports)
    assert admin.ok("GET", "/api/v1/suspend")["suspensions"] == [rule]
    wait_for(lambda: [q["suspended"] for q in held()] == [1], 10, what="held again after the engine restart")
    assert "a@held.test" not in recipients_at(sink)

    assert admin.ok("DELETE", f"/api/v1/suspend/{rule['id']}")["resumed"] is True
    wait_for(lambda: {"a@held.test", "b@held.test"} <= set(recipients_at(sink)), 10, what="delivery after resume")
    assert admin.ok("GET", "/api/v1/suspend")["suspensions"] == []


def _restarted(admin: Admin, old_pid: int) -> bool:
    worker = next(w for w in admin.ok("GET", "/api/v1/status")["workers"] if w["lane"] == "transactional")
    return worker["alive"] and worker["pid"] != old_pid and worker["restarts"] == 1


def test_suspension_with_duration_ends_by_itself(running, sink: Sink) -> None:
    engine, admin, ports = running
    asked = time.time()
    rule = admin.ok("POST", "/api/v1/suspend", {"domain": "brief.test", "duration": "3s", "reason": "short pause"})
    assert asked + 3 <= rule["until"] <= time.time() + 3  # from when the supervisor took it, however loaded
    send(ports[0], ["a@brief.test"])
    wait_for(lambda: engine.events("Delivery"), 10, what="delivery after the suspension ended")
    (delivery,) = engine.events("Delivery")
    assert recipients_at(sink) == ["a@brief.test"]
    assert delivery["timestamp"] >= rule["until"]
    assert admin.ok("GET", "/api/v1/suspend")["suspensions"] == []


def test_bounce_by_domain_turns_queued_messages_into_admin_bounces(running, sink: Sink) -> None:
    engine, admin, ports = running
    admin.ok("POST", "/api/v1/suspend", {"domain": "doomed.test", "reason": "hold them for the bounce"})
    send(ports[0], ["a@doomed.test", "b@doomed.test", "c@kept.test"])
    send(ports[1], ["d@doomed.test"])
    wait_for(lambda: sum(q["queued"] for q in admin.ok("GET", "/api/v1/queues")["queues"]) == 2, 10)
    answer = admin.ok("POST", "/api/v1/bounce", {"domain": "doomed.test", "reason": "domain retired"})
    assert answer == {"bounced": 3, "workers_unavailable": []}
    wait_for(lambda: len(engine.events("AdminBounce")) == 3, 5, what="AdminBounce records")
    bounces = engine.events("AdminBounce")
    assert sorted(r["recipient"] for r in bounces) == ["a@doomed.test", "b@doomed.test", "d@doomed.test"]
    assert {r["lane"] for r in bounces} == {"transactional", "bulk"}
    assert all("domain retired" in r["response"]["text"] for r in bounces)
    assert admin.ok("GET", "/api/v1/queues")["queues"] == []
    wait_for(lambda: recipients_at(sink) == ["c@kept.test"], 5)
    assert admin.ok("POST", "/api/v1/bounce", {"lane": "bulk", "domain": "kept.test", "reason": "x"})["bounced"] == 0


def test_metrics_count_per_lane(running, sink: Sink) -> None:
    _, admin, ports = running
    send(ports[0], ["a@dest.test", "b@dest.test"])
    send(ports[1], ["c@dest.test"])
    wait_for(lambda: len(recipients_at(sink)) == 3, 10)

    def value(text: str, name: str, lane: str) -> float | None:
        found = re.search(rf'^{name}{{lane="{lane}"}} (\S+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else None

    def counted() -> str | None:
        text = admin.call("GET", "/metrics", token=False)[1]
        return text if value(text, "engine_messages_delivered_total", "bulk") == 1 else None

    text = wait_for(counted, 10, what="deliveries in the metrics")
    assert value(text, "engine_messages_received_total", "transactional") == 1
    assert value(text, "engine_recipients_received_total", "transactional") == 2
    assert value(text, "engine_messages_delivered_total", "transactional") == 2
    assert value(text, "engine_delivery_latency_seconds_count", "transactional") == 2
    assert value(text, "engine_workers", "bulk") == 1
    assert 'engine_delivery_latency_seconds_bucket{lane="transactional",le="+Inf"} 2.0' in text
    assert 'engine_connections{egress="default",lane="transactional"}' in text
    assert "_created" not in text


def test_suppression_add_list_get_remove(shared) -> None:
    _, admin, _ = shared
    answer = admin.ok("POST", "/api/v1/suppression", {"addresses": ["A@x.test", "b@x.test"], "tenant": "acme"})
    assert answer == {"added": 2, "already": 0}
    assert admin.ok("POST", "/api/v1/suppression", {"address": "a@x.test", "tenant": "acme"})["already"] == 1
    listed = admin.ok("GET", "/api/v1/suppression?tenant=acme")
    assert listed["count"] == 2
    assert [(e["address"], e["tenant"]) for e in listed["suppressions"]] == [("a@x.test", "acme"), ("b@x.test", "acme")]
    assert admin.ok("GET", "/api/v1/suppression?address=a@x.test&tenant=acme")["reason"] == "added by operator"
    assert admin.call("GET", "/api/v1/suppression?address=a@x.test")[0] == 404
    assert admin.ok("DELETE", "/api/v1/suppression?address=a@x.test&tenant=acme")["removed"] == "a@x.test"
    assert admin.ok("GET", "/api/v1/suppression")["count"] == 1


def test_tarpitting_destination_raises_a_p0_alert_and_calls_the_webhook(tmp_path: Path) -> None:
    tarpit = Tarpit(delay=1.5)
    webhook = WebhookReceiver(failures=1)
    extra = f'\n[alerts]\nwindow = "30s"\nwebhook = "{webhook.url}"\n'
    engine, admin, ports = start_engine(tmp_path, tarpit.address, extra=extra, tx='sla_latency = "500ms"')
    try:
        send(ports[0], ["slow@tarpit.test"])
        wait_for(lambda: engine.events("Alert"), 15, what="an Alert record")
        (alert,) = engine.events("Alert")
        assert (alert["severity"], alert["rule"], alert["state"], alert["lane"]) == (
            "P0",
            "latency_p99",
            "firing",
            "transactional",
        )
        assert alert["value"] > alert["threshold"] == 0.5
        assert "transactional: p99" in alert["message"]
        wait_for(lambda: webhook.bodies, 10, what="the alert at the webhook (after one retry)")
        assert webhook.posts == 2 and webhook.bodies[0]["id"] == alert["id"]
        overview = admin.ok("GET", "/api/v1/overview")
        assert overview["alerts"][0]["id"] == alert["id"]
        lane = next(lane for lane in overview["lanes"] if lane["name"] == "transactional")
        assert lane["p99"] > 0.5 and lane["alerts"][0]["rule"] == "latency_p99"
        assert tarpit.messages == 1
    finally:
        engine.stop()
        tarpit.stop()
        webhook.stop()


def test_no_token_configured_leaves_the_api_open(tmp_path: Path, sink: Sink) -> None:
    engine, _, ports = start_engine(tmp_path, sink.address)
    try:
        engine.stop()
        engine.config_path.write_text(engine.config_path.read_text().replace(f'token = "{TOKEN}"\n', ""))
        engine.start(ports)
        assert Admin(ports[2], token=None).call("GET", "/api/v1/status")[0] == 200
    finally:
        engine.stop()
