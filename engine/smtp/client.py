"""A lean pipelining SMTP client on asyncio.Protocol.

The protocol itself drives each transaction from its reply callback, so with PIPELINING (RFC 2920) MAIL,
every RCPT and DATA go out in one write, and the body goes out the moment 354 arrives, together with the
envelope of the next message when the caller has one waiting (send_message may be called concurrently on
one connection). A server that also offers CHUNKING (RFC 3030) gets the body as one BDAT LAST chunk in
that same write: one write and one round trip a message instead of two, and no dot-stuffing. Replies are
parsed incrementally from the receive buffer; a message then costs a few tens of microseconds of CPU.
Plain text only: no STARTTLS, no AUTH.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

from engine.smtpproto import check_data, encode_data

__all__ = ["Reply", "SMTPClientError", "SMTPConnection", "SMTPTimeoutError"]

_MAX_PARTIAL_LINE = 8192
_ENHANCED = re.compile(rb"([245]\.\d{1,3}\.\d{1,3})(?: |$)")
_SEEN_MAX = 256
_SEEN: dict[bytes, Reply] = {}  # raw single-line replies already parsed: servers repeat most of them
_ENVELOPE, _FINAL, _ABANDON, _RESET = range(4)


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply a server gave (or one the engine made up in its place) that decides a recipient's
    fate; `text` joins the lines of a multi-line reply with "\\n"."""

    code: int
    enhanced: str | None
    text: str

    @property
    def success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


class SMTPClientError(Exception):
    """The session cannot go on as asked; `reply` is the server's answer, or None (I/O, timeout, garbage).

    `replies` holds what a broken transaction got before the break (MAIL's reply, then the RCPTs'), so a
    recipient refused before a connection drop keeps its refusal.
    """

    def __init__(self, message: str, reply: Reply | None = None, replies: Sequence[Reply] = ()) -> None:
        super().__init__(message)
        self.reply = reply
        self.replies = list(replies)


class SMTPTimeoutError(SMTPClientError):
    """No reply within the timeout; the connection has been aborted."""


def _parse_reply(lines: list[bytes]) -> Reply:
    """A Reply from its lines (CR LF removed); the enhanced code is taken off every line that repeats it."""
    first = lines[0]
    match = _ENHANCED.match(first, 4)
    if len(lines) == 1:
        if match is None:
            return Reply(int(first[:3]), None, first[4:].decode("utf-8", "replace"))
        return Reply(int(first[:3]), match.group(1).decode(), first[match.end() :].decode("utf-8", "replace"))
    texts = [line[4:] for line in lines]
    enhanced = None
    if match is not None:
        prefix = match.group(1)
        enhanced = prefix.decode()
        cut = len(prefix) + 1
        texts = [t[cut:] if t.startswith(prefix) else t for t in texts]
    return Reply(int(first[:3]), enhanced, b"\n".join(texts).decode("utf-8", "replace"))


class _Transaction:
    """One message on its way: its commands, its body until sent, the replies so far, and its stage."""

    __slots__ = ("body", "chunked", "commands", "future", "refusal", "replies", "stage")

    def __init__(self, commands: list[bytes], body: bytes, future: asyncio.Future, chunked: bool) -> None:
        self.commands = commands
        self.body = body
        self.future = future
        self.chunked = chunked  # the last command is BDAT LAST and the body follows it at once
        self.replies: list[Reply] = []
        self.stage = _ENVELOPE
        self.refusal: Reply | None = None  # the reply to DATA when the server refused it


def _address(address: str) -> bytes:
    """Encode an envelope address, refusing anything that could smuggle a command onto the wire."""
    if not address.isprintable() or "<" in address or ">" in address:
        raise ValueError(f"invalid envelope address: {address!r}")
    return address.encode()


class SMTPConnection(asyncio.Protocol):
    """An open SMTP session; make one with `await SMTPConnection.open(...)`."""

    extensions: dict[str, str]
    greeting: Reply

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, chunking: bool = True) -> None:
        self.extensions = {}
        self._loop = loop
        self._timeout = timeout
        self._may_chunk = chunking
        self._transport: asyncio.Transport | None = None
        self._partial = b""
        self._lines: list[bytes] = []
        self._greeting: asyncio.Future[Reply] = loop.create_future()
        self._expect: deque[asyncio.Future[Reply] | _Transaction] = deque([self._greeting])
        self._queued: deque[_Transaction] = deque()
        self._busy = False
        self._out: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._activity = 0.0
        self._error: str | None = None
        self._pipelining = False
        self._chunking = False
        self._size = False
        self._eightbit = False
        self._smtputf8 = False

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        source_address: str | None = None,
        ehlo_name: str = "localhost",
        timeout: float = 30.0,
        chunking: bool = True,
    ) -> SMTPConnection:
        """Connect, read the greeting and say EHLO (HELO when EHLO is refused). `chunking` off keeps to DATA
        even when the server offers BDAT.

        Socket errors propagate as OSError; a refusal or a silent server raises SMTPClientError.
        """
        loop = asyncio.get_running_loop()
        local = (source_address, 0) if source_address else None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: cls(loop, timeout, chunking), host, port, local_addr=local), timeout
            )
        except TimeoutError:
            raise SMTPTimeoutError(f"connect to {host}:{port} timed out") from None
        try:
            conn.greeting = await conn._greeting
            if conn.greeting.code != 220:
                raise SMTPClientError("greeting refused", conn.greeting)
            await conn._hello(ehlo_name)
        except BaseException:
            conn.close()
            raise
        return conn

    @classmethod
    def adopt(
        cls, transport: asyncio.Transport, extensions: Mapping[str, str], *, timeout: float, chunking: bool = True
    ) -> SMTPConnection:
        """Take over a session another client has set up (greeting, EHLO, STARTTLS, AUTH done), so that
        its transactions from now on are pipelined by this protocol on the same connection."""
        conn = cls(asyncio.get_running_loop(), timeout, chunking)
        conn._expect.clear()
        conn._greeting.cancel()
        conn.extensions = {keyword.upper(): value for keyword, value in extensions.items()}
        conn._use_extensions()
        transport.set_protocol(conn)
        conn.connection_made(transport)
        return conn

    @property
    def closed(self) -> bool:
        """True once the connection can no longer carry a transaction."""
        return self._error is not None

    def send_message(
        self, sender: str, recipients: Sequence[str], data: bytes
    ) -> asyncio.Future[tuple[Reply, list[Reply], Reply | None]]:
        """Send one message (raw CRLF lines; dot-stuffing, or BDAT framing, is done here).

        Returns (MAIL reply, RCPT replies, final DATA reply). The last is the refusal when the server
        refused the DATA (or BDAT) command, and None when it took no recipient; the session is then RSET
        and stays usable. RCPT replies cover every
        recipient, except that without PIPELINING a refused MAIL ends the attempt before any RCPT.
        Concurrent calls are queued in call order; with PIPELINING they overlap on the wire.
        A future rather than a coroutine, so a delivery waits one frame less; bad input raises at the call.
        """
        if not recipients:
            raise ValueError("no recipients")
        chunked = self._chunking
        body = check_data(data) if chunked else encode_data(data)
        params = b""
        if self._size:
            params += b" SIZE=%d" % len(data)
        if self._eightbit and not data.isascii():
            params += b" BODY=8BITMIME"
        if self._smtputf8 and not (sender.isascii() and all(r.isascii() for r in recipients)):
            params += b" SMTPUTF8"
        commands = [b"MAIL FROM:<" + _address(sender) + b">" + params + b"\r\n"]
        commands += [b"RCPT TO:<" + _address(r) + b">\r\n" for r in recipients]
        commands.append(b"BDAT %d LAST\r\n" % len(body) if chunked else b"DATA\r\n")
        if self._error is not None:
            raise SMTPClientError(self._error)
        future = self._loop.create_future()
        self._queued.append(_Transaction(commands, body, future, chunked))
        if not self._busy:
            self._send(*self._dequeue())
        return future

    async def quit(self) -> None:
        """Say QUIT and close; never raises. With transactions still pending it just closes (they fail)."""
        if self._error is None and not self._expect and not self._queued:
            with contextlib.suppress(SMTPClientError):
                await self._command(b"QUIT\r\n")
        self.close()

    def close(self) -> None:
        """Close the connection without saying goodbye."""
        self._fail("connection closed")
        if self._transport is not None:
            self._transport.close()

    async def _hello(self, name: str) -> None:
        encoded = _address(name)
        reply = await self._command(b"EHLO " + encoded + b"\r\n")
        if reply.success:
            for line in reply.text.split("\n")[1:]:
                keyword, _, value = line.partition(" ")
                self.extensions[keyword.upper()] = value
        elif 500 <= reply.code < 600:
            reply = await self._command(b"HELO " + encoded + b"\r\n")
        if not reply.success:
            raise SMTPClientError("EHLO/HELO refused", reply)
        self._use_extensions()

    def _use_extensions(self) -> None:
        ext = self.extensions
        self._pipelining = "PIPELINING" in ext
        self._chunking = self._may_chunk and self._pipelining and "CHUNKING" in ext
        self._size = "SIZE" in ext
        self._eightbit = "8BITMIME" in ext
        self._smtputf8 = "SMTPUTF8" in ext

    def _command(self, line: bytes) -> asyncio.Future[Reply]:
        if self._error is not None:
            raise SMTPClientError(self._error)
        future = self._loop.create_future()
        self._expect.append(future)
        self._send(line)
        return future

    def _send(self, *data: bytes) -> None:
        """Queue output for one write at the end of this loop iteration, so what callers add meanwhile joins it."""
        if not data:
            return
        if self._out:
            self._out += data
        else:
            self._out = list(data)
            self._loop.call_soon(self._flush)
        self._activity = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._activity + self._timeout, self._on_timer)

    def _flush(self) -> None:
        """One write; several pieces go out gathered (a message body is never copied to join its envelope)."""
        out, self._out = self._out, []
        if self._transport.is_closing():
            return
        if len(out) == 1:
            self._transport.write(out[0])
        else:
            self._transport.writelines(out)

    def _dequeue(self) -> tuple[bytes, ...]:
        """Put the next queued transaction on the wire: its whole envelope, or MAIL alone in lock-step.

        One whose caller was cancelled while it waited is dropped; once on the wire a transaction runs to
        its end whatever happens to its caller, so the session stays in step.
        """
        while self._queued:
            txn = self._queued.popleft()
            if txn.future.done():
                continue
            self._expect.append(txn)
            self._busy = True
            if txn.chunked:
                body, txn.body = txn.body, b""
                return b"".join(txn.commands), body
            return (b"".join(txn.commands) if self._pipelining else txn.commands[0],)
        return ()

    def _on_reply(self, reply: Reply) -> None:
        if not self._expect:
            self._abort("reply without a command", reply=reply)
            return
        item = self._expect[0]
        if item.__class__ is _Transaction:
            self._advance(item, reply)
            return
        self._expect.popleft()
        if not item.done():
            item.set_result(reply)

    def _advance(self, txn: _Transaction, reply: Reply) -> None:
        """Move a transaction on by one reply, writing what the reply calls for."""
        stage = txn.stage
        if stage == _FINAL:
            self._finish(txn, reply)
            return
        if stage == _ABANDON:
            txn.stage = _RESET
            return
        if stage == _RESET:
            if reply.success:
                self._finish(txn, None)
            else:
                self._abort("RSET refused", reply=reply)
            return
        replies = txn.replies
        replies.append(reply)
        count = len(replies)
        last = len(txn.commands) - 1
        if count <= last:
            if self._pipelining:
                return
            if (count == 1 and not reply.success) or (count == last and not any(r.success for r in replies[1:])):
                txn.stage = _RESET
                self._send(b"RSET\r\n")
            else:
                self._send(txn.commands[count])
            return
        if txn.chunked:
            self._chunk_done(txn, reply)
            return
        if reply.code == 354 and replies[0].success and any(r.success for r in replies[1:-1]):
            txn.stage = _FINAL
            out = txn.body
        elif reply.code == 354:
            txn.stage = _ABANDON
            out = b".\r\nRSET\r\n"
        else:
            txn.stage = _RESET
            txn.refusal = reply if replies[0].success and any(r.success for r in replies[1:-1]) else None
            out = b"RSET\r\n"
        txn.body = b""
        if self._pipelining:
            self._busy = False
            self._send(out, *self._dequeue())
        else:
            self._send(out)

    def _chunk_done(self, txn: _Transaction, reply: Reply) -> None:
        """The reply to BDAT LAST is the final one; a refusal leaves the server's transaction open, so RSET
        (the next transaction follows it in the same write)."""
        self._busy = False
        if reply.success:
            self._finish(txn, reply)
            self._send(*self._dequeue())
            return
        replies = txn.replies
        txn.stage = _RESET
        txn.refusal = reply if replies[0].success and any(r.success for r in replies[1:-1]) else None
        self._send(b"RSET\r\n", *self._dequeue())

    def _finish(self, txn: _Transaction, final: Reply | None) -> None:
        self._expect.popleft()
        replies = txn.replies
        if not txn.future.done():
            txn.future.set_result((replies[0], replies[1 : len(txn.commands) - 1], final or txn.refusal))
        if not self._pipelining:
            self._busy = False
            self._send(*self._dequeue())

    def _on_timer(self) -> None:
        self._timer = None
        if not self._expect:
            return
        deadline = self._activity + self._timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._abort(f"no reply within {self._timeout:g}s", SMTPTimeoutError)

    def _fail(self, message: str, error: type[SMTPClientError] = SMTPClientError, reply: Reply | None = None) -> None:
        """Mark the session unusable and fail everything still waiting on it."""
        if self._error is None:
            self._error = message
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending = list(chain(self._expect, self._queued))
        self._expect.clear()
        self._queued.clear()
        for item in pending:
            if item.__class__ is _Transaction:
                if not item.future.done():
                    item.future.set_exception(error(message, reply, item.replies))
            elif not item.done():
                item.set_exception(error(message, reply))

    def _abort(self, message: str, error: type[SMTPClientError] = SMTPClientError, reply: Reply | None = None) -> None:
        self._fail(message, error, reply)
        if self._transport is not None:
            self._transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._activity = self._loop.time()
        self._timer = self._loop.call_at(self._activity + self._timeout, self._on_timer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}" if exc else "connection closed by server")

    def resume_writing(self) -> None:
        self._activity = self._loop.time()

    def data_received(self, data: bytes) -> None:
        if self._partial:
            data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        self._activity = self._loop.time()
        for raw in lines:
            if self._error is not None:
                return
            reply = _SEEN.get(raw)
            if reply is not None and not self._lines:
                self._on_reply(reply)
                continue
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in b" -"):
                self._abort(f"malformed reply line: {line[:80]!r}")
                return
            self._lines.append(line)
            if line[3:4] == b"-":
                continue
            reply = _parse_reply(self._lines)
            if len(self._lines) == 1:
                if len(_SEEN) >= _SEEN_MAX:
                    _SEEN.clear()
                _SEEN[raw] = reply
            self._lines = []
            self._on_reply(reply)
        if len(self._partial) > _MAX_PARTIAL_LINE:
            self._abort("reply line too long")
