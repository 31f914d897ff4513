"""`engine sink`: a fast SMTP destination for tests, demos and benchmarks.

It accepts and discards mail (or records each message as NAME.eml with its envelope in NAME.json),
answers chosen recipients with 4xx/5xx replies, and can print running statistics as JSON lines, so a
benchmark can tell when everything arrived and tests can see which source addresses connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import ipaddress
import json
import signal
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.smtp.server import Limits, Reply, Session, SMTPServer

ACCEPTED = Reply(250, "2.0.0", "Ok: accepted by sink")
EVERYONE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


@dataclass(frozen=True)
class ReplyRule:
    pattern: str
    reply: Reply


def parse_reply_rules(text: str) -> list[ReplyRule]:
    """'GLOB=CODE ENHANCED TEXT;GLOB2=...' → rules, matched in order against lower-cased recipients."""
    rules = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        pattern, separator, answer = item.partition("=")
        fields = answer.split(None, 2)
        if not separator or not fields or not fields[0].isdigit() or not 400 <= int(fields[0]) <= 599:
            raise ValueError(f"bad reply rule {item!r}: expected GLOB=CODE [ENHANCED] [TEXT] with a 4xx/5xx code")
        code = int(fields[0])
        enhanced = fields[1] if len(fields) > 1 and fields[1][:1] in "45" and "." in fields[1] else None
        rest = fields[2 if enhanced else 1 :]
        rules.append(ReplyRule(pattern.strip().lower(), Reply(code, enhanced, " ".join(rest) or "Refused by sink")))
    return rules


class SinkHandler:
    """Counts, optionally records, and refuses recipients that match a rule."""

    hostname = "sink.localhost"

    def __init__(self, record_dir: Path | None, rules: Sequence[ReplyRule]) -> None:
        self.record_dir = record_dir
        self.rules = list(rules)
        self.messages = 0
        self.recipients = 0
        self.refused = 0
        self.bytes = 0
        self.sessions_by_peer: Counter[str] = Counter()
        self.messages_by_peer: Counter[str] = Counter()
        if record_dir is not None:
            record_dir.mkdir(parents=True, exist_ok=True)

    def check_recipient(self, session: Session, sender: str, recipient: str) -> Reply | None:
        address = recipient.lower()
        for rule in self.rules:
            if fnmatch.fnmatchcase(address, rule.pattern):
                self.refused += 1
                return rule.reply
        return None

    def handle_message(
        self, session: Session, sender: str, recipients: list[str], message: bytes, params: dict
    ) -> Reply:
        self.messages += 1
        self.recipients += len(recipients)
        self.bytes += len(message)
        self.messages_by_peer[session.peer[0]] += 1
        if self.record_dir is not None:
            self._record(session, sender, recipients, message)
        return ACCEPTED

    def rejected(self, session: Session, sender: str | None, recipients: Sequence[str], reply: Reply) -> None:
        """The sink keeps no log of refusals beyond its counters."""

    def _record(self, session: Session, sender: str, recipients: list[str], message: bytes) -> None:
        name = f"{time.time_ns()}-{self.messages:08d}"
        envelope = {
            "sender": sender,
            "recipients": recipients,
            "peer": session.peer[0],
            "helo": session.helo,
            "tls": session.tls,
            "received": time.time(),
        }
        (self.record_dir / f"{name}.eml").write_bytes(message)
        partial = self.record_dir / f"{name}.json.partial"  # readers glob *.json: they never see half a file
        partial.write_text(json.dumps(envelope))
        partial.rename(partial.with_suffix(""))

    def stats(self, server: SMTPServer) -> dict:
        return {
            "time": time.time(),
            "messages": self.messages,
            "recipients": self.recipients,
            "refused": self.refused,
            "bytes": self.bytes,
            "sessions_open": server.session_count,
            "messages_by_peer": dict(self.messages_by_peer),
            "peak_sessions_by_peer": dict(server.peak_per_address),
        }


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def run_sink(
    listen: tuple[str, int],
    record_dir: Path | None = None,
    rules: Sequence[ReplyRule] = (),
    stats_interval: float | None = None,
) -> None:
    """Serves until cancelled. Any client may send to any address: a sink relays nothing."""
    handler = SinkHandler(record_dir, rules)
    server = SMTPServer(handler, Limits(max_message_size=200 << 20, max_recipients=1000), EVERYONE)
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(listen)
    sock.listen(1024)
    await server.listen(sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"listening": f"{listen[0]}:{sock.getsockname()[1]}"}), flush=True)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), stats_interval or 3600)
        if stats_interval:
            print(json.dumps(handler.stats(server)), flush=True)
    await server.close(timeout=1.0)
    print(json.dumps(handler.stats(server)), flush=True)
