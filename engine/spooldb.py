"""The spool's LMDB environment: the compiled engine._spooldb (liblmdb), or its py-lmdb twin.

The twin is used when ENGINE_PURE_PYTHON=1 or when the extension was not built (liblmdb-dev missing at
install); IMPLEMENTATION says which one is loaded. Both read and write the same files.
"""

from __future__ import annotations

import contextlib
import os

from engine._spooldb_py import REMOVE, STORE, UPDATE, MapFull, MapResized, Op, Panic, SpoolDB, StoreError

__all__ = [
    "IMPLEMENTATION",
    "REMOVE",
    "STORE",
    "UPDATE",
    "MapFull",
    "MapResized",
    "Op",
    "Panic",
    "SpoolDB",
    "StoreError",
]

IMPLEMENTATION = "python"
if os.environ.get("ENGINE_PURE_PYTHON") != "1":
    with contextlib.suppress(ImportError):  # not built: the twin serves
        from engine._spooldb import SpoolDB  # type: ignore[assignment]

        IMPLEMENTATION = "compiled"
