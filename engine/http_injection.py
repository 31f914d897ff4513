"""HTTP injection (SPEC `protocol = "http"` listeners): `POST /api/v1/inject` with a JSON body.

Each recipient becomes a message of its own (its substitutions make it differ), and goes the way an SMTP
message goes: the lane's reception handler stamps, signs and spools it, so suppression, List-Unsubscribe,
DKIM and the durability rule (answer only after fsync) are the same for both protocols. Who may inject
mirrors the SMTP listener: clients inside `relay_from`, or users of `users_file` with HTTP Basic
authentication over TLS.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.compose import ContentError, built_message, raw_message
from engine.config import Listener
from engine.reception import ReceptionHandler
from engine.smtp.auth import UsersFile
from engine.smtp.server import Reply, Session, in_networks
from engine.smtp.tls import server_context
from engine.smtpproto import parse_path

log = logging.getLogger(__name__)

PATH = "/api/v1/inject"
SHUTDOWN_TIMEOUT = 10.0  # seconds a request in progress may take after the listener closes
FIELDS = ("envelope_sender", "recipients", "content", "campaign", "tenant", "priority")
CONTROL_VALUE = re.compile(r"[!-~]([ !-~]{0,254})")  # one printable line, as in an X-Engine-* header


class RequestError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Injection:
    sender: str
    recipients: tuple[tuple[str, dict], ...]  # (address as given, substitutions)
    content: str | dict
    controls: bytes  # X-Engine-* fields from the JSON controls, appended to each message's header block


@dataclass(slots=True)
class HttpSession(Session):
    @property
    def protocol(self) -> str:
        return "HTTP"


def parse_request(body: Any, max_recipients: int) -> Injection:
    """The request's fields, checked; RequestError(400) names the first one that is wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    sender = body.get("envelope_sender")
    if not isinstance(sender, str):
        raise RequestError(400, 'envelope_sender is required: an address, or "" for the null sender')
    if sender:
        sender = _address(sender, b"FROM:", "envelope_sender")
    recipients = body.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        raise RequestError(400, 'recipients is required: a list of {"email": ..., "substitutions"?: {...}}')
    if len(recipients) > max_recipients:
        raise RequestError(400, f"too many recipients: {len(recipients)}, this listener takes {max_recipients}")
    content = body.get("content")
    if not isinstance(content, str | dict):
        raise RequestError(400, "content is required: raw RFC 5322 text, or an object of message fields")
    return Injection(sender, tuple(_recipient(item, n) for n, item in enumerate(recipients)), content, _controls(body))


def _address(value: str, keyword: bytes, name: str) -> str:
    try:
        address, _ = parse_path(keyword + b"<" + value.strip().encode() + b">", keyword)
    except ValueError as error:
        raise RequestError(400, f"{name}: {error.args[-1] if error.args else error}") from None
    return address


def _recipient(item: Any, index: int) -> tuple[str, dict]:
    if isinstance(item, str):
        item = {"email": item}
    if not isinstance(item, dict) or not isinstance(item.get("email"), str):
        raise RequestError(400, f'recipients[{index}] must be {{"email": ..., "substitutions"?: {{...}}}}')
    substitutions = item.get("substitutions") or {}
    if not isinstance(substitutions, dict):
        raise RequestError(400, f"recipients[{index}].substitutions must be an object")
    return item["email"], substitutions


def _controls(body: dict) -> bytes:
    fields = []
    for name in ("campaign", "tenant"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not CONTROL_VALUE.fullmatch(value):
            raise RequestError(400, f"{name} must be one line of printable ASCII, 1 to 255 characters")
        fields.append(f"X-Engine-{name.title()}: {value}\r\n")
    priority = body.get("priority")
    if priority is not None:
        if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 9:
            raise RequestError(400, "priority must be an integer from 0 (most urgent) to 9")
        fields.append(f"X-Engine-Priority: {priority}\r\n")
    return "".join(fields).encode()


def with_controls(message: bytes, controls: bytes) -> bytes:
    """The JSON controls go last in the header block, so they win over X-Engine-* fields in the content."""
    if not controls:
        return message
    end = message.find(b"\r\n\r\n")
    if message.startswith(b"\r\n"):
        return controls + message
    if end < 0:
        return message + controls
    return message[: end + 2] + controls + message[end + 2 :]


class HttpInjectionServer:
    """One `protocol = "http"` listener in one lane worker."""

    def __init__(self, handler: ReceptionHandler, listener: Listener) -> None:
        self.handler = handler
        self.listener = listener
        self.users = UsersFile(listener.users_file) if listener.users_file else None
        self.tls: ssl.SSLContext | None = (
            server_context(listener.tls_cert, listener.tls_key) if listener.tls_cert and listener.tls_key else None
        )
        app = web.Application(client_max_size=2 * listener.max_message_size + (1 << 20))
        app.router.add_post(PATH, self.inject)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)

    async def listen(self, sock: Any) -> None:
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self.tls).start()

    async def close(self, timeout: float = 30.0) -> None:
        """Stops accepting; requests in progress (waiting for their spool commit) get `timeout` to finish."""
        await asyncio.wait_for(self._runner.cleanup(), timeout)

    async def inject(self, request: web.Request) -> web.Response:
        try:
            session = self._session(request)
            injection = parse_request(await self._json(request), self.listener.max_recipients)
        except RequestError as error:
            headers = {"WWW-Authenticate": 'Basic realm="engine"'} if error.status == 401 else None
            return web.json_response({"error": error.reason}, status=error.status, headers=headers)
        outcomes = await asyncio.gather(
            *(self._inject_one(session, injection, address, values) for address, values in injection.recipients)
        )
        ids = [message_id for message_id, _ in outcomes if message_id]
        errors = [error for _, error in outcomes if error is not None]
        result = {
            "success_count": len(outcomes) - len(errors),
            "fail_count": len(errors),
            "failed_recipients": [error["recipient"] for error in errors],
            "errors": errors,
            "ids": ids,
        }
        every_one_temporary = errors and len(errors) == len(outcomes) and all(e["code"] < 500 for e in errors)
        return web.json_response(result, status=503 if every_one_temporary else 200)

    async def _json(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except json.JSONDecodeError as error:
            raise RequestError(400, f"request body is not JSON: {error}") from None
        except web.HTTPRequestEntityTooLarge:
            raise RequestError(413, "request body too large for this listener's max_message_size") from None

    def _session(self, request: web.Request) -> HttpSession:
        peer = request.transport.get_extra_info("peername") or ("", 0)
        local = request.transport.get_extra_info("sockname") or ("", 0)
        tls = request.transport.get_extra_info("sslcontext") is not None
        may_relay = in_networks(peer[0], self.listener.relay_from)
        session = HttpSession(peer=peer[:2], local=local[:2], may_relay=may_relay, tls=tls)
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            session.authenticated = self._authenticate(authorization, tls)
        elif not session.may_relay:
            if self.users is None or not tls:
                raise RequestError(403, f"{peer[0]} may not inject here (not in relay_from)")
            raise RequestError(401, "authentication required (HTTP Basic, users_file)")
        return session

    def _authenticate(self, authorization: str, tls: bool) -> str:
        if not tls:
            raise RequestError(403, "authentication only over TLS: the password would cross the network in clear")
        if self.users is None:
            raise RequestError(403, "this listener has no users_file: authentication is not offered")
        scheme, _, encoded = authorization.partition(" ")
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        if scheme.lower() != "basic" or not self.users.verify(user, password):
            raise RequestError(401, "authentication failed")
        return user

    async def _inject_one(
        self, session: HttpSession, injection: Injection, address: str, values: Mapping[str, object]
    ) -> tuple[str | None, dict | None]:
        """(message id, None) once spooled, or (None, error) saying why this recipient failed."""
        handler = self.handler
        try:
            recipient = _address(address, b"TO:", "recipient")
            content = injection.content
            if isinstance(content, str):
                message = raw_message(content, values)
            else:
                message = built_message(content, recipient, values)
        except (RequestError, ContentError) as error:
            return None, self._failed(session, injection, address, Reply(550, "5.6.0", str(error)))
        message = with_controls(message, injection.controls)
        if len(message) > self.listener.max_message_size:
            reply = Reply(552, "5.3.4", f"message is {len(message)} bytes, over this listener's max_message_size")
            return None, self._failed(session, injection, recipient, reply)
        refusal = handler.check_recipient(session, injection.sender, recipient)
        if refusal is not None:
            return None, self._failed(session, injection, recipient, refusal)
        reply = handler.handle_message(session, injection.sender, [recipient], message, {})
        if not isinstance(reply, Reply):
            reply = await reply
        if reply.code != 250:
            return None, {"recipient": address, "code": reply.code, "enhanced": reply.enhanced, "text": reply.text}
        return reply.queued or "", None

    def _failed(self, session: HttpSession, injection: Injection, recipient: str, reply: Reply) -> dict:
        self.handler.rejected(session, injection.sender, [recipient], reply)
        return {"recipient": recipient, "code": reply.code, "enhanced": reply.enhanced, "text": reply.text}
