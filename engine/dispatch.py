"""The delivery side of a lane worker: from scheduled messages to delivery sessions and back to the spool.

A message with recipients at several domains becomes one scheduler item per domain, queued on an
(egress source, domain) queue. A waiting item is only the scheduler's fixed-size record (spool key,
creation time, priority, queue, campaign and tenant ids, due and expiry times): domain and egress come
from the queue id, campaign and tenant names from the tag ids, and envelopes and bodies stay in the spool
until a delivery takes them. Operator suspensions are scheduler holds, so suspended items stay there too.
Each queue gets delivery runners in proportion to its ready depth, up to the destination's connection
limit, so a few messages use few connections.

Recipients of one message at domains that one static route ([routes]) serves share a transaction, as
Postfix groups recipients per next hop: the runner that pops one of them takes along the message's items
for the other domains of that route that are ready on the same egress (scheduler.take; item ids derive
from (spool key, queue) so they can be found). Such a transaction is paced, pooled and shaped as the
domain that was popped; items stay per domain, so suspensions, admin bounces, retries and the event log
remain per domain. Domains resolved by MX are never grouped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from typing import NamedTuple

from engine.bounces import BounceClassifier
from engine.config import Config, Egress, Lane
from engine.delivery import Attempt, Deliverer
from engine.envelope import Envelope, Recipient, RecipientState, waiting_destinations
from engine.events import EventLog, message_record
from engine.resolver import Resolver
from engine.scheduler import Scheduler
from engine.shaping import LEASE, burst
from engine.smtp.client import Reply
from engine.spool import Spool, SpoolError
from engine.suppression import SuppressionList
from engine.suspensions import Suspension, Suspensions
from engine.throttle import ThrottleTable, throttle_key

log = logging.getLogger(__name__)

TICK = 0.05  # timer resolution for retries and expiry checks, seconds
_HASHED_IDS = (1 << 62) - 1  # item ids derived from (key, queue) ...
_COUNTED_IDS = 1 << 62  # ... and, on a collision, counted ones: never the same
EXPIRED = {"code": 551, "enhanced": "5.4.7", "text": "Message expired (max_age reached)"}


class _Target(NamedTuple):
    """What a delivery, an expiry or an admin bounce needs of a scheduler entry it took."""

    key: bytes
    domain: str
    egress: str


class _InFlight:
    """An envelope shared by the items of one message while any of them is being delivered, so their
    updates never overwrite each other."""

    __slots__ = ("envelope", "users")

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.users = 0


class _OutcomeRecords:
    """The records of one attempt's recipients. What they share (message fields, egress, peer, and a reply
    that several recipients got) is built once; every record gets its own dict, in message_record's order."""

    __slots__ = ("_base", "_egress", "_peer", "_responses")

    def __init__(self, target: _Target, envelope: Envelope, egress: Egress, attempt: Attempt) -> None:
        self._base = message_record("", target.key, envelope)
        self._egress = egress.name
        peer = attempt.peer
        self._peer = {"host": peer.host, "address": peer.address} if peer else None
        self._responses: dict[int, dict] = {}

    def record(self, event: str, recipient: Recipient, response: Reply) -> dict:
        shown = self._responses.get(id(response))
        if shown is None:
            shown = self._responses[id(response)] = {
                "code": response.code,
                "enhanced": response.enhanced,
                "text": response.text,
            }
        record = {
            **self._base,
            "recipient": recipient.address,
            "domain": recipient.domain,
            "attempt": recipient.attempts,
            "egress_source": self._egress,
            "peer": self._peer,
            "response": shown,
        }
        record["type"] = event
        return record


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
        self._item_ids = itertools.count(1)
        self._queues: dict[tuple[str, str], int] = {}
        self._queue_keys: list[tuple[str, str]] = []
        self._runners: list[int] = []
        self._in_flight: dict[bytes, _InFlight] = {}
        self._tags: dict[str, int] = {}
        self._hold_ids = itertools.count(1)
        self._holds: dict[str, list[int]] = {}  # suspension id -> its scheduler holds
        self._egress_cycle = self._weighted_cycle(config.egress[name] for name in lane.egress_pool)
        self._egress_by_domain: dict[str, itertools.cycle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._suspensions = Suspensions()
        self._timer: asyncio.Task | None = None
        self._stopping = False
        self.bounce_classifier = BounceClassifier.from_config(config)
        self.suppression: SuppressionList | None = None  # bulk lanes: recipients on it are not sent to

    # scheduling

    @property
    def full(self) -> bool:
        return len(self._scheduler) >= self._capacity

    def schedule(self, key: bytes, envelope: Envelope) -> None:
        """Queues every destination of a message that still has pending recipients."""
        destinations = {
            domain: max(r.next_attempt for r in recipients)
            for domain, recipients in envelope.pending_by_domain().items()
        }
        self._schedule_message(
            key, envelope.created, envelope.priority, envelope.campaign, envelope.tenant, destinations
        )

    def restore(self, key: bytes, packed: bytes) -> None:
        """schedule() for a spooled envelope at recovery, reading only what scheduling needs (no Envelope)."""
        self._schedule_message(key, *waiting_destinations(packed))

    def _schedule_message(
        self,
        key: bytes,
        created: float,
        priority: int,
        campaign: str | None,
        tenant: str | None,
        destinations: dict[str, float],
    ) -> None:
        now_wall, now = time.time(), time.monotonic()
        expires = now + (created + self._lane.max_age - now_wall)
        for domain, due_wall in destinations.items():
            due = now + max(0.0, due_wall - now_wall)
            self._schedule_item(key, created, priority, campaign, tenant, domain, due, expires)

    def _schedule_item(
        self,
        key: bytes,
        created: float,
        priority: int,
        campaign: str | None,
        tenant: str | None,
        domain: str,
        due: float,
        expires: float,
    ) -> None:
        egress = self._next_egress(domain)
        queue = self._queue(egress, domain)
        now = time.monotonic()
        ready = due <= now
        item = self._item_id(key, queue)
        if item in self._scheduler:
            item = next(self._item_ids) | _COUNTED_IDS
        self._scheduler.schedule(
            item,
            queue,
            priority,
            0.0 if ready else due,
            expires,
            self._tag(campaign),
            self._tag(tenant),
            key=key,
            created=created,
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
            for suspension in self._suspensions.all():
                if suspension.domain == domain:
                    self._hold(suspension, queue)
        return queue

    @staticmethod
    def _item_id(key: bytes, queue: int) -> int:
        return hash((key, queue)) & _HASHED_IDS

    def _target(self, entry: tuple) -> _Target:
        egress, domain = self._queue_keys[entry[1]]
        return _Target(entry[3], domain, egress)

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
            for entry in self._scheduler.expired_entries(now):
                self._expire(self._target(entry))
            if self._suspensions:
                for rule_id in self._suspensions.expire():
                    self._release(rule_id)
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
                entry = self._scheduler.pop_entry(queue)
                if entry is None:
                    return
                await self._deliver(self._target(entry))
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

    def _let_go(self, key: bytes, shared: _InFlight) -> None:
        shared.users -= 1
        if shared.users == 0:
            del self._in_flight[key]

    async def _deliver(self, target: _Target) -> None:
        shared = self._acquire(target.key)
        if shared is None:
            return
        try:
            envelope = shared.envelope
            pending = envelope.pending()
            recipients = [r for r in pending if r.domain == target.domain]
            body = self._spool.body(target.key)
            if not recipients or body is None:
                return
            recipients += self._take_along(target, pending)
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
            self._let_go(target.key, shared)

    def _take_along(self, target: _Target, pending: list[Recipient]) -> list[Recipient]:
        """The message's recipients at other domains behind the same static route whose items are ready on
        this egress: their items leave the scheduler, so this transaction carries them."""
        route = self._config.route_for(target.domain)
        if route is None:
            return []
        by_domain: dict[str, list[Recipient]] = {}
        for recipient in pending:
            if recipient.domain != target.domain:
                by_domain.setdefault(recipient.domain, []).append(recipient)
        taken: list[Recipient] = []
        for domain, recipients in by_domain.items():
            queue = self._queues.get((target.egress, domain))
            if queue is None or self._config.route_for(domain) != route:
                continue
            if self._scheduler.take(self._item_id(target.key, queue), target.key) is not None:
                taken += recipients
        return taken

    def _drop_suppressed(self, target: _Target, envelope: Envelope, recipients: list[Recipient]) -> list[Recipient]:
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
                    domain=recipient.domain,
                    attempt=recipient.attempts,
                )
            )
        return kept

    def _record_outcomes(
        self, target: _Target, envelope: Envelope, recipients: Sequence[Recipient], attempt: Attempt
    ) -> None:
        now = time.time()
        retries: dict[str, float] = {}  # domain -> when its deferred recipients are due
        outcome = _OutcomeRecords(target, envelope, self._config.egress[target.egress], attempt)
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
                    retries[recipient.domain] = max(retries.get(recipient.domain, 0.0), recipient.next_attempt)
                    event = "TransientFailure"
            record = outcome.record(event, recipient, response)
            if event == "Expiration":
                record["bounce_class"] = "message-expired"
            elif event != "Delivery":
                classify = self.bounce_classifier.classify
                record["bounce_class"] = classify(response.code, response.enhanced, response.text)
            self._log.emit(record)
        now_mono = time.monotonic()
        expires = now_mono + (envelope.created + self._lane.max_age - now)
        for domain, retry_at in retries.items():
            self._schedule_item(
                target.key,
                envelope.created,
                envelope.priority,
                envelope.campaign,
                envelope.tenant,
                domain,
                now_mono + (retry_at - now),
                expires,
            )

    def _retry_delay(self, attempts: int) -> float:
        intervals = self._lane.retry_intervals
        return intervals[min(attempts, len(intervals)) - 1]

    def _expire(self, target: _Target) -> None:
        self._finish_in_background(target, "Expiration", EXPIRED)

    def _finish_in_background(self, target: _Target, event: str, response: dict) -> None:
        task = asyncio.get_running_loop().create_task(self._finish_item(target, event, response))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_item(self, target: _Target, event: str, response: dict) -> int:
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
            self._let_go(target.key, shared)
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
        if rule_id in self._holds:
            self._release(rule_id)
        suspension = Suspension(rule_id, domain and domain.lower(), campaign, tenant, until, reason)
        self._suspensions.add(suspension)
        self._holds[rule_id] = []
        if suspension.domain is None:
            self._hold(suspension, -1)
            return
        for (_, queue_domain), queue in self._queues.items():
            if queue_domain == suspension.domain:
                self._hold(suspension, queue)

    def _hold(self, suspension: Suspension, queue: int) -> None:
        hold = next(self._hold_ids)
        self._holds[suspension.id].append(hold)
        self._scheduler.hold(hold, queue, self._tag(suspension.campaign), self._tag(suspension.tenant))

    def resume(self, rule_id: str) -> None:
        self._release(rule_id)

    def _release(self, rule_id: str) -> None:
        """Ends a suspension: what no other one holds goes back to its queue, due at once, priority kept."""
        self._suspensions.remove(rule_id)
        for hold in self._holds.pop(rule_id, []):
            for queue in self._scheduler.release(hold):
                self._wake(queue)

    def suspensions(self) -> list[dict]:
        return [suspension.as_dict() for suspension in self._suspensions.all()]

    async def admin_bounce(
        self, *, domain: str | None = None, campaign: str | None = None, tenant: str | None = None, reason: str = ""
    ) -> int:
        """Queued (not in-flight) messages matching every selector given become AdminBounce records."""
        queues = None
        if domain is not None:
            queues = {queue for (_, queue_domain), queue in self._queues.items() if queue_domain == domain.lower()}
        tags = [self._tags.get(name, -1) if name is not None else 0 for name in (campaign, tenant)]
        if queues == set() or -1 in tags:
            return 0
        response = {"code": 550, "enhanced": "5.7.1", "text": f"Bounced by operator: {reason}".strip()}
        chosen = [self._target(entry) for entry in self._scheduler.remove_matching(queues, *tags)]
        counts = await asyncio.gather(*(self._finish_item(target, "AdminBounce", response) for target in chosen))
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
        summary = []
        for queue, ready, waiting, parked, oldest in self._scheduler.summary():
            egress, domain = self._queue_keys[queue]
            summary.append(
                {
                    "egress": egress,
                    "domain": domain,
                    "ready": ready,
                    "deferred": waiting,
                    "suspended": parked,
                    "oldest_age": round(max(0.0, now - oldest), 3),
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
