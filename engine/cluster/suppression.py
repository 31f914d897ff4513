"""The suppression list, replicated: every node keeps the whole list in its own LMDB and sends its changes
to the others through Redis, so workers check recipients without leaving the host.

Local changes (admin API, unsubscribes, hard bounces, complaints, in any process) land in the list's
journal (engine.suppression); publish() writes them to the `engine:suppression` hash and announces them on
the change stream, oldest first, and only then forgets them, so an add made while Redis is down waits
durably and goes out when it is back. Changes from the stream are applied without being journaled again.
"""

from __future__ import annotations

import asyncio

from engine.cluster.link import PREFIX, Link
from engine.suppression import Change, SuppressionList

__all__ = ["SuppressionReplica"]

HASH = PREFIX + "suppression"  # list key (tenant NUL address) -> packed [reason, created]
BATCH = 1000


def _op(change: Change, op: str = "add") -> tuple[str, bytes, bytes]:
    return ("remove", change.key, b"") if change.value is None else (op, change.key, change.value)


class SuppressionReplica:
    def __init__(self, link: Link, suppression: SuppressionList) -> None:
        self._link = link
        self.suppression = suppression

    async def publish(self) -> int:
        """Sends the journal to the cluster, oldest change first; returns how many changes went out."""
        sent = 0
        while pending := self.suppression.journal(BATCH):
            await self._link.publish("suppression", HASH, [_op(change) for _, change in pending])
            await asyncio.to_thread(self.suppression.forget, [position for position, _ in pending])
            sent += len(pending)
        return sent

    async def seed(self) -> int:
        """Offers every local entry to a cluster this node has not synced with (it is new, or Redis lost
        its data): entries the cluster lacks are added and announced. Returns how many it lacked."""
        added, after = 0, b""
        while page := self.suppression.items(after, BATCH):
            added += await self._link.publish("suppression", HASH, [_op(change, "seed") for change in page])
            after = page[-1].key
        return added

    async def copy(self) -> int:
        """Adds every entry of the cluster's hash that the local list lacks; returns how many."""
        copied, cursor = 0, 0
        while True:
            cursor, found = await self._link.commands.hscan(HASH, cursor, count=BATCH)
            if found:
                changes = [Change(key, value) for key, value in found.items()]
                copied += await asyncio.to_thread(self.suppression.apply, changes)
            if cursor == 0:
                return copied

    async def apply(self, announced: list[tuple[bytes, bytes, bytes]], position: bytes) -> int:
        """Applies (op, key, value) changes from the stream and remembers the stream position with them."""
        changes = [Change(key, value if op == b"add" else None) for op, key, value in announced]
        return await asyncio.to_thread(self.suppression.apply, changes, {"stream": position})
