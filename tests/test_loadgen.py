"""engine.loadgen against the recording ESMTP peer of test_client, on loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import uvloop

from engine.loadgen import LoadReport, run_load, send_command
from tests.test_client import Peer, PeerThread


def load(peer: Peer, **kwargs: Any) -> LoadReport:
    options = {
        "to": ["user{n}@d.test"],
        "count": 40,
        "concurrency": 4,
        "size": 2048,
        "headers": [],
        "sender": "loadgen@src.test",
        "progress": False,
    }
    options.update(kwargs)

    async def go() -> LoadReport:
        await peer.start()
        try:
            return await asyncio.wait_for(run_load(("127.0.0.1", peer.port), **options), 20)
        finally:
            await peer.stop()

    return uvloop.run(go())


def unstuff(wire: bytes) -> bytes:
    return re.sub(rb"(?m)^\.", b"", wire)


def header(message: bytes, name: bytes) -> bytes:
    return re.search(rb"(?mi)^" + name + rb": (.*)\r$", message).group(1)


def test_every_message_arrives_numbered_sized_and_unique() -> None:
    peer = Peer()
    report = load(peer, to=["user{n}@d{n}.test", "copy@fixed.test"], headers=["X-Campaign: c{n}"])
    assert report.ok and report.sent == 40 and report.failed == {} and report.refused == {}
    assert peer.sessions == 4
    assert len(peer.messages) == 40
    numbers = set()
    for received in peer.messages:
        message = unstuff(received.wire)
        n = int(header(message, b"X-Loadgen-Seq"))
        numbers.add(n)
        assert received.sender == "loadgen@src.test"
        assert received.recipients == [f"user{n}@d{n}.test", "copy@fixed.test"]
        assert header(message, b"X-Campaign") == b"c%d" % n
        assert len(message) == 2048
        body = message.partition(b"\r\n\r\n")[2]
        assert all(len(line) <= 76 for line in body.split(b"\r\n"))
        assert body.count(b"\r\n") >= 20
    assert numbers == set(range(1, 41))
    ids = {header(unstuff(m.wire), b"Message-ID") for m in peer.messages}
    assert len(ids) == 40
    assert len({header(unstuff(m.wire), b"X-Loadgen-Id") for m in peer.messages}) == 1


@pytest.mark.parametrize("size", [0, 300, 2047, 2048 + 78 + 1, 20000])
def test_size_is_the_whole_message_when_headers_fit(size: int) -> None:
    peer = Peer()
    load(peer, count=3, concurrency=1, size=size)
    lengths = {len(unstuff(m.wire)) for m in peer.messages}
    head = len(unstuff(peer.messages[0].wire).partition(b"\r\n\r\n")[0]) + 4
    assert lengths == {max(size, head)}


def test_user_header_replaces_the_default_one() -> None:
    peer = Peer()
    load(peer, count=2, concurrency=1, headers=["Subject: chosen {n}"])
    message = unstuff(peer.messages[0].wire)
    assert header(message, b"Subject") == b"chosen 1"
    assert message.count(b"\r\nSubject:") == 1


def test_failures_are_counted_by_code_and_latency_percentiles_are_ordered() -> None:
    peer = Peer(
        replies={"user3@d.test": "550 5.1.1 no such user", "user5@d.test": "451 4.3.0 later"},
    )
    report = load(peer)
    assert report.sent == 38
    assert report.failed == {"550": 1, "451": 1}
    assert report.refused == {"550": 1, "451": 1}
    assert not report.ok
    lat = report.latency_ms
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 5000
    assert report.rate > 0


def test_refused_data_command_is_counted() -> None:
    report = load(Peer(data_reply="554 5.7.1 no"), count=4, concurrency=2)
    assert report.sent == 0 and report.failed == {"554": 4} and report.refused == {}


def test_partly_refused_message_is_sent_but_not_ok() -> None:
    peer = Peer(replies={"bad@d.test": "550 5.1.1 no such user"})
    report = load(peer, to=["user{n}@d.test", "bad@d.test"], count=5, concurrency=2)
    assert report.sent == 5 and report.failed == {}
    assert report.refused == {"550": 5}
    assert not report.ok


def test_broken_sessions_reconnect_and_count_the_loss() -> None:
    peer = Peer(hangup={"user7@d.test", "user20@d.test"})
    report = load(peer, count=30, concurrency=2)
    lost = report.failed["connection"]
    assert set(report.failed) == {"connection"}
    assert 2 <= lost <= 4  # the message in flight next to a dropped one is lost with it
    assert report.sent == 30 - lost == len(peer.messages)
    assert peer.sessions == 4


def test_unreachable_server_counts_connect_failures() -> None:
    peer = Peer()

    async def go() -> LoadReport:
        await peer.start()
        port = peer.port
        await peer.stop()
        return await run_load(("127.0.0.1", port), ["x@d.test"], 5, 2, 100, [], "a@src.test", False)

    report = uvloop.run(go())
    assert report.sent == 0 and report.failed == {"connect": 5}
    assert report.latency_ms == {}


def test_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    load(Peer(), count=10, concurrency=2, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("\r[") and err.endswith("\n")
    assert "10/10" in err.rsplit("\r", 1)[1]


def namespace(port: int, tmp_path: Path, **kwargs: Any) -> argparse.Namespace:
    args = {
        "server": f"127.0.0.1:{port}",
        "to": ["user{n}@d.test"],
        "sender": "loadgen@localhost",
        "count": 20,
        "concurrency": 3,
        "size": 1024,
        "header": [],
        "quiet": True,
        "json": tmp_path / "report.json",
    }
    args.update(kwargs)
    return argparse.Namespace(**args)


def test_send_command_reports_and_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with PeerThread(Peer()) as peer:
        code = send_command(namespace(peer.port, tmp_path))
    out, err = capsys.readouterr()
    assert code == 0
    assert err == ""
    assert re.search(r"^sent\s+20$", out, re.M)
    assert re.search(r"^latency ms\s+p50 [\d.]+\s+p90 [\d.]+\s+p99 [\d.]+\s+max [\d.]+$", out, re.M)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sent"] == 20 and report["failed"] == 0 and report["failed_by_code"] == {}
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert report["messages_per_second"] > 0


def test_send_command_exits_one_on_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with PeerThread(Peer(replies={"user2@d.test": "554 5.7.1 rejected"})) as peer:
        code = send_command(namespace(peer.port, tmp_path))
    out = capsys.readouterr().out
    assert code == 1
    assert re.search(r"^failed\s+1$", out, re.M)
    assert re.search(r"^\s+554\s+1$", out, re.M)
    assert json.loads((tmp_path / "report.json").read_text())["failed_by_code"] == {"554": 1}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("server", "no-port"),
        ("header", ["not a header"]),
        ("header", ["A: b\r\nC: d"]),
        ("to", []),
        ("concurrency", 0),
        ("count", -1),
    ],
)
def test_send_command_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object
) -> None:
    assert send_command(namespace(1, tmp_path, **{field: value})) == 2
    assert capsys.readouterr().err.startswith("engine send: ")


def test_engine_send_command_line(tmp_path: Path) -> None:
    with PeerThread(Peer()) as peer:
        command = (
            f"send --server 127.0.0.1:{peer.port} --to 'u{{n}}@d.test' --to copy@d.test --count 12 "
            f"--concurrency 3 --size 600 --header 'X-Run: cli' --json {tmp_path / 'r.json'}"
        )
        done = subprocess.run(
            [sys.executable, "-m", "engine", *shlex.split(command)], capture_output=True, text=True, timeout=30
        )
    assert done.returncode == 0, done.stderr
    assert re.search(r"^sent\s+12$", done.stdout, re.M)
    assert json.loads((tmp_path / "r.json").read_text())["sent"] == 12
    assert sorted(m.recipients[0] for m in peer.messages) == sorted(f"u{n}@d.test" for n in range(1, 13))
    assert all(b"\r\nX-Run: cli\r\n" in m.wire for m in peer.messages)
