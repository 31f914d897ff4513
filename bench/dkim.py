"""DKIM sign time per message: engine.signing against stock `dkim.sign`, measured in the same run.

    python -m bench.dkim [--quick] [--profile]

Times are CPU seconds of the signing thread (time.thread_time), median over batches, so that other
processes on a shared machine do not inflate them. "floor" is the bare private-key operation through
cryptography on a 32-byte digest: what no signer on this machine can beat. Writes bench/results/dkim.json.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from bench.common import Column, print_table, write_results
from engine import _dkimcanon_py, dkimcanon
from engine.signing import DkimSigner, generate_key

DOMAIN = "bench.example.net"
SELECTOR = "s2026"
SIZES = {"2KB": 2_000, "100KB": 100_000}
TARGETS_MS = {("rsa-sha256", "2KB"): 0.4, ("rsa-sha256", "100KB"): 0.8}
TARGET_RATIO = 10.0
LINE = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do  eiusmod tempor.\r\n"


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    key_file: Path
    algorithm: str


def build_message(body_size: int) -> bytes:
    head = (
        f"From: Sender <news@{DOMAIN}>\r\nTo: someone@example.org\r\nSubject: Monthly  news\r\n"
        f"Date: Sun, 29 Nov 2026 02:00:00 +0000\r\nMessage-ID: <bench.1@{DOMAIN}>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        f"List-Unsubscribe: <https://{DOMAIN}/u/1>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    ).encode()
    return head + b"\r\n" + LINE * (body_size // len(LINE))


def cpu_per_call(func: Callable[[], object], batch_seconds: float, batches: int) -> float:
    """Median CPU seconds per call over `batches` batches sized to take about `batch_seconds` each."""
    start = time.thread_time()
    func()
    calls = max(1, int(batch_seconds / max(time.thread_time() - start, 1e-6)))
    samples = []
    for _ in range(batches):
        start = time.thread_time()
        for _ in range(calls):
            func()
        samples.append((time.thread_time() - start) / calls)
    return statistics.median(samples)


def stock_key(key_file: Path, algorithm: str) -> bytes:
    """The private key in the form dkim.sign takes: PEM for RSA, the base64 seed for Ed25519."""
    pem = key_file.read_bytes()
    if algorithm == "rsa-sha256":
        return pem
    private = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw)


def stock_signing(signer: DkimSigner, msg: bytes, key_file: Path, algorithm: str) -> Callable[[], bytes]:
    """Stock dkim.sign over the same headers, canonicalisation and key as our signature."""
    signature = signer.sign(msg)
    assert signature is not None
    include = dkim.util.parse_tag_value(b"".join(signature.split(b":", 1)[1].split()))[b"h"]
    return partial(
        dkim.sign,
        msg,
        SELECTOR.encode(),
        DOMAIN.encode(),
        stock_key(key_file, algorithm),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include.split(b":"),
        signature_algorithm=algorithm.encode(),
    )


def floor_op(key_file: Path) -> Callable[[], object]:
    private = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    digest = bytes(32)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return lambda: private.sign(digest)
    return lambda: private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument("--profile", action="store_true", help="cProfile our RSA-2048 100 KB signing")
    args = parser.parse_args()
    batch_seconds, batches = (0.05, 3) if args.quick else (0.3, 7)

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for algorithm in ("rsa-sha256", "ed25519-sha256"):
            key_file = Path(directory) / f"{algorithm}.pem"
            generate_key(DOMAIN, SELECTOR, algorithm, key_file)
            signer = DkimSigner.from_config({DOMAIN: Key(DOMAIN, SELECTOR, key_file, algorithm)})
            floor = cpu_per_call(floor_op(key_file), batch_seconds, batches)
            for size_name, size in SIZES.items():
                msg = build_message(size)
                ours = cpu_per_call(partial(signer.sign, msg), batch_seconds, batches)
                theirs = cpu_per_call(stock_signing(signer, msg, key_file, algorithm), batch_seconds, batches)
                rows.append(
                    {
                        "algorithm": algorithm,
                        "body": size_name,
                        "ours_ms": ours * 1e3,
                        "stock_ms": theirs * 1e3,
                        "ratio": theirs / ours,
                        "floor_ms": floor * 1e3,
                        "target_ms": TARGETS_MS.get((algorithm, size_name)),
                    }
                )
            if args.profile and algorithm == "rsa-sha256":
                profile_signing(signer, build_message(SIZES["100KB"]))

    body = LINE * (SIZES["100KB"] // len(LINE))
    canon = {
        "compiled_us": cpu_per_call(lambda: dkimcanon.relaxed_body(body), batch_seconds, batches) * 1e6,
        "pure_us": cpu_per_call(lambda: _dkimcanon_py.relaxed_body(body), batch_seconds, batches) * 1e6,
        "dkimpy_us": cpu_per_call(lambda: dkim.canonicalization.Relaxed.canonicalize_body(body), batch_seconds, batches)
        * 1e6,
    }
    report(rows, canon)
    write_results("dkim", {"quick": args.quick, "sign": rows, "relaxed_body_100KB": canon})


def report(rows: list[dict], canon: dict[str, float]) -> None:
    for row in rows:
        target = row["target_ms"]
        if target is not None:
            fast = "met" if row["ours_ms"] <= target else "MISSED"
            ratio = "met" if row["ratio"] >= TARGET_RATIO else "MISSED"
            row["verdict"] = f"<= {target} ms {fast}, >= {TARGET_RATIO:.0f}x {ratio}"
    print_table(
        [
            Column("algorithm", "algorithm", "<16"),
            Column("body", "body", ">7"),
            Column("ours ms", "ours_ms", ">10.3f"),
            Column("stock ms", "stock_ms", ">10.3f"),
            Column("ratio", "ratio", ">7.1f", "x"),
            Column("floor ms", "floor_ms", ">10.3f"),
            Column("target", "verdict", "<"),
        ],
        rows,
    )
    print(
        f"\nrelaxed body canonicalisation, 100 KB: compiled {canon['compiled_us']:.0f} us, "
        f"pure twin {canon['pure_us']:.0f} us, dkimpy {canon['dkimpy_us']:.0f} us"
    )


def profile_signing(signer: DkimSigner, msg: bytes) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [signer.sign(msg) for _ in range(200)])
    print("cProfile, RSA-2048, 100 KB body, 200 signatures:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(10)


if __name__ == "__main__":
    main()
