"""Interference: does a bulk blast delay transactional mail? Lanes against one shared lane, in one run.

    python -m bench.interference [--quick] [--bulk N] [--transactional N]

One destination domain served by a recording `engine sink`, shaped to 200 msgs/s per egress source. A
50,000-message bulk blast (5,000 with --quick) goes in through the bulk listener (`engine send`, several
sessions); once the sink sees it arriving, 200 transactional messages (50) follow at 20/s through the
transactional listener, each stamped with the time its injection began. Latency is that stamp to the
"received" time the sink recorded; bulk throughput is bulk messages per second at the sink.

  lanes     transactional and bulk lanes, egress tx-1 (127.0.0.3) and bulk-1 (127.0.0.4), own buckets
  one-lane  both listeners on one lane with one egress source: the seed's shared MTA (the baseline)

Targets: transactional p99 <= 50 ms with lanes, while the baseline shows the delay; bulk keeps its shaped
rate. Writes bench/results/interference.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import smtplib
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    Column,
    EngineServer,
    engine_command,
    free_port,
    print_table,
    send,
    wait_for_port,
    write_results,
)
from tests.harness import engine_toml, listener

DOMAIN = "dest.test"
RATE = 200  # msgs/s per egress source and destination
TX_RATE = 20  # transactional messages per second
BULK_SESSIONS = 8
BULK_SIZE = 1024
TARGET_P99_MS = 50.0


def engine_config(layout: str, admin_port: int, sink_port: int, tx_port: int, bulk_port: int) -> str:
    """`lanes`: each listener on its own lane and egress source; `one-lane`: both on the transactional lane."""
    separate = layout == "lanes"
    egress = {"tx-1": {"source_address": "127.0.0.3", "ehlo_name": "tx1.bench.test"}}
    lanes = {"transactional": {"egress_pool": ["tx-1"]}}
    if separate:
        egress["bulk-1"] = {"source_address": "127.0.0.4", "ehlo_name": "bulk1.bench.test"}
        lanes["bulk"] = {"egress_pool": ["bulk-1"]}
    return engine_toml(
        hostname="mta.bench.test",
        secret="bench-interference-secret",
        admin=admin_port,
        routes={DOMAIN: f"127.0.0.1:{sink_port}"},
        listeners=[
            listener("tx", tx_port, "transactional"),
            listener("bulk", bulk_port, "bulk" if separate else "transactional"),
        ],
        lanes=lanes,
        egress=egress,
        shaping={"max_message_rate": f"{RATE}/s"},
    )


class RecordingSink:
    """`engine sink --record DIR` with its counters read on a thread (bench.common.Sink does not record)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        command = engine_command(
            "sink", "--listen", "127.0.0.1:0", "--record", str(directory), "--stats-interval", "0.25"
        )
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.port = int(json.loads(self.process.stdout.readline())["listening"].rpartition(":")[2])
        self.messages = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.messages = json.loads(line)["messages"]

    def wait_messages(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.messages < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                return False
            time.sleep(0.1)
        return True

    def arrivals(self) -> tuple[list[float], list[float], dict[str, list[str]]]:
        """Bulk arrival times, transactional latencies, and the source addresses each kind came from."""
        bulk, latencies = [], []
        peers: dict[str, set[str]] = {"transactional": set(), "bulk": set()}
        for path in self.directory.glob("*.json"):
            envelope = json.loads(path.read_text())
            if envelope["recipients"][0].startswith("tx-"):
                message = path.with_suffix(".eml").read_bytes()
                sent = float(message.split(b"X-Bench-Sent: ", 1)[1].split(b"\r\n", 1)[0])
                latencies.append(envelope["received"] - sent)
                peers["transactional"].add(envelope["peer"])
            else:
                bulk.append(envelope["received"])
                peers["bulk"].add(envelope["peer"])
        return sorted(bulk), sorted(latencies), {kind: sorted(found) for kind, found in peers.items()}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)
        self._reader.join(5)


def send_transactional(port: int, number: int) -> None:
    """One message over its own SMTP session, stamped with the time its injection began."""
    started = time.time()
    body = (
        f"From: <app@sender.test>\r\nTo: <tx-{number}@{DOMAIN}>\r\nSubject: reset {number}\r\n"
        f"X-Bench-Sent: {started!r}\r\n\r\nYour code is {number:06d}.\r\n"
    )
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("app@sender.test", [f"tx-{number}@{DOMAIN}"], body.encode())


def transactional_stream(port: int, count: int) -> None:
    """`count` messages at TX_RATE a second, on schedule even when one session is slow."""
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = []
        for number in range(count):
            time.sleep(max(0.0, start + number / TX_RATE - time.monotonic()))
            futures.append(pool.submit(send_transactional, port, number))
        for future in futures:
            future.result()


def rank(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def run_configuration(name: str, bulk: int, transactional: int) -> dict:
    """One run of the layout `name` (see engine_config)."""
    tx_port, bulk_port = free_port(), free_port()
    directory = Path(tempfile.mkdtemp(prefix=f"bench-interference-{name}-"))
    sink = RecordingSink(directory / "sink")
    config = engine_config(name, free_port(), sink.port, tx_port, bulk_port)
    engine = EngineServer(config, tx_port)
    try:
        wait_for_port(bulk_port, 30, lambda: engine.process.poll() is None)
        blast_started = time.time()
        results: dict[str, object] = {}
        blaster = threading.Thread(
            target=lambda: results.setdefault(
                "send", send(bulk_port, [f"b{{n}}@{DOMAIN}"], bulk, BULK_SESSIONS, BULK_SIZE, ["X-Bench: bulk"])
            )
        )
        blaster.start()
        if not sink.wait_messages(min(RATE, bulk // 10), 60):
            raise RuntimeError(f"{name}: bulk delivery never started:\n{engine.log_text()}")
        transactional_stream(tx_port, transactional)
        delivered_when_tx_done = sink.messages
        blaster.join()
        blast = results["send"]
        if blast.report.get("sent") != bulk:
            raise RuntimeError(f"{name}: the bulk blast was not fully accepted: {blast.report}")
        total = bulk + transactional
        if not sink.wait_messages(total, bulk / RATE * 2 + 120):
            raise RuntimeError(f"{name}: {sink.messages} of {total} messages arrived:\n{engine.log_text()}")
        bulk_times, latencies, peers = sink.arrivals()
    finally:
        engine.stop()
        sink.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "configuration": name,
        "bulk": bulk,
        "transactional": transactional,
        "tx_p50_ms": rank(latencies, 50) * 1000,
        "tx_p99_ms": rank(latencies, 99) * 1000,
        "tx_max_ms": latencies[-1] * 1000,
        "bulk_msgs_per_s": (len(bulk_times) - 1) / (bulk_times[-1] - bulk_times[0]),
        "bulk_drained_s": bulk_times[-1] - blast_started,
        "bulk_injection_msgs_per_s": blast.report["messages_per_second"],
        "sink_messages_when_tx_done": delivered_when_tx_done,
        "tx_from": ",".join(peers["transactional"]),
        "bulk_from": ",".join(peers["bulk"]),
    }


COLUMNS = [
    Column("configuration", "configuration", "<10"),
    Column("bulk", "bulk", ">6d"),
    Column("tx", "transactional", ">4d"),
    Column("tx p50", "tx_p50_ms", ">10.1f", " ms"),
    Column("tx p99", "tx_p99_ms", ">10.1f", " ms"),
    Column("tx max", "tx_max_ms", ">10.1f", " ms"),
    Column("bulk at sink", "bulk_msgs_per_s", ">8.1f", "/s"),
    Column("bulk drained", "bulk_drained_s", ">6.1f", " s"),
    Column("bulk injected", "bulk_injection_msgs_per_s", ">8.0f", "/s"),
    Column("at sink when tx done", "sink_messages_when_tx_done", ">6d"),
    Column("tx from", "tx_from", "<10"),
    Column("bulk from", "bulk_from", "<10"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 bulk and 50 transactional messages")
    parser.add_argument("--bulk", type=int, help="bulk messages (default 50,000, 5,000 with --quick)")
    parser.add_argument("--transactional", type=int, help="transactional messages (default 200, 50 with --quick)")
    args = parser.parse_args()
    bulk = args.bulk or (5_000 if args.quick else 50_000)
    transactional = args.transactional or (50 if args.quick else 200)
    rows = [
        run_configuration("lanes", bulk, transactional),
        run_configuration("one-lane", bulk, transactional),
    ]
    print(f"\n{bulk} bulk + {transactional} transactional messages to one domain, {RATE}/s per egress source")
    print_table(COLUMNS, rows)
    lanes, baseline = rows
    ratios = {
        "tx_p99_baseline_over_lanes": baseline["tx_p99_ms"] / lanes["tx_p99_ms"],
        "tx_p50_baseline_over_lanes": baseline["tx_p50_ms"] / lanes["tx_p50_ms"],
        "bulk_rate_lanes_over_baseline": lanes["bulk_msgs_per_s"] / baseline["bulk_msgs_per_s"],
        "bulk_rate_lanes_over_shaped": lanes["bulk_msgs_per_s"] / RATE,
    }
    print(
        f"\nbaseline/lanes: tx p99 {ratios['tx_p99_baseline_over_lanes']:.0f}x, "
        f"tx p50 {ratios['tx_p50_baseline_over_lanes']:.0f}x; "
        f"bulk rate lanes/baseline {ratios['bulk_rate_lanes_over_baseline']:.2f}, "
        f"lanes/shaped {ratios['bulk_rate_lanes_over_shaped']:.2f}"
    )
    met = lanes["tx_p99_ms"] <= TARGET_P99_MS
    print(f"target tx p99 <= {TARGET_P99_MS:.0f} ms with lanes: {'met' if met else 'NOT met'}")
    write_results(
        "interference",
        {
            "quick": args.quick,
            "rate_per_egress": RATE,
            "target_tx_p99_ms": TARGET_P99_MS,
            "target_met": met,
            "rows": rows,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
