"""The supervisor's connection to the cluster's Redis: clients with short timeouts, the key names, and the
one script that writes a change and announces it.

Every shared thing has a hash holding its current state and announces each change on one stream
(`engine:changes`), so a node can take the whole state once and then follow, or catch up from where it
left off. Redis calls never retry on their own: a failure ends the node's session with the cluster at
once (engine.cluster.Cluster), and the node works alone until a new session catches it up.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = ["CHANGES", "EPOCH", "NODES", "Link", "LinkError", "redacted"]

PREFIX = "engine:"
EPOCH = PREFIX + "epoch"  # a random name the cluster's data got when it was created: new name, data lost
CHANGES = PREFIX + "changes"  # the stream of every change: kind, op (add|remove), key, value, node
NODES = PREFIX + "nodes"  # sorted set: node name -> last heartbeat (Redis time)
STREAM_LENGTH = 100_000  # changes kept for nodes catching up; one further behind copies the whole state
COMMAND_TIMEOUT = 0.5  # seconds; Redis answers in well under a millisecond when it is healthy
BLOCK = 1.0  # seconds a follower waits for new changes per call

LinkError = (RedisError, OSError)  # what a lost or refused connection raises

# KEYS: hash, stream. ARGV: kind, node, stream length, then op/key/value triples. "seed" adds only keys the
# hash lacks (a node bringing its own entries); every write that changed the hash is announced.
_PUBLISH = """
local announced = 0
for i = 4, #ARGV, 3 do
  local op, key, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local changed = 1
  if op == 'add' then
    redis.call('HSET', KEYS[1], key, value)
  elseif op == 'seed' then
    changed = redis.call('HSETNX', KEYS[1], key, value)
    op = 'add'
  else
    changed = redis.call('HDEL', KEYS[1], key)
  end
  if changed == 1 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
      'kind', ARGV[1], 'op', op, 'key', key, 'value', value, 'node', ARGV[2])
    announced = announced + 1
  end
end
return announced
"""


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Link:
    """Two clients on one Redis: `commands` for quick calls, `follower` for blocking stream reads."""

    def __init__(self, url: str, node: str) -> None:
        self.url = url
        self.node = node
        options = {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": COMMAND_TIMEOUT}
        self.commands = redis.from_url(url, socket_timeout=COMMAND_TIMEOUT, **options)
        self.follower = redis.from_url(url, socket_timeout=BLOCK + COMMAND_TIMEOUT, **options)
        self._publish = self.commands.register_script(_PUBLISH)

    async def publish(self, kind: str, hash_key: str, changes: Iterable[tuple[str, bytes, bytes]]) -> int:
        """Writes (op, key, value) changes to `hash_key` and announces them; returns how many changed it."""
        arguments: list[bytes | str | int] = [kind, self.node, STREAM_LENGTH]
        for op, key, value in changes:
            arguments += [op, key, value]
        if len(arguments) == 3:
            return 0
        return int(await self._publish(keys=[hash_key, CHANGES], args=arguments))

    async def close(self) -> None:
        await self.commands.aclose()
        await self.follower.aclose()
