"""Outbound delivery: next hops, pooled SMTP sessions, and one outcome per recipient.

A worker asks "deliver this message to these recipients at this domain" and gets back an SMTP reply
for every recipient. aiosmtplib sets sessions up (connect, EHLO, STARTTLS); then the engine's own
pipelining protocol takes the connection over for the transactions (MAIL, RCPTs and DATA in one
write: aiosmtplib waits for every reply). Sessions are kept per destination domain and reused for the next
message, within the domain's shaping: a limit on concurrent sessions, on messages per session and on
idle time. Whatever goes wrong, the caller gets a reply to act on (bounce on 5xx, retry on 4xx),
never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from engine.config import Config, Egress, Shaping
from engine.resolver import DnsPermanentError, DnsTransientError, Resolver
from engine.shaping import LEASE
from engine.smtp.client import Reply, SMTPClientError, SMTPConnection
from engine.throttle import ThrottleTable, throttle_key

LANE_RECHECK = 0.05  # seconds between looks at the lane-wide connection count while at the limit
COMMAND_TIMEOUT = 300.0
"""Seconds to wait for each reply once a session is up (RFC 5321 4.5.3.2 asks for 5 minutes)."""

_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")
# aiosmtplib puts addresses on the command line verbatim: controls would inject commands, angle
# brackets would close the path early and inject parameters.
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")


def parse_reply(code: int, message: str) -> Reply:
    """A reply as aiosmtplib gives it: RFC 3463 enhanced codes split off each line, the lines joined."""
    enhanced = None
    lines = []
    for line in message.split("\n"):
        match = _ENHANCED.match(line)
        if match:
            enhanced = enhanced or match.group(1)
            line = line[match.end() :]
        if line:
            lines.append(line)
    return Reply(code, enhanced, " ".join(lines))


@dataclass(frozen=True)
class Peer:
    host: str
    address: str


@dataclass(frozen=True)
class Attempt:
    """The outcome of one delivery attempt: a reply per recipient, and where it was sent."""

    responses: dict[str, Reply]
    peer: Peer | None


_BAD_RECIPIENT = Reply(501, "5.1.3", "invalid recipient address: control or angle bracket characters")
_BAD_SENDER = Reply(501, "5.1.7", "invalid sender address: control or angle bracket characters")
_NO_SMTPUTF8 = Reply(553, "5.6.7", "non-ASCII address but the server does not support SMTPUTF8")


@dataclass(frozen=True)
class _Hop:
    host: str
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


class _HopFailed(Exception):
    """No usable session on a hop; `response` is what the recipients get if it was the last hop."""

    def __init__(self, response: Reply) -> None:
        super().__init__(response.text)
        self.response = response


class _TlsFailed(Exception):
    """STARTTLS was offered but the upgrade did not work."""


class _Stale(Exception):
    """A reused session turned out to be closed by the server before this transaction began."""


class _Session:
    """One SMTP connection to a hop and how much it has been used."""

    __slots__ = ("conn", "deliveries", "hop", "peer", "quit_timeout", "timer")

    def __init__(self, conn: SMTPConnection, hop: _Hop, peer: Peer, quit_timeout: float) -> None:
        self.conn = conn
        self.hop = hop
        self.peer = peer
        self.quit_timeout = quit_timeout
        self.deliveries = 0
        self.timer: asyncio.TimerHandle | None = None


class _Pool:
    """The sessions to one destination domain: the idle ones, a count of all open, and who waits."""

    __slots__ = ("domain", "idle", "key", "open", "users", "waiters")

    def __init__(self, domain: str, key: int) -> None:
        self.domain = domain
        self.key = key  # the (egress, domain) slot in the lane's throttle table
        self.idle: list[_Session] = []
        self.open = 0
        self.users = 0  # deliveries in progress that hold this pool
        self.waiters: list[asyncio.Future[None]] = []

    def wake(self) -> None:
        """Something changed (a session came back, or one closed): let every waiter look again."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _insecure_context() -> ssl.SSLContext:
    """Opportunistic TLS like Postfix's `may`: encrypt, but accept any certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Deliverer:
    """Delivery for one egress source of one worker: a pool of sessions per destination."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        egress: Egress,
        *,
        throttle: ThrottleTable | None = None,
        worker_id: int = 0,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self._config = config
        self._throttle = throttle
        self._worker_id = worker_id
        self._resolver = resolver
        self._egress = egress
        self._command_timeout = command_timeout
        self._source = (egress.source_address, 0) if egress.source_address else None
        self._family = _ip_version(egress.source_address) if egress.source_address else None
        self._tls = _insecure_context()
        self._pools: dict[str, _Pool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def reload(self, config: Config) -> None:
        """Use new routes and shaping from now on; sessions already open keep going."""
        self._config = config

    def connections(self) -> dict[str, int]:
        """Open (or opening) sessions per destination domain."""
        return {domain: pool.open for domain, pool in self._pools.items() if pool.open}

    async def close(self) -> None:
        """QUIT every pooled session and wait for sessions already closing."""
        self._closing = True
        for pool in self._pools.values():
            while pool.idle:
                self._retire(pool, pool.idle.pop())
        while self._tasks:
            await asyncio.gather(*self._tasks)

    async def deliver(self, domain: str, sender: str, recipients: Sequence[str], message: bytes) -> Attempt:
        """Send one message to the recipients at `domain`; every recipient gets a Reply."""
        responses = {rcpt: _BAD_RECIPIENT for rcpt in recipients if _UNSAFE_ADDRESS.search(rcpt)}
        valid = [rcpt for rcpt in dict.fromkeys(recipients) if rcpt not in responses]
        if valid and _UNSAFE_ADDRESS.search(sender):
            responses.update(dict.fromkeys(valid, _BAD_SENDER))
            valid = []
        if not valid:
            return Attempt(responses, None)
        domain = domain.lower()
        shaping = self._config.shaping_for(domain)
        route = self._config.route_for(domain)  # a static route bypasses MX (and needs no await)
        try:
            if route is not None:
                hops = [_Hop(route.host, route.host, route.port)]
            else:
                hops = await self._mx_hops(domain, shaping)
        except (DnsPermanentError, DnsTransientError) as exc:
            responses.update(dict.fromkeys(valid, Reply(exc.code, exc.enhanced, exc.text)))
            return Attempt(responses, None)
        pool = self._pools.get(domain) or self._pools.setdefault(domain, _Pool(domain, self._key(domain)))
        pool.users += 1
        try:
            outcome, peer = await self._send(pool, hops, shaping, sender, valid, message)
        finally:
            pool.users -= 1
            self._forget_if_unused(pool)
        responses.update(outcome)
        return Attempt(responses, peer)

    async def _send(
        self, pool: _Pool, hops: list[_Hop], shaping: Shaping, sender: str, recipients: list[str], message: bytes
    ) -> tuple[dict[str, Reply], Peer | None]:
        """One transaction on a pooled session; once more on a new session if the pooled one went stale."""
        fresh = False
        while True:
            try:
                session = None if fresh else self._take_idle(pool, hops)
                if session is None:
                    session = await self._checkout(pool, hops, shaping, fresh=fresh)
            except _HopFailed as exc:
                return dict.fromkeys(recipients, exc.response), None
            try:
                outcome = await self._transact(session, sender, recipients, message)
            except _Stale:
                self._drop(pool, session)
                fresh = True
                continue
            except BaseException:
                self._drop(pool, session)
                raise
            self._checkin(pool, session, shaping)
            return outcome, session.peer

    async def _mx_hops(self, domain: str, shaping: Shaping) -> list[_Hop]:
        """The resolver's next hops in order."""
        hops = await self._resolver.next_hops(domain)
        # A socket bound to an IPv4 source cannot reach an IPv6 exchange (nor the other way round):
        # skip those rather than let their "address family" error hide why the usable hops failed.
        return [
            _Hop(hop.host, hop.address, shaping.smtp_port)
            for hop in hops
            if self._family is None or _ip_version(hop.address) == self._family
        ]

    # Pool: who gets a session, and what happens to it afterwards.

    def _key(self, domain: str) -> int:
        return throttle_key(self._egress.name, domain)

    def _may_open(self, pool: _Pool, shaping: Shaping) -> bool:
        """Whether one more session to this destination is allowed right now, here and lane-wide; if so
        the lane-wide slot is taken (`_release` gives it back)."""
        if pool.open >= shaping.connection_limit:
            return False
        if self._throttle is None:
            return True
        return self._throttle.open_connection(
            pool.key, shaping.connection_limit, self._worker_id, time.monotonic(), LEASE
        )

    def _release(self, pool: _Pool) -> None:
        pool.open -= 1
        if self._throttle is not None:
            self._throttle.close_connection(pool.key, self._worker_id)
        pool.wake()

    async def _checkout(self, pool: _Pool, hops: list[_Hop], shaping: Shaping, *, fresh: bool) -> _Session:
        """A new session once the limit allows, or an idle one to one of `hops` (best hop first) that comes
        back meanwhile. The caller has just found no idle session (or needs a fresh one)."""
        while True:
            if self._may_open(pool, shaping):
                pool.open += 1
                try:
                    return await self._open(hops, shaping)
                except BaseException:
                    self._release(pool)
                    raise
            if pool.idle:
                # At the limit with idle sessions we cannot use (another hop, or we need a fresh
                # one): close the least recently used to make room.
                self._retire(pool, pool.idle.pop(0))
            waiter = asyncio.get_running_loop().create_future()
            pool.waiters.append(waiter)
            # Other workers free lane-wide slots without telling this one: look again now and then.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, LANE_RECHECK)
            if not fresh:
                session = self._take_idle(pool, hops)
                if session is not None:
                    return session

    def _take_idle(self, pool: _Pool, hops: list[_Hop]) -> _Session | None:
        for session in [s for s in pool.idle if s.conn.closed]:
            pool.idle.remove(session)
            self._drop(pool, session)
        for hop in hops:
            for index in range(len(pool.idle) - 1, -1, -1):
                session = pool.idle[index]
                if session.hop == hop:
                    del pool.idle[index]
                    if session.timer is not None:
                        session.timer.cancel()
                    return session
        return None

    def _checkin(self, pool: _Pool, session: _Session, shaping: Shaping) -> None:
        """After a transaction: back to the idle list, or QUIT when used up or no longer wanted."""
        if session.conn.closed:
            self._drop(pool, session)
        elif self._closing or session.deliveries >= shaping.max_deliveries_per_connection:
            self._retire(pool, session)
        else:
            pool.idle.append(session)
            loop = asyncio.get_running_loop()
            session.timer = loop.call_later(shaping.idle_timeout, self._expire, pool, session)
            pool.wake()

    def _expire(self, pool: _Pool, session: _Session) -> None:
        if session in pool.idle:
            pool.idle.remove(session)
            self._retire(pool, session)

    def _drop(self, pool: _Pool, session: _Session) -> None:
        """Close a session that cannot be used any more, without a goodbye."""
        session.conn.close()
        self._release(pool)
        self._forget_if_unused(pool)

    def _forget_if_unused(self, pool: _Pool) -> None:
        """Keep pools only for destinations with sessions or deliveries: a bulk run touches many domains."""
        if not (pool.open or pool.users) and self._pools.get(pool.domain) is pool:
            del self._pools[pool.domain]

    def _retire(self, pool: _Pool, session: _Session) -> None:
        """QUIT a healthy session in the background; its slot frees up once it is closed."""
        if session.timer is not None:
            session.timer.cancel()
        task = asyncio.ensure_future(self._quit(pool, session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quit(self, pool: _Pool, session: _Session) -> None:
        try:
            await asyncio.wait_for(session.conn.quit(), session.quit_timeout)
        except TimeoutError:
            pass
        finally:
            self._drop(pool, session)

    # Sessions: connecting, greeting, TLS.

    async def _open(self, hops: list[_Hop], shaping: Shaping) -> _Session:
        """A ready session on the first hop that gives one; the last hop's failure otherwise."""
        failure = _HopFailed(Reply(451, "4.4.1", "no next hop reachable from this egress address"))
        for hop in hops:
            try:
                return await self._open_hop(hop, shaping)
            except _HopFailed as exc:
                failure = exc
        raise failure

    async def _open_hop(self, hop: _Hop, shaping: Shaping) -> _Session:
        if shaping.tls == "disabled":
            return await self._connect(hop, shaping, starttls=False)
        try:
            return await self._connect(hop, shaping, starttls=True)
        except _TlsFailed as exc:
            if shaping.tls == "required":
                raise _HopFailed(Reply(451, "4.7.5", f"TLS required but {exc}")) from None
        return await self._connect(hop, shaping, starttls=False)

    async def _connect(self, hop: _Hop, shaping: Shaping, *, starttls: bool) -> _Session:
        smtp = aiosmtplib.SMTP(
            hostname=hop.address,
            port=hop.port,
            local_hostname=self._egress.ehlo_name,
            source_address=self._source,
            timeout=shaping.connect_timeout,
            start_tls=False,
            tls_context=self._tls,
        )
        try:
            await smtp.connect()
            await self._greet(smtp, hop)
            if starttls and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(server_hostname=hop.host)
                except (aiosmtplib.SMTPException, OSError) as exc:
                    raise _TlsFailed(f"STARTTLS with {hop} failed: {exc}") from None
                await self._greet(smtp, hop)
            elif starttls and shaping.tls == "required":
                raise _HopFailed(Reply(451, "4.7.5", f"TLS required but {hop} does not offer STARTTLS"))
            peer = Peer(hop.host, smtp.get_transport_info("peername")[0])
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            raise _unreachable(f"{hop} greeted with {exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise _unreachable(f"{hop}: {_describe(exc)}") from None
        except BaseException:
            smtp.close()
            raise
        conn = SMTPConnection.adopt(smtp.transport, smtp.esmtp_extensions, timeout=self._command_timeout)
        return _Session(conn, hop, peer, shaping.connect_timeout)

    async def _greet(self, smtp: aiosmtplib.SMTP, hop: _Hop) -> None:
        """EHLO, falling back to HELO for servers that do not know it (RFC 5321 4.1.4)."""
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError as exc:
            if not (smtp.is_connected and 500 <= exc.code <= 502):
                raise _unreachable(f"{hop} refused EHLO: {exc.code} {exc.message}") from None
            try:
                await smtp.helo()
            except aiosmtplib.SMTPHeloError as helo:
                raise _unreachable(f"{hop} refused HELO: {helo.code} {helo.message}") from None

    # Transactions.

    async def _transact(
        self, session: _Session, sender: str, recipients: list[str], message: bytes
    ) -> dict[str, Reply]:
        """MAIL, RCPT per recipient and DATA pipelined; a reply for every recipient."""
        conn = session.conn
        reused = session.deliveries > 0
        utf8 = not (sender.isascii() and all(rcpt.isascii() for rcpt in recipients))
        if utf8 and "SMTPUTF8" not in conn.extensions:
            return dict.fromkeys(recipients, _NO_SMTPUTF8)
        session.deliveries += 1
        try:
            mail, rcpt_replies, final = await conn.send_message(sender, recipients, message)
        except ValueError as exc:
            session.deliveries -= 1
            return dict.fromkeys(recipients, Reply(554, "5.6.0", f"message cannot be sent as SMTP data: {exc}"))
        except SMTPClientError as exc:
            if reused and (not exc.replies or exc.replies[0].code == 421):
                raise _Stale from None
            conn.close()
            return _after_loss(
                recipients, exc.replies, Reply(451, "4.4.2", f"connection with {session.hop} lost: {exc}")
            )
        if mail.code == 421 and reused:
            raise _Stale
        if not mail.success:
            return dict.fromkeys(recipients, _one_line(mail))
        outcome = {}
        for rcpt, reply in zip(recipients, rcpt_replies, strict=True):
            if not reply.success:
                outcome[rcpt] = _one_line(reply)
            elif final is None:
                outcome[rcpt] = Reply(451, "4.4.2", f"no reply to DATA from {session.hop}")
            else:
                outcome[rcpt] = _one_line(final)
        return outcome


def _after_loss(recipients: list[str], replies: list[Reply], lost: Reply) -> dict[str, Reply]:
    """Recipients refused before the connection broke keep their refusal; the others get `lost`."""
    rcpt_replies = replies[1:] if replies and replies[0].success else []
    outcome = dict.fromkeys(recipients, lost)
    for rcpt, reply in zip(recipients, rcpt_replies, strict=False):
        if not reply.success:
            outcome[rcpt] = _one_line(reply)
    return outcome


def _one_line(reply: Reply) -> Reply:
    """The reply with its lines joined by spaces, as the event log records it."""
    return Reply(reply.code, reply.enhanced, reply.text.replace("\n", " "))


def _unreachable(reason: str) -> _HopFailed:
    return _HopFailed(Reply(451, "4.4.1", f"all next hops failed: {reason}"))


def _ip_version(address: str) -> int | None:
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    """A short reason for the event log: the operating system's words if it failed, else aiosmtplib's."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno).lower()
    return str(exc)
