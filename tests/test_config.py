"""engine.toml parsing: defaults, the SPEC example, units, env: values, paths and error collection."""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path

import pytest

from engine.config import (
    Address,
    AlertSettings,
    BounceRule,
    ConfigError,
    ListUnsubscribe,
    ReputationSettings,
    Shaping,
    load_config,
    parse_duration,
    parse_rate,
    parse_size,
)

SPEC_EXAMPLE = """
[engine]
hostname  = "mta.example.net"      # EHLO name, Received header, DSN Reporting-MTA
spool_dir = "spool"
log_dir   = "logs"
secret    = "env:ENGINE_SECRET"     # HMAC key (unsubscribe tokens)

[admin]
listen = "127.0.0.1:8025"           # HTTP: /metrics, /api/v1/*, dashboard at /
token  = "env:ENGINE_ADMIN_TOKEN"   # bearer token required by every /api/v1 call

[dns]
nameservers = ["127.0.0.1:5353"]    # default: the system resolver configuration
timeout     = "5s"

[routes]                            # static next hops that bypass MX lookup; "*" = smarthost for all
"sink.test" = "127.0.0.2:2526"

[[listeners]]
name       = "tx"
protocol   = "smtp"                 # or "http" (JSON injection, same lane rules)
listen     = "127.0.0.1:2525"
lane       = "transactional"
relay_from = ["127.0.0.0/8"]        # clients that may relay without AUTH; others must AUTH
users_file = "users.txt"            # optional: "user:password-hash" lines for AUTH PLAIN/LOGIN
tls_cert   = "cert.pem"             # optional: enables STARTTLS
tls_key    = "key.pem"
max_message_size = "25MB"
max_recipients   = 100

[lanes.transactional]
workers         = 1                 # processes; each has its own uvloop loop and LMDB spool
nice            = 0
egress_pool     = ["tx-1"]
retry_intervals = ["10s", "30s", "1m", "5m", "15m"]   # the last one repeats
max_age         = "6h"              # then Expiration bounce
sla_latency     = "2s"              # p99 reception -> first delivery attempt; breach raises a P0 alert
list_unsubscribe = false

[lanes.bulk]
workers         = 1
nice            = 10
egress_pool     = ["bulk-1", "bulk-2"]
retry_intervals = ["5m", "15m", "30m", "1h"]
max_age         = "3d"
sla_completion  = "4h"              # campaign completion; projected breach raises a P1 alert
list_unsubscribe = { mailto = "unsubscribe@example.net", url = "https://example.net/unsubscribe/{token}" }

[egress.tx-1]
source_address = "127.0.0.3"        # local address delivery connections bind to
ehlo_name      = "tx1.example.net"

[shaping.default]                   # applies per (egress source, destination domain)
connection_limit              = 10
max_message_rate              = "50/s"
max_deliveries_per_connection = 100
idle_timeout                  = "5s"
tls                           = "opportunistic"   # or "required", "disabled"

[shaping."gmail.com"]
max_message_rate = "20/s"

[dkim."example.net"]
selector  = "s2026"
key_file  = "keys/example.net.pem"
algorithm = "rsa-sha256"            # or "ed25519-sha256"

[cluster]
redis = "redis://127.0.0.1:6379/0"  # optional: throttles, suspensions and suppression shared by every node
"""

BULK_EGRESS = """
[egress.bulk-1]
source_address = "127.0.0.4"

[egress.bulk-2]
source_address = "127.0.0.5"
weight = 2
"""


def write(directory: Path, text: str, name: str = "engine.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


@pytest.fixture
def spec_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding the files the SPEC example points at, with its environment variables set."""
    for name in ("users.txt", "cert.pem", "key.pem", "keys/example.net.pem"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x\n")
    monkeypatch.setenv("ENGINE_SECRET", "s3cret")
    monkeypatch.setenv("ENGINE_ADMIN_TOKEN", "t0ken")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- units ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("3d", 259200.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        (" 10s ", 10.0),
        ("45", 45.0),
        (12, 12.0),
        (0.25, 0.25),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["soon", "", "5 m", "5x", "m5", "-1s", "1.s", True, -3, float("inf"), None])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("100/s", 100.0),
        ("6000/min", 100.0),
        ("6000/m", 100.0),
        ("1000/h", 1000 / 3600),
        ("86400/day", 1.0),
        ("10/5m", 10 / 300),
        ("0.5/s", 0.5),
        ("20", 20.0),
        (7, 7.0),
    ],
)
def test_parse_rate(text: str | float, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["fast", "100/", "/s", "100/fortnight", "0/s", "100/0s", "100/5", True])
def test_parse_rate_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("25MB", 25 * 1024 * 1024),
        ("25MiB", 25 * 1024 * 1024),
        ("25 mb", 25 * 1024 * 1024),
        ("512KB", 512 * 1024),
        ("512K", 512 * 1024),
        ("1GB", 1 << 30),
        ("100B", 100),
        ("1.5KB", 1536),
        ("4096", 4096),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["big", "25XB", "MB", "25Mi", "-1", -1, 2.5, True])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "default_port", "address"),
    [
        ("127.0.0.1:25", None, Address("127.0.0.1", 25)),
        ("Mail.Example.NET:587", None, Address("mail.example.net", 587)),
        ("[::1]:2525", None, Address("::1", 2525)),
        ("[0:0::0:1]:2525", None, Address("::1", 2525)),
        ("::1", 53, Address("::1", 53)),
        ("10.0.0.1", 53, Address("10.0.0.1", 53)),
    ],
)
def test_address_parse(text: str, default_port: int | None, address: Address) -> None:
    assert Address.parse(text, default_port) == address
    assert Address.parse(str(address)) == address


@pytest.mark.parametrize("text", ["127.0.0.1", "host:0", "host:65536", "host:x", "::1:25", "[::1", "[x]:25", "a b:1"])
def test_address_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        Address.parse(text)


# --- defaults -------------------------------------------------------------------------------------------


def test_builtin_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.source is None
    assert config.engine.hostname == socket.getfqdn()
    assert config.engine.spool_dir == tmp_path / "spool"
    assert config.engine.log_dir == tmp_path / "logs"
    assert config.engine.secret is None
    assert (str(config.admin.listen), config.admin.token) == ("127.0.0.1:8025", None)
    assert config.dns.nameservers == ()
    tx, bulk = config.listeners
    assert (tx.name, str(tx.listen), tx.lane, tx.protocol) == ("tx", "127.0.0.1:2525", "transactional", "smtp")
    assert (bulk.name, str(bulk.listen), bulk.lane) == ("bulk", "127.0.0.1:2587", "bulk")
    assert tx.relay_from == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert (tx.max_message_size, tx.max_recipients, tx.idle_timeout) == (25 << 20, 100, 300.0)
    assert (tx.users_file, tx.tls_cert, tx.tls_key) == (None, None, None)
    lane = config.lanes["transactional"]
    assert (lane.workers, lane.nice, lane.egress_pool) == (1, 0, ("default",))
    assert lane.retry_intervals == (10, 30, 60, 300, 900)
    assert (lane.max_age, lane.sla_latency, lane.sla_completion) == (6 * 3600, 2.0, None)
    assert (lane.list_unsubscribe, lane.dsn) == (None, False)
    lane = config.lanes["bulk"]
    assert (lane.workers, lane.nice, lane.retry_intervals) == (1, 10, (300, 900, 1800, 3600))
    assert (lane.max_age, lane.sla_latency, lane.sla_completion) == (3 * 86400, None, 4 * 3600)
    host = config.engine.hostname
    assert lane.list_unsubscribe == ListUnsubscribe(f"unsubscribe@{host}", f"https://{host}/unsubscribe/{{token}}")
    egress = config.egress["default"]
    assert (egress.source_address, egress.ehlo_name, egress.weight) == (None, host, 1)
    assert config.shaping == {"default": Shaping(10, None, 100, 5.0, "opportunistic", 25, 30.0)}
    assert config.shaping_for("anything.example") == config.shaping["default"]
    assert (config.routes, config.dkim, config.cluster.redis) == ({}, {}, None)
    assert config.route_for("example.com") is None


def test_engine_toml_in_current_directory_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, '[engine]\nhostname = "here.example"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.engine.hostname == "here.example"
    assert config.source == tmp_path / "engine.toml"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert [listener.name for listener in config.listeners] == ["tx", "bulk"]
    assert list(config.lanes) == ["transactional", "bulk"]
    assert config.engine.spool_dir == tmp_path / "spool"


# --- the SPEC example -----------------------------------------------------------------------------------


def test_spec_example_names_its_undeclared_egress(spec_dir: Path) -> None:
    write(spec_dir, SPEC_EXAMPLE)
    assert errors_of(Path("engine.toml")) == [
        "engine.toml: lanes.bulk.egress_pool[0]: no egress named 'bulk-1' in [egress]",
        "engine.toml: lanes.bulk.egress_pool[1]: no egress named 'bulk-2' in [egress]",
    ]


def test_spec_example_loads(spec_dir: Path) -> None:
    config = load_config(write(spec_dir, SPEC_EXAMPLE + BULK_EGRESS))
    assert config.source == spec_dir / "engine.toml"
    assert config.engine.hostname == "mta.example.net"
    assert config.engine.spool_dir == spec_dir / "spool"
    assert config.engine.secret == "s3cret"
    assert config.admin.token == "t0ken"
    assert config.dns.nameservers == (Address("127.0.0.1", 5353),)
    assert config.dns.timeout == 5.0
    assert config.routes == {"sink.test": Address("127.0.0.2", 2526)}
    (tx,) = config.listeners
    assert tx.relay_from == (ipaddress.ip_network("127.0.0.0/8"),)
    assert (tx.users_file, tx.tls_cert, tx.tls_key) == (
        spec_dir / "users.txt",
        spec_dir / "cert.pem",
        spec_dir / "key.pem",
    )
    assert (tx.max_message_size, tx.max_recipients) == (25 << 20, 100)
    transactional, bulk = config.lanes["transactional"], config.lanes["bulk"]
    assert transactional.egress_pool == ("tx-1",)
    assert transactional.list_unsubscribe is None
    assert bulk.egress_pool == ("bulk-1", "bulk-2")
    assert bulk.max_age == 3 * 86400
    assert bulk.list_unsubscribe == ListUnsubscribe(
        "unsubscribe@example.net", "https://example.net/unsubscribe/{token}"
    )
    assert config.egress["tx-1"].source_address == "127.0.0.3"
    assert config.egress["tx-1"].ehlo_name == "tx1.example.net"
    assert config.egress["bulk-1"].ehlo_name == "mta.example.net"
    assert config.egress["bulk-2"].weight == 2
    assert config.shaping["default"].max_message_rate == 50.0
    assert config.shaping_for("GMAIL.com.").max_message_rate == 20.0
    key = config.dkim["example.net"]
    assert (key.selector, key.key_file, key.algorithm) == ("s2026", spec_dir / "keys/example.net.pem", "rsa-sha256")
    assert config.cluster.redis == "redis://127.0.0.1:6379/0"


def test_to_dict_is_json_and_redacts_secrets(spec_dir: Path) -> None:
    config = load_config(write(spec_dir, SPEC_EXAMPLE + BULK_EGRESS))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["engine"]["secret"] == data["admin"]["token"] == "<redacted>"
    assert data["engine"]["spool_dir"] == str(spec_dir / "spool")
    assert data["lanes"]["bulk"]["retry_intervals"] == [300.0, 900.0, 1800.0, 3600.0]
    assert data["listeners"][0]["listen"] == "127.0.0.1:2525"
    assert data["listeners"][0]["relay_from"] == ["127.0.0.0/8"]
    assert data["shaping"]["gmail.com"]["max_message_rate"] == 20.0
    assert data["routes"] == {"sink.test": "127.0.0.2:2526"}
    assert data["source"] == str(spec_dir / "engine.toml")
    plain = config.to_dict(redact=False)
    assert (plain["engine"]["secret"], plain["admin"]["token"]) == ("s3cret", "t0ken")


# --- env: values ----------------------------------------------------------------------------------------


def test_env_values_are_typed_by_their_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HOST", "env.example")
    monkeypatch.setenv("TEST_WORKERS", "4")
    monkeypatch.setenv("TEST_DSN", "true")
    monkeypatch.setenv("TEST_RETRY", "1m, 2m")
    monkeypatch.setenv("TEST_RATE", "600/min")
    text = """
[engine]
hostname = "env:TEST_HOST"
[lanes.main]
workers = "env:TEST_WORKERS"
dsn = "env:TEST_DSN"
retry_intervals = "env:TEST_RETRY"
[[listeners]]
listen = "127.0.0.1:2525"
lane = "main"
[shaping."example.com"]
max_message_rate = "env:TEST_RATE"
"""
    config = load_config(write(tmp_path, text))
    assert config.engine.hostname == "env.example"
    lane = config.lanes["main"]
    assert (lane.workers, lane.dsn, lane.retry_intervals) == (4, True, (60.0, 120.0))
    assert config.shaping_for("example.com").max_message_rate == 10.0


def test_missing_env_variable_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_UNSET", raising=False)
    monkeypatch.setenv("TEST_BAD_WORKERS", "many")
    monkeypatch.chdir(tmp_path)
    text = """
[admin]
token = "env:TEST_UNSET"
[dns]
nameservers = ["127.0.0.1", "env:TEST_UNSET"]
[lanes.transactional]
workers = "env:TEST_BAD_WORKERS"
"""
    write(tmp_path, text)
    assert errors_of(Path("engine.toml")) == [
        "engine.toml: admin.token: environment variable 'TEST_UNSET' is not set",
        "engine.toml: dns.nameservers[1]: environment variable 'TEST_UNSET' is not set",
        "engine.toml: lanes.transactional.workers: expected an integer, got the string 'many'",
    ]


# --- paths ----------------------------------------------------------------------------------------------


def test_relative_paths_follow_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    (etc / "keys").mkdir(parents=True)
    (etc / "keys" / "d.pem").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    text = f"""
[engine]
spool_dir = "../var/spool"
log_dir = "{tmp_path / "abs-logs"}"
[dkim."d.example"]
selector = "s1"
key_file = "keys/d.pem"
algorithm = "ed25519-sha256"
"""
    write(etc, text)
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("../etc/engine.toml"))
    assert config.source == etc / "engine.toml"
    assert config.engine.spool_dir.resolve() == tmp_path / "var" / "spool"
    assert config.engine.log_dir == tmp_path / "abs-logs"
    assert config.dkim["d.example"].key_file == etc / "keys" / "d.pem"


def test_missing_file(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path / "nope.toml")
    assert error.startswith(f"{tmp_path / 'nope.toml'}: cannot read: ")


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    assert errors_of(write(tmp_path, '[engine]\nhostname = "a"\nlog_dir = \n')) == [
        f"{tmp_path / 'engine.toml'}: line 3, column 11: Invalid value"
    ]


# --- unknown keys and error collection ------------------------------------------------------------------


def test_unknown_keys_at_every_depth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = """
colour = "blue"
[engine]
hostnmae = "x.example"
[lanes.bulk]
wrokers = 2
list_unsubscribe = { mailto = "u@example.net", fax = "555" }
[[listeners]]
listen = "127.0.0.1:2525"
lane = "bulk"
tls = "yes"
[shaping."gmail.com"]
max_rate = "1/s"
[egress.e1]
ip = "127.0.0.9"
"""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, text)
    assert errors_of(Path("engine.toml")) == [
        "engine.toml: colour: unknown key",
        "engine.toml: engine.hostnmae: unknown key (did you mean 'hostname'?)",
        "engine.toml: egress.e1.ip: unknown key",
        "engine.toml: lanes.bulk.wrokers: unknown key (did you mean 'workers'?)",
        "engine.toml: lanes.bulk.list_unsubscribe.fax: unknown key",
        "engine.toml: listeners[0].tls: unknown key",
        'engine.toml: shaping."gmail.com".max_rate: unknown key',
    ]


def test_every_error_is_collected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = """
[admin]
listen = "127.0.0.1:99999"
[dns]
timeout = "0s"
[routes]
"*" = "smarthost.example"
"bad domain" = "127.0.0.1:25"
[lanes.bulk]
workers = 0
nice = 20
egress_pool = ["nowhere"]
retry_intervals = ["5m", "15m", "soon"]
sla_latency = false
list_unsubscribe = { url = "https://example.net/unsubscribe" }
[[listeners]]
name = "a"
protocol = "lmtp"
listen = "127.0.0.1:2525"
lane = "missing"
relay_from = ["10.0.0.1/8"]
max_message_size = "huge"
[[listeners]]
name = "a"
listen = "127.0.0.1:2525"
lane = "bulk"
tls_cert = "cert.pem"
[shaping.default]
tls = "sometimes"
smtp_port = 0
[shaping."gmail.com"]
max_message_rate = "20 per second"
[dkim."example.net"]
selector = "s1"
key_file = "missing.pem"
algorithm = "rsa-sha1"
[cluster]
redis = "127.0.0.1:6379"
"""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, text)
    errors = errors_of(Path("engine.toml"))
    expected = [
        "engine.toml: admin.listen: invalid address '127.0.0.1:99999': port must be 1..65535",
        "engine.toml: dns.timeout: must be more than zero, got '0s'",
        "engine.toml: routes.\"*\": invalid address 'smarthost.example': expected 'HOST:PORT'",
        "engine.toml: routes.\"bad domain\": invalid domain 'bad domain'",
        "engine.toml: lanes.bulk.workers: must be >= 1, got 0",
        "engine.toml: lanes.bulk.nice: must be -20..19, got 20",
        "engine.toml: lanes.bulk.retry_intervals[2]: invalid duration 'soon' "
        "(examples: '500ms', '30s', '5m', '2h', '3d')",
        "engine.toml: lanes.bulk.list_unsubscribe.url: URL 'https://example.net/unsubscribe' must contain '{token}'",
        "engine.toml: lanes.bulk.egress_pool[0]: no egress named 'nowhere' in [egress]",
        "engine.toml: listeners[0].protocol: must be one of 'smtp', 'http', got the string 'lmtp'",
        "engine.toml: listeners[0].relay_from[0]: invalid network '10.0.0.1/8': 10.0.0.1/8 has host bits set",
        "engine.toml: listeners[0].max_message_size: invalid size 'huge' (examples: '512KB', '25MB', '1GB', or bytes)",
        "engine.toml: listeners[0].lane: no lane named 'missing' in [lanes]",
        f"engine.toml: listeners[1].tls_cert: file not found: {tmp_path / 'cert.pem'}",
        "engine.toml: listeners[1]: tls_cert and tls_key must be given together",
        "engine.toml: listeners[1].name: duplicate name 'a', also in listeners[0]",
        "engine.toml: listeners[1].listen: 127.0.0.1:2525 is already used by listeners[0].listen",
        "engine.toml: shaping.default.tls: must be one of 'opportunistic', 'required', 'disabled', "
        "got the string 'sometimes'",
        "engine.toml: shaping.default.smtp_port: must be 1..65535, got 0",
        "engine.toml: shaping.\"gmail.com\".max_message_rate: invalid rate '20 per second' "
        "(examples: '100/s', '6000/min', '1000/h')",
        f'engine.toml: dkim."example.net".key_file: file not found: {tmp_path / "missing.pem"}',
        "engine.toml: dkim.\"example.net\".algorithm: must be one of 'rsa-sha256', 'ed25519-sha256', "
        "got the string 'rsa-sha1'",
        "engine.toml: cluster.redis: invalid Redis URL '127.0.0.1:6379': expected redis://, rediss:// or unix://",
    ]
    assert errors == expected


def test_wrong_shapes_are_reported_not_crashed_on(tmp_path: Path) -> None:
    text = """
engine = 5
listeners = "all"
[lanes]
bulk = 3
[dkim."example.net"]
algorithm = "ed25519-sha256"
"""
    assert errors_of(write(tmp_path, text)) == [
        f"{tmp_path / 'engine.toml'}: engine: expected a table, got an integer",
        f"{tmp_path / 'engine.toml'}: lanes.bulk: expected a table, got an integer",
        f"{tmp_path / 'engine.toml'}: listeners: expected [[listeners]] tables, got the string 'all'",
        f'{tmp_path / "engine.toml"}: dkim."example.net".selector: missing required key',
        f'{tmp_path / "engine.toml"}: dkim."example.net".key_file: missing required key',
    ]


# --- replacement and merging ----------------------------------------------------------------------------


def test_file_lanes_and_listeners_replace_the_defaults(tmp_path: Path) -> None:
    text = """
[egress.ip1]
source_address = "::1"
[lanes.alerts]
egress_pool = ["ip1", "default"]
[lanes.bulk]
workers = 3
list_unsubscribe = true
[[listeners]]
protocol = "http"
listen = "[::1]:8080"
lane = "alerts"
idle_timeout = "1m"
max_recipients = 5000
"""
    config = load_config(write(tmp_path, text))
    assert list(config.lanes) == ["alerts", "bulk"]
    alerts = config.lanes["alerts"]
    assert (alerts.nice, alerts.max_age, alerts.sla_latency) == (0, 6 * 3600, 2.0)
    assert alerts.egress_pool == ("ip1", "default")
    bulk = config.lanes["bulk"]
    assert (bulk.workers, bulk.nice, bulk.sla_completion) == (3, 10, 4 * 3600)
    assert bulk.list_unsubscribe is not None and bulk.list_unsubscribe.url.endswith("/unsubscribe/{token}")
    (listener,) = config.listeners
    assert (listener.name, listener.protocol, listener.listen) == ("alerts", "http", Address("::1", 8080))
    assert (listener.idle_timeout, listener.max_recipients) == (60.0, 5000)
    assert config.egress["ip1"].source_address == "::1"


def test_builtin_listeners_follow_the_lanes_that_exist(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[lanes.transactional]\nworkers = 2\n"))
    assert [(listener.name, listener.lane) for listener in config.listeners] == [("tx", "transactional")]
    assert errors_of(write(tmp_path, "[lanes.other]\n")) == [
        f"{tmp_path / 'engine.toml'}: listeners: the built-in listeners need lanes 'transactional' or 'bulk'"
    ]


def test_shaping_merges_field_by_field(tmp_path: Path) -> None:
    text = """
[shaping.default]
connection_limit = 4
max_message_rate = "6000/min"
connect_timeout = "10s"
[shaping."gmail.com"]
max_message_rate = "1000/h"
tls = "required"
[shaping."Yahoo.COM"]
max_message_rate = false
smtp_port = 2525
"""
    config = load_config(write(tmp_path, text))
    default = config.shaping_for("example.org")
    assert default == Shaping(4, 100.0, 100, 5.0, "opportunistic", 25, 10.0)
    gmail = config.shaping_for("gmail.com")
    assert gmail == Shaping(4, pytest.approx(1000 / 3600), 100, 5.0, "required", 25, 10.0)
    yahoo = config.shaping_for("yahoo.com")
    assert (yahoo.max_message_rate, yahoo.smtp_port, yahoo.connection_limit) == (None, 2525, 4)
    assert set(config.shaping) == {"default", "gmail.com", "yahoo.com"}


def test_route_for_exact_then_star(tmp_path: Path) -> None:
    text = '[routes]\n"sink.test" = "127.0.0.2:2526"\n"*" = "[::1]:2500"\n'
    config = load_config(write(tmp_path, text))
    assert config.route_for("sink.test") == Address("127.0.0.2", 2526)
    assert config.route_for("SINK.TEST.") == Address("127.0.0.2", 2526)
    assert config.route_for("other.test") == Address("::1", 2500)
    without_star = load_config(write(tmp_path, '[routes]\n"sink.test" = "127.0.0.2:2526"\n'))
    assert without_star.route_for("other.test") is None
    assert without_star.route_for("sub.sink.test") is None


def test_duplicate_listen_with_admin_and_auth_needs_tls(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text("u:x\n")
    text = """
[admin]
listen = "127.0.0.1:2525"
[[listeners]]
listen = "127.0.0.1:2525"
lane = "transactional"
users_file = "users.txt"
"""
    assert errors_of(write(tmp_path, text)) == [
        f"{tmp_path / 'engine.toml'}: listeners[0].users_file: authentication needs STARTTLS: set tls_cert and tls_key",
        f"{tmp_path / 'engine.toml'}: listeners[0].listen: 127.0.0.1:2525 is already used by admin.listen",
    ]


def test_listeners_sharing_a_lane_need_their_own_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    listeners = '[[listeners]]\nlisten = "127.0.0.1:2525"\nlane = "bulk"\n'
    listeners += '[[listeners]]\nlisten = "[::1]:2525"\nlane = "bulk"\n'
    write(tmp_path, listeners)
    assert errors_of(Path("engine.toml")) == [
        "engine.toml: listeners[1]: more than one listener is named 'bulk' after its lane: set distinct names"
    ]
    write(tmp_path, listeners + 'name = "bulk-v6"\n')
    config = load_config(Path("engine.toml"))
    assert [(listener.name, str(listener.listen)) for listener in config.listeners] == [
        ("bulk", "127.0.0.1:2525"),
        ("bulk-v6", "[::1]:2525"),
    ]


def test_bounce_rules_and_reputation_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.bounces.rules == ()
    assert config.reputation == ReputationSettings(86400.0, 500, 0.05, 0.003, None)


def test_bounce_rules_and_reputation(tmp_path: Path) -> None:
    text = """
[bounces]
rules = [
  { class = "spam-related", text = "listed at example-rbl" },
  { class = "quota-issues", code = 452, enhanced = "4.2.*" },
]
[reputation]
window = "1h"
min_messages = 20
max_bounce_rate = "5%"
max_complaint_rate = 0.003
feedback_address = "fbl@example.net"
"""
    config = load_config(write(tmp_path, text))
    assert config.bounces.rules == (
        BounceRule("spam-related", text="listed at example-rbl"),
        BounceRule("quota-issues", code="452", enhanced="4.2.*"),
    )
    assert config.reputation == ReputationSettings(3600.0, 20, 0.05, 0.003, "fbl@example.net")


def test_bounce_rules_and_reputation_errors(tmp_path: Path) -> None:
    text = """
[bounces]
rules = [
  { class = "soft", code = 450 },
  { class = "other" },
  { class = "other", text = "([unclosed" },
  { class = "other", code = "6xx", enhanced = "5-1-1", colour = "red" },
]
[reputation]
max_bounce_rate = 5
max_complaint_rate = "lots%"
min_messages = 0
"""
    prefix = f"{tmp_path / 'engine.toml'}: "
    errors = [error.removeprefix(prefix) for error in errors_of(write(tmp_path, text))]
    assert [error.split(":", 1)[0] for error in errors] == [
        "bounces.rules[0].class",
        "bounces.rules[1]",
        "bounces.rules[2].text",
        "bounces.rules[3].code",
        "bounces.rules[3].enhanced",
        "bounces.rules[3].colour",
        "reputation.max_bounce_rate",
        "reputation.max_complaint_rate",
        "reputation.min_messages",
    ]


def test_listener_connection_limits_and_timeouts(tmp_path: Path) -> None:
    base = '[lanes.bulk]\n[[listeners]]\nlisten = "127.0.0.1:2525"\nlane = "bulk"\n'
    (default,) = load_config(write(tmp_path, base)).listeners
    assert (default.command_timeout, default.data_timeout) == (300.0, 600.0)
    assert (default.max_connections, default.max_connections_per_ip) == (1000, 50)
    text = base + 'command_timeout = "1m"\ndata_timeout = "90s"\nmax_connections = 10\nmax_connections_per_ip = 2\n'
    (listener,) = load_config(write(tmp_path, text)).listeners
    assert (listener.command_timeout, listener.data_timeout) == (60.0, 90.0)
    assert (listener.max_connections, listener.max_connections_per_ip) == (10, 2)
    bad = base + 'command_timeout = "0s"\nmax_connections = 0\nmax_connections_per_ip = "many"\n'
    prefix = f"{tmp_path / 'engine.toml'}: listeners[0]."
    errors = [error.removeprefix(prefix) for error in errors_of(write(tmp_path, bad))]
    assert [error.split(":", 1)[0] for error in errors] == [
        "command_timeout",
        "max_connections",
        "max_connections_per_ip",
    ]


# --- [alerts] ---------------------------------------------------------------------------------------------


def test_alerts_defaults_and_values(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).alerts == AlertSettings(window=60.0, webhook=None)
    config = load_config(write(tmp_path, '[alerts]\nwindow = "5m"\nwebhook = "https://hooks.example.net/engine"\n'))
    assert config.alerts == AlertSettings(window=300.0, webhook="https://hooks.example.net/engine")


def test_alerts_errors(tmp_path: Path) -> None:
    text = '[alerts]\nwindow = "0s"\nwebhook = "ftp://example.net/x"\nrepeat = "1m"\n'
    path = write(tmp_path, text)
    errors = [error.removeprefix(f"{path}: ") for error in errors_of(path)]
    assert len(errors) == 3
    assert errors[0] == "alerts.window: must be more than zero, got '0s'"
    assert errors[1].startswith("alerts.webhook: invalid URL 'ftp://example.net/x'")
    assert errors[2].startswith("alerts.repeat: unknown key")
