"""The pieces of clustering, each against the real thing: the lane table's leased mode in both
implementations, the suppression journal in LMDB (across processes), rate leases from a real redis-server
shared by two tables, and two in-process cluster agents replicating and catching up.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
import random
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import _throttle_py
from engine.admin.store import Rule, SuspensionStore
from engine.cluster import Cluster
from engine.cluster.link import Link, redacted
from engine.cluster.rates import TICK, RateLeaser, batch, wanted
from engine.suppression import Change, SuppressionList
from tests.redis_server import RedisServer

IMPLEMENTATIONS = {"compiled": "engine._throttle", "python": "engine._throttle_py"}
KEY = _throttle_py.throttle_key("egress-1", "example.com")
SPAWN = multiprocessing.get_context("spawn")  # LMDB: a forked child cannot reopen its parent's list


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(IMPLEMENTATIONS[request.param])


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    with redis_server.client() as client:
        client.flushdb()
    return redis_server.url


# the lane table in leased mode


def test_leased_table_spends_only_granted_tokens_and_reports_demand(impl: ModuleType) -> None:
    table = impl.ThrottleTable.create(None, slots=8, workers=2, leases=True)
    assert table.acquire(KEY, 10.0, 2, 1.0) == 0.0 and table.demand(1.0) == []  # alone: no demand kept
    table.set_leased(True)
    assert table.leased()
    assert table.acquire(KEY, 10.0, 2, 2.0) == _throttle_py.LEASE_WAIT
    assert table.demand(2.0) == [(KEY, 10.0, 2, 0, 1, 0)]
    table.grant(KEY, 3, 2.0, 2.5)
    assert table.demand(2.0) == []
    assert [table.acquire(KEY, 10.0, 2, 2.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]  # local GCRA too
    assert table.acquire(KEY, 10.0, 2, 2.2) == 0.0
    assert table.demand(2.2) == [(KEY, 10.0, 2, 0, 0, 3)]
    table.grant(KEY, 5, 2.2, 2.4)
    assert table.acquire(KEY, 10.0, 2, 2.5) == _throttle_py.LEASE_WAIT  # the tokens ended at 2.4
    table.grant(KEY, 1, 2.6, 2.8)
    table.grant(KEY, 1, 2.6, 2.8)  # grants add up while their tokens are valid
    assert table.demand(2.6) == []
    assert [table.acquire(KEY, 10.0, 2, 2.6) for _ in range(2)] == [0.0, 0.0]
    table.set_leased(False)
    assert table.acquire(KEY, 10.0, 2, 9.0) == 0.0
    table.close()


def test_only_a_cluster_node_pays_for_the_lease_area(impl: ModuleType, tmp_path: Path) -> None:
    alone = impl.ThrottleTable.create(tmp_path / "alone", slots=1024, workers=2)
    clustered = impl.ThrottleTable.create(tmp_path / "clustered", slots=1024, workers=2, leases=True)
    slots = (tmp_path / "alone").stat().st_size - _throttle_py.HEADER_SIZE
    assert slots == 1024 * _throttle_py.slot_size(2)
    assert (tmp_path / "clustered").stat().st_size - _throttle_py.HEADER_SIZE == slots + 1024 * 48
    for method, args in (("set_leased", (True,)), ("demand", (1.0,)), ("grant", (KEY, 1, 1.0, 2.0))):
        with pytest.raises(ValueError, match="lease area"):
            getattr(alone, method)(*args)
    assert not alone.leased() and alone.acquire(KEY, 5.0, 1, 1.0) == 0.0
    assert impl.ThrottleTable.attach(tmp_path / "clustered").demand(1.0) == []
    alone.close()
    clustered.close()


def test_the_leased_flag_is_shared_through_the_file(impl: ModuleType, tmp_path: Path) -> None:
    other = importlib.import_module(IMPLEMENTATIONS["python" if impl.__name__.endswith("_throttle") else "compiled"])
    table = impl.ThrottleTable.create(tmp_path / "table", slots=8, workers=2, leases=True)
    worker = other.ThrottleTable.attach(tmp_path / "table")
    table.set_leased(True)
    assert worker.leased() and worker.acquire(KEY, 5.0, 1, 1.0) == _throttle_py.LEASE_WAIT
    assert table.demand(1.0) == [(KEY, 5.0, 1, 0, 1, 0)]
    table.grant(KEY, 1, 1.0, 2.0)
    assert worker.acquire(KEY, 5.0, 1, 1.0) == 0.0
    worker.close()
    table.close()


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.sampled_from([1, 2]), st.floats(1.0, 50.0), st.integers(1, 3)),
        st.tuples(st.just("grant"), st.sampled_from([1, 2]), st.integers(0, 4), st.floats(0.0, 0.3)),
        st.tuples(st.just("leased"), st.booleans()),
        st.tuples(st.just("tick"), st.floats(0.0, 0.2)),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(OPERATIONS)
def test_both_implementations_lease_alike(operations: list[tuple]) -> None:
    tables = [
        importlib.import_module(name).ThrottleTable.create(None, 8, 2, leases=True) for name in IMPLEMENTATIONS.values()
    ]
    now = 100.0
    for operation in operations:
        results = []
        for table in tables:
            if operation[0] == "acquire":
                results.append(table.acquire(operation[1], operation[2], operation[3], now))
            elif operation[0] == "grant":
                table.grant(operation[1], operation[2], now, now + operation[3])
            elif operation[0] == "leased":
                table.set_leased(operation[1])
            results.append(sorted(table.demand(now)))
        assert results[: len(results) // 2] == results[len(results) // 2 :]
        if operation[0] == "tick":
            now += operation[1]
    for table in tables:
        table.close()


def test_wanted_tops_up_the_refused_and_replaces_what_was_spent() -> None:
    assert batch(20.0, 2) == 2 and batch(1000.0, 100) == 100 and batch(1000.0, 1) == 100
    assert wanted(1000.0, 1, tokens=30, refused=1, taken=0) == 70
    assert wanted(1000.0, 1, tokens=30, refused=0, taken=5) == 5
    assert wanted(1000.0, 1, tokens=99, refused=0, taken=5) == 1


# the suppression journal


def test_journal_records_local_changes_only_while_on(tmp_path: Path) -> None:
    suppressed = SuppressionList(tmp_path / "list")
    suppressed.add("early@example.org")
    assert suppressed.journal() == []
    suppressed.set_journal(True)
    assert suppressed.add_many(["A@example.org", "b@example.org"], "acme", "why") == 2
    assert not suppressed.add("early@example.org")  # no change, nothing to journal
    assert suppressed.remove("early@example.org")
    assert not suppressed.remove("never@example.org")
    pending = suppressed.journal()
    assert [(c.key, c.entry() and c.entry().reason) for _, c in pending] == [
        (b"acme\x00a@example.org", "why"),
        (b"acme\x00b@example.org", "why"),
        (b"\x00early@example.org", None),
    ]
    assert [position for position, _ in pending] == sorted(position for position, _ in pending)
    suppressed.forget([position for position, _ in pending[:2]])
    assert [c.key for _, c in suppressed.journal()] == [b"\x00early@example.org"]

    remote = [Change(b"\x00c@example.org", pending[0][1].value), Change(b"acme\x00a@example.org", None)]
    assert suppressed.apply(remote, {"stream": b"5-0"}) == 2
    assert suppressed.contains("c@example.org") and not suppressed.contains("a@example.org", "acme")
    assert [c.key for _, c in suppressed.journal()] == [b"\x00early@example.org"]  # applied, not journaled
    assert suppressed.state("stream") == b"5-0" and suppressed.state("epoch") is None

    suppressed.set_journal(False)
    suppressed.add("d@example.org")
    assert suppressed.journal() == []
    suppressed.close()


def test_items_pages_through_every_entry(tmp_path: Path) -> None:
    suppressed = SuppressionList(tmp_path / "list")
    suppressed.add_many([f"u{n:02d}@example.org" for n in range(25)], "t")
    suppressed.add("global@example.org")
    seen, after = [], b""
    while page := suppressed.items(after, 10):
        seen += [change.key for change in page]
        after = page[-1].key
    assert len(seen) == 26 == len(set(seen)) and seen == sorted(seen)
    suppressed.close()


def _add_many(path: Path, worker: int) -> None:
    suppressed = SuppressionList(path)
    for n in range(50):
        suppressed.add(f"w{worker}-{n}@example.org")
    suppressed.close()


def test_processes_writing_at_once_journal_every_change_in_order(tmp_path: Path) -> None:
    path = tmp_path / "list"
    suppressed = SuppressionList(path)
    suppressed.set_journal(True)
    processes = [SPAWN.Process(target=_add_many, args=(path, worker)) for worker in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    pending = suppressed.journal(limit=1000)
    assert len(pending) == 150 == len({position for position, _ in pending})
    for worker in range(3):  # one writer's changes keep their order
        mine = [c.key for _, c in pending if c.key.startswith(f"\x00w{worker}-".encode())]
        assert mine == [f"\x00w{worker}-{n}@example.org".encode() for n in range(50)]
    suppressed.close()


# rates leased from Redis


def test_two_tables_leasing_from_one_redis_share_the_rate(redis_url: str) -> None:
    rate, seconds = 200.0, 3.0

    async def run() -> list[int]:
        links = [Link(redis_url, f"node-{n}") for n in range(2)]
        tables = [_throttle_py.ThrottleTable.create(None, 8, 1, leases=True) for _ in range(2)]
        leasers = [RateLeaser(link, {"bulk": table}) for link, table in zip(links, tables, strict=True)]
        for leaser in leasers:
            leaser.set_leased(True)
        sent = [0, 0]

        async def node(index: int) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                while tables[index].acquire(KEY, rate, 20, time.monotonic()) == 0.0:
                    sent[index] += 1
                await leasers[index].lease()
                await asyncio.sleep(TICK * random.uniform(0.5, 1.5))  # as the agent does

        await asyncio.gather(node(0), node(1))
        for link in links:
            await link.close()
        return sent

    sent = asyncio.run(run())
    assert sum(sent) <= rate * (seconds + 0.1) + 20, sent  # + what the last grant may hold, + burst
    assert sum(sent) >= 0.85 * rate * seconds, sent
    assert min(sent) >= 0.3 * sum(sent), sent  # even over longer runs (bench.cluster: 0.50 over 10 s)


def test_redacted_hides_the_password() -> None:
    assert redacted("redis://:hunter2@10.0.0.1:6380/2") == "redis://:***@10.0.0.1:6380/2"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# two cluster agents in one process


class Supervisor:
    """The part of engine.supervisor.Supervisor the agent calls: a real store; workers are left out."""

    def __init__(self, directory: Path) -> None:
        self.suspensions = SuspensionStore(directory / "suspensions.json")
        self.suppression = SuppressionList(directory / "suppression")
        self.throttles = {"bulk": _throttle_py.ThrottleTable.create(None, 8, 1, leases=True)}
        self.cluster: Cluster | None = None

    def start(self, url: str, name: str) -> Cluster:
        self.cluster = Cluster(url, name, self, self.suppression, self.throttles)
        self.cluster.start()
        return self.cluster

    async def adopt_remote_rule(self, rule: Rule) -> None:
        self.suspensions.put(rule)

    async def drop_remote_rule(self, rule_id: str) -> None:
        self.suspensions.remove(rule_id)


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_node_that_was_away_catches_up_adds_and_removes(tmp_path: Path, redis_url: str) -> None:
    a, b = Supervisor(tmp_path / "a"), Supervisor(tmp_path / "b")
    a.suppression.add("before-cluster@example.org")  # a's own entry, offered when it first joins

    async def run() -> None:
        first, second = a.start(redis_url, "a"), b.start(redis_url, "b")
        await until(lambda: first.joined and second.joined)
        await until(lambda: b.suppression.contains("before-cluster@example.org"))
        a.suppression.add("x@example.org")
        await until(lambda: b.suppression.contains("x@example.org"))
        rule = a.suspensions.add(lane=None, domain="d.test", campaign=None, tenant=None, duration=None, reason="r")
        first.rule_added(rule)
        await until(lambda: rule.id in b.suspensions.rules)
        assert b.suspensions.rules[rule.id] == rule
        await second.close()  # b is away: removals it must learn from the stream
        a.suppression.remove("x@example.org")
        a.suppression.add("y@example.org", "acme")
        a.suspensions.remove(rule.id)
        first.rule_removed(rule.id)
        await asyncio.sleep(0.3)
        second = b.start(redis_url, "b")
        await until(lambda: b.suppression.contains("y@example.org", "acme"))
        await until(lambda: not b.suppression.contains("x@example.org"))
        await until(lambda: rule.id not in b.suspensions.rules)
        await first.close()
        await second.close()

    asyncio.run(run())
    assert a.suppression.journal() == [] and b.suppression.journal() == []


def test_entries_and_rules_made_while_redis_was_away_reach_the_others(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = Supervisor(tmp_path / "a"), Supervisor(tmp_path / "b")

    async def run() -> None:
        first, second = a.start(redis_server.url, "a"), b.start(redis_server.url, "b")
        await until(lambda: first.joined and second.joined)
        assert a.throttles["bulk"].leased()
        redis_server.kill()
        await until(lambda: not first.joined and not second.joined)
        assert not a.throttles["bulk"].leased()
        a.suppression.add("offline@example.org")
        rule = a.suspensions.add(lane="bulk", domain=None, campaign="c", tenant=None, duration=60.0, reason="r")
        first.rule_added(rule)
        await asyncio.sleep(0.3)
        assert [c.key for _, c in a.suppression.journal()] == [b"\x00offline@example.org"]
        redis_server.start()  # empty: a new epoch, both nodes offer what they have
        await until(lambda: b.suppression.contains("offline@example.org"), 10)
        await until(lambda: rule.id in b.suspensions.rules, 10)
        await until(lambda: first.joined and a.throttles["bulk"].leased())
        await first.close()
        await second.close()

    asyncio.run(run())


def test_rules_changed_while_redis_was_away_outlive_a_restart_of_the_node(
    tmp_path: Path, redis_server: RedisServer, redis_url: str
) -> None:
    """Redis comes back with its data (same epoch), so nothing is offered again: what the node changed alone
    must come from its own record of unpublished changes, or rejoining would undo it."""
    a, b = Supervisor(tmp_path / "a"), Supervisor(tmp_path / "b")

    async def run() -> None:
        first, second = a.start(redis_url, "a"), b.start(redis_url, "b")
        await until(lambda: first.joined and second.joined)
        old = a.suspensions.add(lane=None, domain="old.test", campaign=None, tenant=None, duration=None, reason="r")
        first.rule_added(old)
        await until(lambda: old.id in b.suspensions.rules)
        redis_server.pause()
        try:
            await until(lambda: not first.joined, 10)
            new = a.suspensions.add(lane=None, domain="new.test", campaign=None, tenant=None, duration=None, reason="r")
            first.rule_added(new)
            a.suspensions.remove(old.id)
            first.rule_removed(old.id)
            await first.close()
            a.suppression.close()
            restarted = Supervisor(tmp_path / "a")
            third = restarted.start(redis_url, "a")
        finally:
            redis_server.resume()
        await until(lambda: third.joined and second.joined, 10)
        await until(lambda: new.id in b.suspensions.rules and old.id not in b.suspensions.rules, 10)
        await until(lambda: set(restarted.suspensions.rules) == {new.id}, 10)  # after replaying the stream
        await third.close()
        await second.close()

    asyncio.run(run())


def test_the_agent_keeps_trying_while_redis_never_answers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = Supervisor(tmp_path)

    async def run() -> None:
        cluster = node.start("redis://127.0.0.1:9/0", "lonely")  # the discard port: refused at once
        await asyncio.sleep(1.0)
        assert not cluster.joined and not node.throttles["bulk"].leased()
        node.suppression.add("kept@example.org")
        await cluster.close()

    asyncio.run(run())
    warnings = [r for r in caplog.records if "no Redis at redis://127.0.0.1:9/0" in r.getMessage()]
    assert len(warnings) == 1
    assert [c.key for _, c in node.suppression.journal()] == [b"\x00kept@example.org"]
