"""A worker's postmaster: acts on delivery outcomes and on mail addressed to the engine itself.

It subscribes to the worker's event log and turns records into consequences: hard bounces of bulk mail
suppress the address, Bounce and Expiration records become DSNs to the sender on lanes with `dsn = true`,
and every outcome feeds the reputation guard. It also owns the engine's own mailboxes: mail to a
List-Unsubscribe mailto address unsubscribes the recipient its token names, and ARF reports to the
feedback address count as complaints. Everything blocking (LMDB commits) runs off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from engine.bounces import HARD_CLASSES
from engine.compliance import find_token, load_secret
from engine.config import Config, Lane
from engine.dispatch import Dispatcher
from engine.dsn import Failure, build_dsn, wants_dsn
from engine.envelope import Envelope, Recipient, new_message_id
from engine.events import EventLog
from engine.message import split_message
from engine.reception import Injector, Mailboxes
from engine.reputation import ComplaintLog, ReputationGuard, complaint_log_path, record_complaint
from engine.signing import DkimSigner
from engine.spool import Spool, SpoolError
from engine.suppression import SuppressionList, suppression_path

log = logging.getLogger(__name__)

COMPLAINT_POLL_INTERVAL = 1.0
MAX_SCANNED_BYTES = 64 << 10  # an unsubscribe token is looked for in this much of the message


class Postmaster:
    def __init__(
        self,
        config: Config,
        lane: Lane,
        spool: Spool,
        events: EventLog,
        dispatcher: Dispatcher,
        signer: DkimSigner,
        *,
        suspend: Callable[..., None] | None = None,
    ) -> None:
        """`suspend` is how the reputation guard suspends a campaign (default: this worker's dispatcher)."""
        self._config = config
        self._lane = lane
        self._spool = spool
        self._signer = signer
        self._bulk = lane.list_unsubscribe is not None
        self.secret = load_secret(config)
        self.suppression = SuppressionList(suppression_path(config.engine.spool_dir))
        self.complaints = ComplaintLog(complaint_log_path(config.engine.spool_dir))
        self.guard = ReputationGuard(config.reputation, lane.name, dispatcher, events.emit, suspend=suspend)
        self._injector = Injector(spool, events, dispatcher)
        if self._bulk:
            dispatcher.suppression = self.suppression
        self._mailboxes: dict = {}
        self._dead: list[str] = []
        self._bounced: dict[bytes, tuple[dict, bytes, list[dict]]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None
        events.subscribers.append(self.observe)

    def reception_options(self) -> dict:
        """Keyword arguments for ReceptionHandler: the secret, the suppression list, the engine's mailboxes."""
        return {"secret": self.secret, "suppression": self.suppression, "mailboxes": self.mailboxes()}

    def mailboxes(self) -> Mailboxes:
        """The engine's own addresses; the mapping is updated in place on reload."""
        self._mailboxes.clear()
        self._mailboxes.update(self._own_addresses())
        return self._mailboxes

    def reload(self, config: Config, lane: Lane, signer: DkimSigner) -> None:
        """SIGHUP: new thresholds, DSN switch, unsubscribe and feedback addresses, and the reloaded DKIM
        keys, so DSNs written from now on are signed like the mail received from now on."""
        self._config, self._lane = config, lane
        self._signer = signer
        self.guard.settings = config.reputation
        self.mailboxes()

    def _own_addresses(self) -> dict:
        boxes = {
            lane.list_unsubscribe.mailto.lower(): self.unsubscribe_by_mail
            for lane in self._config.lanes.values()
            if lane.list_unsubscribe is not None and lane.list_unsubscribe.mailto
        }
        if self._config.reputation.feedback_address:
            boxes[self._config.reputation.feedback_address.lower()] = self.feedback_report
        return boxes

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll_complaints())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self._flush_dsns()
        self._flush_dead()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10.0)
        self.complaints.close()
        self.suppression.close()

    # outcomes

    def observe(self, record: dict) -> None:
        """EventLog subscriber: called with every record this worker emits, inside the emitting code, so
        nothing here may raise into delivery."""
        try:
            self._observe(record)
        except Exception:
            log.exception("postmaster could not act on a %s record", record.get("type"))

    def _observe(self, record: dict) -> None:
        self.guard.observe(record)
        kind = record["type"]
        if kind == "Bounce" and self._bulk and record.get("bounce_class") in HARD_CLASSES:
            if not self._dead:
                asyncio.get_running_loop().call_soon(self._flush_dead)
            self._dead.append(record["recipient"])
        if kind in ("Bounce", "Expiration") and self._lane.dsn and wants_dsn(record.get("sender")):
            self._collect_dsn(record)

    def _flush_dead(self) -> None:
        dead, self._dead = self._dead, []
        if dead:
            self._background(asyncio.to_thread(self.suppression.add_many, dead, None, "hard bounce"))

    def _collect_dsn(self, record: dict) -> None:
        """Failures of one message seen in the same loop turn go into one DSN."""
        key = bytes.fromhex(record["id"])
        pending = self._bounced.get(key)
        if pending is None:
            body = self._spool.body(key) or b""
            if not self._bounced:
                asyncio.get_running_loop().call_soon(self._flush_dsns)
            pending = self._bounced[key] = (record, split_message(body)[0], [])
        pending[2].append(record)

    def _flush_dsns(self) -> None:
        bounced, self._bounced = self._bounced, {}
        for key, (first, headers, records) in bounced.items():
            self._background(self._send_dsn(key, first, headers, records))

    async def _send_dsn(self, key: bytes, first: dict, headers: bytes, records: list[dict]) -> None:
        failures = [
            Failure(
                record["recipient"],
                record["response"]["code"],
                record["response"]["enhanced"],
                record["response"]["text"],
                (record.get("peer") or {}).get("host"),
                record["timestamp"],
            )
            for record in records
        ]
        message = build_dsn(
            reporting_mta=self._config.engine.hostname,
            sender=first["sender"],
            queue_id=key.hex(),
            arrival=first["created"],
            failures=failures,
            original_headers=headers,
        )
        signature = self._signer.sign(message)
        if signature is not None:
            message = signature + message
        envelope = Envelope(
            sender="",
            recipients=[Recipient(first["sender"])],
            lane=self._lane.name,
            created=time.time(),
            size=len(message),
            priority=first.get("priority") or 5,
        )
        try:
            await self._injector.inject([(new_message_id(), envelope, message)], listener=None, dsn_for=key.hex())
        except SpoolError as error:
            log.error("DSN for %s to %s not spooled: %s", key.hex(), first["sender"], error)

    # the engine's mailboxes

    def unsubscribe_by_mail(self, message: bytes) -> None:
        """Mail to a List-Unsubscribe mailto address: suppress whom its token names, for that tenant."""
        found = find_token(self.secret, message[:MAX_SCANNED_BYTES])
        if found is None:
            log.info("mail to the unsubscribe address without a valid token ignored")
            return
        recipient, tenant, campaign = found
        self.suppression.add(recipient, tenant, f"unsubscribed by mail (campaign {campaign})")
        log.info("unsubscribed %s for tenant %s by mail", recipient, tenant)

    def feedback_report(self, message: bytes) -> None:
        """An ARF report: the complaining recipient is suppressed and the complaint counts for its campaign."""
        if record_complaint(message, self.secret, self.suppression, self.complaints) is None:
            log.info("mail to the feedback address that is no ARF report about a message of ours ignored")

    async def _poll_complaints(self) -> None:
        while True:
            await asyncio.sleep(COMPLAINT_POLL_INTERVAL)
            for tenant, campaign, _ in await asyncio.to_thread(self.complaints.new):
                self.guard.complaint(tenant, campaign)

    def _background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        if task.exception() is not None:
            log.error("postmaster task failed", exc_info=task.exception())
