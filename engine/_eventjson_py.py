"""Pure-Python twin of engine._eventjson: the json module, configured as the event log writes."""

from __future__ import annotations

import json

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_record(record: dict) -> bytes:
    """One JSON line (with its newline) for a record."""
    return _encode(record).encode() + b"\n"
