"""Outbound delivery against real SMTP servers on loopback: next hops, pooling, TLS, per-recipient replies.

Behaviours a well-mannered sink never shows (dropping mid-DATA, tarpits, broken STARTTLS) come from
FakeMx, a small scriptable server in this module.
"""

from __future__ import annotations

import asyncio
import datetime
import fnmatch
import json
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine.config import Config, Egress, load_config
from engine.delivery import Attempt, Deliverer, Peer, parse_reply
from engine.resolver import Resolver
from engine.smtp.client import Reply
from tests.dnsserver import DnsServer

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
DEFAULT_EGRESS = Egress("default", None, "engine.test", 1)
MESSAGE = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nhello\r\n.leading dot\r\n"


@dataclass
class Received:
    sender: str
    params: list[str]
    recipients: list[str]
    data: bytes
    tls: bool
    peer: str
    helo: str


@dataclass
class FakeMx:
    """An SMTP server whose every odd habit is a field; it records connections, commands and messages."""

    host: str = "127.0.0.1"
    port: int = 0
    greeting: bytes = b"220 mx.test ESMTP"
    greeting_delay: float = 0.0
    extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SMTPUTF8")
    ehlo_reply: bytes | None = None
    tls: ssl.SSLContext | None = None
    tls_broken: bool = False
    mail_reply: bytes = b"250 2.1.0 ok"
    rcpt_replies: dict[str, bytes] = field(default_factory=dict)
    data: str = "accept"  # "accept" | "drop_mid" | "drop_after_dot" | "tarpit" | "delay"
    transactions_per_connection: int | None = None  # then `stale`: "hangup" at once, or at the next
    stale: str = "close"  # MAIL "421" or "close" without a reply
    peers: list[str] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    messages: list[Received] = field(default_factory=list)
    open: int = 0
    max_open: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._session, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[0])
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.greeting_delay)
        writer.write(self.greeting + b"\r\n")
        if not self.greeting.startswith(b"220"):
            return
        tls = False
        helo = ""
        sender, params, recipients, transactions = None, [], [], 0
        while line := await reader.readline():
            command = line.rstrip(b"\r\n")
            self.commands.append(command)
            verb = command[:4].upper()
            if verb == b"EHLO" and self.ehlo_reply is not None:
                writer.write(self.ehlo_reply + b"\r\n")
            elif verb in (b"EHLO", b"HELO"):
                helo = command[5:].decode()
                offered = [*self.extensions, *(["STARTTLS"] if self.tls and not tls else [])]
                lines = [b"mx.test", *(ext.encode() for ext in offered)] if verb == b"EHLO" else [b"mx.test"]
                writer.write(b"".join(b"250-%s\r\n" % x for x in lines[:-1]) + b"250 %s\r\n" % lines[-1])
            elif verb == b"STAR":
                writer.write(b"220 2.0.0 go ahead\r\n")
                await writer.drain()
                if self.tls_broken:
                    writer.write(b"this is not a TLS handshake\r\n")
                    return
                await writer.start_tls(self.tls)
                tls = True
            elif verb == b"MAIL":
                if self.transactions_per_connection is not None and transactions >= (self.transactions_per_connection):
                    if self.stale == "421":
                        writer.write(b"421 4.4.2 idle too long\r\n")
                    return
                sender, _, rest = command[11:].decode().partition(">")
                params = rest.split()
                recipients = []
                if not self.mail_reply.startswith(b"2"):
                    sender = None
                writer.write(self.mail_reply + b"\r\n")
            elif verb in (b"RCPT", b"DATA") and sender is None:
                writer.write(b"503 5.5.1 send MAIL first\r\n")
            elif verb == b"DATA" and not recipients:
                writer.write(b"554 5.5.1 no valid recipients\r\n")
            elif verb == b"RCPT":
                address = command[9:].decode().rstrip(">")
                reply = next(
                    (r for glob, r in self.rcpt_replies.items() if fnmatch.fnmatchcase(address, glob)),
                    b"250 2.1.5 ok",
                )
                if reply.startswith(b"2"):
                    recipients.append(address)
                writer.write(reply + b"\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go on\r\n")
                body = await self._read_body(reader)
                transactions += 1
                if body is None or self.data == "drop_after_dot":
                    return
                if self.data == "tarpit":
                    await asyncio.sleep(30)
                if self.data == "delay":
                    await asyncio.sleep(0.1)
                peer = writer.get_extra_info("peername")[0]
                self.messages.append(Received(sender, params, recipients, body, tls, peer, helo))
                writer.write(b"250 2.0.0 queued as %d\r\n" % len(self.messages))
                if self.stale == "hangup" and transactions == self.transactions_per_connection:
                    return
            elif verb == b"RSET":
                sender, recipients = None, []
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                return
            else:
                writer.write(b"502 5.5.2 unknown command\r\n")

    async def _read_body(self, reader: asyncio.StreamReader) -> bytes | None:
        lines = []
        while (line := await reader.readline()) != b".\r\n":
            if not line:
                return None
            lines.append(line[1:] if line.startswith(b".") else line)
            if self.data == "drop_mid":
                return None
        return b"".join(lines)


Runner = Callable[[Callable[[], Awaitable[T]]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Run a scenario on stock asyncio and on uvloop (what workers use), bounded in time."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def runner(scenario: Callable[[], Awaitable[T]]) -> T:
        with asyncio.Runner(loop_factory=factory) as loop:
            return loop.run(asyncio.wait_for(scenario(), 15))

    return runner


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture
def make(tmp_path: Path, dns: DnsServer) -> Callable[..., Deliverer]:
    """Deliverer factory: routes and shaping written to a real config file and loaded."""

    def build(routes: dict[str, str] | None = None, egress: Egress = DEFAULT_EGRESS, **shaping: Any) -> Deliverer:
        return Deliverer(config_file(tmp_path, routes, **shaping), Resolver([(dns.host, dns.port)], 2.0), egress)

    return build


def config_file(tmp_path: Path, routes: dict[str, str] | None = None, **shaping: Any) -> Config:
    values = {"connect_timeout": "2s", **shaping}
    lines = ["[routes]", *(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in (routes or {}).items())]
    lines += ["[shaping.default]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
    path = tmp_path / "engine.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


@dataclass(frozen=True)
class Sink:
    port: int
    record: Path

    def received(self) -> list[tuple[dict[str, Any], bytes]]:
        """(envelope, message) of every recorded message, in arrival order."""
        envelopes = sorted(self.record.glob("*.json"))
        return [(json.loads(e.read_text()), e.with_suffix(".eml").read_bytes()) for e in envelopes]


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    """`engine sink` in a subprocess, recording to a directory and refusing later@ and gone@."""
    record = tmp_path / "sink"
    replies = "later@*=451 4.3.0 try later;gone@*=550 5.1.1 no such user"
    command = ["engine", "sink", "--listen", "127.0.0.1:0", "--record", str(record), "--reply", replies]
    process = subprocess.Popen([sys.executable, "-m", *command], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        listening = json.loads(process.stdout.readline())["listening"]
        yield Sink(int(listening.rpartition(":")[2]), record)
    finally:
        process.terminate()
        process.wait(5)


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server context with a freshly made self-signed certificate (the client must not care)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


async def send(deliverer: Deliverer, recipients: list[str], message: bytes = MESSAGE) -> Attempt:
    return await deliverer.deliver("dest.test", "a@sender.test", recipients, message)


async def until(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def shared_port_servers(*hosts: str, **behaviour: Any) -> list[FakeMx]:
    """One FakeMx per loopback address, all on the same port (MX hosts share shaping.smtp_port)."""
    for _ in range(20):
        first = FakeMx(hosts[0], **behaviour)
        port = await first.start()
        servers = [first]
        try:
            for host in hosts[1:]:
                server = FakeMx(host, port, **behaviour)
                await server.start()
                servers.append(server)
        except OSError:
            for server in servers:
                await server.stop()
            continue
        return servers
    raise AssertionError("no port free on every address")


def test_response_parse_strips_enhanced_codes_of_every_line() -> None:
    reply = parse_reply(550, "5.1.1 no such user\n5.1.1 see https://help.test")
    assert reply == Reply(550, "5.1.1", "no such user see https://help.test")
    assert reply.permanent and not reply.transient and not reply.success
    assert parse_reply(250, "ok") == Reply(250, None, "ok")
    assert parse_reply(451, "4.3.0").transient


def test_route_delivers_and_names_the_peer(make: Callable[..., Deliverer], dns: DnsServer, run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx()
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        attempt = await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        await mx.stop()
        assert attempt.responses["b@dest.test"].code == 250
        assert attempt.responses["b@dest.test"].enhanced == "2.0.0"
        assert attempt.peer == Peer("127.0.0.1", "127.0.0.1")
        assert mx.messages[0].data == MESSAGE
        assert mx.messages[0].sender == "a@sender.test"
        assert mx.messages[0].helo == "engine.test"
        assert mx.commands[-1] == b"QUIT"

    run(scenario)
    assert dns.queries == []


def test_sink_gets_each_message_once_from_the_egress_address(
    make: Callable[..., Deliverer], sink: Sink, run: Runner
) -> None:
    async def scenario() -> list[Attempt]:
        egress = Egress("tx-1", "127.0.0.3", "tx1.sender.test", 1)
        deliverer = make(routes={"dest.test": f"127.0.0.1:{sink.port}"}, egress=egress)
        recipients = ["ok@dest.test", "later@dest.test", "gone@dest.test", "ok2@dest.test"]
        attempts = [await send(deliverer, recipients) for _ in range(3)]
        assert deliverer.connections() == {"dest.test": 1}
        await deliverer.close()
        return attempts

    for attempt in run(scenario):
        assert {rcpt: r.code for rcpt, r in attempt.responses.items()} == {
            "ok@dest.test": 250,
            "later@dest.test": 451,
            "gone@dest.test": 550,
            "ok2@dest.test": 250,
        }
        assert attempt.responses["gone@dest.test"] == Reply(550, "5.1.1", "no such user")
        assert attempt.peer == Peer("127.0.0.1", "127.0.0.1")
    received = sink.received()
    assert len(received) == 3
    for envelope, message in received:
        assert envelope["recipients"] == ["ok@dest.test", "ok2@dest.test"]
        assert (envelope["sender"], envelope["peer"], envelope["helo"]) == (
            "a@sender.test",
            "127.0.0.3",
            "tx1.sender.test",
        )
        assert message == MESSAGE


def test_mx_failover_to_the_second_mx_when_the_first_refuses(
    make: Callable[..., Deliverer], dns: DnsServer, run: Runner
) -> None:
    async def scenario() -> None:
        (mx2,) = await shared_port_servers("127.0.0.6")
        dns.add("dest.test", "MX", (10, "mx1.dest.test"))
        dns.add("dest.test", "MX", (20, "mx2.dest.test"))
        dns.add("mx1.dest.test", "A", "127.0.0.5")
        dns.add("mx2.dest.test", "A", "127.0.0.6")
        deliverer = make(smtp_port=mx2.port)
        attempt = await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        await mx2.stop()
        assert attempt.responses["b@dest.test"].code == 250
        assert attempt.peer == Peer("mx2.dest.test", "127.0.0.6")
        assert len(mx2.messages) == 1

    run(scenario)


def test_failover_on_greeting_rejection_and_tarpit(make: Callable[..., Deliverer], dns: DnsServer, run: Runner) -> None:
    async def scenario() -> None:
        hosts = ("127.0.0.5", "127.0.0.6", "127.0.0.7")
        rejecting, tarpit, good = await shared_port_servers(*hosts)
        rejecting.greeting = b"554 5.7.1 go away"
        tarpit.greeting_delay = 5.0
        for pref, host in enumerate(hosts):
            dns.add("dest.test", "MX", (pref, f"mx{pref}.dest.test"))
            dns.add(f"mx{pref}.dest.test", "A", host)
        deliverer = make(smtp_port=good.port, connect_timeout="300ms")
        attempt = await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        for server in (rejecting, tarpit, good):
            await server.stop()
        assert attempt.peer == Peer("mx2.dest.test", "127.0.0.7")
        assert [len(s.peers) for s in (rejecting, tarpit, good)] == [1, 1, 1]

    run(scenario)


def test_route_bypasses_mx(make: Callable[..., Deliverer], dns: DnsServer, run: Runner) -> None:
    async def scenario() -> None:
        via_mx, via_route = await shared_port_servers("127.0.0.5", "127.0.0.6")
        dns.add("dest.test", "MX", (10, "mx.dest.test"))
        dns.add("mx.dest.test", "A", "127.0.0.5")
        deliverer = make(routes={"dest.test": f"127.0.0.6:{via_route.port}"}, smtp_port=via_mx.port)
        attempt = await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        assert attempt.peer == Peer("127.0.0.6", "127.0.0.6")
        assert (len(via_mx.messages), len(via_route.messages)) == (0, 1)

    run(scenario)
    assert dns.queries == []


def test_all_hops_failed_is_transient_with_the_last_reason(
    make: Callable[..., Deliverer], dns: DnsServer, run: Runner
) -> None:
    dns.add("dest.test", "MX", (10, "mx1.dest.test"))
    dns.add("dest.test", "MX", (20, "mx2.dest.test"))
    dns.add("mx1.dest.test", "A", "127.0.0.5")
    dns.add("mx2.dest.test", "A", "127.0.0.6")
    deliverer = make(smtp_port=1)
    attempt = run(lambda: send(deliverer, ["b@dest.test", "c@dest.test"]))
    assert attempt.peer is None
    for response in attempt.responses.values():
        assert (response.code, response.enhanced) == (451, "4.4.1")
        assert response.text.startswith("all next hops failed: mx2.dest.test[127.0.0.6]:1: connection refused")


def test_hops_of_the_other_address_family_are_skipped(
    make: Callable[..., Deliverer], dns: DnsServer, run: Runner
) -> None:
    dns.add("dest.test", "MX", (10, "mx4.dest.test"))
    dns.add("dest.test", "MX", (20, "mx6.dest.test"))
    dns.add("mx4.dest.test", "A", "127.0.0.6")
    dns.add("mx6.dest.test", "AAAA", "::1")
    dns.add("v6only.test", "MX", (10, "mx6.dest.test"))
    deliverer = make(smtp_port=1, egress=Egress("tx-1", "127.0.0.3", "tx1.sender.test", 1))

    async def scenario() -> tuple[Attempt, Attempt]:
        both = await send(deliverer, ["b@dest.test"])
        v6only = await deliverer.deliver("v6only.test", "a@sender.test", ["b@v6only.test"], MESSAGE)
        return both, v6only

    both, v6only = run(scenario)
    assert both.responses["b@dest.test"].text.endswith("mx4.dest.test[127.0.0.6]:1: connection refused")
    assert v6only.responses["b@v6only.test"] == Reply(451, "4.4.1", "no next hop reachable from this egress address")


@pytest.mark.parametrize(("rcode", "code", "enhanced"), [("NXDOMAIN", 550, "5.1.2"), ("SERVFAIL", 451, "4.4.3")])
def test_dns_failure_answers_every_recipient(
    make: Callable[..., Deliverer], dns: DnsServer, rcode: str, code: int, enhanced: str, run: Runner
) -> None:
    dns.fail("dest.test", rcode)
    attempt = run(lambda: send(make(), ["b@dest.test", "c@dest.test"]))
    assert attempt.peer is None
    assert {(r.code, r.enhanced) for r in attempt.responses.values()} == {(code, enhanced)}
    assert len(attempt.responses) == 2


def test_session_is_reused_then_retired_after_max_deliveries(make: Callable[..., Deliverer], run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx()
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"}, max_deliveries_per_connection=3)
        for _ in range(7):
            attempt = await send(deliverer, ["b@dest.test"])
            assert attempt.responses["b@dest.test"].success
        await until(lambda: deliverer.connections() == {"dest.test": 1})
        await deliverer.close()
        assert deliverer.connections() == {}
        await mx.stop()
        assert len(mx.messages) == 7
        assert len(mx.peers) == 3
        assert mx.commands.count(b"QUIT") == 3

    run(scenario)


def test_idle_session_is_closed_after_idle_timeout(make: Callable[..., Deliverer], run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx()
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"}, idle_timeout="200ms")
        await send(deliverer, ["b@dest.test"])
        assert deliverer.connections() == {"dest.test": 1}
        await until(lambda: mx.open == 0 and deliverer.connections() == {})
        assert mx.commands[-1] == b"QUIT"
        await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        await mx.stop()
        assert len(mx.peers) == 2

    run(scenario)


def test_no_state_is_kept_for_destinations_without_sessions(make: Callable[..., Deliverer], run: Runner) -> None:
    """A bulk run reaches many domains once: their pools must go when their sessions do (private state)."""

    async def scenario() -> None:
        mx = FakeMx()
        port = await mx.start()
        deliverer = make(routes={"*": f"127.0.0.1:{port}"}, idle_timeout="100ms")
        for n in range(20):
            await deliverer.deliver(f"d{n}.test", "a@sender.test", [f"b@d{n}.test"], MESSAGE)
        assert len(deliverer.connections()) == 20
        await until(lambda: not deliverer._pools)
        await deliverer.close()
        await mx.stop()
        assert len(mx.messages) == 20

    run(scenario)


@pytest.mark.parametrize("stale", ["hangup", "close", "421"])
def test_session_closed_by_the_server_is_replaced_transparently(
    make: Callable[..., Deliverer], stale: str, run: Runner
) -> None:
    async def scenario() -> None:
        mx = FakeMx(transactions_per_connection=1, stale=stale)
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        attempts = [await send(deliverer, ["b@dest.test"]) for _ in range(3)]
        await deliverer.close()
        await mx.stop()
        assert [a.responses["b@dest.test"].code for a in attempts] == [250, 250, 250]
        assert len(mx.messages) == 3
        assert len(mx.peers) == 3

    run(scenario)


def test_connection_limit_queues_the_rest(make: Callable[..., Deliverer], run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx(data="delay")
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"}, connection_limit=2)
        attempts = await asyncio.gather(*(send(deliverer, ["b@dest.test"]) for _ in range(8)))
        assert deliverer.connections() == {"dest.test": 2}
        await deliverer.close()
        await mx.stop()
        assert all(a.responses["b@dest.test"].code == 250 for a in attempts)
        assert mx.max_open == 2
        assert len(mx.peers) == 2

    run(scenario)


def test_mixed_recipient_replies_in_one_transaction(make: Callable[..., Deliverer], run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx(rcpt_replies={"later@*": b"451 4.3.0 try later", "gone@*": b"550 5.1.1 no such user"})
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        attempt = await send(deliverer, ["ok@dest.test", "later@dest.test", "gone@dest.test", "ok2@dest.test"])
        await deliverer.close()
        await mx.stop()
        replies = {rcpt: (r.code, r.enhanced, r.text) for rcpt, r in attempt.responses.items()}
        assert replies == {
            "ok@dest.test": (250, "2.0.0", "queued as 1"),
            "later@dest.test": (451, "4.3.0", "try later"),
            "gone@dest.test": (550, "5.1.1", "no such user"),
            "ok2@dest.test": (250, "2.0.0", "queued as 1"),
        }
        assert mx.messages[0].recipients == ["ok@dest.test", "ok2@dest.test"]
        assert mx.commands.count(b"DATA") == 1

    run(scenario)


def test_no_body_when_every_recipient_is_refused_and_the_session_is_reset(
    make: Callable[..., Deliverer], run: Runner
) -> None:
    """With PIPELINING, DATA goes out with the envelope (RFC 2920) and the server refuses it; no body follows."""

    async def scenario() -> None:
        mx = FakeMx(rcpt_replies={"gone@*": b"550 5.1.1 no such user"})
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        refused = await send(deliverer, ["gone@dest.test"])
        accepted = await send(deliverer, ["ok@dest.test"])
        await deliverer.close()
        await mx.stop()
        assert refused.responses["gone@dest.test"].code == 550
        assert accepted.responses["ok@dest.test"].code == 250
        assert mx.commands.count(b"DATA") == 2
        assert len(mx.messages) == 1
        assert mx.commands.count(b"RSET") == 1
        assert len(mx.peers) == 1

    run(scenario)


def test_mail_from_rejection_answers_every_recipient(make: Callable[..., Deliverer], run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx(mail_reply=b"550 5.7.1 sender blocked")
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        attempt = await send(deliverer, ["b@dest.test", "c@dest.test"])
        await deliverer.close()
        await mx.stop()
        assert set(attempt.responses.values()) == {Reply(550, "5.7.1", "sender blocked")}
        assert not mx.messages

    run(scenario)


@pytest.mark.parametrize("behaviour", ["drop_mid", "drop_after_dot", "tarpit"])
def test_connection_lost_mid_transaction_is_transient(
    tmp_path: Path, dns: DnsServer, behaviour: str, run: Runner
) -> None:
    async def scenario() -> None:
        mx = FakeMx(data=behaviour, rcpt_replies={"gone@*": b"550 5.1.1 no such user"})
        port = await mx.start()
        config = config_file(tmp_path, {"dest.test": f"127.0.0.1:{port}"})
        resolver = Resolver([(dns.host, dns.port)], 2.0)
        deliverer = Deliverer(config, resolver, DEFAULT_EGRESS, command_timeout=0.3)
        attempt = await send(deliverer, ["b@dest.test", "gone@dest.test"])
        assert deliverer.connections() == {}
        await deliverer.close()
        await mx.stop()
        lost = attempt.responses["b@dest.test"]
        assert (lost.code, lost.enhanced) == (451, "4.4.2")
        assert attempt.responses["gone@dest.test"].code == 550
        assert mx.messages == []

    run(scenario)


def test_opportunistic_tls_upgrades_without_verifying(
    make: Callable[..., Deliverer], server_tls: ssl.SSLContext, run: Runner
) -> None:
    async def scenario() -> None:
        mx = FakeMx(tls=server_tls)
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        attempt = await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        await mx.stop()
        assert attempt.responses["b@dest.test"].code == 250
        assert mx.messages[0].tls
        assert mx.commands.count(b"EHLO engine.test") == 2

    run(scenario)


def test_opportunistic_tls_falls_back_to_clear_text_by_reconnecting(
    make: Callable[..., Deliverer], server_tls: ssl.SSLContext, run: Runner
) -> None:
    async def scenario() -> None:
        mx = FakeMx(tls=server_tls, tls_broken=True)
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        attempt = await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        await mx.stop()
        assert attempt.responses["b@dest.test"].code == 250
        assert not mx.messages[0].tls
        assert len(mx.peers) == 2
        assert mx.commands.count(b"STARTTLS") == 1

    run(scenario)


def test_required_tls_defers_when_the_server_offers_no_starttls(make: Callable[..., Deliverer], run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx()
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"}, tls="required")
        attempt = await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        await mx.stop()
        response = attempt.responses["b@dest.test"]
        assert (response.code, response.enhanced) == (451, "4.7.5")
        assert response.text.startswith("TLS required")
        assert attempt.peer is None
        assert not any(c.startswith(b"MAIL") for c in mx.commands)

    run(scenario)


@pytest.mark.parametrize(("broken", "code"), [(False, 250), (True, 451)])
def test_required_tls_sends_only_over_tls(
    make: Callable[..., Deliverer], server_tls: ssl.SSLContext, broken: bool, code: int, run: Runner
) -> None:
    async def scenario() -> None:
        mx = FakeMx(tls=server_tls, tls_broken=broken)
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"}, tls="required")
        attempt = await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        await mx.stop()
        assert attempt.responses["b@dest.test"].code == code
        assert all(m.tls for m in mx.messages)
        assert len(mx.messages) == (0 if broken else 1)

    run(scenario)


def test_disabled_tls_never_starts_tls(make: Callable[..., Deliverer], server_tls: ssl.SSLContext, run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx(tls=server_tls)
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"}, tls="disabled")
        await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        await mx.stop()
        assert b"STARTTLS" not in mx.commands
        assert not mx.messages[0].tls

    run(scenario)


def test_source_address_and_ehlo_name_come_from_the_egress(make: Callable[..., Deliverer], run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx()
        port = await mx.start()
        egress = Egress("tx-1", "127.0.0.3", "tx1.sender.test", 1)
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"}, egress=egress)
        await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        await mx.stop()
        assert mx.peers == ["127.0.0.3"]
        assert mx.messages[0].helo == "tx1.sender.test"

    run(scenario)


def test_unsafe_addresses_are_refused_before_anything_is_sent(make: Callable[..., Deliverer], run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx()
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        evil = ["x@dest.test>\r\nRCPT TO:<evil@dest.test", "nul\0@dest.test", "y@dest.test> NOTIFY=NEVER"]
        attempt = await send(deliverer, [*evil, "b@dest.test"])
        bad_sender = await deliverer.deliver("dest.test", "a@x.test\r\nRSET", ["b@dest.test"], MESSAGE)
        await deliverer.close()
        await mx.stop()
        assert {attempt.responses[r] for r in evil} == {attempt.responses[evil[0]]}
        assert (attempt.responses[evil[0]].code, attempt.responses[evil[0]].enhanced) == (501, "5.1.3")
        assert attempt.responses["b@dest.test"].code == 250
        assert bad_sender.responses["b@dest.test"].code == 501
        assert not any(b"evil" in c or b"NOTIFY" in c or b"RSET" in c for c in mx.commands)
        assert mx.messages[0].recipients == ["b@dest.test"]

    run(scenario)


@pytest.mark.parametrize(("extensions", "code"), [(("SMTPUTF8", "8BITMIME"), 250), (("8BITMIME",), 553)])
def test_smtputf8_is_required_for_non_ascii_addresses(
    make: Callable[..., Deliverer], extensions: tuple[str, ...], code: int, run: Runner
) -> None:
    async def scenario() -> None:
        mx = FakeMx(extensions=extensions)
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        attempt = await send(deliverer, ["jörg@dest.test"], "Subject: grüße\r\n\r\nü\r\n".encode())
        await deliverer.close()
        await mx.stop()
        assert attempt.responses["jörg@dest.test"].code == code
        if code == 250:
            assert sorted(mx.messages[0].params) == ["BODY=8BITMIME", "SMTPUTF8"]
            assert mx.messages[0].recipients == ["jörg@dest.test"]
        else:
            assert attempt.responses["jörg@dest.test"].enhanced == "5.6.7"
            assert not any(c.startswith(b"MAIL") for c in mx.commands)

    run(scenario)


def test_8bitmime_only_for_8bit_bodies(make: Callable[..., Deliverer], run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx()
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        await send(deliverer, ["b@dest.test"])
        await send(deliverer, ["b@dest.test"], b"Subject: x\r\n\r\n\xe9t\xe9\r\n")
        await deliverer.close()
        await mx.stop()
        assert [m.params for m in mx.messages] == [[], ["BODY=8BITMIME"]]

    run(scenario)


def test_helo_fallback_when_ehlo_is_unknown(make: Callable[..., Deliverer], run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx(ehlo_reply=b"502 5.5.2 what")
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        attempt = await send(deliverer, ["b@dest.test"])
        await deliverer.close()
        await mx.stop()
        assert attempt.responses["b@dest.test"].code == 250
        assert mx.messages[0].helo == "engine.test"

    run(scenario)


def test_reload_applies_new_shaping_to_open_sessions(
    make: Callable[..., Deliverer], tmp_path: Path, run: Runner
) -> None:
    async def scenario() -> None:
        mx = FakeMx()
        port = await mx.start()
        routes = {"dest.test": f"127.0.0.1:{port}"}
        deliverer = make(routes=routes)
        await send(deliverer, ["b@dest.test"])
        deliverer.reload(config_file(tmp_path, routes, max_deliveries_per_connection=2))
        assert deliverer.connections() == {"dest.test": 1}
        await send(deliverer, ["b@dest.test"])
        await until(lambda: mx.open == 0 and deliverer.connections() == {})
        await deliverer.close()
        await mx.stop()
        assert len(mx.peers) == 1

    run(scenario)


def test_unsendable_message_bounces_instead_of_raising(make: Callable[..., Deliverer], run: Runner) -> None:
    async def scenario() -> None:
        mx = FakeMx()
        port = await mx.start()
        deliverer = make(routes={"dest.test": f"127.0.0.1:{port}"})
        attempt = await send(deliverer, ["b@dest.test"], b"Subject: x\r\n\r\n" + b"y" * 1500 + b"\r\n")
        await deliverer.close()
        await mx.stop()
        assert (attempt.responses["b@dest.test"].code, attempt.responses["b@dest.test"].enhanced) == (554, "5.6.0")
        assert not mx.messages

    run(scenario)
