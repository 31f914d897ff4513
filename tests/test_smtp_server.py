"""The reception protocol over real loopback sockets: replies, limits, pipelining, smuggling lookalikes."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.smtp.server as server_module
from engine.smtp.server import Limits, Reply, Session, SMTPServer

LOCAL = (ipaddress.ip_network("127.0.0.0/8"),)


class RecordingHandler:
    hostname = "test.local"

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.rejections: list[Reply] = []

    def check_recipient(self, session: Session, sender: str, recipient: str) -> Reply | None:
        return Reply(550, "5.1.1", "no such user") if recipient.startswith("nobody@") else None

    def handle_message(self, session: Session, sender: str, recipients: list[str], message: bytes, params: dict):
        self.messages.append((sender, list(recipients), message))
        return self._accept()

    async def _accept(self) -> Reply:
        await asyncio.sleep(0.001)
        return Reply(250, "2.0.0", f"queued {len(self.messages)}")

    def rejected(self, session: Session, sender: str | None, recipients: Sequence[str], reply: Reply) -> None:
        self.rejections.append(reply)


class ServerThread:
    def __init__(self, limits: Limits, relay_from=LOCAL, *, tls=None, users=None, loop=asyncio.new_event_loop) -> None:
        self.handler = RecordingHandler()
        self.loop = loop()
        self.server = SMTPServer(self.handler, limits, relay_from, tls=tls, users=users)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.listen(self.sock), self.loop).result(5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(1), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buffer = b""

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed: " + repr(b"".join(lines) + self.buffer))
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self.buffer, self.buffer
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True


@pytest.fixture
def server() -> Iterator[ServerThread]:
    server = ServerThread(Limits(max_message_size=10_000, max_recipients=3, idle_timeout=2.0))
    yield server
    server.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    client = Client(server.port)
    assert client.reply().startswith(b"220 test.local ")
    yield client
    client.sock.close()


def code(reply: bytes) -> bytes:
    """'250 2.1.0' — code and enhanced status of the last line."""
    return b" ".join(reply.split(b"\r\n")[-1].split(b" ")[:2])


def test_ehlo_advertises_extensions(client: Client) -> None:
    reply = client.command(b"EHLO client.example")
    for keyword in (b"PIPELINING", b"SIZE 10000", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SMTPUTF8"):
        assert keyword in reply
    assert reply.startswith(b"250-test.local")


def test_a_whole_transaction(client: Client, server: ServerThread) -> None:
    client.command(b"EHLO c")
    assert code(client.command(b"MAIL FROM:<a@example.net> SIZE=100")) == b"250 2.1.0"
    assert code(client.command(b"RCPT TO:<b@dest.test>")) == b"250 2.1.5"
    assert client.command(b"DATA").startswith(b"354")
    client.send(b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n")
    assert code(client.reply()) == b"250 2.0.0"
    assert server.handler.messages == [("a@example.net", ["b@dest.test"], b"Subject: hi\r\n\r\n.dot\r\nbody\r\n")]
    assert code(client.command(b"QUIT")) == b"221 2.0.0"


def test_pipelined_transactions_answered_in_order(client: Client, server: ServerThread) -> None:
    client.command(b"EHLO c")
    one = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
    client.send(one + b"m1\r\n.\r\n" + one + b"m2\r\n.\r\nQUIT\r\n")
    replies = [code(client.reply()) for _ in range(9)]
    assert replies == [b"250 2.1.0", b"250 2.1.5", b"354 End", b"250 2.0.0"] * 2 + [b"221 2.0.0"]
    assert [m[2] for m in server.handler.messages] == [b"m1\r\n", b"m2\r\n"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"FOO bar", b"500 5.5.1"),
        (b"MAIL FROM:<a@b.test>", b"503 5.5.1"),  # before EHLO
        (b"EHLO", b"501 5.5.4"),
        (b"VRFY someone", b"252 2.5.0"),
        (b"HELP", b"214 2.0.0"),
        (b"NOOP", b"250 2.0.0"),
        (b"RSET", b"250 2.0.0"),
        (b"X" * 600, b"500 5.5.6"),
    ],
)
def test_single_commands(client: Client, line: bytes, expected: bytes) -> None:
    assert code(client.command(line)) == expected
    assert code(client.command(b"NOOP")) == b"250 2.0.0"  # the session goes on


@pytest.mark.parametrize(
    ("mail", "expected"),
    [
        (b"MAIL FROM:a@b.test", b"501 5.5.4"),
        (b"MAIL FROM:<a@b.test> FOO=1", b"555 5.5.4"),
        (b"MAIL FROM:<a@b.test> SIZE=20000", b"552 5.3.4"),
        (b"MAIL FROM:<" + b"a" * 65 + b"@b.test>", b"553 5.1.7"),
        (b"MAIL FROM:<a\x00b@b.test>", b"501 5.1.7"),
    ],
)
def test_bad_mail_commands(client: Client, mail: bytes, expected: bytes) -> None:
    client.command(b"EHLO c")
    assert code(client.command(mail)) == expected
    assert code(client.command(b"MAIL FROM:<ok@b.test>")) == b"250 2.1.0"


def test_recipient_limits_and_sequence(client: Client) -> None:
    client.command(b"EHLO c")
    assert code(client.command(b"RCPT TO:<b@y.test>")) == b"503 5.5.1"
    assert code(client.command(b"DATA")) == b"503 5.5.1"
    client.command(b"MAIL FROM:<a@x.test>")
    assert code(client.command(b"MAIL FROM:<a@x.test>")) == b"503 5.5.1"
    assert code(client.command(b"DATA")) == b"554 5.5.1"
    assert code(client.command(b"RCPT TO:<nobody@y.test>")) == b"550 5.1.1"
    for n in range(3):
        assert code(client.command(f"RCPT TO:<r{n}@y.test>".encode())) == b"250 2.1.5"
    assert code(client.command(b"RCPT TO:<r4@y.test>")) == b"452 4.5.3"
    assert code(client.command(b"RCPT TO:<\xc3\xa9@y.test>")) == b"553 5.6.7"


def test_relay_denied_outside_relay_from() -> None:
    server = ServerThread(Limits(), relay_from=(ipaddress.ip_network("10.0.0.0/8"),))
    try:
        client = Client(server.port)
        client.reply()
        client.command(b"EHLO c")
        client.command(b"MAIL FROM:<a@x.test>")
        for address in (b"b@y.test", b"b%z.test@y.test", b"z.test!b@y.test", b"@relay.test:b@y.test"):
            assert code(client.command(b"RCPT TO:<" + address + b">")) == b"554 5.7.1"
        assert server.handler.rejections[-1].code == 554
    finally:
        server.stop()


def test_oversize_message_refused_and_session_goes_on(client: Client, server: ServerThread) -> None:
    client.command(b"EHLO c")
    client.command(b"MAIL FROM:<a@x.test>")
    client.command(b"RCPT TO:<b@y.test>")
    client.command(b"DATA")
    client.send((b"x" * 70 + b"\r\n") * 500 + b".\r\n")
    assert code(client.reply()) == b"552 5.3.4"
    assert server.handler.messages == []
    assert code(client.command(b"MAIL FROM:<a@x.test>")) == b"250 2.1.0"


@pytest.mark.parametrize("payload", [b"bare\nLF\r\n", b"bare\rCR\r\n", b"x" * 1001 + b"\r\n"])
def test_bad_content_refused(client: Client, server: ServerThread, payload: bytes) -> None:
    client.command(b"EHLO c")
    client.command(b"MAIL FROM:<a@x.test>")
    client.command(b"RCPT TO:<b@y.test>")
    client.command(b"DATA")
    client.send(payload + b".\r\n")
    assert code(client.reply()) == b"550 5.6.0"
    assert server.handler.messages == []


@pytest.fixture(params=["compiled", "python"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the server with the compiled codec and with its pure-Python twin."""
    if request.param == "compiled":
        module = pytest.importorskip("engine._smtpproto", reason="build with `python setup.py build_ext --inplace`")
    else:
        import engine._smtpproto_py as module
    monkeypatch.setattr(server_module, "smtpproto", module)
    return request.param


LOOKALIKES = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"]
SMUGGLED = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nsmuggled\r\n"


@pytest.mark.parametrize("after", [SMUGGLED, b"", b"QUIT\r\n"], ids=["commands", "nothing", "quit"])
@pytest.mark.parametrize("lookalike", LOOKALIKES)
def test_smuggled_end_of_data_never_splits_a_message(
    codec: str, client: Client, server: ServerThread, lookalike: bytes, after: bytes
) -> None:
    client.command(b"EHLO c")
    client.command(b"MAIL FROM:<a@x.test>")
    client.command(b"RCPT TO:<b@y.test>")
    client.command(b"DATA")
    client.send(b"hello" + lookalike + after + b"\r\n.\r\n")
    assert code(client.reply()) == b"550 5.6.0"  # bare CR/LF: the whole thing is one refused message
    assert server.handler.messages == []
    assert code(client.command(b"NOOP")) == b"250 2.0.0"


@pytest.mark.parametrize("lookalike", LOOKALIKES)
def test_lookalikes_inside_bdat_are_plain_content(
    codec: str, client: Client, server: ServerThread, lookalike: bytes
) -> None:
    client.command(b"EHLO c")
    client.command(b"MAIL FROM:<a@x.test>")
    client.command(b"RCPT TO:<b@y.test>")
    content = b"hello" + lookalike + SMUGGLED
    client.send(b"BDAT %d LAST\r\n" % len(content) + content)
    assert code(client.reply()) == b"550 5.6.0"
    assert server.handler.messages == []
    assert code(client.command(b"NOOP")) == b"250 2.0.0"


def reference_message(body: bytes) -> bytes | None:
    """What DATA followed by `body` CRLF.CRLF must deliver, by RFC 5321 alone; None if it must be refused."""
    data = body + b"\r\n.\r\n"
    content = data[: (b"\r\n" + data).find(b"\r\n.\r\n")]
    crlf = content.count(b"\r\n")
    if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
        return None
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in content.split(b"\r\n"))


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ServerThread]:
    server = ServerThread(Limits(max_message_size=10_000, idle_timeout=5.0))
    yield server
    server.stop()


@pytest.mark.parametrize("implementation", ["compiled", "python"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=40).map(lambda raw: bytes(b"a.\r\n"[byte % 4] for byte in raw)), split=st.integers(0, 60)
)
def test_data_through_the_server_matches_rfc_5321(
    shared_server: ServerThread, monkeypatch: pytest.MonkeyPatch, implementation: str, body: bytes, split: int
) -> None:
    """Random dots, CRs and LFs, in two reads split anywhere: at most one message, exactly the reference one."""
    import engine._smtpproto_py as pure

    module = pure if implementation == "python" else pytest.importorskip("engine._smtpproto")
    monkeypatch.setattr(server_module, "smtpproto", module)
    shared_server.handler.messages.clear()
    client = Client(shared_server.port)
    try:
        client.reply()
        client.send(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        for _ in range(4):
            client.reply()
        stream = body + b"\r\n.\r\n\r\nQUIT\r\n"
        client.send(stream[:split])
        client.send(stream[split:])
        client.sock.settimeout(5)
        while client.sock.recv(65536):
            pass
    finally:
        client.sock.close()
    expected = reference_message(body)
    assert shared_server.handler.messages == ([] if expected is None else [("a@x.test", ["b@y.test"], expected)])


def test_idle_timeout_closes_with_421(server: ServerThread) -> None:
    client = Client(server.port)
    client.reply()
    client.sock.settimeout(6)
    assert code(client.reply()) == b"421 4.4.2"
    assert client.closed()


def test_too_many_errors_closes(client: Client) -> None:
    for _ in range(19):
        client.command(b"BOGUS")
    client.send(b"BOGUS\r\n")
    assert code(client.reply()) == b"500 5.5.1"
    assert code(client.reply()) == b"421 4.7.0"
    assert client.closed()


def test_ehlo_advertises_chunking_but_not_starttls_or_auth_without_them(client: Client) -> None:
    reply = client.command(b"EHLO c")
    assert b"CHUNKING" in reply
    assert b"STARTTLS" not in reply and b"AUTH" not in reply
    assert code(client.command(b"STARTTLS")) == b"454 4.7.0"
    assert code(client.command(b"AUTH PLAIN AGFAYg==")) == b"502 5.5.1"


def envelope(client: Client) -> None:
    client.command(b"EHLO c")
    assert code(client.command(b"MAIL FROM:<a@x.test>")) == b"250 2.1.0"
    assert code(client.command(b"RCPT TO:<b@y.test>")) == b"250 2.1.5"


def test_bdat_chunks_make_one_message(client: Client, server: ServerThread) -> None:
    envelope(client)
    client.send(b"BDAT 7\r\nhello, BDAT 7 LAST\r\nworld\r\n")
    assert client.reply() == b"250 2.0.0 7 octets received"
    assert code(client.reply()) == b"250 2.0.0"
    assert server.handler.messages == [("a@x.test", ["b@y.test"], b"hello, world\r\n")]


def test_bdat_content_is_data_even_when_it_looks_like_commands(client: Client, server: ServerThread) -> None:
    envelope(client)
    content = b"one\r\n.\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n.\r\nQUIT\r\n"
    client.send(b"BDAT %d LAST\r\n" % len(content) + content)
    assert code(client.reply()) == b"250 2.0.0"
    assert server.handler.messages == [("a@x.test", ["b@y.test"], content)]
    assert code(client.command(b"NOOP")) == b"250 2.0.0"


def test_bdat_without_final_crlf_gets_one(client: Client, server: ServerThread) -> None:
    envelope(client)
    client.send(b"BDAT 4\r\nbodyBDAT 0 LAST\r\n")
    assert code(client.reply()) == b"250 2.0.0"
    assert code(client.reply()) == b"250 2.0.0"
    assert server.handler.messages[0][2] == b"body\r\n"


def test_refused_bdat_chunk_is_read_not_executed(client: Client, server: ServerThread) -> None:
    client.command(b"EHLO c")
    hidden = b"QUIT\r\nNOOP\r\n"
    client.send(b"BDAT %d LAST\r\n" % len(hidden) + hidden)
    assert code(client.reply()) == b"503 5.5.1"
    assert code(client.command(b"RSET")) == b"250 2.0.0"
    assert server.handler.messages == []


def test_bdat_over_the_size_limit_is_refused_and_consumed(client: Client, server: ServerThread) -> None:
    envelope(client)
    chunk = (b"y" * 98 + b"\r\n") * 60
    client.send(b"BDAT 6000\r\n" + chunk + b"BDAT 6000 LAST\r\n" + chunk)
    assert code(client.reply()) == b"250 2.0.0"
    assert code(client.reply()) == b"552 5.3.4"
    assert code(client.command(b"NOOP")) == b"250 2.0.0"
    assert server.handler.messages == []
    assert server.handler.rejections[-1].code == 552


@pytest.mark.parametrize(
    ("content", "expected"), [(b"bare\nLF\r\n", b"550 5.6.0"), (b"z" * 1001 + b"\r\n", b"550 5.6.0")]
)
def test_bdat_content_is_checked_like_data(
    client: Client, server: ServerThread, content: bytes, expected: bytes
) -> None:
    envelope(client)
    client.send(b"BDAT %d LAST\r\n" % len(content) + content)
    assert code(client.reply()) == expected
    assert server.handler.messages == []


def test_data_after_bdat_is_a_sequence_error(client: Client) -> None:
    envelope(client)
    client.send(b"BDAT 3\r\nabc")
    assert code(client.reply()) == b"250 2.0.0"
    assert code(client.command(b"DATA")) == b"503 5.5.1"


@pytest.mark.parametrize("argument", [b"", b"x", b"-1", b"5 FIRST", b"99999999999999999999999"])
def test_bdat_with_an_unreadable_size_ends_the_session(client: Client, argument: bytes) -> None:
    envelope(client)
    client.send(b"BDAT " + argument + b"\r\nQUIT\r\n")
    assert code(client.reply()) == b"501 5.5.4"
    assert code(client.reply()) == b"421 4.5.0"
    assert client.closed()


def test_smtputf8_envelope(client: Client, server: ServerThread) -> None:
    client.command(b"EHLO c")
    assert code(client.command(b"MAIL FROM:<\xc3\xa9@x.test>")) == b"553 5.6.7"
    assert code(client.command(b"MAIL FROM:<\xc3\xa9@x.test> SMTPUTF8")) == b"250 2.1.0"
    assert code(client.command(b"RCPT TO:<\xc3\xbc@y.test>")) == b"250 2.1.5"
    client.command(b"DATA")
    client.send(b"Subject: \xc3\xa9\r\n\r\nhi\r\n.\r\n")
    assert code(client.reply()) == b"250 2.0.0"
    assert server.handler.messages == [("\u00e9@x.test", ["\u00fc@y.test"], b"Subject: \xc3\xa9\r\n\r\nhi\r\n")]
    client.command(b"HELO c")
    assert code(client.command(b"MAIL FROM:<a@x.test> SMTPUTF8")) == b"555 5.5.4"


@pytest.mark.parametrize("address", [b"a\nb@y.test", b"a\rb@y.test", b"a\x00b@y.test", b"a" * 65 + b"@y.test"])
def test_control_characters_and_long_parts_in_recipients(client: Client, address: bytes) -> None:
    client.command(b"EHLO c")
    client.command(b"MAIL FROM:<a@x.test>")
    assert client.command(b"RCPT TO:<" + address + b">")[:1] == b"5"
    assert code(client.command(b"RCPT TO:<ok@y.test>")) == b"250 2.1.5"


@pytest.fixture
def fast_timeouts() -> Iterator[ServerThread]:
    server = ServerThread(Limits(idle_timeout=10.0, command_timeout=0.6, data_timeout=0.6))
    yield server
    server.stop()


def trickle(client: Client, data: bytes, interval: float = 0.1) -> bytes:
    """Sends one octet per interval until the server answers (at most len(data) octets)."""
    client.sock.settimeout(interval)
    for octet in data:
        client.send(bytes([octet]))
        try:
            chunk = client.sock.recv(4096)
        except TimeoutError:
            continue
        client.sock.settimeout(5)
        client.buffer += chunk
        return client.reply()
    raise AssertionError("the server never answered")


def test_command_timeout_is_not_extended_by_trickling(fast_timeouts: ServerThread) -> None:
    client = Client(fast_timeouts.port)
    client.reply()
    started = time.monotonic()
    assert code(trickle(client, b"NOOP" * 10)) == b"421 4.4.2"
    assert time.monotonic() - started < 2.0
    assert client.closed()


def test_each_command_gets_its_own_time(fast_timeouts: ServerThread) -> None:
    client = Client(fast_timeouts.port)
    client.reply()
    for _ in range(4):
        time.sleep(0.3)
        assert code(client.command(b"NOOP")) == b"250 2.0.0"


@pytest.mark.parametrize("start", [b"DATA\r\n", b"BDAT 100 LAST\r\n"])
def test_data_timeout(fast_timeouts: ServerThread, start: bytes) -> None:
    client = Client(fast_timeouts.port)
    client.reply()
    envelope(client)
    client.send(start)
    if start.startswith(b"DATA"):
        client.reply()
    reply = trickle(client, b"x" * 40)
    assert reply.startswith(b"421 4.4.2 Timeout receiving message data")


COMMANDS = [
    b"EHLO c",
    b"HELO c",
    b"MAIL FROM:<a@x.test>",
    b"MAIL FROM:<a@x.test> SMTPUTF8 SIZE=10",
    b"RCPT TO:<b@y.test>",
    b"DATA",
    b".",
    b"BDAT 3",
    b"BDAT 0 LAST",
    b"BDAT 5 LAST",
    b"RSET",
    b"NOOP",
    b"STARTTLS",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"*",
    b"VRFY x",
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(st.one_of(st.sampled_from(COMMANDS), st.binary(max_size=30)), max_size=25),
    separators=st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b""]), min_size=25, max_size=25),
)
def test_random_command_streams_never_break_the_server(
    shared_server: ServerThread, parts: list[bytes], separators: list[bytes]
) -> None:
    """Commands and random bytes, joined by CRLF, bare CR/LF or nothing: every reply well-formed, no exception
    in the protocol (the loop's exception handler stays silent), and the session ends cleanly at EOF."""
    errors: list[dict] = []
    shared_server.loop.call_soon_threadsafe(shared_server.loop.set_exception_handler, lambda _, ctx: errors.append(ctx))
    client = Client(shared_server.port)
    try:
        client.reply()
        client.send(b"".join(part + separator for part, separator in zip(parts, separators, strict=False)))
        client.sock.shutdown(socket.SHUT_WR)
        client.sock.settimeout(5)
        received = b""
        while chunk := client.sock.recv(65536):
            received += chunk
    finally:
        client.sock.close()
    for line in received.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-"), received
    assert received == b"" or received.endswith(b"\r\n")
    time.sleep(0.01)
    assert errors == []
