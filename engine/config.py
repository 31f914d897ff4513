"""engine.toml → frozen, typed configuration objects, with every error reported at once."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from engine.units import parse_duration, parse_rate, parse_size

__all__ = [
    "BOUNCE_CLASSES",
    "Address",
    "AdminSettings",
    "AlertSettings",
    "BounceRule",
    "BounceSettings",
    "ClusterSettings",
    "Config",
    "ConfigError",
    "DkimKey",
    "DnsSettings",
    "Egress",
    "EngineSettings",
    "Lane",
    "ListUnsubscribe",
    "Listener",
    "ReputationSettings",
    "Shaping",
    "load_config",
    "parse_duration",
    "parse_rate",
    "parse_size",
]

IPNetwork = IPv4Network | IPv6Network
KeyPath = tuple[str | int, ...]

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


class ConfigError(Exception):
    """Every problem found in one configuration, each as "FILE: key.path: message"."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Address:
        """Read "HOST:PORT" or "[IPV6]:PORT"; the port may be left out only when a default is given."""
        if text.startswith("["):
            host, closed, rest = text[1:].partition("]")
            if not closed or (rest and not rest.startswith(":")):
                raise ValueError(f"invalid address {text!r}: expected '[IPV6]:PORT'")
            port_text = rest[1:] if rest else None
            if not _is_ip(host, 6):
                raise ValueError(f"invalid address {text!r}: {host!r} is not an IPv6 address")
        elif _is_ip(text, 6):
            host, port_text = text, None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                host, port_text = text, None
            if ":" in host:
                raise ValueError(f"invalid address {text!r}: write IPv6 addresses as '[ADDRESS]:PORT'")
            if not (_is_ip(host, 4) or _HOSTNAME.fullmatch(host)):
                raise ValueError(f"invalid address {text!r}: {host!r} is not a host name or IP address")
        if port_text is None:
            if default_port is None:
                raise ValueError(f"invalid address {text!r}: expected 'HOST:PORT'")
            port_text = str(default_port)
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"invalid address {text!r}: port must be 1..65535")
        if _is_ip(host, 4) or _is_ip(host, 6):
            host = str(ipaddress.ip_address(host))
        return cls(host.lower(), int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class EngineSettings:
    hostname: str
    spool_dir: Path
    log_dir: Path
    secret: str | None


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: Address
    token: str | None


@dataclass(frozen=True, slots=True)
class DnsSettings:
    nameservers: tuple[Address, ...]
    timeout: float


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    protocol: str
    listen: Address
    lane: str
    relay_from: tuple[IPNetwork, ...]
    users_file: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    max_message_size: int
    max_recipients: int
    idle_timeout: float
    command_timeout: float
    data_timeout: float
    max_connections: int  # per worker process
    max_connections_per_ip: int  # per worker process; clients in relay_from are exempt


@dataclass(frozen=True, slots=True)
class ListUnsubscribe:
    mailto: str | None
    url: str | None


@dataclass(frozen=True, slots=True)
class Lane:
    name: str
    workers: int
    nice: int
    egress_pool: tuple[str, ...]
    retry_intervals: tuple[float, ...]
    max_age: float
    sla_latency: float | None
    sla_completion: float | None
    list_unsubscribe: ListUnsubscribe | None
    dsn: bool


@dataclass(frozen=True, slots=True)
class Egress:
    name: str
    source_address: str | None
    ehlo_name: str
    weight: int


@dataclass(frozen=True, slots=True)
class Shaping:
    connection_limit: int
    max_message_rate: float | None  # messages per second; None = unlimited
    max_deliveries_per_connection: int
    idle_timeout: float
    tls: str  # "opportunistic" | "required" | "disabled"
    smtp_port: int
    connect_timeout: float


@dataclass(frozen=True, slots=True)
class DkimKey:
    domain: str
    selector: str
    key_file: Path
    algorithm: str


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    redis: str | None


BOUNCE_CLASSES = (
    "bad-mailbox",
    "bad-domain",
    "inactive-mailbox",
    "quota-issues",
    "spam-related",
    "policy-related",
    "content-related",
    "routing-errors",
    "protocol-errors",
    "message-expired",
    "invalid-sender",
    "other",
)


@dataclass(frozen=True, slots=True)
class BounceRule:
    """One extra classification rule: every condition given must match."""

    bounce_class: str
    code: str | None = None  # glob over the reply code: "550", "55?"
    enhanced: str | None = None  # glob over the enhanced status code: "5.7.*", "?.1.1"
    text: str | None = None  # regular expression searched in the reply text, case-insensitive


@dataclass(frozen=True, slots=True)
class BounceSettings:
    rules: tuple[BounceRule, ...] = ()  # tried before the built-in table


@dataclass(frozen=True, slots=True)
class ReputationSettings:
    """Per (tenant, campaign) limits over a rolling window; above either the campaign is suspended."""

    window: float = 86400.0
    min_messages: int = 500  # no verdict on fewer outcomes than this
    max_bounce_rate: float = 0.05  # hard bounces / outcomes
    max_complaint_rate: float = 0.003  # complaints / outcomes
    feedback_address: str | None = None  # ARF reports (RFC 5965) mailed here count as complaints


@dataclass(frozen=True, slots=True)
class AlertSettings:
    window: float = 60.0  # SLA percentiles and rates are computed over this sliding window
    webhook: str | None = None  # alerts are also POSTed here as JSON


@dataclass(frozen=True)
class Config:
    source: Path | None
    engine: EngineSettings
    admin: AdminSettings
    dns: DnsSettings
    routes: Mapping[str, Address]
    listeners: tuple[Listener, ...]
    lanes: Mapping[str, Lane]
    egress: Mapping[str, Egress]
    shaping: Mapping[str, Shaping]
    dkim: Mapping[str, DkimKey]
    cluster: ClusterSettings = field(default_factory=lambda: ClusterSettings(None))
    alerts: AlertSettings = field(default_factory=AlertSettings)
    bounces: BounceSettings = field(default_factory=BounceSettings)
    reputation: ReputationSettings = field(default_factory=ReputationSettings)

    def shaping_for(self, domain: str) -> Shaping:
        """The domain's own rule (already merged over "default" at load time), else "default"."""
        rule = self.shaping.get(domain) or self.shaping.get(_normalize_domain(domain))
        return rule or self.shaping["default"]

    def route_for(self, domain: str) -> Address | None:
        """A static next hop for the domain, else the "*" smarthost, else None (look up MX)."""
        routes = self.routes
        return routes.get(_normalize_domain(domain)) or routes.get("*")

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """The effective configuration as JSON-able data; secrets are masked unless redact=False."""
        data = _jsonable(self)
        if redact:
            for section, key in (("engine", "secret"), ("admin", "token")):
                if data[section][key] is not None:
                    data[section][key] = "<redacted>"
        return data


def load_config(path: Path | str | None = None) -> Config:
    """Read and check a configuration; None means ./engine.toml if present, else the built-in defaults."""
    if path is None:
        path = Path("engine.toml")
        if not path.is_file():
            return _Reader("<built-in>", Path.cwd()).build({})
    path = Path(path)
    label = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{label}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{label}: not UTF-8 text: {exc.reason}"]) from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        if position:
            line, column = position.groups()
            message = f"line {line}, column {column}: {message[: position.start()]}"
        raise ConfigError([f"{label}: {message}"]) from None
    source = path.resolve()
    return dataclasses.replace(_Reader(label, source.parent).build(raw), source=source)


# --- values ---------------------------------------------------------------------------------------------


class _EnvStr(str):
    """A value read from the environment: numbers and booleans arrive as text and are accepted as such."""


class _Reported(Exception):
    """A value whose errors have already been recorded (element errors, missing environment variables)."""


_MISSING = object()


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _format_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + (part if _BARE_KEY.fullmatch(part) else json.dumps(part))
    return text


def _unknown_key(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.7)
    return f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"


def _normalize_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return domain
    return domain


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_kind(value)}")
    return value


def _integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, _EnvStr) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, got {_kind(value)}")
        if value < low or (high is not None and value > high):
            bounds = f"{low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"must be {bounds}, got {value}")
        return value

    return parse


def _boolean(value: Any) -> bool:
    if isinstance(value, _EnvStr) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def _duration(value: Any) -> float:
    return parse_duration(value)


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be more than zero, got {value!r}")
    return seconds


def _optional_duration(value: Any) -> float | None:
    """A duration, or false to switch the feature off."""
    if value is False:
        return None
    return _positive_duration(value)


def _optional_rate(value: Any) -> float | None:
    """A rate, or false / "unlimited" for no limit."""
    if value is False or value == "unlimited":
        return None
    return parse_rate(value)


def _positive_size(value: Any) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"must be more than zero, got {value!r}")
    return size


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {_kind(value)}")
        return value

    return parse


def _hostname(value: Any) -> str:
    text = _string(value)
    if not _HOSTNAME.fullmatch(text):
        raise ValueError(f"invalid host name {text!r}")
    return text.lower()


def _name(value: Any) -> str:
    text = _string(value)
    if not _NAME.fullmatch(text):
        raise ValueError(f"invalid name {text!r}: use letters, digits, '-' and '_'")
    return text


def _address(default_port: int | None = None) -> Callable[[Any], Address]:
    def parse(value: Any) -> Address:
        return Address.parse(_string(value).strip(), default_port)

    return parse


def _network(value: Any) -> IPNetwork:
    text = _string(value).strip()
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        raise ValueError(f"invalid network {text!r}: {exc}") from None


def _ip(value: Any) -> str:
    text = _string(value).strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"invalid IP address {text!r}") from None


def _domain_key(key: str, allow_star: bool = False) -> str:
    if allow_star and key == "*":
        return key
    domain = _normalize_domain(key)
    if not _HOSTNAME.fullmatch(domain):
        raise ValueError(f"invalid domain {key!r}")
    return domain


def _redis_url(value: Any) -> str:
    text = _string(value).strip()
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"invalid Redis URL {text!r}: expected redis://, rediss:// or unix://")
    return text


def _webhook_url(value: Any) -> str:
    text = _string(value).strip()
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid URL {text!r}: expected http://HOST/... or https://HOST/...")
    return text


def _fraction(value: Any) -> float:
    """0.05 or "5%": a rate between 0 and 1."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"expected a fraction like 0.05 or '5%', got {value!r}") from None
    elif isinstance(value, _EnvStr):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"expected a fraction like 0.05 or '5%', got {value!r}") from None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(f"expected a fraction between 0 and 1 (or a percentage), got {_kind(value)}")
    return float(value)


def _code_glob(value: Any) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else _string(value).strip()
    if not re.fullmatch(r"[245?*][0-9?*]{0,2}", text):
        raise ValueError(f"expected a reply code or glob like 550 or '55?', got {value!r}")
    return text


def _enhanced_glob(value: Any) -> str:
    text = _string(value).strip()
    if not re.fullmatch(r"[245?*](\.[0-9?*]{1,3}){0,2}\**", text):
        raise ValueError(f"expected an enhanced status code or glob like '5.1.1' or '5.7.*', got {text!r}")
    return text


def _regex(value: Any) -> str:
    text = _string(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {text!r}: {exc}") from None
    return text


def _mailbox(value: Any) -> str:
    text = _string(value).strip().removeprefix("mailto:")
    local, at, domain = text.rpartition("@")
    if not at or not local or not _HOSTNAME.fullmatch(domain) or any(c in text for c in " <>\r\n"):
        raise ValueError(f"invalid address {text!r}")
    return text


def _unsubscribe_url(value: Any) -> str:
    text = _string(value).strip()
    if not text.startswith(("https://", "http://")):
        raise ValueError(f"invalid URL {text!r}: expected https://...")
    if "{token}" not in text:
        raise ValueError(f"URL {text!r} must contain '{{token}}'")
    return text


@dataclass(frozen=True, slots=True)
class _ListOf:
    """Spec marker: an array whose elements are parsed (and reported) one by one."""

    element: Callable[[Any], Any]
    nonempty: bool = True


Spec = Mapping[str, Callable[[Any], Any] | _ListOf]

_ROOT_KEYS = (
    "engine",
    "admin",
    "dns",
    "routes",
    "listeners",
    "lanes",
    "egress",
    "shaping",
    "dkim",
    "cluster",
    "bounces",
    "reputation",
    "alerts",
)

_SHAPING_DEFAULT = Shaping(
    connection_limit=10,
    max_message_rate=None,
    max_deliveries_per_connection=100,
    idle_timeout=5.0,
    tls="opportunistic",
    smtp_port=25,
    connect_timeout=30.0,
)

_SHAPING_SPEC: Spec = {
    "connection_limit": _integer(1),
    "max_message_rate": _optional_rate,
    "max_deliveries_per_connection": _integer(1),
    "idle_timeout": _positive_duration,
    "tls": _choice("opportunistic", "required", "disabled"),
    "smtp_port": _integer(1, 65535),
    "connect_timeout": _positive_duration,
}

# A lane named anything but "bulk" starts from the transactional defaults. True = default List-Unsubscribe.
_LANE_DEFAULTS: dict[str, dict[str, Any]] = {
    "transactional": {
        "workers": 1,
        "nice": 0,
        "egress_pool": ("default",),
        "retry_intervals": (10.0, 30.0, 60.0, 300.0, 900.0),
        "max_age": 6 * 3600.0,
        "sla_latency": 2.0,
        "sla_completion": None,
        "list_unsubscribe": False,
        "dsn": False,
    },
    "bulk": {
        "workers": 1,
        "nice": 10,
        "egress_pool": ("default",),
        "retry_intervals": (300.0, 900.0, 1800.0, 3600.0),
        "max_age": 3 * 86400.0,
        "sla_latency": None,
        "sla_completion": 4 * 3600.0,
        "list_unsubscribe": True,
        "dsn": False,
    },
}

_DEFAULT_LISTENERS = (
    {"name": "tx", "listen": "127.0.0.1:2525", "lane": "transactional"},
    {"name": "bulk", "listen": "127.0.0.1:2587", "lane": "bulk"},
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Address | Path | IPv4Network | IPv6Network):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    return value


# --- reading --------------------------------------------------------------------------------------------


class _Reader:
    """Turns one parsed TOML document into a Config, collecting every error it meets on the way."""

    def __init__(self, label: str, base_dir: Path) -> None:
        self.label = label
        self.base_dir = base_dir
        self.errors: list[str] = []

    def error(self, path: KeyPath, message: str) -> None:
        where = _format_path(path)
        self.errors.append(f"{self.label}: {where}: {message}" if where else f"{self.label}: {message}")

    def build(self, raw: dict[str, Any]) -> Config:
        raw = self.substitute_env(raw, ())
        for key in raw:
            if key not in _ROOT_KEYS:
                self.error((key,), _unknown_key(key, _ROOT_KEYS))
        engine = self.engine_settings(raw.get("engine", {}))
        admin = self.admin_settings(raw.get("admin", {}))
        dns = self.dns_settings(raw.get("dns", {}))
        routes = self.routes(raw.get("routes", {}))
        egress = self.egress(raw.get("egress", {}), engine.hostname)
        lanes = self.lanes(raw.get("lanes"), engine.hostname, egress)
        listeners = self.listeners(raw.get("listeners"), lanes, admin.listen)
        shaping = self.shaping(raw.get("shaping", {}))
        dkim = self.dkim(raw.get("dkim", {}))
        cluster = self.cluster(raw.get("cluster", {}))
        alerts = self.alerts(raw.get("alerts", {}))
        bounces = self.bounces(raw.get("bounces", {}))
        reputation = self.reputation(raw.get("reputation", {}))
        if self.errors:
            raise ConfigError(self.errors)
        config = Config(None, engine, admin, dns, routes, listeners, lanes, egress, shaping, dkim, cluster, alerts)
        return dataclasses.replace(config, bounces=bounces, reputation=reputation)

    def substitute_env(self, node: Any, path: KeyPath) -> Any:
        """Replace every "env:NAME" string value with that environment variable's value."""
        if isinstance(node, dict):
            return {key: self.substitute_env(value, (*path, key)) for key, value in node.items()}
        if isinstance(node, list):
            return [self.substitute_env(value, (*path, index)) for index, value in enumerate(node)]
        if isinstance(node, str) and node.startswith("env:"):
            name = node[4:]
            if name in os.environ:
                return _EnvStr(os.environ[name])
            self.error(path, f"environment variable {name!r} is not set")
            return _MISSING
        return node

    def table(self, raw: Any, path: KeyPath, spec: Spec, required: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """Parse the keys of one table by spec; None when the value is not a table at all."""
        if raw is _MISSING:
            return None
        if not isinstance(raw, dict):
            self.error(path, f"expected a table, got {_kind(raw)}")
            return None
        values: dict[str, Any] = {}
        for key, value in raw.items():
            parser = spec.get(key)
            if parser is None:
                self.error((*path, key), _unknown_key(key, spec))
                continue
            try:
                values[key] = self.value(parser, value, (*path, key))
            except ValueError as exc:
                self.error((*path, key), str(exc))
            except _Reported:
                pass
        for key in required:
            if key not in raw:
                self.error((*path, key), "missing required key")
        return values

    def value(self, parser: Callable[[Any], Any] | _ListOf, value: Any, path: KeyPath) -> Any:
        if value is _MISSING:
            raise _Reported
        if not isinstance(parser, _ListOf):
            return parser(value)
        if isinstance(value, _EnvStr):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ValueError(f"expected an array, got {_kind(value)}")
        if parser.nonempty and not value:
            raise ValueError("must not be empty")
        items, failed = [], False
        for index, item in enumerate(value):
            try:
                items.append(self.value(parser.element, item, (*path, index)))
            except ValueError as exc:
                self.error((*path, index), str(exc))
                failed = True
            except _Reported:
                failed = True
        if failed:
            raise _Reported
        return tuple(items)

    def named_tables(self, raw: Any, path: KeyPath) -> dict[str, Any]:
        """A table of tables ([lanes.NAME], [shaping."domain"]...): the sub-tables by key."""
        if raw is _MISSING:
            return {}
        if not isinstance(raw, dict):
            self.error(path, f"expected a table, got {_kind(raw)}")
            return {}
        return raw

    def path(self, must_exist: bool = False) -> Callable[[Any], Path]:
        def parse(value: Any) -> Path:
            resolved = self.base_dir / Path(_string(value)).expanduser()
            if must_exist and not resolved.is_file():
                raise ValueError(f"file not found: {resolved}")
            return resolved

        return parse

    # --- sections ---

    def engine_settings(self, raw: Any) -> EngineSettings:
        spec = {"hostname": _hostname, "spool_dir": self.path(), "log_dir": self.path(), "secret": _string}
        values = self.table(raw, ("engine",), spec) or {}
        return EngineSettings(
            hostname=values.get("hostname") or socket.getfqdn(),
            spool_dir=values.get("spool_dir", self.base_dir / "spool"),
            log_dir=values.get("log_dir", self.base_dir / "logs"),
            secret=values.get("secret"),
        )

    def admin_settings(self, raw: Any) -> AdminSettings:
        values = self.table(raw, ("admin",), {"listen": _address(), "token": _string}) or {}
        return AdminSettings(values.get("listen", Address("127.0.0.1", 8025)), values.get("token"))

    def dns_settings(self, raw: Any) -> DnsSettings:
        spec = {"nameservers": _ListOf(_address(53), nonempty=False), "timeout": _positive_duration}
        values = self.table(raw, ("dns",), spec) or {}
        return DnsSettings(values.get("nameservers", ()), values.get("timeout", 5.0))

    def routes(self, raw: Any) -> dict[str, Address]:
        routes: dict[str, Address] = {}
        for key, value in self.named_tables(raw, ("routes",)).items():
            path = ("routes", key)
            try:
                domain = _domain_key(key, allow_star=True)
                if value is _MISSING:
                    continue
                if domain in routes:
                    raise ValueError(f"duplicate route for {domain!r}")
                routes[domain] = _address()(value)
            except ValueError as exc:
                self.error(path, str(exc))
        return routes

    def egress(self, raw: Any, hostname: str) -> dict[str, Egress]:
        spec = {"source_address": _ip, "ehlo_name": _hostname, "weight": _integer(1)}
        pools = {"default": Egress("default", None, hostname, 1)}
        for name, table in self.named_tables(raw, ("egress",)).items():
            try:
                _name(name)
            except ValueError as exc:
                self.error(("egress", name), str(exc))
            values = self.table(table, ("egress", name), spec) or {}
            pools[name] = Egress(
                name, values.get("source_address"), values.get("ehlo_name", hostname), values.get("weight", 1)
            )
        return pools

    def lanes(self, raw: Any, hostname: str, egress: Mapping[str, Egress]) -> dict[str, Lane]:
        spec: Spec = {
            "workers": _integer(1),
            "nice": _integer(-20, 19),
            "egress_pool": _ListOf(_name),
            "retry_intervals": _ListOf(_positive_duration),
            "max_age": _positive_duration,
            "sla_latency": _optional_duration,
            "sla_completion": _optional_duration,
            "list_unsubscribe": lambda value: value,
            "dsn": _boolean,
        }
        tables = {name: {} for name in _LANE_DEFAULTS} if raw is None else self.named_tables(raw, ("lanes",))
        if raw is not None and not tables:
            self.error(("lanes",), "at least one lane is needed")
        lanes: dict[str, Lane] = {}
        for name, table in tables.items():
            path = ("lanes", name)
            try:
                _name(name)
            except ValueError as exc:
                self.error(path, str(exc))
            values = dict(_LANE_DEFAULTS.get(name, _LANE_DEFAULTS["transactional"]))
            values.update(self.table(table, path, spec) or {})
            values["list_unsubscribe"] = self.list_unsubscribe(
                values["list_unsubscribe"], (*path, "list_unsubscribe"), hostname
            )
            for index, pool in enumerate(values["egress_pool"]):
                if pool not in egress:
                    self.error((*path, "egress_pool", index), f"no egress named {pool!r} in [egress]")
            lanes[name] = Lane(name=name, **values)
        return lanes

    def list_unsubscribe(self, raw: Any, path: KeyPath, hostname: str) -> ListUnsubscribe | None:
        """false: none; true: mailto and https on the engine's host name; a table overrides either."""
        defaults = {"mailto": f"unsubscribe@{hostname}", "url": f"https://{hostname}/unsubscribe/{{token}}"}
        if isinstance(raw, _EnvStr):
            try:
                raw = _boolean(raw)
            except ValueError as exc:
                self.error(path, str(exc))
                return None
        if raw is False:
            return None
        if raw is True:
            return ListUnsubscribe(**defaults)
        if not isinstance(raw, dict):
            self.error(path, f"expected true, false or a table {{mailto, url}}, got {_kind(raw)}")
            return None
        values = self.table(raw, path, {"mailto": _mailbox, "url": _unsubscribe_url}) or {}
        return ListUnsubscribe(**{**defaults, **values})

    def listeners(self, raw: Any, lanes: Mapping[str, Lane], admin_listen: Address) -> tuple[Listener, ...]:
        spec: Spec = {
            "name": _name,
            "protocol": _choice("smtp", "http"),
            "listen": _address(),
            "lane": _name,
            "relay_from": _ListOf(_network, nonempty=False),
            "users_file": self.path(must_exist=True),
            "tls_cert": self.path(must_exist=True),
            "tls_key": self.path(must_exist=True),
            "max_message_size": _positive_size,
            "max_recipients": _integer(1),
            "idle_timeout": _positive_duration,
            "command_timeout": _positive_duration,
            "data_timeout": _positive_duration,
            "max_connections": _integer(1),
            "max_connections_per_ip": _integer(1),
        }
        if raw is None:
            tables = [entry for entry in _DEFAULT_LISTENERS if entry["lane"] in lanes]
            if not tables:
                self.error(("listeners",), "the built-in listeners need lanes 'transactional' or 'bulk'")
        elif isinstance(raw, list):
            tables = raw
            if not tables:
                self.error(("listeners",), "at least one listener is needed")
        else:
            self.error(("listeners",), f"expected [[listeners]] tables, got {_kind(raw)}")
            tables = []
        listeners: list[Listener] = []
        seen_names: dict[str, int] = {}
        seen_addresses: dict[Address, KeyPath] = {admin_listen: ("admin", "listen")}
        for index, table in enumerate(tables):
            path: KeyPath = ("listeners", index)
            values = self.table(table, path, spec, required=("listen", "lane"))
            if values is None:
                continue
            if "lane" in values and values["lane"] not in lanes:
                self.error((*path, "lane"), f"no lane named {values['lane']!r} in [lanes]")
            if ("tls_cert" in table) != ("tls_key" in table):
                self.error(path, "tls_cert and tls_key must be given together")
            if "users_file" in table and "tls_cert" not in table:
                needs = "STARTTLS" if values.get("protocol", "smtp") == "smtp" else "HTTPS"
                self.error((*path, "users_file"), f"authentication needs {needs}: set tls_cert and tls_key")
            name = values.setdefault("name", values.get("lane", str(index)))
            if name in seen_names and "name" in table:
                self.error((*path, "name"), f"duplicate name {name!r}, also in listeners[{seen_names[name]}]")
            elif name in seen_names:
                self.error(path, f"more than one listener is named {name!r} after its lane: set distinct names")
            seen_names[name] = index
            listen = values.get("listen")
            if listen in seen_addresses:
                other = _format_path(seen_addresses[listen])
                self.error((*path, "listen"), f"{listen} is already used by {other}")
            elif listen is not None:
                seen_addresses[listen] = (*path, "listen")
            if "listen" not in values or "lane" not in values:
                continue
            listeners.append(
                Listener(
                    name=name,
                    protocol=values.get("protocol", "smtp"),
                    listen=values["listen"],
                    lane=values["lane"],
                    relay_from=values.get(
                        "relay_from", (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1"))
                    ),
                    users_file=values.get("users_file"),
                    tls_cert=values.get("tls_cert"),
                    tls_key=values.get("tls_key"),
                    max_message_size=values.get("max_message_size", 25 << 20),
                    max_recipients=values.get("max_recipients", 100),
                    idle_timeout=values.get("idle_timeout", 300.0),
                    command_timeout=values.get("command_timeout", 300.0),
                    data_timeout=values.get("data_timeout", 600.0),
                    max_connections=values.get("max_connections", 1000),
                    max_connections_per_ip=values.get("max_connections_per_ip", 50),
                )
            )
        return tuple(listeners)

    def shaping(self, raw: Any) -> dict[str, Shaping]:
        """Built-in defaults < [shaping.default] < [shaping."domain"], field by field."""
        tables = self.named_tables(raw, ("shaping",))
        default_values = self.table(tables.get("default", {}), ("shaping", "default"), _SHAPING_SPEC) or {}
        default = dataclasses.replace(_SHAPING_DEFAULT, **default_values)
        rules = {"default": default}
        for key, table in tables.items():
            if key == "default":
                continue
            path = ("shaping", key)
            try:
                domain = _domain_key(key)
            except ValueError as exc:
                self.error(path, str(exc))
                continue
            if domain in rules:
                self.error(path, f"duplicate rule for {domain!r}")
            values = self.table(table, path, _SHAPING_SPEC) or {}
            rules[domain] = dataclasses.replace(default, **values)
        return rules

    def dkim(self, raw: Any) -> dict[str, DkimKey]:
        spec = {
            "selector": _hostname,
            "key_file": self.path(must_exist=True),
            "algorithm": _choice("rsa-sha256", "ed25519-sha256"),
        }
        keys: dict[str, DkimKey] = {}
        for key, table in self.named_tables(raw, ("dkim",)).items():
            path = ("dkim", key)
            values = self.table(table, path, spec, required=("selector", "key_file"))
            try:
                domain = _domain_key(key)
            except ValueError as exc:
                self.error(path, str(exc))
                continue
            if domain in keys:
                self.error(path, f"duplicate DKIM key for {domain!r}")
            if values and "selector" in values and "key_file" in values:
                algorithm = values.get("algorithm", "rsa-sha256")
                keys[domain] = DkimKey(domain, values["selector"], values["key_file"], algorithm)
        return keys

    def cluster(self, raw: Any) -> ClusterSettings:
        values = self.table(raw, ("cluster",), {"redis": _redis_url}) or {}
        return ClusterSettings(values.get("redis"))

    def alerts(self, raw: Any) -> AlertSettings:
        spec = {"window": _positive_duration, "webhook": _webhook_url}
        values = self.table(raw, ("alerts",), spec) or {}
        return AlertSettings(values.get("window", 60.0), values.get("webhook"))

    def bounces(self, raw: Any) -> BounceSettings:
        values = self.table(raw, ("bounces",), {"rules": _ListOf(lambda rule: rule, nonempty=False)}) or {}
        rules = []
        spec = {"class": _choice(*BOUNCE_CLASSES), "code": _code_glob, "enhanced": _enhanced_glob, "text": _regex}
        for index, table in enumerate(values.get("rules", ())):
            path = ("bounces", "rules", index)
            rule = self.table(table, path, spec, required=("class",))
            if rule is None or "class" not in rule:
                continue
            if not {"code", "enhanced", "text"} & table.keys():
                self.error(path, "a rule needs at least one of code, enhanced, text")
                continue
            rules.append(BounceRule(rule["class"], rule.get("code"), rule.get("enhanced"), rule.get("text")))
        return BounceSettings(tuple(rules))

    def reputation(self, raw: Any) -> ReputationSettings:
        spec = {
            "window": _positive_duration,
            "min_messages": _integer(1),
            "max_bounce_rate": _fraction,
            "max_complaint_rate": _fraction,
            "feedback_address": _mailbox,
        }
        values = self.table(raw, ("reputation",), spec) or {}
        return ReputationSettings(**values)
