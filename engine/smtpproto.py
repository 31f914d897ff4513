"""SMTP hot-path codec: the compiled engine._smtpproto, or its pure-Python twin.

The twin is used when ENGINE_PURE_PYTHON=1 or when the extension was not built; IMPLEMENTATION says
which one is loaded ("compiled" or "python").
"""

import os

if os.environ.get("ENGINE_PURE_PYTHON") == "1":
    from engine._smtpproto_py import *  # noqa: F403

    IMPLEMENTATION = "python"
else:
    try:
        from engine._smtpproto import *  # noqa: F403

        IMPLEMENTATION = "compiled"
    except ImportError:
        from engine._smtpproto_py import *  # noqa: F403

        IMPLEMENTATION = "python"
