"""The scheduler: the compiled engine._scheduler, or its pure-Python twin.

The twin is used when ENGINE_PURE_PYTHON=1 or when the extension was not built; IMPLEMENTATION says
which one is loaded ("compiled" or "python").
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
