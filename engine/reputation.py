"""The reputation guard: one bad campaign must not spoil the lane's IP addresses for everybody else.

Per (tenant, campaign) it keeps rolling counts of final outcomes, hard bounces and complaints over
`[reputation] window`; once at least `min_messages` outcomes are in and the hard-bounce or complaint rate
is above its limit, it suspends the campaign on the worker's dispatcher and emits an `Alert` record.
Operators resume it through the admin API; the counts then start afresh.

Complaints come from ARF feedback reports (RFC 5965) mailed to the feedback address. Any worker may
receive one, so they go through a small shared LMDB log that the guard of every worker reads.
"""

from __future__ import annotations

import email
import email.policy
import logging
import os
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from pathlib import Path

import lmdb
import msgpack

from engine.bounces import HARD_CLASSES
from engine.compliance import find_token
from engine.config import ReputationSettings
from engine.dispatch import Dispatcher
from engine.suppression import SuppressionList

__all__ = [
    "ComplaintLog",
    "FeedbackReport",
    "ReputationGuard",
    "complaint_log_path",
    "parse_arf",
    "record_complaint",
]

log = logging.getLogger(__name__)

OUTCOMES = frozenset({"Delivery", "Bounce", "Expiration"})
BUCKETS = 60  # the window moves in steps of window/BUCKETS
RULE_PREFIX = "reputation"
COMPLAINTS_DIRECTORY = "complaints"
_LOG_KEY = struct.Struct(">QI")

CampaignKey = tuple[str | None, str]  # (tenant, campaign)


class _Window:
    """Counts of (outcomes, hard bounces, complaints) in time buckets covering the last `window` seconds."""

    __slots__ = ("buckets", "width", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self.width = window / BUCKETS
        self.buckets: deque[list[float]] = deque()

    def add(self, now: float, outcomes: int = 0, hard: int = 0, complaints: int = 0) -> None:
        start = now - now % self.width
        if not self.buckets or self.buckets[-1][0] != start:
            self.buckets.append([start, 0, 0, 0])
        bucket = self.buckets[-1]
        bucket[1] += outcomes
        bucket[2] += hard
        bucket[3] += complaints

    def totals(self, now: float) -> tuple[int, int, int]:
        while self.buckets and self.buckets[0][0] + self.width <= now - self.window:
            self.buckets.popleft()
        return (
            int(sum(b[1] for b in self.buckets)),
            int(sum(b[2] for b in self.buckets)),
            int(sum(b[3] for b in self.buckets)),
        )


class ReputationGuard:
    """Watches a worker's event records (an EventLog subscriber) and suspends campaigns above the limits."""

    def __init__(
        self,
        settings: ReputationSettings,
        lane: str,
        dispatcher: Dispatcher,
        emit: Callable[[dict], None],
        *,
        suspend: Callable[..., None] | None = None,
    ) -> None:
        """`suspend(rule_id, campaign=, tenant=, reason=)` defaults to this worker's dispatcher.suspend; a
        control plane may pass one that makes the rule lane-wide, keeping rule_id so resuming it is seen."""
        self.settings = settings
        self._lane = lane
        self._dispatcher = dispatcher
        self._emit = emit
        self._suspend = suspend or dispatcher.suspend
        self._windows: dict[CampaignKey, _Window] = {}
        self._tripped: dict[CampaignKey, tuple[str, bool]] = {}  # rule id, seen active on the dispatcher

    def observe(self, record: dict) -> None:
        """Counts final outcomes of campaign mail; call with every record the worker emits."""
        if record["type"] not in OUTCOMES or record.get("campaign") is None or record.get("lane") != self._lane:
            return
        key = (record.get("tenant"), record["campaign"])
        hard = record["type"] == "Bounce" and record.get("bounce_class") in HARD_CLASSES
        self._window(key).add(time.time(), outcomes=1, hard=int(hard))
        self._check(key)

    def complaint(self, tenant: str | None, campaign: str | None) -> None:
        """Counts one complaint (an ARF report) against a campaign this worker sends."""
        key = (tenant, campaign)
        if campaign is None or key not in self._windows:
            return
        self._windows[key].add(time.time(), complaints=1)
        self._check(key)

    def rates(self, tenant: str | None, campaign: str) -> dict:
        outcomes, hard, complaints = self._window((tenant, campaign)).totals(time.time())
        return {
            "messages": outcomes,
            "bounce_rate": hard / outcomes if outcomes else 0.0,
            "complaint_rate": complaints / outcomes if outcomes else 0.0,
        }

    def _window(self, key: CampaignKey) -> _Window:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(self.settings.window)
        return window

    def _check(self, key: CampaignKey) -> None:
        tripped = self._tripped.get(key)
        if tripped is not None:
            rule_id, seen = tripped
            if any(s["id"] == rule_id for s in self._dispatcher.suspensions()):
                self._tripped[key] = (rule_id, True)
                return
            if seen:  # resumed by an operator: judge the campaign afresh
                del self._tripped[key]
                self._windows[key] = _Window(self.settings.window)
            return
        rates = self.rates(*key)
        if rates["messages"] < self.settings.min_messages:
            return
        if rates["bounce_rate"] > self.settings.max_bounce_rate:
            self._trip(key, "hard-bounce rate", rates["bounce_rate"], self.settings.max_bounce_rate, rates)
        elif rates["complaint_rate"] > self.settings.max_complaint_rate:
            self._trip(key, "complaint rate", rates["complaint_rate"], self.settings.max_complaint_rate, rates)

    def _trip(self, key: CampaignKey, what: str, value: float, limit: float, rates: dict) -> None:
        tenant, campaign = key
        rule_id = f"{RULE_PREFIX}:{tenant or '*'}:{campaign}"
        reason = (
            f"campaign {campaign!r}{f' of tenant {tenant!r}' if tenant else ''} suspended: {what} "
            f"{value:.2%} above {limit:.2%} over {rates['messages']} messages"
        )
        self._suspend(rule_id, campaign=campaign, tenant=tenant, reason=reason)
        self._tripped[key] = (rule_id, any(s["id"] == rule_id for s in self._dispatcher.suspensions()))
        log.warning("%s", reason)
        now = time.time()
        self._emit(
            {
                "type": "Alert",
                "id": uuid.uuid4().hex,
                "lane": self._lane,
                "severity": "P1",
                "rule": RULE_PREFIX,
                "state": "firing",
                "value": value,
                "threshold": limit,
                "message": reason,
                "suspension": rule_id,
                "messages": rates["messages"],
                "bounce_rate": rates["bounce_rate"],
                "complaint_rate": rates["complaint_rate"],
                "sender": None,
                "recipient": None,
                "domain": None,
                "campaign": campaign,
                "tenant": tenant,
                "priority": None,
                "size": None,
                "created": now,
                "timestamp": now,
                "attempt": None,
            }
        )


@dataclass(frozen=True, slots=True)
class FeedbackReport:
    """What an ARF report (RFC 5965) says about one message a recipient complained about."""

    feedback_type: str  # abuse, fraud, virus, other, not-spam...
    user_agent: str | None
    original_mail_from: str | None
    original_rcpt_to: tuple[str, ...]
    original_headers: bytes  # header block of the reported message (where the unsubscribe token is)


def parse_arf(message: bytes) -> FeedbackReport | None:
    """The report in a multipart/report; report-type=feedback-report message, else None."""
    report = email.message_from_bytes(message, policy=email.policy.compat32)
    if report.get_content_type() != "multipart/report" or not report.is_multipart():
        return None
    if (report.get_param("report-type") or "").lower() != "feedback-report":
        return None
    fields: Message | None = None
    original = b""
    for part in report.get_payload():
        kind = part.get_content_type()
        if kind == "message/feedback-report":
            fields = _embedded_fields(part)
        elif kind == "message/rfc822" and part.is_multipart():
            original = part.get_payload(0).as_bytes()
        elif kind in ("text/rfc822-headers", "message/rfc822"):
            original = part.get_payload(decode=True) or b""
    if fields is None or not fields.get("Feedback-Type"):
        return None
    original_headers, _, _ = original.replace(b"\r\n", b"\n").partition(b"\n\n")
    return FeedbackReport(
        feedback_type=str(fields["Feedback-Type"]).strip().lower(),
        user_agent=fields.get("User-Agent"),
        original_mail_from=fields.get("Original-Mail-From"),
        original_rcpt_to=tuple(str(v).strip().strip("<>") for v in fields.get_all("Original-Rcpt-To") or ()),
        original_headers=original_headers + b"\n",
    )


def _embedded_fields(part: Message) -> Message:
    """The machine-readable fields: the email package parses message/* payloads as an embedded message."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload:
        return payload[0]
    return BytesHeaderParser().parsebytes(part.get_payload(decode=True) or b"")


def record_complaint(
    message: bytes, secret: bytes, suppression: SuppressionList, complaints: ComplaintLog
) -> tuple[str, str | None, str | None] | None:
    """Acts on an ARF report (mailed to the feedback address or posted to the admin API): the recipient its
    unsubscribe token names is suppressed for that tenant and the complaint is logged for every worker's
    guard. Returns (recipient, tenant, campaign), or None for a message that is no report about our mail."""
    report = parse_arf(message)
    if report is None:
        return None
    found = find_token(secret, report.original_headers)
    if found is None:
        return None
    recipient, tenant, campaign = found
    suppression.add(recipient, tenant, f"complaint ({report.feedback_type}, campaign {campaign})")
    complaints.add(tenant, campaign, recipient)
    return found


def complaint_log_path(spool_dir: Path) -> Path:
    return Path(spool_dir) / COMPLAINTS_DIRECTORY


class ComplaintLog:
    """Complaints shared by the workers of one installation: whoever receives the report appends it, every
    worker's guard reads what it has not seen yet. Entries older than `keep` seconds are pruned."""

    def __init__(self, path: Path, *, keep: float = 7 * 86400.0, map_size: int = 256 << 20) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(path), map_size=map_size, sync=True, max_dbs=1, lock=True)
        self._db = self._env.open_db(b"complaints")
        self._env.reader_check()
        self._keep = keep
        self._seen = _LOG_KEY.pack(time.time_ns(), 0)  # a new reader starts from now

    def add(self, tenant: str | None, campaign: str | None, recipient: str) -> None:
        now = time.time_ns()
        key = _LOG_KEY.pack(now, int.from_bytes(os.urandom(4), "big"))
        oldest = _LOG_KEY.pack(max(0, now - int(self._keep * 1e9)), 0)
        with self._env.begin(db=self._db, write=True) as txn:
            txn.put(key, msgpack.packb([tenant, campaign, recipient]))
            cursor = txn.cursor()
            while cursor.first() and cursor.key() < oldest:
                cursor.delete()

    def new(self) -> list[tuple[str | None, str | None, str]]:
        """(tenant, campaign, recipient) of complaints added since the last call."""
        found = []
        try:
            with self._env.begin(db=self._db) as txn:
                cursor = txn.cursor()
                if cursor.set_range(self._seen):
                    for key, value in cursor.iternext():
                        if key == self._seen:
                            continue
                        found.append(tuple(msgpack.unpackb(value)))
                        self._seen = key
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)
        return found

    def close(self) -> None:
        self._env.close()
