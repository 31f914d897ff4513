"""A small authoritative DNS server on loopback (UDP and TCP, one port) for tests and bench scripts.

Tests get real DNS on the wire instead of a mocked resolver: MX lookups, DKIM keys published as TXT
for an external verifier, and black-box runs of `engine serve` all talk to this server.

    python -m tests.dnsserver --port 5353 --zone zone.txt

Zone file: one record per line, `name [ttl] TYPE value`; `#` starts a comment. MX values are
`PREFERENCE EXCHANGE`, SOA values `MNAME RNAME MINIMUM`, and `name FAIL RCODE` makes a name fail.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord

FAILURES = ("NXDOMAIN", "SERVFAIL", "REFUSED", "TIMEOUT")
CLASSIC_UDP_SIZE = 512
TCP_READ_SIZE = 65536


@dataclass(frozen=True)
class _Record:
    rtype: str
    rdata: Any
    ttl: int


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def _rdata(rtype: str, value: Any) -> Any:
    """Turn the add() value of one record type into dnslib record data."""
    if rtype == "MX":
        preference, exchange = value
        return MX(exchange, int(preference))
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "CNAME":
        return CNAME(value)
    if rtype == "TXT":
        data = value.encode() if isinstance(value, str) else bytes(value)
        return TXT([data[i : i + 255] for i in range(0, len(data), 255)] or [b""])
    if rtype == "SOA":
        mname, rname, minimum = value
        return SOA(mname, rname, (1, 3600, 600, 86400, int(minimum)))
    raise ValueError(f"unsupported record type {rtype!r}")


class DnsServer:
    """Answers from an in-memory zone on one thread; records may change while it runs."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.queries: list[tuple[str, str]] = []
        self._records: dict[str, list[_Record]] = {}
        self._failures: dict[str, str] = {}
        self._lock = threading.Lock()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind UDP and TCP on the same port (retrying if a free UDP port is taken for TCP)."""
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, self.port))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                if self.port:
                    raise
                continue
            tcp.listen(64)
            self._udp, self._tcp, self.port = udp, tcp, port
            break
        else:
            raise OSError("no port free for both UDP and TCP")
        self._thread = threading.Thread(target=self._serve, name=f"dns-{self.port}", daemon=True)
        self._thread.start()
        return self.host, self.port

    def stop(self) -> None:
        if self._thread is not None:
            self._wake_w.send(b"x")
            self._thread.join(timeout=5)
            self._thread = None
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add(self, name: str, rtype: str, value: Any, ttl: int = 60) -> None:
        rtype = rtype.upper()
        record = _Record(rtype, _rdata(rtype, value), ttl)
        with self._lock:
            self._records.setdefault(_norm(name), []).append(record)

    def fail(self, name: str, rcode: str) -> None:
        if rcode not in FAILURES:
            raise ValueError(f"rcode must be one of {FAILURES}")
        with self._lock:
            self._failures[_norm(name)] = rcode

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._failures.clear()
        self.queries.clear()

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        buffers: dict[socket.socket, bytes] = {}
        with selectors.DefaultSelector() as sel:
            sel.register(self._udp, selectors.EVENT_READ)
            sel.register(self._tcp, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in sel.select():
                        sock = key.fileobj
                        if sock is self._wake_r:
                            return
                        if sock is self._udp:
                            self._on_datagram()
                        elif sock is self._tcp:
                            conn, _ = self._tcp.accept()
                            buffers[conn] = b""
                            sel.register(conn, selectors.EVENT_READ)
                        else:
                            self._on_stream(sel, sock, buffers)
            finally:
                for conn in buffers:
                    conn.close()

    def _on_datagram(self) -> None:
        assert self._udp is not None
        data, peer = self._udp.recvfrom(TCP_READ_SIZE)
        reply = self._answer(data, udp=True)
        if reply is not None:
            self._udp.sendto(reply, peer)

    def _on_stream(self, sel: selectors.BaseSelector, conn: Any, buffers: dict[socket.socket, bytes]) -> None:
        try:
            chunk = conn.recv(TCP_READ_SIZE)
        except OSError:
            chunk = b""
        if not chunk:
            sel.unregister(conn)
            del buffers[conn]
            conn.close()
            return
        buf = buffers[conn] + chunk
        while len(buf) >= 2:
            (length,) = struct.unpack("!H", buf[:2])
            if len(buf) < 2 + length:
                break
            reply = self._answer(buf[2 : 2 + length], udp=False)
            buf = buf[2 + length :]
            if reply is not None:
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        buffers[conn] = buf

    def _answer(self, data: bytes, udp: bool) -> bytes | None:
        """Build the wire reply to one query; None means stay silent (TIMEOUT)."""
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        reply = request.reply()
        reply.header.ra = 0
        if not request.questions:
            reply.header.rcode = RCODE.FORMERR
            return reply.pack()
        question = request.questions[0]
        name, rtype = _norm(str(question.qname)), QTYPE[question.qtype]
        self.queries.append((name, rtype))
        with self._lock:
            failure = self._failures.get(name)
            if failure == "TIMEOUT":
                return None
            if failure is not None:
                reply.header.rcode = getattr(RCODE, failure)
            else:
                self._resolve(reply, name, rtype)
        packed = reply.pack()
        if udp and len(packed) > self._udp_limit(request):
            truncated = request.reply()
            truncated.header.tc = 1
            truncated.header.rcode = reply.header.rcode
            packed = truncated.pack()
        return packed

    @staticmethod
    def _udp_limit(request: DNSRecord) -> int:
        for rr in request.ar:
            if rr.rtype == QTYPE.OPT:
                return max(CLASSIC_UDP_SIZE, rr.rclass)
        return CLASSIC_UDP_SIZE

    def _resolve(self, reply: DNSRecord, name: str, rtype: str) -> None:
        """Fill answers, following CNAMEs inside the zone; negative answers carry the zone's SOA."""
        for _ in range(8):
            records = self._records.get(name, [])
            cnames = [r for r in records if r.rtype == "CNAME"]
            if cnames and rtype != "CNAME":
                reply.add_answer(RR(name, QTYPE.CNAME, rdata=cnames[0].rdata, ttl=cnames[0].ttl))
                name = _norm(str(cnames[0].rdata.label))
                continue
            matches = [r for r in records if rtype in ("ANY", r.rtype)]
            for r in matches:
                reply.add_answer(RR(name, getattr(QTYPE, r.rtype), rdata=r.rdata, ttl=r.ttl))
            if not matches:
                if not self._exists(name):
                    reply.header.rcode = RCODE.NXDOMAIN
                self._add_soa(reply, name)
            return

    def _exists(self, name: str) -> bool:
        suffix = "." + name
        return any(known == name or known.endswith(suffix) for known in self._records)

    def _add_soa(self, reply: DNSRecord, name: str) -> None:
        labels = name.split(".")
        for i in range(len(labels)):
            zone = ".".join(labels[i:])
            for r in self._records.get(zone, []):
                if r.rtype == "SOA":
                    reply.add_auth(RR(zone, QTYPE.SOA, rdata=r.rdata, ttl=r.ttl))
                    return


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A started DnsServer on a free loopback port, stopped after the test."""
    with DnsServer() as server:
        yield server


def _parse_value(rtype: str, fields: list[str]) -> Any:
    if rtype == "MX":
        return int(fields[0]), fields[1]
    if rtype == "SOA":
        return fields[0], fields[1], int(fields[2])
    if rtype == "TXT":
        return " ".join(fields).strip('"')
    return fields[0]


def load_zone(server: DnsServer, text: str) -> None:
    """Add every `name [ttl] TYPE value` line of a zone file to the server."""
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        name, rest = fields[0], fields[1:]
        ttl = 60
        if rest and rest[0].isdigit():
            ttl, rest = int(rest[0]), rest[1:]
        rtype, values = rest[0].upper(), rest[1:]
        if rtype == "FAIL":
            server.fail(name, values[0].upper())
        else:
            server.add(name, rtype, _parse_value(rtype, values), ttl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--zone", help="zone file: `name [ttl] TYPE value` per line")
    args = parser.parse_args()
    server = DnsServer(args.host, args.port)
    if args.zone:
        with open(args.zone, encoding="utf-8") as f:
            load_zone(server, f.read())
    host, port = server.start()
    print(f"dns server on {host}:{port} (UDP and TCP)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
