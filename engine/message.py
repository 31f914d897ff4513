"""Header changes made at reception: Received, a missing Message-ID, and the X-Engine-* controls.

Works on the raw bytes of the header block only (the body is never copied line by line), because this
runs for every message on the reception hot path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import formatdate

CONTROL_PREFIX = b"x-engine-"
CAMPAIGN = b"x-engine-campaign"
TENANT = b"x-engine-tenant"
PRIORITY = b"x-engine-priority"
DEFAULT_PRIORITY = 5


class ControlError(ValueError):
    """An X-Engine-* header the engine cannot honour; the message is refused, not silently changed."""


@dataclass(frozen=True, slots=True)
class Controls:
    campaign: str | None = None
    tenant: str | None = None
    priority: int = DEFAULT_PRIORITY


def header_fields(block: bytes) -> list[bytes]:
    """Header fields of a header block, each with its continuation lines and final CRLF."""
    fields: list[bytes] = []
    for line in block.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header block ending in CRLF, rest starting with the blank line) — the rest may be empty."""
    if message.startswith(b"\r\n"):
        return b"", message
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return (message if message.endswith(b"\r\n") else message + b"\r\n"), b""
    return message[: end + 2], message[end + 2 :]


def field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def field_value(field: bytes) -> str:
    value = field.split(b":", 1)[1] if b":" in field else b""
    return b" ".join(value.split()).decode("utf-8", "replace")


def prepare(message: bytes, received: bytes, message_id: bytes) -> tuple[bytes, Controls]:
    """Prepends `received`, adds `message_id` (a full "Message-ID: ...\\r\\n" field) when the message has
    none, and strips the X-Engine-* controls, returning their values."""
    block, rest = split_message(message)
    campaign = tenant = None
    priority = DEFAULT_PRIORITY
    kept: list[bytes] = [received]
    has_message_id = False
    for field in header_fields(block):
        name = field_name(field)
        if name.startswith(CONTROL_PREFIX):
            value = field_value(field)
            if name == CAMPAIGN:
                campaign = value or None
            elif name == TENANT:
                tenant = value or None
            elif name == PRIORITY:
                if not (len(value) == 1 and value.isdigit()):
                    raise ControlError(f"X-Engine-Priority must be a digit 0-9, got {value!r}")
                priority = int(value)
            continue
        if name == b"message-id":
            has_message_id = True
        kept.append(field)
    if not has_message_id:
        kept.append(message_id)
    kept.append(rest)
    return b"".join(kept), Controls(campaign, tenant, priority)


_date_cache: tuple[int, str] = (0, "")


def rfc5322_date() -> str:
    """The current date in RFC 5322 form, computed at most once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, localtime=False))
    return _date_cache[1]


def received_field(helo: str | None, peer: str, hostname: str, protocol: str, key_hex: str) -> bytes:
    """An RFC 5321 4.4 trace field for this hop."""
    helo_text = "".join(ch for ch in (helo or "unknown") if 32 < ord(ch) < 127 and ch not in "()")[:255]
    return (
        f"Received: from {helo_text} ([{peer}])\r\n\tby {hostname} (engine) with {protocol} id {key_hex};\r\n"
        f"\t{rfc5322_date()}\r\n"
    ).encode()
