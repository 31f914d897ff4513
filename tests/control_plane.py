"""Helpers for the control-plane tests: the engine with its admin API, an HTTP client, a tarpit destination."""

from __future__ import annotations

import http.server
import json
import smtplib
import socketserver
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness import Engine, Sink, engine_toml, free_port, in_table, listener, merge

TOKEN = "t0k3n-for-tests"


def config(destination: str, tx_port: int, bulk_port: int, admin_port: int, extra: str = "", tx: str = "") -> str:
    """`tx` is TOML text for [lanes.transactional]; `extra` is TOML text that goes after [lanes.bulk]'s
    keys: more of them, then any other table."""
    return engine_toml(
        admin=admin_port,
        token=TOKEN,
        secret=None,
        routes={"*": destination},
        listeners=[listener("tx", tx_port, "transactional"), listener("bulk", bulk_port, "bulk")],
        lanes={"transactional": {"retry_intervals": ["1s"]}, "bulk": {"retry_intervals": ["1s"]}},
        extra=merge(in_table("lanes.transactional", tx), in_table("lanes.bulk", extra)),
    )


class Admin:
    """A tiny client of the admin API that returns (status, decoded JSON or text)."""

    def __init__(self, port: int, token: str | None = TOKEN) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def call(
        self, method: str, path: str, body: Any = None, *, token: str | bool | None = True, raw: bytes | None = None
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        bearer = self.token if token is True else token
        if bearer:
            request.add_header("Authorization", f"Bearer {bearer}")
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, _decode(response.read(), response.headers.get_content_type())
        except urllib.error.HTTPError as error:
            return error.code, _decode(error.read(), error.headers.get_content_type())

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.call(method, path, body)
        assert 200 <= status < 300, (status, answer)
        return answer


def _decode(data: bytes, content_type: str) -> Any:
    return json.loads(data) if content_type == "application/json" else data.decode()


def send(port: int, recipients: list[str], subject: str = "hello", headers: str = "") -> None:
    body = f"From: a@example.net\r\nSubject: {subject}\r\n{headers}\r\nbody\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@example.net", recipients, body)


def start_engine(directory: Path, destination: str, extra: str = "", tx: str = "") -> tuple[Engine, Admin, list[int]]:
    ports = [free_port(), free_port(), free_port()]
    engine = Engine(directory, config(destination, *ports, extra=extra, tx=tx)).start(ports)
    return engine, Admin(ports[2]), ports


def recipients_at(sink: Sink) -> list[str]:
    return [r for envelope, _ in sink.messages() for r in envelope["recipients"]]


class Tarpit:
    """An SMTP destination that holds every end of DATA for `delay` seconds before it answers 250."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.messages = 0
        tarpit = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(b"220 tarpit.test ESMTP\r\n")
                while line := self.rfile.readline(1024):
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        self.wfile.write(b"250-tarpit.test\r\n250 PIPELINING\r\n")
                    elif verb == b"DATA":
                        self.wfile.write(b"354 go on\r\n")
                        while self.rfile.readline(65536) not in (b".\r\n", b""):
                            pass
                        time.sleep(tarpit.delay)
                        tarpit.messages += 1
                        self.wfile.write(b"250 2.0.0 taken, slowly\r\n")
                    elif verb == b"QUIT":
                        self.wfile.write(b"221 bye\r\n")
                        return
                    else:
                        self.wfile.write(b"250 ok\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WebhookReceiver:
    """An HTTP endpoint that records every POSTed JSON body; it answers 500 to the first `failures` posts."""

    def __init__(self, failures: int = 0) -> None:
        self.bodies: list[dict] = []
        self.failures = failures
        self.posts = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts += 1
                if receiver.posts <= receiver.failures:
                    self.send_response(500)
                else:
                    receiver.bodies.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
