"""Real processes for black-box tests: `engine serve` with a temporary configuration, `engine sink`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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


# --- configuration files ----------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    """A basic string: quotes and backslashes escaped, control characters as \\u escapes (ESC is \\u001b)."""
    parts = []
    for char in text:
        if char in '"\\':
            parts.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            parts.append(f"\\u{ord(char):04x}")
        else:
            parts.append(char)
    return '"' + "".join(parts) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, Mapping) for item in value)


def _toml_table(lines: list[str], path: list[str], table: Mapping[str, Any], array: bool = False) -> None:
    """One table's own keys under its header, then its sub-tables: TOML wants them in that order."""
    plain = {k: v for k, v in table.items() if not isinstance(v, Mapping) and not _is_table_array(v)}
    name = ".".join(_toml_key(part) for part in path)
    if path and (array or plain or not table):
        lines += ["", f"[[{name}]]" if array else f"[{name}]"]
    lines += [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in plain.items()]
    for key, value in table.items():
        if isinstance(value, Mapping):
            _toml_table(lines, [*path, key], value)
        elif _is_table_array(value):
            for item in value:
                _toml_table(lines, [*path, key], item, array=True)


def toml_text(document: Mapping[str, Any]) -> str:
    """A TOML document that tomllib reads back as `document` (Python 3.11 reads TOML but cannot write it)."""
    lines: list[str] = []
    _toml_table(lines, [], document)
    return "\n".join(lines).lstrip("\n") + "\n"


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, table by table."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def in_table(table: str, text: str) -> dict[str, Any]:
    """TOML text that callers write to go right after a `[table]` header, as a document."""
    return tomllib.loads(f"[{table}]\n{text}")


def listener(name: str, port: int, lane: str, **keys: Any) -> dict[str, Any]:
    """One [[listeners]] entry on 127.0.0.1."""
    return {"name": name, "listen": f"127.0.0.1:{port}", "lane": lane, **keys}


def engine_toml(
    *,
    admin: int,
    routes: Mapping[str, str],
    listeners: Sequence[Mapping[str, Any]],
    lanes: Mapping[str, Mapping[str, Any]],
    egress: Mapping[str, Mapping[str, Any]] | None = None,
    shaping: Mapping[str, Any] | None = None,
    hostname: str = "mta.test",
    secret: str | None = "test-secret",
    token: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The engine configuration black-box tests run with: spool and logs beside the file, the admin API
    on 127.0.0.1:ADMIN, delivery by `routes` only (no DNS). `shaping` is [shaping.default]; `extra` is laid
    over the whole document last."""
    engine = {"hostname": hostname, "spool_dir": "spool", "log_dir": "logs"}
    if secret is not None:
        engine["secret"] = secret
    document: dict[str, Any] = {
        "engine": engine,
        "admin": {"listen": f"127.0.0.1:{admin}", **({"token": token} if token is not None else {})},
        "routes": dict(routes),
        "listeners": [dict(item) for item in listeners],
        "lanes": {name: dict(keys) for name, keys in lanes.items()},
    }
    if egress:
        document["egress"] = {name: dict(keys) for name, keys in egress.items()}
    if shaping:
        document["shaping"] = {"default": dict(shaping)}
    return toml_text(merge(document, extra or {}))


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
