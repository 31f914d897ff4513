"""`python -m bench [--quick]` runs every benchmark; `python -m bench NAME [args]` runs one with its own flags.

Each benchmark runs as `python -m bench.NAME` in its own process, so none inherits another's event loop,
switch interval or subprocesses. Benchmarks are the modules of this package other than its helpers.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

HELPERS = {"common", "peers"}


def benchmarks() -> list[str]:
    return sorted(
        module.name
        for module in pkgutil.iter_modules([str(Path(__file__).parent)])
        if not module.name.startswith("_") and module.name not in HELPERS
    )


def run(name: str, args: list[str]) -> int:
    print(f"=== bench.{name} {' '.join(args)}".rstrip(), flush=True)
    return subprocess.run([sys.executable, "-m", f"bench.{name}", *args]).returncode


def main(argv: list[str]) -> int:
    names = benchmarks()
    if argv and not argv[0].startswith("-"):
        if argv[0] not in names:
            print(f"unknown benchmark {argv[0]!r}; one of: {', '.join(names)}", file=sys.stderr)
            return 2
        return run(argv[0], argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(f"benchmarks: {', '.join(names)}")
        return 0
    failed = [name for name in names if run(name, argv) != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
