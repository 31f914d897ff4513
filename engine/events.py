"""The event log: every state change of a message as one JSON line (SPEC.md "Event log").

Lines are buffered and written once per event-loop turn, so a burst of events costs one write call;
files rotate by size. Metrics subscribe to the same records, so the log and the counters never disagree.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from engine.envelope import Envelope
from engine.eventjson import encode_record

EVENT_TYPES = frozenset(
    {
        "Reception",
        "Delivery",
        "TransientFailure",
        "Bounce",
        "Expiration",
        "AdminBounce",
        "Suppressed",
        "Rejection",
        "Alert",
    }
)

Subscriber = Callable[[dict], None]


class EventLog:
    """Appends records to DIR/NAME.jsonl, rotating to DIR/NAME.TIMESTAMP.jsonl past `rotate_bytes`."""

    def __init__(self, directory: Path, name: str, *, rotate_bytes: int = 256 << 20) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._directory = directory
        self._name = name
        self._path = directory / f"{name}.jsonl"
        self._rotate_bytes = rotate_bytes
        self._file = self._path.open("ab", buffering=0)
        self._written = self._path.stat().st_size
        self._buffer: list[bytes] = []
        self._flush_scheduled = False
        self.subscribers: list[Subscriber] = []

    def emit(self, record: dict) -> None:
        for subscriber in self.subscribers:
            subscriber(record)
        self._buffer.append(encode_record(record))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._file.write(data)
        self._written += len(data)
        if self._written >= self._rotate_bytes:
            self._rotate()

    def close(self) -> None:
        self.flush()
        self._file.close()

    def _rotate(self) -> None:
        self._file.close()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self._directory / f"{self._name}.{stamp}.jsonl"
        counter = 1
        while target.exists():
            target = self._directory / f"{self._name}.{stamp}-{counter}.jsonl"
            counter += 1
        self._path.rename(target)
        self._file = self._path.open("ab", buffering=0)
        self._written = 0


def message_record(event: str, key: bytes, envelope: Envelope, **fields: object) -> dict:
    """The fields every record about a message carries; `fields` adds or overrides."""
    record = {
        "type": event,
        "id": key.hex(),
        "lane": envelope.lane,
        "sender": envelope.sender,
        "campaign": envelope.campaign,
        "tenant": envelope.tenant,
        "priority": envelope.priority,
        "size": envelope.size,
        "created": envelope.created,
        "timestamp": time.time(),
    }
    record.update(fields)
    return record


def read_events(directory: Path, types: Iterable[str] | None = None) -> list[dict]:
    """Every record under `directory` (all *.jsonl files), optionally only the given types."""
    wanted = set(types) if types is not None else None
    records = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            if not line:
                continue
            record = json.loads(line)
            if wanted is None or record["type"] in wanted:
                records.append(record)
    return records
