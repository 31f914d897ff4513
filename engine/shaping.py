"""Lane-wide shaping: the throttle table every worker of a lane shares, and how its numbers are chosen.

The supervisor creates a fresh table per lane before starting the lane's workers; workers attach to it
by path, so a rate of 50/s towards a domain from one egress source holds however many workers deliver.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.config import Config, Lane
from engine.throttle import ThrottleTable

log = logging.getLogger(__name__)

SLOTS = 16384  # (egress, destination) pairs a lane shapes at once
LEASE = 30.0  # seconds a connection slot stays taken without renewal (a worker killed with -9 frees it then)


def throttle_path(config: Config, lane: str) -> Path:
    return config.engine.spool_dir / lane / "throttle.table"


def create_lane_table(config: Config, lane: Lane) -> ThrottleTable:
    """The supervisor's fresh table for one lane (never reused across starts); a cluster node's has room
    for the rate tokens it leases (engine.cluster.rates)."""
    path = throttle_path(config, lane.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    leases = config.cluster.redis is not None
    return ThrottleTable.create(path, slots=SLOTS, workers=max(lane.workers, 1), leases=leases)


def attach_lane_table(config: Config, lane: Lane) -> ThrottleTable:
    """A worker's view of its lane's table; a worker started without a supervisor shapes on its own."""
    path = throttle_path(config, lane.name)
    try:
        return ThrottleTable.attach(path)
    except (OSError, ValueError) as error:
        log.warning("no lane throttle table at %s (%s): shaping this worker alone", path, error)
        return ThrottleTable.create(None, slots=SLOTS, workers=max(lane.workers, 1))


def burst(rate: float) -> int:
    """A small burst: a tenth of a second's worth of messages, at least one."""
    return max(1, int(rate / 10))
