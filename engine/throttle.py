"""Lane-wide shaping counters: the compiled engine._throttle, or its pure-Python twin.

The twin is used when ENGINE_PURE_PYTHON=1 or when the extension was not built; IMPLEMENTATION says
which one is loaded ("compiled" or "python"). Both drive the same shared-memory table layout.
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
