"""Per-lane service levels over a sliding window, and the alerts raised when a lane misses them.

Inputs are the worker tallies (engine.metrics.EventTally), added once a second. Rules:
- latency: a lane with `sla_latency` whose p99 from reception to first delivery attempt is above it: P0;
- completion: a campaign in a lane with `sla_completion` whose projected end (remaining recipients at the
  current rate) passes its start plus `sla_completion`: P1;
- success rate: delivered / (delivered + bounced + expired) below 99.9 % (P0) on lanes with a latency SLA,
  below 95 % (P1) on the others.
An alert is an `Alert` record when the condition starts ("firing") and when it ends ("resolved"), also
POSTed as JSON to the optional webhook, retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp

from engine.config import AlertSettings, Lane
from engine.metrics import FAILED, quantile

log = logging.getLogger(__name__)

HISTORY_POINTS = 300  # per-second points kept for the dashboard
RATE_SPAN = 10.0  # throughput shown is averaged over this many seconds
SUCCESS_TARGETS = {"P0": 0.999, "P1": 0.95}
MIN_FINAL_OUTCOMES = 20  # fewer outcomes in the window say nothing about a success rate
MAX_CAMPAIGNS = 1000  # tracked per lane; finished ones are forgotten first

Emit = Callable[[dict], None]


@dataclass(slots=True)
class _Bin:
    second: int
    latencies: Counter[int] = field(default_factory=Counter)
    delivered: int = 0
    failed: int = 0
    finished: int = 0  # any final outcome, for throughput


class LaneWindow:
    """One-second bins of a lane's outcomes over the last `span` seconds."""

    def __init__(self, span: float) -> None:
        self.span = span
        self.bins: deque[_Bin] = deque()
        self.history: deque[dict] = deque(maxlen=HISTORY_POINTS)

    def add(self, now: float, delta: Mapping) -> None:
        second = int(now)
        if not self.bins or self.bins[-1].second != second:
            self.bins.append(_Bin(second))
        current = self.bins[-1]
        types = delta.get("types", {})
        current.latencies.update({int(k): v for k, v in delta.get("first_attempt", {}).items()})
        current.delivered += types.get("Delivery", 0)
        current.failed += sum(types.get(kind, 0) for kind in FAILED)
        current.finished += types.get("Delivery", 0) + sum(types.get(k, 0) for k in ("Bounce", "Expiration"))
        self.trim(now)

    def trim(self, now: float) -> None:
        while self.bins and self.bins[0].second <= now - self.span:
            self.bins.popleft()

    def latencies(self) -> Counter[int]:
        merged: Counter[int] = Counter()
        for b in self.bins:
            merged.update(b.latencies)
        return merged

    def rate(self, now: float) -> float:
        """Final outcomes per second over the last RATE_SPAN seconds."""
        span = min(RATE_SPAN, self.span)
        return sum(b.finished for b in self.bins if b.second > now - span) / span

    def outcomes(self) -> tuple[int, int]:
        return sum(b.delivered for b in self.bins), sum(b.failed for b in self.bins)


@dataclass(slots=True)
class _Campaign:
    started: float
    received: int = 0
    finished: int = 0
    recent: deque = field(default_factory=deque)  # (second, finished count)

    def remaining(self) -> int:
        return max(0, self.received - self.finished)


class SlaMonitor:
    """Keeps the windows of every lane and turns breaches into Alert records."""

    def __init__(self, lanes: Mapping[str, Lane], settings: AlertSettings, emit: Emit) -> None:
        self.lanes = dict(lanes)
        self.settings = settings
        self.emit = emit
        self.windows = {name: LaneWindow(settings.window) for name in self.lanes}
        self.campaigns: dict[str, dict[str, _Campaign]] = {name: {} for name in self.lanes}
        self.firing: dict[tuple[str, str, str | None], dict] = {}
        self.recent: deque[dict] = deque(maxlen=50)

    def add(self, lane: str, delta: Mapping, now: float | None = None) -> None:
        now = time.time() if now is None else now
        window = self.windows.get(lane)
        if window is None:
            return
        window.add(now, delta)
        campaigns = self.campaigns[lane]
        for name, count in delta.get("campaign_received", {}).items():
            campaigns.setdefault(name, _Campaign(now)).received += count
        for name, count in delta.get("campaign_finished", {}).items():
            campaign = campaigns.setdefault(name, _Campaign(now))
            campaign.finished += count
            campaign.recent.append((now, count))
        if len(campaigns) > MAX_CAMPAIGNS:
            for name in sorted(campaigns, key=lambda n: (campaigns[n].remaining() > 0, campaigns[n].started)):
                if len(campaigns) <= MAX_CAMPAIGNS:
                    break
                del campaigns[name]

    def evaluate(self, now: float | None = None) -> list[dict]:
        """Checks every rule; returns (and emits) the alerts that started or ended now."""
        now = time.time() if now is None else now
        changes: list[dict] = []
        for name, lane in self.lanes.items():
            window = self.windows[name]
            window.trim(now)
            latencies = window.latencies()
            p50, p99 = quantile(latencies, 0.5), quantile(latencies, 0.99)
            window.history.append({"t": round(now, 3), "rate": round(window.rate(now), 3), "p50": p50, "p99": p99})
            if lane.sla_latency is not None and p99 is not None:
                changes += self._check(
                    now,
                    name,
                    "latency_p99",
                    "P0",
                    None,
                    p99 > lane.sla_latency,
                    p99,
                    lane.sla_latency,
                    f"{name}: p99 reception to first attempt {p99:.2f}s is above the {lane.sla_latency:g}s SLA",
                )
            delivered, failed = window.outcomes()
            if delivered + failed >= MIN_FINAL_OUTCOMES:
                severity = "P0" if lane.sla_latency is not None else "P1"
                target, ratio = SUCCESS_TARGETS[severity], delivered / (delivered + failed)
                changes += self._check(
                    now,
                    name,
                    "success_rate",
                    severity,
                    None,
                    ratio < target,
                    ratio,
                    target,
                    f"{name}: {ratio:.2%} delivered over the last {self.settings.window:g}s, target {target:.1%}",
                )
            if lane.sla_completion is not None:
                for campaign, progress in self.campaigns[name].items():
                    changes += self._check_campaign(now, name, lane.sla_completion, campaign, progress)
        return changes

    def _check_campaign(self, now: float, lane: str, sla: float, name: str, progress: _Campaign) -> list[dict]:
        while progress.recent and progress.recent[0][0] <= now - self.settings.window:
            progress.recent.popleft()
        observed = min(self.settings.window, now - progress.started)
        remaining = progress.remaining()
        if remaining == 0 or observed < min(self.settings.window, sla) / 2:
            return self._check(now, lane, "campaign_completion", "P1", name, False, None, None, "")
        rate = sum(count for _, count in progress.recent) / max(observed, 1e-9)
        projected = now + remaining / rate if rate > 0 else math.inf
        deadline = progress.started + sla
        text = (
            f"{lane}: campaign {name} has {remaining} recipients left at {rate:.1f}/s; projected to finish "
            f"{'never' if math.isinf(projected) else time.strftime('%H:%M:%S', time.gmtime(projected))}, "
            f"after its {sla:g}s completion SLA ({time.strftime('%H:%M:%S', time.gmtime(deadline))} UTC)"
        )
        value = None if math.isinf(projected) else round(projected, 3)
        return self._check(now, lane, "campaign_completion", "P1", name, projected > deadline, value, deadline, text)

    def _check(
        self,
        now: float,
        lane: str,
        rule: str,
        severity: str,
        campaign: str | None,
        breached: bool,
        value: float | None,
        threshold: float | None,
        text: str,
    ) -> list[dict]:
        key = (lane, rule, campaign)
        active = self.firing.get(key)
        if breached and active is None:
            record = alert_record(lane, rule, severity, "firing", value, threshold, text, campaign, now)
            self.firing[key] = record
        elif not breached and active is not None:
            del self.firing[key]
            record = alert_record(
                lane, rule, severity, "resolved", value, threshold, f"resolved: {active['message']}", campaign, now
            )
            record["alert"] = active["id"]
        else:
            return []
        self.recent.append(record)
        self.emit(record)
        return [record]

    def lane_view(self, lane: str, now: float | None = None) -> dict:
        """What the dashboard and `engine top` show for a lane."""
        now = time.time() if now is None else now
        window = self.windows[lane]
        latencies = window.latencies()
        delivered, failed = window.outcomes()
        config = self.lanes[lane]
        return {
            "rate": round(window.rate(now), 3),
            "p50": quantile(latencies, 0.5),
            "p99": quantile(latencies, 0.99),
            "samples": sum(latencies.values()),
            "success_rate": delivered / (delivered + failed) if delivered + failed else None,
            "sla_latency": config.sla_latency,
            "sla_completion": config.sla_completion,
            "success_target": SUCCESS_TARGETS["P0" if config.sla_latency is not None else "P1"],
            "history": list(window.history),
            "campaigns": [
                {"campaign": name, "received": c.received, "finished": c.finished, "remaining": c.remaining()}
                for name, c in sorted(self.campaigns[lane].items(), key=lambda item: -item[1].remaining())[:10]
            ],
            "alerts": [record for key, record in self.firing.items() if key[0] == lane],
        }


def alert_record(
    lane: str,
    rule: str,
    severity: str,
    state: str,
    value: float | None,
    threshold: float | None,
    message: str,
    campaign: str | None,
    now: float,
) -> dict:
    """An `Alert` event record; message fields that do not apply are null, as in every record."""
    return {
        "type": "Alert",
        "id": uuid.uuid4().hex,
        "lane": lane,
        "severity": severity,
        "rule": rule,
        "state": state,
        "value": value,
        "threshold": threshold,
        "message": message,
        "sender": None,
        "recipient": None,
        "domain": None,
        "campaign": campaign,
        "tenant": None,
        "priority": None,
        "size": None,
        "created": now,
        "timestamp": now,
        "attempt": None,
    }


class Webhook:
    """POSTs alerts as JSON to a URL; each one is retried with exponential backoff until it is taken."""

    def __init__(self, url: str, *, attempts: int = 5, backoff: float = 1.0, timeout: float = 10.0) -> None:
        self.url = url
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()

    def send(self, record: dict) -> None:
        task = asyncio.get_running_loop().create_task(self.deliver(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, record: dict) -> bool:
        """True once the receiver answered 2xx; False after the last attempt failed."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                async with self._session.post(self.url, json=record) as response:
                    if 200 <= response.status < 300:
                        return True
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as error:
                problem = str(error) or type(error).__name__
            if attempt < self.attempts:
                log.warning("alert webhook %s: %s; retry %d in %.1fs", self.url, problem, attempt, delay)
                await asyncio.sleep(delay)
                delay *= 2
        log.error("alert webhook %s gave up after %d attempts: %s", self.url, self.attempts, problem)
        return False

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        if self._session is not None:
            await self._session.close()
