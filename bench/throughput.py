"""End-to-end relay throughput: `engine send` → MTA → `engine sink`, counted at the sink, fsync on.

    python -m bench.throughput [--quick] [--workload W1 ...] [--workers 1,2] [--peer postfix] [--profile [wall|cpu]]

Workloads (20 injecting sessions each):
  W1  2 KB, one recipient                      20,000 messages (2,000 with --quick)
  W3  2 KB, 10 recipients at 10 domains          5,000 messages (500)
  W4  100 KB, DKIM rsa-sha256 at reception       5,000 messages (500)

msgs/s runs from the start of injection to the arrival of the last recipient at the sink (interpolated
between the sink's 0.2 s counter samples). MTA CPU is utime+stime of every process of the MTA (the
engine's supervisor and workers, or every Postfix daemon of the private instance), read from /proc
before and after; sink and generator CPU are reported too, because on a small machine all three compete
for the same cores. `--peer postfix` runs the same workloads through a private Postfix instance in the
same run and prints engine/Postfix ratios. `--profile` adds a run of the first workload asked for (W1 by
default) with py-spy recording the transactional worker and prints where its time goes. Writes
bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    RESULTS_DIR,
    Column,
    EngineServer,
    PeakMemory,
    Sink,
    engine_command,
    free_port,
    print_table,
    send,
    tree_cpu,
    tree_pids,
    wait_idle,
    write_results,
)
from bench.peers import PostfixRelay, postfix_available, postfix_version

CONCURRENCY = 20
DKIM_DOMAIN = "bench.test"
DKIM_SELECTOR = "bench"
TARGETS = {"W1": 3000.0, "W3": 1500.0, "W4": 1000.0}
TARGET_CPU_MS = {"W1": 0.4}
TARGET_PEER_RATIO = {"W1": 4.0}


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    count: int
    quick_count: int
    size: int
    to: tuple[str, ...]
    dkim: bool = False

    @property
    def recipients(self) -> int:
        return len(self.to)

    def headers(self) -> list[str]:
        return [f"From: <sender@{DKIM_DOMAIN}>"] if self.dkim else []


WORKLOADS = {
    w.name: w
    for w in (
        Workload("W1", "2 KB, 1 recipient", 20_000, 2_000, 2048, ("u{n}@d0.test",)),
        Workload(
            "W3", "2 KB, 10 recipients at 10 domains", 5_000, 500, 2048, tuple(f"u{{n}}@d{i}.test" for i in range(10))
        ),
        Workload("W4", "100 KB, DKIM rsa-sha256", 5_000, 500, 100 * 1024, ("u{n}@d0.test",), dkim=True),
    )
}


def engine_config(port: int, sink_port: int, workers: int, key_file: Path | None) -> str:
    dkim = (
        f'[dkim."{DKIM_DOMAIN}"]\nselector = "{DKIM_SELECTOR}"\nkey_file = "{key_file}"\nalgorithm = "rsa-sha256"\n'
        if key_file
        else ""
    )
    return f"""
[engine]
hostname = "mta.bench.test"
spool_dir = "spool"
log_dir = "logs"

[admin]
listen = "127.0.0.1:{free_port()}"

[routes]
"*" = "127.0.0.1:{sink_port}"

[[listeners]]
name = "tx"
listen = "127.0.0.1:{port}"
lane = "transactional"

[lanes.transactional]
workers = {workers}

{dkim}"""


def dkim_key(directory: Path) -> Path:
    """An RSA key made by `engine dkim keygen`, as an operator would make one."""
    out = directory / f"{DKIM_DOMAIN}.{DKIM_SELECTOR}.pem"
    command = engine_command(
        "dkim", "keygen", DKIM_DOMAIN, DKIM_SELECTOR, "--algorithm", "rsa-sha256", "--out", str(out)
    )
    subprocess.run(command, check=True, capture_output=True)
    return out


def drive(mta: str, root: int, port: int, sink: Sink, workload: Workload, count: int, timeout: float) -> dict:
    """Injects `count` messages into 127.0.0.1:`port` and waits for every recipient at the sink; CPU of
    the MTA tree under `root`, of the sink and of the generator; peak memory of the MTA tree."""
    expected = count * workload.recipients
    wait_idle(root)
    cpu_mta, cpu_sink = tree_cpu(root), tree_cpu(sink.pid)
    with PeakMemory({"mta": root}) as memory:
        result = send(port, workload.to, count, CONCURRENCY, workload.size, workload.headers())
        arrived = sink.wait_recipients(expected, timeout)
    cpu_mta, cpu_sink = tree_cpu(root) - cpu_mta, tree_cpu(sink.pid) - cpu_sink
    messages, recipients = sink.received
    row = {
        "workload": workload.name,
        "mta": mta,
        "messages": count,
        "recipients": expected,
        "injected": result.report.get("sent", 0),
        "injection_failed": result.report.get("failed_by_code", {}),
        "sink_transactions": messages,
        "sink_recipients": recipients,
        "complete": arrived is not None and result.returncode == 0,
        "mta_cpu_s": cpu_mta,
        "mta_cpu_ms_per_msg": cpu_mta / count * 1e3,
        "sink_cpu_ms_per_msg": cpu_sink / count * 1e3,
        "generator_cpu_ms_per_msg": result.cpu / count * 1e3,
        "injection_msgs_per_s": result.report.get("messages_per_second"),
        "peak_rss_mb": memory.peak_rss["mta"] / 2**20,
        "peak_pss_mb": memory.peak_pss["mta"] / 2**20,
        "processes": len(tree_pids(root)),
    }
    if arrived is not None:
        row["seconds"] = arrived - result.started
        row["mta_cpu_busy"] = cpu_mta / row["seconds"]
        row["msgs_per_s"] = count / row["seconds"]
        row["recipients_per_s"] = expected / row["seconds"]
    return row


def run_engine(
    workload: Workload, count: int, workers: int, timeout: float, profile: tuple[Path, str] | None = None
) -> dict:
    sink = Sink()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-dkim-") as keys:
            key_file = dkim_key(Path(keys)) if workload.dkim else None
            port = free_port()
            engine = EngineServer(engine_config(port, sink.port, workers, key_file), port)
            try:
                spy = _start_profiler(engine.pid, *profile) if profile else None
                row = drive(
                    f"engine, {workers} tx worker{'s' * (workers > 1)}",
                    engine.pid,
                    port,
                    sink,
                    workload,
                    count,
                    timeout,
                )
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
            finally:
                engine.stop()
    finally:
        sink.stop()
    row["workers"] = workers
    return row


def run_postfix(workload: Workload, count: int, timeout: float) -> dict:
    sink = Sink()
    try:
        with PostfixRelay(sink.port) as postfix:
            row = drive(f"postfix {postfix_version()}", postfix.pid, postfix.port, sink, workload, count, timeout)
    finally:
        sink.stop()
    if workload.dkim:
        row["mta"] += " (unsigned)"
    return row


def _transactional_worker(supervisor: int) -> int:
    """Pid of the first transactional worker under the supervisor, by its command line."""
    for pid in tree_pids(supervisor):
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"worker" in command and b"transactional" in command:
            return pid
    raise RuntimeError("no transactional worker found")


def _start_profiler(supervisor: int, out: Path, mode: str) -> subprocess.Popen:
    """py-spy on the transactional worker, writing collapsed stacks on SIGINT. "wall": every thread, idle
    time included, so a function's share of a thread's samples is its share of that thread's wall time.
    "cpu": only the thread holding the GIL, so shares are of the Python CPU time."""
    command = ["py-spy", "record", "--pid", str(_transactional_worker(supervisor)), "--rate", "200"]
    command += ["--threads", "--idle"] if mode == "wall" else ["--gil"]
    command += ["--nonblocking", "--format", "raw", "--output", str(out)]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return spy


def summarise_profile(path: Path, top: int = 40) -> dict:
    """Per thread: its samples, and the functions on top of its stack (self) and anywhere on it (inclusive),
    as percentages of that thread's samples. Lines are "thread (ID): NAME;frame;frame COUNT"."""
    threads: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        thread, *frames = stack.split(";") if stack.startswith("thread (") else ("GIL holder", *stack.split(";"))
        name = thread.partition(": ")[2] or thread
        entry = threads.setdefault(name, {"samples": 0, "self": Counter(), "inclusive": Counter()})
        samples = int(count)
        entry["samples"] += samples
        short = [_short(frame) for frame in frames] or ["(no Python frame)"]
        entry["self"][short[-1]] += samples
        for frame in set(short):
            entry["inclusive"][frame] += samples
    return {
        name: {
            "samples": entry["samples"],
            "self": [(f, n / entry["samples"] * 100) for f, n in entry["self"].most_common(top)],
            "inclusive": [(f, n / entry["samples"] * 100) for f, n in entry["inclusive"].most_common(top)],
        }
        for name, entry in sorted(threads.items(), key=lambda item: -item[1]["samples"])
    }


def _short(frame: str) -> str:
    """'func (path/to/module.py:12)' → 'func (module.py)': lines split one function into many rows."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')').rpartition(':')[0]).name})" if where else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (a tenth of the messages)")
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="default: all")
    parser.add_argument("--workers", default="1,2", help="transactional worker counts to try (default 1,2)")
    parser.add_argument("--count", type=int, help="messages per run (overrides the workload's)")
    parser.add_argument("--peer", action="append", choices=["postfix"], default=[], help="run the same through a peer")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="wall",
        choices=["wall", "cpu"],
        help="also profile the engine's worker under the first --workload (default W1) with py-spy: wall time per "
        "thread (default) or GIL CPU",
    )
    parser.add_argument("--out", type=Path, help="JSON results file (default bench/results/throughput.json)")
    args = parser.parse_args()
    workers = [int(n) for n in args.workers.split(",")]
    if "postfix" in args.peer and not postfix_available():
        parser.error("--peer postfix needs Debian's postfix package: apt-get install -y postfix")

    load = os.getloadavg()
    rows = []
    for name in args.workload or sorted(WORKLOADS):
        workload = WORKLOADS[name]
        count = args.count or (workload.quick_count if args.quick else workload.count)
        timeout = 60.0 + count * workload.recipients / 100
        for n in workers:
            rows.append(run_engine(workload, count, n, timeout))
            _progress(rows[-1])
        if "postfix" in args.peer:
            rows.append(run_postfix(workload, count, timeout))
            _progress(rows[-1])
    profile = None
    if args.profile:
        raw = RESULTS_DIR / f"throughput-profile-{args.profile}.txt"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        workload = WORKLOADS[(args.workload or ["W1"])[0]]
        count = args.count or (workload.quick_count if args.quick else workload.count)
        timeout = 60.0 + count * workload.recipients / 100
        profiled = run_engine(workload, count, 1, timeout, profile=(raw, args.profile))
        profile = {
            "workload": workload.name,
            "mode": args.profile,
            "run": profiled,
            "raw": str(raw),
            "threads": summarise_profile(raw),
        }
    ratios = peer_ratios(rows)
    report(rows, ratios, profile)
    payload = {
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "load_average_at_start": load,
        "concurrency": CONCURRENCY,
        "rows": rows,
        "ratios": ratios,
        "profile": profile,
    }
    write_results("throughput", payload, args.out)


def _progress(row: dict) -> None:
    rate = f"{row['msgs_per_s']:,.0f} msgs/s" if "msgs_per_s" in row else "INCOMPLETE"
    print(f"  {row['workload']} {row['mta']}: {rate}, {row['mta_cpu_ms_per_msg']:.3f} ms CPU/msg", flush=True)


def peer_ratios(rows: list[dict]) -> list[dict]:
    """engine/peer msgs/s and peer/engine CPU per message, for every engine row that has a peer row."""
    ratios = []
    for peer in (r for r in rows if not r["mta"].startswith("engine") and "msgs_per_s" in r):
        for ours in (r for r in rows if r["workload"] == peer["workload"] and r["mta"].startswith("engine")):
            if "msgs_per_s" not in ours:
                continue
            ratios.append(
                {
                    "workload": ours["workload"],
                    "engine": ours["mta"],
                    "peer": peer["mta"],
                    "throughput_ratio": ours["msgs_per_s"] / peer["msgs_per_s"],
                    "cpu_ratio": peer["mta_cpu_ms_per_msg"] / ours["mta_cpu_ms_per_msg"],
                    "target": TARGET_PEER_RATIO.get(ours["workload"]),
                }
            )
    return ratios


def _verdict(row: dict) -> str:
    if not row["complete"]:
        return f"INCOMPLETE ({row['sink_recipients']}/{row['recipients']} recipients at the sink)"
    if not row["mta"].startswith("engine"):
        return ""
    notes = []
    if (target := TARGETS.get(row["workload"])) is not None:
        notes.append(f">= {target:,.0f}/s {'met' if row['msgs_per_s'] >= target else 'MISSED'}")
    if (cpu := TARGET_CPU_MS.get(row["workload"])) is not None:
        notes.append(f"<= {cpu} ms {'met' if row['mta_cpu_ms_per_msg'] <= cpu else 'MISSED'}")
    return ", ".join(notes)


def report(rows: list[dict], ratios: list[dict], profile: dict | None) -> None:
    print(f"\n{os.cpu_count()} CPUs; generator, MTA and sink share them. {CONCURRENCY} injecting sessions, fsync on.")
    for row in rows:
        row["verdict"] = _verdict(row)
        row["title"] = WORKLOADS[row["workload"]].title
    print_table(
        [
            Column("workload", "workload", "<4"),
            Column("MTA", "mta", "<30"),
            Column("messages", "messages", ">8"),
            Column("msgs/s", "msgs_per_s", ">8,.0f"),
            Column("rcpts/s", "recipients_per_s", ">8,.0f"),
            Column("MTA ms/msg", "mta_cpu_ms_per_msg", ">10.3f"),
            Column("MTA busy", "mta_cpu_busy", ">.0%"),
            Column("sink", "sink_cpu_ms_per_msg", ">6.3f"),
            Column("gen", "generator_cpu_ms_per_msg", ">6.3f"),
            Column("RSS MB", "peak_rss_mb", ">7.0f"),
            Column("PSS MB", "peak_pss_mb", ">7.0f"),
            Column("target", "verdict", "<30"),
        ],
        rows,
    )
    if ratios:
        print()
        for ratio in ratios:
            ratio["verdict"] = (
                ""
                if ratio["target"] is None
                else f">= {ratio['target']:.0f}x {'met' if ratio['throughput_ratio'] >= ratio['target'] else 'MISSED'}"
            )
        print_table(
            [
                Column("workload", "workload", "<4"),
                Column("engine", "engine", "<24"),
                Column("peer", "peer", "<24"),
                Column("msgs/s ratio", "throughput_ratio", ">12.2f", "x"),
                Column("CPU/msg ratio", "cpu_ratio", ">13.2f", "x"),
                Column("target", "verdict", "<16"),
            ],
            ratios,
        )
    if profile:
        run = profile["run"]
        print(
            f"\npy-spy on the transactional worker under {profile['workload']} "
            f"({run.get('msgs_per_s', 0):,.0f} msgs/s while sampled), "
            + ("wall-time shares per thread, idle included" if profile["mode"] == "wall" else "shares of GIL time")
            + f"; raw stacks in {profile['raw']}"
        )
        for name, thread in profile["threads"].items():
            print(f"  {name} ({thread['samples']} samples), top by self time:")
            for function, share in thread["self"][:12]:
                print(f"    {share:5.1f}%  {function}")
            print("    top by inclusive time, below the frames every sample shares with the event loop:")
            outer = thread["inclusive"][0][1] if thread["inclusive"] else 0
            for function, share in [item for item in thread["inclusive"] if item[1] < outer][:12]:
                print(f"    {share:5.1f}%  {function}")


if __name__ == "__main__":
    main()
