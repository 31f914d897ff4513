"""The admin HTTP server of the supervisor (SPEC.md "Admin API"): /metrics, /api/v1/*, the dashboard at /,
and the one-click unsubscribe endpoint /unsubscribe/{token} (RFC 8058) that bulk mail links to.

Every /api/v1 call needs `Authorization: Bearer TOKEN` when `[admin] token` is set; /unsubscribe needs none
(the HMAC token is the credential). Errors are JSON objects `{"error": reason}`. Handlers read supervisor
state, write the shared suppression and complaint stores, or ask workers over their control channels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import html
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.admin.store import Rule
from engine.cluster.link import redacted
from engine.compliance import InvalidToken, verify_token
from engine.reputation import record_complaint
from engine.units import parse_duration

if TYPE_CHECKING:
    from engine.supervisor import Supervisor

API = "/api/v1"
DASHBOARD = Path(__file__).with_name("dashboard.html")
SUPERVISOR: web.AppKey[Supervisor] = web.AppKey("supervisor")
SELECTORS = ("lane", "domain", "campaign", "tenant")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def error_response(status: int, reason: str, **headers: str) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers or None)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error.status, error.reason)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(error.status, f"{error.reason}: {request.method} {request.path}")


def bearer_auth(token: str | None) -> Callable:
    expected = (token or "").encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and request.path.startswith(API):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
                reason = "missing bearer token" if not given else "wrong bearer token"
                return error_response(401, reason, **{"WWW-Authenticate": 'Bearer realm="engine"'})
        return await handler(request)

    return auth


def create_app(supervisor: Supervisor) -> web.Application:
    app = web.Application(middlewares=[json_errors, bearer_auth(supervisor.config.admin.token)])
    app[SUPERVISOR] = supervisor
    app.router.add_get("/", dashboard)
    app.router.add_get("/metrics", metrics)
    app.router.add_get(f"{API}/status", status)
    app.router.add_get(f"{API}/queues", queues)
    app.router.add_get(f"{API}/overview", overview)
    app.router.add_get(f"{API}/suspend", list_suspensions)
    app.router.add_post(f"{API}/suspend", suspend)
    app.router.add_delete(f"{API}/suspend/{{id}}", resume)
    app.router.add_post(f"{API}/bounce", bounce)
    app.router.add_get(f"{API}/suppression", list_suppressed)
    app.router.add_post(f"{API}/suppression", add_suppressed)
    app.router.add_delete(f"{API}/suppression", remove_suppressed)
    app.router.add_post(f"{API}/complaints", complaint)
    app.router.add_get("/unsubscribe/{token}", unsubscribe_page)
    app.router.add_post("/unsubscribe/{token}", unsubscribe)
    return app


# --- input ------------------------------------------------------------------------------------------


async def json_body(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    try:
        body = await request.json()
    except json.JSONDecodeError as error:
        raise ApiError(400, f"request body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return body


def optional_text(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"{name} must be a non-empty string")
    return value.strip()


def selectors(supervisor: Supervisor, body: dict) -> dict[str, str | None]:
    chosen = {name: optional_text(body, name) for name in SELECTORS}
    lane = chosen["lane"]
    if lane is not None and lane not in supervisor.config.lanes:
        raise ApiError(400, f"unknown lane {lane!r}; lanes: {', '.join(supervisor.config.lanes)}")
    if chosen["domain"] is not None:
        chosen["domain"] = chosen["domain"].lower().rstrip(".")
    return chosen


def required_reason(body: dict) -> str:
    reason = optional_text(body, "reason")
    if reason is None:
        raise ApiError(400, "reason is required: say why, it is logged with every affected message")
    return reason


def lane_query(supervisor: Supervisor, request: web.Request) -> str | None:
    lane = request.query.get("lane") or None
    if lane is not None and lane not in supervisor.config.lanes:
        raise ApiError(400, f"unknown lane {lane!r}; lanes: {', '.join(supervisor.config.lanes)}")
    return lane


# --- handlers ---------------------------------------------------------------------------------------


async def dashboard(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(DASHBOARD, headers={"Cache-Control": "no-cache"})


async def metrics(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    supervisor.metrics.set_queues(await supervisor.queues())
    return web.Response(
        body=generate_latest(supervisor.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def status(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    config, now, monotonic = supervisor.config, time.time(), time.monotonic()
    workers = []
    for slot in supervisor.slots:
        alive = slot.process is not None and slot.process.returncode is None
        workers.append(
            {
                "lane": slot.lane,
                "index": slot.index,
                "pid": slot.process.pid if alive else None,
                "alive": alive,
                "uptime": round(monotonic - slot.started, 3) if alive else None,
                "restarts": slot.restarts,
                "exit_codes": slot.history[-5:],
            }
        )
    return web.json_response(
        {
            "hostname": config.engine.hostname,
            "pid": os.getpid(),
            "uptime": round(now - supervisor.started, 3),
            "lanes": [
                {
                    "name": lane.name,
                    "workers": lane.workers,
                    "nice": lane.nice,
                    "egress_pool": list(lane.egress_pool),
                    "sla_latency": lane.sla_latency,
                    "sla_completion": lane.sla_completion,
                }
                for lane in config.lanes.values()
            ],
            "workers": workers,
            "listeners": [
                {"name": item.name, "protocol": item.protocol, "listen": str(item.listen), "lane": item.lane}
                for item in config.listeners
            ],
            "spool": supervisor.spool_sizes(),
            "suspensions": len(supervisor.suspensions.active()),
            "cluster": cluster_view(supervisor),
        }
    )


def cluster_view(supervisor: Supervisor) -> dict | None:
    """None for a lone node; else the Redis it shares state through (password hidden) and whether it is
    connected now (a node that lost Redis works alone until it is back)."""
    cluster = supervisor.cluster
    if cluster is None:
        return None
    return {"redis": redacted(cluster.url), "node": cluster.name, "joined": cluster.joined}


async def queues(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    lane = lane_query(supervisor, request)
    domain = (request.query.get("domain") or "").lower().rstrip(".") or None
    rows = [
        row
        for row in await supervisor.queues()
        if (lane is None or row["lane"] == lane) and (domain is None or row["domain"] == domain)
    ]
    return web.json_response({"queues": rows})


async def overview(request: web.Request) -> web.Response:
    """Everything the dashboard and `engine top` draw, in one call."""
    supervisor = request.app[SUPERVISOR]
    return web.json_response(await supervisor.overview())


async def list_suspensions(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    return web.json_response({"suspensions": [rule_view(rule) for rule in supervisor.suspensions.active()]})


async def suspend(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    body = await json_body(request, (*SELECTORS, "duration", "reason"))
    chosen = selectors(supervisor, body)
    reason = required_reason(body)
    duration = body.get("duration")
    if duration is not None:
        try:
            duration = parse_duration(duration)
        except ValueError as error:
            raise ApiError(400, f"duration: {error}") from None
        if duration <= 0:
            raise ApiError(400, "duration must be positive (leave it out to suspend until resumed)")
    rule = await supervisor.suspend(duration=duration, reason=reason, **chosen)
    return web.json_response(rule_view(rule), status=201)


async def resume(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    rule = await supervisor.resume(request.match_info["id"])
    if rule is None:
        raise ApiError(404, f"no active suspension with id {request.match_info['id']!r}")
    return web.json_response({**rule_view(rule), "resumed": True})


async def bounce(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    body = await json_body(request, (*SELECTORS, "reason"))
    chosen = selectors(supervisor, body)
    reason = required_reason(body)
    if not any(chosen.values()):
        raise ApiError(400, "refusing to bounce everything: give at least one of lane, domain, campaign, tenant")
    bounced, unavailable = await supervisor.bounce(reason=reason, **chosen)
    return web.json_response({"bounced": bounced, "workers_unavailable": unavailable})


async def list_suppressed(request: web.Request) -> web.Response:
    """?tenant= (that tenant's entries; all entries without it), ?address= (one entry), ?limit=, ?offset=."""
    suppressed = request.app[SUPERVISOR].suppression
    tenant = request.query.get("tenant") or None
    address = request.query.get("address")
    if address is not None:
        entry = await _blocking(suppressed.get, valid_address(address), tenant)
        if entry is None:
            raise ApiError(404, f"{address} is not suppressed{f' for tenant {tenant}' if tenant else ''}")
        return web.json_response(entry.as_dict())
    limit, offset = query_int(request, "limit", 100, 1, 10_000), query_int(request, "offset", 0, 0, None)
    entries = await _blocking(suppressed.list, tenant, limit, offset)
    total = await _blocking(suppressed.count, tenant)
    return web.json_response({"suppressions": [entry.as_dict() for entry in entries], "count": total})


async def add_suppressed(request: web.Request) -> web.Response:
    body = await json_body(request, ("address", "addresses", "tenant", "reason"))
    addresses = body.get("addresses", [])
    if not isinstance(addresses, list):
        raise ApiError(400, "addresses must be a list of strings")
    if "address" in body:
        addresses = [body["address"], *addresses]
    if not addresses:
        raise ApiError(400, "give address or addresses")
    checked = [valid_address(address) for address in addresses]
    tenant = optional_text(body, "tenant")
    reason = optional_text(body, "reason") or "added by operator"
    added = await _blocking(request.app[SUPERVISOR].suppression.add_many, checked, tenant, reason)
    return web.json_response({"added": added, "already": len(set(checked)) - added}, status=201 if added else 200)


async def remove_suppressed(request: web.Request) -> web.Response:
    """The address and tenant come from the query string or a JSON body."""
    values = dict(request.query)
    if request.can_read_body:
        values.update(await json_body(request, ("address", "tenant")))
    address = valid_address(values.get("address"))
    tenant = optional_text(values, "tenant")
    if not await _blocking(request.app[SUPERVISOR].suppression.remove, address, tenant):
        raise ApiError(404, f"{address} is not suppressed{f' for tenant {tenant}' if tenant else ''}")
    return web.json_response({"removed": address, "tenant": tenant})


async def complaint(request: web.Request) -> web.Response:
    """An ARF report (RFC 5965) as the raw message body, for feedback loops delivered by webhook: the
    recipient is suppressed for the tenant and the complaint counts against the campaign in every worker."""
    supervisor = request.app[SUPERVISOR]
    report = await request.read()
    if not report:
        raise ApiError(400, "the body must be the ARF report (a multipart/report message)")
    found = await _blocking(record_complaint, report, supervisor.secret, supervisor.suppression, supervisor.complaints)
    if found is None:
        raise ApiError(400, "not an ARF report about a message this engine sent (no valid unsubscribe token in it)")
    recipient, tenant, campaign = found
    return web.json_response({"recipient": recipient, "tenant": tenant, "campaign": campaign, "suppressed": True})


def unsubscribe_token(request: web.Request) -> tuple[str, str | None, str | None]:
    try:
        return verify_token(request.app[SUPERVISOR].secret, request.match_info["token"])
    except InvalidToken as error:
        raise ApiError(400, f"invalid unsubscribe token: {error}") from None


async def unsubscribe(request: web.Request) -> web.Response:
    """RFC 8058 one-click: the body must say `List-Unsubscribe=One-Click` (form-encoded or multipart)."""
    recipient, tenant, campaign = unsubscribe_token(request)
    form = await request.post()
    if form.get("List-Unsubscribe") != "One-Click":
        raise ApiError(400, "the body must be List-Unsubscribe=One-Click (RFC 8058)")
    reason = f"one-click unsubscribe{f' from campaign {campaign}' if campaign else ''}"
    await _blocking(request.app[SUPERVISOR].suppression.add, recipient, tenant, reason)
    if "text/html" in request.headers.get("Accept", ""):  # the confirmation page's button, in a browser
        return unsubscribe_html(UNSUBSCRIBED_PAGE, recipient)
    return web.json_response({"unsubscribed": recipient, "tenant": tenant, "campaign": campaign})


async def unsubscribe_page(request: web.Request) -> web.Response:
    """A person who opens the link sees a button; only its POST unsubscribes (link scanners GET links)."""
    recipient, _, _ = unsubscribe_token(request)
    return unsubscribe_html(UNSUBSCRIBE_PAGE, recipient)


def unsubscribe_html(page: str, address: str) -> web.Response:
    """A page about one address; never cached, since it is about a person."""
    text = page.format(address=html.escape(address))
    return web.Response(text=text, content_type="text/html", headers={"Cache-Control": "no-store"})


UNSUBSCRIBE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Unsubscribe</title></head>
<body><form method="post">
<p>Stop sending this mail to {address}?</p>
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button>
</form></body></html>
"""

UNSUBSCRIBED_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Unsubscribed</title></head>
<body><p>{address} is unsubscribed.</p></body></html>
"""


def valid_address(value: Any) -> str:
    if not isinstance(value, str) or "@" not in value.strip()[1:-1] or len(value) > 320:
        raise ApiError(400, f"invalid address {value!r}: expected local@domain")
    if any(char.isspace() or char in "<>" for char in value.strip()):
        raise ApiError(400, f"invalid address {value!r}: no spaces or angle brackets")
    return value.strip()


def query_int(request: web.Request, name: str, default: int, low: int, high: int | None) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
        raise ApiError(400, f"{name} must be an integer from {low}{f' to {high}' if high else ' up'}")
    return int(text)


async def _blocking(function: Callable[..., Any], *args: Any) -> Any:
    """LMDB writes wait for fsync: run them off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def rule_view(rule: Rule) -> dict:
    return dataclasses.asdict(rule)
