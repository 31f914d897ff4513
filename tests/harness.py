"""Real processes for black-box tests: `engine serve` with a temporary configuration, `engine sink`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from engine.events import read_events


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def engine_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine", *args]


class Sink:
    """`engine sink` as a subprocess that records every message."""

    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int | None = None, reply: str = "") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.directory = directory
        command = engine_command("sink", "--listen", f"{host}:{self.port}", "--record", str(directory))
        if reply:
            command += ["--reply", reply]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert "listening" in line, f"sink did not start: {line!r}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def messages(self) -> list[tuple[dict, bytes]]:
        """(envelope, message bytes) of every recorded message, in arrival order."""
        found = []
        for path in sorted(self.directory.glob("*.json")):
            eml = path.with_suffix(".eml")
            if eml.exists():
                found.append((json.loads(path.read_text()), eml.read_bytes()))
        return found

    def arrivals(self, seen: dict[str, tuple[dict, bytes]]) -> dict[str, tuple[dict, bytes]]:
        """Like messages(), but reads only files not in `seen` (which it updates): cheap to poll."""
        for path in self.directory.glob("*.json"):
            if path.name not in seen and path.with_suffix(".eml").exists():
                seen[path.name] = (json.loads(path.read_text()), path.with_suffix(".eml").read_bytes())
        return seen

    def count(self) -> int:
        return len(list(self.directory.glob("*.json")))

    def stop(self) -> dict:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=10)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}


class Engine:
    """`engine serve -c CONFIG` as a subprocess in its own session, so kill -9 can take every process."""

    def __init__(self, directory: Path, config: str) -> None:
        self.directory = directory
        self.config_path = directory / "engine.toml"
        self.config_path.write_text(config)
        self.process: subprocess.Popen | None = None

    def start(self, ports: list[int], timeout: float = 20.0) -> Engine:
        self.stderr = open(self.directory / "engine.stderr", "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            engine_command("serve", "-c", str(self.config_path)),
            stderr=self.stderr,
            start_new_session=True,
        )
        for port in ports:
            wait_for(lambda p=port: port_open("127.0.0.1", p) or self._died(), timeout, what=f"port {port}")
        self._died()
        return self

    def _died(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"engine exited with {self.process.returncode}:\n{self.log_text()}")
        return False

    def log_text(self) -> str:
        return (self.directory / "engine.stderr").read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.stderr.close()
        return code

    def kill(self) -> None:
        """kill -9 of the supervisor and every worker at once."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.stderr.close()

    def events(self, *types: str) -> list[dict]:
        return read_events(self.directory / "logs", types or None)
