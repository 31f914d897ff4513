"""A lean pipelining SMTP client on asyncio.Protocol.

One transaction at a time per connection. With PIPELINING (RFC 2920) a message costs two writes and two
round trips: MAIL, every RCPT and DATA go out together, then the body once 354 arrives. Replies are parsed
incrementally from the receive buffer, so the cost per message stays a few tens of microseconds. Plain text
only: no STARTTLS, no AUTH.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from engine.smtpproto import encode_data

__all__ = ["Reply", "SMTPClientError", "SMTPConnection", "SMTPTimeoutError"]

_MAX_PARTIAL_LINE = 8192
_ENHANCED = re.compile(rb"([245]\.\d{1,3}\.\d{1,3})(?: |$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply; `text` joins the lines of a multi-line reply with "\\n"."""

    code: int
    enhanced: str | None
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


class SMTPClientError(Exception):
    """The session cannot go on as asked; `reply` is the server's answer, or None (I/O, timeout, garbage)."""

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class SMTPTimeoutError(SMTPClientError):
    """No reply within the timeout; the connection has been aborted."""


def _parse_reply(lines: list[bytes]) -> Reply:
    texts = [line[4:] for line in lines]
    enhanced = None
    match = _ENHANCED.match(texts[0])
    if match is not None:
        prefix = match.group(1)
        enhanced = prefix.decode()
        cut = len(prefix) + 1
        texts = [t[cut:] if t.startswith(prefix) else t for t in texts]
    return Reply(int(lines[0][:3]), enhanced, b"\n".join(texts).decode("utf-8", "replace"))


def _address(address: str) -> bytes:
    """Encode an envelope address, refusing anything that could smuggle a command onto the wire."""
    if not address.isprintable() or "<" in address or ">" in address:
        raise ValueError(f"invalid envelope address: {address!r}")
    return address.encode()


class SMTPConnection(asyncio.Protocol):
    """An open SMTP session; make one with `await SMTPConnection.open(...)`."""

    extensions: dict[str, str]
    greeting: Reply

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.extensions = {}
        self._loop = loop
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._partial = b""
        self._lines: list[bytes] = []
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[list[Reply]] | None = None
        self._want = 0
        self._timer: asyncio.TimerHandle | None = None
        self._activity = 0.0
        self._error: str | None = None
        self._pipelining = False
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
    ) -> SMTPConnection:
        """Connect, read the greeting and say EHLO (HELO when EHLO is refused).

        Socket errors propagate as OSError; a refusal or a silent server raises SMTPClientError.
        """
        loop = asyncio.get_running_loop()
        local = (source_address, 0) if source_address else None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: cls(loop, timeout), host, port, local_addr=local), timeout
            )
        except TimeoutError:
            raise SMTPTimeoutError(f"connect to {host}:{port} timed out") from None
        try:
            conn.greeting = (await conn._read(1))[0]
            if conn.greeting.code != 220:
                raise SMTPClientError("greeting refused", conn.greeting)
            await conn._hello(ehlo_name)
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def closed(self) -> bool:
        """True once the connection can no longer carry a transaction."""
        return self._error is not None

    async def send_message(
        self, sender: str, recipients: Sequence[str], data: bytes
    ) -> tuple[Reply, list[Reply], Reply | None]:
        """Send one message (raw CRLF lines; dot-stuffing is done here).

        Returns (MAIL reply, RCPT replies, final DATA reply). The last is None when the server took no
        recipient or refused DATA; the session is then RSET and stays usable. RCPT replies cover every
        recipient, except that without PIPELINING a refused MAIL ends the attempt before any RCPT.
        """
        if not recipients:
            raise ValueError("no recipients")
        body = encode_data(data)
        params = b""
        if self._size:
            params += b" SIZE=%d" % len(data)
        if self._eightbit and not data.isascii():
            params += b" BODY=8BITMIME"
        if self._smtputf8 and not (sender.isascii() and all(r.isascii() for r in recipients)):
            params += b" SMTPUTF8"
        mail = b"MAIL FROM:<" + _address(sender) + b">" + params + b"\r\n"
        rcpts = [b"RCPT TO:<" + _address(r) + b">\r\n" for r in recipients]
        write = self._write
        if self._pipelining:
            write(b"".join([mail, *rcpts, b"DATA\r\n"]))
            replies = await self._read(len(rcpts) + 2)
            mail_reply = replies[0]
            rcpt_replies = replies[1:-1]
            go_ahead = replies[-1]
        else:
            write(mail)
            mail_reply = (await self._read(1))[0]
            if not mail_reply.ok:
                await self._reset()
                return mail_reply, [], None
            rcpt_replies = []
            for rcpt in rcpts:
                write(rcpt)
                rcpt_replies.append((await self._read(1))[0])
            if not any(r.ok for r in rcpt_replies):
                await self._reset()
                return mail_reply, rcpt_replies, None
            write(b"DATA\r\n")
            go_ahead = (await self._read(1))[0]
        if go_ahead.code != 354:
            await self._reset()
            return mail_reply, rcpt_replies, None
        if not (mail_reply.ok and any(r.ok for r in rcpt_replies)):
            write(b".\r\n")
            await self._read(1)
            await self._reset()
            return mail_reply, rcpt_replies, None
        write(body)
        return mail_reply, rcpt_replies, (await self._read(1))[0]

    async def quit(self) -> None:
        """Say QUIT and close; never raises, the session is over either way."""
        if self._error is None:
            try:
                self._write(b"QUIT\r\n")
                await self._read(1)
            except SMTPClientError:
                pass
        self.close()

    def close(self) -> None:
        """Close the connection without saying goodbye."""
        self._fail("connection closed")
        if self._transport is not None:
            self._transport.close()

    async def _hello(self, name: str) -> None:
        encoded = _address(name)
        self._write(b"EHLO " + encoded + b"\r\n")
        reply = (await self._read(1))[0]
        if reply.ok:
            for line in reply.text.split("\n")[1:]:
                keyword, _, value = line.partition(" ")
                self.extensions[keyword.upper()] = value
        elif 500 <= reply.code < 600:
            self._write(b"HELO " + encoded + b"\r\n")
            reply = (await self._read(1))[0]
        if not reply.ok:
            raise SMTPClientError("EHLO/HELO refused", reply)
        ext = self.extensions
        self._pipelining = "PIPELINING" in ext
        self._size = "SIZE" in ext
        self._eightbit = "8BITMIME" in ext
        self._smtputf8 = "SMTPUTF8" in ext

    async def _reset(self) -> None:
        self._write(b"RSET\r\n")
        reply = (await self._read(1))[0]
        if not reply.ok:
            self.close()
            raise SMTPClientError("RSET refused", reply)

    def _write(self, data: bytes) -> None:
        if self._error is not None:
            raise SMTPClientError(self._error)
        self._transport.write(data)

    async def _read(self, count: int) -> list[Reply]:
        """Wait for the next `count` replies, timing out after `timeout` seconds without progress."""
        if self._error is not None:
            raise SMTPClientError(self._error)
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._want = count
        if len(self._replies) >= count:
            self._deliver()
        else:
            self._activity = self._loop.time()
            if self._timer is None:
                self._timer = self._loop.call_at(self._activity + self._timeout, self._on_timer)
        try:
            return await waiter
        except asyncio.CancelledError:
            self._abort("cancelled mid-command")
            raise

    def _deliver(self) -> None:
        waiter, self._waiter = self._waiter, None
        popleft = self._replies.popleft
        replies = [popleft() for _ in range(self._want)]
        if not waiter.done():
            waiter.set_result(replies)

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None:
            return
        deadline = self._activity + self._timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._abort(f"no reply within {self._timeout:g}s", SMTPTimeoutError)

    def _fail(self, message: str, error: type[SMTPClientError] = SMTPClientError) -> None:
        if self._error is None:
            self._error = message
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error(message))

    def _abort(self, message: str, error: type[SMTPClientError] = SMTPClientError) -> None:
        self._fail(message, error)
        if self._transport is not None:
            self._transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}" if exc else "connection closed by server")

    def resume_writing(self) -> None:
        self._activity = self._loop.time()

    def data_received(self, data: bytes) -> None:
        if self._partial:
            data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in b" -"):
                self._abort(f"malformed reply line: {line[:80]!r}")
                return
            self._lines.append(line)
            if line[3:4] != b"-":
                self._replies.append(_parse_reply(self._lines))
                self._lines = []
        if len(self._partial) > _MAX_PARTIAL_LINE:
            self._abort("reply line too long")
            return
        self._activity = self._loop.time()
        if self._waiter is not None and len(self._replies) >= self._want:
            self._deliver()
