"""HTTP injection black-box: `engine serve` with `protocol = "http"` listeners, real HTTP (and HTTPS with a
generated certificate) over loopback, a real SMTP sink at the far end."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.smtp.auth import add_user
from tests.certs import self_signed
from tests.harness import Engine, Sink, engine_toml, free_port, listener, wait_for


@dataclass
class World:
    engine: Engine
    sink: Sink
    http: int  # transactional, clients on loopback may inject
    https: int  # bulk, HTTPS, only with a user's password
    closed: int  # transactional, nobody may inject
    cert: Path


def config(sink: Sink, http: int, https: int, closed: int, cert: Path, key: Path, users: Path) -> str:
    tls = {"users_file": str(users), "tls_cert": str(cert), "tls_key": str(key)}
    return engine_toml(
        admin=free_port(),
        routes={"*": sink.address},
        secret="http-injection-test",
        listeners=[
            listener("api", http, "transactional", protocol="http", max_recipients=5, max_message_size="64KB"),
            listener("bulk-api", https, "bulk", protocol="http", relay_from=[], **tls),
            listener("closed", closed, "transactional", protocol="http", relay_from=[]),
        ],
        lanes={"transactional": {}, "bulk": {"list_unsubscribe": {"url": "https://mta.test/unsubscribe/{token}"}}},
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("http")
    sink = Sink(directory / "sink")
    cert, key = self_signed(directory, "localhost")
    users = directory / "users.txt"
    add_user(users, "app", "s3cret-password")
    ports = free_port(), free_port(), free_port()
    engine = Engine(directory, config(sink, *ports, cert, key, users)).start(list(ports))
    try:
        yield World(engine, sink, *ports, cert)
    finally:
        engine.stop()
        sink.stop()


def post(url: str, body: object, *, context: ssl.SSLContext | None = None, **headers: str) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=15, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def inject(world: World, body: object) -> tuple[int, dict]:
    return post(f"http://127.0.0.1:{world.http}/api/v1/inject", body)


def arrived(sink: Sink, subject: str) -> dict[str, email.message.EmailMessage]:
    found = {}
    for envelope, data in sink.messages():
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        if parsed["Subject"] == subject:
            for recipient in envelope["recipients"]:
                found[recipient] = parsed
    return found


RAW = "From: shop@example.net\nSubject: {{ subject }}\nTo: {{ email }}\n\nHello {{ name }}, your code is {{ code }}.\n"


def test_raw_content_with_substitutions_makes_one_message_per_recipient(world: World) -> None:
    status, result = inject(
        world,
        {
            "envelope_sender": "bounces@example.net",
            "recipients": [
                {"email": "ann@dest.test", "substitutions": {"name": "Ann", "code": 1234, "subject": "codes"}},
                {"email": "ben@dest.test", "substitutions": {"name": "Ben", "code": 5678, "subject": "codes"}},
            ],
            "content": RAW,
        },
    )
    assert status == 200, result
    assert (result["success_count"], result["fail_count"], result["failed_recipients"]) == (2, 0, [])
    assert len(set(result["ids"])) == 2
    messages = wait_for(lambda: len(arrived(world.sink, "codes")) == 2 and arrived(world.sink, "codes"), 15)
    assert "Hello Ann, your code is 1234." in messages["ann@dest.test"].get_content()
    assert "Hello Ben, your code is 5678." in messages["ben@dest.test"].get_content()
    assert "with HTTP id" in messages["ann@dest.test"]["Received"]
    receptions = [r for r in world.engine.events("Reception") if r["id"] in result["ids"]]
    assert {r["listener"] for r in receptions} == {"api"} and all(
        r["sender"] == "bounces@example.net" for r in receptions
    )


def test_built_content_and_json_controls(world: World) -> None:
    status, result = inject(
        world,
        {
            "envelope_sender": "bounces@example.net",
            "recipients": ["cat@dest.test"],
            "content": {
                "from": {"email": "shop@example.net", "name": "The Shop"},
                "subject": "Grüße, {{ name }}",
                "text_body": "Plain {{ name }}",
                "html_body": "<p>Rich {{ name }}</p>",
                "headers": {"X-Order": "42"},
            },
            "campaign": "winter",
            "tenant": "acme",
            "priority": 2,
        },
    )
    assert status == 200 and result["success_count"] == 1, result
    message = wait_for(lambda: arrived(world.sink, "Grüße, ").get("cat@dest.test"), 15, what="built message")
    assert message.get_content_type() == "multipart/alternative"
    assert str(message["From"]) == "The Shop <shop@example.net>" and str(message["To"]) == "cat@dest.test"
    assert message["X-Order"] == "42" and message["X-Engine-Campaign"] is None
    plain, rich = (part.get_content() for part in message.iter_parts())
    assert plain.strip() == "Plain" and rich.strip() == "<p>Rich </p>"
    (delivery,) = wait_for(
        lambda: [r for r in world.engine.events("Delivery") if r["id"] in result["ids"]], 10, what="Delivery"
    )
    assert (delivery["campaign"], delivery["tenant"], delivery["priority"]) == ("winter", "acme", 2)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        ([], "JSON object"),
        ({"recipients": ["a@dest.test"], "content": RAW}, "envelope_sender"),
        ({"envelope_sender": "", "content": RAW}, "recipients"),
        ({"envelope_sender": "", "recipients": ["a@dest.test"]}, "content"),
        ({"envelope_sender": "", "recipients": ["a@dest.test"], "content": RAW, "cc": 1}, "unknown field(s) cc"),
        ({"envelope_sender": "", "recipients": ["a@dest.test"], "content": RAW, "priority": 12}, "priority"),
        ({"envelope_sender": "", "recipients": ["a@dest.test"], "content": RAW, "tenant": "a\nb"}, "tenant"),
        ({"envelope_sender": "not an address", "recipients": ["a@dest.test"], "content": RAW}, "envelope_sender"),
        ({"envelope_sender": "", "recipients": [f"r{n}@dest.test" for n in range(6)], "content": RAW}, "too many"),
    ],
)
def test_bad_requests_get_400_naming_the_field(world: World, body: object, reason: str) -> None:
    status, result = inject(world, body)
    assert status == 400 and reason in result["error"], result


def test_a_bad_recipient_fails_alone(world: World) -> None:
    content = "From: shop@example.net\nSubject: partly\n\nHi\n"
    long_line = "From: shop@example.net\nSubject: partly\n\n" + "x" * 1200 + "\n"
    status, result = inject(
        world, {"envelope_sender": "", "recipients": ["dee@dest.test", "not an address", "eve@"], "content": content}
    )
    assert status == 200 and result["success_count"] == 1 and result["fail_count"] == 2, result
    assert result["failed_recipients"] == ["not an address", "eve@"]
    assert all(error["code"] == 550 and error["enhanced"] == "5.6.0" for error in result["errors"])
    wait_for(lambda: "dee@dest.test" in arrived(world.sink, "partly"), 15, what="the good recipient's copy")
    status, result = inject(world, {"envelope_sender": "", "recipients": ["fay@dest.test"], "content": long_line})
    assert status == 200 and result["failed_recipients"] == ["fay@dest.test"], result
    assert "998" in result["errors"][0]["text"]
    status, result = inject(
        world, {"envelope_sender": "", "recipients": ["gus@dest.test"], "content": content + "y\n" * 35_000}
    )
    assert result["errors"][0]["code"] == 552, result


def test_listener_outside_relay_from_refuses(world: World) -> None:
    status, result = post(f"http://127.0.0.1:{world.closed}/api/v1/inject", {})
    assert status == 403 and "relay_from" in result["error"]


def test_https_listener_needs_a_users_password(world: World) -> None:
    context = ssl.create_default_context(cafile=str(world.cert))
    url = f"https://localhost:{world.https}/api/v1/inject"
    body = {"envelope_sender": "news@example.net", "recipients": ["hal@dest.test"], "content": RAW}
    status, result = post(url, body, context=context)
    assert status == 401 and "authentication required" in result["error"]
    wrong = base64.b64encode(b"app:guess").decode()
    assert post(url, body, context=context, Authorization=f"Basic {wrong}")[0] == 401
    right = base64.b64encode(b"app:s3cret-password").decode()
    body["recipients"] = [{"email": "hal@dest.test", "substitutions": {"subject": "bulk over https"}}]
    status, result = post(url, body, context=context, Authorization=f"Basic {right}")
    assert status == 200 and result["success_count"] == 1, result
    message = wait_for(lambda: arrived(world.sink, "bulk over https").get("hal@dest.test"), 15, what="bulk copy")
    assert "https://mta.test/unsubscribe/" in message["List-Unsubscribe"]
    assert "with HTTPSA id" in message["Received"]
    status, result = post(
        f"http://127.0.0.1:{world.http}/api/v1/inject", body, Authorization=f"Basic {right}"
    )  # a password in clear text is refused even where the client could inject without one
    assert status == 403 and "TLS" in result["error"]
