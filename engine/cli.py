"""The `engine` command line (SPEC.md "Command line")."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import uvloop

from engine.operator import add_commands as add_operator_commands


def _check(args: argparse.Namespace) -> int:
    from engine.config import ConfigError
    from engine.supervisor import load_verified

    try:
        config = load_verified(args.config)
    except ConfigError as error:
        for line in error.errors:
            print(line, file=sys.stderr)
        return 1
    print(json.dumps(config.to_dict(), indent=2, default=str))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from engine.config import ConfigError
    from engine.supervisor import serve

    try:
        return serve(args.config)
    except ConfigError as error:
        for line in error.errors:
            print(line, file=sys.stderr)
        return 1


def _worker(args: argparse.Namespace) -> int:
    from engine.worker import run_worker

    fds = dict((name, int(fd)) for name, fd in (item.split("=", 1) for item in args.fd))
    return run_worker(args.config, args.lane, args.index, fds, args.control)


def _sink(args: argparse.Namespace) -> int:
    from engine.sink import parse_listen, parse_reply_rules, run_sink

    try:
        listen = parse_listen(args.listen)
        rules = parse_reply_rules(args.reply or "")
    except ValueError as error:
        print(f"engine sink: {error}", file=sys.stderr)
        return 2
    uvloop.run(run_sink(listen, args.record, rules, args.stats_interval))
    return 0


def _send(args: argparse.Namespace) -> int:
    from engine.loadgen import send_command

    return send_command(args)


def _dkim_keygen(args: argparse.Namespace) -> int:
    from engine.signing import generate_key

    out = args.out or Path(f"{args.domain}.{args.selector}.pem")
    name, value = generate_key(args.domain, args.selector, args.algorithm, out)
    print(f"private key written to {out}")
    print(f'{name}. IN TXT "{value}"')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description="Lane-separated outbound mail delivery engine")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("-c", "--config", type=Path, help="configuration file (default ./engine.toml)")
        return sub

    with_config(commands.add_parser("serve", help="run the supervisor and its lane workers")).set_defaults(run=_serve)
    with_config(commands.add_parser("check", help="validate and print the effective configuration")).set_defaults(
        run=_check
    )

    worker = with_config(commands.add_parser("worker"))  # started by the supervisor; no help: not listed
    worker.add_argument("--lane", required=True)
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--fd", action="append", default=[], help="LISTENER=FD of an inherited socket")
    worker.add_argument("--control", type=int, help="FD of the inherited control channel to the supervisor")
    worker.set_defaults(run=_worker)

    sink = commands.add_parser("sink", help="a fast SMTP sink for tests and benchmarks")
    sink.add_argument("--listen", required=True, help="HOST:PORT")
    sink.add_argument("--record", type=Path, help="write each message as DIR/NAME.eml (+ NAME.json envelope)")
    sink.add_argument("--reply", help="'GLOB=CODE [ENHANCED] [TEXT];...' answers for matching recipients")
    sink.add_argument("--stats-interval", type=float, help="print statistics as a JSON line every N seconds")
    sink.set_defaults(run=_sink)

    send = commands.add_parser("send", help="inject test mail and report throughput and latency")
    send.add_argument("--server", required=True, help="HOST:PORT")
    send.add_argument("--to", action="append", required=True, help="recipient; '{n}' becomes the message number")
    send.add_argument("--from", dest="sender", default="loadgen@localhost", help="envelope sender")
    send.add_argument("--count", type=int, default=1)
    send.add_argument("--concurrency", type=int, default=1)
    send.add_argument("--size", type=int, default=2048, help="message size in bytes")
    send.add_argument("--header", action="append", default=[], help="'Name: value' added to every message")
    send.add_argument("--quiet", action="store_true", help="no progress bar")
    send.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    send.set_defaults(run=_send)

    add_operator_commands(commands)

    dkim = commands.add_parser("dkim", help="DKIM key management")
    dkim_commands = dkim.add_subparsers(dest="dkim_command", required=True)
    keygen = dkim_commands.add_parser("keygen", help="write a private key and print its DNS TXT record")
    keygen.add_argument("domain")
    keygen.add_argument("selector")
    keygen.add_argument("--algorithm", choices=["rsa-sha256", "ed25519-sha256"], default="rsa-sha256")
    keygen.add_argument("--out", type=Path)
    keygen.set_defaults(run=_dkim_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
