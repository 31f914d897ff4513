"""The scheduler: the compiled engine._scheduler, or its pure-Python twin.

The twin is used when ENGINE_PURE_PYTHON=1 or when the extension was not built; IMPLEMENTATION says
which one is loaded ("compiled" or "python").

Use: one Scheduler(capacity) per worker; schedule(item, queue, priority, due, expires, campaign, tenant,
now=time.monotonic(), key=spool_key, created=unix_time) raises SchedulerFull at capacity (answer 452).
A timer task sleeps until min(next_due(), next_expiry()), then wakes the queues advance(now) returns and
bounces expired_entries(now); pop_entry(queue) gives the next entry (item, queue, priority, key, created,
expires, campaign, tenant) or None. An operator suspension is hold(id, queue, campaign, tenant) (-1 / 0:
any); release(id) returns the queues to wake. remove_matching() serves admin bounces, summary() queue views,
take(item, key) lets a delivery carry another ready item of the same message along.
"""

import os

if os.environ.get("ENGINE_PURE_PYTHON") == "1":
    from engine._scheduler_py import KEY_SIZE, MAX_QUEUES, PRIORITIES, Scheduler, SchedulerFull

    IMPLEMENTATION = "python"
else:
    try:
        from engine._scheduler import KEY_SIZE, MAX_QUEUES, PRIORITIES, Scheduler, SchedulerFull

        IMPLEMENTATION = "compiled"
    except ImportError:
        from engine._scheduler_py import KEY_SIZE, MAX_QUEUES, PRIORITIES, Scheduler, SchedulerFull

        IMPLEMENTATION = "python"

__all__ = ["IMPLEMENTATION", "KEY_SIZE", "MAX_QUEUES", "PRIORITIES", "Scheduler", "SchedulerFull"]
