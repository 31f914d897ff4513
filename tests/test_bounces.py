"""Bounce classification: built-in table on real-world replies, operator rules from the configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.bounces import BOUNCE_CLASSES, BUILTIN_RULES, HARD_CLASSES, BounceClassifier
from engine.config import BounceRule, load_config

REPLIES = [
    (550, "5.1.1", "The email account that you tried to reach does not exist.", "bad-mailbox"),
    (550, None, "Requested action not taken: mailbox unavailable", "bad-mailbox"),
    (550, "5.1.1", "<bob@example.org>: Recipient address rejected: User unknown", "bad-mailbox"),
    (550, None, "No such user here", "bad-mailbox"),
    (550, "5.1.2", "domain dest.test does not exist", "bad-domain"),
    (556, "5.1.10", "domain dest.test accepts no mail (null MX)", "bad-domain"),
    (550, "5.2.1", "The email account that you tried to reach is disabled.", "inactive-mailbox"),
    (552, "5.2.2", "The email account that you tried to reach is over quota.", "quota-issues"),
    (452, "4.2.2", "Mailbox full", "quota-issues"),
    (552, None, "Requested mail action aborted: exceeded storage allocation", "quota-issues"),
    (554, "5.7.1", "Service unavailable; Client host [1.2.3.4] blocked using zen.spamhaus.org", "spam-related"),
    (550, "5.7.1", "Our system has detected that this message is likely unsolicited mail (spam)", "spam-related"),
    (550, "5.7.26", "Unauthenticated email is not accepted due to DMARC policy", "policy-related"),
    (421, "4.7.0", "Try again later, closing connection. (rate limited)", "policy-related"),
    (550, "5.7.0", "Message rejected: virus found in attachment", "content-related"),
    (552, "5.3.4", "Message size exceeds fixed limit", "content-related"),
    (451, "4.4.1", "no next hop reachable from this egress address", "routing-errors"),
    (451, "4.4.2", "connection with mx.test lost: reset", "routing-errors"),
    (551, "5.4.7", "Message expired (max_age reached)", "message-expired"),
    (501, "5.1.7", "invalid sender address: control or angle bracket characters", "invalid-sender"),
    (553, None, "Sender address rejected: Domain not found", "invalid-sender"),
    (500, "5.5.1", "Command unrecognized", "protocol-errors"),
    (554, None, "Transaction failed", "other"),
]


@pytest.mark.parametrize(("code", "enhanced", "text", "expected"), REPLIES)
def test_builtin_table(code: int, enhanced: str | None, text: str, expected: str) -> None:
    assert BounceClassifier().classify(code, enhanced, text) == expected


def test_every_builtin_class_is_known_and_reachable() -> None:
    used = {rule.bounce_class for rule in BUILTIN_RULES}
    assert used <= set(BOUNCE_CLASSES)
    assert used | {"other"} == set(BOUNCE_CLASSES)
    assert {expected for *_, expected in REPLIES} == set(BOUNCE_CLASSES)
    assert {"bad-mailbox", "bad-domain"} == HARD_CLASSES


def test_operator_rules_come_first() -> None:
    classifier = BounceClassifier(
        [
            BounceRule("spam-related", code="550", text=r"policy violation \(PV-\d+\)"),
            BounceRule("inactive-mailbox", enhanced="5.1.1", text="dormant"),
            BounceRule("policy-related", code="4??"),
        ]
    )
    assert classifier.classify(550, "5.7.1", "policy violation (PV-42)") == "spam-related"
    assert classifier.classify(551, "5.7.1", "policy violation (PV-42)") == "policy-related"
    assert classifier.classify(550, "5.1.1", "account dormant") == "inactive-mailbox"
    assert classifier.classify(550, "5.1.1", "user unknown") == "bad-mailbox"
    assert classifier.classify(451, "4.4.1", "no next hop") == "policy-related"


def test_unknown_class_is_refused() -> None:
    with pytest.raises(ValueError):
        BounceClassifier([BounceRule("soft", code="4??")])


def test_rules_from_configuration(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(
        "[bounces]\n"
        'rules = [{ class = "spam-related", text = "(?i)listed at example-rbl" },\n'
        '         { class = "quota-issues", code = 450, enhanced = "4.2.*" }]\n'
    )
    classifier = BounceClassifier.from_config(load_config(path))
    assert classifier.classify(550, "5.1.1", "Listed at example-RBL") == "spam-related"
    assert classifier.classify(450, "4.2.0", "try later") == "quota-issues"
