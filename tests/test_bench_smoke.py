"""The throughput benchmark still runs end to end (a tiny W1), so the bench suite cannot silently rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_throughput_quick_w1_counts_every_message_at_the_sink(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    command = [sys.executable, "-m", "bench", "throughput", "--quick", "--workload", "W1"]
    command += ["--workers", "1", "--count", "200", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["complete"], row
    assert row["sink_recipients"] == row["injected"] == 200
    assert row["msgs_per_s"] > 0 and row["mta_cpu_s"] > 0
    assert "msgs/s" in done.stdout


def test_bench_lists_its_benchmarks_without_helpers() -> None:
    from bench.__main__ import benchmarks

    names = benchmarks()
    assert "throughput" in names and "delivery" in names
    assert not {"common", "peers"} & set(names)
