"""The dispatcher on a real spool, event log, scheduler and SMTP sink: suspensions are scheduler holds
(suspended messages stay queued, still expire, come back at once with their priority), admin bounce finds
queued and suspended items, and recovery's lean path schedules exactly what schedule() does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from engine.config import load_config
from engine.dispatch import Dispatcher, new_deliverers
from engine.envelope import Envelope, Recipient, new_message_id
from engine.events import EventLog, read_events
from engine.resolver import Resolver
from engine.spool import Spool
from engine.throttle import ThrottleTable
from tests.harness import Sink

BODY = b"Subject: t\r\nFrom: <s@sender.test>\r\n\r\nhello\r\n"
CONFIG = """
[engine]
hostname = "mta.test"
spool_dir = "spool"
log_dir = "logs"

[routes]
"*" = "{sink}"

[egress.tx-1]
source_address = "127.0.0.1"

[shaping.default]
connection_limit = 1

[lanes.transactional]
egress_pool = ["tx-1"]
max_age = "1h"
"""


class Rig:
    def __init__(self, directory: Path, sink: str) -> None:
        directory.mkdir(exist_ok=True)
        (directory / "engine.toml").write_text(CONFIG.format(sink=sink))
        self.config = load_config(directory / "engine.toml")
        self.lane = self.config.lanes["transactional"]
        self.logs = directory / "logs"
        self.spool = Spool(directory / "spool")
        self.events = EventLog(self.logs, "test")
        resolver = Resolver([("127.0.0.1", 9)], timeout=1.0)
        throttle = ThrottleTable.create()
        deliverers = new_deliverers(self.config, self.lane, resolver, throttle, 0)
        self.dispatcher = Dispatcher(self.config, self.lane, self.spool, self.events, deliverers, throttle=throttle)

    async def inject(
        self,
        domains: list[str],
        *,
        priority: int = 5,
        campaign: str | None = None,
        created: float | None = None,
        next_attempt: float = 0.0,
    ) -> bytes:
        key = new_message_id()
        recipients = [Recipient(f"user@{domain}", next_attempt=next_attempt) for domain in domains]
        envelope = Envelope("s@sender.test", recipients, "transactional", created or time.time(), len(BODY))
        envelope.priority, envelope.campaign = priority, campaign
        await self.spool.store(key, envelope.pack(), BODY)
        self.dispatcher.schedule(key, envelope)
        return key

    def outcomes(self, *types: str) -> list[dict]:
        self.events.flush()
        return read_events(self.logs, types)

    async def wait(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not reached in time"
            await asyncio.sleep(0.02)


@pytest.fixture
def with_rig(tmp_path: Path, sink: Sink) -> Callable[[Callable[[Rig], Awaitable[None]]], None]:
    """Runs a scenario (bounded in time) against a started dispatcher on uvloop, then shuts it down."""

    async def main(scenario: Callable[[Rig], Awaitable[None]]) -> None:
        rig = Rig(tmp_path, sink.address)
        rig.dispatcher.start()
        try:
            await asyncio.wait_for(scenario(rig), 30)
        finally:
            await rig.dispatcher.stop(5.0)
            for deliverer in rig.dispatcher.deliverers.values():
                await deliverer.close()
            await rig.spool.close()
            rig.events.close()

    return lambda scenario: uvloop.run(main(scenario))


def summary(dispatcher: Dispatcher) -> dict[str, tuple[int, int, int]]:
    return {row["domain"]: (row["ready"], row["deferred"], row["suspended"]) for row in dispatcher.queue_summary()}


def test_suspended_destination_stays_queued_and_resume_keeps_priority(with_rig) -> None:
    async def scenario(rig: Rig) -> None:
        rig.dispatcher.suspend("r1", domain="A.test")
        for priority in (9, 9, 0):
            await rig.inject(["a.test"], priority=priority)
        await rig.inject(["b.test"])
        await rig.wait(lambda: summary(rig.dispatcher).get("a.test") == (0, 0, 3))
        await rig.wait(lambda: len(rig.outcomes("Delivery")) == 1)
        assert [s["id"] for s in rig.dispatcher.suspensions()] == ["r1"]
        rig.dispatcher.resume("r1")
        await rig.wait(lambda: len(rig.outcomes("Delivery")) == 4)
        delivered = [(e["domain"], e["priority"]) for e in rig.outcomes("Delivery")]
        assert delivered == [("b.test", 5), ("a.test", 0), ("a.test", 9), ("a.test", 9)]
        assert summary(rig.dispatcher) == {}

    with_rig(scenario)


def test_recipients_behind_one_route_share_a_transaction_unless_held(with_rig, sink: Sink) -> None:
    async def scenario(rig: Rig) -> None:
        rig.dispatcher.suspend("c", domain="c.test")
        await rig.inject(["a.test", "b.test", "c.test", "d.test"])
        await rig.wait(lambda: len(rig.outcomes("Delivery")) == 3)
        (envelope, _), *others = sink.messages()
        assert not others
        assert sorted(envelope["recipients"]) == ["user@a.test", "user@b.test", "user@d.test"]
        assert sorted(e["domain"] for e in rig.outcomes("Delivery")) == ["a.test", "b.test", "d.test"]
        assert summary(rig.dispatcher) == {"c.test": (0, 0, 1)}
        rig.dispatcher.resume("c")
        await rig.wait(lambda: len(rig.outcomes("Delivery")) == 4)
        transactions = sorted(sorted(envelope["recipients"]) for envelope, _ in sink.messages())
        assert transactions == [["user@a.test", "user@b.test", "user@d.test"], ["user@c.test"]]

    with_rig(scenario)


def test_a_suspension_covers_queues_created_after_it(with_rig) -> None:
    async def scenario(rig: Rig) -> None:
        rig.dispatcher.suspend("late", domain="new.test", campaign="spring")
        await rig.inject(["new.test"], campaign="spring")
        await rig.inject(["new.test"], campaign="autumn")
        await rig.wait(lambda: summary(rig.dispatcher).get("new.test") == (0, 0, 1))
        await rig.wait(lambda: len(rig.outcomes("Delivery")) == 1)
        assert rig.outcomes("Delivery")[0]["campaign"] == "autumn"

    with_rig(scenario)


def test_suspended_messages_still_expire(with_rig) -> None:
    async def scenario(rig: Rig) -> None:
        rig.dispatcher.suspend("all")
        await rig.inject(["a.test"], created=time.time() - 3600 + 2.0)
        await rig.wait(lambda: summary(rig.dispatcher).get("a.test") == (0, 0, 1))
        await rig.wait(lambda: len(rig.outcomes("Expiration")) == 1)
        assert summary(rig.dispatcher) == {}
        assert not rig.outcomes("Delivery")

    with_rig(scenario)


def test_admin_bounce_takes_queued_and_suspended_items_that_match(with_rig) -> None:
    async def scenario(rig: Rig) -> None:
        rig.dispatcher.suspend("c", campaign="spring")
        await rig.inject(["a.test", "b.test"], campaign="spring")
        await rig.inject(["c.test"], campaign="spring", next_attempt=time.time() + 600)
        await rig.wait(lambda: summary(rig.dispatcher).get("b.test") == (0, 0, 1))
        assert summary(rig.dispatcher)["c.test"] == (0, 1, 0)
        assert await rig.dispatcher.admin_bounce(campaign="nobody") == 0
        assert await rig.dispatcher.admin_bounce(domain="z.test") == 0
        assert await rig.dispatcher.admin_bounce(domain="A.TEST", campaign="spring") == 1
        assert await rig.dispatcher.admin_bounce(campaign="spring", reason="bad list") == 2
        bounced = rig.outcomes("AdminBounce")
        assert sorted(e["domain"] for e in bounced) == ["a.test", "b.test", "c.test"]
        assert bounced[-1]["response"]["text"] == "Bounced by operator: bad list"
        assert summary(rig.dispatcher) == {}
        await rig.wait(lambda: rig.spool.stats()["messages"] == 0)

    with_rig(scenario)


def test_restore_schedules_what_schedule_does(tmp_path: Path) -> None:
    async def scenario() -> None:
        later = time.time() + 600
        envelopes = [
            Envelope("s@x.test", [Recipient("a@one.test", next_attempt=later)], "transactional", time.time() - 5, 1),
            Envelope(
                "s@x.test",
                [
                    Recipient("a@one.test", next_attempt=later),
                    Recipient("b@One.test", next_attempt=later + 60),
                    Recipient("c@two.test", state=1, next_attempt=later),
                    Recipient("d@three.test", next_attempt=later),
                ],
                "transactional",
                time.time() - 100,
                1,
                priority=2,
                campaign="spring",
                tenant="acme",
            ),
        ]
        rigs = [Rig(tmp_path / name, "127.0.0.1:9") for name in ("schedule", "restore")]
        try:
            for envelope in envelopes:
                key = new_message_id()
                rigs[0].dispatcher.schedule(key, envelope)
                rigs[1].dispatcher.restore(key, envelope.pack())
            first, second = (rig.dispatcher.queue_summary() for rig in rigs)
            assert [(r["domain"], r["deferred"]) for r in first] == [("one.test", 2), ("three.test", 1)]
            assert first == second
            schedulers = [rig.dispatcher._scheduler for rig in rigs]
            assert schedulers[1].next_due() == pytest.approx(schedulers[0].next_due(), abs=0.05)
            held = [[entry[:5] + entry[6:] for entry in scheduler.remove_matching()] for scheduler in schedulers]
            assert len(held[0]) == 3
            assert held[0] == held[1]
        finally:
            for rig in rigs:
                await rig.spool.close()
                rig.events.close()

    uvloop.run(scenario())
