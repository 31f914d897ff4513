"""RFC 3464 delivery status notifications, parsed back with the email package as a mail client would."""

from __future__ import annotations

import email
import email.policy
import email.utils

import pytest

from engine.dsn import MAX_HEADER_BYTES, Failure, build_dsn, wants_dsn

HEADERS = b"From: alice@example.net\r\nTo: bob@dest.test\r\nSubject: order 42\r\nMessage-ID: <1@example.net>\r\n"


def dsn(failures: list[Failure], headers: bytes = HEADERS) -> bytes:
    return build_dsn(
        reporting_mta="mta.test",
        sender="alice@example.net",
        queue_id="00ab",
        arrival=1_795_000_000.0,
        failures=failures,
        original_headers=headers,
    )


def test_report_structure() -> None:
    raw = dsn(
        [
            Failure("bob@dest.test", 550, "5.1.1", "no such user", "mx.dest.test", 1_795_000_100.0),
            Failure("carol@dest.test", 451, None, "Message expired"),
        ]
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["To"] == "alice@example.net"
    assert report["From"].addresses[0].addr_spec == "MAILER-DAEMON@mta.test"
    assert report["Auto-Submitted"] == "auto-replied"
    human, status, headers = report.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert "<bob@dest.test>: 550 5.1.1 no such user" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, bob, carol = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mta.test"
    assert per_message["X-Engine-Queue-ID"] == "00ab"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == 1_795_000_000
    assert dict(bob) == {
        "Final-Recipient": "rfc822; bob@dest.test",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.dest.test",
        "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
        "Last-Attempt-Date": bob["Last-Attempt-Date"],
    }
    assert carol["Status"] == "4.0.0" and carol["Remote-MTA"] is None and carol["Last-Attempt-Date"] is None
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: order 42" in headers.get_payload()


def test_original_headers_are_capped() -> None:
    huge = HEADERS + b"X-Filler: " + b"x" * (2 * MAX_HEADER_BYTES) + b"\r\n"
    report = email.message_from_bytes(dsn([Failure("bob@dest.test", 550, "5.1.1", "gone")], huge))
    headers = list(report.walk())[-1]
    assert len(headers.get_payload()) <= MAX_HEADER_BYTES + 100


@pytest.mark.parametrize(("sender", "expected"), [("alice@example.net", True), ("", False), ("<>", False)])
def test_never_to_the_null_sender(sender: str, expected: bool) -> None:
    assert wants_dsn(sender) is expected
