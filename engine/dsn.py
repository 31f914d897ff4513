"""Delivery status notifications (RFC 3464): the multipart/report sent back to a message's sender.

Built with the standard library's email package, so the report parses the way mail clients and
bounce processors read it. A DSN goes out with the null reverse path and is never written for a message
that itself had the null reverse path (that is how a DSN is sent), so two MTAs can never bounce a
bounce back and forth (RFC 5321 4.5.5).
"""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP
from io import BytesIO

__all__ = ["Failure", "build_dsn", "wants_dsn"]

MAX_HEADER_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient the message could not be delivered to, as the event log recorded it."""

    recipient: str
    code: int
    enhanced: str | None
    text: str
    remote_mta: str | None = None  # host name of the server that refused, if one answered
    last_attempt: float | None = None  # Unix time

    @property
    def status(self) -> str:
        return self.enhanced or f"{self.code // 100}.0.0"


def wants_dsn(sender: str | None) -> bool:
    """False for the null reverse path: DSNs themselves, and mail whose sender asked for none."""
    return bool(sender) and sender != "<>"


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    queue_id: str,
    arrival: float,
    failures: Sequence[Failure],
    original_headers: bytes,
) -> bytes:
    """The complete DSN message (CRLF line ends) for the failed recipients of one message."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = sender
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = email.utils.formatdate(localtime=False)
    report["Message-ID"] = email.utils.make_msgid("dsn", domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: no vacation replies to this
    report.preamble = "This is a MIME-encapsulated message."
    explanation = _explanation(reporting_mta, failures)
    report.attach(MIMEText(explanation, "plain", "us-ascii" if explanation.isascii() else "utf-8"))
    report.attach(_delivery_status(reporting_mta, queue_id, arrival, failures))
    headers = MIMEBase("text", "rfc822-headers")
    headers.set_payload(original_headers[:MAX_HEADER_BYTES].decode("ascii", "replace"))
    report.attach(headers)
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=SMTP).flatten(report)
    return out.getvalue()


def _explanation(reporting_mta: str, failures: Sequence[Failure]) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    for failure in failures:
        reply = " ".join(part for part in (str(failure.code), failure.enhanced, failure.text) if part)
        lines.append(f"<{failure.recipient}>: {reply}")
    return "\n".join(lines) + "\n"


def _delivery_status(reporting_mta: str, queue_id: str, arrival: float, failures: Sequence[Failure]) -> MIMEBase:
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Engine-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = email.utils.formatdate(arrival, localtime=False)
    blocks = [per_message]
    for failure in failures:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {failure.recipient}"
        block["Action"] = "failed"
        block["Status"] = failure.status
        if failure.remote_mta:
            block["Remote-MTA"] = f"dns; {failure.remote_mta}"
        reply = " ".join(part for part in (str(failure.code), failure.enhanced, failure.text) if part)
        block["Diagnostic-Code"] = f"smtp; {reply}"
        if failure.last_attempt is not None:
            block["Last-Attempt-Date"] = email.utils.formatdate(failure.last_attempt, localtime=False)
        blocks.append(block)
    status = MIMEBase("message", "delivery-status")
    status.set_payload(blocks)
    return status
