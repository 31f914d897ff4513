"""Reception-time header changes and the spooled envelope format."""

from __future__ import annotations

import pytest

from engine.envelope import Envelope, Recipient, RecipientState, domain_of, new_message_id
from engine.message import ControlError, Controls, prepare, received_field

RECEIVED = b"Received: from x ([127.0.0.1])\r\n\tby mta.test (engine) with ESMTP id 1;\r\n\tdate\r\n"
MESSAGE_ID = b"Message-ID: <1@mta.test>\r\n"


def test_controls_read_and_removed_including_folded_values() -> None:
    message = (
        b"From: a@x.test\r\n"
        b"x-engine-campaign: spring\r\n sale\r\n"
        b"X-Engine-Tenant: acme\r\n"
        b"X-ENGINE-PRIORITY: 0\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"X-Engine-Tenant: in the body stays\r\n"
    )
    prepared, controls = prepare(message, RECEIVED, MESSAGE_ID)
    assert controls == Controls("spring sale", "acme", 0)
    assert prepared == (
        RECEIVED + b"From: a@x.test\r\nSubject: hi\r\n" + MESSAGE_ID + b"\r\nX-Engine-Tenant: in the body stays\r\n"
    )


def test_existing_message_id_kept_and_defaults() -> None:
    message = b"Message-Id: <mine@x.test>\r\n\r\nbody\r\n"
    prepared, controls = prepare(message, RECEIVED, MESSAGE_ID)
    assert prepared == RECEIVED + message
    assert controls == Controls(None, None, 5)


@pytest.mark.parametrize("message", [b"", b"just a body line without headers\r\n", b"\r\nbody\r\n"])
def test_degenerate_messages_still_get_trace_and_id(message: bytes) -> None:
    prepared, _ = prepare(message, RECEIVED, MESSAGE_ID)
    assert prepared.startswith(RECEIVED)
    assert MESSAGE_ID in prepared


@pytest.mark.parametrize("value", [b"10", b"high", b"-1", b""])
def test_bad_priority_refused(value: bytes) -> None:
    with pytest.raises(ControlError):
        prepare(b"X-Engine-Priority: " + value + b"\r\n\r\n", RECEIVED, MESSAGE_ID)


def test_received_field_is_sanitised() -> None:
    field = received_field("evil (x)\r\nInjected: 1", "127.0.0.1", "mta.test", "ESMTP", "ab")
    assert field.count(b"\r\n") == 3
    assert b"Injected: 1" not in field.replace(b"Injected:1", b"")
    assert field.startswith(b"Received: from evilxInjected:1 ([127.0.0.1])")


def test_envelope_round_trip_and_pending_groups() -> None:
    envelope = Envelope(
        sender="a@x.test",
        recipients=[Recipient("b@Y.test"), Recipient("c@y.test", RecipientState.DELIVERED), Recipient("d@z.test")],
        lane="bulk",
        created=1.5,
        size=10,
        priority=2,
        campaign="c",
        tenant="t",
    )
    restored = Envelope.unpack(envelope.pack())
    assert restored == envelope
    assert {d: [r.address for r in rs] for d, rs in restored.pending_by_domain().items()} == {
        "y.test": ["b@Y.test"],
        "z.test": ["d@z.test"],
    }
    assert not restored.finished
    for recipient in restored.recipients:
        recipient.state = RecipientState.FAILED
    assert restored.finished


def test_ids_unique_and_ordered() -> None:
    ids = [new_message_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)
    assert domain_of("User@Example.COM") == "example.com"
