"""The delivery side of a lane worker: from scheduled messages to delivery sessions and back to the spool.

A message with recipients at several domains becomes one scheduler item per domain, queued on an
(egress source, domain) queue. The scheduler holds only small fixed-size records; envelopes and bodies
stay in the spool until a delivery takes them. Each queue gets delivery runners in proportion to its
ready depth, up to the destination's connection limit, so a few messages use few connections.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from engine.bounces import BounceClassifier
from engine.config import Config, Egress, Lane
from engine.delivery import Attempt, Deliverer, Response
from engine.envelope import Envelope, Recipient, RecipientState
from engine.events import EventLog, message_record
from engine.resolver import Resolver
from engine.scheduler import Scheduler
from engine.shaping import LEASE, burst
from engine.spool import Spool, SpoolError
from engine.suppression import SuppressionList
from engine.suspensions import Suspension, Suspensions
from engine.throttle import ThrottleTable, throttle_key

log = logging.getLogger(__name__)

TICK = 0.05  # timer resolution for retries and expiry checks, seconds
EXPIRED = {"code": 551, "enhanced": "5.4.7", "text": "Message expired (max_age reached)"}


@dataclass(slots=True)
class _Item:
    key: bytes
    domain: str
    egress: str
    priority: int
    campaign: str | None
    tenant: str | None
    created: float
    expires: float  # monotonic


class _InFlight:
    """An envelope shared by the items of one message while any of them is being delivered, so their
    updates never overwrite each other."""

    __slots__ = ("envelope", "users")

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.users = 0


class Dispatcher:
    def __init__(
        self,
        config: Config,
        lane: Lane,
        spool: Spool,
        log: EventLog,
        deliverers: dict[str, Deliverer],
        *,
        throttle: ThrottleTable,
        worker_id: int = 0,
        capacity: int = 2_000_000,
    ) -> None:
        self._config = config
        self._lane = lane
        self._spool = spool
        self._log = log
        self.deliverers = deliverers
        self._throttle = throttle
        self._worker_id = worker_id
        self._throttle_keys: list[int] = []
        self._capacity = capacity
        self._scheduler = Scheduler(capacity * 2)  # headroom for messages accepted while `full` flipped
        self._items: dict[int, _Item] = {}
        self._item_ids = itertools.count(1)
        self._queues: dict[tuple[str, str], int] = {}
        self._queue_keys: list[tuple[str, str]] = []
        self._runners: list[int] = []
        self._in_flight: dict[bytes, _InFlight] = {}
        self._tags: dict[str, int] = {}
        self._shared_strings: dict[str, str] = {}  # one copy of each domain, campaign and tenant name
        self._egress_cycle = self._weighted_cycle(config.egress[name] for name in lane.egress_pool)
        self._egress_by_domain: dict[str, itertools.cycle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._suspensions = Suspensions()
        self._parked: dict[int, _Item] = {}
        self._timer: asyncio.Task | None = None
        self._stopping = False
        self.bounce_classifier = BounceClassifier.from_config(config)
        self.suppression: SuppressionList | None = None  # bulk lanes: recipients on it are not sent to

    # scheduling

    @property
    def full(self) -> bool:
        return len(self._items) >= self._capacity

    def schedule(self, key: bytes, envelope: Envelope) -> None:
        """Queues every destination of a message that still has pending recipients."""
        now_wall, now = time.time(), time.monotonic()
        expires = now + (envelope.created + self._lane.max_age - now_wall)
        for domain, recipients in envelope.pending_by_domain().items():
            due_wall = max(r.next_attempt for r in recipients)
            due = now + max(0.0, due_wall - now_wall)
            self._schedule_item(key, envelope, domain, due, expires)

    def _schedule_item(self, key: bytes, envelope: Envelope, domain: str, due: float, expires: float) -> None:
        egress = self._next_egress(domain)
        queue = self._queue(egress, domain)
        item = next(self._item_ids)
        now = time.monotonic()
        shared = self._shared_strings
        self._items[item] = _Item(
            key,
            shared.setdefault(domain, domain),
            egress,
            envelope.priority,
            envelope.campaign and shared.setdefault(envelope.campaign, envelope.campaign),
            envelope.tenant and shared.setdefault(envelope.tenant, envelope.tenant),
            envelope.created,
            expires,
        )
        ready = due <= now
        self._scheduler.schedule(
            item,
            queue,
            envelope.priority,
            0.0 if ready else due,
            expires,
            self._tag(envelope.campaign),
            self._tag(envelope.tenant),
        )
        if ready:
            self._wake(queue)

    def _tag(self, name: str | None) -> int:
        if name is None:
            return 0
        return self._tags.setdefault(name, len(self._tags) + 1)

    def _queue(self, egress: str, domain: str) -> int:
        queue = self._queues.get((egress, domain))
        if queue is None:
            queue = self._queues[(egress, domain)] = len(self._queue_keys)
            self._queue_keys.append((egress, domain))
            self._throttle_keys.append(throttle_key(egress, domain))
            self._runners.append(0)
        return queue

    @staticmethod
    def _weighted_cycle(pool) -> list[str]:
        return [egress.name for egress in pool for _ in range(max(1, egress.weight))]

    def _next_egress(self, domain: str) -> str:
        """Weighted round robin over the lane's egress sources, kept per destination."""
        cycle = self._egress_by_domain.get(domain)
        if cycle is None:
            offset = hash(domain) % len(self._egress_cycle)
            cycle = self._egress_by_domain[domain] = itertools.cycle(
                self._egress_cycle[offset:] + self._egress_cycle[:offset]
            )
        return next(cycle)

    # running

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().create_task(self._run_timers())

    async def stop(self, timeout: float = 30.0) -> None:
        """Lets deliveries in progress finish (up to `timeout`); what is left stays in the spool."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        for task in self._tasks:
            task.cancel()

    def reload(self, config: Config, lane: Lane) -> None:
        """New routes, shaping and retry schedule from now on; sessions and queued messages stay."""
        self._config = config
        self._lane = lane
        for deliverer in self.deliverers.values():
            deliverer.reload(config)
        self.bounce_classifier = BounceClassifier.from_config(config)

    async def _run_timers(self) -> None:
        renew_at = 0.0
        while True:
            now = time.monotonic()
            for queue in self._scheduler.advance(now):
                self._wake(queue)
            for item in self._scheduler.expired(now):
                self._expire(self._items.pop(item, None))
            if self._parked:
                self._check_parked(now)
            if now >= renew_at:
                self._throttle.renew(self._worker_id, now)
                renew_at = now + LEASE / 3
            await asyncio.sleep(TICK)

    def _wake(self, queue: int) -> None:
        if self._stopping:
            return
        domain = self._queue_keys[queue][1]
        limit = self._config.shaping_for(domain).connection_limit
        ready = self._scheduler.counts(queue)[0]
        while self._runners[queue] < min(limit, ready):
            self._runners[queue] += 1
            task = asyncio.get_running_loop().create_task(self._run_queue(queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_queue(self, queue: int) -> None:
        try:
            while not self._stopping and self._scheduler.counts(queue)[0]:
                await self._pace(queue)
                item = self._scheduler.pop(queue)
                if item < 0:
                    return
                target = self._items.pop(item)
                if self._suspensions and self._suspensions.matching(target.domain, target.campaign, target.tenant):
                    self._parked[item] = target
                    continue
                await self._deliver(target)
        finally:
            self._runners[queue] -= 1

    async def _pace(self, queue: int) -> None:
        """Waits until the lane-wide message rate towards this (egress, destination) allows one more."""
        rate = self._config.shaping_for(self._queue_keys[queue][1]).max_message_rate
        if rate is None:
            return
        key = self._throttle_keys[queue]
        while (wait := self._throttle.acquire(key, rate, burst(rate), time.monotonic())) > 0:
            await asyncio.sleep(wait)

    # delivering

    def _acquire(self, key: bytes) -> _InFlight | None:
        shared = self._in_flight.get(key)
        if shared is None:
            packed = self._spool.envelope(key)
            if packed is None:
                return None
            shared = self._in_flight[key] = _InFlight(Envelope.unpack(packed))
        shared.users += 1
        return shared

    def _release(self, key: bytes, shared: _InFlight) -> None:
        shared.users -= 1
        if shared.users == 0:
            del self._in_flight[key]

    async def _deliver(self, target: _Item) -> None:
        shared = self._acquire(target.key)
        if shared is None:
            return
        try:
            envelope = shared.envelope
            recipients = [r for r in envelope.pending() if r.domain == target.domain]
            body = self._spool.body(target.key)
            if not recipients or body is None:
                return
            if self.suppression is not None:
                recipients = self._drop_suppressed(target, envelope, recipients)
                if not recipients:
                    await self._persist(target.key, envelope)
                    return
            deliverer = self.deliverers[target.egress]
            attempt = await deliverer.deliver(target.domain, envelope.sender, [r.address for r in recipients], body)
            self._record_outcomes(target, envelope, recipients, attempt)
            await self._persist(target.key, envelope)
        finally:
            self._release(target.key, shared)

    def _drop_suppressed(self, target: _Item, envelope: Envelope, recipients: list[Recipient]) -> list[Recipient]:
        """Recipients suppressed since reception become final without an attempt, as Suppressed records."""
        kept = []
        for recipient in recipients:
            if not self.suppression.contains(recipient.address, envelope.tenant):
                kept.append(recipient)
                continue
            recipient.state = RecipientState.FAILED
            self._log.emit(
                message_record(
                    "Suppressed",
                    target.key,
                    envelope,
                    recipient=recipient.address,
                    domain=target.domain,
                    attempt=recipient.attempts,
                )
            )
        return kept

    def _record_outcomes(
        self, target: _Item, envelope: Envelope, recipients: Sequence[Recipient], attempt: Attempt
    ) -> None:
        now = time.time()
        retry_at = None
        egress = self._config.egress[target.egress]
        for recipient in recipients:
            response = attempt.responses[recipient.address]
            recipient.attempts += 1
            if response.success:
                recipient.state = RecipientState.DELIVERED
                event = "Delivery"
            elif response.permanent:
                recipient.state = RecipientState.FAILED
                event = "Bounce"
            else:
                delay = self._retry_delay(recipient.attempts)
                if now + delay >= envelope.created + self._lane.max_age:
                    recipient.state = RecipientState.FAILED
                    event = "Expiration"
                else:
                    recipient.next_attempt = now + delay
                    retry_at = recipient.next_attempt
                    event = "TransientFailure"
            self._log.emit(self._outcome_record(event, target, envelope, recipient, egress, attempt, response))
        if retry_at is not None:
            now_mono = time.monotonic()
            expires = now_mono + (envelope.created + self._lane.max_age - now)
            self._schedule_item(target.key, envelope, target.domain, now_mono + (retry_at - now), expires)

    def _retry_delay(self, attempts: int) -> float:
        intervals = self._lane.retry_intervals
        return intervals[min(attempts, len(intervals)) - 1]

    def _outcome_record(
        self,
        event: str,
        target: _Item,
        envelope: Envelope,
        recipient: Recipient,
        egress: Egress,
        attempt: Attempt,
        response: Response,
    ) -> dict:
        peer = attempt.peer
        record = message_record(
            event,
            target.key,
            envelope,
            recipient=recipient.address,
            domain=target.domain,
            attempt=recipient.attempts,
            egress_source=egress.name,
            peer={"host": peer.host, "address": peer.address} if peer else None,
            response={"code": response.code, "enhanced": response.enhanced, "text": response.text},
        )
        if event == "Expiration":
            record["bounce_class"] = "message-expired"
        elif event != "Delivery":
            record["bounce_class"] = self.bounce_classifier.classify(response.code, response.enhanced, response.text)
        return record

    def _expire(self, target: _Item | None) -> None:
        if target is not None:
            self._finish_in_background(target, "Expiration", EXPIRED)

    def _finish_in_background(self, target: _Item, event: str, response: dict) -> None:
        task = asyncio.get_running_loop().create_task(self._finish_item(target, event, response))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_item(self, target: _Item, event: str, response: dict) -> int:
        """Makes the item's pending recipients final without delivering (expiry, admin bounce)."""
        shared = self._acquire(target.key)
        if shared is None:
            return 0
        finished = 0
        try:
            envelope = shared.envelope
            for recipient in envelope.pending():
                if recipient.domain != target.domain:
                    continue
                recipient.state = RecipientState.FAILED
                finished += 1
                record = message_record(
                    event,
                    target.key,
                    envelope,
                    recipient=recipient.address,
                    domain=target.domain,
                    attempt=recipient.attempts,
                    egress_source=target.egress,
                    response=response,
                )
                if event == "Expiration":
                    record["bounce_class"] = "message-expired"
                self._log.emit(record)
            await self._persist(target.key, envelope)
        finally:
            self._release(target.key, shared)
        return finished

    # operator controls

    def suspend(
        self,
        rule_id: str,
        *,
        domain: str | None = None,
        campaign: str | None = None,
        tenant: str | None = None,
        until: float | None = None,
        reason: str = "",
    ) -> None:
        """Stops delivery of matching messages (they stay queued, and still expire) until resumed."""
        self._suspensions.add(Suspension(rule_id, domain and domain.lower(), campaign, tenant, until, reason))

    def resume(self, rule_id: str) -> None:
        if self._suspensions.remove(rule_id):
            self._release_parked()

    def suspensions(self) -> list[dict]:
        return [suspension.as_dict() for suspension in self._suspensions.all()]

    def _check_parked(self, now: float) -> None:
        if self._suspensions.expire():
            self._release_parked()
        for item, target in list(self._parked.items()):
            if target.expires <= now:
                del self._parked[item]
                self._expire(target)

    def _release_parked(self) -> None:
        """Parked items no longer suspended go back to their queues, due at once, priority kept."""
        for item, target in list(self._parked.items()):
            if self._suspensions.matching(target.domain, target.campaign, target.tenant):
                continue
            del self._parked[item]
            self._items[item] = target
            queue = self._queue(target.egress, target.domain)
            self._scheduler.schedule(
                item, queue, target.priority, 0.0, target.expires, self._tag(target.campaign), self._tag(target.tenant)
            )
            self._wake(queue)

    async def admin_bounce(
        self, *, domain: str | None = None, campaign: str | None = None, tenant: str | None = None, reason: str = ""
    ) -> int:
        """Queued (not in-flight) messages matching every selector given become AdminBounce records."""
        selector = Suspension("admin-bounce", domain and domain.lower(), campaign, tenant)
        response = {"code": 550, "enhanced": "5.7.1", "text": f"Bounced by operator: {reason}".strip()}
        chosen = [
            (item, target)
            for item, target in [*self._items.items(), *self._parked.items()]
            if selector.matches(target.domain, target.campaign, target.tenant)
        ]
        for item, _ in chosen:
            if self._items.pop(item, None) is not None:
                self._scheduler.remove(item)
            self._parked.pop(item, None)
        counts = await asyncio.gather(*(self._finish_item(target, "AdminBounce", response) for _, target in chosen))
        return sum(counts)

    async def _persist(self, key: bytes, envelope: Envelope) -> None:
        """Writes the new recipient states; the message leaves the spool with its last final recipient (without
        waiting for that commit: see Spool.discard)."""
        try:
            if envelope.finished:
                self._spool.discard(key)
            else:
                await self._spool.update(key, envelope.pack())
        except SpoolError as error:
            log.error(
                "spool update of %s failed: %s (the message will be retried after a restart)",
                key.hex(),
                error,
            )

    # views

    def queue_summary(self) -> list[dict]:
        """Per (egress, destination): ready, deferred (waiting for a retry), oldest age, suspended."""
        now = time.time()
        oldest: dict[tuple[str, str], float] = {}
        parked: dict[tuple[str, str], int] = {}
        for target in self._items.values():
            key = (target.egress, target.domain)
            oldest[key] = min(oldest.get(key, now), target.created)
        for target in self._parked.values():
            key = (target.egress, target.domain)
            oldest[key] = min(oldest.get(key, now), target.created)
            parked[key] = parked.get(key, 0) + 1
        summary = []
        for key, queue in self._queues.items():
            ready, waiting = self._scheduler.counts(queue)
            if not (ready or waiting or parked.get(key)):
                continue
            summary.append(
                {
                    "egress": key[0],
                    "domain": key[1],
                    "ready": ready,
                    "deferred": waiting,
                    "suspended": parked.get(key, 0),
                    "oldest_age": round(now - oldest.get(key, now), 3),
                }
            )
        return summary

    def connections(self) -> dict[str, dict[str, int]]:
        return {name: deliverer.connections() for name, deliverer in self.deliverers.items()}


def new_deliverers(
    config: Config, lane: Lane, resolver: Resolver, throttle: ThrottleTable, worker_id: int
) -> dict[str, Deliverer]:
    return {
        name: Deliverer(config, resolver, config.egress[name], throttle=throttle, worker_id=worker_id)
        for name in lane.egress_pool
    }
