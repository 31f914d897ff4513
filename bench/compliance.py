"""What bulk lane compliance costs per recipient, next to the DKIM signature every copy needs anyway.

    python -m bench.compliance [--quick]

Measured in one run: unsubscribe token, List-Unsubscribe fields spliced into a 2 KB message, a
suppression lookup in a list of N addresses (LMDB, fresh read transaction each), token verification,
bounce classification of a typical reply; the baseline is an RSA-2048 DKIM signature of the same
message (engine.signing). Times are CPU seconds of this thread, median of batches.
Writes bench/results/compliance.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.bounces import BounceClassifier
from engine.compliance import make_token, unsubscribe_fields, verify_token
from engine.config import ListUnsubscribe
from engine.message import split_message
from engine.signing import DkimSigner, generate_key
from engine.suppression import SuppressionList

RESULTS = Path(__file__).parent / "results" / "compliance.json"
SECRET = b"bench-secret"
SETTING = ListUnsubscribe("unsubscribe@bench.example.net", "https://bench.example.net/unsubscribe/{token}")
MESSAGE = (
    b"From: News <news@bench.example.net>\r\nTo: list@bench.example.net\r\nSubject: Monthly news\r\n"
    b"Date: Sun, 29 Nov 2026 02:00:00 +0000\r\nMessage-ID: <1@bench.example.net>\r\n\r\n"
    + b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    * 24
)


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    key_file: Path
    algorithm: str


def cpu_per_call(func: Callable[[], object], batch_seconds: float, batches: int) -> float:
    """Median CPU seconds per call over `batches` batches of about `batch_seconds` each."""
    calls = 1
    while True:
        start = time.thread_time()
        for _ in range(calls):
            func()
        if time.thread_time() - start >= batch_seconds / 10:
            break
        calls *= 2
    per_call = []
    for _ in range(batches):
        start = time.thread_time()
        for _ in range(calls):
            func()
        per_call.append((time.thread_time() - start) / calls)
    return statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: smaller list, fewer batches")
    args = parser.parse_args()
    batch, batches, listed = (0.05, 3, 10_000) if args.quick else (0.3, 7, 200_000)
    with tempfile.TemporaryDirectory() as directory:
        key_file = Path(directory) / "bench.pem"
        generate_key("bench.example.net", "s2026", "rsa-sha256", key_file)
        signer = DkimSigner.from_config(
            {"bench.example.net": Key("bench.example.net", "s2026", key_file, "rsa-sha256")}
        )
        suppressed = SuppressionList(Path(directory) / "suppression")
        for start in range(0, listed, 10_000):
            suppressed.add_many([f"user{n}@example.org" for n in range(start, start + 10_000)], "acme", "bench")
        block, rest = split_message(MESSAGE)
        token = make_token(SECRET, "user1@example.org", "acme", "spring")
        classifier = BounceClassifier()
        timings = {
            "dkim_sign_rsa2048 (baseline)": lambda: signer.sign(MESSAGE),
            "token": lambda: make_token(SECRET, "user1@example.org", "acme", "spring"),
            "token + fields + splice": lambda: (
                block + unsubscribe_fields(SETTING, make_token(SECRET, "user1@example.org", "acme", "spring")) + rest
            ),
            f"suppression lookup (hit, {listed} listed)": lambda: suppressed.contains("user77@example.org", "acme"),
            f"suppression lookup (miss, {listed} listed)": lambda: suppressed.contains("nobody@example.org", "acme"),
            "verify_token": lambda: verify_token(SECRET, token),
            "classify bounce": lambda: classifier.classify(550, "5.7.1", "Message rejected: policy violation"),
        }
        results = {name: cpu_per_call(func, batch, batches) * 1e6 for name, func in timings.items()}
        suppressed.close()
    baseline = results["dkim_sign_rsa2048 (baseline)"]
    compliance = results["token + fields + splice"] + results[f"suppression lookup (miss, {listed} listed)"]
    print(f"{'operation':45} {'us/call':>10} {'x baseline':>11}")
    for name, micros in results.items():
        print(f"{name:45} {micros:10.2f} {micros / baseline:11.3f}")
    print(
        f"\ncompliance work per bulk recipient: {compliance:.1f} us = {compliance / baseline:.1%} of one DKIM signature"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "quick": args.quick,
                "listed": listed,
                "us_per_call": results,
                "compliance_per_recipient_us": compliance,
                "ratio_to_dkim_sign": compliance / baseline,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
