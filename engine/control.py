"""The control channel between the supervisor and one worker: msgpack frames over a socketpair.

The supervisor keeps one end and passes the other to the worker as an inherited descriptor
(`engine worker --control FD`). Before the worker starts it writes one `init` frame: the configuration the
supervisor validated (so a worker restarted after someone broke engine.toml still runs the good one) and the
lane's operator suspensions, which the worker applies before it recovers its spool, so nothing suspended
slips out after a restart. After that the supervisor sends requests `{"id", "op", "args"}` and the worker
answers each with `{"id", "result"}` or `{"id", "error"}`. A worker may also send a notice `{"notice", "args"}`
unasked, for what must reach the whole lane (a campaign its reputation guard suspended). Only control data
crosses it, never message bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from engine.config import Config
from engine.metrics import EventTally

log = logging.getLogger(__name__)

CALL_TIMEOUT = 10.0
READ_SIZE = 65536
INIT_TIMEOUT = 10.0

Handler = Callable[..., Awaitable[Any] | Any]


class ControlError(Exception):
    """The worker refused a request, or the channel closed before it answered."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end); only the worker end is inheritable."""
    supervisor_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker_end.set_inheritable(True)
    return supervisor_end, worker_end


def _pack(frame: dict) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def _unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=64 << 20)


def send_init(sock: socket.socket, config: Config, suspensions: list[dict]) -> None:
    """Queues the init frame on the supervisor end (blocking; it fits in the socket buffer).

    The configuration travels pickled: it is made of frozen dataclasses, and both ends are the same program.
    """
    sock.sendall(_pack({"op": "init", "config": pickle.dumps(config), "suspensions": suspensions}))


@dataclass
class Channel:
    """The worker end after its init frame; bytes after the frame (early requests) stay in `unpacker`."""

    sock: socket.socket
    config: Config
    suspensions: list[dict]
    unpacker: msgpack.Unpacker


def read_init(sock: socket.socket) -> Channel:
    """The init frame, read blocking before the worker loads anything else."""
    unpacker = _unpacker()
    sock.settimeout(INIT_TIMEOUT)
    try:
        while True:
            for frame in unpacker:
                if frame.get("op") != "init":
                    raise ControlError(f"expected an init frame, got {frame.get('op')!r}")
                return Channel(sock, pickle.loads(frame["config"]), frame["suspensions"], unpacker)
            data = sock.recv(READ_SIZE)
            if not data:
                raise ControlError("control channel closed before the init frame")
            unpacker.feed(data)
    finally:
        sock.settimeout(None)


class Outbox:
    """Frames a worker sends unasked; those made before the channel is connected wait for it."""

    def __init__(self) -> None:
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: list[bytes] = []

    def connect(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        for frame in self._waiting:
            writer.write(frame)
        self._waiting.clear()

    def notice(self, kind: str, **args: Any) -> None:
        frame = _pack({"notice": kind, "args": args})
        if self._writer is None:
            self._waiting.append(frame)
        elif not self._writer.is_closing():
            self._writer.write(frame)


async def serve(
    sock: socket.socket, handlers: dict[str, Handler], unpacker: msgpack.Unpacker, outbox: Outbox | None = None
) -> None:
    """Worker side: answers requests until the supervisor closes its end; `outbox` sends over the same end."""
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    if outbox is not None:
        outbox.connect(writer)
    try:
        while True:
            for frame in unpacker:
                writer.write(_pack(await _answer(handlers, frame)))
            data = await reader.read(READ_SIZE)
            if not data:
                return
            unpacker.feed(data)
    finally:
        writer.close()


async def _answer(handlers: dict[str, Handler], frame: dict) -> dict:
    request_id = frame.get("id")
    handler = handlers.get(frame.get("op"))
    if handler is None:
        return {"id": request_id, "error": f"unknown operation {frame.get('op')!r}"}
    try:
        result = handler(**(frame.get("args") or {}))
        if asyncio.iscoroutine(result):
            result = await result
    except Exception as error:
        log.exception("control operation %s failed", frame.get("op"))
        return {"id": request_id, "error": f"{type(error).__name__}: {error}"}
    return {"id": request_id, "result": result}


Notice = Callable[[str, dict], None]


class ControlClient:
    """Supervisor side of one worker's channel: `await call(op, **args)`, answers matched by id; the worker's
    notices go to `on_notice(kind, args)`."""

    def __init__(self, sock: socket.socket, on_notice: Notice | None = None) -> None:
        self._sock = sock
        self._on_notice = on_notice
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._started = asyncio.Event()
        self.closed = False

    async def start(self) -> None:
        self._sock.setblocking(False)
        reader, self._writer = await asyncio.open_connection(sock=self._sock)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))
        self._started.set()

    async def call(self, op: str, timeout: float = CALL_TIMEOUT, **args: Any) -> Any:
        """The worker's answer; requests made while the channel is still starting wait for it."""
        if not self._started.is_set():
            try:
                await asyncio.wait_for(self._started.wait(), timeout)
            except TimeoutError:
                raise ControlError("worker is not connected") from None
        if self.closed or self._writer is None:
            raise ControlError("worker is not connected")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._writer.write(_pack({"id": request_id, "op": op, "args": args}))
        try:
            frame = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ControlError(f"worker did not answer {op!r} within {timeout:.0f}s") from None
        finally:
            self._pending.pop(request_id, None)
        if "error" in frame:
            raise ControlError(frame["error"])
        return frame.get("result")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        unpacker = _unpacker()
        try:
            while data := await reader.read(READ_SIZE):
                unpacker.feed(data)
                for frame in unpacker:
                    if "notice" in frame:
                        self._notice(frame)
                        continue
                    future = self._pending.get(frame.get("id"))
                    if future is not None and not future.done():
                        future.set_result(frame)
        except ConnectionResetError:
            pass  # the worker exited; its restart gets a new channel
        except (ConnectionError, ValueError) as error:
            log.warning("control channel broken: %s", error)
        finally:
            self._fail_pending()

    def _notice(self, frame: dict) -> None:
        if self._on_notice is None:
            return
        try:
            self._on_notice(frame["notice"], frame.get("args") or {})
        except Exception:
            log.exception("worker notice %r failed", frame.get("notice"))

    def _fail_pending(self) -> None:
        self.closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ControlError("worker closed the control channel"))

    async def close(self) -> None:
        self.closed = True
        self._started.set()
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._fail_pending()


class WorkerControl:
    """Worker side: the operations the supervisor may ask of a worker, over its dispatcher and event log."""

    def __init__(self, dispatcher: Any, events: Any, resolver: Any) -> None:
        self.dispatcher = dispatcher
        self.resolver = resolver
        self.outbox = Outbox()
        self.tally = EventTally()
        events.subscribers.append(self.tally)
        self._dns_seen = dict(resolver.stats)

    def handlers(self) -> dict[str, Handler]:
        dispatcher = self.dispatcher
        return {
            "stats": self.stats,
            "queues": dispatcher.queue_summary,
            "suspend": dispatcher.suspend,
            "resume": dispatcher.resume,
            "suspensions": dispatcher.suspensions,
            "bounce": dispatcher.admin_bounce,
        }

    def stats(self) -> dict:
        """Event counts and DNS cache results since the last call, and the open sessions now."""
        current = dict(self.resolver.stats)
        dns = {name: value - self._dns_seen.get(name, 0) for name, value in current.items()}
        self._dns_seen = current
        return {"events": self.tally.drain(), "connections": self.dispatcher.connections(), "dns": dns}

    def attach(self, channel: Channel) -> asyncio.Task:
        """Applies the init frame's suspensions (call before recovering the spool), then serves requests."""
        for args in channel.suspensions:
            self.dispatcher.suspend(**args)
        serving = serve(channel.sock, self.handlers(), channel.unpacker, self.outbox)
        return asyncio.get_running_loop().create_task(serving)

    def suspend_lane(self, rule_id: str, **args: Any) -> None:
        """Suspends here at once, and asks the supervisor to make the rule lane-wide and durable."""
        self.dispatcher.suspend(rule_id, **args)
        self.outbox.notice("suspend", rule_id=rule_id, **args)
