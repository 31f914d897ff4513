"""Reception under hostile clients: STARTTLS (and what is pipelined behind it), AUTH, relay, connection limits.

Every server here runs on stock asyncio and on uvloop (the loop lane workers use): start_tls differs between
the two.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import resource
import smtplib
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from engine.config import Egress, load_config
from engine.delivery import Deliverer
from engine.resolver import Resolver
from engine.smtp.auth import FailureDelays, UsersFile, add_user, decode_plain, hash_password, verify_password
from engine.smtp.server import Limits
from engine.smtp.tls import CertificateFiles, server_context
from tests.certs import self_signed
from tests.harness import Engine, Sink, free_port, wait_for
from tests.test_smtp_server import Client, ServerThread, code

OUTSIDE = (ipaddress.ip_network("10.0.0.0/8"),)  # loopback clients are strangers: they must authenticate
EGRESS = Egress("default", None, "engine.test", 1)
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def client_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certificate[0])


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.txt"
    path.write_text(f"# accounts\nalice:{hash_password('secret', log_n=8)}\n")
    return path


@pytest.fixture(params=sorted(LOOPS))
def server(request: pytest.FixtureRequest, certificate: tuple[Path, Path], users_file: Path) -> Iterator[ServerThread]:
    server = ServerThread(
        Limits(auth_failure_delay=0.05),
        OUTSIDE,
        tls=server_context(*certificate),
        users=UsersFile(users_file),
        loop=LOOPS[request.param],
    )
    yield server
    server.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    client = Client(server.port)
    assert code(client.reply()) == b"220 test.local"
    yield client
    client.sock.close()


def secure(client: Client, context: ssl.SSLContext) -> None:
    client.command(b"EHLO c")
    assert code(client.command(b"STARTTLS")) == b"220 2.0.0"
    client.starttls(context)


def test_starttls_auth_then_relay(client: Client, server: ServerThread, client_tls: ssl.SSLContext) -> None:
    clear = client.command(b"EHLO c")
    assert b"STARTTLS" in clear and b"AUTH" not in clear
    assert code(client.command(b"MAIL FROM:<a@x.test>")) == b"530 5.7.0"
    assert code(client.command(b"AUTH PLAIN " + b64("\0alice\0secret"))) == b"538 5.7.11"
    assert code(client.command(b"STARTTLS")) == b"220 2.0.0"
    client.starttls(client_tls)
    assert code(client.command(b"MAIL FROM:<a@x.test>")) == b"503 5.5.1"  # EHLO state was reset
    secured = client.command(b"EHLO c")
    assert b"AUTH PLAIN LOGIN" in secured and b"STARTTLS" not in secured
    assert code(client.command(b"STARTTLS")) == b"503 5.5.1"
    assert code(client.command(b"MAIL FROM:<a@x.test>")) == b"530 5.7.0"
    assert code(client.command(b"AUTH PLAIN " + b64("\0alice\0secret"))) == b"235 2.7.0"
    assert code(client.command(b"AUTH PLAIN " + b64("\0alice\0secret"))) == b"503 5.5.1"
    assert code(client.command(b"MAIL FROM:<a@x.test> AUTH=<>")) == b"250 2.1.0"
    assert code(client.command(b"RCPT TO:<b@relayed.test>")) == b"250 2.1.5"
    client.command(b"DATA")
    client.send(b"Subject: over TLS\r\n\r\nhi\r\n.\r\n")
    assert code(client.reply()) == b"250 2.0.0"
    assert server.handler.messages == [("a@x.test", ["b@relayed.test"], b"Subject: over TLS\r\n\r\nhi\r\n")]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_renewed_certificate_is_used_without_restart(tmp_path: Path, loop: str) -> None:
    cert, key = self_signed(tmp_path)
    server = ServerThread(Limits(), tls=CertificateFiles(cert, key), loop=LOOPS[loop])

    def served_certificate() -> bytes:
        client = Client(server.port)
        client.reply()
        secure(client, ssl.create_default_context(cafile=cert))
        der = client.sock.getpeercert(binary_form=True)
        client.sock.close()
        return der

    try:
        first = served_certificate()
        self_signed(tmp_path)  # renewal: both files replaced
        second = served_certificate()
        assert second != first
        key.write_text("broken")  # a bad renewal keeps the last good pair
        assert served_certificate() == second
    finally:
        server.stop()


def test_commands_pipelined_behind_starttls_are_discarded(
    client: Client, server: ServerThread, client_tls: ssl.SSLContext
) -> None:
    client.command(b"EHLO c")
    injected = b"EHLO evil\r\nAUTH PLAIN " + b64("\0alice\0secret") + b"\r\nMAIL FROM:<evil@x.test>\r\n"
    client.send(b"STARTTLS\r\n" + injected)
    assert code(client.reply()) == b"220 2.0.0"
    client.starttls(client_tls)  # asserts that nothing followed the 220 in clear text
    assert code(client.command(b"RCPT TO:<victim@y.test>")) == b"503 5.5.1"  # no MAIL was executed
    assert b"AUTH PLAIN LOGIN" in client.command(b"EHLO c")
    assert code(client.command(b"MAIL FROM:<a@x.test>")) == b"530 5.7.0"  # nor AUTH
    assert server.handler.rejections[-1].code == 530


def test_clear_text_sent_after_the_starttls_reply_is_never_answered(client: Client, server: ServerThread) -> None:
    client.command(b"EHLO c")
    assert code(client.command(b"STARTTLS")) == b"220 2.0.0"
    client.send(b"NOOP\r\nMAIL FROM:<evil@x.test>\r\n")
    received = b""
    client.sock.settimeout(5)
    for _ in range(20):
        try:
            chunk = client.sock.recv(4096)
        except (ConnectionError, TimeoutError):
            break
        if not chunk:
            break
        received += chunk
    assert b"250" not in received  # the bytes went to the TLS handshake, which failed
    wait_for(lambda: server.server.session_count == 0, 5, what="the failed session released")


@pytest.mark.parametrize("leave", ["close", "partial-hello", "reset"])
def test_a_client_leaving_during_the_handshake_is_released(client: Client, server: ServerThread, leave: str) -> None:
    client.command(b"EHLO c")
    assert code(client.command(b"STARTTLS")) == b"220 2.0.0"
    if leave == "partial-hello":
        client.send(b"\x16\x03\x01\x00\x05hello")
    elif leave == "reset":  # RST: the TLS layer, still handshaking, does not pass connection_lost on
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()
    wait_for(lambda: server.server.session_count == 0, 5, what="the session released")


def test_auth_login_failures_are_delayed_more_each_time(
    client: Client, server: ServerThread, client_tls: ssl.SSLContext
) -> None:
    secure(client, client_tls)
    client.command(b"EHLO c")
    delays = []
    for _ in range(4):
        assert client.command(b"AUTH LOGIN") == b"334 VXNlcm5hbWU6"
        assert client.command(b64("alice")) == b"334 UGFzc3dvcmQ6"
        started = time.monotonic()
        assert code(client.command(b64("wrong"))) == b"535 5.7.8"
        delays.append(time.monotonic() - started)
    assert delays[0] >= 0.05 and delays[3] >= 0.4 and delays[3] > 3 * delays[0]
    assert [reply.code for reply in server.handler.rejections] == [535] * 4
    assert client.command(b"AUTH LOGIN " + b64("alice")) == b"334 UGFzc3dvcmQ6"
    assert code(client.command(b64("secret"))) == b"235 2.7.0"
    assert server.server.failures.failed("127.0.0.1") == pytest.approx(0.05)  # success forgave the address


@pytest.mark.parametrize(
    ("exchange", "expected"),
    [
        ([b"AUTH CRAM-MD5"], b"504 5.5.4"),
        ([b"AUTH"], b"501 5.5.4"),
        ([b"AUTH PLAIN", b"*"], b"501 5.7.0"),
        ([b"AUTH LOGIN", b"*"], b"501 5.7.0"),
        ([b"AUTH PLAIN not/base64!"], b"501 5.5.2"),
        ([b"AUTH PLAIN " + b64("alice-no-nuls")], b"501 5.5.2"),
        ([b"AUTH LOGIN", b64("alice"), b"%%%"], b"501 5.5.2"),
        ([b"AUTH PLAIN", b64("\0alice\0wrong")], b"535 5.7.8"),
        ([b"AUTH PLAIN " + b64("\0nobody\0secret")], b"535 5.7.8"),
        ([b"AUTH PLAIN " + b64("bob\0alice\0secret")], b"535 5.7.8"),  # acting as another user
    ],
)
def test_auth_refusals(client: Client, client_tls: ssl.SSLContext, exchange: list[bytes], expected: bytes) -> None:
    secure(client, client_tls)
    client.command(b"EHLO c")
    for line in exchange[:-1]:
        assert client.command(line).startswith(b"334 ")
    assert code(client.command(exchange[-1])) == expected
    assert code(client.command(b"AUTH PLAIN " + b64("\0alice\0secret"))) == b"235 2.7.0"


def test_auth_lines_may_be_longer_than_commands(
    client: Client, users_file: Path, client_tls: ssl.SSLContext, server: ServerThread
) -> None:
    password = "p" * 2000
    users_file.write_text(f"long:{hash_password(password, log_n=8)}\n")
    secure(client, client_tls)
    client.command(b"EHLO c")
    line = b"AUTH PLAIN " + b64("\0long\0" + password)
    client.send(line[:600])
    time.sleep(0.05)  # the server holds a partial AUTH line longer than a command line
    assert code(client.command(line[600:])) == b"235 2.7.0"
    assert code(client.command(b"NOOP " + b"x" * 600)) == b"500 5.5.6"


def test_auth_needs_ehlo_and_no_open_transaction(client: Client, client_tls: ssl.SSLContext) -> None:
    client.command(b"EHLO c")
    client.command(b"STARTTLS")
    client.starttls(client_tls)
    assert code(client.command(b"AUTH PLAIN " + b64("\0alice\0secret"))) == b"503 5.5.1"
    client.command(b"HELO c")
    assert code(client.command(b"AUTH PLAIN " + b64("\0alice\0secret"))) == b"503 5.5.1"


def test_users_file_changes_apply_without_restart(
    client: Client, users_file: Path, client_tls: ssl.SSLContext, server: ServerThread
) -> None:
    add_user(users_file, "bob", "hunter2")
    assert users_file.stat().st_mode & 0o777 == 0o600
    secure(client, client_tls)
    client.command(b"EHLO c")
    assert code(client.command(b"AUTH PLAIN " + b64("\0bob\0hunter2"))) == b"235 2.7.0"
    users_file.write_text("alice:$scrypt$ln=8,r=8,p=1$broken\n")
    other = Client(server.port)
    other.reply()
    secure(other, client_tls)
    other.command(b"EHLO c")
    assert code(other.command(b"AUTH PLAIN " + b64("\0alice\0secret"))) == b"454 4.7.0"


def test_passwords_are_salted_scrypt() -> None:
    one, two = hash_password("pw", log_n=8), hash_password("pw", log_n=8)
    assert one.startswith("$scrypt$ln=8,r=8,p=1$") and one != two
    assert verify_password("pw", one) and verify_password("pw", two) and not verify_password("pW", one)
    for broken in ("plain", "$scrypt$ln=8,r=8$AAAA$AAAA", "$scrypt$ln=99,r=8,p=1$AAAA$AAAA", "$scrypt$ln=8,r=8,p=1$$"):
        with pytest.raises(ValueError):
            verify_password("pw", broken)
    assert decode_plain(b64("\0u\0p:w")) == ("", "u", "p:w")


def test_add_user_replaces_and_refuses_bad_names(tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    add_user(path, "carol", "one")
    add_user(path, "dave", "two")
    add_user(path, "carol", "three")
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["dave", "carol"]
    assert UsersFile(path).verify("carol", "three") and not UsersFile(path).verify("carol", "one")
    for name in ("", "a:b", "a b", "a\x00"):
        with pytest.raises(ValueError):
            add_user(path, name, "pw")


def test_users_add_command_reads_the_password_from_stdin(tmp_path: Path) -> None:
    script = "import sys; from pathlib import Path; from argparse import Namespace as N; "
    script += "from engine.smtp.auth import users_add_command as c; "
    script += "sys.exit(c(N(file=Path(sys.argv[1]), user=sys.argv[2])))"
    path = tmp_path / "users.txt"
    done = subprocess.run(["python", "-c", script, str(path), "erin"], input="pa55\n", text=True, timeout=30)
    assert done.returncode == 0
    assert UsersFile(path).verify("erin", "pa55")


def test_failure_delays_double_cap_and_are_forgotten() -> None:
    delays = FailureDelays(base=1.0, cap=5.0, forget_after=0.2, max_clients=2)
    assert [delays.failed("a") for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert delays.failed("b") == 1.0
    delays.failed("c")  # pushes out "a", the least recent
    assert delays.failed("a") == 1.0
    time.sleep(0.25)
    assert delays.failed("b") == 1.0


# connection limits


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_connections_per_address_are_limited_for_strangers_only(loop: str) -> None:
    server = ServerThread(Limits(max_connections_per_ip=2), OUTSIDE, loop=LOOPS[loop])
    try:
        first, second = Client(server.port), Client(server.port)
        assert code(first.reply()) == code(second.reply()) == b"220 test.local"
        third = Client(server.port)
        assert third.reply() == b"421 4.7.0 Too many connections from your address, try again later"
        assert third.closed()
        first.command(b"QUIT")
        wait_for(lambda: server.server.session_count == 1, 5)
        assert code(Client(server.port).reply()) == b"220 test.local"
    finally:
        server.stop()
    trusted = ServerThread(Limits(max_connections_per_ip=1, max_connections=3), loop=LOOPS[loop])
    try:
        clients = [Client(trusted.port) for _ in range(3)]
        assert all(code(c.reply()) == b"220 test.local" for c in clients)
        assert Client(trusted.port).reply() == b"421 4.7.0 Too many connections, try again later"
    finally:
        trusted.stop()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def send_one(port: int, subject: str) -> Client:
    """One message over a new session, which stays open."""
    client = Client(port)
    assert code(client.reply()) == b"220 mta.test"
    client.command(b"EHLO normal")
    client.command(b"MAIL FROM:<a@x.test>")
    client.command(b"RCPT TO:<b@dest.test>")
    client.command(b"DATA")
    client.send(f"Subject: {subject}\r\n\r\nhi\r\n.\r\n".encode())
    assert code(client.reply()) == b"250 2.0.0"
    return client


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    for _ in range(100):
        chunk = sock.recv(4096)
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"still open after {received!r}")


def test_500_idle_and_slow_connections_stay_bounded_and_a_normal_client_is_served(tmp_path: Path) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= 1200, f"this test opens 500+ sockets; RLIMIT_NOFILE is {soft}"
    sink = Sink(tmp_path / "sink")
    port, admin = free_port(), free_port()
    config = f"""
[engine]
hostname = "mta.test"
spool_dir = "spool"
log_dir = "logs"
[admin]
listen = "127.0.0.1:{admin}"
[routes]
"*" = "{sink.address}"
[lanes.transactional]
workers = 1
[[listeners]]
name = "tx"
listen = "127.0.0.1:{port}"
lane = "transactional"
max_connections = 501
command_timeout = "4s"
idle_timeout = "60s"
"""
    engine = Engine(tmp_path, config).start([port])
    hogs: list[socket.socket] = []
    try:
        wait_for(lambda: children(engine.process.pid), 10, what="a worker")
        (worker,) = children(engine.process.pid)
        warm_up = send_one(port, "warm-up")  # now the worker has opened its spool, log and delivery connection
        assert code(warm_up.command(b"QUIT")) == b"221 2.0.0" and warm_up.closed()
        wait_for(lambda: sink.count() == 1, 10, what="warm-up delivery")
        fds_before, rss_before = open_fds(worker), rss_kb(worker)
        for n in range(500):
            hog = socket.create_connection(("127.0.0.1", port), timeout=5)
            if n % 2:
                hog.sendall(b"EHLO slow")  # half a command line, then a trickle
            hogs.append(hog)
        wait_for(lambda: open_fds(worker) >= fds_before + 500, 10, what="500 connections accepted")
        for _ in range(5):
            for hog in hogs[1::2]:
                hog.sendall(b".")
            time.sleep(0.1)
        client = send_one(port, "still served")
        more = Client(port)
        assert code(more.reply()) == b"421 4.7.0"  # the 502nd session is over max_connections
        fds_busy, rss_busy = open_fds(worker), rss_kb(worker)
        assert fds_busy <= fds_before + 510
        assert rss_busy - rss_before < 64 * 1024, f"RSS grew by {rss_busy - rss_before} KB for 500 sessions"
        # the trickling half gets no more time than the idle half: all are cut at command_timeout
        wait_for(lambda: open_fds(worker) <= fds_before + 5, 15, what="hogs closed by command_timeout")
        for hog in hogs[:4]:
            assert b"\r\n421 4.4.2 Timeout waiting for a command" in read_until_closed(hog)
        wait_for(lambda: sink.count() == 2, 10, what="delivery")
        client.sock.close()
    finally:
        for hog in hogs:
            hog.close()
        engine.stop()
        sink.stop()
    print(f"worker fds {fds_before} -> {fds_busy}, RSS {rss_before} -> {rss_busy} KB with 500 idle/slow sessions")


# the other direction: the delivery client facing a man in the middle


INJECTED = b"250-mx.test\r\n250 AUTH PLAIN\r\n" + b"250 2.0.0 injected\r\n" * 4


class InjectingMx:
    """A destination (or a man in the middle) that writes replies right behind its 220 to STARTTLS."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.commands: list[tuple[bool, bytes]] = []
        self.messages: list[tuple[bool, bytes]] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False
        writer.write(b"220 mx.test ESMTP\r\n")
        while line := await reader.readline():
            command = line.strip().upper()
            self.commands.append((tls, command[:4]))
            if command.startswith(b"EHLO"):
                offer = b"" if tls else b"250-STARTTLS\r\n"
                writer.write(b"250-mx.test\r\n250-PIPELINING\r\n" + offer + b"250 8BITMIME\r\n")
            elif command == b"STARTTLS":
                writer.write(b"220 2.0.0 Go ahead\r\n" + INJECTED)
                await writer.drain()
                await writer.start_tls(self.context)
                tls = True
                continue
            elif command == b"DATA":
                writer.write(b"354 Go ahead\r\n")
                await writer.drain()
                self.messages.append((tls, await reader.readuntil(b"\r\n.\r\n")))
                writer.write(b"250 2.0.0 Queued\r\n")
            elif command == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
        writer.close()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_delivery_ignores_replies_injected_behind_the_starttls_reply(
    loop: str, tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    async def scenario() -> tuple[int, InjectingMx]:
        mx = InjectingMx(server_context(*certificate))
        port = await mx.start()
        path = tmp_path / "engine.toml"
        path.write_text(f'[routes]\n"dest.test" = "127.0.0.1:{port}"\n')
        deliverer = Deliverer(load_config(path), Resolver([("127.0.0.1", free_port())], 1.0), EGRESS)
        attempt = await deliverer.deliver("dest.test", "a@x.test", ["b@dest.test"], b"Subject: s\r\n\r\nbody\r\n")
        await deliverer.close()
        mx.server.close()
        return attempt.responses["b@dest.test"].code, mx

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        code_, mx = runner.run(asyncio.wait_for(scenario(), 15))
    assert code_ == 250
    assert mx.messages == [(True, b"Subject: s\r\n\r\nbody\r\n.\r\n")]
    after_tls = [command for tls, command in mx.commands if tls]
    assert after_tls[:4] == [b"EHLO", b"MAIL", b"RCPT", b"DATA"]  # a fresh EHLO, answered by the real reply


def test_engine_listener_with_tls_and_users(tmp_path: Path, certificate: tuple[Path, Path], users_file: Path) -> None:
    """The worker builds its listener from tls_cert, tls_key and users_file: smtplib gets in with STARTTLS+AUTH."""
    sink = Sink(tmp_path / "sink")
    port, admin = free_port(), free_port()
    config = f"""
[engine]
hostname = "mta.test"
spool_dir = "spool"
log_dir = "logs"
[admin]
listen = "127.0.0.1:{admin}"
[routes]
"*" = "{sink.address}"
[lanes.transactional]
[[listeners]]
name = "submission"
listen = "127.0.0.1:{port}"
lane = "transactional"
relay_from = []
tls_cert = "{certificate[0]}"
tls_key = "{certificate[1]}"
users_file = "{users_file}"
"""
    engine = Engine(tmp_path, config).start([port])
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            assert client.has_extn("starttls") and not client.has_extn("auth")
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("a@x.test", ["b@dest.test"], b"Subject: clear\r\n\r\nno\r\n")
            assert refused.value.smtp_code == 530
            client.starttls(context=ssl.create_default_context(cafile=certificate[0]))
            client.ehlo()
            client.login("alice", "secret")
            client.sendmail("a@x.test", ["b@dest.test"], b"Subject: submitted\r\n\r\nyes\r\n")
        wait_for(lambda: sink.count() == 1, 10, what="delivery")
        ((_, message),) = sink.messages()
        assert b"with ESMTPSA" in message
    finally:
        engine.stop()
        sink.stop()
