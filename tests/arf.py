"""ARF feedback reports (RFC 5965) as a mailbox provider's feedback loop sends them, for tests."""

from __future__ import annotations

import email
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText


def arf_report(original: bytes, *, as_headers: bool = False) -> bytes:
    report = MIMEMultipart("report", report_type="feedback-report")
    report["From"] = "fbl@isp.test"
    report["To"] = "fbl@mta.test"
    report["Subject"] = "FW: spring news"
    report.attach(MIMEText("This is an email abuse report for an email message received from IP 127.0.0.3"))
    fields = MIMEBase("message", "feedback-report")
    fields.set_payload(
        "Feedback-Type: abuse\r\nUser-Agent: SomeGenerator/1.0\r\nVersion: 1\r\n"
        "Original-Mail-From: <news@example.net>\r\nOriginal-Rcpt-To: <bob@dest.test>\r\n"
    )
    report.attach(fields)
    if as_headers:
        part = MIMEBase("text", "rfc822-headers")
        part.set_payload(original.partition(b"\r\n\r\n")[0].decode() + "\r\n")
    else:
        part = MIMEBase("message", "rfc822")
        part.set_payload([email.message_from_bytes(original)])
    report.attach(part)
    return report.as_bytes()
