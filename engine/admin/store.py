"""Operator suspensions as the supervisor keeps them: persisted, so they outlive worker and engine restarts.

Workers hold only the suspensions of their lane, in memory (engine.suspensions); the supervisor sends them
again to every worker it (re)starts. The file is small JSON under spool_dir, replaced atomically.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    lane: str | None
    domain: str | None
    campaign: str | None
    tenant: str | None
    until: float | None  # Unix time; None = until resumed
    reason: str
    created: float

    def worker_args(self) -> dict:
        """The keyword arguments of Dispatcher.suspend (the lane selector is applied by the supervisor)."""
        return {
            "rule_id": self.id,
            "domain": self.domain,
            "campaign": self.campaign,
            "tenant": self.tenant,
            "until": self.until,
            "reason": self.reason,
        }

    def covers(self, lane: str) -> bool:
        return self.lane is None or self.lane == lane


class SuspensionStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rules: dict[str, Rule] = {}
        if path.exists():
            for item in json.loads(path.read_text(encoding="utf-8")):
                rule = Rule(**item)
                self.rules[rule.id] = rule
        self.expire()

    def add(
        self,
        *,
        lane: str | None,
        domain: str | None,
        campaign: str | None,
        tenant: str | None,
        duration: float | None,
        reason: str,
        rule_id: str | None = None,
    ) -> Rule:
        """`rule_id` keeps the name a worker gave a rule it made itself (a reputation suspension)."""
        now = time.time()
        until = None if duration is None else now + duration
        rule = Rule(rule_id or uuid.uuid4().hex[:12], lane, domain, campaign, tenant, until, reason, now)
        self.rules[rule.id] = rule
        self._save()
        return rule

    def put(self, rule: Rule) -> None:
        """Stores a rule as it is, id and times included (one another node of the cluster made)."""
        self.rules[rule.id] = rule
        self._save()

    def remove(self, rule_id: str) -> Rule | None:
        rule = self.rules.pop(rule_id, None)
        if rule is not None:
            self._save()
        return rule

    def expire(self, now: float | None = None) -> list[Rule]:
        """Drops rules whose end time passed (workers end them on their own)."""
        now = time.time() if now is None else now
        ended = [rule for rule in self.rules.values() if rule.until is not None and rule.until <= now]
        for rule in ended:
            del self.rules[rule.id]
        if ended:
            self._save()
        return ended

    def active(self, lane: str | None = None) -> list[Rule]:
        self.expire()
        return [rule for rule in self.rules.values() if lane is None or rule.covers(lane)]

    def _save(self) -> None:
        write_json(self.path, [asdict(rule) for rule in self.rules.values()])


def write_json(path: Path, data: object) -> None:
    """Replaces the file atomically with `data` as JSON, on stable storage before it returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as file:
        json.dump(data, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
