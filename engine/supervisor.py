"""The supervisor: binds every listener, starts the lane workers, restarts the ones that die.

Workers are separate processes started with the listening sockets passed down (fork and exec), so each
opens its own LMDB spool and uvloop loop from a clean state, and a crash in one lane never touches another.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from engine.config import Config, ConfigError, Listener, load_config
from engine.signing import DkimKeyError, DkimSigner

log = logging.getLogger("engine.supervisor")

RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 30.0
HEALTHY_AFTER = 60.0  # a worker that lived this long restarts without backoff
STOP_TIMEOUT = 45.0  # after SIGTERM, a worker gets this long before SIGKILL


@dataclass
class WorkerSlot:
    lane: str
    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = RESTART_BACKOFF_MIN
    history: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.lane}/{self.index}"


def bind_listener(listener: Listener) -> socket.socket:
    """A listening socket; SO_REUSEADDR so a restart does not wait for TIME_WAIT."""
    family = socket.AF_INET6 if ":" in listener.listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((listener.listen.host, listener.listen.port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.sockets: dict[str, socket.socket] = {}
        self.slots: list[WorkerSlot] = []
        self.stopping = asyncio.Event()
        self.started = time.time()

    async def run(self) -> int:
        for listener in self.config.listeners:
            self.sockets[listener.name] = bind_listener(listener)
            log.info("listener %s on %s (lane %s)", listener.name, listener.listen, listener.lane)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.slots = [
            WorkerSlot(lane.name, index) for lane in self.config.lanes.values() for index in range(lane.workers)
        ]
        tasks = [loop.create_task(self._supervise(slot)) for slot in self.slots]
        await self.stopping.wait()
        log.info("stopping: workers finish their sessions and flush their spools")
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
        for sock in self.sockets.values():
            sock.close()
        log.info("stopped")
        return 0

    def _worker_command(self, slot: WorkerSlot) -> list[str]:
        command = [sys.executable, "-m", "engine", "worker", "--lane", slot.lane, "--index", str(slot.index)]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        for listener in self.config.listeners:
            if listener.lane == slot.lane:
                command += ["--fd", f"{listener.name}={self.sockets[listener.name].fileno()}"]
        return command

    async def _supervise(self, slot: WorkerSlot) -> None:
        while not self.stopping.is_set():
            command = self._worker_command(slot)
            fds = [self.sockets[name].fileno() for name in self.sockets if f"{name}=" in " ".join(command)]
            slot.process = await asyncio.create_subprocess_exec(*command, pass_fds=fds)
            slot.started = time.monotonic()
            log.info("worker %s started, pid %d", slot.name, slot.process.pid)
            returncode = await self._wait(slot.process)
            slot.history.append(returncode)
            if self.stopping.is_set():
                log.info("worker %s exited with %d", slot.name, returncode)
                return
            lived = time.monotonic() - slot.started
            slot.backoff = RESTART_BACKOFF_MIN if lived > HEALTHY_AFTER else min(slot.backoff * 2, RESTART_BACKOFF_MAX)
            slot.restarts += 1
            log.error(
                "worker %s died (exit %d) after %.1fs; restarting in %.1fs",
                slot.name,
                returncode,
                lived,
                slot.backoff,
            )
            try:
                await asyncio.wait_for(self.stopping.wait(), slot.backoff)
            except TimeoutError:
                continue

    async def _wait(self, process: asyncio.subprocess.Process) -> int:
        waiter = asyncio.ensure_future(process.wait())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            try:
                return await asyncio.wait_for(waiter, STOP_TIMEOUT)
            except TimeoutError:
                log.error("worker pid %d did not stop in %.0fs; killing it", process.pid, STOP_TIMEOUT)
                process.kill()
                return await process.wait()
        stop.cancel()
        return waiter.result()

    def reload(self) -> None:
        """SIGHUP: validate the file first; workers re-read it only if it is good."""
        try:
            config = load_verified(self.config_path)
        except ConfigError as error:
            log.error("reload refused, configuration has errors:\n%s", "\n".join(error.errors))
            return
        self.config = config
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.send_signal(signal.SIGHUP)
        log.info("reloaded configuration; listeners and worker counts change on restart")


def load_verified(config_path: Path | None) -> Config:
    """The configuration, with what only loading can prove checked too (DKIM keys parse and are strong)."""
    config = load_config(config_path)
    try:
        DkimSigner.from_config(config.dkim)
    except DkimKeyError as error:
        raise ConfigError([f"{config.source or '<built-in defaults>'}: dkim: {error}"]) from error
    return config


def serve(config_path: Path | None) -> int:
    """Entry point of `engine serve`."""
    config = load_verified(config_path)
    config.engine.log_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s supervisor %(levelname)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(config.engine.log_dir / "supervisor.log")],
    )
    return uvloop.run(Supervisor(config, config.source).run())
