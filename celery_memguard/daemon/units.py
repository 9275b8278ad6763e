"""Parsing of the human units the config accepts: sizes, durations, percentages.

Pure functions with no I/O; a percentage of memory needs the total passed in, because only
the caller (the daemon at start-up) knows the container's or host's memory.
"""

from __future__ import annotations

import math
import re

MiB = 1024 * 1024  # for sizes written in code

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SIZE_RE = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>[a-zA-Z]*)\s*$")
_PERCENT_RE = re.compile(rf"^\s*{_NUMBER}\s*%\s*$")


def parse_percent(value: object) -> float:
    """Return a fraction in [0, 1] from ``"5%"`` or a number between 0 and 1."""
    if isinstance(value, bool):
        raise ValueError("expected a percentage such as '5%', not a boolean")
    if isinstance(value, int | float):
        fraction = float(value)
    elif isinstance(value, str) and (match := _PERCENT_RE.match(value)):
        fraction = float(match["num"]) / 100.0
    else:
        raise ValueError(f"expected a percentage such as '5%', got {value!r}")
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"percentage {value!r} is outside 0%..100%")
    return fraction


def parse_size(value: object, memory_total: int | None) -> int:
    """Return bytes from ``1048576``, ``"512MiB"``, ``"1.5GB"`` or ``"25%"`` of memory_total."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '512MiB', not a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"a size in bytes must be whole, got {value!r}")
        size = int(value)
    elif isinstance(value, str) and "%" in value:
        fraction = parse_percent(value)
        if memory_total is None:
            raise ValueError(f"{value!r} is a percentage but the total memory is unknown")
        size = int(fraction * memory_total)
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        unit = match["unit"].lower()
        if unit not in _SIZE_UNITS:
            raise ValueError(
                f"unknown size unit {match['unit']!r} in {value!r} "
                "(use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or a percentage)"
            )
        size = int(float(match["num"]) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"expected a size such as '512MiB', '1.5GB', bytes or '50%', got {value!r}")
    if size <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    return size


def parse_duration(value: object) -> float:
    """Return seconds from ``2``, ``0.5``, ``"250ms"``, ``"30s"``, ``"5m"`` or ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        unit = match["unit"].lower()
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown duration unit {match['unit']!r} in {value!r} (use ms, s, m, h)")
        seconds = float(match["num"]) * _DURATION_UNITS[unit]
    elif isinstance(value, str) and value.strip().startswith("-"):
        raise ValueError(f"a duration must not be negative, got {value!r}")
    else:
        raise ValueError(f"expected a duration such as '250ms', '30s' or seconds, got {value!r}")
    if seconds < 0 or math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"a duration must not be negative, got {value!r}")
    return seconds


def format_bytes(size: float) -> str:
    """Render bytes with a binary unit, for logs and tables."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
