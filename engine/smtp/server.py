"""The ESMTP reception protocol (RFC 5321) on asyncio.Protocol, shared by lane workers and `engine sink`.

Commands are split and the end of DATA is found by engine.smtpproto (compiled); replies produced by one
read are written with one call, so a pipelining client costs one write per round trip. What happens to
an accepted message is the handler's business: a worker spools it, the sink records or drops it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine import smtpproto

MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, CRLF included
MAX_TEXT_LINE = 1000  # RFC 5321 4.5.3.1.6, CRLF included
MAX_ERRORS = 20
PAUSE_BUFFER = 1 << 20  # stop reading while a message is being stored and this much is buffered


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None
    text: str

    def encode(self) -> bytes:
        """Wire form; a text with newlines becomes a multi-line reply (the EHLO keyword list)."""
        lines = self.text.split("\n")
        enhanced = f"{self.enhanced} " if self.enhanced else ""
        wire = [f"{self.code}-{enhanced}{line}\r\n" for line in lines[:-1]]
        wire.append(f"{self.code} {enhanced}{lines[-1]}\r\n")
        return "".join(wire).encode()

    @property
    def success(self) -> bool:
        return self.code < 400


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_size: int = 25 << 20
    max_recipients: int = 100
    idle_timeout: float = 300.0


@dataclass(slots=True)
class Session:
    """What is known about one client connection; handlers read it to decide and to log."""

    peer: tuple[str, int]
    local: tuple[str, int]
    may_relay: bool
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    authenticated: str | None = None
    started: float = field(default_factory=time.time)

    @property
    def protocol(self) -> str:
        return "ESMTP" if self.esmtp else "SMTP"


class Handler(Protocol):
    """What a protocol instance asks of its owner."""

    hostname: str

    def check_recipient(self, session: Session, sender: str, recipient: str) -> Reply | None:
        """None accepts the recipient; a Reply refuses it."""

    def handle_message(
        self, session: Session, sender: str, recipients: list[str], message: bytes, params: dict
    ) -> Reply | Awaitable[Reply]:
        """Takes responsibility for the message: the reply goes to the client as the answer to DATA."""

    def rejected(self, session: Session, sender: str | None, recipients: Sequence[str], reply: Reply) -> None:
        """A command was refused; the worker logs it as a Rejection record."""


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
UNRECOGNISED = Reply(500, "5.5.1", "Command unrecognized")
BAD_SEQUENCE_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
BAD_SEQUENCE_NESTED = Reply(503, "5.5.1", "Sender already specified")
BAD_SEQUENCE_MAIL = Reply(503, "5.5.1", "Send MAIL first")
NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Bare CR or LF in message data: lines must end with CRLF")
TEXT_LINE_TOO_LONG = Reply(550, "5.6.0", "Message has a line longer than 1000 octets")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
ARGUMENT_REQUIRED = Reply(501, "5.5.4", "Argument required")
NO_ARGUMENTS = Reply(501, "5.5.4", "No arguments allowed")

_COMMAND, _DATA, _WAITING, _CLOSED = range(4)
_MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "SMTPUTF8"})


class SMTPServerProtocol(asyncio.Protocol):
    """One client connection. Create through `serve_factory` so every connection shares its settings."""

    def __init__(
        self, handler: Handler, limits: Limits, relay_from: Sequence = (), sessions: set | None = None
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._relay_from = relay_from
        self._sessions = sessions if sessions is not None else set()
        self._buffer = bytearray()
        self._mode = _COMMAND
        self._scan_from = 0
        self._discarded = 0
        self._transport: asyncio.Transport | None = None
        self._session: Session | None = None
        self._sender: str | None = None
        self._mail_params: dict = {}
        self._recipients: list[str] = []
        self._out: list[bytes] = []
        self._errors = 0
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._closing = False
        self._ehlo_reply = Reply(
            250,
            None,
            "\n".join(
                (
                    handler.hostname,
                    "PIPELINING",
                    f"SIZE {limits.max_message_size}",
                    "8BITMIME",
                    "SMTPUTF8",
                    "ENHANCEDSTATUSCODES",
                )
            ),
        )
        self._commands = {
            b"EHLO": self._ehlo,
            b"HELO": self._helo,
            b"MAIL": self._mail,
            b"RCPT": self._rcpt,
            b"DATA": self._data,
            b"RSET": self._rset,
            b"NOOP": self._noop,
            b"QUIT": self._quit,
            b"VRFY": self._vrfy,
            b"HELP": self._help,
        }

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._sessions.add(self)
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self._session = Session(peer=peer[:2], local=local[:2], may_relay=self._relay_allowed(peer[0]))
        transport.write(f"220 {self._handler.hostname} ESMTP ready\r\n".encode())
        loop = asyncio.get_running_loop()
        self._last_activity = loop.time()
        self._idle_timer = loop.call_later(self._limits.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._mode = _CLOSED
        self._sessions.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._transport = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._last_activity = asyncio.get_running_loop().time()
        if self._mode == _WAITING:
            if len(self._buffer) > PAUSE_BUFFER and not self._paused:
                self._paused = True
                self._transport.pause_reading()
            return
        self._process()

    # the read loop

    def _process(self) -> None:
        buffer = self._buffer
        position = 0
        while self._mode in (_COMMAND, _DATA):
            if self._mode == _DATA:
                position = self._consume_data(position)
                if self._mode == _DATA:
                    break
                continue
            end = buffer.find(b"\r\n", position)
            if end < 0:
                if len(buffer) - position > MAX_COMMAND_LINE:
                    self._discarded += len(buffer) - position
                    position = len(buffer)
                break
            line = bytes(buffer[position:end])
            position = end + 2
            if self._discarded or len(line) + 2 > MAX_COMMAND_LINE:
                self._discarded = 0
                self._error(LINE_TOO_LONG)
                continue
            self._command(line)
        del buffer[:position]
        self._flush()

    def _command(self, line: bytes) -> None:
        verb, argument = smtpproto.split_command(line)
        action = self._commands.get(verb)
        if action is None:
            self._error(UNRECOGNISED)
            return
        action(argument)

    def _consume_data(self, position: int) -> int:
        """Looks for the end of DATA in what is buffered; returns how far the buffer is consumed."""
        buffer = self._buffer
        if position:
            del buffer[:position]
            position = 0
        end = smtpproto.find_data_end(buffer, self._scan_from)
        if end < 0:
            excess = len(buffer) - (self._limits.max_message_size + 4)
            if excess > 0:
                self._discarded += excess
                del buffer[:excess]
            self._scan_from = max(0, len(buffer) - 4)
            return 0
        self._scan_from = 0
        length = end - 3
        if self._discarded or length > self._limits.max_message_size:
            self._discarded = 0
            self._finish_transaction(TOO_BIG, failed=True)
            return end
        message, status = smtpproto.decode_data(buffer, length, MAX_TEXT_LINE)
        if status == smtpproto.BARE_LINE_ENDING:
            self._finish_transaction(BARE_LINE_ENDING, failed=True)
        elif status == smtpproto.LINE_TOO_LONG:
            self._finish_transaction(TEXT_LINE_TOO_LONG, failed=True)
        else:
            self._deliver(message)
        return end

    def _deliver(self, message: bytes) -> None:
        result = self._handler.handle_message(self._session, self._sender, self._recipients, message, self._mail_params)
        if isinstance(result, Reply):
            self._finish_transaction(result, failed=not result.success)
            return
        self._mode = _WAITING
        future = asyncio.ensure_future(result)
        future.add_done_callback(self._message_handled)

    def _message_handled(self, future: asyncio.Future) -> None:
        if self._mode == _CLOSED:
            return
        if future.cancelled() or future.exception() is not None:
            reply = Reply(451, "4.3.0", "Local error in processing, try again later")
        else:
            reply = future.result()
        self._mode = _COMMAND
        self._finish_transaction(reply, failed=not reply.success)
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        self._process()

    def _finish_transaction(self, reply: Reply, *, failed: bool) -> None:
        if failed:
            self._handler.rejected(self._session, self._sender, self._recipients, reply)
        self._reset()
        self._mode = _COMMAND
        self._reply(reply)
        if self._closing:
            self._reply(SHUTTING_DOWN)
            self._close()

    # output

    def _reply(self, reply: Reply) -> None:
        self._out.append(reply.encode())

    def _error(self, reply: Reply) -> None:
        self._reply(reply)
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._reply(TOO_MANY_ERRORS)
            self._close()

    def _flush(self) -> None:
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def _close(self) -> None:
        self._mode = _CLOSED
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def _check_idle(self) -> None:
        if self._mode == _CLOSED:
            return
        loop = asyncio.get_running_loop()
        remaining = self._last_activity + self._limits.idle_timeout - loop.time()
        if remaining > 0 or self._mode == _WAITING:
            self._idle_timer = loop.call_later(max(remaining, 1.0), self._check_idle)
            return
        self._reply(IDLE_TIMEOUT)
        self._close()

    def shutdown(self) -> None:
        """Graceful stop: a session between transactions is told 421 and closed at once; one inside a
        transaction is closed right after that transaction is answered."""
        self._closing = True
        if self._mode == _COMMAND and self._sender is None:
            self._reply(SHUTTING_DOWN)
            self._close()

    # commands

    def _relay_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in network for network in self._relay_from)

    def _reset(self) -> None:
        self._sender = None
        self._mail_params = {}
        self._recipients = []

    def _ehlo(self, argument: bytes) -> None:
        if not argument:
            self._error(ARGUMENT_REQUIRED)
            return
        self._reset()
        self._session.helo = argument.decode("utf-8", "replace")
        self._session.esmtp = True
        self._reply(self._ehlo_reply)

    def _helo(self, argument: bytes) -> None:
        if not argument:
            self._error(ARGUMENT_REQUIRED)
            return
        self._reset()
        self._session.helo = argument.decode("utf-8", "replace")
        self._session.esmtp = False
        self._reply(Reply(250, None, self._handler.hostname))

    def _mail(self, argument: bytes) -> None:
        if self._session.helo is None:
            self._error(BAD_SEQUENCE_HELO)
            return
        if self._sender is not None:
            self._error(BAD_SEQUENCE_NESTED)
            return
        try:
            sender, params = smtpproto.parse_path(argument, b"FROM:")
        except ValueError as error:
            self._error(Reply(*error.args))
            return
        refusal = self._check_mail_params(params)
        if refusal is not None:
            self._handler.rejected(self._session, sender, (), refusal)
            self._error(refusal)
            return
        self._sender = sender
        self._mail_params = params
        self._reply(SENDER_OK)

    def _check_mail_params(self, params: dict) -> Reply | None:
        unknown = set(params) - _MAIL_PARAMETERS
        if unknown or (not self._session.esmtp and params):
            return Reply(555, "5.5.4", f"Unsupported parameter {', '.join(sorted(unknown or params))}")
        size = params.get("SIZE")
        if size is not None:
            if not size or not size.isdigit():
                return Reply(501, "5.5.4", "Invalid SIZE value")
            if int(size) > self._limits.max_message_size:
                return TOO_BIG
        body = params.get("BODY")
        if body is not None and body.upper() not in ("7BIT", "8BITMIME"):
            return Reply(501, "5.5.4", "Invalid BODY value")
        if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
            return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
        return None

    def _rcpt(self, argument: bytes) -> None:
        if self._sender is None:
            self._error(BAD_SEQUENCE_MAIL)
            return
        try:
            recipient, params = smtpproto.parse_path(argument, b"TO:")
        except ValueError as error:
            self._error(Reply(*error.args))
            return
        if params:
            self._error(Reply(555, "5.5.4", f"Unsupported parameter {', '.join(sorted(params))}"))
            return
        if not recipient.isascii() and "SMTPUTF8" not in self._mail_params:
            refusal = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        elif len(self._recipients) >= self._limits.max_recipients:
            refusal = TOO_MANY_RECIPIENTS
        elif not self._session.may_relay and self._session.authenticated is None:
            refusal = RELAY_DENIED
        else:
            refusal = self._handler.check_recipient(self._session, self._sender, recipient)
        if refusal is not None:
            self._handler.rejected(self._session, self._sender, (recipient,), refusal)
            self._reply(refusal)
            return
        self._recipients.append(recipient)
        self._reply(RECIPIENT_OK)

    def _data(self, argument: bytes) -> None:
        if argument:
            self._error(NO_ARGUMENTS)
        elif self._sender is None:
            self._error(BAD_SEQUENCE_MAIL)
        elif not self._recipients:
            self._error(NO_RECIPIENTS)
        else:
            self._mode = _DATA
            self._scan_from = 0
            self._reply(START_DATA)

    def _rset(self, argument: bytes) -> None:
        self._reset()
        self._reply(OK)

    def _noop(self, argument: bytes) -> None:
        self._reply(OK)

    def _quit(self, argument: bytes) -> None:
        self._reply(BYE)
        self._close()

    def _vrfy(self, argument: bytes) -> None:
        if not argument:
            self._error(ARGUMENT_REQUIRED)
            return
        self._reply(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    def _help(self, argument: bytes) -> None:
        self._reply(Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"))


class SMTPServer:
    """Listening sockets of one handler, and the live sessions on them, for a graceful stop."""

    def __init__(self, handler: Handler, limits: Limits, relay_from: Sequence = ()) -> None:
        self._handler = handler
        self._limits = limits
        self._relay_from = tuple(relay_from)
        self._servers: list[asyncio.base_events.Server] = []
        self._sessions: set[SMTPServerProtocol] = set()

    def _new_session(self) -> SMTPServerProtocol:
        return SMTPServerProtocol(self._handler, self._limits, self._relay_from, self._sessions)

    async def listen(self, sock) -> None:
        """Serves an already bound and listening socket (the supervisor binds before forking)."""
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(self._new_session, sock=sock))

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def close(self, timeout: float = 30.0) -> None:
        """Stops accepting, lets transactions in progress finish, then closes every session."""
        for server in self._servers:
            server.close()
        for session in list(self._sessions):
            session.shutdown()
        deadline = asyncio.get_running_loop().time() + timeout
        while self._sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self._sessions):
            session.abort()
