"""Event records as JSON lines: the compiled engine._eventjson, or its pure-Python twin.

The twin is used when ENGINE_PURE_PYTHON=1 or when the extension was not built; IMPLEMENTATION says
which one is loaded ("compiled" or "python"). The compiled encoder takes the types event records are made
of; a record with anything else (an int subclass, say) is written by the twin, which is the json module.
"""

from __future__ import annotations

import contextlib
import os

from engine import _eventjson_py

__all__ = ["IMPLEMENTATION", "encode_record"]

_compiled = None
if os.environ.get("ENGINE_PURE_PYTHON") != "1":
    with contextlib.suppress(ImportError):  # not built: the twin serves
        from engine._eventjson import encode_record as _compiled

IMPLEMENTATION = "python" if _compiled is None else "compiled"


def encode_record(record: dict) -> bytes:
    """One JSON line (with its newline): json.dumps(record, ensure_ascii=False, separators=(",", ":"))."""
    if _compiled is not None:
        try:
            return _compiled(record)
        except TypeError:
            pass
    return _eventjson_py.encode_record(record)
