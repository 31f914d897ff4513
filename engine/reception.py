"""What a lane worker does with a message its SMTP listener accepted: stamp it, spool it, schedule it.

The 250 goes back only after the spool's group commit made the message durable (SPEC "Durability").
On lanes with `list_unsubscribe` (bulk) reception also applies the compliance rules: suppressed recipients
are logged and dropped, and every recipient gets a copy of its own carrying List-Unsubscribe with a token
for that recipient, added before DKIM signing so the signature covers it. Mail to the engine's own
addresses (unsubscribe mailto, feedback reports) is handed to their mailbox handler, not spooled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

from engine.compliance import make_token, unsubscribe_fields
from engine.config import Lane
from engine.dispatch import Dispatcher
from engine.envelope import Envelope, Recipient, domain_of, new_message_id
from engine.events import EventLog, message_record
from engine.message import ControlError, field_name, header_fields, prepare, received_field, split_message
from engine.signing import DkimSigner
from engine.smtp.server import Reply, Session
from engine.spool import Spool, SpoolError
from engine.suppression import SuppressionList

STORAGE_FAILED = Reply(452, "4.3.1", "Insufficient system storage, try again later")
QUEUE_FULL = Reply(452, "4.3.1", "Queue full, try again later")
ACCEPTED = Reply(250, "2.0.0", "Ok")

# Local mailboxes: lower-cased address -> handler of the whole message (it is not spooled for them).
Mailboxes = Mapping[str, Callable[[bytes], None]]


class Injector:
    """The one way into a worker's queue: spool durably, log Reception, schedule. Listeners use it for
    received mail and the engine for the DSNs it writes."""

    def __init__(self, spool: Spool, log: EventLog, dispatcher: Dispatcher) -> None:
        self._spool = spool
        self._log = log
        self._dispatcher = dispatcher

    async def inject(self, messages: Sequence[tuple[bytes, Envelope, bytes]], **fields: object) -> None:
        """Stores (key, envelope, message) triples all or none: if any store fails, those that succeeded are
        removed again and SpoolError is raised, so a client that retries gets no duplicates."""
        results = await asyncio.gather(
            *(self._spool.store(key, envelope.pack(), message) for key, envelope, message in messages),
            return_exceptions=True,
        )
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            stored = [key for (key, _, _), result in zip(messages, results, strict=True) if result is None]
            await asyncio.gather(*(self._spool.remove(key) for key in stored), return_exceptions=True)
            raise failures[0] if isinstance(failures[0], SpoolError) else SpoolError(str(failures[0]))
        for key, envelope, _ in messages:
            self._log.emit(
                message_record(
                    "Reception",
                    key,
                    envelope,
                    recipients=[r.address for r in envelope.recipients],
                    attempt=0,
                    **fields,
                )
            )
            self._dispatcher.schedule(key, envelope)


class ReceptionHandler:
    """The SMTP server's Handler for one lane's listeners in one worker."""

    def __init__(
        self,
        hostname: str,
        lane: Lane,
        listener_name: str,
        spool: Spool,
        log: EventLog,
        dispatcher: Dispatcher,
        signer: DkimSigner,
        *,
        secret: bytes | None = None,
        suppression: SuppressionList | None = None,
        mailboxes: Mailboxes | None = None,
    ) -> None:
        self.hostname = hostname
        self.signer = signer
        self._lane = lane
        self._listener = listener_name
        self._log = log
        self._dispatcher = dispatcher
        self._injector = Injector(spool, log, dispatcher)
        if lane.list_unsubscribe is not None and not secret:
            raise ValueError(f"lane {lane.name} adds List-Unsubscribe and needs the engine secret for its tokens")
        self._secret = secret
        self._suppression = suppression if lane.list_unsubscribe is not None else None
        self._mailboxes = mailboxes if mailboxes is not None else {}

    def check_recipient(self, session: Session, sender: str, recipient: str) -> Reply | None:
        return QUEUE_FULL if self._dispatcher.full else None

    def handle_message(
        self, session: Session, sender: str, recipients: list[str], message: bytes, params: dict
    ) -> Reply | object:
        key = new_message_id()
        protocol = session.protocol + ("S" if session.tls else "") + ("A" if session.authenticated else "")
        received = received_field(session.helo, session.peer[0], self.hostname, protocol, key.hex())
        message_id = f"Message-ID: <{key.hex()}@{self.hostname}>\r\n".encode()
        if self._mailboxes:
            recipients = self._deliver_locally(recipients, message)
            if not recipients:
                return ACCEPTED
        try:
            message, controls = prepare(message, received, message_id)
        except ControlError as error:
            reply = Reply(550, "5.6.0", str(error))
            self.rejected(session, sender, recipients, reply)
            return reply
        envelope = Envelope(
            sender=sender,
            recipients=[Recipient(address) for address in recipients],
            lane=self._lane.name,
            created=time.time(),
            size=len(message),
            priority=controls.priority,
            campaign=controls.campaign,
            tenant=controls.tenant,
        )
        if self._suppression is not None:
            envelope.recipients = self._unsuppressed(key, envelope)
            if not envelope.recipients:
                return ACCEPTED
        if self._lane.list_unsubscribe is not None and not _has_list_unsubscribe(message):
            copies = self._per_recipient(key, envelope, message)
        else:
            copies = [(key, envelope, message)]
        if self.signer.domains:
            return self._sign_and_store(session, copies)
        return self._store(session, copies)

    def _deliver_locally(self, recipients: list[str], message: bytes) -> list[str]:
        """Hands the message to the engine's own mailboxes among `recipients`; returns the others."""
        remote = []
        for recipient in recipients:
            mailbox = self._mailboxes.get(recipient.lower())
            if mailbox is None:
                remote.append(recipient)
            else:
                mailbox(message)
        return remote

    def _unsuppressed(self, key: bytes, envelope: Envelope) -> list[Recipient]:
        kept = []
        for recipient in envelope.recipients:
            if self._suppression.contains(recipient.address, envelope.tenant):
                self._log.emit(
                    message_record(
                        "Suppressed",
                        key,
                        envelope,
                        recipient=recipient.address,
                        domain=recipient.domain,
                        attempt=0,
                        listener=self._listener,
                    )
                )
            else:
                kept.append(recipient)
        return kept

    def _per_recipient(self, key: bytes, envelope: Envelope, message: bytes) -> list[tuple[bytes, Envelope, bytes]]:
        """One copy per recipient, each with its own unsubscribe token (signed later, over these fields)."""
        block, rest = split_message(message)
        copies = []
        for index, recipient in enumerate(envelope.recipients):
            token = make_token(self._secret, recipient.address, envelope.tenant, envelope.campaign)
            copy = block + unsubscribe_fields(self._lane.list_unsubscribe, token) + rest
            single = Envelope(
                sender=envelope.sender,
                recipients=[recipient],
                lane=envelope.lane,
                created=envelope.created,
                size=len(copy),
                priority=envelope.priority,
                campaign=envelope.campaign,
                tenant=envelope.tenant,
            )
            copies.append((key if index == 0 else new_message_id(), single, copy))
        return copies

    async def _sign_and_store(self, session: Session, copies: list[tuple[bytes, Envelope, bytes]]) -> Reply:
        """DKIM-signs every copy on the signing threads (the event loop goes on meanwhile), then stores them."""
        signer = self.signer
        signatures = await asyncio.gather(*(signer.sign_off_loop(message) for _, _, message in copies))
        signed = []
        for (key, envelope, message), signature in zip(copies, signatures, strict=True):
            if signature is not None:
                message = signature + message
                envelope.size = len(message)
            signed.append((key, envelope, message))
        return await self._store(session, signed)

    async def _store(self, session: Session, messages: list[tuple[bytes, Envelope, bytes]]) -> Reply:
        peer = {"host": session.helo, "address": session.peer[0]}
        try:
            await self._injector.inject(messages, listener=self._listener, peer=peer)
        except SpoolError as error:
            recipients = [r.address for _, envelope, _ in messages for r in envelope.recipients]
            self.rejected(session, messages[0][1].sender, recipients, STORAGE_FAILED, str(error))
            return STORAGE_FAILED
        queued = messages[0][0].hex()
        return Reply(250, "2.0.0", f"Ok: queued as {queued}", queued=queued)

    def rejected(
        self,
        session: Session,
        sender: str | None,
        recipients: Sequence[str],
        reply: Reply,
        detail: str | None = None,
    ) -> None:
        now = time.time()
        for recipient in recipients or (None,):
            record = {
                "type": "Rejection",
                "id": None,
                "lane": self._lane.name,
                "sender": sender,
                "recipient": recipient,
                "domain": domain_of(recipient) if recipient else None,
                "timestamp": now,
                "listener": self._listener,
                "peer": {"host": session.helo, "address": session.peer[0]},
                "response": {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text},
            }
            if detail:
                record["detail"] = detail
            self._log.emit(record)


def _has_list_unsubscribe(message: bytes) -> bool:
    """Whether the sender set List-Unsubscribe itself (then the engine leaves the message as it is)."""
    block, _ = split_message(message)
    if b"ist-unsubscribe" not in block.lower():
        return False
    return any(field_name(field) == b"list-unsubscribe" for field in header_fields(block))
