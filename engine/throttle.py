"""Lane-wide shaping counters: the compiled engine._throttle, or its pure-Python twin.

The twin is used when ENGINE_PURE_PYTHON=1 or when the extension was not built; IMPLEMENTATION says
which one is loaded ("compiled" or "python"). Both drive the same shared-memory table layout.

Use: the supervisor calls ThrottleTable.create(lane_spool_dir / "throttle.table", slots, workers) before
it starts a lane's workers (workers = most worker ids alive at once) and table.reclaim(worker_id) when a
worker dies, before restarting it. Each worker calls ThrottleTable.attach(path) and, per (egress, domain),
key = throttle_key(egress, domain); acquire(key, rate, burst, now) before each message (wait what it
returns when > 0); open_connection(key, limit, worker_id, now, lease) before a session and
close_connection(key, worker_id) after it; renew(worker_id, now) every lease / 3. `now` is
time.monotonic(). A fresh table per supervisor start: a table file is not reused across reboots.
"""

import os

if os.environ.get("ENGINE_PURE_PYTHON") == "1":
    from engine._throttle_py import TableFull, ThrottleTable, throttle_key

    IMPLEMENTATION = "python"
else:
    try:
        from engine._throttle import TableFull, ThrottleTable, throttle_key

        IMPLEMENTATION = "compiled"
    except ImportError:
        from engine._throttle_py import TableFull, ThrottleTable, throttle_key

        IMPLEMENTATION = "python"

__all__ = ["IMPLEMENTATION", "TableFull", "ThrottleTable", "throttle_key"]
