"""What the benchmarks share: CPU and memory of process trees from /proc, timing on a fresh uvloop loop,
tables, JSON results, and `engine sink` / `engine serve` / `engine send` as subprocesses.

CPU of a process tree is the sum over its live processes of utime+stime+cutime+cstime: a process that
exited during a run is counted through the c-times of whoever reaped it, so before/after differences stay
right while Postfix recycles its daemons or the supervisor restarts a worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop

RESULTS_DIR = Path(__file__).parent / "results"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


# --- this process -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    user: float
    system: float
    wall: float

    @property
    def cpu(self) -> float:
        return self.user + self.system


def run_on_fresh_loop(run: Callable[[], Awaitable[object]]) -> Timing:
    """CPU (user, system) and wall seconds of one coroutine run on a new uvloop loop, in this process."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        runner.run(run())
        after, wall2 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return Timing(after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, wall2 - wall)


# --- other processes, from /proc ------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def process_cpu(pid: int) -> float:
    """utime+stime+cutime+cstime of one process, in seconds (0 once it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICK


def tree_pids(root: int) -> list[int]:
    """`root` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by `root` and all its descendants, dead (and reaped) ones included."""
    return sum(process_cpu(pid) for pid in tree_pids(root))


def wait_idle(root: int, timeout: float = 30.0, window: float = 0.3, busy: float = 0.03) -> None:
    """Returns once the tree used less than `busy` CPU seconds over `window` (start-up is over), or at timeout."""
    deadline = time.monotonic() + timeout
    last = tree_cpu(root)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = tree_cpu(root)
        if now - last < busy:
            return
        last = now


def tree_memory(root: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of the tree now: RSS counts shared pages once per process, PSS splits them."""
    rss = pss = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return rss, pss


class PeakMemory:
    """Samples the memory of process trees on a thread and keeps the peak of each (context manager)."""

    def __init__(self, roots: Mapping[str, int], interval: float = 0.25) -> None:
        self.roots = dict(roots)
        self.interval = interval
        self.peak_rss = dict.fromkeys(self.roots, 0)
        self.peak_pss = dict.fromkeys(self.roots, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for name, root in self.roots.items():
            rss, pss = tree_memory(root)
            self.peak_rss[name] = max(self.peak_rss[name], rss)
            self.peak_pss[name] = max(self.peak_pss[name], pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# --- output --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One table column: `spec` formats its values ("<40", ">10.1f"), `suffix` follows each ("x")."""

    title: str
    key: str
    spec: str
    suffix: str = ""

    def cell(self, value: object) -> str:
        return "-" if value is None else format(value, self.spec) + self.suffix

    def align(self) -> str:
        return self.spec[0] if self.spec[:1] in ("<", ">", "^") else ">"


def print_table(columns: Sequence[Column], rows: Iterable[Mapping[str, object]]) -> None:
    """Header and rows, each column as wide as its widest cell; a missing or None value prints as '-'."""
    cells = [[column.cell(row.get(column.key)) for column in columns] for row in rows]
    widths = [max([len(column.title), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]
    for line in [[column.title for column in columns], *cells]:
        print(
            "  ".join(
                f"{text:{column.align()}{width}}" for text, column, width in zip(line, columns, widths, strict=True)
            ).rstrip()
        )


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    return value


def write_results(name: str, payload: Mapping[str, object], path: Path | None = None) -> Path:
    """Writes `payload` (floats rounded to 4 places) as bench/results/NAME.json, or to `path`."""
    path = path or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_rounded(payload), indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


# --- engine subprocesses -------------------------------------------------------------------------------


def engine_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine", *args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Returns once an SMTP server greets on 127.0.0.1:`port` (a bound socket alone is not enough: the
    supervisor binds before its workers run); RuntimeError on timeout or if `alive` says no."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the process that should listen on port {port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f}s")


class Sink:
    """`engine sink` printing its counters every `interval` seconds; a thread keeps every sample."""

    def __init__(self, interval: float = 0.2) -> None:
        command = engine_command("sink", "--listen", "127.0.0.1:0", "--stats-interval", str(interval))
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        first = json.loads(self.process.stdout.readline())
        self.port = int(first["listening"].rpartition(":")[2])
        self.samples: list[tuple[float, int, int]] = [(time.time(), 0, 0)]
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            stats = json.loads(line)
            with self._changed:
                self.samples.append((stats["time"], stats["messages"], stats["recipients"]))
                self._changed.notify_all()

    def wait_recipients(self, count: int, timeout: float) -> float | None:
        """Estimated time.time() the `count`-th recipient arrived (interpolated between the two samples
        around it), or None if it had not after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.samples[-1][2] < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    return None
                self._changed.wait(min(left, 1.0))
            (t0, _, r0), (t1, _, r1) = next(
                (self.samples[i - 1], self.samples[i])
                for i in range(1, len(self.samples))
                if self.samples[i][2] >= count
            )
        return t1 if r1 == r0 else t0 + (t1 - t0) * (count - r0) / (r1 - r0)

    @property
    def received(self) -> tuple[int, int]:
        """(messages, recipients) counted so far."""
        return self.samples[-1][1], self.samples[-1][2]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(15)
        self._reader.join(5)


class EngineServer:
    """`engine serve` with a configuration written to a fresh temporary directory (spool and logs too),
    removed when it stops."""

    def __init__(self, config: str, port: int, timeout: float = 30.0) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="bench-engine-"))
        self.config_path = self.directory / "engine.toml"
        self.config_path.write_text(config)
        self.port = port
        self._stderr = open(self.directory / "engine.stderr", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            engine_command("serve", "-c", str(self.config_path)), stderr=self._stderr, start_new_session=True
        )
        try:
            wait_for_port(port, timeout, lambda: self.process.poll() is None)
        except RuntimeError:
            log = self.log_text()
            self.stop()
            raise RuntimeError(f"engine serve did not start:\n{log}") from None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        path = self.directory / "engine.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (graceful), SIGKILL of the whole process group if that takes too long."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._stderr.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class SendResult:
    returncode: int
    cpu: float
    ended: float
    report: dict

    @property
    def started(self) -> float:
        """time.time() the injection began: its end less the elapsed time the generator measured."""
        return self.ended - float(self.report.get("elapsed_s", 0.0))


def send(
    port: int,
    to: Sequence[str],
    count: int,
    concurrency: int,
    size: int,
    headers: Sequence[str] = (),
    sender: str = "loadgen@bench.test",
) -> SendResult:
    """Runs `engine send` to the end; its CPU (the whole process, start-up included) comes from wait4."""
    with tempfile.TemporaryDirectory(prefix="bench-send-") as directory:
        report_path = Path(directory) / "report.json"
        command = engine_command(
            "send",
            "--server",
            f"127.0.0.1:{port}",
            "--count",
            str(count),
            "--concurrency",
            str(concurrency),
            "--size",
            str(size),
            "--from",
            sender,
            "--quiet",
            "--json",
            str(report_path),
            *(arg for address in to for arg in ("--to", address)),
            *(arg for header in headers for arg in ("--header", header)),
        )
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        ended = time.time()
        process.returncode = os.waitstatus_to_exitcode(status)
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return SendResult(process.returncode, usage.ru_utime + usage.ru_stime, ended, report)
