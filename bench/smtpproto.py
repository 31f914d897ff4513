"""Per-call time of the SMTP hot-path codec, compiled (engine._smtpproto) against its pure-Python twin.

The twin is the baseline measured in the same run; the ratio says how much the compiled module saves per
message. Run: python -m bench.smtpproto [--quick]
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from types import ModuleType

from bench.common import Column, print_table, write_results
from engine import _smtpproto, _smtpproto_py

HEADERS = b"From: sender@example.com\r\nTo: user@example.net\r\nSubject: bench\r\nMessage-ID: <1@example.com>\r\n\r\n"
PIPELINED = b"MAIL FROM:<sender@example.com>\r\n"


def _message(size: int) -> bytes:
    """Header plus 78-octet text lines, one in twenty starting with a dot, about `size` octets."""
    lines = [HEADERS]
    index = 0
    while sum(map(len, lines)) < size:
        lead = b"." if index % 20 == 0 else b"T"
        lines.append(lead + b"he quick brown fox jumps over the lazy dog %05d, again and again...\r\n" % index)
        index += 1
    return b"".join(lines)


def _receive(proto: ModuleType, wire: bytearray) -> Callable[[], object]:
    def run() -> object:
        end = proto.find_data_end(wire, 0)
        return proto.decode_data(wire, end - 3, 1000)

    return run


def _cases(proto: ModuleType) -> list[tuple[str, Callable[[], object]]]:
    small, large = _message(2048), _message(100 * 1024)
    argument = b"FROM:<sender@example.com> SIZE=2048 BODY=8BITMIME"
    return [
        ("find_data_end + decode_data, 2 KB", _receive(proto, bytearray(proto.encode_data(small) + PIPELINED))),
        ("find_data_end + decode_data, 100 KB", _receive(proto, bytearray(proto.encode_data(large) + PIPELINED))),
        ("parse_path, MAIL FROM with 2 params", lambda: proto.parse_path(argument, b"FROM:")),
        ("parse_path, RCPT TO", lambda: proto.parse_path(b"TO:<user@example.net>", b"TO:")),
        ("split_command", lambda: proto.split_command(b"RCPT TO:<user@example.net>")),
        ("encode_data, 2 KB", lambda: proto.encode_data(small)),
        ("encode_data, 100 KB", lambda: proto.encode_data(large)),
    ]


def _per_call(run: Callable[[], object], quick: bool) -> float:
    """Best of several repeats, in microseconds per call; each repeat lasts about 20 ms (5 ms quick)."""
    timer = timeit.Timer(run)
    number, elapsed = timer.autorange()
    number = max(1, int(number * (0.025 if quick else 0.1) / elapsed))
    return min(timer.repeat(repeat=3 if quick else 7, number=number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args()
    rows = []
    for (name, compiled), (_, python) in zip(_cases(_smtpproto), _cases(_smtpproto_py), strict=True):
        assert compiled() == python(), name
        rows.append({"case": name, "compiled_us": _per_call(compiled, args.quick)})
        rows[-1]["python_us"] = _per_call(python, args.quick)
        rows[-1]["ratio"] = rows[-1]["python_us"] / rows[-1]["compiled_us"]
    print_table(
        [
            Column("case", "case", "<40"),
            Column("compiled µs", "compiled_us", ">12.3f"),
            Column("pure µs (baseline)", "python_us", ">19.3f"),
            Column("pure / compiled", "ratio", ">15.1f", "x"),
        ],
        rows,
    )
    write_results("smtpproto", {"quick": args.quick, "rows": rows})


if __name__ == "__main__":
    main()
