"""After SIGHUP the DSNs a worker writes are signed with the reloaded DKIM key, not the one it started with.

A real `engine serve` bounces mail at a refusing sink; the DSN (From MAILER-DAEMON@mta.test) must verify
against the public key of whichever key file was in place at the last (re)load. dkimpy verifies, with the
DNS lookup answered from the keys this test generated.
"""

from __future__ import annotations

import os
import signal
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest

from tests.harness import Engine, Sink, engine_toml, free_port, listener, wait_for

HOSTNAME = "mta.test"
SELECTOR = "s1"
SENDER = "alice@senders.test"


@dataclass
class World:
    engine: Engine
    sink: Sink
    port: int
    key_file: Path
    started_txt: bytes  # the DNS record of the key the engine started with


def new_key(directory: Path, name: str) -> tuple[Path, bytes]:
    """A fresh Ed25519 key for mta.test in DIRECTORY/NAME and its DNS TXT value."""
    from engine.signing import generate_key

    path = directory / name
    _, value = generate_key(HOSTNAME, SELECTOR, "ed25519-sha256", path)
    return path, value.encode()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    key_file, started_txt = new_key(tmp_path, "dkim.pem")
    sink = Sink(tmp_path / "sink", reply="*@refusing.test=550 5.1.1 no such user")
    port, admin = free_port(), free_port()
    config = engine_toml(
        hostname=HOSTNAME,
        admin=admin,
        routes={"*": sink.address},
        listeners=[listener("tx", port, "transactional")],
        lanes={"transactional": {"dsn": True}},
        extra={"dkim": {HOSTNAME: {"selector": SELECTOR, "key_file": str(key_file), "algorithm": "ed25519-sha256"}}},
    )
    engine = Engine(tmp_path, config).start([port])
    try:
        yield World(engine, sink, port, key_file, started_txt)
    finally:
        engine.stop()
        sink.stop()


def bounce_and_get_dsn(world: World, subject: str) -> bytes:
    """Sends one message that the sink refuses and returns the DSN that comes back to the sender."""
    message = f"From: {SENDER}\r\nTo: bob@refusing.test\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
    with smtplib.SMTP("127.0.0.1", world.port, timeout=10) as client:
        client.sendmail(SENDER, ["bob@refusing.test"], message)

    def dsn() -> bytes | None:
        for envelope, data in world.sink.messages():
            if envelope["recipients"] == [SENDER] and f"Subject: {subject}".encode() in data:
                return data
        return None

    return wait_for(dsn, 20, what=f"the DSN for {subject!r}")


def verifies_with(message: bytes, txt: bytes) -> bool:
    """dkimpy's verdict when SELECTOR._domainkey.mta.test publishes `txt`."""
    name = f"{SELECTOR}._domainkey.{HOSTNAME}.".encode()
    return dkim.verify(message, dnsfunc=lambda query, timeout=5: txt if query == name else None)


def test_dsn_is_signed_with_the_key_loaded_by_sighup(world: World, tmp_path: Path) -> None:
    first = bounce_and_get_dsn(world, "before reload")
    assert verifies_with(first, world.started_txt)

    rotated, rotated_txt = new_key(tmp_path, "rotated.pem")
    os.replace(rotated, world.key_file)
    world.engine.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "transactional/0 reloaded" in world.engine.log_text(), 10, what="the worker's reload")

    second = bounce_and_get_dsn(world, "after reload")
    assert not verifies_with(second, world.started_txt), "the DSN after SIGHUP is still signed with the old key"
    assert verifies_with(second, rotated_txt)
