"""engine.smtp.client against a small but real ESMTP server on loopback (defined here, reused by loadgen)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from engine.smtp.client import Reply, SMTPClientError, SMTPConnection, SMTPTimeoutError


@dataclass
class Received:
    sender: str
    recipients: list[str]
    wire: bytes  # the DATA section as sent, dot-stuffed, without the final ".\r\n"; or the BDAT chunk


@dataclass
class Peer:
    """An ESMTP server that records what it got and answers as configured.

    `replies` maps an address (MAIL or RCPT) to the raw reply to give it ("\\r\\n" inside for several lines);
    `data_reply` answers DATA instead of 354 (and BDAT instead of 250 when `chunking` offers BDAT); `silent`
    names verbs (or "END" for end of data) that get no reply; at a `hangup` address the server closes the
    connection without a word; `dribble` sends replies a few bytes at a time; `record` off keeps long
    benchmark runs from hoarding memory.
    """

    pipelining: bool = True
    chunking: bool = False
    ehlo: bool = True
    enhanced: bool = True
    greeting: str = "220 peer.test ESMTP"
    replies: dict[str, str] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)
    hangup: set[str] = field(default_factory=set)
    data_without_recipients: bool = False
    data_reply: str = ""
    dribble: bool = False
    record: bool = True
    reads: list[bytes] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    messages: list[Received] = field(default_factory=list)
    sessions: int = 0
    accepted: int = 0
    port: int = 0

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(lambda: _PeerProtocol(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    def ok(self, text: str) -> str:
        return text if self.enhanced else text[:4] + text[10:]


class _PeerProtocol(asyncio.Protocol):
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.buf = b""
        self.in_data = False
        self.chunk = 0  # octets of a BDAT chunk still to read
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.slot = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.peer.sessions += 1
        if self.peer.greeting:
            self.send([self.peer.greeting])

    def send(self, replies: list[str]) -> None:
        out = "".join(r + "\r\n" for r in replies).encode()
        if not self.peer.dribble:
            self.transport.write(out)
            return
        loop = asyncio.get_running_loop()
        for i in range(0, len(out), 3):
            self.slot = max(self.slot, loop.time()) + 0.002
            loop.call_at(self.slot, self.transport.write, out[i : i + 3])

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer.record:
            peer.reads.append(data)
        self.buf += data
        out: list[str] = []
        close = False
        while not close:
            if self.chunk:
                if len(self.buf) < self.chunk:
                    break
                out.append(self.end_chunk())
                continue
            if self.in_data:
                if self.buf.startswith(b".\r\n"):
                    end = 0
                else:
                    end = self.buf.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    end += 2
                wire, self.buf = self.buf[:end], self.buf[end + 3 :]
                self.in_data = False
                if peer.record:
                    peer.commands.append("END")
                if self.recipients:
                    peer.accepted += 1
                    if peer.record:
                        peer.messages.append(Received(self.sender, self.recipients, wire))
                    reply = peer.ok(f"250 2.0.0 queued as {peer.accepted}")
                else:
                    reply = peer.ok("554 5.5.1 no valid recipients")
                self.sender, self.recipients = None, []
                if "END" not in peer.silent:
                    out.append(reply)
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                break
            self.buf = rest
            command = line.decode()
            if peer.record:
                peer.commands.append(command)
            verb = command[:4].upper()
            reply, close = self.answer(verb, command)
            if reply and verb not in peer.silent:
                out.append(reply)
        if out:
            self.send(out)
        if close:
            self.transport.close()

    def end_chunk(self) -> str:
        """The reply to a BDAT LAST once its chunk is all read."""
        peer = self.peer
        wire, self.buf = self.buf[: self.chunk], self.buf[self.chunk :]
        self.chunk = 0
        if peer.record:
            peer.commands.append("END")
        if self.sender is None or not self.recipients:
            return peer.ok("554 5.5.1 no valid recipients")
        if peer.data_reply:
            return peer.data_reply
        peer.accepted += 1
        if peer.record:
            peer.messages.append(Received(self.sender, self.recipients, wire))
        self.sender, self.recipients = None, []
        return peer.ok(f"250 2.0.0 queued as {peer.accepted}")

    def answer(self, verb: str, command: str) -> tuple[str, bool]:
        peer = self.peer
        address = command.partition("<")[2].partition(">")[0]
        if address in peer.hangup:
            return "", True
        custom = peer.replies.get(address)
        if verb == "EHLO":
            if not peer.ehlo:
                return "502 5.5.2 EHLO not here", False
            lines = ["peer.test greets you", "SIZE 10000000", "8BITMIME"]
            if peer.pipelining:
                lines.append("PIPELINING")
            if peer.chunking:
                lines.append("CHUNKING")
            if peer.enhanced:
                lines.append("ENHANCEDSTATUSCODES")
            return "\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}", False
        if verb == "HELO":
            return "250 peer.test", False
        if verb == "MAIL":
            self.sender, self.recipients = address, []
            if custom:
                self.sender = None
            return custom or peer.ok("250 2.1.0 sender ok"), False
        if verb == "RCPT":
            if self.sender is None:
                return peer.ok("503 5.5.1 need MAIL"), False
            if not custom:
                self.recipients.append(address)
            return custom or peer.ok("250 2.1.5 recipient ok"), False
        if verb == "DATA":
            if peer.data_reply:
                return peer.data_reply, False
            if self.sender is None or not (self.recipients or peer.data_without_recipients):
                return peer.ok("554 5.5.1 no valid recipients"), False
            self.in_data = True
            return "354 end with <CRLF>.<CRLF>", False
        if verb == "BDAT" and peer.chunking:
            size, _, last = command[5:].partition(" ")
            assert last == "LAST", command
            self.chunk = int(size)
            if not self.chunk:
                return self.end_chunk(), False
            return "", False
        if verb == "RSET":
            self.sender, self.recipients = None, []
            return peer.ok("250 2.0.0 reset"), False
        if verb == "QUIT":
            return peer.ok("221 2.0.0 bye"), True
        return peer.ok("500 5.5.1 unknown command"), False


class PeerThread:
    """Runs a Peer on its own event loop thread, for code under test that runs its own loop."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> Peer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.peer.start(), self._loop).result(5)
        return self.peer

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.peer.stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest):
    """Run a coroutine to completion (bounded) on uvloop and on stock asyncio."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(coro, 10))

    return runner


async def connect(peer: Peer, **kwargs: Any) -> SMTPConnection:
    await peer.start()
    return await SMTPConnection.open("127.0.0.1", peer.port, **kwargs)


MESSAGE = b"Subject: hello\r\nFrom: <a@src.test>\r\n\r\nline one\r\n"


def test_pipelined_envelope_goes_out_in_one_write(run) -> None:
    peer = Peer()

    async def go():
        conn = await connect(peer)
        result = await conn.send_message("a@src.test", ["x@d.test", "y@d.test", "z@d.test"], MESSAGE)
        await conn.quit()
        return result

    mail, rcpts, data = run(go())
    assert mail == Reply(250, "2.1.0", "sender ok")
    assert [r.code for r in rcpts] == [250, 250, 250]
    assert data == Reply(250, "2.0.0", "queued as 1")
    envelope = [r for r in peer.reads if r.startswith(b"MAIL")]
    assert envelope == [
        b"MAIL FROM:<a@src.test> SIZE=%d\r\n" % len(MESSAGE)
        + b"RCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\nRCPT TO:<z@d.test>\r\nDATA\r\n"
    ]
    assert peer.messages == [Received("a@src.test", ["x@d.test", "y@d.test", "z@d.test"], MESSAGE)]
    assert peer.commands[-1] == "QUIT"


def test_without_pipelining_each_command_waits_for_its_reply(run) -> None:
    peer = Peer(pipelining=False)

    async def go():
        conn = await connect(peer)
        result = await conn.send_message("a@src.test", ["x@d.test", "y@d.test"], MESSAGE)
        conn.close()
        return result

    _, rcpts, data = run(go())
    assert [r.code for r in rcpts] == [250, 250]
    assert data.code == 250
    commands = [r for r in peer.reads if r[:4] in (b"MAIL", b"RCPT", b"DATA")]
    assert [c.split(b"\r\n")[0][:4] for c in commands] == [b"MAIL", b"RCPT", b"RCPT", b"DATA"]
    assert all(c.count(b"\r\n") == 1 for c in commands)


def test_body_is_dot_stuffed_on_the_wire(run) -> None:
    peer = Peer()
    body = b"Subject: dots\r\n\r\n.hidden\r\n.\r\nmiddle\r\n..two\r\n"

    async def go():
        conn = await connect(peer)
        await conn.send_message("a@src.test", ["x@d.test"], body)
        conn.close()

    run(go())
    assert peer.messages[0].wire == b"Subject: dots\r\n\r\n..hidden\r\n..\r\nmiddle\r\n...two\r\n"
    assert any(r.endswith(b"...two\r\n.\r\n") for r in peer.reads)


def test_bare_line_feed_is_refused_before_anything_is_sent(run) -> None:
    peer = Peer()

    async def go():
        conn = await connect(peer)
        with pytest.raises(ValueError):
            await conn.send_message("a@src.test", ["x@d.test"], b"Subject: x\n\nbare\n")
        return await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)

    assert run(go())[2].code == 250
    assert [c[:4] for c in peer.commands].count("MAIL") == 1


@pytest.mark.parametrize("address", ["x@d.test>\r\nRCPT TO:<evil@d.test", "x\n@d.test", "<x@d.test>"])
def test_addresses_that_could_smuggle_commands_are_refused(run, address: str) -> None:
    peer = Peer()

    async def go():
        conn = await connect(peer)
        with pytest.raises(ValueError):
            await conn.send_message("a@src.test", [address], MESSAGE)
        with pytest.raises(ValueError):
            await conn.send_message(address, ["x@d.test"], MESSAGE)
        conn.close()

    run(go())
    assert not any(c.startswith(("MAIL", "RCPT")) for c in peer.commands)


@pytest.mark.parametrize("pipelining", [True, False])
def test_each_recipient_gets_its_own_reply(run, pipelining: bool) -> None:
    peer = Peer(
        pipelining=pipelining,
        replies={"bad@d.test": "550 5.1.1 no such user", "later@d.test": "451 4.3.0 try later"},
    )

    async def go():
        conn = await connect(peer)
        return await conn.send_message("a@src.test", ["ok@d.test", "bad@d.test", "later@d.test"], MESSAGE)

    _, rcpts, data = run(go())
    assert rcpts[1:] == [Reply(550, "5.1.1", "no such user"), Reply(451, "4.3.0", "try later")]
    assert rcpts[0].success
    assert data.code == 250
    assert peer.messages[0].recipients == ["ok@d.test"]


@pytest.mark.parametrize("pipelining", [True, False])
def test_all_recipients_refused_resets_and_the_session_goes_on(run, pipelining: bool) -> None:
    peer = Peer(pipelining=pipelining, replies={"bad@d.test": "550 5.1.1 no such user"})

    async def go():
        conn = await connect(peer)
        first = await conn.send_message("a@src.test", ["bad@d.test", "bad@d.test"], MESSAGE)
        second = await conn.send_message("a@src.test", ["ok@d.test"], MESSAGE)
        return first, second

    (mail, rcpts, data), (_, _, second) = run(go())
    assert mail.success and [r.code for r in rcpts] == [550, 550] and data is None
    assert second.code == 250
    first_session = peer.commands[peer.commands.index("RSET") - 1]
    assert first_session == ("DATA" if pipelining else "RCPT TO:<bad@d.test>")
    assert len(peer.messages) == 1


def test_data_accepted_without_recipients_is_ended_empty_then_reset(run) -> None:
    peer = Peer(data_without_recipients=True, replies={"bad@d.test": "550 5.1.1 no such user"})

    async def go():
        conn = await connect(peer)
        return await conn.send_message("a@src.test", ["bad@d.test"], MESSAGE)

    assert run(go())[2] is None
    assert peer.commands[-3:] == ["DATA", "END", "RSET"]
    assert not peer.messages


@pytest.mark.parametrize("pipelining", [True, False])
def test_refused_data_command_resets(run, pipelining: bool) -> None:
    peer = Peer(pipelining=pipelining, data_reply="451 4.3.0 not now")

    async def go():
        conn = await connect(peer)
        return conn, await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)

    conn, (mail, rcpts, data) = run(go())
    assert mail.success and rcpts[0].success and (data.code, data.enhanced) == (451, "4.3.0")
    assert peer.commands[-2:] == ["DATA", "RSET"]
    assert not conn.closed


def test_refused_sender(run) -> None:
    peer = Peer(pipelining=False, replies={"a@src.test": "553 5.7.1 not you"})

    async def go():
        conn = await connect(peer)
        return await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)

    mail, rcpts, data = run(go())
    assert (mail.code, rcpts, data) == (553, [], None)
    assert peer.commands[-1] == "RSET"


def test_multi_line_replies_parsed_across_reads(run) -> None:
    peer = Peer(
        dribble=True,
        greeting="220-peer.test first\r\n220-second\r\n220 third",
        replies={"bad@d.test": "550-5.7.1 first line\r\n550-5.7.1 second line\r\n550 5.7.1 third line"},
    )

    async def go():
        conn = await connect(peer)
        result = await conn.send_message("a@src.test", ["bad@d.test", "ok@d.test"], MESSAGE)
        return conn, result

    conn, (_, rcpts, data) = run(go())
    assert conn.greeting == Reply(220, None, "peer.test first\nsecond\nthird")
    assert conn.extensions == {
        "SIZE": "10000000",
        "8BITMIME": "",
        "PIPELINING": "",
        "ENHANCEDSTATUSCODES": "",
    }
    assert rcpts[0] == Reply(550, "5.7.1", "first line\nsecond line\nthird line")
    assert data.code == 250
    assert len(peer.reads) >= 3


def test_replies_without_enhanced_codes(run) -> None:
    peer = Peer(enhanced=False)

    async def go():
        conn = await connect(peer)
        return await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)

    mail, _, data = run(go())
    assert mail == Reply(250, None, "sender ok")
    assert data == Reply(250, None, "queued as 1")


def test_helo_fallback_when_ehlo_is_refused(run) -> None:
    peer = Peer(ehlo=False)

    async def go():
        conn = await connect(peer, ehlo_name="client.test")
        return conn, await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)

    conn, (_, _, data) = run(go())
    assert conn.extensions == {}
    assert peer.commands[:3] == ["EHLO client.test", "HELO client.test", "MAIL FROM:<a@src.test>"]
    assert data.code == 250


def test_eight_bit_body_is_declared(run) -> None:
    peer = Peer()

    async def go():
        conn = await connect(peer)
        return await conn.send_message("a@src.test", ["x@d.test"], "Subject: é\r\n\r\nçà\r\n".encode())

    run(go())
    assert peer.commands[1].endswith(" BODY=8BITMIME")


def test_greeting_refused(run) -> None:
    peer = Peer(greeting="554 5.3.2 go away")

    async def go():
        with pytest.raises(SMTPClientError) as info:
            await connect(peer)
        return info.value.reply

    assert run(go()) == Reply(554, "5.3.2", "go away")


def test_silent_greeting_times_out(run) -> None:
    peer = Peer(greeting="")

    async def go():
        started = time.monotonic()
        with pytest.raises(SMTPTimeoutError):
            await connect(peer, timeout=0.2)
        return time.monotonic() - started

    assert 0.15 < run(go()) < 2


def test_silent_end_of_data_times_out_and_closes(run) -> None:
    peer = Peer(silent={"END"})

    async def go():
        conn = await connect(peer, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(SMTPTimeoutError) as info:
            await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)
        elapsed = time.monotonic() - started
        assert conn.closed
        with pytest.raises(SMTPClientError):
            await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)
        return elapsed, info.value.reply

    elapsed, reply = run(go())
    assert 0.25 < elapsed < 2
    assert reply is None


def test_timeout_counts_silence_not_total_time(run) -> None:
    peer = Peer(dribble=True, replies={"x@d.test": "250 " + "slow " * 80})

    async def go():
        conn = await connect(peer, timeout=0.15)
        started = time.monotonic()
        result = await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)
        return time.monotonic() - started, result

    elapsed, (_, rcpts, _) = run(go())
    assert elapsed > 0.15
    assert rcpts[0].code == 250


def test_server_hangup_is_an_error_without_reply(run) -> None:
    peer = Peer(hangup={"x@d.test"})

    async def go():
        conn = await connect(peer, timeout=5)
        with pytest.raises(SMTPClientError) as info:
            await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)
        return conn, info.value

    conn, error = run(go())
    assert error.reply is None and not isinstance(error, SMTPTimeoutError)
    assert conn.closed


def test_malformed_reply_closes_the_connection(run) -> None:
    peer = Peer(replies={"x@d.test": "oops not smtp"})

    async def go():
        conn = await connect(peer)
        with pytest.raises(SMTPClientError, match="malformed"):
            await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)
        return conn

    assert run(go()).closed


def test_many_messages_over_one_connection(run) -> None:
    peer = Peer()

    async def go():
        conn = await connect(peer)
        for i in range(200):
            _, _, data = await conn.send_message("a@src.test", [f"u{i}@d.test"], MESSAGE)
            assert data.code == 250
        await conn.quit()

    run(go())
    assert peer.sessions == 1
    assert [m.recipients[0] for m in peer.messages] == [f"u{i}@d.test" for i in range(200)]


def test_concurrent_messages_overlap_body_and_next_envelope(run) -> None:
    peer = Peer(replies={"bad@d.test": "550 5.1.1 no such user"})

    async def go():
        conn = await connect(peer)
        return await asyncio.gather(
            *(conn.send_message("a@src.test", [rcpt], MESSAGE) for rcpt in ("x@d.test", "bad@d.test", "y@d.test"))
        )

    first, refused, last = run(go())
    assert first[2].code == 250 and refused[2] is None and last[2].code == 250
    assert refused[1] == [Reply(550, "5.1.1", "no such user")]
    assert [m.recipients for m in peer.messages] == [["x@d.test"], ["y@d.test"]]
    writes = [r for r in peer.reads if b"MAIL" in r]
    assert writes[1].startswith(MESSAGE + b".\r\nMAIL FROM:<a@src.test>")
    assert writes[2].startswith(b"RSET\r\nMAIL FROM:<a@src.test>")


def test_concurrent_messages_take_turns_without_pipelining(run) -> None:
    peer = Peer(pipelining=False)

    async def go():
        conn = await connect(peer)
        return await asyncio.gather(*(conn.send_message("a@src.test", [f"u{i}@d.test"], MESSAGE) for i in range(3)))

    results = run(go())
    assert [r[2].code for r in results] == [250, 250, 250]
    assert [m.recipients for m in peer.messages] == [["u0@d.test"], ["u1@d.test"], ["u2@d.test"]]
    commands = [r for r in peer.reads if r[:4] in (b"MAIL", b"RCPT", b"DATA")]
    assert len(commands) == 9 and all(c.count(b"\r\n") == 1 for c in commands)


def test_a_timeout_fails_every_waiting_message(run) -> None:
    peer = Peer(silent={"MAIL", "RCPT", "DATA"})

    async def go():
        conn = await connect(peer, timeout=0.2)
        return await asyncio.gather(
            *(conn.send_message("a@src.test", ["x@d.test"], MESSAGE) for _ in range(3)), return_exceptions=True
        )

    assert [type(r) for r in run(go())] == [SMTPTimeoutError] * 3


@pytest.mark.parametrize("pipelining", [True, False])
def test_cancelled_caller_leaves_the_session_in_step(run, pipelining: bool) -> None:
    peer = Peer(pipelining=pipelining)

    async def go():
        conn = await connect(peer)
        first = asyncio.ensure_future(conn.send_message("a@src.test", ["first@d.test"], MESSAGE))
        queued = asyncio.ensure_future(conn.send_message("a@src.test", ["queued@d.test"], MESSAGE))
        await asyncio.sleep(0)
        first.cancel()
        queued.cancel()
        _, _, data = await conn.send_message("a@src.test", ["after@d.test"], MESSAGE)
        return data

    assert run(go()).code == 250
    assert [m.recipients for m in peer.messages] == [["first@d.test"], ["after@d.test"]]


# CHUNKING (RFC 3030)


def test_chunking_sends_envelope_and_body_in_one_write_without_dot_stuffing(run) -> None:
    peer = Peer(chunking=True)
    body = b"Subject: dots\r\n\r\n.hidden\r\n.\r\nlast line without CRLF"

    async def go():
        conn = await connect(peer)
        result = await conn.send_message("a@src.test", ["x@d.test", "y@d.test"], body)
        conn.close()
        return result

    mail, rcpts, data = run(go())
    assert mail.success and [r.code for r in rcpts] == [250, 250]
    assert data == Reply(250, "2.0.0", "queued as 1")
    content = body + b"\r\n"
    envelope = b"MAIL FROM:<a@src.test> SIZE=%d\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\n" % len(body)
    assert [r for r in peer.reads if r.startswith(b"MAIL")] == [envelope + b"BDAT %d LAST\r\n" % len(content) + content]
    assert peer.messages == [Received("a@src.test", ["x@d.test", "y@d.test"], content)]
    assert "DATA" not in peer.commands


def test_chunking_is_not_used_when_switched_off_or_without_pipelining(run) -> None:
    for peer, options in ((Peer(chunking=True), {"chunking": False}), (Peer(chunking=True, pipelining=False), {})):

        async def go(peer=peer, options=options):
            conn = await connect(peer, **options)
            await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)
            conn.close()

        run(go())
        assert "DATA" in peer.commands and not any(c.startswith("BDAT") for c in peer.commands)


def test_refused_chunk_resets_and_the_next_message_follows(run) -> None:
    peer = Peer(chunking=True, data_reply="552 5.3.4 too big for us")

    async def go():
        conn = await connect(peer)
        first, second = await asyncio.gather(
            conn.send_message("a@src.test", ["x@d.test"], MESSAGE),
            conn.send_message("a@src.test", ["bad@d.test"], MESSAGE),
        )
        return conn, first, second

    peer.replies["bad@d.test"] = "550 5.1.1 no such user"
    conn, (mail, rcpts, data), (_, rcpts2, data2) = run(go())
    assert mail.success and rcpts[0].success
    assert (data.code, data.enhanced, data.text) == (552, "5.3.4", "too big for us")
    assert rcpts2[0].code == 550 and data2 is None
    verbs = [c.split(" ")[0] for c in peer.commands if c != "END"]
    assert verbs[-8:] == ["MAIL", "RCPT", "BDAT", "RSET", "MAIL", "RCPT", "BDAT", "RSET"]
    assert not conn.closed and not peer.messages


def test_chunking_refuses_content_smtp_cannot_carry_before_sending(run) -> None:
    peer = Peer(chunking=True)

    async def go():
        conn = await connect(peer)
        with pytest.raises(ValueError, match="bare CR or LF"):
            await conn.send_message("a@src.test", ["x@d.test"], b"Subject: x\r\n\r\nbare\nfeed\r\n")
        result = await conn.send_message("a@src.test", ["x@d.test"], MESSAGE)
        conn.close()
        return result

    assert run(go())[2].code == 250
    assert [m.wire for m in peer.messages] == [MESSAGE]
