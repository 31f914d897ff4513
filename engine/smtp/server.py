"""The ESMTP reception protocol (RFC 5321) on asyncio.Protocol, shared by lane workers and `engine sink`.

Commands are split and the end of DATA is found by engine.smtpproto (compiled); replies produced by one
read are written with one call, so a pipelining client costs one write per round trip. What happens to
an accepted message is the handler's business: a worker spools it, the sink records or drops it.

Besides DATA the protocol speaks CHUNKING (BDAT, RFC 3030), STARTTLS (RFC 3207) and AUTH PLAIN/LOGIN
(RFC 4954, only inside TLS). Whatever a client pipelined behind STARTTLS is thrown away, never executed
inside the TLS session (CVE-2024-34083 in aiosmtpd was exactly that).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import math
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from engine import smtpproto
from engine.smtp.auth import FailureDelays, UsersFile, UsersFileError, decode_plain
from engine.smtp.tls import CertificateFiles

if TYPE_CHECKING:
    from engine.config import Listener

MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, CRLF included
MAX_AUTH_LINE = 12288  # RFC 4954 4: AUTH command and responses
MAX_TEXT_LINE = 1000  # RFC 5321 4.5.3.1.6, CRLF included
MAX_ERRORS = 20
PAUSE_BUFFER = 1 << 20  # stop reading while a message is being stored and this much is buffered
TLS_HANDSHAKE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None
    text: str
    queued: str | None = field(default=None, compare=False)  # the id of the message a 250 accepted
    wire: bytes = field(init=False, repr=False, compare=False)  # made once: most replies are constants

    def __post_init__(self) -> None:
        """The wire form; a text with newlines becomes a multi-line reply (the EHLO keyword list)."""
        lines = self.text.split("\n")
        enhanced = f"{self.enhanced} " if self.enhanced else ""
        wire = [f"{self.code}-{enhanced}{line}\r\n" for line in lines[:-1]]
        wire.append(f"{self.code} {enhanced}{lines[-1]}\r\n")
        object.__setattr__(self, "wire", "".join(wire).encode())

    @property
    def success(self) -> bool:
        return self.code < 400


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-listener limits. The timeouts follow RFC 5321 4.5.3.2: `command_timeout` bounds the time from one
    command to the end of the next command line (a client trickling a byte at a time gains nothing),
    `data_timeout` the time from 354 to the final dot, or of one BDAT chunk, and `idle_timeout` any silence.
    Connection counts are per process; clients inside relay_from are exempt from the per-address one."""

    max_message_size: int = 25 << 20
    max_recipients: int = 100
    idle_timeout: float = 300.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    auth_failure_delay: float = 1.0  # doubled for each failure in a row from one address, at most 30 s


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
BAD_SEQUENCE_TRANSACTION = Reply(503, "5.5.1", "Not allowed inside a mail transaction")
BAD_SEQUENCE_BDAT = Reply(503, "5.5.1", "DATA cannot follow BDAT in one transaction")
NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Bare CR or LF in message data: lines must end with CRLF")
TEXT_LINE_TOO_LONG = Reply(550, "5.6.0", "Message has a line longer than 1000 octets")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0", "Too many connections from your address, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
COMMAND_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for a command, closing connection")
DATA_TIMEOUT = Reply(421, "4.4.2", "Timeout receiving message data, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
ARGUMENT_REQUIRED = Reply(501, "5.5.4", "Argument required")
NO_ARGUMENTS = Reply(501, "5.5.4", "No arguments allowed")
BAD_BDAT = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
BDAT_LOST = Reply(421, "4.5.0", "Cannot find the end of that chunk, closing connection")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
AUTH_UNAVAILABLE = Reply(502, "5.5.1", "AUTH not available")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
CHALLENGE_EMPTY = Reply(334, None, "")
CHALLENGE_USERNAME = Reply(334, None, base64.b64encode(b"Username:").decode())
CHALLENGE_PASSWORD = Reply(334, None, base64.b64encode(b"Password:").decode())

# _COMMAND, _DATA, _CHUNK and _AUTH read the buffer; _WAITING (handler or password check) and _HANDSHAKE
# (STARTTLS) only collect it.
_COMMAND, _DATA, _CHUNK, _AUTH, _WAITING, _HANDSHAKE, _CLOSED = range(7)
_READING = (_COMMAND, _DATA, _CHUNK, _AUTH)
_MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "SMTPUTF8"})


def in_networks(address: str, networks: Sequence) -> bool:
    """Whether a client's address (an IPv6 one may carry a %zone) is in one of `networks` (relay_from)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _decode_response(line: bytes) -> str | None:
    """A base64 SASL response as text ("=" is the empty one); None if it is not valid base64 UTF-8."""
    if line == b"=":
        return ""
    try:
        return base64.b64decode(line, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


class SMTPServerProtocol(asyncio.Protocol):
    """One client connection. Created by SMTPServer, whose settings and counters every connection shares."""

    def __init__(self, server: SMTPServer) -> None:
        self._server = server
        self._handler = server.handler
        self._limits = server.limits
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._mode = _COMMAND
        self._scan_from = 0
        self._discarded = 0
        self._transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self._sender: str | None = None
        self._mail_params: dict = {}
        self._recipients: list[str] = []
        self._chunks: bytearray | None = None  # BDAT content received so far in this transaction
        self._chunk_left = 0
        self._chunk_last = False
        self._chunk_refusal: Reply | None = None
        self._auth_step: str | None = None  # in _AUTH: "PLAIN", "USERNAME" or "PASSWORD" is expected next
        self._login_user: str | None = None
        self._task: asyncio.Future | None = None
        self._out: list[bytes] = []
        self._errors = 0
        self._last_activity = 0.0
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._closing = False
        self._commands = {
            b"EHLO": self._ehlo,
            b"HELO": self._helo,
            b"MAIL": self._mail,
            b"RCPT": self._rcpt,
            b"DATA": self._data,
            b"BDAT": self._bdat,
            b"RSET": self._rset,
            b"NOOP": self._noop,
            b"QUIT": self._quit,
            b"VRFY": self._vrfy,
            b"HELP": self._help,
            b"STARTTLS": self._starttls,
            b"AUTH": self._auth,
        }

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        may_relay = in_networks(peer[0], self._server.relay_from)
        self.session = Session(peer=peer[:2], local=local[:2], may_relay=may_relay)
        refusal = self._server.admit(self)
        if refusal is not None:
            self._mode = _CLOSED
            transport.write(refusal.wire)
            transport.close()
            return
        transport.write(f"220 {self._handler.hostname} ESMTP ready\r\n".encode())
        self._last_activity = self._loop.time()
        self._arm(self._limits.command_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._mode = _CLOSED
        self._server.release(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._mode == _CLOSED:
            return
        self._buffer += data
        self._last_activity = self._loop.time()
        if self._mode == _WAITING:
            if len(self._buffer) > PAUSE_BUFFER and not self._paused:
                self._paused = True
                self._transport.pause_reading()
            return
        if self._mode == _HANDSHAKE:
            # Decrypted bytes that beat the end of start_tls(); a client has no business sending much here.
            if len(self._buffer) > MAX_AUTH_LINE:
                self.abort()
            return
        self._process()

    # the read loop

    def _process(self) -> None:
        buffer = self._buffer
        position = 0
        while self._mode in _READING:
            if self._mode == _DATA:
                position = self._consume_data(position)
                if self._mode == _DATA:
                    break
                continue
            if self._mode == _CHUNK:
                position = self._consume_chunk(position)
                if self._mode == _CHUNK:
                    break
                continue
            end = buffer.find(b"\r\n", position)
            if end < 0:
                if len(buffer) - position > self._line_limit(position):
                    self._discarded += len(buffer) - position
                    position = len(buffer)
                break
            line = bytes(buffer[position:end])
            too_long = self._discarded or (
                len(line) + 2 > MAX_COMMAND_LINE and len(line) + 2 > self._line_limit(position)
            )
            position = end + 2
            self._arm(self._limits.command_timeout)
            if too_long:
                self._discarded = 0
                self._mode = _COMMAND
                self._error(LINE_TOO_LONG)
            elif self._mode == _AUTH:
                self._auth_response(line)
            else:
                self._command(line)
        if self._mode == _HANDSHAKE:
            buffer.clear()  # pipelined behind STARTTLS: never executed inside TLS
        else:
            del buffer[:position]
        self._flush()
        if self._mode == _HANDSHAKE and self._task is None:
            self._start_tls()

    def _line_limit(self, position: int) -> int:
        """AUTH and the lines of its exchange may be longer than other commands (RFC 4954 4)."""
        if self._mode == _AUTH or self._buffer[position : position + 5].upper() == b"AUTH ":
            return MAX_AUTH_LINE
        return MAX_COMMAND_LINE

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
        if self._refuse_content(status):
            return end
        self._deliver(message)
        return end

    def _consume_chunk(self, position: int) -> int:
        """Takes up to the rest of the current BDAT chunk from the buffer; octets beyond the size limit and
        chunks of a refused BDAT are read and dropped, so they are never taken for commands."""
        take = min(len(self._buffer) - position, self._chunk_left)
        chunks = self._chunks
        if self._chunk_refusal is None and chunks is not None:
            keep = min(take, self._limits.max_message_size - len(chunks))
            with memoryview(self._buffer) as view:
                chunks += view[position : position + keep]
            if keep < take:
                self._chunk_refusal = TOO_BIG
        self._chunk_left -= take
        position += take
        if self._chunk_left:
            return position
        self._mode = _COMMAND
        self._arm(self._limits.command_timeout)
        refusal, self._chunk_refusal = self._chunk_refusal, None
        if refusal is TOO_BIG:
            self._finish_transaction(TOO_BIG, failed=True)
        elif refusal is not None:
            self._reply(refusal)
        elif not self._chunk_last:
            self._reply(Reply(250, "2.0.0", f"{len(chunks)} octets received"))
        else:
            message = bytes(chunks)
            if message and not message.endswith(b"\r\n"):
                message += b"\r\n"
            if not self._refuse_content(smtpproto.content_status(message)):
                self._deliver(message)
        return position

    def _refuse_content(self, status: int) -> bool:
        if status == smtpproto.BARE_LINE_ENDING:
            self._finish_transaction(BARE_LINE_ENDING, failed=True)
        elif status == smtpproto.LINE_TOO_LONG:
            self._finish_transaction(TEXT_LINE_TOO_LONG, failed=True)
        else:
            return False
        return True

    def _deliver(self, message: bytes) -> None:
        result = self._handler.handle_message(self.session, self._sender, self._recipients, message, self._mail_params)
        if isinstance(result, Reply):
            self._finish_transaction(result, failed=not result.success)
            return
        self._wait(asyncio.ensure_future(result), self._message_handled)

    def _wait(self, future: asyncio.Future, done: Callable[[asyncio.Future], None]) -> None:
        self._mode = _WAITING
        self._task = future
        future.add_done_callback(done)

    def _message_handled(self, future: asyncio.Future) -> None:
        if self._resumed(future):
            reply = LOCAL_ERROR if future.cancelled() or future.exception() is not None else future.result()
            self._finish_transaction(reply, failed=not reply.success)
            self._continue()

    def _resumed(self, future: asyncio.Future) -> bool:
        """Back from _WAITING: False if the connection went away meanwhile."""
        self._task = None
        if self._mode == _CLOSED:
            return False
        self._mode = _COMMAND
        self._last_activity = self._loop.time()
        self._arm(self._limits.command_timeout)
        return True

    def _continue(self) -> None:
        if self._mode == _CLOSED:
            return
        if self._closing and self._sender is None:
            self._reply(SHUTTING_DOWN)
            self._close()
            return
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        self._process()

    def _finish_transaction(self, reply: Reply, *, failed: bool) -> None:
        if failed:
            self._handler.rejected(self.session, self._sender, self._recipients, reply)
        self._reset()
        self._mode = _COMMAND
        self._reply(reply)
        if self._closing:
            self._reply(SHUTTING_DOWN)
            self._close()

    # output

    def _reply(self, reply: Reply) -> None:
        self._out.append(reply.wire)

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

    # timeouts

    def _arm(self, timeout: float) -> None:
        """Sets the deadline of the current phase; the one timer is moved only when it would fire too late."""
        self._deadline = self._loop.time() + timeout
        when = min(self._deadline, self._last_activity + self._limits.idle_timeout)
        if self._timer is None or self._timer.when() > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(when, self._check_timeouts)

    def _check_timeouts(self) -> None:
        self._timer = None
        if self._mode == _CLOSED:
            return
        now = self._loop.time()
        if self._mode in (_WAITING, _HANDSHAKE):  # our turn, not the client's; start_tls has its own timeout
            self._timer = self._loop.call_at(now + 1.0, self._check_timeouts)
            return
        idle_end = self._last_activity + self._limits.idle_timeout
        if now >= self._deadline:
            self._reply(DATA_TIMEOUT if self._mode in (_DATA, _CHUNK) else COMMAND_TIMEOUT)
        elif now >= idle_end:
            self._reply(IDLE_TIMEOUT)
        else:
            self._timer = self._loop.call_at(min(self._deadline, idle_end), self._check_timeouts)
            return
        self._close()

    def shutdown(self) -> None:
        """Graceful stop: a session between transactions is told 421 and closed at once; one inside a
        transaction is closed right after that transaction is answered."""
        self._closing = True
        if self._mode in (_COMMAND, _AUTH) and self._sender is None:
            self._reply(SHUTTING_DOWN)
            self._close()

    # commands

    def _reset(self) -> None:
        self._sender = None
        self._mail_params = {}
        self._recipients = []
        self._chunks = None

    def _ehlo(self, argument: bytes) -> None:
        if not argument:
            self._error(ARGUMENT_REQUIRED)
            return
        self._reset()
        self.session.helo = argument.decode("utf-8", "replace")
        self.session.esmtp = True
        self._reply(self._server.ehlo_reply(self.session.tls))

    def _helo(self, argument: bytes) -> None:
        if not argument:
            self._error(ARGUMENT_REQUIRED)
            return
        self._reset()
        self.session.helo = argument.decode("utf-8", "replace")
        self.session.esmtp = False
        self._reply(Reply(250, None, self._handler.hostname))

    def _mail(self, argument: bytes) -> None:
        if self.session.helo is None:
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
        refusal = self._check_mail(sender, params)
        if refusal is not None:
            self._handler.rejected(self.session, sender, (), refusal)
            self._error(refusal)
            return
        self._sender = sender
        self._mail_params = params
        self._reply(SENDER_OK)

    def _check_mail(self, sender: str, params: dict) -> Reply | None:
        session = self.session
        if self._server.users is not None and not session.may_relay and session.authenticated is None:
            return AUTH_REQUIRED
        known = self._server.mail_parameters(session)
        unknown = set(params) - known
        if unknown or (not session.esmtp and params):
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
        if not sender.isascii() and "SMTPUTF8" not in params:
            return NEEDS_SMTPUTF8
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
            refusal = NEEDS_SMTPUTF8
        elif len(self._recipients) >= self._limits.max_recipients:
            refusal = TOO_MANY_RECIPIENTS
        elif not self.session.may_relay and self.session.authenticated is None:
            refusal = RELAY_DENIED
        else:
            refusal = self._handler.check_recipient(self.session, self._sender, recipient)
        if refusal is not None:
            self._handler.rejected(self.session, self._sender, (recipient,), refusal)
            self._reply(refusal)
            return
        self._recipients.append(recipient)
        self._reply(RECIPIENT_OK)

    def _data(self, argument: bytes) -> None:
        if argument:
            self._error(NO_ARGUMENTS)
        elif self._sender is None:
            self._error(BAD_SEQUENCE_MAIL)
        elif self._chunks is not None:
            self._error(BAD_SEQUENCE_BDAT)
        elif not self._recipients:
            self._error(NO_RECIPIENTS)
        else:
            self._mode = _DATA
            self._scan_from = 0
            self._arm(self._limits.data_timeout)
            self._reply(START_DATA)

    def _bdat(self, argument: bytes) -> None:
        """RFC 3030. The chunk is read even when the command is refused: its octets are data, not commands.
        A size that cannot be read leaves no way to find the next command, so the session ends."""
        size, _, last = argument.partition(b" ")
        last = last.strip(b" ")
        if not size.isdigit() or len(size) > 20 or last.upper() not in (b"", b"LAST"):
            self._reply(BAD_BDAT)
            self._reply(BDAT_LOST)
            self._close()
            return
        if self._sender is None:
            self._chunk_refusal = BAD_SEQUENCE_MAIL
        elif not self._recipients:
            self._chunk_refusal = NO_RECIPIENTS
        elif self._chunks is None:
            self._chunks = bytearray()
        self._chunk_left = int(size)
        self._chunk_last = bool(last)
        self._mode = _CHUNK
        self._arm(self._limits.data_timeout)

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
        commands = "EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH"
        self._reply(Reply(214, "2.0.0", f"Commands: {commands}"))

    # STARTTLS

    def _starttls(self, argument: bytes) -> None:
        if argument:
            self._error(NO_ARGUMENTS)
        elif self._server.tls is None:
            self._reply(TLS_UNAVAILABLE)
        elif self.session.tls:
            self._error(TLS_ACTIVE)
        elif self._sender is not None:
            self._error(BAD_SEQUENCE_TRANSACTION)
        else:
            self._reply(READY_FOR_TLS)
            self._mode = _HANDSHAKE

    def _start_tls(self) -> None:
        """After the 220 is written: nothing more is read in clear text, the handshake runs on the same socket."""
        self._transport.pause_reading()
        handshake = self._loop.start_tls(
            self._transport,
            self,
            self._server.tls_context(),
            server_side=True,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )
        self._task = asyncio.ensure_future(handshake)
        self._task.add_done_callback(self._tls_started)

    def _tls_started(self, future: asyncio.Future) -> None:
        self._task = None
        if self._mode == _CLOSED:
            return
        if future.cancelled() or future.exception() is not None:
            # start_tls closed the socket; a connection lost while still handshaking (a reset) is not passed on.
            self.connection_lost(None if future.cancelled() else future.exception())
            return
        self._transport = future.result()
        session = self.session
        session.tls, session.helo, session.esmtp = True, None, False  # RFC 3207 4.2: forget what came before
        self._reset()
        self._mode = _COMMAND
        self._last_activity = self._loop.time()
        self._arm(self._limits.command_timeout)
        if self._closing:
            self._reply(SHUTTING_DOWN)
            self._close()
            return
        self._process()

    # AUTH

    def _auth(self, argument: bytes) -> None:
        session = self.session
        mechanism, _, initial = argument.partition(b" ")
        mechanism, initial = mechanism.upper(), initial.strip(b" ")
        if self._server.users is None:
            self._error(AUTH_UNAVAILABLE)
        elif not session.tls:
            self._error(ENCRYPTION_REQUIRED)
        elif not session.esmtp:
            self._error(BAD_SEQUENCE_HELO)
        elif session.authenticated is not None:
            self._error(ALREADY_AUTHENTICATED)
        elif self._sender is not None:
            self._error(BAD_SEQUENCE_TRANSACTION)
        elif mechanism == b"PLAIN" and initial:
            self._auth_plain(initial)
        elif mechanism == b"PLAIN":
            self._challenge("PLAIN", CHALLENGE_EMPTY)
        elif mechanism == b"LOGIN" and initial:
            self._login_username(initial)
        elif mechanism == b"LOGIN":
            self._challenge("USERNAME", CHALLENGE_USERNAME)
        else:
            self._error(UNKNOWN_MECHANISM if mechanism else ARGUMENT_REQUIRED)

    def _challenge(self, step: str, reply: Reply) -> None:
        self._mode = _AUTH
        self._auth_step = step
        self._reply(reply)

    def _auth_response(self, line: bytes) -> None:
        """A client line inside an AUTH exchange: the PLAIN response, or LOGIN's username or password."""
        self._mode = _COMMAND
        step, self._auth_step = self._auth_step, None
        if line == b"*":
            self._error(AUTH_CANCELLED)
        elif step == "PLAIN":
            self._auth_plain(line)
        elif step == "USERNAME":
            self._login_username(line)
        else:
            password = _decode_response(line)
            if password is None:
                self._error(BAD_BASE64)
            else:
                self._check_password(self._login_user, password)

    def _login_username(self, response: bytes) -> None:
        user = _decode_response(response)
        if user is None:
            self._error(BAD_BASE64)
            return
        self._login_user = user
        self._challenge("PASSWORD", CHALLENGE_PASSWORD)

    def _auth_plain(self, response: bytes) -> None:
        try:
            authzid, user, password = decode_plain(response)
        except ValueError:
            self._error(BAD_BASE64)
            return
        self._check_password(user, password if authzid in ("", user) else None)

    def _check_password(self, user: str, password: str | None) -> None:
        """None as password: a request the server refuses anyway (acting as another user), answered alike."""
        self._wait(asyncio.ensure_future(self._verify(user, password)), self._authenticated)

    async def _verify(self, user: str, password: str | None) -> Reply:
        address = self.session.peer[0]
        try:
            valid = password is not None and await asyncio.to_thread(self._server.users.verify, user, password)
        except UsersFileError:
            return AUTH_TEMPORARY_FAILURE
        if valid:
            self._server.failures.succeeded(address)
            self.session.authenticated = user
            return AUTH_OK
        await asyncio.sleep(self._server.failures.failed(address))
        return AUTH_FAILED

    def _authenticated(self, future: asyncio.Future) -> None:
        if self._resumed(future):
            reply = LOCAL_ERROR if future.cancelled() or future.exception() is not None else future.result()
            if reply is AUTH_FAILED:
                self._handler.rejected(self.session, None, (), reply)  # a Rejection record per failed guess
                self._error(reply)
            else:
                self._reply(reply)
            self._continue()


class SMTPServer:
    """Listening sockets of one listener, the settings they share, and the live sessions on them."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        relay_from: Sequence = (),
        *,
        tls: ssl.SSLContext | CertificateFiles | None = None,
        users: UsersFile | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.relay_from = tuple(relay_from)
        self.tls = tls
        self.users = users
        self.failures = FailureDelays(limits.auth_failure_delay)
        self._servers: list[asyncio.base_events.Server] = []
        self._sessions: set[SMTPServerProtocol] = set()
        self._per_address: Counter[str] = Counter()
        self.peak_per_address: Counter[str] = Counter()  # most concurrent sessions seen from each address
        keywords = [
            handler.hostname,
            "PIPELINING",
            f"SIZE {limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        self._ehlo_clear = Reply(250, None, "\n".join(keywords + (["STARTTLS"] if tls else [])))
        self._ehlo_tls = Reply(250, None, "\n".join(keywords + (["AUTH PLAIN LOGIN"] if users else [])))

    @classmethod
    def for_listener(cls, handler: Handler, listener: Listener) -> SMTPServer:
        """The server a lane worker runs for one [[listeners]] entry."""
        limits = Limits(
            max_message_size=listener.max_message_size,
            max_recipients=listener.max_recipients,
            idle_timeout=listener.idle_timeout,
            command_timeout=listener.command_timeout,
            data_timeout=listener.data_timeout,
            max_connections=listener.max_connections,
            max_connections_per_ip=listener.max_connections_per_ip,
        )
        tls = CertificateFiles(listener.tls_cert, listener.tls_key) if listener.tls_cert and listener.tls_key else None
        users = UsersFile(listener.users_file) if listener.users_file else None
        return cls(handler, limits, listener.relay_from, tls=tls, users=users)

    def tls_context(self) -> ssl.SSLContext:
        """The context for the next STARTTLS; certificate files are re-read when they change."""
        return self.tls.context() if isinstance(self.tls, CertificateFiles) else self.tls

    def ehlo_reply(self, tls: bool) -> Reply:
        """STARTTLS is offered only in clear text, AUTH only inside TLS."""
        return self._ehlo_tls if tls else self._ehlo_clear

    def mail_parameters(self, session: Session) -> frozenset[str]:
        """AUTH= (RFC 4954 5) is understood wherever AUTH is offered."""
        return _MAIL_PARAMETERS | {"AUTH"} if session.tls and self.users else _MAIL_PARAMETERS

    def admit(self, protocol: SMTPServerProtocol) -> Reply | None:
        """Counts a new connection in, or says why it is turned away (421 at connect)."""
        limits, address = self.limits, protocol.session.peer[0]
        if limits.max_connections is not None and len(self._sessions) >= limits.max_connections:
            return TOO_MANY_CONNECTIONS
        per_address = limits.max_connections_per_ip
        if per_address is not None and not protocol.session.may_relay and self._per_address[address] >= per_address:
            return TOO_MANY_FROM_ADDRESS
        self._sessions.add(protocol)
        self._per_address[address] += 1
        self.peak_per_address[address] = max(self.peak_per_address[address], self._per_address[address])
        return None

    def release(self, protocol: SMTPServerProtocol) -> None:
        if protocol not in self._sessions:
            return
        self._sessions.discard(protocol)
        address = protocol.session.peer[0]
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]

    def _new_session(self) -> SMTPServerProtocol:
        return SMTPServerProtocol(self)

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
