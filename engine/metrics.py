"""Metrics derived from the event records, counted in each worker and summed per lane in the supervisor.

A worker's `EventTally` subscribes to its event log, so the log and the counters never disagree; the
supervisor drains the tallies over the control channel once a second and adds them to one Prometheus
registry. Latencies travel as bucket counts, not samples, so a busy lane costs the same to report as an
idle one. Destination labels are limited to the deepest queues, so label sets stay bounded.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client import Counter as PromCounter
from prometheus_client.core import HistogramMetricFamily

# Prometheus buckets of engine_delivery_latency_seconds (reception -> delivery).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
# Fine log-spaced buckets (10 % wide) for percentiles over the SLA window.
FINE_MIN = 0.001
FINE_FACTOR = 1.1
FINE_COUNT = 200  # up to ~190,000 s
_LOG_FACTOR = math.log(FINE_FACTOR)

TOP_DOMAINS = 20  # queue gauges per lane; the rest is summed as domain="other"
FINAL = frozenset({"Delivery", "Bounce", "Expiration", "AdminBounce", "Suppressed"})
ATTEMPTS = frozenset({"Delivery", "TransientFailure", "Bounce"})
FAILED = frozenset({"Bounce", "Expiration"})  # final failures that count against the success rate


def fine_bucket(seconds: float) -> int:
    """Index of the fine bucket holding `seconds`; bucket i covers (upper(i-1), upper(i)]."""
    if seconds <= FINE_MIN:
        return 0
    return min(FINE_COUNT - 1, math.ceil(math.log(seconds / FINE_MIN) / _LOG_FACTOR - 1e-9))


def fine_upper(index: int) -> float:
    return FINE_MIN * FINE_FACTOR**index


def quantile(counts: Mapping[int, int], q: float) -> float | None:
    """Nearest-rank quantile of fine bucket counts (the bucket's upper bound: at most 10 % high)."""
    total = sum(counts.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return fine_upper(index)
    return fine_upper(max(counts))


class EventTally:
    """Worker side: counts every record the event log emits until the supervisor drains them."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.types: Counter[str] = Counter()
        self.received_recipients = 0
        self.retries: Counter[str] = Counter()
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.first_attempt: Counter[int] = Counter()
        self.campaign_received: Counter[str] = Counter()
        self.campaign_finished: Counter[str] = Counter()

    def __call__(self, record: dict) -> None:
        kind = record["type"]
        self.types[kind] += 1
        if kind == "Reception":
            count = len(record.get("recipients") or ())
            self.received_recipients += count
            if record.get("campaign"):
                self.campaign_received[record["campaign"]] += count
            return
        created = record.get("created")
        latency = record["timestamp"] - created if created else None
        if kind == "Delivery" and latency is not None:
            self.latency_buckets[_coarse_bucket(latency)] += 1
            self.latency_sum += latency
        elif kind == "TransientFailure":
            response = record.get("response") or {}
            self.retries[str(response.get("code") or "none")] += 1
        if kind in ATTEMPTS and record.get("attempt") == 1 and latency is not None:
            self.first_attempt[fine_bucket(latency)] += 1
        if kind in FINAL and record.get("campaign"):
            self.campaign_finished[record["campaign"]] += 1

    def drain(self) -> dict:
        """Everything counted since the last drain, as msgpack-friendly data; starts a new count."""
        delta = {
            "types": dict(self.types),
            "received_recipients": self.received_recipients,
            "retries": dict(self.retries),
            "latency_buckets": self.latency_buckets,
            "latency_sum": self.latency_sum,
            "first_attempt": dict(self.first_attempt),
            "campaign_received": dict(self.campaign_received),
            "campaign_finished": dict(self.campaign_finished),
        }
        self._reset()
        return delta


def _coarse_bucket(seconds: float) -> int:
    """Index of the first Prometheus bucket whose bound is >= seconds (len(LATENCY_BUCKETS) = +Inf)."""
    return bisect.bisect_left(LATENCY_BUCKETS, seconds)


class _LatencyHistograms:
    """engine_delivery_latency_seconds{lane}, built from bucket counts the workers already summed."""

    def __init__(self, lanes: Iterable[str]) -> None:
        self.buckets = {lane: [0] * (len(LATENCY_BUCKETS) + 1) for lane in lanes}
        self.sums = dict.fromkeys(self.buckets, 0.0)

    def add(self, lane: str, buckets: list[int], total: float) -> None:
        mine = self.buckets.setdefault(lane, [0] * (len(LATENCY_BUCKETS) + 1))
        for index, count in enumerate(buckets[: len(mine)]):
            mine[index] += count
        self.sums[lane] = self.sums.get(lane, 0.0) + total

    def collect(self):
        family = HistogramMetricFamily(
            "engine_delivery_latency_seconds", "Reception to delivery, per lane", labels=["lane"]
        )
        for lane, counts in self.buckets.items():
            cumulative, running = [], 0
            for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric([lane], cumulative, self.sums[lane])
        yield family


class EngineMetrics:
    """Supervisor side: the Prometheus registry served at /metrics, fed from worker tallies and views."""

    def __init__(self, lanes: Iterable[str]) -> None:
        disable_created_metrics()  # the *_created series double the output and nobody graphs them
        self.lanes = list(lanes)
        self.registry = CollectorRegistry()
        registry = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("lane",)) -> PromCounter:
            return PromCounter(name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self.received = counter("engine_messages_received", "Messages accepted (one Reception record each)")
        self.received_recipients = counter("engine_recipients_received", "Recipients of accepted messages")
        self.delivered = counter("engine_messages_delivered", "Recipients delivered")
        self.deferred = counter("engine_messages_deferred", "Delivery attempts deferred for a retry")
        self.bounced = counter("engine_messages_bounced", "Recipients bounced, expired or bounced by an operator")
        self.events = counter("engine_events", "Event log records by type", ("lane", "type"))
        self.retries = counter("engine_retries", "Deferrals by SMTP reply code", ("lane", "code"))
        self.dns = counter("engine_dns_lookups", "MX resolver cache results", ("lane", "result"))
        self.queue = gauge(
            "engine_queue_messages", "Queued messages by destination (deepest queues)", ("lane", "domain")
        )
        self.queue_oldest = gauge("engine_queue_oldest_seconds", "Age of the oldest queued message", ("lane",))
        self.connections = gauge("engine_connections", "Open delivery sessions", ("lane", "egress"))
        self.spool_bytes = gauge("engine_spool_bytes", "Disk used by the lane's spools", ("lane",))
        self.workers = gauge("engine_workers", "Worker processes running", ("lane",))
        self.suspensions = gauge("engine_suspensions", "Active operator suspensions", ("lane",))
        self.latency = _LatencyHistograms(self.lanes)
        registry.register(self.latency)
        for lane in self.lanes:
            for metric in (self.received, self.received_recipients, self.delivered, self.deferred, self.bounced):
                metric.labels(lane)

    def add_tally(self, lane: str, delta: Mapping) -> None:
        types = delta.get("types", {})
        for kind, count in types.items():
            self.events.labels(lane, kind).inc(count)
        self.received.labels(lane).inc(types.get("Reception", 0))
        self.received_recipients.labels(lane).inc(delta.get("received_recipients", 0))
        self.delivered.labels(lane).inc(types.get("Delivery", 0))
        self.deferred.labels(lane).inc(types.get("TransientFailure", 0))
        self.bounced.labels(lane).inc(sum(types.get(kind, 0) for kind in ("Bounce", "Expiration", "AdminBounce")))
        for code, count in delta.get("retries", {}).items():
            self.retries.labels(lane, code).inc(count)
        self.latency.add(lane, delta.get("latency_buckets", []), delta.get("latency_sum", 0.0))

    def add_dns(self, lane: str, stats: Mapping[str, int]) -> None:
        for result in ("hits", "misses", "errors"):
            if stats.get(result):
                self.dns.labels(lane, result).inc(stats[result])

    def set_connections(self, by_lane: Mapping[str, Mapping[str, int]]) -> None:
        self.connections.clear()
        for lane, by_egress in by_lane.items():
            for egress, count in by_egress.items():
                self.connections.labels(lane, egress).set(count)

    def set_queues(self, queues: Iterable[Mapping]) -> None:
        """`queues`: merged rows with lane, domain, queued and oldest_age (see admin queue view)."""
        self.queue.clear()
        by_lane: dict[str, list[Mapping]] = {lane: [] for lane in self.lanes}
        for row in queues:
            by_lane.setdefault(row["lane"], []).append(row)
        for lane, rows in by_lane.items():
            rows.sort(key=lambda row: row["queued"], reverse=True)
            for row in rows[:TOP_DOMAINS]:
                self.queue.labels(lane, row["domain"]).set(row["queued"])
            if len(rows) > TOP_DOMAINS:
                self.queue.labels(lane, "other").set(sum(row["queued"] for row in rows[TOP_DOMAINS:]))
            self.queue_oldest.labels(lane).set(max((row["oldest_age"] for row in rows), default=0.0))
