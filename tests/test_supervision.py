"""The supervisor's contract: SIGHUP reloads without dropping sessions, SIGTERM stops gracefully,
configuration errors name file and key, dead workers come back."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import threading
from pathlib import Path

from tests.harness import Engine, Sink, engine_command, engine_toml, free_port, listener, wait_for


def engine_config(sink: str, port: int, admin: int) -> str:
    return engine_toml(
        admin=admin,
        routes={"*": sink},
        listeners=[listener("tx", port, "transactional")],
        lanes={"transactional": {"retry_intervals": ["1s"]}},
    )


def test_sighup_reloads_routes_without_dropping_a_session(tmp_path: Path) -> None:
    first, second = Sink(tmp_path / "first"), Sink(tmp_path / "second")
    port, admin = free_port(), free_port()
    engine = Engine(tmp_path, engine_config(first.address, port, admin)).start([port])
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@x.test", ["b@dest.test"], b"Subject: before\r\n\r\nbefore\r\n")
            wait_for(lambda: first.count() == 1, 10, what="first message at the first sink")
            engine.config_path.write_text(engine_config(second.address, port, admin))
            engine.process.send_signal(signal.SIGHUP)
            wait_for(lambda: "reloaded" in engine.log_text(), 10, what="reload logged")
            client.sendmail("a@x.test", ["b@dest.test"], b"Subject: after\r\n\r\nafter\r\n")
            assert client.noop()[0] == 250
        wait_for(lambda: second.count() == 1, 10, what="second message at the second sink")
        assert first.count() == 1
    finally:
        engine.stop()
        first.stop()
        second.stop()


def test_sighup_with_a_broken_file_keeps_the_running_configuration(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "sink")
    port = free_port()
    engine = Engine(tmp_path, engine_config(sink.address, port, free_port())).start([port])
    try:
        engine.config_path.write_text("[engine]\nhostname = 5\n")
        engine.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in engine.log_text(), 10, what="refused reload logged")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@x.test", ["b@dest.test"], b"Subject: still\r\n\r\nworks\r\n")
        wait_for(lambda: sink.count() == 1, 10)
    finally:
        engine.stop()
        sink.stop()


def test_sigterm_finishes_sessions_and_loses_nothing(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "sink")
    port = free_port()
    engine = Engine(tmp_path, engine_config(sink.address, port, free_port())).start([port])
    acked: list[int] = []

    def session(first: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                for n in range(first, 600, 4):
                    client.sendmail("a@x.test", [f"r{n}@dest.test"], f"X-Seq: {n}\r\n\r\n{n}\r\n".encode())
                    acked.append(n)
        except (smtplib.SMTPException, OSError):
            return

    threads = [threading.Thread(target=session, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(acked) >= 100, 30, what="100 acknowledged messages")
        assert engine.stop(timeout=60) == 0
        for thread in threads:
            thread.join(10)
        stopped_at = len(acked)
        assert stopped_at < 600, "the blast finished before the stop: the test proves nothing"
        engine.start([port])
        wait_for(lambda: sink.count() >= len(set(acked)), 30, what="every acknowledged message delivered")
    finally:
        if engine.process.poll() is None:
            engine.stop()
        sink.stop()


def test_configuration_errors_name_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[engine]\nhostnme = "x"\n\n[lanes.bulk]\nretry_intervals = ["soon"]\n')
    checked = subprocess.run(engine_command("check", "-c", str(config)), capture_output=True, text=True, timeout=30)
    assert checked.returncode == 1
    lines = checked.stderr.strip().splitlines()
    assert any(line.startswith(f"{config}: engine.hostnme:") for line in lines), lines
    assert any(line.startswith(f"{config}: lanes.bulk.retry_intervals[0]:") for line in lines), lines
    served = subprocess.run(engine_command("serve", "-c", str(config)), capture_output=True, text=True, timeout=30)
    assert served.returncode == 1
    assert "engine.hostnme" in served.stderr


def test_a_killed_worker_is_restarted_and_resumes_its_spool(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "sink", reply="*@later.test=451 4.3.0 not yet")
    port = free_port()
    engine = Engine(tmp_path, engine_config(sink.address, port, free_port())).start([port])
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@x.test", ["r@later.test"], b"Subject: retry me\r\n\r\nx\r\n")
        wait_for(lambda: engine.events("TransientFailure"), 10, what="first transient failure")
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_worker(int(p), engine.process.pid)]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: "restarting" in engine.log_text(), 10, what="restart logged")
        wait_for(lambda: "recovered 1 messages" in engine.log_text(), 20, what="spool recovered after restart")
    finally:
        engine.stop()
        sink.stop()


def _is_worker(pid: int, parent: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"worker" in command
