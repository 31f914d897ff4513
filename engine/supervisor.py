"""The supervisor: binds every listener, starts the lane workers, restarts the ones that die, and runs the
control plane (admin API, metrics, SLA alerts).

Workers are separate processes started with the listening sockets passed down (fork and exec), so each
opens its own LMDB spool and uvloop loop from a clean state, and a crash in one lane never touches another.
Each worker also gets one end of a control channel (engine.control); the supervisor asks workers for their
counts, queues and operator actions over it, and never handles message bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from aiohttp import web

from engine.admin.app import create_app
from engine.admin.store import Rule, SuspensionStore
from engine.cluster import Cluster
from engine.compliance import load_secret
from engine.config import Config, ConfigError, Listener, load_config
from engine.control import ControlClient, ControlError, channel_pair, send_init
from engine.events import EventLog
from engine.metrics import EngineMetrics
from engine.reputation import ComplaintLog, complaint_log_path
from engine.shaping import create_lane_table
from engine.signing import DkimKeyError, DkimSigner
from engine.sla import SlaMonitor, Webhook
from engine.suppression import SuppressionList, suppression_path
from engine.worker import spool_path

log = logging.getLogger("engine.supervisor")

RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 30.0
HEALTHY_AFTER = 60.0  # a worker that lived this long restarts without backoff
STOP_TIMEOUT = 45.0  # after SIGTERM, a worker gets this long before SIGKILL
POLL_INTERVAL = 1.0  # worker counts are collected and SLAs evaluated this often
QUEUE_CACHE = 1.0  # queue views younger than this are reused (a summary walks every queued item)


@dataclass
class WorkerSlot:
    lane: str
    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = RESTART_BACKOFF_MIN
    history: list[int] = field(default_factory=list)
    control: ControlClient | None = None

    @property
    def name(self) -> str:
        return f"{self.lane}/{self.index}"


def bind_listener(listener: Listener) -> socket.socket:
    """A listening socket for one worker of the listener's lane. Every worker gets its own socket on the
    same port (SO_REUSEPORT), so the kernel spreads connections evenly over the workers; a restarted
    worker takes over its predecessor's socket, with the connections waiting in its backlog.
    SO_REUSEADDR so a restart does not wait for TIME_WAIT."""
    family = socket.AF_INET6 if ":" in listener.listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((listener.listen.host, listener.listen.port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.sockets: dict[tuple[str, int], socket.socket] = {}  # (listener, worker index)
        self.slots: list[WorkerSlot] = []
        self.stopping = asyncio.Event()
        self.started = time.time()
        self.metrics = EngineMetrics(config.lanes)
        self.suspensions = SuspensionStore(config.engine.spool_dir / "suspensions.json")
        self.sla = SlaMonitor(config.lanes, config.alerts, self._alert)
        self.webhook = Webhook(config.alerts.webhook) if config.alerts.webhook else None
        self.events: EventLog | None = None
        self.suppression: SuppressionList | None = None
        self.complaints: ComplaintLog | None = None
        self.cluster: Cluster | None = None
        self.secret = b""
        self._queue_view: tuple[float, list[dict]] = (0.0, [])
        self._notices: set[asyncio.Task] = set()

    async def run(self) -> int:
        # Signals first: once a listener accepts, a script may already send SIGHUP or SIGTERM.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for listener in self.config.listeners:
            for index in range(self.config.lanes[listener.lane].workers):
                self.sockets[(listener.name, index)] = bind_listener(listener)
            log.info("listener %s on %s (lane %s)", listener.name, listener.listen, listener.lane)
        self.throttles = {lane.name: create_lane_table(self.config, lane) for lane in self.config.lanes.values()}
        self.slots = [
            WorkerSlot(lane.name, index) for lane in self.config.lanes.values() for index in range(lane.workers)
        ]
        tasks = [loop.create_task(self._supervise(slot)) for slot in self.slots]
        # Workers start while the admin server starts: they read the configuration file as it is now.
        self.events = EventLog(self.config.engine.log_dir, "supervisor")
        self.suppression = SuppressionList(suppression_path(self.config.engine.spool_dir))
        self.complaints = ComplaintLog(complaint_log_path(self.config.engine.spool_dir))
        self.secret = load_secret(self.config)
        self.cluster = self._join_cluster()
        admin = web.AppRunner(create_app(self), access_log=None)
        await admin.setup()
        listen = self.config.admin.listen
        await web.TCPSite(admin, listen.host, listen.port).start()
        log.info("admin API, metrics and dashboard on http://%s/", listen)
        poller = loop.create_task(self._poll())
        await self.stopping.wait()
        poller.cancel()
        log.info("stopping: workers finish their sessions and flush their spools")
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
        await admin.cleanup()
        if self.cluster is not None:
            await self.cluster.close()
        if self.webhook is not None:
            await self.webhook.close()
        self.suppression.close()
        self.complaints.close()
        self.events.close()
        for sock in self.sockets.values():
            sock.close()
        log.info("stopped")
        return 0

    def _worker_command(self, slot: WorkerSlot, control_fd: int) -> tuple[list[str], list[int]]:
        """The command line of a worker and the descriptors it inherits."""
        command = [sys.executable, "-m", "engine", "worker", "--lane", slot.lane, "--index", str(slot.index)]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        fds = [control_fd]
        for listener in self.config.listeners:
            if listener.lane == slot.lane:
                fd = self.sockets[(listener.name, slot.index)].fileno()
                command += ["--fd", f"{listener.name}={fd}"]
                fds.append(fd)
        return [*command, "--control", str(control_fd)], fds

    async def _supervise(self, slot: WorkerSlot) -> None:
        while not self.stopping.is_set():
            supervisor_end, worker_end = channel_pair()
            send_init(supervisor_end, self.config, [rule.worker_args() for rule in self.suspensions.active(slot.lane)])
            slot.control = ControlClient(supervisor_end, functools.partial(self._notice, slot.lane))
            command, fds = self._worker_command(slot, worker_end.fileno())
            try:
                slot.process = await asyncio.create_subprocess_exec(*command, pass_fds=fds)
            finally:
                worker_end.close()
            await slot.control.start()
            slot.started = time.monotonic()
            log.info("worker %s started, pid %d", slot.name, slot.process.pid)
            returncode = await self._wait(slot.process)
            self.throttles[slot.lane].reclaim(slot.index)  # its connection slots, at once rather than by lease
            await slot.control.close()
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
        self.sla.lanes.update((name, lane) for name, lane in config.lanes.items() if name in self.sla.windows)
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.send_signal(signal.SIGHUP)
        log.info("reloaded configuration; listeners and worker counts change on restart")

    # control plane

    def _controls(self, lane: str | None) -> list[tuple[WorkerSlot, ControlClient]]:
        return [
            (slot, slot.control)
            for slot in self.slots
            if slot.control is not None and not slot.control.closed and (lane is None or slot.lane == lane)
        ]

    async def fan_out(self, lane: str | None, op: str, **args: object) -> list[tuple[WorkerSlot, object]]:
        """Asks every live worker (of `lane`, or all) at once; a failed worker's answer is its ControlError."""
        chosen = self._controls(lane)
        answers = await asyncio.gather(*(control.call(op, **args) for _, control in chosen), return_exceptions=True)
        for (slot, _), answer in zip(chosen, answers, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, ControlError):
                raise answer
            if isinstance(answer, ControlError):
                log.warning("worker %s: %s failed: %s", slot.name, op, answer)
        return list(zip((slot for slot, _ in chosen), answers, strict=True))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            await self.collect()

    async def collect(self) -> None:
        """Adds every worker's counts since the last call to the metrics and SLA windows, then checks SLAs."""
        connections: dict[str, dict[str, int]] = {lane: {} for lane in self.config.lanes}
        now = time.time()
        for slot, stats in await self.fan_out(None, "stats"):
            if isinstance(stats, ControlError):
                continue
            self.metrics.add_tally(slot.lane, stats["events"])
            self.metrics.add_dns(slot.lane, stats["dns"])
            self.sla.add(slot.lane, stats["events"], now)
            by_egress = connections.setdefault(slot.lane, {})
            for egress, by_domain in stats["connections"].items():
                by_egress[egress] = by_egress.get(egress, 0) + sum(by_domain.values())
        self.metrics.set_connections(connections)
        for lane, size in self.spool_sizes(per_lane=True).items():
            self.metrics.spool_bytes.labels(lane).set(size)
        rules = self.suspensions.active()
        for lane in self.config.lanes:
            alive = sum(
                1 for slot in self.slots if slot.lane == lane and slot.process and slot.process.returncode is None
            )
            self.metrics.workers.labels(lane).set(alive)
            self.metrics.suspensions.labels(lane).set(sum(1 for rule in rules if rule.covers(lane)))
        self.sla.evaluate(now)

    def _alert(self, record: dict) -> None:
        log.warning("alert %s %s (%s): %s", record["severity"], record["state"], record["rule"], record["message"])
        if self.events is not None:
            self.events.emit(record)
        if self.webhook is not None:
            self.webhook.send(record)

    def spool_sizes(self, per_lane: bool = False) -> dict[str, int]:
        """Disk blocks used by each worker's spool ("lane/index"), or summed per lane."""
        sizes: dict[str, int] = {}
        for slot in self.slots:
            directory = spool_path(self.config, slot.lane, slot.index)
            used = sum(entry.stat().st_blocks * 512 for entry in os.scandir(directory)) if directory.is_dir() else 0
            key = slot.lane if per_lane else slot.name
            sizes[key] = sizes.get(key, 0) + used
        return sizes

    async def queues(self) -> list[dict]:
        """Queued messages per lane and destination, summed over workers and egress sources."""
        taken, rows = self._queue_view
        if time.monotonic() - taken < QUEUE_CACHE:
            return rows
        merged: dict[tuple[str, str], dict] = {}
        for slot, summary in await self.fan_out(None, "queues"):
            if isinstance(summary, ControlError):
                continue
            for item in summary:
                row = merged.setdefault(
                    (slot.lane, item["domain"]),
                    {
                        "lane": slot.lane,
                        "domain": item["domain"],
                        "queued": 0,
                        "ready": 0,
                        "deferred": 0,
                        "suspended": 0,
                        "oldest_age": 0.0,
                        "egress": {},
                    },
                )
                queued = item["ready"] + item["deferred"] + item["suspended"]
                for name in ("ready", "deferred", "suspended"):
                    row[name] += item[name]
                row["queued"] += queued
                row["oldest_age"] = max(row["oldest_age"], item["oldest_age"])
                row["egress"][item["egress"]] = row["egress"].get(item["egress"], 0) + queued
        rows = sorted(merged.values(), key=lambda row: (-row["queued"], row["lane"], row["domain"]))
        self._queue_view = (time.monotonic(), rows)
        return rows

    def _notice(self, lane: str, kind: str, args: dict) -> None:
        if kind != "suspend":
            log.warning("unknown notice %r from a %s worker", kind, lane)
            return
        task = asyncio.get_running_loop().create_task(self.adopt_suspension(lane, **args))
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def adopt_suspension(
        self, lane: str, *, rule_id: str, until: float | None = None, reason: str = "", **selectors: str | None
    ) -> Rule:
        """A suspension one worker made (its reputation guard tripped) becomes the lane's: stored, so it
        outlives restarts, and sent to the lane's other workers; resuming it by API reaches them all."""
        rule = self.suspensions.rules.get(rule_id)
        if rule is not None:
            return rule
        duration = None if until is None else max(0.001, until - time.time())
        selectors = {name: selectors.get(name) for name in ("domain", "campaign", "tenant")}
        return await self.suspend(lane=lane, duration=duration, reason=reason, rule_id=rule_id, **selectors)

    async def suspend(
        self,
        *,
        lane: str | None,
        domain: str | None,
        campaign: str | None,
        tenant: str | None,
        duration: float | None,
        reason: str,
        rule_id: str | None = None,
    ) -> Rule:
        """Stored first (so a worker starting now gets it in its init frame), then sent to running workers."""
        rule = self.suspensions.add(
            lane=lane,
            domain=domain,
            campaign=campaign,
            tenant=tenant,
            duration=duration,
            reason=reason,
            rule_id=rule_id,
        )
        await self._apply_rule(rule, "added")
        if self.cluster is not None:
            self.cluster.rule_added(rule)
        return rule

    async def resume(self, rule_id: str) -> Rule | None:
        rule = await self._lift_rule(rule_id, "resumed")
        if rule is not None and self.cluster is not None:
            self.cluster.rule_removed(rule_id)
        return rule

    async def _apply_rule(self, rule: Rule, how: str) -> None:
        """A rule just stored goes to the running workers of its lane (or all lanes)."""
        await self.fan_out(rule.lane, "suspend", **rule.worker_args())
        self._queue_view = (0.0, [])
        log.info("suspension %s %s: %s", rule.id, how, rule)

    async def _lift_rule(self, rule_id: str, how: str) -> Rule | None:
        """Removes a rule from the store and from the running workers; None if it was not active."""
        rule = self.suspensions.remove(rule_id)
        if rule is not None:
            await self.fan_out(rule.lane, "resume", rule_id=rule_id)
            self._queue_view = (0.0, [])
            log.info("suspension %s %s", rule_id, how)
        return rule

    # cluster (engine.cluster)

    def _join_cluster(self) -> Cluster | None:
        """With `[cluster] redis`, suppression, suspensions and rates are shared with the other nodes."""
        if self.config.cluster.redis is None:
            self.suppression.set_journal(False)
            return None
        cluster = Cluster(
            self.config.cluster.redis,
            f"{self.config.engine.hostname}/{os.getpid()}",
            self,
            self.suppression,
            self.throttles,
        )
        cluster.start()
        return cluster

    async def adopt_remote_rule(self, rule: Rule) -> None:
        """A suspension another node made: stored as it is and sent to this node's workers, not shared again."""
        self.suspensions.put(rule)
        await self._apply_rule(rule, "from the cluster")

    async def drop_remote_rule(self, rule_id: str) -> None:
        """A suspension resumed on another node (or ended while this one was away)."""
        await self._lift_rule(rule_id, "resumed by the cluster")

    async def bounce(
        self, *, lane: str | None, domain: str | None, campaign: str | None, tenant: str | None, reason: str
    ) -> tuple[int, list[str]]:
        """(recipients bounced, workers that could not be asked)."""
        answers = await self.fan_out(lane, "bounce", domain=domain, campaign=campaign, tenant=tenant, reason=reason)
        self._queue_view = (0.0, [])
        bounced = sum(answer for _, answer in answers if isinstance(answer, int))
        log.info("operator bounce (%s): %d recipients; %s", reason, bounced, dict(lane=lane, domain=domain))
        return bounced, [slot.name for slot, answer in answers if isinstance(answer, ControlError)]

    async def overview(self) -> dict:
        """Per lane: throughput, latency against its SLA, deepest queues; suspensions and recent alerts."""
        rows = await self.queues()
        now = time.time()
        lanes = []
        for name in self.config.lanes:
            mine = [row for row in rows if row["lane"] == name]
            slots = [slot for slot in self.slots if slot.lane == name]
            lanes.append(
                {
                    "name": name,
                    **self.sla.lane_view(name, now),
                    "queued": sum(row["queued"] for row in mine),
                    "destinations": mine[:10],
                    "workers": {
                        "configured": len(slots),
                        "alive": sum(1 for s in slots if s.process is not None and s.process.returncode is None),
                    },
                }
            )
        return {
            "time": now,
            "hostname": self.config.engine.hostname,
            "lanes": lanes,
            "suspensions": [dataclasses.asdict(rule) for rule in self.suspensions.active()],
            "alerts": list(reversed(self.sla.recent)),
        }


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
