"""SLA windows and alert rules (engine.sla), fed with tallies like the workers send, on a fake clock."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from aiohttp import web

from engine.config import AlertSettings, load_config
from engine.metrics import fine_bucket
from engine.sla import MIN_FINAL_OUTCOMES, SlaMonitor, Webhook

T0 = 1_800_000_000.0


def lanes(**changes: dict):
    config = load_config(None)
    return {name: dataclasses.replace(lane, **changes.get(name, {})) for name, lane in config.lanes.items()}


def tally(delivered: int = 0, bounced: int = 0, latencies: tuple[float, ...] = (), **extra) -> dict:
    first = {}
    for seconds in latencies:
        first[fine_bucket(seconds)] = first.get(fine_bucket(seconds), 0) + 1
    return {"types": {"Delivery": delivered, "Bounce": bounced}, "first_attempt": first, **extra}


@pytest.fixture
def alerts() -> list[dict]:
    return []


def monitor(alerts: list[dict], window: float = 60.0, **changes: dict) -> SlaMonitor:
    return SlaMonitor(lanes(**changes), AlertSettings(window=window), alerts.append)


def test_transactional_p99_above_sla_fires_p0_once_then_resolves(alerts) -> None:
    sla = monitor(alerts, window=10.0)
    sla.add("transactional", tally(delivered=99, latencies=(0.1,) * 99), T0)
    assert sla.evaluate(T0) == []
    sla.add("transactional", tally(delivered=2, latencies=(3.0, 3.0)), T0 + 1)
    (fired,) = sla.evaluate(T0 + 1)
    assert (fired["type"], fired["severity"], fired["rule"], fired["state"]) == ("Alert", "P0", "latency_p99", "firing")
    assert fired["value"] == pytest.approx(3.0, rel=0.1) and fired["threshold"] == 2.0
    assert sla.evaluate(T0 + 2) == [], "no repeat while it keeps firing"
    sla.add("transactional", tally(delivered=10, latencies=(0.1,) * 10), T0 + 12)
    (resolved,) = sla.evaluate(T0 + 12)
    assert resolved["state"] == "resolved" and resolved["alert"] == fired["id"]
    assert alerts == [fired, resolved]
    assert {key for key in fired} >= {"id", "lane", "timestamp", "created", "sender", "recipient", "campaign"}


def test_p99_at_the_sla_does_not_fire(alerts) -> None:
    sla = monitor(alerts)
    sla.add("transactional", tally(delivered=100, latencies=(0.5,) * 100), T0)
    sla.add("transactional", tally(latencies=(1.7,)), T0)
    assert sla.evaluate(T0) == []
    assert sla.lane_view("transactional", T0)["p99"] == pytest.approx(0.5, rel=0.1)


def test_bulk_lane_has_no_latency_rule(alerts) -> None:
    sla = monitor(alerts)
    sla.add("bulk", tally(delivered=5, latencies=(600.0,) * 5), T0)
    assert sla.evaluate(T0) == []


@pytest.mark.parametrize(("lane", "bounced", "severity"), [("transactional", 1, "P0"), ("bulk", 2, "P1")])
def test_success_rate_below_target(alerts, lane: str, bounced: int, severity: str) -> None:
    sla = monitor(alerts)
    sla.add(lane, tally(delivered=30, bounced=bounced), T0)
    (fired,) = sla.evaluate(T0)
    assert (fired["rule"], fired["severity"], fired["lane"]) == ("success_rate", severity, lane)
    assert fired["value"] == 30 / (30 + bounced)


def test_success_rate_thresholds_exactly(alerts) -> None:
    sla = monitor(alerts)
    sla.add("bulk", tally(delivered=95, bounced=5), T0)
    sla.add("transactional", tally(delivered=999, bounced=1), T0)
    assert sla.evaluate(T0) == [], "95 % and 99.9 % meet their targets"
    sla.add("bulk", tally(bounced=1), T0)
    sla.add("transactional", tally(bounced=1), T0)
    fired = {(a["lane"], a["severity"]) for a in sla.evaluate(T0)}
    assert fired == {("bulk", "P1"), ("transactional", "P0")}


def test_too_few_outcomes_say_nothing_about_success(alerts) -> None:
    sla = monitor(alerts)
    sla.add("transactional", tally(bounced=MIN_FINAL_OUTCOMES - 1), T0)
    assert sla.evaluate(T0) == []


def test_campaign_projected_past_its_completion_sla_fires_p1(alerts) -> None:
    sla = monitor(alerts, window=60.0, bulk={"sla_completion": 3600.0})
    sla.add("bulk", tally(campaign_received={"spring": 100_000, "small": 100}), T0)
    for second in range(1, 61):
        sla.add("bulk", tally(delivered=10, campaign_finished={"spring": 9, "small": 1}), T0 + second)
        changes = sla.evaluate(T0 + second)
        if changes:
            break
    (fired,) = changes
    assert (fired["severity"], fired["rule"], fired["campaign"]) == ("P1", "campaign_completion", "spring")
    assert fired["threshold"] == T0 + 3600.0 and fired["value"] > T0 + 3600.0
    assert "spring has" in fired["message"]
    view = sla.lane_view("bulk", T0 + second)
    assert view["campaigns"][0]["campaign"] == "spring" and view["alerts"] == [fired]


def test_campaign_on_pace_or_finished_is_quiet(alerts) -> None:
    sla = monitor(alerts, window=60.0, bulk={"sla_completion": 3600.0})
    sla.add("bulk", tally(campaign_received={"fast": 6000}), T0)
    for second in range(1, 121):
        sla.add("bulk", tally(campaign_finished={"fast": 50}), T0 + second)
        assert sla.evaluate(T0 + second) == []
    assert sla.lane_view("bulk", T0 + 120)["campaigns"][0]["remaining"] == 0


def test_stalled_campaign_fires_and_resolves_when_done(alerts) -> None:
    sla = monitor(alerts, window=20.0, bulk={"sla_completion": 600.0})
    sla.add("bulk", tally(campaign_received={"stuck": 10}), T0)
    assert sla.evaluate(T0 + 5) == [], "too early to judge"
    (fired,) = sla.evaluate(T0 + 11)
    assert fired["value"] is None and "finish never" in fired["message"]
    sla.add("bulk", tally(campaign_finished={"stuck": 10}), T0 + 12)
    (resolved,) = sla.evaluate(T0 + 12)
    assert resolved["state"] == "resolved"


def test_history_and_rate_for_the_dashboard(alerts) -> None:
    sla = monitor(alerts)
    for second in range(20):
        sla.add("transactional", tally(delivered=5, latencies=(0.2,) * 5), T0 + second)
        sla.evaluate(T0 + second)
    view = sla.lane_view("transactional", T0 + 19)
    assert view["rate"] == 5.0
    assert len(view["history"]) == 20 and view["history"][-1]["rate"] == 5.0
    assert view["success_rate"] == 1.0 and view["samples"] == 100


def test_webhook_retries_until_taken() -> None:
    async def scenario() -> tuple[list[dict], bool, bool]:
        received: list[dict] = []
        answers = iter([500, 503, 200, 500])

        async def hook(request: web.Request) -> web.Response:
            status = next(answers)
            if status == 200:
                received.append(await request.json())
            return web.Response(status=status)

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        webhook = Webhook(f"http://127.0.0.1:{port}/hook", attempts=3, backoff=0.05)
        taken = await webhook.deliver({"type": "Alert", "id": "a1"})
        once = Webhook(f"http://127.0.0.1:{port}/hook", attempts=1)
        gave_up = await once.deliver({"id": "a2"})
        await webhook.close()
        await once.close()
        await runner.cleanup()
        return received, taken, gave_up

    received, taken, gave_up = asyncio.run(scenario())
    assert taken and received == [{"type": "Alert", "id": "a1"}]
    assert gave_up is False
