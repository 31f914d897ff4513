"""Event tallies (worker side) and the Prometheus registry they feed (supervisor side)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from engine.metrics import TOP_DOMAINS, EngineMetrics, EventTally, fine_bucket, fine_upper, quantile

T0 = 1_800_000_000.0


def record(kind: str, latency: float = 0.5, attempt: int = 1, **fields) -> dict:
    return {"type": kind, "created": T0, "timestamp": T0 + latency, "attempt": attempt, **fields}


@given(st.floats(min_value=0.0, max_value=1e5, allow_nan=False))
def test_fine_bucket_holds_its_value_within_ten_percent(seconds: float) -> None:
    index = fine_bucket(seconds)
    assert seconds <= fine_upper(index) * (1 + 1e-9)
    if index > 0:
        assert seconds > fine_upper(index - 1) * (1 - 1e-9)
        assert fine_upper(index) <= max(seconds, 0.001) * 1.1 * (1 + 1e-9)


@given(st.lists(st.floats(min_value=0.002, max_value=1e4, allow_nan=False), min_size=1, max_size=300))
def test_quantile_is_the_nearest_rank_within_a_bucket(samples: list[float]) -> None:
    counts: dict[int, int] = {}
    for seconds in samples:
        counts[fine_bucket(seconds)] = counts.get(fine_bucket(seconds), 0) + 1
    for q in (0.5, 0.99):
        exact = sorted(samples)[max(1, math.ceil(q * len(samples))) - 1]
        assert exact <= quantile(counts, q) * (1 + 1e-9) <= exact * 1.1 * (1 + 1e-6)
    assert quantile({}, 0.99) is None


def test_tally_counts_and_drains() -> None:
    tally = EventTally()
    tally({"type": "Reception", "recipients": ["a@x", "b@x"], "campaign": "spring", "created": T0, "timestamp": T0})
    tally(record("Delivery", 0.2, campaign="spring"))
    tally(record("TransientFailure", 0.3, response={"code": 451}))
    tally(record("Delivery", 40.0, attempt=2, campaign="spring"))
    tally(record("AdminBounce", 50.0, attempt=2))
    delta = tally.drain()
    assert delta["types"] == {"Reception": 1, "Delivery": 2, "TransientFailure": 1, "AdminBounce": 1}
    assert delta["received_recipients"] == 2
    assert delta["campaign_received"] == {"spring": 2} and delta["campaign_finished"] == {"spring": 2}
    assert delta["retries"] == {"451": 1}
    assert sum(delta["first_attempt"].values()) == 2, "only first attempts count towards the SLA"
    assert sum(delta["latency_buckets"]) == 2 and math.isclose(delta["latency_sum"], 40.2, abs_tol=1e-6)
    assert tally.drain()["types"] == {}


def test_registry_sums_lanes_and_bounds_destinations() -> None:
    metrics = EngineMetrics(["transactional", "bulk"])
    tally = EventTally()
    for latency in (0.02, 0.3, 7.0):
        tally(record("Delivery", latency))
    tally(record("Bounce"))
    metrics.add_tally("transactional", tally.drain())
    metrics.add_dns("bulk", {"hits": 3, "misses": 1, "inflight": 0})
    metrics.set_connections({"transactional": {"tx-1": 4}})
    rows = [
        {"lane": "bulk", "domain": f"d{n}.test", "queued": n + 1, "oldest_age": float(n)}
        for n in range(TOP_DOMAINS + 5)
    ]
    metrics.set_queues(rows)
    text = generate_latest(metrics.registry).decode()
    assert 'engine_messages_delivered_total{lane="transactional"} 3.0' in text
    assert 'engine_messages_delivered_total{lane="bulk"} 0.0' in text
    assert 'engine_messages_bounced_total{lane="transactional"} 1.0' in text
    assert 'engine_delivery_latency_seconds_bucket{lane="transactional",le="0.025"} 1.0' in text
    assert 'engine_delivery_latency_seconds_bucket{lane="transactional",le="10.0"} 3.0' in text
    assert 'engine_dns_lookups_total{lane="bulk",result="hits"} 3.0' in text
    assert 'engine_connections{egress="tx-1",lane="transactional"} 4.0' in text
    queue_lines = [line for line in text.splitlines() if line.startswith("engine_queue_messages{")]
    assert len(queue_lines) == TOP_DOMAINS + 1
    assert 'engine_queue_messages{domain="other",lane="bulk"} 15.0' in text
    assert 'engine_queue_oldest_seconds{lane="bulk"} 24.0' in text
    metrics.set_queues([])
    assert "engine_queue_messages{" not in generate_latest(metrics.registry).decode()
