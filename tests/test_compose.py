"""Messages built for HTTP injection (engine.compose): substitutions, raw content, built content."""

from __future__ import annotations

import email
import email.policy

import pytest

from engine.compose import ContentError, built_message, raw_message, substitute


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hi {{name}}", "Hi Ann"),
        ("Hi {{ name }}, {{ n }} items", "Hi Ann, 3 items"),
        ("Hi {{ missing }}!", "Hi !"),
        ("{{ not a name }} {x} {{", "{{ not a name }} {x} {{"),
        ("no placeholders", "no placeholders"),
    ],
)
def test_substitute(text: str, expected: str) -> None:
    assert substitute(text, {"name": "Ann", "n": 3}) == expected


def test_raw_message_gets_crlf_line_ends_and_a_final_one() -> None:
    assert raw_message("Subject: {{s}}\nFrom: a@b.test\r\n\nbody\rmore", {"s": "x"}) == (
        b"Subject: x\r\nFrom: a@b.test\r\n\r\nbody\r\nmore\r\n"
    )


@pytest.mark.parametrize(("content", "reason"), [("", "empty"), (" \n", "empty"), ("S: x\n\n" + "y" * 999, "998")])
def test_raw_message_refuses(content: str, reason: str) -> None:
    with pytest.raises(ContentError, match=reason):
        raw_message(content, {})


def test_built_message_is_seven_bit_and_carries_every_field() -> None:
    data = built_message(
        {
            "from": "Shop <shop@example.net>",
            "reply_to": {"email": "help@example.net", "name": "Help"},
            "subject": "Grüße {{ name }}",
            "text_body": "Liebe {{ name }}, ünïcödé",
            "headers": {"X-Order": "{{ order }}", "To": "Someone <list@example.net>"},
        },
        "ann@dest.test",
        {"name": "Ann", "order": 7},
    )
    assert all(byte < 128 for byte in data) and b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    message = parse(data)
    assert str(message["Subject"]) == "Grüße Ann" and message["X-Order"] == "7"
    assert str(message["To"]) == "Someone <list@example.net>"  # the headers' To wins over the recipient
    assert str(message["Reply-To"]) == "Help <help@example.net>" and message["Date"] is not None
    assert message.get_content().strip() == "Liebe Ann, ünïcödé"


def test_built_message_html_only() -> None:
    message = parse(built_message({"from": "a@b.test", "html_body": "<b>{{x}}</b>"}, "r@d.test", {"x": 1}))
    assert message.get_content_type() == "text/html" and message.get_content().strip() == "<b>1</b>"
    assert str(message["To"]) == "r@d.test"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ({"text_body": "x"}, "content.from is required"),
        ({"from": "a@b.test"}, "text_body, html_body or both"),
        ({"from": "a@b.test", "text_body": "x", "bcc": "c@d.test"}, "unknown field"),
        ({"from": "a@b.test", "text_body": "x", "subject": "a\r\nBcc: c@d.test"}, "linefeed"),
        ({"from": "a@b.test", "text_body": "x", "headers": {"Bad Name": "v"}}, "not a header field name"),
        ({"from": "a@b.test", "text_body": 3}, "content.text_body must be a string"),
        ({"from": {"email": "nobody"}, "text_body": "x"}, "content.from.email"),
    ],
)
def test_built_message_refuses(content: dict, reason: str) -> None:
    with pytest.raises(ContentError, match=reason):
        built_message(content, "r@d.test", {})
