"""Message rates that hold for the whole cluster: tokens leased from Redis in batches, spent locally.

A Redis round trip per message would cost more than the delivery, so the supervisor leases for its lane
tables: every TICK it reads which (egress, destination) slots wanted or used tokens (ThrottleTable.demand)
and asks Redis for a batch per slot. The script runs GCRA over the batch on Redis's clock, one state per
(lane, egress, destination) for every node, so the tokens granted to all nodes together never exceed
rate * t + burst in any window of t seconds. A node spends its tokens through its own table (workers
never wait on Redis) and drops those left after VALIDITY, so a lease cannot turn into a burst later.
Nodes ask at jittered times, and a grant is capped at the node's share among the nodes leasing that rate,
so busy nodes share it evenly while a node alone gets all of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from engine.cluster.link import PREFIX, Link
from engine.throttle import ThrottleTable

__all__ = ["TICK", "RateLeaser"]

TICK = 0.05  # seconds between leases (jittered by the caller)
VALIDITY = 4 * TICK  # a leased token unused this long is dropped
ACTIVE = 0.5  # seconds a node counts as leasing a rate after it last asked

# KEYS: the rate's clock, the nodes leasing it. ARGV: microseconds per message, burst, tokens wanted, node,
# the node's batch, ACTIVE in microseconds. A node gets at most its batch divided by the nodes that leased in
# the last ACTIVE seconds, so the node that asks first cannot take the others' share: what it leaves stays
# on the clock for them.
_LEASE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[6]))
redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[6]) / 500))
local cap = math.max(1, math.ceil(tonumber(ARGV[5]) / redis.call('ZCARD', KEYS[2])))
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local granted = math.min(math.floor((now + burst * interval - tat) / interval), tonumber(ARGV[3]), cap)
if granted < 1 then return 0 end
tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return granted
"""


def batch(rate: float, burst: int) -> int:
    """Tokens a node holds at most for one key: two ticks' worth at the full rate, at least the burst."""
    return max(burst, math.ceil(rate * TICK * 2))


def wanted(rate: float, burst: int, tokens: int, refused: int, taken: int) -> int:
    """A slot whose workers were refused gets topped up to a full batch; one that only spent tokens gets
    back what it spent (so a trickle does not hold tokens the busy nodes could use)."""
    room = batch(rate, burst) - tokens
    return room if refused else min(taken, room)


class RateLeaser:
    """Leases tokens for every lane table of this node."""

    def __init__(self, link: Link, tables: Mapping[str, ThrottleTable]) -> None:
        self._link = link
        self._tables = tables
        self._lease = link.commands.register_script(_LEASE)

    def set_leased(self, leased: bool) -> None:
        """On: workers need leased tokens; off: each node shapes alone (Redis is unreachable)."""
        for table in self._tables.values():
            table.set_leased(leased)

    async def lease(self) -> int:
        """One round for every slot that wants tokens, in one pipeline; returns the tokens granted."""
        now = time.monotonic()
        asks = []
        for lane, table in self._tables.items():
            for key, rate, burst, tokens, refused, taken in table.demand(now):
                want = wanted(rate, burst, tokens, refused, taken)
                if want > 0 and rate > 0:
                    asks.append((table, key, f"{PREFIX}rate:{lane}:{key:016x}", rate, burst, want))
        if not asks:
            return 0
        async with self._link.commands.pipeline(transaction=False) as pipe:
            for _, _, name, rate, burst, want in asks:
                arguments = [1e6 / rate, burst, want, self._link.node, batch(rate, burst), int(ACTIVE * 1e6)]
                await self._lease(keys=[name, name + ":nodes"], args=arguments, client=pipe)
            granted = await pipe.execute()
        now = time.monotonic()
        for (table, key, *_), tokens in zip(asks, granted, strict=True):
            if tokens:  # none granted: the slot keeps its demand for the next round
                table.grant(key, int(tokens), now, now + VALIDITY)
        return sum(int(tokens) for tokens in granted)
