"""Several nodes, one cluster: the supervisor's agent that shares suppression, suspensions and message
rates with the other nodes through Redis (`[cluster] redis`).

Nothing on a worker's hot path waits on Redis. Each node keeps the suppression list and the suspensions
locally and replicates them (engine.cluster.suppression, .suspensions); rates are leased in batches into
the lane tables (engine.cluster.rates). A session with Redis starts by catching up: this node's unsent
changes go out, then it follows the change stream from where it left off, or, when that part of the
stream is gone or the cluster's data is new (its epoch changed), it offers its own entries and copies the
cluster's. When Redis fails the session ends: the lane tables shape alone, local changes wait, a warning
is logged once, and new sessions are tried with a growing backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Coroutine, Mapping

from engine.admin.store import Rule
from engine.cluster.link import BLOCK, CHANGES, COMMAND_TIMEOUT, EPOCH, NODES, Link, LinkError, redacted
from engine.cluster.rates import TICK, RateLeaser
from engine.cluster.suppression import SuppressionReplica
from engine.cluster.suspensions import Node, SuspensionReplica
from engine.suppression import SuppressionList
from engine.throttle import ThrottleTable

__all__ = ["Cluster"]

log = logging.getLogger("engine.cluster")

BACKOFF_MIN = 0.2  # seconds before the first new session after a failure; doubles up to BACKOFF_MAX
BACKOFF_MAX = 5.0
PUBLISH_INTERVAL = 0.05  # how often the suppression journal is read (workers write it without a signal)
HEARTBEAT = 1.0  # nodes are counted by heartbeats younger than 5 of these
BATCH = 500


def _stream_id(position: bytes) -> tuple[int, int]:
    milliseconds, _, sequence = position.partition(b"-")
    return int(milliseconds), int(sequence or 0)


class Cluster:
    """Started by the supervisor when `[cluster] redis` is set; runs until close()."""

    def __init__(
        self, url: str, name: str, node: Node, suppression: SuppressionList, tables: Mapping[str, ThrottleTable]
    ) -> None:
        self.url = url
        self.name = name
        self.link = Link(url, name)
        self.suppression = SuppressionReplica(self.link, suppression)
        self.suspensions = SuspensionReplica(self.link, node)
        self.rates = RateLeaser(self.link, tables)
        self.joined = False
        self._list = suppression
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._alone_since: float | None = None
        self._closed = False
        self._live = False  # the session's loops run while this holds (see _session)

    def start(self) -> None:
        """Journals local suppression changes from now on, then keeps a session with Redis going."""
        self._list.set_journal(True)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closed, self._live = True, False
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=BLOCK + 2 * COMMAND_TIMEOUT)
        self.rates.set_leased(False)
        await self.link.close()

    def rule_added(self, rule: Rule) -> None:
        """A suspension made on this node (API or reputation guard): shared with every node."""
        self.suspensions.added(rule)
        self._wake.set()

    def rule_removed(self, rule_id: str) -> None:
        self.suspensions.removed(rule_id)
        self._wake.set()

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._closed:
            started = time.monotonic()
            try:
                await self._session()
            except* LinkError as group:
                self._left(group.exceptions[0])
            except* Exception as group:  # a fault of ours: replication must still come back
                log.error("cluster: session failed", exc_info=group.exceptions[0])
                self._left(group.exceptions[0])
            if time.monotonic() - started > BACKOFF_MAX:
                backoff = BACKOFF_MIN
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _left(self, error: BaseException) -> None:
        self.joined = False
        self.rates.set_leased(False)
        if self._alone_since is None:
            self._alone_since = time.monotonic()
            log.warning(
                "cluster: no Redis at %s (%s: %s): this node shapes, suspends and suppresses alone, "
                "keeps its changes and catches up when Redis is back",
                redacted(self.url),
                type(error).__name__,
                error,
            )

    async def _session(self) -> None:
        commands = self.link.commands
        await commands.set(EPOCH, secrets.token_hex(8), nx=True)
        epoch = await commands.get(EPOCH)
        fresh = self._list.state("epoch") != epoch
        stored = None if fresh else self._list.state("stream")
        position = stored if stored is not None and await self._in_stream(stored) else await self._stream_end()
        sent = await self.suppression.publish() + await self.suspensions.publish()
        offered = await self.suppression.seed() + await self.suspensions.seed() if fresh else 0
        copied = await self.suppression.copy() if position != stored else 0
        adopted, dropped = await self.suspensions.reconcile()
        await asyncio.to_thread(self._list.apply, [], {"epoch": epoch, "stream": position})
        await self._heartbeat_once()
        nodes = await commands.zcount(NODES, f"{time.time() - 5 * HEARTBEAT}", "+inf")
        self.rates.set_leased(True)
        self.joined = True
        alone = "" if self._alone_since is None else f" after {time.monotonic() - self._alone_since:.1f}s alone"
        self._alone_since = None
        log.info(
            "cluster: joined %s as %s%s (%d nodes): sent %d changes, offered %d, copied %d suppressions, "
            "%d suspensions adopted, %d dropped",
            redacted(self.url),
            self.name,
            alone,
            nodes,
            sent,
            offered,
            copied,
            adopted,
            dropped,
        )
        self._live = True
        try:
            async with asyncio.TaskGroup() as group:
                for loop in (self._follow(position), self._publish(), self._lease(), self._heartbeat()):
                    group.create_task(self._while_live(loop))
        finally:
            self.joined = self._live = False
            self.rates.set_leased(False)

    async def _while_live(self, loop: Coroutine[None, None, None]) -> None:
        """One of the session's loops; when one ends, the others end too. Each loop also checks _live, so
        a cancellation a blocking Redis read swallows (it happens) cannot keep the session going."""
        try:
            await loop
        finally:
            self._live = False

    async def _in_stream(self, position: bytes) -> bool:
        """Whether every change after `position` is still in the stream (it is trimmed to a length)."""
        first = await self.link.commands.xrange(CHANGES, "-", "+", count=1)
        return not first or _stream_id(first[0][0]) <= _stream_id(position)

    async def _stream_end(self) -> bytes:
        last = await self.link.commands.xrevrange(CHANGES, "+", "-", count=1)
        return last[0][0] if last else b"0-0"

    async def _follow(self, position: bytes) -> None:
        """Applies every change announced after `position`, this node's own included (they are no-ops)."""
        while self._live:
            answer = await self.link.follower.xread({CHANGES: position}, count=BATCH, block=int(1000 * BLOCK))
            for _, entries in answer or ():
                suppressions = []
                for _, fields in entries:
                    change = (fields[b"op"], fields[b"key"], fields[b"value"])
                    if fields[b"kind"] == b"suppression":
                        suppressions.append(change)
                    elif fields[b"kind"] == b"suspension":
                        await self.suspensions.apply(*change)
                position = entries[-1][0]
                await self.suppression.apply(suppressions, position)

    async def _publish(self) -> None:
        while self._live:
            self._wake.clear()
            await self.suppression.publish()
            await self.suspensions.publish()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PUBLISH_INTERVAL)

    async def _lease(self) -> None:
        while self._live:
            await self.rates.lease()
            await asyncio.sleep(TICK * random.uniform(0.5, 1.5))

    async def _heartbeat_once(self) -> None:
        now = time.time()
        async with self.link.commands.pipeline(transaction=False) as pipe:
            pipe.zadd(NODES, {self.name: now})
            pipe.zremrangebyscore(NODES, "-inf", now - 5 * HEARTBEAT)
            await pipe.execute()

    async def _heartbeat(self) -> None:
        while self._live:
            await asyncio.sleep(HEARTBEAT)
            await self._heartbeat_once()
