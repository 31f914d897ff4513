"""engine: a lane-separated outbound mail delivery engine."""

__version__ = "0.1.0"
