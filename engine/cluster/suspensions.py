"""Operator suspensions, shared: a rule added or resumed on one node takes effect on every node.

The `engine:suspensions` hash holds every rule (id -> JSON of engine.admin.store.Rule); each add and
resume is announced on the change stream. A node stores rules from others in its own SuspensionStore and
sends them to its workers like its own (Node.adopt_remote_rule / drop_remote_rule), so they hold while
Redis is down and after restarts. Rules this node made or resumed while Redis was unreachable wait in a
file beside the store (SUSPENSIONS.unpublished.json), so a restart meanwhile keeps them too, and go out when
Redis is back; then the node takes the hash as the truth.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Protocol

from engine.admin.store import Rule, SuspensionStore, write_json
from engine.cluster.link import PREFIX, Link

__all__ = ["Node", "SuspensionReplica"]

HASH = PREFIX + "suspensions"


class Node(Protocol):
    """What the replica needs of the supervisor."""

    suspensions: SuspensionStore

    async def adopt_remote_rule(self, rule: Rule) -> None: ...

    async def drop_remote_rule(self, rule_id: str) -> None: ...


def _packed(rule: Rule) -> bytes:
    return json.dumps(dataclasses.asdict(rule)).encode()


def _rule(packed: bytes) -> Rule:
    return Rule(**json.loads(packed))


def _live(rule: Rule, now: float) -> bool:
    return rule.until is None or rule.until > now


class SuspensionReplica:
    def __init__(self, link: Link, node: Node) -> None:
        self._link = link
        self._node = node
        store = node.suspensions.path
        self._path = store.with_name(f"{store.stem}.unpublished.json")
        # Not yet published: the rule added, or None if resumed.
        self._pending: dict[str, Rule | None] = {}
        if self._path.exists():
            for rule_id, rule in json.loads(self._path.read_text(encoding="utf-8")).items():
                self._pending[rule_id] = None if rule is None else Rule(**rule)

    def added(self, rule: Rule) -> None:
        self._pending[rule.id] = rule
        self._save()

    def removed(self, rule_id: str) -> None:
        self._pending[rule_id] = None
        self._save()

    def _save(self) -> None:
        write_json(self._path, {rule_id: rule and dataclasses.asdict(rule) for rule_id, rule in self._pending.items()})

    async def publish(self) -> int:
        """Sends this node's adds and resumes to the cluster; they stay pending if Redis fails."""
        if not self._pending:
            return 0
        pending = dict(self._pending)
        changes = [("remove", id, b"") if rule is None else ("add", id, _packed(rule)) for id, rule in pending.items()]
        await self._link.publish("suspension", HASH, changes)
        for rule_id, rule in pending.items():
            if self._pending.get(rule_id, rule) is rule:
                self._pending.pop(rule_id, None)
        self._save()
        return len(changes)

    async def seed(self) -> int:
        """Offers this node's rules to a cluster it has not synced with; returns how many it lacked."""
        rules = self._node.suspensions.active()
        return await self._link.publish("suspension", HASH, [("seed", rule.id, _packed(rule)) for rule in rules])

    async def reconcile(self) -> tuple[int, int]:
        """Makes the local rules those of the cluster: adopts what this node lacks, drops what was resumed
        elsewhere (or ended) and removes ended rules from the hash. Returns (adopted, dropped)."""
        now = time.time()
        shared = {key.decode(): _rule(value) for key, value in (await self._link.commands.hgetall(HASH)).items()}
        ended = [rule_id for rule_id, rule in shared.items() if not _live(rule, now)]
        if ended:
            await self._link.commands.hdel(HASH, *ended)
        local = {rule.id for rule in self._node.suspensions.active()}
        adopted = dropped = 0
        for rule_id, rule in shared.items():
            if rule_id not in local and _live(rule, now):
                await self._node.adopt_remote_rule(rule)
                adopted += 1
        for rule_id in local - shared.keys() - self._pending.keys():
            await self._node.drop_remote_rule(rule_id)
            dropped += 1
        return adopted, dropped

    async def apply(self, op: bytes, key: bytes, value: bytes) -> None:
        """One announced change, from any node (this one's own are no-ops)."""
        if op == b"add":
            rule = _rule(value)
            if _live(rule, time.time()) and rule.id not in self._node.suspensions.rules:
                await self._node.adopt_remote_rule(rule)
        elif key.decode() in self._node.suspensions.rules:
            await self._node.drop_remote_rule(key.decode())
