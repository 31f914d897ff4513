"""DKIM body canonicalisation: the compiled engine._dkimcanon, or its pure twin when ENGINE_PURE_PYTHON=1."""

import os

if os.environ.get("ENGINE_PURE_PYTHON") == "1":
    from engine._dkimcanon_py import relaxed_body, simple_body
else:
    try:
        from engine._dkimcanon import relaxed_body, simple_body
    except ImportError:
        from engine._dkimcanon_py import relaxed_body, simple_body

__all__ = ["relaxed_body", "simple_body"]
