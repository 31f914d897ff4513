"""Operator commands over the admin API: `engine queues|suspend|resume|bounce|suppress|top`.

Plain HTTP with the standard library, so they work from any host that can reach the admin listener.
`--admin URL` and `--token` default to $ENGINE_ADMIN_URL and $ENGINE_ADMIN_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_ADMIN = "http://127.0.0.1:8025"
TIMEOUT = 15.0


class OperatorError(Exception):
    """The admin API refused the request or could not be reached; the text says why."""


class AdminClient:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def request(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise OperatorError(f"HTTP {error.code}: {_error_text(error)}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise OperatorError(f"cannot reach the admin API at {self.url}: {reason}") from None


def _error_text(error: urllib.error.HTTPError) -> str:
    raw = error.read()
    try:
        return json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace").strip() or error.reason


# --- formatting -------------------------------------------------------------------------------------


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.2f}s"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def queue_table(rows: list[dict]) -> str:
    return table(
        ["LANE", "DOMAIN", "QUEUED", "READY", "DEFERRED", "SUSPENDED", "OLDEST"],
        [
            [
                r["lane"],
                r["domain"],
                r["queued"],
                r["ready"],
                r["deferred"],
                r["suspended"],
                human_duration(r["oldest_age"]),
            ]
            for r in rows
        ],
    )


def suspension_table(rules: list[dict]) -> str:
    now = time.time()
    return table(
        ["ID", "LANE", "DOMAIN", "CAMPAIGN", "TENANT", "ENDS IN", "REASON"],
        [
            [
                r["id"],
                r["lane"] or "*",
                r["domain"] or "*",
                r["campaign"] or "*",
                r["tenant"] or "*",
                "resume" if r["until"] is None else human_duration(max(0.0, r["until"] - now)),
                r["reason"],
            ]
            for r in rules
        ],
    )


def render_top(overview: dict, width: int = 100) -> str:
    """One frame of `engine top`: the lanes, their deepest destinations, suspensions and alerts."""
    stamp = time.strftime("%H:%M:%S", time.localtime(overview["time"]))
    lines = [f"engine top - {overview['hostname']} - {stamp}", ""]
    lane_rows = []
    for lane in overview["lanes"]:
        success = "-" if lane["success_rate"] is None else f"{lane['success_rate']:.1%}"
        alerts = ",".join(sorted({a["severity"] for a in lane["alerts"]})) or "-"
        lane_rows.append(
            [
                lane["name"],
                f"{lane['workers']['alive']}/{lane['workers']['configured']}",
                f"{lane['rate']:.1f}",
                human_duration(lane["p50"]),
                human_duration(lane["p99"]),
                human_duration(lane["sla_latency"]),
                success,
                lane["queued"],
                alerts,
            ]
        )
    lines.append(table(["LANE", "WORKERS", "MSGS/S", "P50", "P99", "SLA", "SUCCESS", "QUEUED", "ALERTS"], lane_rows))
    destinations = [row for lane in overview["lanes"] for row in lane["destinations"][:5]]
    lines += ["", "TOP DESTINATIONS", queue_table(destinations) if destinations else "(queues empty)"]
    if overview["suspensions"]:
        lines += ["", "SUSPENSIONS", suspension_table(overview["suspensions"])]
    if overview["alerts"]:
        lines += ["", "RECENT ALERTS"]
        for alert in overview["alerts"][:5]:
            when = time.strftime("%H:%M:%S", time.localtime(alert["timestamp"]))
            lines.append(f"{when} {alert['severity']} {alert['state']:<8} {alert['message']}")
    return "\n".join(line[:width] for line in "\n".join(lines).splitlines())


# --- commands ---------------------------------------------------------------------------------------


def _selectors(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ("lane", "domain", "campaign", "tenant") if getattr(args, name)}


def queues(client: AdminClient, args: argparse.Namespace) -> str:
    rows = client.request("GET", "/api/v1/queues", query={"lane": args.lane, "domain": args.domain})["queues"]
    if args.json:
        return json.dumps(rows, indent=2)
    return queue_table(rows) if rows else "no queued messages"


def suspend(client: AdminClient, args: argparse.Namespace) -> str:
    if args.list:
        return suspension_table(client.request("GET", "/api/v1/suspend")["suspensions"]) or "no suspensions"
    if not args.reason:
        raise OperatorError("--reason is required (it is logged with the suspension)")
    body = {**_selectors(args), "reason": args.reason}
    if args.duration:
        body["duration"] = args.duration
    rule = client.request("POST", "/api/v1/suspend", body)
    return f"suspended: {rule['id']}"


def resume(client: AdminClient, args: argparse.Namespace) -> str:
    client.request("DELETE", f"/api/v1/suspend/{urllib.parse.quote(args.id, safe='')}")
    return f"resumed: {args.id}"


def bounce(client: AdminClient, args: argparse.Namespace) -> str:
    answer = client.request("POST", "/api/v1/bounce", {**_selectors(args), "reason": args.reason})
    text = f"bounced {answer['bounced']} recipients"
    if answer.get("workers_unavailable"):
        text += f" (workers not reachable: {', '.join(answer['workers_unavailable'])})"
    return text


def suppress(client: AdminClient, args: argparse.Namespace) -> str:
    if args.action == "add":
        body = {"addresses": args.addresses, "tenant": args.tenant, "reason": args.reason}
        answer = client.request("POST", "/api/v1/suppression", {k: v for k, v in body.items() if v})
        return f"added {answer['added']}, already suppressed {answer['already']}"
    if args.action == "remove":
        for address in args.addresses:
            client.request("DELETE", "/api/v1/suppression", {"address": address, "tenant": args.tenant})
        return f"removed {len(args.addresses)}"
    answer = client.request("GET", "/api/v1/suppression", query={"tenant": args.tenant, "limit": args.limit})
    rows = [[e["address"], e["tenant"] or "*", e["reason"]] for e in answer["suppressions"]]
    return table(["ADDRESS", "TENANT", "REASON"], rows) + f"\n{answer['count']} in total"


def top(client: AdminClient, args: argparse.Namespace) -> str:
    if args.once:
        return render_top(client.request("GET", "/api/v1/overview"), shutil.get_terminal_size().columns)
    frames = 0
    try:
        while args.count is None or frames < args.count:
            frame = render_top(client.request("GET", "/api/v1/overview"), shutil.get_terminal_size().columns)
            sys.stdout.write("\x1b[H\x1b[2J" + frame + "\n")
            sys.stdout.flush()
            frames += 1
            if args.count is None or frames < args.count:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return ""


COMMANDS = {"queues": queues, "suspend": suspend, "resume": resume, "bounce": bounce, "suppress": suppress, "top": top}


def run(args: argparse.Namespace) -> int:
    """Entry point of the operator commands (the parser is built by engine.cli.add_operator_commands)."""
    client = AdminClient(args.admin, args.token)
    try:
        output = COMMANDS[args.command](client, args)
    except OperatorError as error:
        print(f"engine {args.command}: {error}", file=sys.stderr)
        return 1
    if output:
        print(output)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Adds the operator commands to the `engine` parser."""

    def operator(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--admin", default=os.environ.get("ENGINE_ADMIN_URL", DEFAULT_ADMIN), help="admin API URL")
        sub.add_argument("--token", default=os.environ.get("ENGINE_ADMIN_TOKEN"), help="bearer token")
        sub.set_defaults(run=run)
        return sub

    def with_selectors(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for name in ("lane", "domain", "campaign", "tenant"):
            sub.add_argument(f"--{name}")
        return sub

    sub = operator("queues", "queued messages per lane and destination")
    sub.add_argument("--lane")
    sub.add_argument("--domain")
    sub.add_argument("--json", action="store_true", help="print the rows as JSON")

    sub = with_selectors(operator("suspend", "stop delivering matching messages until resumed (or --list)"))
    sub.add_argument("--duration", help="e.g. 30m; default: until `engine resume`")
    sub.add_argument("--reason")
    sub.add_argument("--list", action="store_true", help="list active suspensions")

    sub = operator("resume", "end a suspension")
    sub.add_argument("id")

    sub = with_selectors(operator("bounce", "bounce queued messages (AdminBounce records)"))
    sub.add_argument("--reason", required=True)

    sub = operator("suppress", "the suppression list of bulk mail")
    sub.add_argument("action", choices=["add", "remove", "list"])
    sub.add_argument("addresses", nargs="*")
    sub.add_argument("--tenant")
    sub.add_argument("--reason")
    sub.add_argument("--limit", type=int, default=100)

    sub = operator("top", "live view of the lanes")
    sub.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    sub.add_argument("--count", type=int, help="stop after N frames")
    sub.add_argument("--once", action="store_true", help="print one frame without clearing the screen")
