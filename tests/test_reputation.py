"""The reputation guard on a real Dispatcher, ARF parsing (RFC 5965), the shared complaint log, and the
postmaster's feedback mailbox end to end on a real spool, event log and suppression list."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from engine.compliance import make_token
from engine.config import ReputationSettings, load_config
from engine.dispatch import Dispatcher
from engine.events import EventLog
from engine.postmaster import Postmaster
from engine.reputation import ComplaintLog, ReputationGuard, _Window, parse_arf
from engine.signing import DkimSigner
from engine.spool import Spool
from engine.throttle import ThrottleTable
from tests.arf import arf_report

SETTINGS = ReputationSettings(window=3600.0, min_messages=20, max_bounce_rate=0.05, max_complaint_rate=0.01)


@pytest.fixture
def config(tmp_path: Path):
    path = tmp_path / "engine.toml"
    path.write_text(
        '[engine]\nhostname = "mta.test"\nspool_dir = "spool"\nlog_dir = "logs"\nsecret = "s"\n'
        '[reputation]\nfeedback_address = "fbl@mta.test"\nmin_messages = 20\nmax_complaint_rate = "1%"\n'
    )
    return load_config(path)


@pytest.fixture
def dispatcher(tmp_path: Path, config) -> Dispatcher:
    events = EventLog(tmp_path / "logs", "test")
    return Dispatcher(
        config, config.lanes["bulk"], Spool(tmp_path / "spool" / "bulk"), events, {}, throttle=ThrottleTable.create()
    )


def outcome(kind: str, campaign: str | None = "spring", bounce_class: str | None = None, lane: str = "bulk") -> dict:
    return {"type": kind, "lane": lane, "campaign": campaign, "tenant": "acme", "bounce_class": bounce_class}


def test_window_forgets_old_buckets() -> None:
    window = _Window(60.0)
    window.add(1000.0, outcomes=10, hard=2)
    window.add(1030.0, outcomes=5, complaints=1)
    assert window.totals(1030.0) == (15, 2, 1)
    assert window.totals(1062.0) == (5, 0, 1)
    assert window.totals(1100.0) == (0, 0, 0)


def test_no_verdict_below_min_messages(dispatcher: Dispatcher) -> None:
    alerts: list[dict] = []
    guard = ReputationGuard(SETTINGS, "bulk", dispatcher, alerts.append)
    for _ in range(19):
        guard.observe(outcome("Bounce", bounce_class="bad-mailbox"))
    assert not alerts and not dispatcher.suspensions()


def test_hard_bounces_above_the_limit_suspend_the_campaign_once(dispatcher: Dispatcher) -> None:
    alerts: list[dict] = []
    guard = ReputationGuard(SETTINGS, "bulk", dispatcher, alerts.append)
    for n in range(40):
        guard.observe(outcome("Bounce" if n % 10 == 0 else "Delivery", bounce_class="bad-mailbox"))
        guard.observe(outcome("Bounce", campaign=None, bounce_class="bad-mailbox"))  # no campaign: not counted
        guard.observe(outcome("Bounce", lane="transactional", bounce_class="bad-mailbox"))  # other lane
    (alert,) = alerts
    assert alert["type"] == "Alert" and alert["campaign"] == "spring" and alert["tenant"] == "acme"
    assert alert["messages"] == 20 and alert["bounce_rate"] == pytest.approx(0.1)
    (suspension,) = dispatcher.suspensions()
    assert (suspension["campaign"], suspension["tenant"]) == ("spring", "acme")
    assert suspension["id"] == alert["suspension"]


def test_soft_bounces_do_not_count(dispatcher: Dispatcher) -> None:
    alerts: list[dict] = []
    guard = ReputationGuard(SETTINGS, "bulk", dispatcher, alerts.append)
    for _ in range(50):
        guard.observe(outcome("Bounce", bounce_class="quota-issues"))
        guard.observe(outcome("Expiration", bounce_class="message-expired"))
    assert not alerts
    assert guard.rates("acme", "spring") == {"messages": 100, "bounce_rate": 0.0, "complaint_rate": 0.0}


def test_resume_starts_the_counts_afresh(dispatcher: Dispatcher) -> None:
    alerts: list[dict] = []
    guard = ReputationGuard(SETTINGS, "bulk", dispatcher, alerts.append)
    for _ in range(20):
        guard.observe(outcome("Bounce", bounce_class="bad-domain"))
    dispatcher.resume(alerts[0]["suspension"])
    for _ in range(19):
        guard.observe(outcome("Bounce", bounce_class="bad-domain"))
    assert len(alerts) == 1 and not dispatcher.suspensions()
    for _ in range(2):
        guard.observe(outcome("Bounce", bounce_class="bad-domain"))
    assert len(alerts) == 2 and dispatcher.suspensions()


def test_complaints_above_the_limit_suspend(dispatcher: Dispatcher) -> None:
    alerts: list[dict] = []
    guard = ReputationGuard(SETTINGS, "bulk", dispatcher, alerts.append)
    for _ in range(100):
        guard.observe(outcome("Delivery"))
    guard.complaint("acme", "unknown-campaign")
    guard.complaint("acme", "spring")
    assert not alerts
    guard.complaint("acme", "spring")
    (alert,) = alerts
    assert alert["complaint_rate"] == pytest.approx(0.02) and "complaint rate" in alert["message"]


ORIGINAL = (
    b"From: news@example.net\r\nTo: bob@dest.test\r\nSubject: spring news\r\n"
    b"List-Unsubscribe: <https://mta.test/unsubscribe/TOKEN>\r\n\r\nHello\r\n"
)


@pytest.mark.parametrize("as_headers", [False, True], ids=["message/rfc822", "text/rfc822-headers"])
def test_parse_arf(as_headers: bool) -> None:
    report = parse_arf(arf_report(ORIGINAL, as_headers=as_headers))
    assert report is not None
    assert report.feedback_type == "abuse"
    assert report.user_agent == "SomeGenerator/1.0"
    assert report.original_mail_from == "<news@example.net>"
    assert report.original_rcpt_to == ("bob@dest.test",)
    assert b"List-Unsubscribe: <https://mta.test/unsubscribe/TOKEN>" in report.original_headers
    assert b"Hello" not in report.original_headers


@pytest.mark.parametrize(
    "message",
    [
        b"From: a@b.test\r\nSubject: hi\r\n\r\nnot a report\r\n",
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n',
        b"",
    ],
)
def test_parse_arf_refuses_other_mail(message: bytes) -> None:
    assert parse_arf(message) is None


def _in_another_process(path: Path, code: str) -> str:
    script = f"import sys\nfrom engine.reputation import ComplaintLog\nlog = ComplaintLog(sys.argv[1])\n{code}\n"
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_complaint_log_is_shared_and_read_once(tmp_path: Path) -> None:
    reader = ComplaintLog(tmp_path / "c")
    assert reader.new() == []
    _in_another_process(tmp_path / "c", "log.add('acme', 'spring', 'bob@dest.test'); log.add(None, 'fall', 'c@d.test')")
    assert reader.new() == [("acme", "spring", "bob@dest.test"), (None, "fall", "c@d.test")]
    assert reader.new() == []
    # a worker started later does not count old complaints again
    assert _in_another_process(tmp_path / "c", "print(log.new())") == "[]"
    reader.close()


def test_postmaster_feedback_mailbox(tmp_path: Path, config) -> None:
    """An ARF report mailed to the feedback address suppresses the recipient its token names, for its
    tenant, and the complaint reaches every worker's guard through the complaint log."""

    async def scenario() -> None:
        lane = config.lanes["bulk"]
        events = EventLog(tmp_path / "logs", "bulk-0")
        spool = Spool(tmp_path / "spool" / "bulk" / "0")
        dispatcher = Dispatcher(config, lane, spool, events, {}, throttle=ThrottleTable.create())
        postmaster = Postmaster(config, lane, spool, events, dispatcher, DkimSigner.from_config({}))
        mailboxes = postmaster.mailboxes()
        assert set(mailboxes) == {"fbl@mta.test", f"unsubscribe@{config.engine.hostname}"}
        token = make_token(postmaster.secret, "bob@dest.test", "acme", "spring")
        original = ORIGINAL.replace(b"TOKEN", token.encode())
        mailboxes["fbl@mta.test"](arf_report(original))
        assert postmaster.suppression.contains("bob@dest.test", "acme")
        assert not postmaster.suppression.contains("bob@dest.test", "globex")
        assert postmaster.complaints.new() == [("acme", "spring", "bob@dest.test")]
        mailboxes["fbl@mta.test"](arf_report(ORIGINAL))  # no valid token: ignored
        assert postmaster.complaints.new() == []
        await postmaster.close()
        await spool.close()
        events.close()

    asyncio.run(scenario())


def test_settings_are_plain_data() -> None:
    assert dataclasses.asdict(SETTINGS)["max_complaint_rate"] == 0.01


def test_postmaster_reload_updates_mailboxes_in_place(tmp_path: Path, config) -> None:
    async def scenario() -> None:
        lane = config.lanes["bulk"]
        events = EventLog(tmp_path / "logs", "bulk-0")
        spool = Spool(tmp_path / "spool" / "bulk" / "0")
        dispatcher = Dispatcher(config, lane, spool, events, {}, throttle=ThrottleTable.create())
        postmaster = Postmaster(config, lane, spool, events, dispatcher, DkimSigner.from_config({}))
        mailboxes = postmaster.reception_options()["mailboxes"]
        assert "fbl@mta.test" in mailboxes
        path = tmp_path / "engine.toml"
        path.write_text(path.read_text().replace("fbl@mta.test", "abuse-reports@mta.test").replace("1%", "2%"))
        reloaded = load_config(path)
        postmaster.reload(reloaded, reloaded.lanes["bulk"], DkimSigner.from_config({}))
        assert "abuse-reports@mta.test" in mailboxes and "fbl@mta.test" not in mailboxes
        assert postmaster.guard.settings.max_complaint_rate == 0.02
        broken = {"type": "Bounce", "lane": "bulk", "bounce_class": "bad-mailbox"}  # no recipient
        postmaster.observe(broken)  # logged, never raised into the code that emitted it
        await postmaster.close()
        await spool.close()
        events.close()

    asyncio.run(scenario())


def test_suspension_through_a_control_plane_hook(dispatcher: Dispatcher) -> None:
    """A hook that applies the rule later (a round trip through the supervisor) is not mistaken for a resume."""
    alerts: list[dict] = []
    requested: list[tuple] = []
    guard = ReputationGuard(
        SETTINGS,
        "bulk",
        dispatcher,
        alerts.append,
        suspend=lambda rule_id, **selectors: requested.append((rule_id, selectors)),
    )
    for _ in range(25):
        guard.observe(outcome("Bounce", bounce_class="bad-mailbox"))
    ((rule_id, selectors),) = requested
    assert selectors == {"campaign": "spring", "tenant": "acme", "reason": alerts[0]["message"]}
    dispatcher.suspend(rule_id, **selectors)  # the fan-out arrives
    guard.observe(outcome("Bounce", bounce_class="bad-mailbox"))
    dispatcher.resume(rule_id)
    for _ in range(20):  # the first one after the resume only notices it and starts the counts afresh
        guard.observe(outcome("Bounce", bounce_class="bad-mailbox"))
    assert len(requested) == 1
    guard.observe(outcome("Bounce", bounce_class="bad-mailbox"))
    assert len(requested) == 2
