"""Benchmarks: `python -m bench` runs them all, `python -m bench NAME [args]` one (see bench/__main__.py)."""
