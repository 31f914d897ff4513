"""The spooled envelope of one message: who it is from, where it goes, and how far each recipient got.

Stored as a msgpack array (not a map: smaller and faster, FINDINGS.md) apart from the body, so a retry
rewrites only these few hundred bytes.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from enum import IntEnum

import msgpack

FORMAT_VERSION = 1


class RecipientState(IntEnum):
    PENDING = 0
    DELIVERED = 1
    FAILED = 2  # bounced, expired or admin-bounced: final, not delivered


@dataclass(slots=True)
class Recipient:
    address: str
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    next_attempt: float = 0.0  # Unix time; 0 = as soon as possible
    domain: str = field(init=False, repr=False, compare=False)  # of the address, worked out once

    def __post_init__(self) -> None:
        self.domain = domain_of(self.address)


_STATES = tuple(RecipientState)  # by value: cheaper than calling the enum


@dataclass(slots=True)
class Envelope:
    sender: str
    recipients: list[Recipient]
    lane: str
    created: float
    size: int
    priority: int = 5
    campaign: str | None = None
    tenant: str | None = None
    extra: dict = field(default_factory=dict)

    def pack(self) -> bytes:
        return msgpack.packb(
            [
                FORMAT_VERSION,
                self.sender,
                [[r.address, int(r.state), r.attempts, r.next_attempt] for r in self.recipients],
                self.lane,
                self.created,
                self.size,
                self.priority,
                self.campaign,
                self.tenant,
                self.extra,
            ]
        )

    @classmethod
    def unpack(cls, data: bytes) -> Envelope:
        version, sender, rcpts, lane, created, size, priority, campaign, tenant, extra = msgpack.unpackb(data)
        if version != FORMAT_VERSION:
            raise ValueError(f"unknown envelope format {version}")
        return cls(
            sender=sender,
            recipients=[Recipient(a, _STATES[s], n, t) for a, s, n, t in rcpts],
            lane=lane,
            created=created,
            size=size,
            priority=priority,
            campaign=campaign,
            tenant=tenant,
            extra=extra,
        )

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state is RecipientState.PENDING]

    def pending_by_domain(self) -> dict[str, list[Recipient]]:
        groups: dict[str, list[Recipient]] = {}
        for recipient in self.recipients:
            if recipient.state is RecipientState.PENDING:
                groups.setdefault(recipient.domain, []).append(recipient)
        return groups

    @property
    def finished(self) -> bool:
        return all(r.state is not RecipientState.PENDING for r in self.recipients)


def waiting_destinations(data: bytes) -> tuple[float, int, str | None, str | None, dict[str, float]]:
    """(created, priority, campaign, tenant, {domain: latest next_attempt of its pending recipients}) of a
    packed envelope: what scheduling needs at recovery, without building an Envelope and its Recipients."""
    version, _, rcpts, _, created, _, priority, campaign, tenant, _ = msgpack.unpackb(data, use_list=False)
    if version != FORMAT_VERSION:
        raise ValueError(f"unknown envelope format {version}")
    destinations: dict[str, float] = {}
    for address, state, _, next_attempt in rcpts:
        if state == RecipientState.PENDING:
            domain = domain_of(address)
            destinations[domain] = max(destinations.get(domain, next_attempt), next_attempt)
    return created, priority, campaign, tenant, destinations


def domain_of(address: str) -> str:
    """The destination domain of an address, lower-cased (address literals keep their brackets)."""
    return address.rpartition("@")[2].lower()


_COUNTER = struct.Struct(">QI")
_sequence = 0


def new_message_id() -> bytes:
    """A 12-byte id: nanosecond clock, then process id mixed with a counter, so ids sort by arrival."""
    global _sequence
    _sequence = (_sequence + 1) & 0xFFFF
    return _COUNTER.pack(time.time_ns(), ((os.getpid() & 0xFFFF) << 16) | _sequence)
