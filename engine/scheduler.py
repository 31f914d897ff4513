"""The scheduler: the compiled engine._scheduler, or its pure-Python twin.

The twin is used when ENGINE_PURE_PYTHON=1 or when the extension was not built; IMPLEMENTATION says
which one is loaded ("compiled" or "python").

Use: one Scheduler(capacity) per worker; schedule(item, queue, priority, due, expires, campaign, tenant,
now=time.monotonic()) raises SchedulerFull at capacity (answer 452). A timer task sleeps until
min(next_due(), next_expiry()), then wakes the queues advance(now) returns and bounces expired(now);
pop(queue) gives the next item or -1. Suspending a destination is suspend_queue() on each of its queues;
every resume_*() returns the queues to wake.
"""

import os

if os.environ.get("ENGINE_PURE_PYTHON") == "1":
    from engine._scheduler_py import MAX_QUEUES, PRIORITIES, Scheduler, SchedulerFull

    IMPLEMENTATION = "python"
else:
    try:
        from engine._scheduler import MAX_QUEUES, PRIORITIES, Scheduler, SchedulerFull

        IMPLEMENTATION = "compiled"
    except ImportError:
        from engine._scheduler_py import MAX_QUEUES, PRIORITIES, Scheduler, SchedulerFull

        IMPLEMENTATION = "python"

__all__ = ["IMPLEMENTATION", "MAX_QUEUES", "PRIORITIES", "Scheduler", "SchedulerFull"]
