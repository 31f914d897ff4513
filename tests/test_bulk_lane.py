"""Black-box tests of bulk lane compliance: `engine serve` as a real process, real SMTP sinks.

List-Unsubscribe on bulk (DKIM-signed, checked by Perl Mail::DKIM), none on transactional; unsubscribing
(token + suppression list, mailto) stops later bulk mail; the reputation guard suspends a campaign whose
destination refuses too many recipients; a refused transactional message comes back as an RFC 3464 DSN.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import smtplib
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.compliance import verify_token
from engine.signing import generate_key
from engine.suppression import SuppressionList, suppression_path
from tests.arf import arf_report
from tests.dnsserver import DnsServer
from tests.harness import Engine, Sink, free_port, wait_for

TESTS = Path(__file__).parent
SECRET = "bulk-lane-test-secret"
REFUSED = "550 5.1.1 no such user"
CAMPAIGN_SIZE = 200


@dataclass
class World:
    engine: Engine
    sink: Sink  # every destination
    senders: Sink  # the senders' domain: DSNs arrive here
    dns: DnsServer
    tx: int
    bulk: int
    admin: int
    notices: int


def config(sink: Sink, senders: Sink, tx: int, bulk: int, admin: int, notices: int, key_file: Path) -> str:
    return f"""
[engine]
hostname = "mta.test"
spool_dir = "spool"
log_dir = "logs"
secret = "{SECRET}"

[admin]
listen = "127.0.0.1:{admin}"

[routes]
"*" = "{sink.address}"
"senders.test" = "{senders.address}"

[[listeners]]
name = "tx"
listen = "127.0.0.1:{tx}"
lane = "transactional"

[[listeners]]
name = "bulk"
listen = "127.0.0.1:{bulk}"
lane = "bulk"
max_recipients = 500

[[listeners]]
name = "notices"
listen = "127.0.0.1:{notices}"
lane = "notices"

[lanes.transactional]
retry_intervals = ["1s"]
dsn = true

[lanes.notices]
retry_intervals = ["500ms"]
max_age = "2s"
dsn = true

[lanes.bulk]
retry_intervals = ["1s"]
list_unsubscribe = {{ mailto = "unsubscribe@mta.test", url = "https://mta.test/unsubscribe/{{token}}" }}

[shaping.default]
connection_limit = 1

[dkim."example.net"]
selector = "s2026"
key_file = "{key_file}"

[reputation]
window = "1h"
min_messages = 20
max_bounce_rate = "5%"
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("bulk")
    rules = f"u??0@campaign.test={REFUSED};bob@refusing.test={REFUSED};*@deferring.test=451 4.2.0 busy"
    sink = Sink(directory / "sink", reply=rules)
    senders = Sink(directory / "senders")
    key_file = directory / "example.net.pem"
    with DnsServer() as dns:
        name, value = generate_key("example.net", "s2026", "rsa-sha256", key_file)
        dns.add(name, "TXT", value)
        ports = free_port(), free_port(), free_port(), free_port()
        engine = Engine(directory, config(sink, senders, *ports, key_file)).start(list(ports))
        try:
            yield World(engine, sink, senders, dns, *ports)
        finally:
            engine.stop()
            sink.stop()
            senders.stop()


def message(subject: str, campaign: str | None = None, tenant: str | None = "acme") -> bytes:
    controls = ""
    if campaign:
        controls += f"X-Engine-Campaign: {campaign}\r\n"
    if tenant:
        controls += f"X-Engine-Tenant: {tenant}\r\n"
    return (
        f"From: News <news@example.net>\r\nTo: list@example.net\r\nSubject: {subject}\r\n"
        f"Date: Sun, 29 Nov 2026 02:00:00 +0000\r\n{controls}\r\nHello,\r\n\r\nthe news of {subject}.\r\n"
    ).encode()


def send(port: int, sender: str, recipients: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(sender, recipients, data)


def arrived(sink: Sink, subject: str) -> dict[str, bytes]:
    """Recipient → message bytes of what reached the sink with this subject."""
    found = {}
    for envelope, data in sink.messages():
        if f"Subject: {subject}\r\n".encode() in data:
            for recipient in envelope["recipients"]:
                found[recipient] = data
    return found


def dkim_verify(world: World, data: bytes) -> tuple[bool, str]:
    if subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e1"], capture_output=True).returncode:
        pytest.fail("Perl Mail::DKIM missing: apt-get install -y libmail-dkim-perl")
    done = subprocess.run(
        ["perl", str(TESTS / "dkim_verify.pl"), "--dns", f"{world.dns.host}:{world.dns.port}"],
        input=data,
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def token_of(data: bytes) -> str:
    match = re.search(rb"<https://mta\.test/unsubscribe/([A-Za-z0-9_-]+)>", data)
    assert match, data[:2000]
    return match.group(1).decode()


def signed_fields(data: bytes) -> list[str]:
    signature = re.search(rb"DKIM-Signature:(.*?)\r\n(?! )(?!\t)", data, re.S).group(1)
    tags = dict(t.split("=", 1) for t in re.sub(r"\s+", "", signature.decode()).rstrip(";").split(";"))
    return tags["h"].lower().split(":")


def test_bulk_gets_signed_list_unsubscribe_per_recipient(world: World) -> None:
    recipients = ["ann@dest.test", "ben@dest.test", "cat@other.test"]
    send(world.bulk, "news@example.net", recipients, message("headers", "spring"))
    wait_for(lambda: len(arrived(world.sink, "headers")) == 3, 15, what="three bulk copies")
    copies = arrived(world.sink, "headers")
    tokens = set()
    for recipient, data in copies.items():
        header = data.partition(b"\r\n\r\n")[0]
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert header.count(b"List-Unsubscribe:") == 1
        token = token_of(data)
        assert f"<mailto:unsubscribe@mta.test?subject=unsubscribe%20{token}>" in str(parsed["List-Unsubscribe"])
        assert verify_token(SECRET, token) == (recipient, "acme", "spring")
        tokens.add(token)
        assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(signed_fields(data))
        passed, report = dkim_verify(world, data)
        assert passed, report
    assert len(tokens) == 3
    receptions = [r for r in world.engine.events("Reception") if r["lane"] == "bulk" and r["campaign"] == "spring"]
    assert sorted(r["recipients"][0] for r in receptions) == sorted(recipients)
    assert all(len(r["recipients"]) == 1 for r in receptions)


def test_sender_set_list_unsubscribe_is_kept(world: World) -> None:
    own = b"List-Unsubscribe: <https://example.net/own>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    send(world.bulk, "news@example.net", ["dan@dest.test", "eve@dest.test"], own + message("own header", "own"))
    wait_for(lambda: len(arrived(world.sink, "own header")) == 2, 15, what="bulk with its own header")
    for data in arrived(world.sink, "own header").values():
        assert data.count(b"List-Unsubscribe:") == 1 and b"<https://example.net/own>" in data
        passed, report = dkim_verify(world, data)
        assert passed, report


def test_transactional_gets_no_list_unsubscribe(world: World) -> None:
    send(world.tx, "news@example.net", ["fay@dest.test"], message("receipt"))
    wait_for(lambda: arrived(world.sink, "receipt"), 15, what="transactional message")
    data = arrived(world.sink, "receipt")["fay@dest.test"]
    assert b"List-Unsubscribe" not in data
    passed, report = dkim_verify(world, data)
    assert passed, report


def suppressed_records(world: World, recipient: str) -> list[dict]:
    return [r for r in world.engine.events("Suppressed") if r["recipient"] == recipient]


def test_unsubscribed_recipient_is_suppressed_and_never_mailed(world: World) -> None:
    """What POST /unsubscribe/{token} does (verify the token, add to the suppression list), done here on the
    same shared list from another process while the engine runs; later bulk mail stops at reception."""
    send(world.bulk, "news@example.net", ["gil@dest.test", "hal@dest.test"], message("before", "summer"))
    wait_for(lambda: len(arrived(world.sink, "before")) == 2, 15, what="first campaign")
    recipient, tenant, _ = verify_token(SECRET, token_of(arrived(world.sink, "before")["gil@dest.test"]))
    suppressed = SuppressionList(suppression_path(world.engine.directory / "spool"))
    try:
        assert suppressed.add(recipient, tenant, "one-click unsubscribe")
    finally:
        suppressed.close()
    send(world.bulk, "news@example.net", ["gil@dest.test", "hal@dest.test"], message("after", "summer"))
    wait_for(lambda: "hal@dest.test" in arrived(world.sink, "after"), 15, what="second campaign")
    wait_for(lambda: suppressed_records(world, "gil@dest.test"), 5, what="Suppressed record")
    time.sleep(0.5)
    assert list(arrived(world.sink, "after")) == ["hal@dest.test"]
    (record,) = suppressed_records(world, "gil@dest.test")
    assert (record["lane"], record["tenant"], record["campaign"]) == ("bulk", "acme", "summer")
    other_tenant = message("other tenant", "summer", tenant="globex")
    send(world.bulk, "news@example.net", ["gil@dest.test"], other_tenant)
    wait_for(lambda: arrived(world.sink, "other tenant"), 15, what="mail of another tenant")


def test_mail_to_the_mailto_address_unsubscribes(world: World) -> None:
    send(world.bulk, "news@example.net", ["ida@dest.test"], message("mailto first", "autumn"))
    wait_for(lambda: arrived(world.sink, "mailto first"), 15, what="first message")
    token = token_of(arrived(world.sink, "mailto first")["ida@dest.test"])
    request = f"From: ida@dest.test\r\nTo: unsubscribe@mta.test\r\nSubject: unsubscribe {token}\r\n\r\n\r\n"
    send(world.tx, "ida@dest.test", ["unsubscribe@mta.test"], request.encode())
    send(world.bulk, "news@example.net", ["ida@dest.test", "jon@dest.test"], message("mailto later", "autumn"))
    wait_for(lambda: suppressed_records(world, "ida@dest.test"), 10, what="Suppressed record")
    wait_for(lambda: "jon@dest.test" in arrived(world.sink, "mailto later"), 15, what="jon's copy")
    time.sleep(0.5)
    assert "ida@dest.test" not in arrived(world.sink, "mailto later")
    assert not [e for e, _ in world.sink.messages() if "unsubscribe@mta.test" in e["recipients"]]


def admin_request(world: World, path: str, body: bytes | None = None, **headers: str) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{world.admin}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def is_suppressed(world: World, address: str, tenant: str) -> bool:
    suppressed = SuppressionList(suppression_path(world.engine.directory / "spool"))
    try:
        return suppressed.contains(address, tenant)
    finally:
        suppressed.close()


def test_one_click_endpoint(world: World) -> None:
    send(world.bulk, "news@example.net", ["kim@dest.test"], message("one click first", "winter"))
    wait_for(lambda: arrived(world.sink, "one click first"), 15, what="first message")
    token = token_of(arrived(world.sink, "one click first")["kim@dest.test"])

    def post(path: str, body: bytes = b"List-Unsubscribe=One-Click") -> int:
        return admin_request(world, path, body, **{"Content-Type": "application/x-www-form-urlencoded"})[0]

    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert post(f"/unsubscribe/{forged}") == 400
    assert post("/unsubscribe/not-a-token") == 400
    assert post(f"/unsubscribe/{token}", b"List-Unsubscribe=Maybe") == 400
    status, page = admin_request(world, f"/unsubscribe/{token}")  # a link scanner, or a person who clicks
    assert status == 200 and b"kim@dest.test" in page and b'method="post"' in page
    assert admin_request(world, f"/unsubscribe/{forged}")[0] == 400
    assert not is_suppressed(world, "kim@dest.test", "acme")
    assert post(f"/unsubscribe/{token}") == 200
    assert is_suppressed(world, "kim@dest.test", "acme")
    send(world.bulk, "news@example.net", ["kim@dest.test", "lee@dest.test"], message("one click later", "winter"))
    wait_for(lambda: suppressed_records(world, "kim@dest.test"), 10, what="Suppressed record")
    wait_for(lambda: "lee@dest.test" in arrived(world.sink, "one click later"), 15, what="lee's copy")
    time.sleep(0.5)
    assert "kim@dest.test" not in arrived(world.sink, "one click later")


def test_complaint_posted_to_the_api_suppresses(world: World) -> None:
    send(world.bulk, "news@example.net", ["max@dest.test"], message("complained about", "autumn"))
    wait_for(lambda: arrived(world.sink, "complained about"), 15, what="the message")
    original = arrived(world.sink, "complained about")["max@dest.test"]
    report = arf_report(original)
    assert admin_request(world, "/api/v1/complaints", b"not a report")[0] == 400
    status, body = admin_request(world, "/api/v1/complaints", report, **{"Content-Type": "message/rfc822"})
    assert status == 200, body
    expected = {"recipient": "max@dest.test", "tenant": "acme", "campaign": "autumn", "suppressed": True}
    assert json.loads(body) == expected
    assert is_suppressed(world, "max@dest.test", "acme")


def test_reputation_guard_suspends_a_campaign_with_too_many_hard_bounces(world: World) -> None:
    recipients = [f"u{n:03d}@campaign.test" for n in range(CAMPAIGN_SIZE)]  # u??0 (10 %) are refused
    data = message("blast", "black-friday")
    send(world.bulk, "news@example.net", recipients, data)

    def alert() -> list[dict]:
        return [r for r in world.engine.events("Alert") if r.get("campaign") == "black-friday"]

    (record,) = wait_for(alert, 20, what="reputation Alert")
    assert record["lane"] == "bulk" and record["tenant"] == "acme" and record["rule"] == "reputation"
    assert record["bounce_rate"] > 0.05 and record["messages"] >= 20
    time.sleep(1.5)
    outcomes = [
        r for r in world.engine.events("Delivery", "Bounce") if r["campaign"] == "black-friday"
    ]  # suspended: no more attempts
    assert 20 <= len(outcomes) < CAMPAIGN_SIZE // 2
    bounces = [r for r in outcomes if r["type"] == "Bounce"]
    assert bounces and all(r["bounce_class"] == "bad-mailbox" for r in bounces)
    assert len(arrived(world.sink, "blast")) == len(outcomes) - len(bounces)
    suppressed = SuppressionList(suppression_path(world.engine.directory / "spool"))
    try:
        wait_for(lambda: all(suppressed.contains(r["recipient"], "other") for r in bounces), 5, what="suppressed")
        assert suppressed.get(bounces[0]["recipient"]).reason == "hard bounce"
    finally:
        suppressed.close()


def test_refused_transactional_message_comes_back_as_a_dsn(world: World) -> None:
    send(world.tx, "alice@senders.test", ["bob@refusing.test"], message("order 42", tenant=None))
    wait_for(lambda: world.senders.count() >= 1, 15, what="DSN at the sender's domain")
    (envelope, data), *_ = world.senders.messages()
    assert envelope["sender"] == "" and envelope["recipients"] == ["alice@senders.test"]
    report = email.message_from_bytes(data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, headers = report.iter_parts()
    assert "bob@refusing.test" in human.get_content()
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mta.test"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@refusing.test"
    assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "5.1.1")
    assert per_recipient["Diagnostic-Code"] == f"smtp; {REFUSED}"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: order 42" in headers.get_payload()
    bounce = next(r for r in world.engine.events("Bounce") if r["recipient"] == "bob@refusing.test")
    assert bounce["bounce_class"] == "bad-mailbox"
    # A message with the null sender (a DSN itself) never gets one.
    send(world.tx, "", ["bob@refusing.test"], message("order 43", tenant=None))
    wait_for(lambda: len([r for r in world.engine.events("Bounce") if r["recipient"] == "bob@refusing.test"]) == 2)
    time.sleep(1.0)
    assert len(dsns_to(world, "alice@senders.test")) == 1


def dsns_to(world: World, recipient: str) -> list[bytes]:
    return [data for envelope, data in world.senders.messages() if envelope["recipients"] == [recipient]]


def test_expired_message_comes_back_as_a_dsn(world: World) -> None:
    send(world.notices, "carl@senders.test", ["slow@deferring.test"], message("notice 7", tenant=None))
    wait_for(lambda: dsns_to(world, "carl@senders.test"), 15, what="DSN after expiry")
    (data,) = dsns_to(world, "carl@senders.test")
    report = email.message_from_bytes(data, policy=email.policy.default)
    _, per_recipient = list(report.iter_parts())[1].get_payload()
    assert per_recipient["Final-Recipient"] == "rfc822; slow@deferring.test"
    assert per_recipient["Action"] == "failed" and per_recipient["Status"] in ("4.2.0", "5.4.7")
    (expiration,) = [r for r in world.engine.events("Expiration") if r["recipient"] == "slow@deferring.test"]
    assert expiration["bounce_class"] == "message-expired" and expiration["lane"] == "notices"
    retries = [r for r in world.engine.events("TransientFailure") if r["recipient"] == "slow@deferring.test"]
    assert retries and all(r["bounce_class"] == "other" for r in retries)


def test_recipient_suppressed_while_queued_is_not_retried(world: World) -> None:
    send(world.bulk, "news@example.net", ["max@deferring.test"], message("queued", "spring"))

    def retries() -> list[dict]:
        return [r for r in world.engine.events("TransientFailure") if r["recipient"] == "max@deferring.test"]

    wait_for(retries, 15, what="first deferral")
    assert retries()[0]["bounce_class"] == "other"
    suppressed = SuppressionList(suppression_path(world.engine.directory / "spool"))
    try:
        suppressed.add("max@deferring.test", None, "operator")
    finally:
        suppressed.close()
    (record,) = wait_for(lambda: suppressed_records(world, "max@deferring.test"), 10, what="Suppressed at retry")
    assert record["attempt"] >= 1
    settled = len(retries())
    time.sleep(1.5)
    assert len(retries()) == settled
