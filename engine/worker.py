"""One lane worker process: a uvloop event loop that receives, spools and delivers for its lane.

Started by the supervisor with the lane's listening sockets already bound. It opens its own spool
(LMDB must be opened after fork), recovers what the spool holds, and serves until SIGTERM; SIGHUP
re-reads routes and shaping without dropping a session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Mapping
from pathlib import Path

import uvloop

from engine.config import Config, ConfigError, load_config
from engine.control import Channel, WorkerControl, read_init
from engine.dispatch import Dispatcher, new_deliverers
from engine.events import EventLog
from engine.http_injection import HttpInjectionServer
from engine.postmaster import Postmaster
from engine.reception import ReceptionHandler
from engine.resolver import Resolver
from engine.shaping import attach_lane_table
from engine.signing import DkimKeyError, DkimSigner
from engine.smtp.server import SMTPServer
from engine.spool import Spool

log = logging.getLogger(__name__)

PARENT_CHECK_INTERVAL = 1.0
GRACE_PERIOD = 30.0


def spool_path(config: Config, lane: str, index: int) -> Path:
    return config.engine.spool_dir / lane / str(index)


class Worker:
    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        lane: str,
        index: int,
        sockets: Mapping,
        control: Channel | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.lane = config.lanes[lane]
        self.index = index
        self.sockets = dict(sockets)
        self.servers: list[SMTPServer | HttpInjectionServer] = []
        self.handlers: list[ReceptionHandler] = []
        self.stopped = asyncio.Event()
        self.control = control
        self.parent = os.getppid()  # taken first thing: the supervisor may die while this worker starts

    async def run(self) -> None:
        config, lane = self.config, self.lane
        spool = Spool(spool_path(config, lane.name, self.index))
        events = EventLog(config.engine.log_dir, f"{lane.name}-{self.index}")
        resolver = Resolver([(ns.host, ns.port) for ns in config.dns.nameservers], timeout=config.dns.timeout)
        signer = DkimSigner.from_config(config.dkim)
        throttle = attach_lane_table(config, lane)
        deliverers = new_deliverers(config, lane, resolver, throttle, self.index)
        self.dispatcher = Dispatcher(config, lane, spool, events, deliverers, throttle=throttle, worker_id=self.index)
        worker_control = WorkerControl(self.dispatcher, events, resolver) if self.control is not None else None
        self.postmaster = postmaster = Postmaster(
            config,
            lane,
            spool,
            events,
            self.dispatcher,
            signer,
            suspend=worker_control.suspend_lane if worker_control is not None else None,
        )
        options = postmaster.reception_options()
        control = None
        if worker_control is not None:
            control = worker_control.attach(self.control)
            control.add_done_callback(self._control_closed)
        recovered = self._recover(spool)
        log.info("worker %s/%d recovered %d messages from its spool", lane.name, self.index, recovered)
        self.dispatcher.start()
        postmaster.start()
        for listener in config.listeners:
            sock = self.sockets.get(listener.name)
            if listener.lane != lane.name or sock is None:
                continue
            handler = ReceptionHandler(
                config.engine.hostname, lane, listener.name, spool, events, self.dispatcher, signer, **options
            )
            self.handlers.append(handler)
            if listener.protocol == "http":
                server = HttpInjectionServer(handler, listener)
            else:
                server = SMTPServer.for_listener(handler, listener)
            await server.listen(sock)
            self.servers.append(server)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopped.set)
        loop.add_signal_handler(signal.SIGINT, self.stopped.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        watchdog = loop.create_task(self._watch_parent(self.parent))
        await self.stopped.wait()
        watchdog.cancel()
        await asyncio.gather(*(server.close(GRACE_PERIOD) for server in self.servers))
        await self.dispatcher.stop(GRACE_PERIOD)
        for deliverer in self.dispatcher.deliverers.values():
            await deliverer.close()
        await postmaster.close()
        await spool.close()
        if control is not None:
            control.cancel()
        events.close()

    def _recover(self, spool: Spool) -> int:
        count = 0
        for key, packed in spool.envelopes():
            self.dispatcher.restore(key, packed)
            count += 1
        return count

    def _reload(self) -> None:
        try:
            config = load_config(self.config_path)
            signer = DkimSigner.from_config(config.dkim)
        except ConfigError as error:
            log.error("reload refused, keeping the running configuration:\n%s", "\n".join(error.errors))
            return
        except DkimKeyError as error:
            log.error("reload refused, keeping the running configuration: %s", error)
            return
        lane = config.lanes.get(self.lane.name)
        if lane is None:
            log.error("reload refused: lane %s is gone from the configuration", self.lane.name)
            return
        self.config, self.lane = config, lane
        self.dispatcher.reload(config, lane)
        self.postmaster.reload(config, lane, signer)
        for handler in self.handlers:
            handler.signer = signer
        log.info("worker %s/%d reloaded routes and shaping", lane.name, self.index)

    def _control_closed(self, serving: asyncio.Task) -> None:
        """The supervisor's end of the control channel closes when it dies, even before this worker got
        far enough to watch its parent pid."""
        error = None if serving.cancelled() else serving.exception()
        if serving.cancelled() or self.stopped.is_set():
            return
        log.warning("supervisor closed the control channel%s; stopping", f" ({error})" if error else "")
        self.stopped.set()

    async def _watch_parent(self, parent: int) -> None:
        """An orphaned worker (supervisor killed with -9) stops gracefully instead of holding the sockets."""
        while os.getppid() == parent:
            await asyncio.sleep(PARENT_CHECK_INTERVAL)
        log.warning("supervisor %d is gone; stopping", parent)
        self.stopped.set()


def run_worker(
    config_path: Path | None, lane: str, index: int, fds: Mapping[str, int], control_fd: int | None = None
) -> int:
    """Entry point of `engine worker` (started by the supervisor, not by users)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {lane}/{index} %(levelname)s %(message)s")
    control = read_init(socket.socket(fileno=control_fd)) if control_fd is not None else None
    config = control.config if control is not None else load_config(config_path)
    sockets = {name: socket.socket(fileno=fd) for name, fd in fds.items()}
    for sock in sockets.values():
        sock.setblocking(False)
    os.setpriority(os.PRIO_PROCESS, 0, config.lanes[lane].nice)
    uvloop.run(Worker(config, config_path, lane, index, sockets, control).run())
    return 0
