"""What a lane worker does with a message its SMTP listener accepted: stamp it, spool it, schedule it.

The 250 goes back only after the spool's group commit made the message durable (SPEC "Durability").
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from engine.config import Lane
from engine.dispatch import Dispatcher
from engine.envelope import Envelope, Recipient, domain_of, new_message_id
from engine.events import EventLog, message_record
from engine.message import ControlError, prepare, received_field
from engine.signing import DkimSigner
from engine.smtp.server import Reply, Session
from engine.spool import Spool, SpoolError

STORAGE_FAILED = Reply(452, "4.3.1", "Insufficient system storage, try again later")
QUEUE_FULL = Reply(452, "4.3.1", "Queue full, try again later")


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
    ) -> None:
        self.hostname = hostname
        self.signer = signer
        self._lane = lane
        self._listener = listener_name
        self._spool = spool
        self._log = log
        self._dispatcher = dispatcher

    def check_recipient(self, session: Session, sender: str, recipient: str) -> Reply | None:
        return QUEUE_FULL if self._dispatcher.full else None

    def handle_message(
        self, session: Session, sender: str, recipients: list[str], message: bytes, params: dict
    ) -> Reply | object:
        key = new_message_id()
        protocol = session.protocol + ("S" if session.tls else "") + ("A" if session.authenticated else "")
        received = received_field(session.helo, session.peer[0], self.hostname, protocol, key.hex())
        message_id = f"Message-ID: <{key.hex()}@{self.hostname}>\r\n".encode()
        try:
            message, controls = prepare(message, received, message_id)
        except ControlError as error:
            reply = Reply(550, "5.6.0", str(error))
            self.rejected(session, sender, recipients, reply)
            return reply
        signature = self.signer.sign(message)
        if signature is not None:
            message = signature + message
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
        return self._store(session, key, envelope, message)

    async def _store(self, session: Session, key: bytes, envelope: Envelope, message: bytes) -> Reply:
        try:
            await self._spool.store(key, envelope.pack(), message)
        except SpoolError as error:
            recipients = [r.address for r in envelope.recipients]
            self.rejected(session, envelope.sender, recipients, STORAGE_FAILED, str(error))
            return STORAGE_FAILED
        self._log.emit(
            message_record(
                "Reception",
                key,
                envelope,
                recipients=[r.address for r in envelope.recipients],
                attempt=0,
                listener=self._listener,
                peer={"host": session.helo, "address": session.peer[0]},
            )
        )
        self._dispatcher.schedule(key, envelope)
        return Reply(250, "2.0.0", f"Ok: queued as {key.hex()}")

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
