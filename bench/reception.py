"""Server CPU per message of the reception protocol: DATA vs BDAT, clear text vs STARTTLS, and the memory an
idle session holds. The server runs alone in a subprocess (uvloop, a handler that accepts at once, no spool),
so the figures are the protocol's own; ratios are against clear-text DATA measured in the same run.

    python -m bench.reception [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from engine.smtp.server import OK, Limits, SMTPServer
from engine.smtp.tls import server_context
from tests.certs import self_signed

RESULTS = Path(__file__).parent / "results" / "reception.json"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
BODY = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26  # ~2 KB
IDLE_SESSIONS = 500


class AcceptAll:
    hostname = "bench.local"

    def check_recipient(self, session, sender, recipient):
        return None

    def handle_message(self, session, sender, recipients, message, params):
        return OK

    def rejected(self, session, sender, recipients, reply) -> None:
        return None


async def serve(port: int, cert: Path | None, key: Path | None) -> None:
    tls = server_context(cert, key) if cert and key else None
    server = SMTPServer(AcceptAll(), Limits(max_connections=10_000), [ipaddress.ip_network("127.0.0.0/8")], tls=tls)
    sock = socket.create_server(("127.0.0.1", port), backlog=1024)
    sock.setblocking(False)
    await server.listen(sock)
    print("ready", flush=True)
    await asyncio.Event().wait()


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Session:
    def __init__(self, port: int, context: ssl.SSLContext | None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.replies(1)
        self.sock.sendall(b"EHLO bench\r\n")
        self.replies(1)
        if context is not None:
            self.sock.sendall(b"STARTTLS\r\n")
            self.replies(1)
            self.file.close()
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
            self.file = self.sock.makefile("rb")
            self.sock.sendall(b"EHLO bench\r\n")
            self.replies(1)

    def replies(self, count: int) -> None:
        for _ in range(count):
            while True:
                line = self.file.readline()
                if not line.startswith(b"2") and not line.startswith(b"3"):
                    raise RuntimeError(f"unexpected reply {line!r}")
                if line[3:4] != b"-":
                    break

    def data(self) -> None:
        self.sock.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        self.replies(3)
        self.sock.sendall(BODY + b".\r\n")
        self.replies(1)

    def bdat(self) -> None:
        self.sock.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT %d LAST\r\n" % len(BODY) + BODY)
        self.replies(3)

    def close(self) -> None:
        self.sock.sendall(b"QUIT\r\n")
        self.sock.close()


def measure(pid: int, port: int, context: ssl.SSLContext | None, method: str, count: int) -> dict:
    session = Session(port, context)
    send = getattr(session, method)
    for _ in range(min(200, count)):
        send()
    cpu, wall = cpu_seconds(pid), time.perf_counter()
    for _ in range(count):
        send()
    cpu, wall = cpu_seconds(pid) - cpu, time.perf_counter() - wall
    session.close()
    return {"messages": count, "server_us_per_message": cpu / count * 1e6, "messages_per_s": count / wall}


def idle_memory(pid: int, port: int) -> float:
    before = rss_kb(pid)
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(IDLE_SESSIONS)]
    for sock in sockets:
        sock.recv(100)
    after = rss_kb(pid)
    for sock in sockets:
        sock.close()
    return (after - before) / IDLE_SESSIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 messages per case instead of 20,000")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tls", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve, *(args.tls or (None, None))))
        return
    count = 2_000 if args.quick else 20_000
    with tempfile.TemporaryDirectory() as directory:
        cert, key = self_signed(Path(directory))
        context = ssl.create_default_context(cafile=cert)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "bench.reception", "--serve", str(port), "--tls", str(cert), str(key)]
        server = subprocess.Popen(command, stdout=subprocess.PIPE)
        try:
            assert server.stdout.readline().strip() == b"ready"
            rows = {
                "DATA, clear text": measure(server.pid, port, None, "data", count),
                "BDAT, clear text": measure(server.pid, port, None, "bdat", count),
                "DATA, STARTTLS": measure(server.pid, port, context, "data", count),
                "BDAT, STARTTLS": measure(server.pid, port, context, "bdat", count),
            }
            per_session = idle_memory(server.pid, port)
        finally:
            server.terminate()
            server.wait(10)
    baseline = rows["DATA, clear text"]["server_us_per_message"]
    print(f"{'case':<18}  {'server CPU/msg':>14}  {'vs DATA clear':>13}  {'msgs/s (1 session)':>18}")
    for name, row in rows.items():
        row["ratio"] = row["server_us_per_message"] / baseline
        cpu, ratio, rate = row["server_us_per_message"], row["ratio"], row["messages_per_s"]
        print(f"{name:<18}  {cpu:>11.1f} us  {ratio:>12.2f}x  {rate:>18.0f}")
    print(f"idle session: {per_session:.1f} KB of server RSS each ({IDLE_SESSIONS} sessions)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"cases": rows, "idle_session_kb": per_session, "body_bytes": len(BODY), "quick": args.quick}
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
