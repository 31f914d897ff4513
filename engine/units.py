"""Human-readable durations, rates and sizes, as operators write them in engine.toml."""

from __future__ import annotations

import math
import re

__all__ = ["parse_duration", "parse_rate", "parse_size"]

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

# "/min" and "/m" both mean per minute; a rate's period can also be a duration ("10/5m").
_RATE_PERIODS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}

# Binary multiples, as Exim and most mail software read "25M": a limit is never smaller than the operator
# meant. "KiB"/"MiB"/"GiB" are accepted as synonyms.
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|(b))?", re.IGNORECASE)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_duration(value: str | float) -> float:
    """Seconds in "500ms", "30s", "5m", "2h", "3d", "1h30m", or a plain number of seconds."""
    if _is_number(value):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION.fullmatch(text):
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ValueError(f"invalid duration {value!r} (examples: '500ms', '30s', '5m', '2h', '3d')")
    else:
        raise ValueError(f"invalid duration {value!r}: expected a string like '30s' or a number of seconds")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must be a finite number >= 0")
    return seconds


def parse_rate(value: str | float) -> float:
    """Events per second in "100/s", "6000/min", "1000/h", "10/5m", or a plain number per second."""
    if _is_number(value):
        count, period = float(value), 1.0
    elif isinstance(value, str) and "/" in value:
        left, _, right = value.partition("/")
        left, right = left.strip(), right.strip().lower()
        if not _NUMBER.fullmatch(left):
            raise ValueError(f"invalid rate {value!r} (examples: '100/s', '6000/min', '1000/h')")
        count = float(left)
        if right in _RATE_PERIODS:
            period = _RATE_PERIODS[right]
        else:
            try:
                period = parse_duration(right)
            except ValueError:
                raise ValueError(f"invalid rate {value!r}: unknown period {right!r}") from None
            if not _DURATION.fullmatch(right):
                raise ValueError(f"invalid rate {value!r}: period {right!r} needs a unit")
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        count, period = float(value), 1.0
    else:
        raise ValueError(f"invalid rate {value!r} (examples: '100/s', '6000/min', '1000/h')")
    if not math.isfinite(count) or count <= 0 or period <= 0:
        raise ValueError(f"invalid rate {value!r}: must be more than zero per a non-zero period")
    return count / period


def parse_size(value: str | int) -> int:
    """Bytes in "25MB", "512KB", "1GB" (binary multiples; "MiB" etc. too), or a plain integer of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        number, unit, _ = match.groups()
        size = round(float(number) * _SIZE_UNITS[(unit or "").lower()])
    else:
        raise ValueError(f"invalid size {value!r} (examples: '512KB', '25MB', '1GB', or bytes)")
    if size < 0:
        raise ValueError(f"invalid size {value!r}: must be >= 0")
    return size
