"""Operator suspensions of a lane's traffic by destination, campaign or tenant, with optional end time.

A suspension names selectors (every one given must match; none = the whole lane); the dispatcher turns it
into scheduler holds, so this module only keeps the rules, their end times and their operator view.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Suspension:
    id: str
    domain: str | None = None
    campaign: str | None = None
    tenant: str | None = None
    until: float | None = None  # Unix time; None = until resumed
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


class Suspensions:
    """The active suspensions of one worker."""

    def __init__(self) -> None:
        self._active: dict[str, Suspension] = {}

    def __bool__(self) -> bool:
        return bool(self._active)

    def add(self, suspension: Suspension) -> None:
        self._active[suspension.id] = suspension

    def remove(self, suspension_id: str) -> bool:
        return self._active.pop(suspension_id, None) is not None

    def expire(self, now: float | None = None) -> list[str]:
        """Removes suspensions whose end time passed; returns their ids."""
        now = time.time() if now is None else now
        ended = [s.id for s in self._active.values() if s.until is not None and s.until <= now]
        for suspension_id in ended:
            del self._active[suspension_id]
        return ended

    def all(self) -> list[Suspension]:
        return list(self._active.values())
